"""The models of the generation benchmark (benchmarks/generate.py), the same weights on both sides: a
`maxmodel export` directory for maxmodel's engine and its `maxmodel convert to-hf` twin for transformers.

  python benchmarks/generate_models.py OUT                     random: bench-50m at init (timing only)
  python benchmarks/generate_models.py OUT --trained           target + draft trained on the built-in corpus
      [--config configs/experiments/bench-50m.yaml] [--steps 60] [--draft-steps 60] [--batch 8] [--seq-len 128]
      [--tokenizer-vocab 8192] [--max-seq-len 4096] [--set key=value ...] [--draft-set key=value ...] [--no-draft]
      [--distill-draft]                                         the draft distilled from the target (its logits)
      [--draft-target-samples N [--draft-sample-steps 200]]     then on the target's own completions (DistillSpec)

Run in maxmodel's venv (no torch). Every stage goes through maxmodel's own CLI in a subprocess
(`train` -> `export` -> `convert to-hf`), the route a user takes, and each is skipped when its output is
already complete, so an interrupted run resumes. Layout of OUT:

  tokenizer.model        (--trained) sentencepiece BPE of the built-in corpus, shared by target and draft
  runs/<name>/           the training runs (config.yaml, checkpoints/, metrics.jsonl)
  target/                maxmodel export: params/ (orbax), export.json (+ tokenizer.model)
  target-hf/             transformers LlamaForCausalLM: config.json, model.safetensors
                         (+ tokenizer.model and generation_config.json with --trained)
  draft/, draft-hf/      (--trained) the same for the draft
  models.json            what was made: directories, configs, steps, losses, tokenizer

Random: one step at the warm-up's learning rate of 0, so the weights are exactly the initialisation; the
synthetic data needs no tokenizer. Trained: `data.tokenizer=spm` cannot serve here, since it trains a model
of `model.vocab_size` entries and the built-in corpus (~490 KB) holds at most ~17,400 BPE pieces, not
bench-50m's 32,768; so a smaller vocabulary is trained once (maxmodel's own trainer and cache) and both runs
get the same file as `data.tokenizer`, while model.vocab_size stays 32,768 (the model's rows past the
tokenizer's are never seen as inputs and learn to lose). Same file, same ids: draft proposals mean the same
tokens to the target.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_CONFIG = REPO / "configs" / "experiments" / "bench-50m.yaml"
# A 2-layer, d_model 256 draft: ~1/8 of the target's layer compute. It keeps the target's vocab_size so
# both produce logits over the same ids (its head is then most of its cost: 256 x 32768).
DRAFT_OVERRIDES = ("model.d_model=256", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4",
                   "model.head_dim=64", "model.d_ff=1024")


def maxmodel(*args: str) -> None:
    """One maxmodel CLI command from this checkout (PYTHONPATH), in its own process: each `train` sets up
    its own JAX devices, which one process cannot redo."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print("+ maxmodel " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "maxmodel.cli", *args], env=env, check=True, cwd=REPO)


def _fresh(path: Path) -> Path:
    """An empty directory to write, clearing what an interrupted stage left there."""
    if path.exists():
        shutil.rmtree(path)
    return path


def train_tokenizer(out: Path, vocab: int) -> Path:
    """A sentencepiece model of the built-in corpus' training documents, as the pipeline would train it
    (maxmodel's trainer and content-hash cache), copied to OUT/tokenizer.model."""
    from maxmodel.data.builtin import builtin_documents, split_documents
    from maxmodel.data.tokenizer import train_sentencepiece
    target = out / "tokenizer.model"
    if not target.is_file():
        train, _ = split_documents(builtin_documents(), 0.05)
        train_sentencepiece(train, vocab, target)
    return target


def train(out: Path, name: str, config: str, steps: int, overrides: list[str]) -> Path:
    run_dir = out / "runs" / name
    if (run_dir / "checkpoints" / str(steps)).is_dir():
        return run_dir
    _fresh(run_dir)
    maxmodel("train", config, f"train.steps={steps}", "checkpoint.enabled=true", f"checkpoint.every_steps={steps}",
             "checkpoint.async=false", f"run.output_dir={out / 'runs'}", f"run.name={name}", "run.progress=false",
             f"run.eval_every={steps}", "run.sample_tokens=0", *overrides)
    return run_dir


def export_both(out: Path, name: str, run_dir: Path, tokenizer: Path | None) -> dict:
    """`maxmodel export` the run's last checkpoint to OUT/<name>, then `convert to-hf` it to OUT/<name>-hf."""
    export_dir, hf_dir = out / name, out / f"{name}-hf"
    if not (export_dir / "export.json").is_file():
        maxmodel("export", "--run-dir", str(run_dir), "--out", str(_fresh(export_dir)))
    if not (hf_dir / "config.json").is_file():
        maxmodel("convert", "to-hf", str(export_dir), "--out", str(_fresh(hf_dir)))
    if tokenizer:
        for d in (export_dir, hf_dir):  # beside the weights, so each directory is self-contained
            shutil.copyfile(tokenizer, d / "tokenizer.model")
        # the tokenizer's specials (pad=0 bos=1 eos=2, see maxmodel/data/tokenizer.py), stated for transformers
        (hf_dir / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=1))
    metrics = (run_dir / "metrics.jsonl").read_text().strip().splitlines()
    last = json.loads(metrics[-1]) if metrics else {}
    return {"export": str(export_dir), "hf": str(hf_dir), "run": str(run_dir),
            "step": last.get("step"), "train_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
            "model": json.loads((export_dir / "export.json").read_text())["model"]}


def draft_on_target_samples(out: Path, args, tok: Path, overrides: list[str]) -> dict:
    """DistillSpec's recipe (Zhou et al. 2023): what decides a draft's acceptance is how well it follows the
    target on the target's own outputs, so the draft is distilled further on the target's greedy completions of
    corpus prompts (`maxmodel synthesize`; never the benchmark's prompt), loss on the completions only."""
    import random
    from maxmodel.data.builtin import builtin_documents, split_documents
    samples = out / "target-samples.jsonl"
    if not samples.is_file():
        train_docs, _ = split_documents(builtin_documents(), 0.05)
        rng = random.Random(0)
        prompts = out / "target-prompts.jsonl"
        with prompts.open("w") as f:
            for _ in range(args.draft_target_samples):
                doc = rng.choice(train_docs)
                start = rng.randrange(max(len(doc) - 400, 1))
                f.write(json.dumps({"prompt": doc[start:start + rng.randrange(100, 400)]}) + "\n")
        part = samples.with_suffix(".part")
        part.unlink(missing_ok=True)
        maxmodel("synthesize", str(out / "target"), "--prompts", str(prompts), "--out", str(part),
                 "--max-new-tokens", "96", "--temperature", "0", "--max-batch", "32", "--max-len", "512")
        part.rename(samples)
    data = [f"data.tokenizer={tok}", "data.source=jsonl", f"data.path={samples}", "data.format=prompt_completion",
            f"train.batch_size={args.batch}", "train.seq_len=256", f"init.from={out / 'draft-base'}"]
    run = train(out, "draft", args.config, args.draft_sample_steps, [*data, *overrides])
    return export_both(out, "draft", run, tok)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory")
    parser.add_argument("--config", default=str(BENCH_CONFIG), help="the target's config (default: bench-50m)")
    parser.add_argument("--trained", action="store_true", help="train target (+ draft) on the built-in corpus")
    parser.add_argument("--steps", type=int, default=60, help="--trained: target train steps")
    parser.add_argument("--draft-steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8, help="--trained: sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="--trained: tokens per sequence")
    parser.add_argument("--tokenizer-vocab", type=int, default=8192, help="--trained: sentencepiece pieces")
    parser.add_argument("--max-seq-len", type=int, default=4096,
                        help="model.max_seq_len (RoPE: no parameters depend on it; room for long prompts)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra target override")
    parser.add_argument("--draft-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra draft override (after the default 2-layer d_model 256 ones)")
    parser.add_argument("--no-draft", action="store_true")
    parser.add_argument("--draft-target-samples", type=int, default=0, metavar="N",
                        help="--trained: then distill the draft on the target's greedy completions of N corpus "
                             "prompts (DistillSpec); the first draft is kept as draft-base/")
    parser.add_argument("--draft-sample-steps", type=int, default=200)
    parser.add_argument("--distill-draft", action="store_true",
                        help="--trained: train the draft by distillation from the trained target (train.objective="
                             "distill, forward KL at T=1, alpha 1) instead of on the corpus' labels alone")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"model.max_seq_len={args.max_seq_len}"]
    made = {"kind": "trained" if args.trained else "random", "config": args.config}
    if not args.trained:
        # batch 1 x 128: the cheapest step (bench-50m's loss_chunk is 128); its learning rate is 0
        run = train(out, "target", args.config, 1, [*common, "train.batch_size=1", "train.seq_len=128",
                                                    "data.source=synthetic", *args.set])
        made["target"] = export_both(out, "target", run, None)
    else:
        tok = train_tokenizer(out, args.tokenizer_vocab)
        data = [*common, "data.source=builtin", f"data.tokenizer={tok}", f"train.batch_size={args.batch}",
                f"train.seq_len={args.seq_len}"]
        made["tokenizer"] = {"file": str(tok), "vocab": args.tokenizer_vocab, "pad": 0, "bos": 1, "eos": 2}
        run = train(out, "target", args.config, args.steps, [*data, *args.set])
        made["target"] = export_both(out, "target", run, tok)
        if not args.no_draft:
            distill = (["train.objective=distill", f"distill.teacher={out / 'target'}", "distill.alpha=1.0",
                        "distill.temperature=1.0"] if args.distill_draft else [])
            first = "draft-base" if args.draft_target_samples else "draft"
            run = train(out, first, args.config, args.draft_steps,
                        [*data, *DRAFT_OVERRIDES, *distill, *args.draft_set])
            made[first] = export_both(out, first, run, tok)
            if args.draft_target_samples:
                made["draft"] = draft_on_target_samples(out, args, tok, [*common, *DRAFT_OVERRIDES, *distill,
                                                                         *args.draft_set])
    (out / "models.json").write_text(json.dumps(made, indent=1))
    print(json.dumps({k: made[k]["hf"] if isinstance(made.get(k), dict) and "hf" in made[k] else made[k]
                      for k in made}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
