"""Ahead-of-time build of the FlashInfer JIT modules that E1's two FlashInfer baselines load.

Run by flashinfer_bundle.sh on a machine with nvcc (no GPU needed), with the bundle's
flashinfer and tvm_ffi importable and FLASHINFER_CUDA_ARCH_LIST / FLASHINFER_WORKSPACE_BASE set.
Builds exactly the variants E1 uses (bf16 queries, head_dim 128, int32 page indices, no RoPE /
sliding window / soft cap; the heads and page size are run-time arguments of these modules):

* ``batch_decode`` with bf16 and float8_e4m3fn KV: BatchDecodeWithPagedKVCacheWrapper's
  CUDA-core decode (what its default ``use_tensor_cores=False`` plans);
* ``batch_prefill ... _sm90`` (fa3) with bf16 KV: the kernel MultiLevelCascadeAttentionWrapper's
  levels run on sm_90 (their ``backend="auto"`` picks fa3 there and the wrapper takes no backend);
* ``page`` (fa3's page-to-token offsets, called in every fa3 paged run) and ``cascade``
  (``merge_state_in_place``, which joins the levels).

Each module lands in ``<aot_dir>/<name>/<name>.so``, where FlashInfer's ``JitSpec.is_aot`` looks
before it compiles anything; ``manifest.json`` there lists the names, and ``headers.txt`` in the
build dir lists every header the compiler read (the bundle keeps exactly those for a JIT fallback).

usage: flashinfer_aot.py AOT_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def specs():
    import torch
    from flashinfer.jit.attention import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.jit.cascade import gen_cascade_module
    from flashinfer.jit.page import gen_page_module

    bf16, i32, D = torch.bfloat16, torch.int32, 128
    # (dtype_q, dtype_kv, dtype_o, dtype_idx, head_dim_qk, head_dim_vo, pos_encoding_mode,
    #  use_sliding_window, use_logits_soft_cap): the order decode.py's plan passes them in
    decode = [gen_batch_decode_module(bf16, kv, bf16, i32, D, D, 0, False, False)
              for kv in (bf16, torch.float8_e4m3fn)]
    # prefill.py's plan adds use_fp16_qk_reduction=False and the window test ``window_left >= 0``
    prefill = [gen_batch_prefill_module("fa3", bf16, bf16, bf16, i32, D, D, 0, False, False, False)]
    return decode + prefill + [gen_page_module(), gen_cascade_module()]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    for var in ("FLASHINFER_CUDA_ARCH_LIST", "FLASHINFER_WORKSPACE_BASE"):
        if var not in os.environ:
            sys.exit(f"set {var} (flashinfer_bundle.sh does)")
    aot_dir = Path(sys.argv[1])
    from flashinfer.jit import env as jit_env
    from flashinfer.jit.core import build_jit_specs

    todo = specs()
    for spec in todo:  # build_jit_specs keeps an existing build.ninja: the flags may have changed
        spec.write_ninja()
    build_jit_specs(todo, verbose=True, skip_prebuilt=False)
    aot_dir.mkdir(parents=True, exist_ok=True)
    for spec in todo:
        dst = aot_dir / spec.name / f"{spec.name}.so"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy2(spec.jit_library_path, dst)
    (aot_dir / "manifest.json").write_text(json.dumps(
        {"archs": os.environ["FLASHINFER_CUDA_ARCH_LIST"], "modules": [s.name for s in todo]}, indent=1))
    # ninja kept the compiler's dependency lists: every header any module read
    from flashinfer.jit.core import get_tmpdir

    ninja_file = (get_tmpdir() / "flashinfer_jit.ninja").resolve()
    deps = subprocess.run(["ninja", "-C", str(jit_env.FLASHINFER_JIT_DIR), "-f", str(ninja_file), "-t", "deps"],
                          check=True, capture_output=True, text=True).stdout
    headers = sorted({line.strip() for line in deps.splitlines() if line.startswith("    ")})
    (jit_env.FLASHINFER_WORKSPACE_DIR / "headers.txt").write_text("\n".join(headers) + "\n")
    print(f"{len(todo)} modules -> {aot_dir}; {len(headers)} headers read")


if __name__ == "__main__":
    main()
