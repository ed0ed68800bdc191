#!/usr/bin/env bash
# Builds .fi/ in the repo root: FlashInfer for E1's two FlashInfer baselines, for a GPU machine
# without network (Python 3.12, torch 2.11 CUDA 13, nvcc 13, H200). Run HERE, with network and
# nvcc (no GPU needed). Result (one folder, carried to the GPU machine as is):
#
#   .fi/site/               a PYTHONPATH tree: flashinfer 0.5.3 (python package; data/aot/ holds
#                           its decode (bf16 / fp8 KV), fa3 paged prefill, page and cascade modules
#                           for head_dim 128 built for sm_90a, data/csrc the templates FlashInfer
#                           renders before it loads them) and apache-tvm-ffi 0.1.15.post2 (cp312:
#                           the one dependency of `import flashinfer` missing there)
#   .fi/jit-headers.tar.xz  for a JIT fallback only (another head_dim / dtype): the FlashInfer,
#                           CUTLASS and curand headers these modules compile from; `tar -xJf
#                           .fi/jit-headers.tar.xz -C .fi` puts them in site/flashinfer/data/ and
#                           .fi/cuda_include/ (FLASHINFER_EXTRA_CUDAFLAGS="-isystem $PWD/.fi/cuda_include")
#   .fi/MANIFEST.txt        versions, sizes, modules
#
# Why 0.5.3: the newest FlashInfer that is one small wheel (7 MB; 0.7.x is 100 MB with a 389 MB
# csrc) and builds its kernels as tvm-ffi modules (no dependency on torch's C++ ABI).
#
# usage: bash workflow/scripts/flashinfer_bundle.sh   (env: CUDA_HOME, default /usr/local/cuda-13.0;
#        PYTHON, a Python with torch and pip, default the project venv; FI_BUILD, scratch dir;
#        MAX_JOBS, parallel compiles, default 2: about 8 minutes on 2 cores)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd -P)  # physical: the compiler reports resolved paths
export LC_ALL=C  # one sort order for comm
OUT=$ROOT/.fi
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || { echo "no Python with torch at PYTHON=$PYTHON (run make setup first)" >&2; exit 1; }
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
BUILD=${FI_BUILD:-/tmp/fi-bundle-build}
FI_VERSION=0.5.3
TVM_FFI_VERSION=0.1.15.post2
CURAND="nvidia-curand==10.4.*"  # CUDA 13 headers; the local toolkit ships none
MAX_MIB=34

[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc at CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
command -v ninja >/dev/null || { echo "ninja not on PATH" >&2; exit 1; }
rm -rf "$OUT" "$BUILD"
mkdir -p "$OUT/site" "$OUT/cuda_include" "$BUILD"/{wheels,local,curand,stub,tools}

dl() {  # dl DEST SPEC [pip download options...]
  local dest=$1 spec=$2; shift 2
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$dest" "$@" "$spec"
}
dl "$BUILD/wheels" "flashinfer-python==$FI_VERSION"
dl "$BUILD/wheels" "apache-tvm-ffi==$TVM_FFI_VERSION" --python-version 3.12 --platform manylinux_2_28_x86_64
# this machine's own tvm-ffi (another Python here), for the build and the local check only
LOCAL_PY=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
dl "$BUILD/local" "apache-tvm-ffi==$TVM_FFI_VERSION"
dl "$BUILD/curand" "$CURAND" --python-version 3.12 --platform manylinux_2_27_x86_64
CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
if [ ! -x "$CUOBJDUMP" ]; then  # the local toolkit has none; the oldest CUDA 13 one on PyPI
  dl "$BUILD/tools" "nvidia-cuda-cuobjdump==13.2.51"
  (cd "$BUILD/tools" && unzip -q -o nvidia_cuda_cuobjdump-*.whl)
  CUOBJDUMP=$BUILD/tools/nvidia/cu13/bin/cuobjdump && chmod +x "$CUOBJDUMP"
fi

# flashinfer and tvm-ffi for the GPU machine, unpacked (a wheel is a zip; these carry no scripts)
(cd "$OUT/site" && for w in "$BUILD"/wheels/*.whl; do unzip -q -o "$w"; done)
rm -f "$OUT"/site/build_backend.py "$OUT"/site/build_utils.py  # flashinfer's build hooks
mkdir -p "$BUILD/local/site"
(cd "$BUILD/local/site" && unzip -q -o "$BUILD"/local/apache_tvm_ffi-*cp"$LOCAL_PY"*.whl)
# pure-Python packages `import flashinfer` needs that the GPU machine has (not bundled)
"$PYTHON" -m pip install -q --no-deps --target "$BUILD/local/site" nvidia-ml-py einops tabulate click tqdm \
  requests packaging jinja2 filelock
(cd "$BUILD/curand" && unzip -q -o nvidia_curand-*.whl 'nvidia/cu13/include/curand*.h')
# CUTLASS's host utilities include curand_kernel.h; the build reads the headers from here
CURAND_INC=$BUILD/curand/nvidia/cu13/include

# The local toolkit has no libcuda.so stub for the modules' -lcuda: an empty library with the
# driver's soname (the symbols resolve against the real driver when the module loads).
echo "" | cc -shared -Wl,-soname,libcuda.so.1 -o "$BUILD/stub/libcuda.so" -x c -

# Ahead-of-time build for sm_90a; its tvm_ffi first on the path (this Python's ABI)
FI_PKG=$OUT/site/flashinfer
PYTHONPATH="$BUILD/local/site:$OUT/site" FLASHINFER_CUDA_ARCH_LIST=9.0a \
  FLASHINFER_WORKSPACE_BASE="$BUILD/ws" FLASHINFER_EXTRA_LDFLAGS="-L$BUILD/stub" \
  FLASHINFER_EXTRA_CUDAFLAGS="-isystem $CURAND_INC" MAX_JOBS=${MAX_JOBS:-2} \
  "$PYTHON" "$ROOT/workflow/scripts/flashinfer_aot.py" "$FI_PKG/data/aot" > "$BUILD/aot.log" 2>&1 \
  || { tail -40 "$BUILD/aot.log" >&2; exit 1; }
HEADERS=$(find "$BUILD/ws" -name headers.txt)

# Trim data/: keep the generators' templates and sources of these modules and every header the
# build read from data/ (enough to JIT other head dims / dtypes of these kernels on the GPU machine).
KEEP=$BUILD/keep.txt
{
  sed -n "s#^$FI_PKG/data/##p" "$HEADERS"
  (cd "$FI_PKG/data" && ls csrc/batch_decode.cu csrc/batch_decode_jit_binding.cu csrc/batch_decode_*.jinja \
    csrc/batch_prefill_sm90.cu csrc/batch_prefill_sm90_jit_binding.cu csrc/batch_prefill_sm90_customize_config.jinja \
    csrc/batch_prefill_*_sm90_kernel_inst.jinja csrc/page.cu csrc/flashinfer_page_binding.cu csrc/cascade.cu \
    csrc/flashinfer_cascade_binding.cu)
} | sort -u > "$KEEP"
(cd "$FI_PKG/data" && find csrc include cutlass spdlog -type f | sort > "$BUILD/all.txt")
(cd "$FI_PKG/data" && comm -23 "$BUILD/all.txt" "$KEEP" | xargs -r rm -f)
find "$FI_PKG/data" -depth -type d -empty -delete
# the curand headers the build read, for a JIT fallback on the GPU machine
grep "^$CURAND_INC/" "$HEADERS" | xargs -r -I{} cp {} "$OUT/cuda_include/"
find "$OUT/site" -name __pycache__ -prune -exec rm -rf {} +
# The headers (18 MB, mostly CUTLASS) serve only a JIT fallback: packed (1 MB). data/csrc stays:
# FlashInfer renders a module's sources from its templates before it looks for the AOT .so.
(cd "$OUT" && tar -cJf jit-headers.tar.xz site/flashinfer/data/cutlass site/flashinfer/data/include \
  cuda_include && rm -rf site/flashinfer/data/cutlass site/flashinfer/data/include cuda_include)

# Local check: flashinfer imports from the bundle alone (plus this Python's tvm_ffi and the
# packages the GPU machine has), both wrappers' plan requests only modules the bundle has, they
# load and export what the wrappers call, and they carry sm_90a code only.
PYTHONPATH="$BUILD/local/site:$OUT/site:$ROOT/src" FLASHINFER_WORKSPACE_BASE="$BUILD/ws-check" \
  "$PYTHON" "$ROOT/workflow/scripts/flashinfer_check.py" --local
for so in "$FI_PKG"/data/aot/*/*.so; do
  archs=$("$CUOBJDUMP" --list-elf "$so" | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')
  [ "$archs" = "sm_90a " ] || { echo "$so: ELF archs '$archs', want sm_90a only" >&2; exit 1; }
done

MIB=$(du -sm "$OUT" | cut -f1)
{
  echo "flashinfer-python $FI_VERSION, apache-tvm-ffi $TVM_FFI_VERSION (cp312), built $(date -u +%FT%TZ)"
  echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
  echo "size: $(du -sh "$OUT" | cut -f1)"
  echo "AOT modules (sm_90a):"
  for so in "$FI_PKG"/data/aot/*/*.so; do echo "  $(du -h "$so" | cut -f1)  $(basename "$so")"; done
  echo "data/csrc files kept: $(find "$FI_PKG/data/csrc" -type f | wc -l)"
  echo "jit-headers.tar.xz: $(du -h "$OUT/jit-headers.tar.xz" | cut -f1), $(tar -tJf "$OUT/jit-headers.tar.xz" | grep -vc '/$') files"
} > "$OUT/MANIFEST.txt"
cat "$OUT/MANIFEST.txt"
[ "$MIB" -le "$MAX_MIB" ] || { echo ".fi is $MIB MiB > $MAX_MIB MiB" >&2; exit 1; }
