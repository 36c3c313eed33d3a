"""Native tasks (no lm-eval needed): perplexity, multiple choice and completion, from local files.

Named on the command line (or in run.eval_tasks) as
  perplexity                  the built-in corpus's held-out split
  perplexity:PATH             text files (one document each) or JSONL (`text` per line); PATH may be a glob
  choice:FILE.jsonl           {"question", "choices": [...], "answer": index or the right choice's text}
  completion:FILE.jsonl       {"prompt", "answer": text or [texts]} (+ "rationale" for chain-of-thought shots)
or defined in a YAML file under --include-path (lm-eval skips it: it has no `task` key):
  native: choice | completion | perplexity     name: NAME     path: FILE
  template / target (prompt format strings), num_fewshot, fewshot_seed, fewshot_path, cot, metrics
  (exact_match, f1, bleu, rouge, package.module:function), max_gen_toks, until, answer_pattern,
  text_field, stride, on_bad_record (error | skip)
A bad line is an error naming file:line, or with on_bad_record: skip a counted skip (`skipped` in the results).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from maxmodel.config.errors import ConfigError
from maxmodel.data.sources import BadRecords, DataError, expand_paths, json_lines

from . import metrics as completion_metrics
from .perplexity import documents, perplexity
from .prompts import PromptSpec, build_prompt, fewshot_examples

KINDS = ("perplexity", "choice", "completion")
DEFAULTS = {"choice": ("Question: {question}\nAnswer:", " {answer_text}"), "completion": ("{prompt}", " {answer_text}"),
            "perplexity": ("", "")}


@dataclasses.dataclass
class NativeTask:
    kind: str
    name: str
    path: Any = None
    template: str = ""
    target: str = ""
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_path: Any = None
    cot: bool = False
    metrics: list = dataclasses.field(default_factory=lambda: ["exact_match", "f1"])
    max_gen_toks: int = 32
    until: list = dataclasses.field(default_factory=lambda: ["\n\n"])
    answer_pattern: str = r"answer is\s*(.+?)\.?\s*$"
    text_field: str = "text"
    stride: int = 0
    on_bad_record: str = "error"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name}", f"native: '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"task {self.name}", f"on_bad_record must be error or skip, not {self.on_bad_record!r}")
        self.template = self.template or DEFAULTS[self.kind][0]
        self.target = self.target or DEFAULTS[self.kind][1]
        if self.kind != "perplexity" and self.path in (None, ""):
            raise ConfigError(f"task {self.name}", "a choice or completion task needs `path`")
        for m in self.metrics if self.kind == "completion" else ():
            completion_metrics.resolve(m, key=f"task {self.name} metrics")  # a bad name fails before the model loads


def native_task(name: str, include_path: str | None = None) -> NativeTask | None:
    """The native task `name` means, or None (then it is lm-eval's)."""
    kind, _, path = name.partition(":")
    if kind in KINDS and (path or kind == "perplexity"):
        return NativeTask(kind, name, path or None)
    return _yaml_tasks(include_path).get(name)


def _yaml_tasks(include_path: str | None) -> dict[str, NativeTask]:
    tasks: dict[str, NativeTask] = {}
    for file in sorted(Path(include_path).glob("**/*.yaml")) if include_path else ():
        try:
            spec = yaml.safe_load(file.read_text())
        except yaml.YAMLError:
            continue  # lm-eval's to parse (or to complain about)
        if not isinstance(spec, dict) or "native" not in spec:
            continue
        spec = dict(spec)
        kind, name = spec.pop("native"), spec.pop("name", file.stem)
        fields = {f.name for f in dataclasses.fields(NativeTask)} - {"kind", "name"}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ConfigError(f"{file}", f"unknown key '{unknown[0]}' in native task {name} "
                                         f"(known: {', '.join(sorted(fields))})")
        if spec.get("path") and not Path(str(spec["path"])).is_absolute():
            spec["path"] = str(file.parent / spec["path"])  # relative to the YAML file
        if spec.get("fewshot_path") and not Path(str(spec["fewshot_path"])).is_absolute():
            spec["fewshot_path"] = str(file.parent / spec["fewshot_path"])
        tasks[name] = NativeTask(kind, name, **spec)
    return tasks


# ---- records

def read_records(path, kind: str, bad: BadRecords, key: str) -> list[dict]:
    """The task file's records, checked; each carries `_where` (file:line) and `answer_text`."""
    out = []
    for file in expand_paths(path, key=key, bad=bad):
        for record, where in json_lines(file, bad):
            problem = _check(record, kind)
            if problem:
                bad(where, problem, problem.split(":")[0])
                continue
            out.append(record | {"_where": where})
    return out


def _check(record, kind: str) -> str | None:
    """What is wrong with a record (None: nothing); fills in answer_text / answer as an index."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if kind == "choice":
        choices = record.get("choices")
        if not isinstance(record.get("question"), str):
            return "missing field 'question' (a string)"
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            return "bad 'choices': expected a list of at least two non-empty strings"
        answer = record.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            return f"bad 'answer': expected an index into the {len(choices)} choices or one of them, got {answer!r}"
        record["answer"], record["answer_text"] = answer, choices[answer]
        return None
    answers = record.get("answer")
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(record.get("prompt"), str):
        return "missing field 'prompt' (a string)"
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        return "bad 'answer': expected a string or a non-empty list of strings"
    record["answers"], record["answer_text"] = answers, answers[0]
    return None


# ---- running

def run_native(task: NativeTask, model, limit: int = 0, num_fewshot: int | None = None,
               log_samples: bool = False) -> dict:
    """{metric: value, ...} (+ "samples" with log_samples, "skipped" for counted bad records)."""
    bad = BadRecords(task.on_bad_record)
    try:
        if task.kind == "perplexity":
            docs = documents(task.path, task.text_field, bad, model.scorer.cfg.data.eval_fraction)
            out = perplexity(model, docs[:limit] if limit else docs, task.stride)
        else:
            records = read_records(task.path, task.kind, bad, key=f"task {task.name}")
            if not records:
                raise ConfigError(f"task {task.name}", f"no usable records in {task.path} ({bad.total} skipped)")
            pool = read_records(task.fewshot_path, task.kind, bad, key=f"task {task.name} fewshot_path") \
                if task.fewshot_path else records
            spec = PromptSpec(task.template, task.target, task.num_fewshot if num_fewshot is None else num_fewshot,
                              task.fewshot_seed, cot=task.cot)
            chosen = records[:limit] if limit else records
            prompts = [build_prompt(spec, r, fewshot_examples(pool, spec.num_fewshot, spec.seed, i, exclude=r),
                                    r["_where"]) for i, r in enumerate(chosen)]
            run = _choice if task.kind == "choice" else _completion
            out = run(task, model, chosen, prompts, log_samples)
    except DataError as e:  # name the task too
        raise DataError(f"task {task.name}: {e}", e.key) from None
    if bad.total:
        out["skipped"] = bad.report()
    return out


def _choice(task, model, records, prompts, log_samples) -> dict:
    """acc: the highest log-likelihood choice is the answer; acc_norm: the same per character of the
    choice (lm-eval's length normalisation)."""
    pairs = [(p, " " + c if not c.startswith((" ", "\n")) else c) for p, r in zip(prompts, records)
             for c in r["choices"]]
    scores = iter(model.loglikelihoods(pairs))
    acc = acc_norm = 0
    samples = []
    for prompt, r in zip(prompts, records):
        lls = [next(scores).logprob for _ in r["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, r["choices"])]
        acc += max(range(len(lls)), key=lls.__getitem__) == r["answer"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == r["answer"]
        if log_samples:
            samples.append({"where": r["_where"], "prompt": prompt, "loglikelihoods": lls, "answer": r["answer"]})
    n = len(records)
    out = {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
    return out | ({"samples": samples} if log_samples else {})


def _completion(task, model, records, prompts, log_samples) -> dict:
    """Greedy completions up to `until` / max_gen_toks; with chain of thought the answer is what follows
    `answer_pattern` (the whole completion when it does not match)."""
    from maxmodel.inference.sampling import SamplingOptions
    options = [SamplingOptions(max_new_tokens=task.max_gen_toks, temperature=0.0, stop=list(task.until))
               for _ in prompts]
    texts = model.generate([model.encode(p) for p in prompts], options)
    predictions = []
    for text in texts:
        for term in task.until:
            text = text.split(term)[0]
        match = re.search(task.answer_pattern, text.strip(), re.IGNORECASE | re.DOTALL) if task.cot else None
        predictions.append((match.group(1) if match else text).strip())
    out: dict = completion_metrics.compute(task.metrics, predictions, [r["answers"] for r in records])
    out["n"] = len(records)
    if log_samples:
        out["samples"] = [{"where": r["_where"], "prompt": p, "completion": t, "prediction": pred,
                           "answers": r["answers"]} for r, p, t, pred in zip(records, prompts, texts, predictions)]
    return out
