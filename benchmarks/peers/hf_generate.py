"""The Hugging Face side of benchmarks/generate.py: transformers `generate` on a LlamaForCausalLM directory
(e.g. `maxmodel convert to-hf` output), greedy, static KV cache, CPU. Run with the Python of `.venv-hf`
(torch + transformers), never in maxmodel's venv. Prints ONE JSON line.

  python hf_generate.py --model DIR [--prompt-len 128] [--new-tokens 64] [--batches 1,16]
                        [--compile auto|on|off] [--repeats 3] [--dtype float32|bfloat16]
  python hf_generate.py --model DIR --greedy-tokens PROMPTS.json [--new-tokens 64] [--eos ID]

How it measures (timing mode):
- Decode: a LogitsProcessor records time.perf_counter() each time generate hands it a step's logits, i.e. once
  per new token, right after that step's forward (torch on CPU is synchronous, so the stamp is when the logits
  exist). Stamp 0 closes the prefill; stamps 1..N-1 each close one decode step. Steady-state decode tokens/s =
  batch * (N-1) / (stamp[N-1] - stamp[0]): new tokens only, prefill excluded, and each interval also holds
  generate's own per-step Python work (argmax, cache bookkeeping), as a user of `generate` pays it.
- Time to first token: from the generate() call to stamp 0 (batch 1, prompt P): input preparation + the
  prefill forward (transformers runs the prefill uncompiled even when it compiles decode steps).
- Prefill tokens/s: P / the time of one forward over the P-token prompt (batch 1, no cache): the model's
  compute on the prompt alone, comparable with an engine's jitted prefill.
- Every figure is the best of --repeats timed runs after an untimed warm-up run (which also compiles); the
  median comes along to show the noise. Prompts are fixed random ids (seed 0), drawn above the special ids
  0..3 (pad/bos/eos/unk of maxmodel's sentencepiece models); EOS never stops generation (eos_token_id=None),
  so every run makes exactly N tokens.
- Compile: transformers compiles the decode-step forward itself when the cache is static, but only on GPUs
  unless CompileConfig._compile_all_devices is set; "on" sets it (inductor, static shapes, mode "default":
  "reduce-overhead" means CUDA graphs), "off" sets disable_compile. "auto" measures both quickly per batch
  size (warm-up + one run each) and keeps the faster; the JSON says which ran.

Greedy mode (`--greedy-tokens`): PROMPTS.json is a list of token-id lists; each prompt is generated alone
(batch 1, so no padding can shift positions), greedy, eager, the default dynamic cache, N new tokens (fewer
only with --eos). Prints {"tokens": [[new ids], ...]}: the reference for maxmodel's engine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import CompileConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

FIRST_ORDINARY_ID = 4  # ids 0..3 are pad/bos/eos/unk in maxmodel's sentencepiece models


class StepClock(LogitsProcessor):
    """Stamps the time of every generation step (called once per new token); leaves the scores alone."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def load(model_dir: str, dtype: str) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.eval()


def prompts(vocab: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(FIRST_ORDINARY_ID, vocab, (batch, length), generator=g)


def generation_kwargs(compiled: bool) -> dict:
    kwargs = dict(do_sample=False, cache_implementation="static", eos_token_id=None, pad_token_id=0)
    if compiled:
        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers' switch for compiling on CPU
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    return kwargs


def timed_generate(model, ids: torch.Tensor, new_tokens: int, compiled: bool) -> dict:
    clock = StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             logits_processor=LogitsProcessorList([clock]), **generation_kwargs(compiled))
    s = clock.stamps
    if out.shape[1] - ids.shape[1] != new_tokens or len(s) != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens ({len(s)} steps), "
                           f"expected {new_tokens}")
    decode_s = s[-1] - s[0]
    return {"ttft_s": s[0] - t0,
            "decode_tokens_per_s": ids.shape[0] * (new_tokens - 1) / decode_s if decode_s > 0 else float("nan")}


def decode_runs(model, ids, new_tokens: int, compiled: bool, repeats: int) -> list[dict]:
    timed_generate(model, ids, new_tokens, compiled)  # warm-up: allocation, compilation
    return [timed_generate(model, ids, new_tokens, compiled) for _ in range(repeats)]


def summarise(runs: list[dict], key: str, best=max) -> dict:
    values = [r[key] for r in runs]
    return {"best": best(values), "median": statistics.median(values), "runs": values}


def bench_batch(model, batch: int, args) -> dict:
    ids = prompts(model.config.vocab_size, batch, args.prompt_len)
    quick = {}
    if args.compile == "auto":  # a warm-up and one run each; the faster mode gets the full repeats
        for name, compiled in (("eager", False), ("compiled", True)):
            quick[name] = decode_runs(model, ids, args.new_tokens, compiled, 1)[0]["decode_tokens_per_s"]
        mode = max(quick, key=quick.get)
    else:
        mode = "compiled" if args.compile == "on" else "eager"
    runs = decode_runs(model, ids, args.new_tokens, mode == "compiled", args.repeats)
    out = {"mode": mode, "decode_tokens_per_s": summarise(runs, "decode_tokens_per_s"),
           "ttft_s": summarise(runs, "ttft_s", best=min)}
    if quick:
        out["quick_decode_tokens_per_s"] = quick
    return out


def prefill_tokens_per_s(model, prompt_len: int, repeats: int) -> dict:
    ids = prompts(model.config.vocab_size, 1, prompt_len)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # only the last position's logits are needed
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t0)
    return summarise([{"v": prompt_len / t} for t in times], "v")


def timing(args) -> dict:
    model = load(args.model, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    per_batch = {str(b): bench_batch(model, b, args) for b in batches}
    first = per_batch[str(batches[0])]
    return {
        "peer": "hf_generate", "torch": torch.__version__, "transformers": transformers.__version__,
        "model": os.path.abspath(args.model), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "compile": args.compile, "cache": "static",
        "decode_tokens_per_s": {b: r["decode_tokens_per_s"]["best"] for b, r in per_batch.items()},
        "mode": {b: r["mode"] for b, r in per_batch.items()},
        "prefill_tokens_per_s": prefill_tokens_per_s(model, args.prompt_len, args.repeats)["best"],
        "ttft_s": first["ttft_s"]["best"], "ttft_batch": batches[0],
        "load_avg": open("/proc/loadavg").read().split()[:3],
        "detail": per_batch,
    }


def greedy_tokens(args) -> dict:
    model = load(args.model, args.dtype)
    with open(args.greedy_tokens) as f:
        prompt_list = json.load(f)
    out = []
    with torch.inference_mode():
        for prompt in prompt_list:
            ids = torch.tensor([prompt], dtype=torch.long)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, eos_token_id=args.eos, pad_token_id=0, disable_compile=True)
            out.append(gen[0, ids.shape[1]:].tolist())
    return {"tokens": out, "new_tokens": args.new_tokens, "eos": args.eos}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a transformers LlamaForCausalLM directory")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes; TTFT uses the first")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--greedy-tokens", metavar="PROMPTS.json", default=None,
                        help="instead of timing: greedy new-token ids for these prompts (a JSON list of id lists)")
    parser.add_argument("--eos", type=int, default=None, help="greedy mode: stop a prompt at this id (default: never)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 and not args.greedy_tokens:
        parser.error("--new-tokens must be >= 2: decode speed is measured between the first and last token")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    print(json.dumps(greedy_tokens(args) if args.greedy_tokens else timing(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
