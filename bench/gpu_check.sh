#!/usr/bin/env bash
# The prepared device check for a session that is lent a GPU: one call of about 8 minutes,
#   run(command="bash bench/gpu_check.sh", timeout_s=600)
# It does the open GPU items of the ClusterKV and FreeKV issues, each step time-boxed so that
# one hanging or aborting step does not cost the others:
#   1. pallas.log: every Pallas kernel compiled for the GPU against its reference (the test
#      suite allows the kernels that refuse GPUs until verified). If the K-means and
#      bfloat16 score kernels pass, remove their `refuse_unverified_gpu` calls.
#   2. freekv_offload.log: FreeKV's host offload and streamed recall (first GPU compile).
#   3. clusterkv_offload.log: ClusterKV's host recall (one configuration aborted the XLA GPU
#      compiler on 2026-11-23), in its own process because an abort ends the process.
#   4. freekv-gpu.json: bench/freekv.py (speculative vs synchronous offload vs on device).
# A second call, if the session has device time left (about 5 minutes),
#   run(command="bash bench/gpu_check.sh speed", timeout_s=600)
# runs only:
#   5. page_scores-gpu.json, prefix_sum-gpu.json: both forms of the two backend-specific
#      choices (kvjax.compat.prefix_sums_as_scan, pallas_kernels.compat.page_bounds_as_matmuls:
#      CPU forms chosen by measurement, GPU forms by operation counts) timed on the GPU.
#   6. method_speed-gpu.json: decode ms/token of Full, Quest, ClusterKV and FreeKV at 32k on
#      the Llama-3-8B shape in bfloat16, the settings of the 2026-11-23 H100 run
#      (bench/results/method_speed-llama3-8b-gpu-2026-11-23.json: ClusterKV 0.95x of Full,
#      Quest 1.30x), now with the decode steps free of per-layer conditionals (2026-12-07).
#      That run's KV cache was float32 by a bench bug since fixed: compare ratios to Full.
# Everything lands in $OUT (the device tool's folder; bench/results/gpu-check by hand).
# CONTEXTS overrides bench/freekv.py's contexts (default 8192 16384 32768); SPEED_CONTEXTS is
# step 6's context (default 32768) and SPEED_SHAPE the model shape of steps 5 and 6 (default
# llama3-8b); a CPU dry run: SPEED_CONTEXTS=1024 SPEED_SHAPE=smollm2.
set -u
OUT=${OUT:-bench/results/gpu-check}
PY=${PYTHON:-python3}
CONTEXTS=${CONTEXTS:-8192 16384 32768}
SPEED_CONTEXTS=${SPEED_CONTEXTS:-32768}
SPEED_SHAPE=${SPEED_SHAPE:-llama3-8b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, report the exit status
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s ($(tail -n 1 "$OUT/$name.log"))"
}

{ nvidia-smi -L; $PY -c "import jax, sys; print(sys.version); print(jax.__version__, jax.devices())"; } \
  >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "${1:-}" = speed ]; then
  step page_scores 50 $PY -m bench.page_scores --shape "$SPEED_SHAPE" --output "$OUT/page_scores-gpu.json"
  step prefix_sum 50 $PY -m bench.prefix_sum --output "$OUT/prefix_sum-gpu.json"
  # shellcheck disable=SC2086  # SPEED_CONTEXTS is a list of numbers
  step method_speed 460 $PY -m bench.method_speed --shape "$SPEED_SHAPE" --dtype bfloat16 \
    --contexts $SPEED_CONTEXTS --steps 32 --repeats 2 --prefill-lengths \
    --methods full quest clusterkv_xla freekv --output "$OUT/method_speed-gpu.json"
  exit 0
fi
step pallas 150 $PY -m pytest -q -p no:cacheprovider tests/pallas_kernels
step freekv_offload 120 $PY -m pytest -q -p no:cacheprovider tests/kvjax/test_freekv.py -k "offload or stream"
step clusterkv_offload 120 $PY -m pytest -q -p no:cacheprovider tests/kvjax/test_clusterkv_offload.py
# shellcheck disable=SC2086  # CONTEXTS is a list of numbers
step freekv_bench 150 $PY -m bench.freekv --contexts $CONTEXTS --repeats 3 --output "$OUT/freekv-gpu.json"
