#!/usr/bin/env bash
# One prepared GPU session (see docs/benchmarks.md), in two parts that fit a short lease:
#   PART=check  the CUDA tests, then the zoo on CUDA (eager speed + each model against itself alone, float64)
#   PART=bench  the GPU table: each workload in its own process under its own time limit
# Usage on a CUDA machine, from the repository root:  OUT=results-gpu PART=check bash benchmarks/gpu_session.sh
# Knobs: BENCH_N, BENCH_W, BENCH_M, BENCH_S (seconds per workload), N64_W (workloads also run at n=64),
# ZOO_N, ZOO_S, PROBE_W (precision probe workloads, off by default), PROF_W/PROF_N (torch.profiler tables).
# Everything lands in at most four files under $OUT: tests.txt, zoo.txt, bench.md, bench.log.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-results-gpu}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
PART="${PART:-check}"
nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
quiet() { grep -v "Warning\|warn(\|cls.__new__\|USDT"; }

if [ "$PART" = check ]; then
  echo "== CUDA tests"
  timeout "${TEST_S:-170}" $PY -m pytest tests/test_cuda.py tests/test_cudagraph.py -q -p no:cacheprovider \
    -n "${TEST_J:-4}" --durations=8 2>&1 | tail -n 40 | tee "$OUT/tests.txt"
  echo "== zoo on CUDA: sequential vs the normal loop at n=${ZOO_N:-16}; float64 against each model alone (n=4)"
  timeout "${ZOO_S:-150}" $PY -m benchmarks.zoo --device cuda --n "${ZOO_N:-16}" --rounds 2 --steps 4 --check 4 \
    ${ZOO_M:+--models $ZOO_M} 2>&1 | quiet | tee "$OUT/zoo.txt"
  if [ -n "${PROBE_W-}" ]; then
    echo "== precision probe"
    timeout 120 $PY -m benchmarks.precision_probe --device cuda --workloads "$PROBE_W" --n 16 --flips --smooth 2>&1 \
      | quiet | tee -a "$OUT/zoo.txt"
  fi
fi

if [ "$PART" = bench ]; then
  echo "== benchmarks, one process per workload (a compile that runs long loses only its own rows)"
  : > "$OUT/bench.md"
  run_w() {  # workload n methods
    d="/tmp/bench_$1_$2"
    timeout "${BENCH_S:-75}" $PY -m benchmarks --quick --device cuda --n "$2" --budget-s 1 --workloads "$1" \
      --methods "$3" --out "$d" 2>&1 | quiet | tail -n 12 >> "$OUT/bench.log"
    if [ -f "$d/results.md" ]; then cat "$d/results.md" >> "$OUT/bench.md"; else echo "$1 n=$2: no results (time limit)" | tee -a "$OUT/bench.md"; fi
  }
  for w in ${BENCH_W:-tiny_mlp mlp784 lenet5 resnet8 char_lstm transformer tiny_bert}; do
    run_w "$w" "${BENCH_N:-16}" "${BENCH_M:-sequential,vmap_compiled,mbcompile,mbcompile_step}"
    echo "$w done at $(date +%T)"
  done
  for w in ${N64_W:-lenet5 resnet8}; do
    run_w "$w" 64 "${N64_M:-sequential,mbcompile,mbcompile_step}"
    echo "$w n=64 done at $(date +%T)"
  done
  grep -E "^\| [a-z_0-9]+ \| [0-9]+ \|" "$OUT/bench.md" | cut -c1-150
fi

if [ -n "${PROF_W-}" ]; then
  echo "== profiles (benchmarks.profile_step)"
  timeout "${PROF_S:-120}" $PY -m benchmarks.profile_step --device cuda --workloads "$PROF_W" --n "${PROF_N:-64}" \
    --methods "${PROF_M:-vmap_compiled,mbcompile_step}" --steps 3 --rows 22 2>&1 | quiet \
    | tee "$OUT/profile.txt" | head -c 6000
fi
