"""Preference records -> groups -> packed rows (maxmodel/data/preference.py), bad records named by file:line,
the reward model as the best-of-N scorer of the generation engine after `maxmodel export`, and RLAIF
labelling (maxmodel/finetune/rlaif.py)."""
import json

import numpy as np
import pytest
import preference_data
from conftest import TINY

from maxmodel.config import load_config
from maxmodel.data.preference import PreferenceRows, encode_groups
from maxmodel.data.sources import BadRecords, DataError, read_documents
from maxmodel.data.tokenizer import ByteTokenizer
from maxmodel.finetune.rlaif import label_pairs, parse_answer

TOK = ByteTokenizer()


def _groups(tmp_path, records, objective="dpo", seq_len=64, policy="error", max_docs=16):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = BadRecords(policy)
    docs = [d for d, _ in read_documents("jsonl", str(path), "preference", "text", bad)]
    return encode_groups(docs, objective, TOK, "<|{role}|>\n{content}<|end|>\n", seq_len, max_docs, bad), bad


def test_pairs_pack_both_sides_in_one_row_chosen_first(tmp_path):
    store, _ = _groups(tmp_path, [{"prompt": "ab", "chosen": "xyz", "rejected": "q"}] * 3)
    rows = PreferenceRows(store, 32, 0, "first_fit", 16)
    row = rows[0]
    # (1 + 2 + 3 + 1) - 1 = 6 and (1 + 2 + 1 + 1) - 1 = 4 predictions: three pairs = 30 positions, one row
    assert len(rows) == 1
    np.testing.assert_array_equal(row["segment_ids"][:10], [1] * 6 + [2] * 4)
    np.testing.assert_array_equal(row["pref_group"][:30], [1] * 10 + [2] * 10 + [3] * 10)
    # the loss counts the response and EOS only: targets of "xyz" + EOS in the chosen document
    assert row["loss_mask"][:6].tolist() == [0, 0, 1, 1, 1, 1]
    assert TOK.decode(row["targets"][2:5]) == "xyz"


def test_chat_pair_counts_only_the_final_response(tmp_path):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "ok?"}]
    store, _ = _groups(tmp_path, [{"prompt": prompt, "chosen": "yes", "rejected": "no"}], seq_len=256)
    (tokens, weights), _ = store.docs(0)
    counted = TOK.decode(tokens[weights > 0])
    assert counted.startswith("yes") and "yo" not in counted


def test_too_long_pair_and_missing_fields_name_file_and_line(tmp_path):
    records = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "x" * 80, "rejected": "c"}]
    with pytest.raises(DataError, match=r"p.jsonl:2: .*more than one row holds"):
        _groups(tmp_path, records)
    store, bad = _groups(tmp_path, records + [{"prompt": "a", "chosen": "b"}], policy="skip")
    assert len(store) == 1 and bad.total == 2 and "p.jsonl:3" in " ".join(bad.examples)
    with pytest.raises(DataError, match=r"p.jsonl:1: a scored record, which train.objective=dpo"):
        _groups(tmp_path, [{"prompt": "a", "response": "b", "score": 1.0}])
    with pytest.raises(DataError, match=r"p.jsonl:1: 'label' must be true or false"):
        _groups(tmp_path, [{"prompt": "a", "completion": "b", "label": "yes"}], objective="kto")


def test_kto_groups_pair_each_example_with_a_mismatched_response(tmp_path):
    store, _ = _groups(tmp_path, [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
                                  {"prompt": "p2", "completion": "other", "label": True}], objective="kto")
    assert len(store) == 3  # a pair is one desirable and one undesirable example
    assert [v.tolist() for v in (store.values(0), store.values(1), store.values(2))] == [[1, -1], [0, -1], [1, -1]]
    assert TOK.decode(store.docs(0)[1][0]) == "p1other"  # this prompt, the next record's response


def test_reward_model_scores_best_of_n_after_export(tmp_path):
    from maxmodel.inference.batcher import Batcher
    from maxmodel.inference.load import load_engine
    from maxmodel.inference.sampling import SamplingOptions
    from maxmodel.finetune.reward_scorer import RewardScorer
    from maxmodel.train.export import main as export_main
    from maxmodel.train.loop import train
    train_file = preference_data.write(tmp_path / "t.jsonl", 400, 0)
    held = preference_data.write(tmp_path / "e.jsonl", 32, 1)
    over = TINY + ["train.seq_len=64", "data.source=jsonl", "data.format=preference", "data.tokenizer=bytes",
                   "train.objective=reward", f"data.path={train_file}", f"run.output_dir={tmp_path}", "run.name=rm",
                   "train.steps=30", "optimizer.lr=3e-3", "checkpoint.every_steps=30", "run.eval_every=1000"]
    train(load_config(overrides=over))
    assert export_main(["--run-dir", str(tmp_path / "rm"), "--out", str(tmp_path / "rm-model")]) == 0
    bytes_tok = ["data.tokenizer=bytes"]  # an export of a bytes-tokenized run carries no tokenizer file
    scorer = RewardScorer(tmp_path / "rm-model", bytes_tok)
    pairs = [json.loads(line) for line in held.read_text().splitlines()]
    good = scorer.score_texts([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    worse = scorer.score_texts([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert (good > worse).mean() > 0.9
    # best-of-N in the engine: the reward model's own LM head samples, its score head picks
    gen = load_engine(tmp_path / "rm-model", bytes_tok, max_slots=8, max_len=64)
    batcher = Batcher(gen.engine, gen.tokenizer)
    prompt = gen.encode_prompt("abc=")
    opts = dict(max_new_tokens=4, temperature=1.0, ignore_eos=True, seed=3)
    samples = batcher.generate([prompt], SamplingOptions(n=4, **opts))[0].completions
    h = batcher.submit(prompt, SamplingOptions(n=1, best_of=4, **opts), scorer=scorer)
    batcher.run_until_idle()
    best = int(np.argmax([scorer(prompt, o) for o in samples]))
    assert h.result().completions[0].token_ids == samples[best].token_ids


class RuleJudge:
    """A stand-in judge for the labelling logic: answers for the response with more vowels, except that it
    always says "A" on prompts starting with "z" (pure position bias) and babbles on prompts with "q"."""

    def generate(self, prompts, options):
        from types import SimpleNamespace
        out = []
        for p in prompts:
            prompt = p.split("Prompt: ")[1].split("\n")[0]
            a, b = (p.split(f"Response {x}: ")[1].split("\n")[0] for x in "AB")
            vowels = [sum(c in "aeiou" for c in r) for r in (a, b)]
            text = " B" if vowels[1] > vowels[0] else " A"
            text = " A" if prompt.startswith("z") else "???" if "q" in prompt else text
            out.append(SimpleNamespace(completions=[SimpleNamespace(text=text)]))
        return out


def test_rlaif_labels_in_both_orders_and_names_unparsable_answers(tmp_path):
    assert (parse_answer(" B."), parse_answer("(A) because"), parse_answer("Both")) == ("B", "A", None)
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": "abc", "responses": ["bcd", "aei"]}, {"prompt": "zed", "responses": ["aei", "bcd"]},
            {"prompt": "xyz", "responses": ["eio", "kkk"]}, {"prompt": "qqq", "responses": ["a", "b"]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"in.jsonl:4: the judge's answer '\?\?\?' does not parse"):
        label_pairs(RuleJudge(), src, tmp_path / "out.jsonl")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2  # what was labelled before it stays
    counts = label_pairs(RuleJudge(), src, tmp_path / "out.jsonl", on_bad_record="skip")
    assert (counts["labelled"], counts["inconsistent"], counts["bad_records"]["skipped"]) == (2, 1, 1)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == [{"prompt": "abc", "chosen": "aei", "rejected": "bcd"},
                   {"prompt": "xyz", "chosen": "eio", "rejected": "kkk"}]
    # the labels are preference data as training reads it
    docs = list(read_documents("jsonl", str(tmp_path / "out.jsonl"), "preference", "text", BadRecords()))
    assert [d["kind"] for d, _ in docs] == ["pair", "pair"]


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    """A tiny language model (one step on synthetic tokens), exported: a judge, or a reward model's start."""
    from maxmodel.train.export import main as export_main
    from maxmodel.train.loop import train
    tmp = tmp_path_factory.mktemp("lm")
    over = TINY + ["data.source=synthetic", "data.tokenizer=bytes", f"run.output_dir={tmp}", "run.name=j",
                   "train.steps=1", "model.max_seq_len=256"]
    train(load_config(overrides=over))
    export_main(["--run-dir", str(tmp / "j"), "--out", str(tmp / "judge")])
    return tmp / "judge"


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_a_reward_model_starts_from_a_language_model_export(peft, lm_export, tmp_path):
    """init.from an export without a head: the body is restored, the head starts at zero (loss ln 2)."""
    from maxmodel.train.loop import train
    path = preference_data.write(tmp_path / "t.jsonl", 64, 0)
    over = TINY + ["train.seq_len=64", "data.source=jsonl", "data.format=preference", "data.tokenizer=bytes",
                   "train.objective=reward", f"data.path={path}", f"run.output_dir={tmp_path}", "run.name=r",
                   "train.steps=2", "run.log_every=1", "checkpoint.enabled=false", f"init.from={lm_export}",
                   f"peft.method={peft}", "model.max_seq_len=256"]
    result = train(load_config(overrides=over))
    assert abs(result.losses[1] - np.log(2)) < 1e-6


def test_dpo_example_config_validates(capsys):
    from pathlib import Path

    from maxmodel.cli import main
    path = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "dpo.yaml"
    assert main(["config", "show", "--json", str(path), "model.name=tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["dpo"]["beta"] == 0.1


def test_label_preferences_cli_with_a_real_judge_model(lm_export, tmp_path, capsys):
    """The CLI path end to end with a tiny (untrained) maxmodel judge: its answers are babble, so every
    record is a counted skip, and the output file is written (empty)."""
    from maxmodel.cli import main
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "abc", "responses": ["x", "y"]}) + "\n")
    code = main(["label-preferences", str(lm_export), "--input", str(src), "--output",
                 str(tmp_path / "out.jsonl"), "--on-bad-record", "skip", "--max-new-tokens", "2", "data.tokenizer=bytes"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and counts["labelled"] + counts["inconsistent"] + counts["bad_records"]["skipped"] == 1
    assert (tmp_path / "out.jsonl").is_file()

