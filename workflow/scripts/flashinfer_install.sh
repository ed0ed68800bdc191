#!/usr/bin/env bash
# On the GPU machine: install the FlashInfer bundle this call carries (.fi/, from
# flashinfer_bundle.sh) outside the checkout, check it, and mark it for gpu_run.sh:
#
#   workflow/scripts/flashinfer_install.sh        # a call that carries .fi (and .whl once installed)
#
# Copies .fi/site to $FLASHINFER_HOME/site (default /tmp/flashinfer: later calls replace the
# checkout, not /tmp), unpacks the JIT headers into it (read only if a kernel module must be
# compiled there), runs flashinfer_check.py against the float64 reference, and writes
# $FLASHINFER_HOME/.ready when it passed (gpu_run.sh then puts FlashInfer on E1's path) and
# $FLASHINFER_HOME/.checked either way (what gpu_chain.sh's NEEDS waits for, so that a failed
# check lets E1 run without FlashInfer instead of waiting).
set -uo pipefail
cd "$(dirname "$0")/../.."
home=${FLASHINFER_HOME:-/tmp/flashinfer}
[ -d .fi/site ] || { echo "flashinfer_install: no .fi/site in this call (carry .fi)"; exit 2; }
rm -rf "$home" && mkdir -p "$home" && cp -a .fi/site "$home/site"
tar -xJf .fi/jit-headers.tar.xz -C "$home" || { echo "flashinfer_install: bad .fi/jit-headers.tar.xz"; exit 2; }
export PYTHONPATH=$home/site:/tmp/site:$PWD/src PYTHONUNBUFFERED=1
# a JIT fallback compiles with the unpacked headers (CUTLASS includes curand's)
export FLASHINFER_EXTRA_CUDAFLAGS="-isystem $home/cuda_include"
python3 workflow/scripts/flashinfer_check.py
status=$?
[ $status = 0 ] && touch "$home/.ready"
touch "$home/.checked"
echo "flashinfer_install: check exit $status; ready: $([ -e "$home/.ready" ] && echo yes || echo no)"
exit $status
