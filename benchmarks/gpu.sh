#!/usr/bin/env bash
# The GPU benchmark session: everything measured on an accelerator, in one command.
#   bash benchmarks/gpu.sh [OUT_DIR]
# Uses the machine's own python3 with jax[cuda], flax, optax and torch already installed
# (nothing is installed here). Results: OUT_DIR/*.json and OUT_DIR/gpu.log.
#   1. attention parity on the device (pytest, when available): reference vs xla vs pallas;
#   2. one block, plain vs Re-attention, per implementation, N = 197 and 577, fp32 and bf16
#      (time, cost_analysis flops / bytes, peak memory, error vs the reference);
#   3. end to end against the official PyTorch model, eager and torch.compile'd, train and
#      inference img/s: the 224-px models at batch 128, DeepViT-L-384 at batch 32;
#   4. compile time and the GPU parity script.
set -uo pipefail
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
VS="python3 benchmarks/vs_pytorch.py --device cuda --steps 5 --repeats 3 --warmup 3"
{
  nvidia-smi -L
  python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"
  if python3 -c "import pytest" 2>/dev/null; then
    python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_attention_pallas.py
  fi
  for dt in bfloat16 float32; do
    python3 benchmarks/attention.py --impls reference xla pallas --batch 128 --dtype $dt \
      --out "$OUT/attention_gpu_$dt.json"
  done
  for dt in bfloat16 float32; do
    $VS --batch 128 --dtype $dt --models deepvit_16b vit_16b deepvit_s \
      --jax-impls reference xla pallas --out "$OUT/vs_pytorch_cuda_$dt.json"
    $VS --batch 32 --dtype $dt --models deepvit_l_384 --jax-impls xla pallas \
      --out "$OUT/vs_pytorch_cuda_${dt}_l384.json"
  done
  python3 benchmarks/compile_time.py --models deepvit_32b --out "$OUT/compile_time_cuda.json"
  if [ -f benchmarks/gpu_parity.py ]; then python3 benchmarks/gpu_parity.py --out "$OUT/gpu_parity.json"; fi
} 2>&1 | tee "$OUT/gpu.log"
