#!/usr/bin/env bash
# The GPU check, in one command on a machine with an NVIDIA GPU, CuPy and PyTorch CUDA:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# 1. the whole suite with NPFLUX_BACKEND=cupy (CuPy the default backend, and every
#    backend-parametrised test on both backends); 2. the training-step benchmark on the
#    GPU (npflux on CuPy vs PyTorch eager CUDA, each in its own process), with the
#    kernels and CUDA runtime calls of one step counted through CUPTI.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-12}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
xdist=""
python3 -c "import xdist" 2>/dev/null && xdist="-n $WORKERS"
echo "== suite, NPFLUX_BACKEND=cupy ($xdist)"
NPFLUX_BACKEND=cupy timeout "${SUITE_TIMEOUT:-300}" python3 -m pytest -q -rs -p no:cacheprovider $xdist \
  --junitxml="$OUT/junit_cupy.xml" ${PYTEST_ARGS:-} > "$OUT/suite_cupy.log" 2>&1
echo "suite exit $?"
grep -E "^(FAILED|ERROR)" "$OUT/suite_cupy.log" | cut -c1-220 | head -80
tail -3 "$OUT/suite_cupy.log"
if [ "${BENCH:-1}" = 1 ]; then
  echo "== train step on the GPU"
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_train_step.py --device cuda \
    --presets shakespeare-s2 shakespeare-n --rounds "${ROUNDS:-2}" --profile \
    --out "$OUT/train_step_cuda.json" > "$OUT/bench_cuda.log" 2>&1
  echo "bench exit $?"
  tail -25 "$OUT/bench_cuda.log"
fi
