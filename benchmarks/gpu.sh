#!/usr/bin/env bash
# The GPU benchmark session: everything measured on an accelerator, in one command.
#   bash benchmarks/gpu.sh [OUT_DIR]
# Uses the machine's own python3 with jax[cuda], flax, optax and torch already installed
# (nothing is installed here). Results: OUT_DIR/*.json and OUT_DIR/gpu.log.
set -uo pipefail
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
{
  nvidia-smi -L
  python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"
  python3 benchmarks/vs_pytorch.py --device cuda --batch 128 --dtype float32 --steps 10 --warmup 3 --out "$OUT/vs_pytorch_cuda_float32.json"
  python3 benchmarks/vs_pytorch.py --device cuda --batch 128 --dtype bfloat16 --steps 10 --warmup 3 --out "$OUT/vs_pytorch_cuda_bfloat16.json"
  python3 benchmarks/compile_time.py --models deepvit_32b --out "$OUT/compile_time_cuda.json"
  if [ -f benchmarks/gpu_parity.py ]; then python3 benchmarks/gpu_parity.py --out "$OUT/gpu_parity.json"; fi
} 2>&1 | tee "$OUT/gpu.log"
