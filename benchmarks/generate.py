"""Generation on this CPU: maxmodel's engine side by side with Hugging Face `generate`, same weights.

  python benchmarks/generate_models.py OUT --trained        # once: target (~50M) + draft, both formats
  python benchmarks/generate.py --models OUT [--prompt-len 128] [--new-tokens 64] [--skip hf,spec,...]
  maxmodel bench --suite generate --models OUT ...          # the same

Prints one JSON object per measurement and a summary table; with --results, appends them (JSON lines).
Measurements (greedy, float32 unless named, prompts of random ordinary token ids):
  decode       tokens/s of steady-state decoding at batch 1 and 16 (prefill excluded: timed decode steps,
               each synced to the host as the batcher does); HF: static cache, torch.compile where faster
               (benchmarks/peers/hf_generate.py, its own venv)
  prefill      prompt tokens/s at batch 1;  ttft: submit -> first token
  int8         the same decode with int8 weights (maxmodel/inference/quantize.py)
  spec         batch-1 decode with a draft model and with n-gram drafting: tokens/s, acceptance rate
  prefix       time to first token for a 2,000-token shared prefix: cold vs prefix-cache hit
  serve        generated tokens/s of 1 and of 32 concurrent requests through the continuous batch
  membw        copy bandwidth, and what it allows at batch 1 (weight bytes per token)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def emit(record: dict, results: list) -> None:
    results.append(record)
    print(json.dumps(record), flush=True)


def prompt_ids(n: int, batch: int = 1, seed: int = 0, vocab: int = 8192) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + list(map(int, rng.integers(5, vocab, n - 1))) for _ in range(batch)]


def load(model: Path, slots: int, max_len: int, **kwargs):
    from maxmodel.inference.load import load_engine
    return load_engine(model, ["run.cpu_devices=1", "mesh.data=1"], max_slots=slots, max_len=max_len, **kwargs)


def decode_rate(gen, batch: int, prompt_len: int, steps: int) -> float:
    """Tokens/s of `steps` decode steps with `batch` active slots (prefill and first tokens excluded)."""
    from maxmodel.inference.sampling import SamplingOptions, stack_params
    eng = gen.engine
    prompt = prompt_ids(prompt_len)[0]
    row, logits, _ = eng.prefill(prompt)
    for slot in range(batch):
        eng.insert(row, logits, slot, prompt, stack_params([SamplingOptions(temperature=0.0)], 1))
    active = np.arange(eng.max_slots) < batch
    for _ in range(2):
        eng.step(active)  # compiled and warm
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step(active)
    return batch * steps / (time.perf_counter() - t0)


def prefill_rate(gen, prompt_len: int, repeats: int = 3) -> tuple[float, float]:
    """(prompt tokens/s of one prefill, time to first token of one request), best of `repeats`."""
    from maxmodel.inference.sampling import SamplingOptions
    prompt = prompt_ids(prompt_len, seed=1)[0]
    gen.engine.prefill(prompt)
    best_prefill, best_ttft = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, logits, _ = gen.engine.prefill(prompt)
        np.asarray(logits)
        best_prefill = min(best_prefill, time.perf_counter() - t0)
        out = gen.generate([prompt], SamplingOptions(max_new_tokens=1, temperature=0.0, ignore_eos=True))[0]
        best_ttft = min(best_ttft, out.ttft)
    return prompt_len / best_prefill, best_ttft


def generated_rate(gen, prompts, opts, repeats: int = 3, warm: bool = False) -> tuple[float, list]:
    """Generated tokens/s of these requests submitted together (prefills included; the best of `repeats`
    runs, as for prefill: a figure robust to this shared machine's hiccups), and the outputs. `warm`: the
    caller has already run these shapes once, so nothing is left to compile."""
    if not warm:
        gen.generate(prompts[:1], opts)  # compiled
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = gen.generate(prompts, opts)
        best = min(best, time.perf_counter() - t0)
    return sum(len(c.token_ids) for o in outs for c in o.completions) / best, outs


def bench_spec(args, one, max_len: int, results: list, rounds: int = 5) -> None:
    """Batch-1 greedy generation with no drafter, a draft model and n-gram drafting, timed in turn `rounds`
    times and each taken at its best: the speed-ups then compare runs of the same moment, not of whatever
    else this shared machine did between one measurement and the next."""
    from maxmodel.data.tokenizer import load_tokenizer
    from maxmodel.inference.sampling import SamplingOptions
    target = args.models / "target"
    tokenizer = load_tokenizer(str(target / "tokenizer.model"))
    text = tokenizer.encode("The following keywords are reserved and cannot be used as ordinary identifiers. ")
    prompt = [[1] + text * (args.prompt_len // max(len(text), 1))][:1]  # repetitive: n-grams can hit
    opts = SamplingOptions(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    dvocab = args.draft_vocab or tokenizer.vocab_size
    gens = {"none": one,
            "draft": load(target, 1, max_len, draft=str(args.models / "draft"), draft_tokens=args.draft_tokens,
                          draft_vocab=dvocab),
            "ngram": load(target, 1, max_len, ngram=3, draft_tokens=args.draft_tokens)}
    for gen in gens.values():
        gen.generate(prompt, opts)  # compiled, once: the rounds below time warm runs only
    best, outs = dict.fromkeys(gens, 0.0), {}
    for _ in range(rounds):
        for name, gen in gens.items():
            rate, outs[name] = generated_rate(gen, prompt, opts, repeats=1, warm=True)
            best[name] = max(best[name], rate)
    emit({"bench": "spec", "impl": "maxmodel", "drafter": "none", "tokens_per_s": best["none"]}, results)
    ref = outs["none"][0].completions[0].token_ids
    for name in ("draft", "ngram"):
        emit({"bench": "spec", "impl": "maxmodel", "drafter": name, "tokens_per_s": best[name],
              "speedup": best[name] / best["none"], "k": args.draft_tokens,
              "acceptance_rate": gens[name].stats().get("spec_acceptance_rate"),
              **({"draft_vocab": dvocab} if name == "draft" else {}),
              "same_tokens_as_plain": outs[name][0].completions[0].token_ids == ref}, results)


def bench_maxmodel(args, results: list) -> None:
    from maxmodel.inference.sampling import SamplingOptions
    target = args.models / "target"
    max_len = args.prompt_len + args.new_tokens + 8
    one = load(target, 1, max_len)
    emit({"bench": "decode", "impl": "maxmodel", "batch": 1, "tokens_per_s": decode_rate(one, 1, args.prompt_len,
                                                                                           args.new_tokens)}, results)
    prefill, ttft = prefill_rate(one, args.prompt_len)
    emit({"bench": "prefill", "impl": "maxmodel", "prompt_len": args.prompt_len, "tokens_per_s": prefill,
          "ttft_s": ttft}, results)
    sixteen = load(target, 16, max_len)
    emit({"bench": "decode", "impl": "maxmodel", "batch": 16,
          "tokens_per_s": decode_rate(sixteen, 16, args.prompt_len, args.new_tokens)}, results)
    del sixteen
    if "int8" not in args.skip:
        q = load(target, 1, max_len, quantize="int8")
        emit({"bench": "decode", "impl": "maxmodel-int8", "batch": 1,
              "tokens_per_s": decode_rate(q, 1, args.prompt_len, args.new_tokens)}, results)
        del q
    if "spec" not in args.skip:
        bench_spec(args, one, max_len, results)
    if "prefix" not in args.skip:
        shared = prompt_ids(2000, seed=3)[0]
        tails = [list(map(int, np.random.default_rng(10 + i).integers(5, 8192, 16))) for i in range(3)]
        cached = load(target, 1, 2100, prefix_cache_gb=1.0)
        opts = SamplingOptions(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        cached.generate([shared + tails[0]], opts)      # compiles the prefill and the block reads, stores
        cached.generate([shared + tails[1]], opts)      # a hit: compiles the block writes
        cached.engine.set_params(cached.engine.params)  # drops the blocks: the next request is cold
        cold = cached.generate([shared + tails[2]], opts)[0].ttft
        hit = cached.generate([shared + tails[0]], opts)[0].ttft
        emit({"bench": "prefix", "impl": "maxmodel", "prefix_tokens": 2000, "ttft_cold_s": cold, "ttft_hit_s": hit,
              "speedup": cold / hit, **{k: v for k, v in cached.stats().items() if "prefix" in k or "saved" in k}},
             results)
        del cached
    if "serve" not in args.skip:
        served = load(target, 32, max_len)
        opts = SamplingOptions(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        rates = {}
        for clients in (1, 32):
            rates[clients], _ = generated_rate(served, prompt_ids(args.prompt_len, clients, seed=5), opts)
        emit({"bench": "serve", "impl": "maxmodel", "max_batch": 32, "tokens_per_s_1": rates[1],
              "tokens_per_s_32": rates[32], "ratio": rates[32] / rates[1]}, results)


def bench_hf(args, results: list) -> None:
    python = os.environ.get("MAXMODEL_HF_PYTHON", str(REPO / ".venv-hf" / "bin" / "python"))
    from maxmodel.host_allocator import system_allocator_env
    env = {k: v for k, v in system_allocator_env(os.environ).items() if k != "PYTHONPATH"}  # torch as it runs
    proc = subprocess.run([python, str(REPO / "benchmarks" / "peers" / "hf_generate.py"), "--model",
                           str(args.models / "target-hf"), "--prompt-len", str(args.prompt_len), "--new-tokens",
                           str(args.new_tokens), "--batches", "1,16", "--compile", args.hf_compile],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        emit({"bench": "hf", "skipped": proc.stderr[-2000:]}, results)
        return
    emit({"bench": "hf", **json.loads(proc.stdout.strip().splitlines()[-1])}, results)


def bench_membw(args, results: list) -> None:
    from membw import bandwidth_bound_tokens_per_s, measure
    bw = measure()
    weight_bytes = sum(f.stat().st_size for f in (args.models / "target-hf").glob("*.safetensors"))
    emit({"bench": "membw", **bw, "weight_bytes": weight_bytes,
          "bound_tokens_per_s_batch1": bandwidth_bound_tokens_per_s(weight_bytes, bw["copy_gbps"])}, results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="the output of benchmarks/generate_models.py")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="the draft over its first N ids (default: the tokenizer's size when it is smaller)")
    parser.add_argument("--hf-compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--skip", default="", help="comma-separated: hf, membw, int8, spec, prefix, serve")
    parser.add_argument("--results", default=None, help="append the JSON lines here")
    args = parser.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = [{"bench": "load", "loadavg": Path("/proc/loadavg").read_text().split()[:3]}]
    print(json.dumps(results[0]), flush=True)
    if "membw" not in args.skip:
        bench_membw(args, results)
    if "hf" not in args.skip:
        bench_hf(args, results)
    bench_maxmodel(args, results)
    if args.results:
        with open(args.results, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    summarize(results)
    return 0


def summarize(results: list) -> None:
    by = {(r["bench"], r.get("impl"), r.get("batch"), r.get("drafter")): r for r in results}
    hf = next((r for r in results if r["bench"] == "hf" and "skipped" not in r), None)
    lines = []
    for batch in (1, 16):
        ours = by.get(("decode", "maxmodel", batch, None))
        theirs = hf and hf["decode_tokens_per_s"].get(str(batch))
        if ours:
            ratio = f"  ({ours['tokens_per_s'] / theirs:.2f}x HF {theirs:.1f})" if theirs else ""
            lines.append(f"decode batch {batch:>2}: {ours['tokens_per_s']:8.1f} tok/s{ratio}")
    pre = by.get(("prefill", "maxmodel", None, None))
    if pre and hf:
        lines.append(f"prefill: {pre['tokens_per_s']:.0f} tok/s (HF {hf['prefill_tokens_per_s']:.0f}); "
                     f"ttft {pre['ttft_s'] * 1e3:.0f} ms (HF {hf['ttft_s'] * 1e3:.0f} ms)")
    for r in results:
        if r["bench"] in ("spec", "prefix", "serve", "membw") or r.get("impl") == "maxmodel-int8":
            lines.append(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    print("\n".join(lines))


if __name__ == "__main__":
    from maxmodel.host_allocator import restart_with_fast_allocator
    restart_with_fast_allocator()  # as the `maxmodel` program runs (maxmodel/host_allocator.py)
    sys.exit(main())
