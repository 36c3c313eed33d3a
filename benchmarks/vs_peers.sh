#!/usr/bin/env bash
# maxmodel vs MaxText 0.2.5 vs Hugging Face LlamaForCausalLM + torch.compile on this CPU, same ~50M
# LLaMA-style model (configs/experiments/bench-50m.yaml), in float32 and in bf16 mixed precision (float32
# parameters and optimizer, bf16 compute: maxmodel train.dtype=bfloat16, MaxText dtype=bfloat16, torch under
# torch.autocast("cpu", torch.bfloat16)), interleaved: per round, per dtype, A B C. Medians and ratios per
# dtype, MFU against the large-matmul peak of that dtype measured by each maxmodel run (same machine, same load).
#
#   benchmarks/vs_peers.sh [ROUNDS] [STEPS]   (defaults 2 rounds, 8 steps of which WARMUP=3 are warm-up)
#
# Environment: PY (the repository's python, default /work/main/.venv/bin/python or .venv/bin/python),
# MAXTEXT_VENV (a venv with `pip install "maxtext[tpu]==0.2.5"`, Python 3.12), TORCH_VENV (a venv with
# torch==2.13.0 and transformers), DTYPES (default "float32 bfloat16"), OUT (where logs and results go;
# default a new temporary folder), PEER_ALLOCATOR (default "system": the peers run with glibc's malloc;
# "mimalloc": under the allocator maxmodel's own CPU runs use, maxmodel/host_allocator.py). A peer whose venv
# is missing is reported as skipped; the others still run.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-2}
STEPS=${2:-8}
WARMUP=${WARMUP:-3}
DTYPES=${DTYPES:-float32 bfloat16}
PY=${PY:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo /work/main/.venv/bin/python )}
MAXTEXT_VENV=${MAXTEXT_VENV:-/tmp/venvs/maxtext}
TORCH_VENV=${TORCH_VENV:-/tmp/venvs/torch}
OUT=${OUT:-$(mktemp -d /tmp/vs_peers.XXXXXX)}
PEER_ALLOCATOR=${PEER_ALLOCATOR:-system}
mkdir -p "$OUT"
echo "results in $OUT; peers' allocator: $PEER_ALLOCATOR; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
PEER_ENV=()
if [ "$PEER_ALLOCATOR" = mimalloc ]; then
  mapfile -t PEER_ENV < <("$PY" -c "from maxmodel import host_allocator as h
print('LD_PRELOAD=' + h.mimalloc_library())
for k, v in h.MIMALLOC_ENV.items(): print(f'{k}={v}')")
fi

run_maxmodel() {  # $1 round, $2 dtype
  PYTHONPATH="$REPO" JAX_PLATFORMS=cpu "$PY" -m maxmodel.cli bench "$REPO/configs/experiments/bench-50m.yaml" \
    train.dtype="$2" --steps $((STEPS - WARMUP)) --warmup $WARMUP --results "$OUT/maxmodel.jsonl" \
    --label vs_peers > "$OUT/maxmodel.$2.$1.log" 2>&1 || echo "maxmodel run $1 $2 failed: see $OUT/maxmodel.$2.$1.log"
}

run_maxtext() {
  local py="$MAXTEXT_VENV/bin/python"
  if [ ! -x "$py" ] || ! "$py" -c "import maxtext" 2>/dev/null; then
    echo '{"peer": "maxtext", "dtype": "'"$2"'", "skipped": "no maxtext in '"$MAXTEXT_VENV"'"}' >> "$OUT/maxtext.jsonl"
    return
  fi
  local base
  base=$("$py" -c "import maxtext, os; print(os.path.dirname(maxtext.__file__))")/configs/base.yml
  (cd "$OUT" && env "${PEER_ENV[@]}" JAX_PLATFORMS=cpu DECOUPLE_GCLOUD=TRUE "$py" -m maxtext.trainers.pre_train.train "$base" \
    run_name="vs_peers_$2_$1" base_output_directory="$OUT/maxtext_out" dataset_type=synthetic steps="$STEPS" \
    per_device_batch_size=8 max_target_length=512 base_emb_dim=512 base_num_decoder_layers=4 base_mlp_dim=2048 \
    base_num_query_heads=8 base_num_kv_heads=8 head_dim=64 vocab_size=32768 enable_checkpointing=false \
    attention=dot_product hardware=cpu skip_jax_distributed_system=true enable_tensorboard=false \
    dtype="$2" weight_dtype=float32 remat_policy=minimal) > "$OUT/maxtext.$2.$1.log" 2>&1
  "$PY" "$REPO/benchmarks/peers/maxtext_log.py" $WARMUP "$2" < "$OUT/maxtext.$2.$1.log" >> "$OUT/maxtext.jsonl"
}

run_torch() {
  local py="$TORCH_VENV/bin/python"
  if [ ! -x "$py" ] || ! "$py" -c "import torch, transformers" 2>/dev/null; then
    echo '{"peer": "hf_torch_compile", "dtype": "'"$2"'", "skipped": "no torch/transformers in '"$TORCH_VENV"'"}' \
      >> "$OUT/torch.jsonl"
    return
  fi
  env "${PEER_ENV[@]}" OMP_NUM_THREADS=2 "$py" "$REPO/benchmarks/peers/hf_llama.py" --steps $((STEPS - WARMUP)) --warmup $WARMUP \
    --threads 2 --dtype "$2" > "$OUT/torch.$2.$1.log" 2>&1
  tail -n 1 "$OUT/torch.$2.$1.log" | grep '^{' >> "$OUT/torch.jsonl" \
    || echo '{"peer": "hf_torch_compile", "dtype": "'"$2"'", "error": "see '"$OUT/torch.$2.$1.log"'"}' >> "$OUT/torch.jsonl"
}

for r in $(seq 1 "$ROUNDS"); do
  for dt in $DTYPES; do
    echo "round $r, $dt: maxmodel";  run_maxmodel "$r" "$dt"
    echo "round $r, $dt: maxtext";   run_maxtext "$r" "$dt"
    echo "round $r, $dt: torch";     run_torch "$r" "$dt"
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" "$REPO/benchmarks/peers/summarise.py" "$OUT"
