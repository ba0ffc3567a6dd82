#!/usr/bin/env bash
# The prepared GPU check of issue 15 (κ on CUDA), for a session that has a CUDA machine.
# Runs in under 10 minutes on one GPU; CI stays CPU-only.
#
#   1. the CUDA tests of the κ methods (tests/test_kappa*.py -k cuda): they skip without CUDA;
#   2. the CUDA row of the scan benchmark (benchmarks/scan_speed_cuda.py: TinyLlama-1.1B shapes
#      built on the GPU; reference fp32 SVD, PEFT's svdvals, kappatune certified and dense, the
#      floor, all on the same GPU; κ errors vs a float64 CPU SVD).
#
# Needs python with a CUDA torch, numpy, transformers, threadpoolctl, xxhash and pytest (no
# network: nothing is installed). Results go to $OUT (the device tool's folder) when set, else
# to benchmarks/results/scan_speed_cuda/.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/scan_speed_cuda}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "date: $(date -u)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  python -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'numpy', numpy.__version__)"
  python -c "import transformers, threadpoolctl, xxhash; print('transformers', transformers.__version__)" 2>&1 | tail -1
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

status=0
timeout 240 python -m pytest tests/test_kappa.py tests/test_kappa_paths.py -k cuda -q -rs -p no:cacheprovider \
  > "$OUT_DIR/pytest_cuda.txt" 2>&1 || status=1
tail -5 "$OUT_DIR/pytest_cuda.txt"

timeout 300 python benchmarks/scan_speed_cuda.py --layers 2 --repeats 3 --out "$OUT_DIR" \
  > "$OUT_DIR/scan_speed_cuda.txt" 2>&1 || status=1
tail -15 "$OUT_DIR/scan_speed_cuda.txt"
exit $status
