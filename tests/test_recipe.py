"""`maxmodel recipe`: the example recipe (configs/recipes/arithmetic.yaml: data -> sft -> grpo -> rejection
sampling -> sft) runs end to end with short stages, each from the previous stage's output, and a run stopped
in its second stage resumes there; bad recipes name the key."""
import json
from pathlib import Path

import jax
import pytest
from test_fault_tolerance import _metrics

from maxmodel.config import ConfigError
from maxmodel.finetune.recipe import Recipe
from maxmodel.parallel import mesh as mesh_module
from maxmodel.parallel.mesh import build_mesh
from maxmodel.train import loop

EXAMPLE = Path(__file__).parent.parent / "configs" / "recipes" / "arithmetic.yaml"
SHORT = ["run.progress=false", "sft:train.steps=20", "grpo:train.steps=3", "grpo:train.batch_size=16",
         "grpo:rl.group_size=4", "sft2:train.steps=3", "checkpoint.every_steps=10"]


def test_example_recipe_runs_and_resumes_in_its_second_stage(tmp_path, compile_cache, monkeypatch):
    # one device: the stages' layouts are tested elsewhere; here it is the chaining and the resume
    one_device = lambda m, devices=None: build_mesh(m, jax.devices()[:1])  # noqa: E731
    monkeypatch.setattr(loop, "build_mesh", one_device)
    monkeypatch.setattr(mesh_module, "build_mesh", one_device)  # export's
    over = SHORT + [f"run.compile_cache_dir={compile_cache}", "mesh.data=1"]
    stopped = Recipe(EXAMPLE, over, tmp_path).run(stop_at=("sft", 10))
    assert stopped["data"]["done"] and "sft" not in stopped  # the first stage finished, the second did not
    data_written = (tmp_path / "data" / "prompts.jsonl").stat().st_mtime_ns
    state = Recipe(EXAMPLE, over, tmp_path).run()
    assert all(state[s]["done"] for s in ("data", "sft", "grpo", "best", "sft2"))
    assert (tmp_path / "data" / "prompts.jsonl").stat().st_mtime_ns == data_written  # not rerun
    assert [r["step"] for r in _metrics(tmp_path / "sft") if "loss" in r] == [10, 20]  # resumed at 10, not 0
    for stage, start in (("grpo", "sft"), ("sft2", "grpo")):  # each train stage started from the one before
        config = (tmp_path / stage / "config.yaml").read_text()
        assert f"from: {tmp_path / start / 'model'}" in config
    best = [json.loads(line) for line in Path(state["best"]["data"]).read_text().splitlines()]
    assert len(best) == state["best"]["written"] > 0 and all(r["completion"] == r["answer"] for r in best)
    assert f"path: {state['best']['data']}" in (tmp_path / "sft2" / "config.yaml").read_text()
    assert "reward/exact_match" in _metrics(tmp_path / "grpo")[-1]
    assert Recipe(EXAMPLE, over, tmp_path).run() == state  # everything done: nothing runs again


@pytest.mark.parametrize("text, key", [
    ("stages: []", "stages"),
    ("stages: [{name: a, train: {}, synthesize: {}}]", "stages[0]"),
    ("stages: [{name: a, train: {}, epochs: 3}]", "stages[0].epochs"),
    ("stages: [{name: a, train: {}}]\nsteps: 3", "steps"),
    ("stages: [{name: a, train: {data.path: '${b.data}'}}]", "${b.data}"),
])
def test_bad_recipes_name_the_key(tmp_path, text, key):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        Recipe(path, [], tmp_path / "out").run()
    assert e.value.key == key
