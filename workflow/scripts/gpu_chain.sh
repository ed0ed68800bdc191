#!/usr/bin/env bash
# Paper-scale experiments one after another in a background chain that outlives the command that
# started it, for machines that cut a command off sooner than the experiments take (the device
# tool's 10-minute calls; all paper-scale experiments take about 21 minutes on an H200):
#
#   workflow/scripts/gpu_chain.sh e6_commit e3_hash     # first call: starts the chain, then waits
#   workflow/scripts/gpu_chain.sh e6_commit e3_hash     # later calls: wait for the next result
#
# Each call waits up to WAIT seconds (default 560) for the next experiment that finished and was
# not yet handed back, copies its results.tar.gz and log into $OUT and returns; otherwise it
# prints where the chain is. Every experiment runs through gpu_run.sh (one at a time: timings
# never share the GPU). The chain lives in CHAIN_STATE (default /tmp/gpu_chain) of this machine:
# a fresh machine starts it again.
#
# A step "A+B" runs A and B side by side and waits for both before the next step: for experiments
# that time nothing (E4 stability, E2's on-device compile, the GPU tests as "tests", which runs
# gpu_run.sh tests on the files in TESTS, default all, cut off after TESTS_LIMIT seconds, default
# 600), so that they do not add their times; timed experiments each get a step of their own.
#
# NEEDS (read when the chain starts) names files that later calls bring (gpu_stage.sh), as
# "EXPERIMENT=PATH ..." (relative paths: the checkout's; models/ is shared with the chain's copy):
# the chain waits before EXPERIMENT until PATH exists, at most NEEDS_WAIT
# seconds (default 900), then runs it either way (the log says which), so that the experiments
# that need nothing staged run while the parts travel:
#
#   NEEDS="e4_recompute=models/SmolLM2-135M-Instruct.Q4_1.gguf" workflow/scripts/gpu_chain.sh \
#     e5_accuracy e4_recompute
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: $0 EXPERIMENT..."; exit 2; }
state=${CHAIN_STATE:-/tmp/gpu_chain}
mkdir -p "$state"
if [ ! -e "$state/started" ]; then
  date +%s > "$state/started"
  # The chain runs in its own copy of the checkout: each device call rewrites the checkout's files,
  # and an experiment that imported a module while one was half-written failed ("@jit functions
  # should be defined in a Python file"); the copy also keeps the code one commit for the whole
  # chain. Staged inputs (models/), the wheels and later calls' results stay the checkout's.
  rm -rf "$state/tree" && mkdir -p "$state/tree"
  tar -C . --exclude=./results --exclude=./models --exclude=./.stage --exclude=./.whl --exclude=./.fi \
    --exclude=./.git --exclude=./.venv -cf - . | tar -C "$state/tree" -xf - || { echo "copying the checkout failed"; exit 1; }
  mkdir -p models
  ln -s "$PWD/models" "$state/tree/models"
  [ -e .whl ] && ln -s "$PWD/.whl" "$state/tree/.whl"
  echo "$state/tree" > "$state/cwd"
  for exp in "$@"; do echo "$exp"; done > "$state/experiments"
  (cd "$state/tree" && exec setsid nohup bash -c '
    state=$1; shift
    for step in "$@"; do
      for exp in ${step//+/ }; do
        for need in $NEEDS; do
          [ "${need%%=*}" = "$exp" ] || continue
          t=0
          while [ ! -e "${need#*=}" ] && [ $t -lt "${NEEDS_WAIT:-900}" ]; do sleep 2; t=$((t + 2)); done
          [ -e "${need#*=}" ] && echo "$exp: ${need#*=} came after $t s" >> "$state/needs.log" \
            || echo "$exp: ${need#*=} missing after $t s; running without it" >> "$state/needs.log"
        done
      done
      for exp in ${step//+/ }; do
        mkdir -p "$state/out_$exp"
        if [ "$exp" = tests ]; then
          run=(timeout "${TESTS_LIMIT:-600}" workflow/scripts/gpu_run.sh tests $TESTS)
        else
          run=(workflow/scripts/gpu_run.sh "$exp")
        fi
        (OUT="$state/out_$exp" "${run[@]}" > "$state/$exp.log" 2>&1; echo $? > "$state/$exp.rc") &
      done
      wait
    done' chain "$state" "$@") > /dev/null 2>&1 < /dev/null &
elif [ "$(cat "$state/experiments")" != "$(printf '%s\n' "$@")" ]; then
  echo "a chain of other experiments runs here: $(tr '\n' ' ' < "$state/experiments")"; exit 2
fi
started=$(cat "$state/started")
t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt "${WAIT:-560}" ]; do
  for exp in ${*//+/ }; do
    if [ -e "$state/$exp.rc" ] && [ ! -e "$state/$exp.delivered" ]; then
      mkdir -p "${OUT:-.}/$exp"
      cp "$state/out_$exp"/* "$state/$exp.log" "${OUT:-.}/$exp/" 2>/dev/null
      touch "$state/$exp.delivered"
      echo "== $exp: exit $(cat "$state/$exp.rc") at +$(( $(date +%s) - started )) s"
      tail -25 "$state/$exp.log"
      exit 0
    fi
  done
  all=1
  for exp in ${*//+/ }; do [ -e "$state/$exp.delivered" ] || all=0; done
  [ $all = 1 ] && { echo "every experiment of the chain was handed back"; exit 0; }
  sleep 3
done
echo "== still running at +$(( $(date +%s) - started )) s"
cat "$state/needs.log" 2>/dev/null
tail -n 4 "$(cat "$state/cwd")"/results/logs/*.paper.log 2>/dev/null
exit 0
