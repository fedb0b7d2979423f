#!/usr/bin/env bash
# The runs that measure the open targets (issues 19, 20, 23) in one go on one GPU machine, in the
# background like bench/full.sh (a command there is cut at 10 minutes):
#   setsid nohup bash bench/targets.sh /tmp/targets-out > /tmp/targets.log 2>&1 < /dev/null &
#   until [ -f /tmp/targets-out/done ]; do sleep 5; done   # in each later call, for up to 9 minutes
# Stages, each a bench/device.sh run with its results in its own folder (about 17 minutes in all):
#   background: the true-size models built (SDXL, Wan, the LLM), then a worker with an empty
#               compile cache (READY_AFTER=first): ready time, jobs during the background
#               compile, time to compiled serving; it leaves every package in the cache;
#   cached:     a fresh worker with every package present: ready, then every family;
#   cold:       the same with the models' and packages' files dropped from the page cache;
#   prompt:     the LLM's 256 tokens against plain generate, and the weighted SDXL job against
#               the unweighted one, 10 runs each on the compiled UNet (its package from above).
set -euo pipefail
out=${1:-/tmp/targets-out}
models=/tmp/bm
mkdir -p "$out"
rm -f "$out/done"
stage() { echo "== $(date +%T) $1"; }
stage background
bash bench/device.sh --models $models --out "$out/bg" --phases build,background --build sdxl,wan,prompt \
  --jobs sdxl_high_1 --worker-env WORKER_MODELS=sdxl,wan
stage cached
bash bench/device.sh --models $models --out "$out/cached" --phases cached \
  --cached-jobs sdxl_high_1,video_turbo --repeats 3 --worker-env WORKER_MODELS=sdxl,wan
stage cold
bash bench/device.sh --models $models --out "$out/cold" --phases cold \
  --cached-jobs sdxl_high_1 --repeats 1 --worker-env WORKER_MODELS=sdxl,wan
stage prompt
bash bench/device.sh --models $models --out "$out/prompt" --phases cached \
  --cached-jobs enhance_256,sdxl_high_1,sdxl_high_1_weighted --repeats 10 --worker-env WORKER_MODELS=sdxl,prompt
stage done
touch "$out/done"
