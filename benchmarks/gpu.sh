#!/usr/bin/env bash
# What this project checks and measures on a CUDA GPU, in one invocation per part:
#
#   bash benchmarks/gpu.sh kernels   # Triton flash attention compiled and checked (forward and
#                                    # gradients) against the float32 reference; attention vs
#                                    # cuDNN and XLA; the MoE layer (ragged_dot vs capacity vs dense)
#   bash benchmarks/gpu.sh tune      # our kernel's block sizes, warps and stages at length 4096
#   bash benchmarks/gpu.sh train     # the train step of a ~0.9B Llama, bf16: flash and cuDNN
#                                    # attention, fp8 matmuls, against torch.compile (each
#                                    # framework in a process of its own)
#   bash benchmarks/gpu.sh fp8       # 300 steps of the tiny recipe on stdlib text, fp8 vs bf16
#   bash benchmarks/gpu.sh serve     # the serving engine against vLLM, if vLLM is installed
#   bash benchmarks/gpu.sh tune train   # several parts, in order
#
# Each benchmark appends its table, with the exact command and the device, to BENCHMARKS.md.
# Needs jax with CUDA (and torch + transformers for the train peers). PYTHON picks the
# interpreter (default python3). A part that fails is reported and the next one still runs;
# the exit status is non-zero if any failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
failed=()
step() {  # step SECONDS NAME COMMAND...: run with a time limit, remember failures
  local limit=$1 name=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" || failed+=("$name (exit $?)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" || exit 1

for part in "${@:-kernels}"; do
case "$part" in
  kernels)
    step 240 "flash attention tests" $PY -m pytest -q -p no:cacheprovider \
      tests/test_flash_attention.py -k on_device
    step 120 "cudnn attention entry" $PY -m pytest -q -p no:cacheprovider \
      tests/test_attention_ops.py -k cudnn
    step 240 "attention benchmark" $PY benchmarks/attention.py --lengths 1024,2048,4096,8192,16384
    step 120 "moe benchmark" $PY benchmarks/moe_layer.py --tokens 16384 --d_model 2048 \
      --d_ff 5632 --experts 8 --top_k 2 --dtype bfloat16 --steps 20
    ;;
  tune)
    step 300 "flash launch options" $PY benchmarks/attention.py --sweep 4096 --repeats 5
    ;;
  train)
    model=(--d_model 2048 --n_layers 16 --n_heads 16 --n_kv_heads 8 --d_ff 5632 --vocab 32000
           --seq_len 2048 --batch 4 --dtype bfloat16 --remat none --steps 10 --rounds 3)
    # torch.compile runs first in a process of its own, then ours with the whole GPU. (The
    # "xla" attention materialises [B, H, T, T] fp32 scores per layer: at this size it does
    # not fit in 80 GB, so on a GPU train with "flash" or "cudnn".)
    step 420 "train step, flash attention, vs torch.compile" \
      $PY benchmarks/train_throughput.py "${model[@]}" --attention flash --peers torch_compile \
      --separate_processes
    step 240 "train step, cudnn attention" \
      $PY benchmarks/train_throughput.py "${model[@]}" --attention cudnn --peers ''
    step 240 "train step, cudnn attention, fp8 matmuls" \
      $PY benchmarks/train_throughput.py "${model[@]}" --attention cudnn --peers '' \
      --quantization fp8
    ;;
  fp8)  # loss after a fixed number of steps, fp8 vs bf16 (the corpus: this Python's stdlib)
    for q in none fp8; do
      step 300 "tiny recipe, 300 steps, quantization $q" $PY -m llm.train \
        --config=configs/tiny.py --workdir="/tmp/fp8_$q" --config.data.source=stdlib \
        --config.model.dtype=bfloat16 --config.train.quantization=$q \
        --config.train.steps=300 --config.train.eval_every=300
    done
    ;;
  serve)  # vLLM is not in the lent machines' image, and its wheels are too big to carry
    if $PY -c "import vllm" 2>/dev/null; then
      step 420 "engine vs vLLM" $PY benchmarks/serve.py
    else
      echo "=== serve: skipped (no vllm in this Python)"
    fi
    ;;
  *) echo "usage: bash benchmarks/gpu.sh [kernels|tune|train|fp8|serve]..." >&2; exit 2 ;;
esac
done

if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
