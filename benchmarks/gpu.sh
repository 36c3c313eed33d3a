#!/usr/bin/env bash
# One-GPU throughput check for a machine that may have no network (designed for one H200, < 8 minutes):
#   benchmarks/gpu.sh [WHEELS_DIR]
# Uses the JAX with CUDA already installed (0.11.x is fine), installs maxmodel with `pip install --no-deps`,
# and any dependency that does not import from WHEELS_DIR (pip --no-index --find-links). Then `maxmodel bench`
# in bf16 compute (f32 parameters and optimizer) for
#   1. a ~1B dense LLaMA-style model (d_model 2048, 16 layers, 16 heads x 128, SwiGLU d_ff 5632, vocab 32768,
#      seq 2048, batch 8): target MFU >= 50% of the chip's bf16 dense peak;
#   2. moe-tiny scaled up (d_model 1024, 8 layers, 8 experts top-2), when configs/models/moe-tiny.yaml exists.
# Prints tokens/s and MFU per model; the full JSON lines go to $OUT (default ./gpu-results) /results.jsonl.
# Attention is model.attention.impl=auto: cuDNN on a GPU in bf16.
# Environment: PY (python with jax[cuda]; default python3), STEPS (default 20), WARMUP (default 3),
# DRY_RUN=1: on a host without a GPU, run the same configs shrunk (1 layer, seq 128, one step) on the CPU,
# to catch a bad key or a broken code path before the GPU time is spent.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${1:-}
PY=${PY:-python3}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
DRY_RUN=${DRY_RUN:-0}
SHRINK=()
if [ "$DRY_RUN" = 1 ]; then
  STEPS=1; WARMUP=1; export JAX_PLATFORMS=cpu
  SHRINK=(model.num_layers=1 train.seq_len=128 train.batch_size=1 train.loss_chunk=128)
fi
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false"

echo "== JAX and the GPU"
DRY_RUN=$DRY_RUN "$PY" - <<'PYEOF'
import os
import jax
devs = jax.devices()
print("jax", jax.__version__, "|", len(devs), "x", devs[0].device_kind, "|", devs[0].platform)
if devs[0].platform != "gpu" and os.environ.get("DRY_RUN") != "1":
    raise SystemExit("no GPU visible to JAX (install jax[cuda12] or check CUDA_VISIBLE_DEVICES)")
PYEOF

echo "== dependencies (from ${WHEELS:-the installed environment})"
missing=()
for pair in flax:flax optax:optax orbax.checkpoint:orbax-checkpoint grain:grain yaml:pyyaml tqdm:tqdm \
            numpy:numpy tensorboardX:tensorboardX; do
  mod=${pair%%:*}; pkg=${pair#*:}
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ -n "$WHEELS" ] || { echo "missing ${missing[*]} and no wheel folder given"; exit 2; }
  "$PY" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}"
fi
# The project itself, without touching the installed JAX; fall back to PYTHONPATH when it cannot build offline.
# A dry run never installs (PY is then usually a development venv with maxmodel installed editable).
if [ "$DRY_RUN" = 1 ]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -m pip install --no-deps --no-build-isolation -q "$REPO" 2>"$OUT/pip.log"; then
  echo "pip install of maxmodel failed offline (see $OUT/pip.log); using PYTHONPATH=$REPO"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$REPO"

bench() {  # label, then overrides
  local label=$1; shift
  echo "== $label"
  timeout 300 "$PY" -m maxmodel.cli bench "$@" "${SHRINK[@]}" --steps "$STEPS" --warmup "$WARMUP" --label "$label" \
    --results "$OUT/results.jsonl" > "$OUT/$label.log" 2>&1 || { echo "$label failed:"; tail -n 20 "$OUT/$label.log"; return 0; }
  "$PY" - "$OUT/$label.log" <<'PYEOF'
import json, sys
r = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
target = " (target 50%: " + ("met" if r["mfu"] >= 0.5 else "NOT met") + ")" if "dense" in r.get("label", "") else ""
print(f"  {r['tokens_per_sec']:,.0f} tokens/s  step {r['step_time_median'] * 1e3:.0f} ms (p90 "
      f"{r['step_time_p90'] * 1e3:.0f})  compile {r['compile_seconds']:.0f}s  MFU {r['mfu']:.1%} of "
      f"{r['peak_flops'] / 1e12:.3g} TFLOP/s ({r['peak_source']}){target}  memory {(r['peak_memory_bytes'] or 0) / 2**30:.1f} GiB")
PYEOF
}

COMMON=(run.cpu_devices=1 mesh.data=1 data.source=synthetic checkpoint.enabled=false train.dtype=bfloat16
        train.param_dtype=float32 train.scan_layers=true optimizer.name=adamw)

bench dense-1b "${COMMON[@]}" model.vocab_size=32768 model.d_model=2048 model.num_layers=16 model.num_heads=16 \
  model.num_kv_heads=16 model.head_dim=128 model.d_ff=5632 model.max_seq_len=2048 model.tie_embeddings=false \
  train.seq_len=2048 train.batch_size=8 train.remat="${REMAT:-save_dots}" train.loss_chunk=512

if [ -f configs/models/moe-tiny.yaml ]; then
  bench moe-scaled "${COMMON[@]}" model.name=moe-tiny model.vocab_size=32768 model.d_model=1024 \
    model.num_layers=8 model.num_heads=8 model.num_kv_heads=8 model.head_dim=128 model.d_ff=2816 \
    model.max_seq_len=2048 model.moe.num_experts=8 model.moe.top_k=2 train.seq_len=2048 train.batch_size=8 \
    train.remat="${REMAT:-save_dots}" train.loss_chunk=512
else
  echo "== moe-scaled: skipped (configs/models/moe-tiny.yaml is not in this checkout)"
fi
echo "results: $OUT/results.jsonl"
