"""seqio bridge (extra `seqio`, installed by `make test`): the example task feeds the trainer."""
import json

import numpy as np
import pytest

pytest.importorskip("seqio")  # only a guard for installs without the extra; CI installs it

from conftest import TINY

from maxmodel.config import ConfigError, load_config
from maxmodel.data.pipeline import make_train_data


def test_seqio_task_feeds_the_trainer(tmp_path):
    from maxmodel.train.loop import train
    ovr = TINY + [f"run.output_dir={tmp_path}", "data.source=seqio:maxmodel_builtin", "train.steps=3",
                  "run.log_every=1", "run.eval_every=3", "run.eval_batches=1", "checkpoint.every_steps=2",
                  "run.name=s"]
    data = make_train_data(load_config(overrides=ovr), tmp_path)
    assert data.tokenizer.vocab_size == 512 and data.tokenizer.id == "seqio:maxmodel_builtin"
    first = next(data.train)
    assert {k: v.shape for k, v in first.items()} == {k: (8, 32) for k in
                                                      ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    # seqio's packing: decoder inputs are the targets shifted right within each segment.
    seg = first["segment_ids"][0]
    same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
    np.testing.assert_array_equal(first["inputs"][0][1:][same], first["targets"][0][:-1][same])
    assert (first["loss_mask"][first["segment_ids"] == 0] == 0).all()
    # Resume: the state is JSON and replays to the same next batch.
    state = json.loads(json.dumps(data.train.get_state()))
    expected = next(data.train)
    again = make_train_data(load_config(overrides=ovr), tmp_path)
    again.train.set_state(state)
    np.testing.assert_array_equal(next(again.train)["inputs"], expected["inputs"])

    result = train(load_config(overrides=ovr))
    assert result.final_step == 3 and all(np.isfinite(v) for v in result.losses.values())
    assert result.losses[3] < result.losses[1] and np.isfinite(result.eval_loss)
    with pytest.raises(ConfigError, match="no seqio task or mixture 'nope'"):
        make_train_data(load_config(overrides=TINY + ["data.source=seqio:nope"]), tmp_path)
