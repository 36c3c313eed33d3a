"""Batch-1 decode tokens/s with and without speculative decoding, for a target (and draft) model directory.

    python benchmarks/speculative.py TARGET_DIR [--draft DRAFT_DIR] [--ngram N] [--k K] [--new-tokens 64]
    python benchmarks/speculative.py --tiny      # tiny random models made here (checks the plumbing only)

`measure()` is what benchmarks/generate.py calls. Each configuration is loaded through `load_engine` (the
draft the same way as the target), warmed up once (compiles), then timed over `repeats` greedy requests of
`new_tokens` tokens one at a time (max_slots=1, batch 1). Reported: decode tokens/s (prefill excluded:
tokens after the first / time after the first token), speed-up over plain decoding, acceptance rate.
With --tiny the draft is a random model (acceptance ~0: the cost of speculation), the target itself
(acceptance 1: the upper bound) and n-gram on a repetitive prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _decode_rate(gen, prompt, new_tokens: int, repeats: int) -> float:
    from maxmodel.inference.sampling import SamplingOptions
    opts = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen.generate([prompt], opts)  # compile every shape once
    total = tokens = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate([prompt], opts)[0]
        elapsed = time.perf_counter() - t0 - out.ttft   # decode only: after the first token
        total, tokens = total + elapsed, tokens + len(out.completions[0].token_ids) - 1
    return tokens / total


def measure(target, draft=None, ngram: int = 0, k: int = 4, prompt=None, new_tokens: int = 64,
            repeats: int = 3, **engine_options) -> dict:
    """{"plain": tok/s, "speculative": tok/s, "speedup": x, "acceptance_rate": r} at batch 1."""
    from maxmodel.inference.load import load_engine
    engine_options = {"max_slots": 1, **engine_options}
    prompt = prompt or [1] + [3 + (i * 7) % 50 for i in range(32)]
    plain = _decode_rate(load_engine(target, **engine_options), prompt, new_tokens, repeats)
    gen = load_engine(target, draft=draft, draft_tokens=k, ngram=ngram, **engine_options)
    spec = _decode_rate(gen, prompt, new_tokens, repeats)
    st = gen.stats()
    return {"plain_tok_s": round(plain, 1), "speculative_tok_s": round(spec, 1), "speedup": round(spec / plain, 3),
            "acceptance_rate": round(st["spec_acceptance_rate"], 3), "k": k,
            "drafter": f"draft={Path(draft).name}" if draft else f"ngram={ngram}"}


def tiny_model_dir(out: Path, seed: int, layers: int) -> Path:
    """A random tiny model saved as a `maxmodel export` directory (params/ + export.json + config.yaml)."""
    import jax
    import orbax.checkpoint as ocp
    import yaml
    from flax import nnx

    from maxmodel.config import load_config_args
    from maxmodel.config.schema import to_dict
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import logical_rules
    from maxmodel.train.step import abstract_state, concrete_shardings, create_params
    cfg = load_config_args([f"model.num_layers={layers}", "model.d_model=128", "model.num_heads=4",
                            "model.num_kv_heads=2", "model.d_ff=512", "model.vocab_size=259", "model.max_seq_len=256",
                            "data.tokenizer=bytes", "mesh.data=1", "run.cpu_devices=1", f"train.seed={seed}"])
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules("default")):
        _, abstract = abstract_state(cfg)
        params = create_params(cfg, concrete_shardings(abstract, mesh))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(out.absolute() / "params", params)
    (out / "export.json").write_text(json.dumps({"step": 0, "dtype": "float32", "model": to_dict(cfg.model)}))
    # the resolved config beside it, so that load_engine finds data.tokenizer=bytes
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", nargs="?")
    ap.add_argument("--draft")
    ap.add_argument("--ngram", type=int, default=0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    common = dict(k=args.k, new_tokens=args.new_tokens, repeats=args.repeats, max_len=256,
                  prefill_buckets=(64,))
    if not args.tiny:
        print(json.dumps(measure(args.target, args.draft, args.ngram, **common)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        target = tiny_model_dir(Path(tmp, "target"), 0, 4)
        draft = tiny_model_dir(Path(tmp, "draft"), 1, 1)
        for name, kw in (("random 1-layer draft", dict(draft=draft)), ("self-draft", dict(draft=target)),
                         ("ngram=3", dict(ngram=3))):
            print(name, json.dumps(measure(target, **kw, **common)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
