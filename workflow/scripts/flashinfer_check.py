"""Checks the FlashInfer bundle (.fi/, from flashinfer_bundle.sh) before E1 uses it.

On the GPU machine (default): imports flashinfer from the bundle, runs E1's ``flashinfer_decode``
(bf16 and fp8 KV) and ``flashinfer_cascade`` (one and two levels) setup/run on small ragged
cases (Hq 32, Hkv 8, D 128, page 16, scrambled pools, poison in every unowned slot) against the
float64 reference, replays each ``run`` from a CUDA graph, prints versions, and says which
kernel modules were loaded ahead-of-time and which were compiled here (with the setup times).
Exit status 1 on any mismatch.

``--local`` (the build machine, no GPU): imports flashinfer from the bundle, drives both
wrappers' ``plan`` with E1's arguments through everything but the kernel modules' own plan
(torch's pinned allocations unpinned, fa3 picked as on sm_90; the modules they request are
recorded) and checks that each requested module is in the bundle's AOT directory and loads,
exporting the functions the wrappers call.

usage: PYTHONPATH=.fi/site:src python workflow/scripts/flashinfer_check.py [--local]
"""

from __future__ import annotations

import math
import os
import sys
import time
from unittest import mock

import torch

HQ, HKV, D, BS = 32, 8, 128, 16
# module name prefix -> the functions the wrappers call in it
EXPORTS = {"batch_decode": ["plan", "run"], "batch_prefill": ["plan", "paged_run"], "page":
           ["block_sparse_indices_to_vector_sparse_offsets"], "cascade": ["merge_state_in_place"]}


def versions() -> None:
    import flashinfer
    import tvm_ffi

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"flashinfer {flashinfer.__version__} from {os.path.dirname(flashinfer.__file__)}, "
          f"tvm_ffi {tvm_ffi.__version__}")
    print(f"torch has the DLPack C exchange API: {hasattr(torch.Tensor, '__dlpack_c_exchange_api__')}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")


def aot_dir():
    from flashinfer.jit import env as jit_env

    return jit_env.FLASHINFER_AOT_DIR


# ---------------------------------------------------------------------------- --local


def _unpinned_empty(real):
    def empty(*args, **kwargs):
        kwargs.pop("pin_memory", None)  # no CUDA here: the wrappers' host buffers, unpinned
        return real(*args, **kwargs)

    return empty


class _Module:
    """Stands for a kernel module once the wrapper has named it: its plan needs the GPU."""

    def plan(self, *args):
        return []


def local_check() -> int:
    import flashinfer
    import flashinfer.decode
    import flashinfer.prefill
    import tvm_ffi
    from flashinfer.jit.attention import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.utils import is_fa3_backend_supported

    from fieldprint.attention import flashinfer_baselines as fib
    from fieldprint.attention.paged_inputs import make_case

    requested: list[str] = []

    def intercept(gen):
        def get(*args):
            requested.append(gen(*args).name)
            return _Module()

        return get

    g = torch.Generator().manual_seed(0)
    failures = 0
    for kv in (torch.bfloat16, torch.float8_e4m3fn):
        case = make_case([37, 16, 100], [1, 1, 1], [32, 32, 32], heads_q=HQ, heads_kv=HKV, head_dim=D,
                         block_size=BS, dtype=torch.bfloat16, kv_dtype=kv, shared_anchors=False, generator=g)
        lv = fib.decode_level(case)
        with mock.patch.object(torch, "empty", _unpinned_empty(torch.empty)), \
             mock.patch.object(flashinfer.decode, "get_batch_decode_module", intercept(gen_batch_decode_module)):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                torch.zeros(1 << 20, dtype=torch.uint8), "NHD", use_cuda_graph=True,
                paged_kv_indptr_buffer=lv.kv_indptr.clone(), paged_kv_indices_buffer=lv.kv_indices.clone(),
                paged_kv_last_page_len_buffer=lv.kv_last_page_len.clone())
            w.plan(lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len, HQ, HKV, D, BS,
                   q_data_type=torch.bfloat16, kv_data_type=kv, sm_scale=1 / math.sqrt(D))
    case = make_case([37, 16, 100, 5], [1] * 4, [40, 40, 40, 24], heads_q=HQ, heads_kv=HKV, head_dim=D,
                     block_size=BS, dtype=torch.bfloat16, generator=g)
    levels = fib.cascade_levels(case)
    assert is_fa3_backend_supported(0, False, False, torch.bfloat16, torch.bfloat16)  # what sm_90 gets
    with mock.patch.object(torch, "empty", _unpinned_empty(torch.empty)), \
         mock.patch.object(flashinfer.prefill, "determine_attention_backend", lambda *a: "fa3"), \
         mock.patch.object(flashinfer.prefill, "get_batch_prefill_module", intercept(gen_batch_prefill_module)):
        w = flashinfer.MultiLevelCascadeAttentionWrapper(len(levels), torch.zeros(1 << 20, dtype=torch.uint8), "NHD")
        w.plan([x.qo_indptr for x in levels], [x.kv_indptr for x in levels], [x.kv_indices for x in levels],
               [x.kv_last_page_len for x in levels], HQ, HKV, D, BS, causal=False,
               sm_scale=1 / math.sqrt(D), q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    for name in sorted(set(requested)) + ["page", "cascade"]:
        so = aot_dir() / name / f"{name}.so"
        want = next(v for k, v in EXPORTS.items() if name.startswith(k))
        try:  # the driver is absent here: its symbols stay unresolved until a GPU run
            mod = tvm_ffi.load_module(str(so))
            missing = [f for f in want if not mod.implements_function(f)]
        except Exception as err:  # noqa: BLE001 - report, count, go on
            missing = [f"load: {type(err).__name__}: {str(err)[:200]}"]
        failures += bool(missing)
        print(f"{'FAIL' if missing else 'ok  '} AOT module {name}"
              + (f": missing {missing}" if missing else f" ({so.stat().st_size // 1024} KiB), exports {want}"))
    print(f"wrappers' plan requested: {requested}")
    if len(requested) != 4 or len(set(requested)) != 3:
        print("expected 4 requests of 3 modules (decode bf16, decode fp8, one fa3 module for both cascade levels)")
        failures += 1
    return failures


# ------------------------------------------------------------------------------- GPU


def _compiled_here() -> list[str]:
    from flashinfer.jit import env as jit_env

    return sorted(p.parent.name for p in jit_env.FLASHINFER_JIT_DIR.glob("*/*.so"))


def gpu_check() -> int:
    from flashinfer.jit.core import jit_spec_registry

    from fieldprint.attention import baselines as bl
    from fieldprint.attention import reference_attention
    from fieldprint.attention.paged_inputs import make_case

    if not torch.cuda.is_available():
        print("no CUDA device: run with --local on a machine without a GPU")
        return 1
    before = set(_compiled_here())
    g = torch.Generator().manual_seed(0)
    # Unowned slots hold 300 (finite in bf16 and fp8 e4m3): a read of one shows as a large error.
    common = {"heads_q": HQ, "heads_kv": HKV, "head_dim": D, "block_size": BS, "dtype": torch.bfloat16,
              "device": "cuda", "generator": g, "poison": 300.0}
    half = bl.Scales(None, 0.5, 0.5)
    runs = [  # (impl, label, case, scales)
        ("flashinfer_decode", "bf16, private aligned anchors",
         make_case([37, 16, 100], [1] * 3, [32, 0, 48], shared_anchors=False, **common), bl.Scales()),
        ("flashinfer_decode", "fp8 KV, scales 0.5",
         make_case([37, 16, 100], [1] * 3, [32, 32, 32], kv_dtype=torch.float8_e4m3fn, **common), half),
        ("flashinfer_cascade", "2 levels: groups of 3 and 1, partial anchor pages",
         make_case([37, 16, 100, 5], [1] * 4, [40, 40, 40, 24], **common), bl.Scales()),
        ("flashinfer_cascade", "1 level: private aligned anchors",
         make_case([37, 16, 100], [1] * 3, [32, 16, 48], shared_anchors=False, **common), bl.Scales()),
    ]
    failures = 0
    for impl, label, case, scales in runs:
        setup, run = bl.REGISTRY[impl]
        t0 = time.perf_counter()
        try:
            state = setup(case, scales)
            out = run(state)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported as a failure, the other cases still run
            failures += 1
            print(f"FAIL {impl} [{label}]: {type(exc).__name__}: {exc}")
            continue
        t_first = time.perf_counter() - t0
        c64 = bl.PagedCase(case.q.double(), case.k_cache.double(), case.v_cache.double(), *case.args()[3:])
        ref = reference_attention(*c64.args(), **scales.kwargs())
        err = float((out.double() - ref).abs().max() / ref.abs().max())
        try:  # E1 times run() as a graph replay (GRAPHABLE): the replay must equal the eager call
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_g = run(state)
            graph.replay()
            torch.cuda.synchronize()
            graph_diff = float((out_g.float() - out.float()).abs().max())
            graph_msg = f"CUDA graph replay max diff {graph_diff:.1e}"
        except Exception as exc:  # noqa: BLE001 - reported as a failure, the other cases still run
            torch.cuda.synchronize()
            graph_diff, graph_msg = float("nan"), f"CUDA graph capture failed: {type(exc).__name__}: {exc}"
        ok = err < 2e-2 and graph_diff == 0.0 and bool(torch.isfinite(out).all())
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {impl} [{label}]: rel err vs float64 {err:.2e}, {graph_msg}, "
              f"setup + first run {t_first:.2f} s; {state.note}")
    statuses = jit_spec_registry.get_all_statuses()
    aot = [s.name for s in statuses if s.library_path is not None and str(s.library_path).startswith(str(aot_dir()))]
    built = sorted(set(_compiled_here()) - before)
    print(f"modules loaded ahead-of-time: {aot}")
    print(f"modules compiled on this machine by this run: {built or 'none'}")
    return failures


def main() -> int:
    local = "--local" in sys.argv[1:]
    if local:  # no GPU to ask: the H200's arch, which names FlashInfer's JIT workspace
        os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
    t0 = time.perf_counter()
    import flashinfer  # noqa: F401 - the bundle must import on its own

    print(f"import flashinfer: {time.perf_counter() - t0:.2f} s")
    versions()
    failures = local_check() if local else gpu_check()
    print("FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
