"""Peak resident memory of `maxmodel convert` against the size of the checkpoint it converts.

Writes a random LLaMA-shaped Hugging Face checkpoint (config.json + sharded safetensors; no torch needed),
then runs `maxmodel convert from-hf` and `maxmodel convert to-hf` each in its own process and reports the
peak memory of each next to the checkpoint's size and to that of a process that only imports what the
converter imports and starts JAX (the fixed cost). Streaming conversion keeps peak - fixed far below the
checkpoint size.

    PYTHONPATH=. python benchmarks/convert_memory.py --layers 10 --hidden 2048 --ffn 5632 --out /tmp/cm
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from maxmodel import jsonio

REPO = Path(__file__).resolve().parents[1]
FIXED_COST = ("import maxmodel.interop.convert, jax, orbax.checkpoint, flax.nnx, safetensors; "
              "jax.numpy.zeros(1).block_until_ready()")  # the runtime up, no tensor of the model


def write_checkpoint(out: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int,
                     shard_bytes: int = 2**30) -> int:
    """A random LLaMA checkpoint in float32, `shard_bytes` per file; returns its size in bytes."""
    from maxmodel.interop.safetensors_io import ShardedWriter

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    writer = ShardedWriter(out, shard_bytes)

    def add(name, *shape):
        writer.add(name, rng.standard_normal(shape, dtype=np.float32) * 0.02)

    add("model.embed_tokens.weight", vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            add(p + f"self_attn.{proj}_proj.weight", hidden, hidden)
        add(p + "mlp.gate_proj.weight", ffn, hidden)
        add(p + "mlp.up_proj.weight", ffn, hidden)
        add(p + "mlp.down_proj.weight", hidden, ffn)
        writer.add(p + "input_layernorm.weight", np.ones(hidden, np.float32))
        writer.add(p + "post_attention_layernorm.weight", np.ones(hidden, np.float32))
    writer.add("model.norm.weight", np.ones(hidden, np.float32))
    add("lm_head.weight", vocab, hidden)
    writer.close()
    (out / "config.json").write_text(jsonio.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": heads,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}))
    return writer.total


def _anon_kib(pid: int) -> int:
    """Anonymous resident memory of a process (not file pages, which the kernel can drop), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_memory(argv: list[str]) -> tuple[float, float, float]:
    """(peak RSS GiB, peak anonymous RSS GiB, wall seconds) of a child running argv; raises if it fails.

    Peak RSS is the kernel's high-water mark (wait4); it counts the pages of memory-mapped files too
    (safetensors are read through mmap), which the kernel reclaims under pressure. The anonymous part is
    sampled every 20 ms from /proc: that is the memory a conversion really needs."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    pid = subprocess.Popen(argv, env=env, cwd=REPO).pid
    anon = 0
    while True:
        anon = max(anon, _anon_kib(pid))
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 2**20, anon / 2**20, wall  # ru_maxrss is in KiB on Linux


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--shard-gb", type=float, default=1.0, help="GB per safetensors file, both ways")
    p.add_argument("--unscanned", action="store_true")
    p.add_argument("--out", default="/tmp/convert_memory")
    a = p.parse_args(argv)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    size = write_checkpoint(out / "hf", a.layers, a.hidden, a.ffn, a.vocab, a.heads, int(a.shard_gb * 2**30))
    cli = [sys.executable, "-m", "maxmodel.cli", "convert"]
    runs = {"imports": [sys.executable, "-c", FIXED_COST],
            "from_hf": cli + ["from-hf", str(out / "hf"), "--out", str(out / "init")]
            + (["--unscanned"] if a.unscanned else []),
            "to_hf": cli + ["to-hf", str(out / "init"), "--out", str(out / "back"), "--max-shard-size",
                            str(a.shard_gb)]}
    gib = size / 2**30
    result = {"checkpoint_gib": gib, "scan_layers": not a.unscanned}
    print(f"checkpoint {gib:.2f} GiB ({'unscanned' if a.unscanned else 'scanned'}), shards of {a.shard_gb} GB")
    for name, command in runs.items():
        rss, anon, secs = peak_memory(command)
        result[name] = {"peak_rss_gib": rss, "peak_anon_gib": anon, "seconds": secs}
        extra = "" if name == "imports" else (
            f" = imports + {anon - result['imports']['peak_anon_gib']:.2f} GiB "
            f"({(anon - result['imports']['peak_anon_gib']) / gib:.0%} of the checkpoint)")
        print(f"  {name:8s} peak RSS {rss:5.2f} GiB, anonymous {anon:5.2f} GiB{extra}, {secs:.1f} s")
    (out / "result.json").write_text(jsonio.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
