"""Evaluation end to end on a tiny trained run (byte tokenizer, built-in corpus): run.eval_tasks logs task
metrics at the chosen steps (a failing task is reported, the run goes on) and they equal a later
evaluation of the final checkpoint; native multiple-choice / completion tasks on the model; `maxmodel eval`
keeps the finished tasks' results when one has a bad line (exit 2, naming file and line) and refuses an
unknown task; `maxmodel eval report` draws them; a maxmodel model as judge."""
from __future__ import annotations

import json
import re

import pytest
from conftest import COMPILE_FLAGS, TINY

from maxmodel.cli import main as cli_main

pytestmark = pytest.mark.xdist_group("eval_run")
SEQ = 32


def _write_tasks(root):
    from maxmodel.data.builtin import builtin_documents
    (root / "ppl.txt").write_text(builtin_documents()[3][:700])
    choice = [{"question": "What does a for loop do?", "choices": ["iterates", "nothing", "sleeps"], "answer": 0},
              {"question": "Which keyword defines a function?", "choices": ["class", "def"], "answer": "def"},
              {"question": "What is None?", "choices": ["a constant", "a loop", "a module"], "answer": 0},
              {"question": "What raises an exception?", "choices": ["raise", "return"], "answer": 0}]
    (root / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in choice))
    qa = [{"prompt": f"Question {i}: what is {i} plus one?\nAnswer:", "answer": [str(i + 1), f"number {i + 1}"]}
          for i in range(4)]
    (root / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in qa))
    (root / "bad.jsonl").write_text(json.dumps(choice[0]) + "\n{not json\n" + json.dumps(choice[1]) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "qa.yaml").write_text(f"native: completion\nname: qa\npath: {root / 'qa.jsonl'}\n"
                                   "metrics: [exact_match, f1, bleu, rouge]\nmax_gen_toks: 4\nuntil: ['\\n']\n")
    (tasks / "mc_lm.yaml").write_text(  # an lm-eval task on the same file as choice:choice.jsonl
        f"task: mc_lm\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'choice.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (tasks / "lenient.yaml").write_text(f"native: choice\nname: lenient\npath: {root / 'bad.jsonl'}\n"
                                        "on_bad_record: skip\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    _write_tasks(root)
    tasks = f"[perplexity:{root / 'ppl.txt'},choice:{root / 'choice.jsonl'},choice:{root / 'missing.jsonl'}]"
    overrides = TINY + ["data.source=builtin", "data.tokenizer=bytes", "train.steps=4", "run.eval_every=2",
                        "run.log_every=2", "run.eval_batches=1", f"run.output_dir={root}", "run.name=tiny",
                        f"train.seq_len={SEQ}", f"run.eval_tasks={tasks}", "checkpoint.every_steps=4"]
    assert cli_main(["train", *overrides]) == 0
    return root / "tiny"


@pytest.fixture(scope="module")
def model(run_dir):
    from maxmodel.eval.model import EvalModel
    return EvalModel.load(run_dir, max_length=SEQ, batch_rows=8, row_len=SEQ, max_batch=8)


def test_training_logs_the_task_metrics_at_the_chosen_steps(run_dir, model):
    from maxmodel.eval.native import native_task, run_native
    root = run_dir.parent
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ppl, choice = f"perplexity:{root / 'ppl.txt'}", f"choice:{root / 'choice.jsonl'}"
    logged = {r["step"]: r for r in records if f"eval/{ppl}/bits_per_byte" in r}
    assert sorted(logged) == [2, 4]
    for r in logged.values():
        assert 0 <= r[f"eval/{choice}/acc"] <= 1 and r[f"eval/{ppl}/token_perplexity"] > 1
        assert "missing.jsonl" in r["eval_failed"][f"choice:{root / 'missing.jsonl'}"]  # reported, not fatal
    assert logged[2][f"eval/{ppl}/nll"] != logged[4][f"eval/{ppl}/nll"]  # the weights moved in between
    tb = {(2, f"eval/{choice}/acc"), (4, f"eval/{ppl}/bits_per_byte")}  # TensorBoard turns ':' into '_'
    assert {(step, re.sub(r"[^-/\w.]", "_", tag)) for step, tag in tb} <= _tensorboard_scalars(run_dir)
    # the step-4 evaluation equals evaluating the final checkpoint afterwards (same windows of 32)
    later = run_native(native_task(ppl), model)
    assert later["nll"] == pytest.approx(logged[4][f"eval/{ppl}/nll"], rel=1e-5)
    assert run_native(native_task(choice), model)["acc"] == logged[4][f"eval/{choice}/acc"]


def _tensorboard_scalars(run_dir) -> set[tuple[int, str]]:
    """(step, tag) of every scalar in the run's TensorBoard event files (TFRecord framing: length, CRC, an
    Event proto, CRC)."""
    import struct

    from tensorboardX.proto import event_pb2
    out = set()
    for file in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        data, at = file.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            out |= {(event.step, v.tag) for v in event.summary.value}
            at += 12 + n + 4
    return out


def test_backend_generate_until_samples_with_its_seed(model):
    from lm_eval.api.instance import Instance

    from maxmodel.eval.lm_backend import MaxModelLM
    lm = MaxModelLM(model=model)

    def generate(seed):
        kwargs = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0, "seed": seed}
        return lm.generate_until([Instance("generate_until", {}, (f"The {w} ", dict(kwargs)), i)
                                  for i, w in enumerate(("list", "loop", "class"))])
    first = generate(5)
    assert generate(5) == first and generate(6) != first  # the request's seed decides the sample
    assert all(len(model.encode(t, bos=False)) <= 6 for t in first)  # max_gen_toks bounds it (bytes tokenizer)


def test_native_choice_and_completion_tasks(run_dir, model):
    from maxmodel.eval import metrics
    from maxmodel.eval.native import native_task, run_native
    from maxmodel.inference.sampling import SamplingOptions
    root = run_dir.parent
    out = run_native(native_task(f"choice:{root / 'choice.jsonl'}"), model, log_samples=True)
    want = 0
    for s in out["samples"]:
        choices = json.loads((root / "choice.jsonl").read_text().splitlines()[int(s["where"].rsplit(":", 1)[1]) - 1])[
            "choices"]
        lls = [x.logprob for x in model.loglikelihoods([(s["prompt"], " " + c) for c in choices])]
        assert s["loglikelihoods"] == pytest.approx(lls, abs=1e-6)
        want += lls.index(max(lls)) == s["answer"]
    assert out["acc"] == want / 4 and out["n"] == 4

    qa = native_task("qa", str(root / "tasks"))
    shots = [run_native(qa, model, num_fewshot=2, log_samples=True) for _ in range(2)]
    assert [s["prompt"] for s in shots[0]["samples"]] == [s["prompt"] for s in shots[1]["samples"]]
    assert shots[0]["samples"][0]["prompt"].count("Question") == 3  # two examples and the question
    samples = shots[0]["samples"]
    greedy = model.generate([model.encode(s["prompt"]) for s in samples],
                            [SamplingOptions(max_new_tokens=4, temperature=0.0, stop=["\n"])] * len(samples))
    assert [s["completion"] for s in samples] == greedy
    preds = [s["prediction"] for s in samples]
    expected = metrics.compute(["exact_match", "f1", "bleu", "rouge"], preds, [s["answers"] for s in samples])
    assert {k: shots[0][k] for k in expected} == pytest.approx(expected)

    lenient = run_native(native_task("lenient", str(root / "tasks")), model)
    assert lenient["n"] == 2 and lenient["skipped"]["skipped"] == 1
    assert "bad.jsonl:2: malformed JSON" in lenient["skipped"]["examples"][0]


def test_eval_command_keeps_finished_tasks_and_names_the_bad_line(run_dir, tmp_path, capsys):
    root = run_dir.parent
    out = tmp_path / "results.json"
    tasks = f"perplexity:{root / 'ppl.txt'},choice:{root / 'bad.jsonl'},qa,mc_lm,choice:{root / 'choice.jsonl'}"
    rc = cli_main(["eval", str(run_dir), "--tasks", tasks, "--include-path", str(root / "tasks"),
                   "--only-include-path", "--max-length", str(SEQ), "--batch-rows", "8", "--row-len", str(SEQ),
                   "--output", str(out)])
    assert rc == 2
    assert f"{root / 'bad.jsonl'}:2: malformed JSON" in capsys.readouterr().err
    results = json.loads(out.read_text())
    assert set(results["results"]) == {f"perplexity:{root / 'ppl.txt'}", "qa", "mc_lm",
                                       f"choice:{root / 'choice.jsonl'}"}  # the finished ones are kept
    assert results["versions"]["mc_lm"] is not None and results["n-shot"]["mc_lm"] == 0  # lm-eval's structure
    assert results["configs"]["mc_lm"]["output_type"] == "multiple_choice"
    # lm-eval's task and the native one ask the same requests: the same accuracy
    assert results["results"]["mc_lm"]["acc,none"] == results["results"][f"choice:{root / 'choice.jsonl'}"]["acc"]
    assert results["maxmodel"]["bad_input"] == [f"choice:{root / 'bad.jsonl'}"]
    assert results["results"]["qa"]["n"] == 4 and "bits_per_byte" in results["results"][f"perplexity:{root / 'ppl.txt'}"]

    assert cli_main(["eval", str(run_dir), "--tasks", "qa,no_such_task", "--include-path", str(root / "tasks"),
                     "--only-include-path"]) == 2
    assert "unknown task 'no_such_task'" in capsys.readouterr().err

    png = tmp_path / "eval.png"
    assert cli_main(["eval", "report", str(run_dir), str(out), "--out", str(png), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 10_000
    ppl_key = f"perplexity:{root / 'ppl.txt'}/bits_per_byte"
    assert table["results"][ppl_key] == pytest.approx(results["results"][f"perplexity:{root / 'ppl.txt'}"]["bits_per_byte"])
    assert table["tiny"][ppl_key] > 0  # the run's last logged evaluation


def test_a_maxmodel_model_as_judge(model):
    from maxmodel.eval import autorater
    items = [{"question": "What is 2 + 2?", "response": "4", "response_a": "4", "response_b": "five"},
             {"question": "Name a colour.", "response": "blue", "response_a": "a table", "response_b": "red"}]
    judge = autorater.Judge(model, mode="score")
    point = autorater.pointwise(judge, items, "correct and relevant")
    assert point["skipped"] == 0 and all(1 <= s <= 5 for s in point["scores"])
    pair = autorater.pairwise(judge, items)
    assert pair["judged"] == 2 and 0 <= pair["consistency"] <= 1 and 0 <= pair["first_position_rate"] <= 1
    free = autorater.pointwise(autorater.Judge(model, mode="generate", max_gen_toks=3), items, "correct")
    assert free["judged"] + free["skipped"] == 2  # whatever a barely trained model says is parsed or counted


def test_two_hosts_score_with_process_0_driving(run_dir, model, tmp_path):
    """Two processes (2 emulated devices each, rows over the 4): process 0 runs the tasks, process 1 joins
    every forward pass; the numbers equal the one-process evaluation's."""
    import os
    import socket
    import subprocess
    import sys

    from maxmodel.eval.native import native_task, run_native
    root = run_dir.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tasks = f"perplexity:{root / 'ppl.txt'},choice:{root / 'choice.jsonl'}"
    procs = []
    for i in range(2):
        env = {**os.environ, "MAXMODEL_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "MAXMODEL_NUM_PROCESSES": "2",
               "MAXMODEL_PROCESS_ID": str(i), "MAXMODEL_CPU_DEVICES": "2", "XLA_FLAGS": COMPILE_FLAGS}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "maxmodel.cli", "eval", str(run_dir), "--tasks", tasks, "--max-length", str(SEQ),
             "--batch-rows", "8", "--row-len", str(SEQ), "--output", str(tmp_path / f"out{i}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "process 1/2" in logs[1] and not (tmp_path / "out1.json").exists()  # only process 0 writes
    results = json.loads((tmp_path / "out0.json").read_text())["results"]
    ppl = run_native(native_task(f"perplexity:{root / 'ppl.txt'}"), model)
    assert results[f"perplexity:{root / 'ppl.txt'}"]["nll"] == pytest.approx(ppl["nll"], rel=1e-5)
    assert results[f"choice:{root / 'choice.jsonl'}"]["acc"] == run_native(
        native_task(f"choice:{root / 'choice.jsonl'}"), model)["acc"]
