"""Log-likelihood throughput of the `maxmodel` lm-eval backend vs lm-eval's own `hf` backend, same weights.

  python benchmarks/generate_models.py OUT --no-draft      # bench-50m: maxmodel export + its transformers twin
  python benchmarks/eval.py --models OUT [--docs 128] [--choices 4] [--batch-rows 8] [--row-len 512]
                            [--hf-batch 16] [--devices 1] [--skip hf]

Requests look like a multiple-choice task's: `--docs` contexts of 48..256 random tokens, each with `--choices`
continuations of 1..12 tokens (the same, seeded, on both sides). Each side scores them through its backend's
`_loglikelihood_tokens` (what lm-eval's `loglikelihood` calls after tokenizing, so tokenizers are out of the
timing): maxmodel packs them into rows of --row-len with per-request segments (--batch-rows rows per forward
pass, --devices emulated CPU devices); HFLM pads batches of --hf-batch (torch 2.13 CPU, 2 threads, its own
venv .venv-hf). Both run once untimed (compiles, warms caches), then once timed. requests/s and tokens/s
(input tokens: every request's context + continuation, as each backend truncates it) side by side, the
largest |log-likelihood difference| between the two, and maxmodel's forward passes and row fill. Prints one
JSON line per side and a summary; --out writes them all.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 512


def requests(docs: int, choices: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(docs):
        ctx = rng.integers(4, vocab, size=int(rng.integers(48, 257))).tolist()
        out += [(ctx, rng.integers(4, vocab, size=int(rng.integers(1, 13))).tolist()) for _ in range(choices)]
    return out


def ensure_tokenizer(models: Path) -> None:
    """A tokenizer.json beside both weight directories (random bench-50m has none; the requests are token ids,
    so any tokenizer with BOS/EOS serves to load the backends)."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    for name in ("target", "target-hf"):
        d = models / name
        if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file():
            continue
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(60)}
        Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>")).save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "<pad>", "unk_token": "<unk>"}))


def bench_maxmodel(args, reqs) -> dict:
    from maxmodel import distributed
    distributed.initialize(args.devices)
    from maxmodel.eval.lm_backend import MaxModelLM
    from maxmodel.eval.model import EvalModel
    model = EvalModel.load(args.models / "target", [f"run.cpu_devices={args.devices}", "mesh.data=-1"],
                           MAX_LENGTH, args.batch_rows, args.row_len)
    lm = MaxModelLM(model=model)
    batch = [(None, c, x) for c, x in reqs]
    lm._loglikelihood_tokens(batch)  # compiles every row shape the timed run uses
    passes = model.scorer.forward_passes
    t0 = time.perf_counter()
    out = lm._loglikelihood_tokens(batch)
    seconds = time.perf_counter() - t0
    passes = model.scorer.forward_passes - passes
    tokens = sum(min(len(c) + len(x), MAX_LENGTH + 1) - 1 for c, x in reqs)
    return {"bench": "maxmodel", "seconds": seconds, "requests_per_s": len(reqs) / seconds,
            "tokens_per_s": tokens / seconds, "forward_passes": passes,
            "row_fill": tokens / (passes * model.scorer.rows * args.row_len), "rows": model.scorer.rows,
            "row_len": args.row_len, "devices": args.devices, "loglikelihoods": [ll for ll, _ in out]}


def bench_hf(args, reqs) -> dict:
    python = os.environ.get("MAXMODEL_HF_PYTHON", str(REPO / ".venv-hf" / "bin" / "python"))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(reqs, f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([python, str(REPO / "benchmarks" / "peers" / "hf_lm_eval.py"), "--model",
                           str(args.models / "target-hf"), "--requests", f.name, "--batch-size", str(args.hf_batch),
                           "--max-length", str(MAX_LENGTH)], capture_output=True, text=True, env=env, check=False)
    os.unlink(f.name)
    if proc.returncode:
        return {"bench": "hf", "skipped": proc.stderr[-2000:]}
    return {"bench": "hf", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="the directory benchmarks/generate_models.py made")
    p.add_argument("--docs", type=int, default=128)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--row-len", type=int, default=512)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--devices", type=int, default=1, help="emulated CPU devices for maxmodel (rows over them)")
    p.add_argument("--skip", default="", help="hf: maxmodel only")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ensure_tokenizer(args.models)
    vocab = json.loads((args.models / "target" / "export.json").read_text())["model"]["vocab_size"]
    reqs = requests(args.docs, args.choices, vocab)
    results = [bench_maxmodel(args, reqs)]
    if "hf" not in args.skip:
        results.append(bench_hf(args, reqs))
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "loglikelihoods"}), flush=True)
    ours, hf = results[0], results[-1] if len(results) > 1 and "skipped" not in results[-1] else None
    summary = {"requests": len(reqs), "maxmodel_requests_per_s": ours["requests_per_s"]}
    if hf:
        diff = max(abs(a - b) for a, b in zip(ours["loglikelihoods"], hf["loglikelihoods"]))
        summary |= {"hf_requests_per_s": hf["requests_per_s"], "speedup": ours["requests_per_s"] / hf["requests_per_s"],
                    "max_abs_loglikelihood_diff": diff}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
