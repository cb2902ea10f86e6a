#!/usr/bin/env bash
# One prepared GPU session (see docs/benchmarks.md): precision probe, the CUDA tests, the GPU table.
# Usage on a CUDA machine, from the repository root:  OUT=results-gpu bash benchmarks/gpu_session.sh
# Optional: PROF_W=lenet5,mlp784 PROF_N=64 adds torch.profiler tables (benchmarks/profile_step.py).
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-results-gpu}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== precision probe: relu units that flip between float32 and float64; the same with tanh"
[ -n "${PROBE_W-mlp784}" ] && timeout 120 $PY -m benchmarks.precision_probe --device cuda --workloads "${PROBE_W:-mlp784}" --n 16 --flips \
  --smooth ${PROBE_ARGS:-} 2>&1 | grep -v "Warning\|cls.__new__" | tee "$OUT/precision.txt"
echo "== CUDA tests"
timeout 180 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -n 25 | tee "$OUT/tests.txt"
echo "== benchmarks"
timeout "${BENCH_S:-300}" $PY -m benchmarks --quick --device cuda --n "${BENCH_N:-16,64}" --budget-s 1 \
  --workloads "${BENCH_W:-tiny_mlp,mlp784,lenet5,resnet8,transformer}" \
  --methods "${BENCH_M:-sequential,vmap,vmap_compiled,mbcompile,mbcompile_step}" --out "$OUT/bench" 2>&1 \
  | grep -v Warning | tail -n 60
if [ -n "${PROF_W-}" ]; then
  echo "== profiles (benchmarks.profile_step)"
  timeout "${PROF_S:-120}" $PY -m benchmarks.profile_step --device cuda --workloads "$PROF_W" --n "${PROF_N:-64}" \
    --methods "${PROF_M:-vmap_compiled,mbcompile_step}" --steps 3 --rows 22 2>&1 | grep -v "Warning\|cls.__new__\|USDT" \
    | tee "$OUT/profile.txt" | head -c 6000
fi
