#!/usr/bin/env bash
# Run the GPU part of the pipeline on a machine without network (the H200 of the device tool):
#
#   workflow/scripts/gpu_run.sh tests               # GPU tests (pytest -m gpu)
#   workflow/scripts/gpu_run.sh e1_throughput ...   # paper-scale experiments through Snakemake
#
# Needs .whl/ from workflow/scripts/gpu_bundle.sh beside the checkout. FIELDPRINT_GIT_COMMIT and
# FIELDPRINT_GIT_DIRTY name the commit when the checkout has no .git. Results, logs and manifests
# are packed into $OUT/results.tar.gz (when $OUT is set) so that they come back in one file.
set -uo pipefail
cd "$(dirname "$0")/../.."
# A warm machine keeps /tmp/site between calls: reinstall only when the carried wheel set changed.
# The lock: runs that gpu_chain.sh starts side by side install once, not over each other.
stamp=$(ls .whl | sha256sum | cut -c1-16)
exec 9> /tmp/gpu_run.install.lock && flock 9
if [ "$(cat /tmp/site/.installed 2>/dev/null)" != "$stamp" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && echo "$stamp" > /tmp/site/.installed || { echo "wheel install failed"; exit 1; }
fi
flock -u 9
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# E1's FlashInfer baselines: flashinfer_install.sh marks a bundle it installed and checked ready;
# without one their E1 rows say FlashInfer is not importable.
fi_home=${FLASHINFER_HOME:-/tmp/flashinfer}
if [ -e "$fi_home/.ready" ]; then
  export PYTHONPATH=$fi_home/site:$PYTHONPATH FLASHINFER_EXTRA_CUDAFLAGS="-isystem $fi_home/cuda_include"
  echo "FlashInfer from $fi_home/site"
fi
# The rules call `python`; the GPU image has only python3.
command -v python >/dev/null || { mkdir -p /tmp/site/bin && ln -sf "$(command -v python3)" /tmp/site/bin/python; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'

status=0
if [ "${1:-}" = tests ]; then
  shift
  python3 -m pytest -q -m gpu -p no:cacheprovider "${@:-tests}" 2>&1 | tee /tmp/gpu_tests.log || status=1
  [ -n "${OUT:-}" ] && cp /tmp/gpu_tests.log "$OUT/"
  exit $status
fi

targets=()
for exp in "$@"; do
  case "$exp" in
    e5_accuracy) targets+=("results/paper/e5_train/e5_train.csv" "results/paper/e5_accuracy/e5_accuracy.csv") ;;
    *) targets+=("results/paper/$exp/$exp.csv") ;;
  esac
done
python3 -m snakemake --cores all --config scale=paper gpu=True --keep-going "${targets[@]}" 2>&1 | tail -40 || status=1
for log in results/logs/*.log; do [ -e "$log" ] && { echo "== $log"; tail -15 "$log"; }; done
if [ -n "${OUT:-}" ]; then
  # Checkpoints travel split in parts (the transfer takes files of at most 16 MB).
  tar czf "$OUT/results.tar.gz" --exclude='*.pt' results
  for pt in results/paper/*/*.pt; do [ -e "$pt" ] && split -b 15M "$pt" "$OUT/$(basename "$pt")."; done
  ls -la "$OUT"
fi
exit $status
