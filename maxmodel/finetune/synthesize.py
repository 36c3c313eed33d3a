"""`maxmodel synthesize MODEL --prompts FILE.jsonl --out FILE.jsonl [--n N] [--reward fn ...] [--keep best]`

A model writes a fine-tuning dataset: N sampled completions of every prompt (data.format=prompt records: a
string or chat messages, other fields passed to the rewards), then
- `--keep all` (data distillation: a teacher's outputs become the student's SFT set), or
- `--keep best` (rejection-sampling fine-tuning, DeepSeek-R1's third stage): the completion with the highest
  weighted reward (`--reward package.module.fn[:weight]`, rl/rewards.py's functions, or `--reward-model DIR`)
  per prompt, optionally only above `--min-reward`.
String prompts give prompt/completion records, chat prompts give chat records ({"messages": ... + the
assistant's reply}), each with its "reward" when there are rewards: `maxmodel train train.objective=sft
data.format=prompt_completion|chat data.path=OUT` trains on it. The file is written chunk by chunk and
flushed, so an interrupted run keeps what it wrote (and refuses to overwrite it without --overwrite).
Every prompt's seed derives from --seed and its line, so a rerun writes the same file.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from maxmodel.config import ConfigError
from maxmodel.data.sources import BadRecords, read_documents

from .rl.rewards import combine, load_rewards, reward_model_scorer, score


@dataclass
class SynthesisSpec:
    prompts: str
    out: str
    n: int = 1
    keep: str = "all"                      # all | best
    rewards: list = field(default_factory=list)   # rl.rewards entries
    reward_model: str = ""
    min_reward: float | None = None
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list = field(default_factory=list)
    seed: int = 0
    on_bad_record: str = "error"
    overwrite: bool = False


def _record(prompt, text: str, reward: float | None, source: dict) -> dict:
    if isinstance(prompt, str):
        out = {"prompt": prompt, "completion": text}
    else:
        out = {"messages": [*prompt, {"role": "assistant", "content": text}]}
    extra = {k: v for k, v in source.items() if k not in ("prompt", "completion", "messages", "reward")}
    return {**out, **extra, **({"reward": reward} if reward is not None else {})}


def synthesize(generator, spec: SynthesisSpec, progress: bool = True) -> dict:
    """Write spec.out from spec.prompts with `generator` (inference.Generator); returns counts."""
    from maxmodel.inference.sampling import SamplingOptions

    from .rl.rollout import request_seed
    if spec.keep not in ("all", "best"):
        raise ConfigError("--keep", f"{spec.keep!r} is not one of all, best")
    functions = load_rewards(spec.rewards)
    scorer = None
    if spec.reward_model:
        scorer = reward_model_scorer(spec.reward_model, "--reward-model")
    if spec.keep == "best" and not functions and scorer is None:
        raise ConfigError("--keep", "best needs --reward functions or --reward-model to rank completions")
    out = Path(spec.out)
    if out.exists() and out.stat().st_size and not spec.overwrite:
        raise ConfigError("--out", f"{out} exists and is not empty (pass --overwrite to replace it)")
    bad = BadRecords(spec.on_bad_record)
    records = [doc for doc, _ in read_documents("jsonl", spec.prompts, "prompt", "text", bad)]
    if not records:
        raise ConfigError("--prompts", f"{spec.prompts} holds no usable prompt records ({bad.total} bad)")
    chunk = max(1, generator.max_slots // spec.n)
    stats = {"prompts": len(records), "written": 0, "dropped": 0, "bad_records": bad.total}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f, tqdm(total=len(records), disable=not progress, desc="synthesize", unit="prompt") as bar:
        for start in range(0, len(records), chunk):
            part = records[start:start + chunk]
            ids = [generator.encode_prompt(r["prompt"]) if isinstance(r["prompt"], str)
                   else generator.encode_chat(r["prompt"]) for r in part]
            options = [SamplingOptions(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                       top_p=spec.top_p, top_k=spec.top_k, stop=list(spec.stop), n=spec.n,
                                       seed=request_seed(spec.seed, 0, start + j)).validate(generator.vocab_size)
                       for j in range(len(part))]
            texts = [[c.text for c in o.completions] for o in generator.generate(ids, options)]
            rewards = _rewards(functions, scorer, part, texts, spec)
            for j, record in enumerate(part):
                for k in _chosen(rewards, j, spec):
                    if not texts[j][k].strip():
                        stats["dropped"] += 1  # nothing to train on (the model ended at once)
                        continue
                    r = None if rewards is None else float(rewards[j][k])
                    if r is not None and (np.isnan(r) or (spec.min_reward is not None and r < spec.min_reward)):
                        stats["dropped"] += 1  # no reward (a skipped failure), or below the bar
                        continue
                    f.write(json.dumps(_record(record["prompt"], texts[j][k], r, record)) + "\n")
                    stats["written"] += 1
            f.flush()
            bar.update(len(part))
    return stats


def _chosen(rewards, j: int, spec: SynthesisSpec) -> list[int]:
    """The completions of prompt j to write: all of them, or the best-rewarded one."""
    if spec.keep == "all":
        return list(range(spec.n))
    row = rewards[j]
    return [int(np.nanargmax(row))] if not np.isnan(row).all() else [0]  # all NaN: dropped by the caller


def _rewards(functions, scorer, records, texts, spec):
    """[prompts, n] weighted rewards, or None without any reward."""
    if not functions and scorer is None:
        return None
    n = spec.n
    prompts = [r["prompt"] for r in records for _ in range(n)]
    flat = [t for group in texts for t in group]
    columns = {k: [r.get(k) for r in records for _ in range(n)]
               for k in sorted({k for r in records for k in r} - {"prompt"})}
    per_fn, _ = score(functions, prompts, flat, columns, spec.on_bad_record == "skip")
    extra = scorer(prompts, flat) if scorer is not None else None
    return combine(functions, per_fn, extra).reshape(len(records), n)


def _reward_spec(text: str) -> dict:
    path, _, weight = text.partition("=")
    return {"fn": path, "weight": float(weight)} if weight else {"fn": path}


def main(argv: list[str]) -> int:
    from maxmodel.inference.generate_cli import add_engine_args, open_model
    parser = argparse.ArgumentParser(prog="maxmodel synthesize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument("--prompts", required=True, help="JSONL prompt records ({\"prompt\": text or messages})")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--keep", choices=("all", "best"), default="all")
    parser.add_argument("--reward", action="append", default=[], help="package.module.fn[=weight] (repeatable)")
    parser.add_argument("--reward-model", default="", help="a reward model directory")
    parser.add_argument("--min-reward", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bad", action="store_true", help="skip bad prompt records / reward failures")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    spec = SynthesisSpec(args.prompts, args.out, args.n, args.keep, [_reward_spec(r) for r in args.reward],
                         args.reward_model, args.min_reward, args.max_new_tokens, args.temperature, args.top_p,
                         args.top_k, args.stop, args.seed, "skip" if args.skip_bad else "error", args.overwrite)
    stats = synthesize(open_model(args), spec)
    print(json.dumps(stats))
    return 0
