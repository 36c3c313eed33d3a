"""Model FLOPs, MFU, the accelerator's peak, and the metrics writers (metrics.jsonl + TensorBoard)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from maxmodel import jsonio
from maxmodel.config.schema import ModelConfig

# bf16 dense peak FLOP/s per chip, from the vendors' spec sheets (Cloud TPU system architecture pages;
# NVIDIA A100/H100/H200/B200 datasheets, dense, without sparsity).
CHIP_PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
    "a100": 312e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12,
}


def matmul_params(params, expert_fraction: float = 1.0) -> int:
    """Parameters that take part in matmuls: all but lookup-only embedding tables (token, position).
    MoE expert weights (`expert_*`) count with `expert_fraction` = top_k / num_experts: each token uses
    only its k experts, so model FLOPs (and MFU) follow the active parameters."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names[-2:] == ["embed", "pos_table"]:
            continue
        n = math.prod(leaf.shape)
        total += n * expert_fraction if names and names[-1].startswith("expert_") else n
    return round(total)


def moe_record(stats) -> dict:
    """Flat metrics of the MoE layers: per layer the load of each expert (fraction of token copies), the
    dropped fraction and the aux losses; plus the worst load imbalance (max load · E, 1 = balanced), and the
    token rows the expert exchange sent between devices (each way, all MoE layers, forward pass)."""
    load = np.asarray(stats["load"])
    out = {"moe/max_load_ratio": float(load.max() * load.shape[-1]), "moe/dropped": float(np.mean(stats["dropped"])),
           "moe/aux_loss": float(np.mean(stats["aux_loss"])), "moe/z_loss": float(np.mean(stats["z_loss"])),
           "moe/sent_rows": float(np.sum(stats.get("sent_rows", 0.0)))}
    for i in range(load.shape[0]):
        out[f"moe/layer{i}/dropped"] = float(stats["dropped"][i])
        out[f"moe/layer{i}/aux_loss"] = float(stats["aux_loss"][i])
        out[f"moe/layer{i}/z_loss"] = float(stats["z_loss"][i])
        out.update({f"moe/layer{i}/load/expert{e}": float(v) for e, v in enumerate(load[i])})
    return out


def flops_per_token(cfg: ModelConfig, n_matmul: int, seq_len: int, tied: bool) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T (attention scores and values).
    With untied embeddings the input table is a lookup and is excluded from N by `matmul_params`."""
    if not tied:
        n_matmul -= cfg.vocab_size * cfg.d_model
    attention_layers = cfg.num_layers
    if cfg.arch == "encoder_decoder":  # encoder self-attention and decoder cross-attention (source = seq_len)
        attention_layers += (cfg.num_encoder_layers or cfg.num_layers) + cfg.num_layers
    return 6.0 * n_matmul + 12.0 * attention_layers * cfg.num_heads * cfg.head_dim * seq_len


def _cache_file() -> Path:
    from maxmodel.data.tokenizer import cache_dir
    return cache_dir() / "cpu_peak.json"


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a large matmul on one device: the CPU's practical peak for `dtype` ("float32", or "bfloat16":
    bf16 operands with float32 accumulation and output, as the model's mixed-precision products run)."""
    dev = jax.devices()[0]
    dt = jnp.dtype(dtype)
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32).astype(dt), dev)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops_per_device(remeasure: bool = False, dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where it came from). CPUs: a measured matmul in `dtype` (the step's compute
    dtype: float32, or bf16 whose matmuls run faster on CPUs with AVX-512 BF16 / AMX), cached per machine and
    dtype and divided by the number of emulated devices (they share the same cores). `remeasure` measures it
    again (benchmarks want the peak under the same load as the run they compare it with). Accelerators: the
    chip table's bf16 dense peak, whatever the dtype."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "").lower()
    if dev.platform != "cpu":
        for name, peak in CHIP_PEAK_FLOPS.items():
            if name in kind:
                return peak, f"chip table ({kind})"
        return math.nan, f"unknown chip {kind}"
    cache = _cache_file()
    key = "matmul_flops" if dtype == "float32" else f"matmul_flops_{dtype}"
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    peak = cached.get(key) if isinstance(cached, dict) and not remeasure else None
    if peak is None:
        peak = measure_matmul_peak(dtype=dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(jsonio.dumps({**(cached if isinstance(cached, dict) else {}), key: peak}))
    return float(peak) / jax.local_device_count(), f"measured CPU {dtype} matmul"


class MetricsWriter:
    """One JSON object per logged step in metrics.jsonl, and TensorBoard scalars. Process 0 only."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run; close())
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard output is optional; metrics.jsonl always exists
                self.tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating, np.integer))
                                       else v) for k, v in values.items()}}
        self.file.write(jsonio.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
