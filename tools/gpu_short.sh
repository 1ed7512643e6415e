#!/usr/bin/env bash
# Issue 22 on one GPU: sweep this GPU's tiles into tiles.json, run the GPU tests of the fast paths, then bench.py's
# short and long contexts, full attention against LongGen sink_window in each run. Every step writes its own files
# under $OUT as it goes (bench.py rewrites its JSON after each row), and a step that fails or runs out of time does not
# stop the next. Steps stop when BUDGET_S (default 470 s) has passed since the start.
#
#   bash tools/gpu_short.sh         sweep, tests, 4K batch 1 and 8, 256/1K/2K batch 1, 32K/128K batch 1, 1K/2K batch 8
#   bash tools/gpu_short.sh rest    256/1K/2K batch 1, 32K/128K batch 1, 1K/2K batch 8: what a first call had no time
#                                   for (copy its $OUT/tiles.json into the working tree first: the sweep's table)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
BUDGET_S=${BUDGET_S:-470}
PY=${PY:-python}
mkdir -p "$OUT"
start=$(date +%s)
log="$OUT/gpu_short.log"

step() {  # step NAME CAP_S COMMAND...: run with the smaller of CAP_S and the time left
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - start)))
  if ((left < 20)); then
    echo "== $name: skipped, out of time" | tee -a "$log"
    return
  fi
  ((cap > left)) && cap=$left
  echo "== $name (up to ${cap}s): $*" | tee -a "$log"
  timeout -k 10 "$cap" "$@" >>"$log" 2>&1
  echo "== $name: exit $? after $(($(date +%s) - start))s in all" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1
$PY -c "import torch, triton, bench; from benchmarks import bench_tiles; print('torch', torch.__version__, 'triton', triton.__version__)" \
  >>"$log" 2>&1 || echo "== imports failed: see above" | tee -a "$log"
B="$PY bench.py --parts inference --variant sink_window"
if [[ "${1:-all}" != rest ]]; then
  step sweep 110 $PY -m benchmarks.bench_tiles --budget-s 25 --json "$OUT/tiles_sweep.json"
  cp decoding/tiles.json "$OUT/tiles.json" 2>/dev/null
  step tests 150 $PY -m pytest -q tests/test_cache.py tests/test_kernels.py tests/test_model.py \
    -k "gpu or cuda or swept or compiled_decoding"
  step bench-4k 170 $B --lengths 4k --batch 1,8 --json "$OUT/h200_short.json"
fi
step bench-256-2k 200 $B --lengths 256,1k,2k --batch 1 --json "$OUT/h200_256_2k.json"
step bench-32k-128k 200 $B --lengths 32k,128k --batch 1 --json "$OUT/h200_32k_128k.json"
step bench-1k-2k-b8 150 $B --lengths 1k,2k --batch 8 --json "$OUT/h200_1k_2k_b8.json"
echo "done after $(($(date +%s) - start))s" | tee -a "$log"
