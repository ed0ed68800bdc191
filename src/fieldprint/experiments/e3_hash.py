"""E3: what quantize + hash costs on the GPU, against hashing on the CPU (the paper's claim 3).

Every row is one implementation at one input size; throughput counts the *input* bytes (the bf16
tensor for the quantizer and for quantize + hash), except ``d2d_copy``, which counts bytes read +
written so that it reads as the HBM ceiling a hash that reads each byte once can approach.

impls (``impl`` column):
  blake3_gpu              one BLAKE3 digest of the whole buffer (fieldprint.hashing.blake3)
  blake3_many_gpu         one digest per page of ``page_elems`` bf16 elements (blake3_many)
  quant_gpu               the quantizer kernel alone: one `quant_kernels.launch_quantize` with the
                          buffer's per-tensor scale exponent computed and the codes (and helper
                          bits) allocated before timing; no host check, no sync, no hash
  quant_blake3_gpu        the three-pass path: `fieldprint.quant.quantize` (with its host checks),
                          page rows of the codes (+ helper bits), then one digest per page
  fused_quant_blake3_gpu  the committer's fused launch (`hashing.fused.launch_leaves`): each page's
                          scale, codes, leaf row and leaf digest in one kernel, every buffer built
                          before timing (the descriptors name the input's pages as pool pages)
  d2d_copy                device-to-device copy of the buffer (memory ceiling)
  blake3_cpu_1t / _all    the `blake3` package on one thread / ``max_threads=AUTO``
  sha256_cpu_1t           hashlib SHA-256, one core
  d2h_pinned_blake3       copy to pinned host memory, then blake3 on all threads
  d2h_pageable_blake3     the same through pageable host memory

Before timing, ``quant_gpu`` and ``fused_quant_blake3_gpu`` check one call against an independent
reference (the torch quantizer; the torch quantizer + `merkle.hash_pages` with the reference
BLAKE3), so a timed kernel that computes the wrong bytes becomes an error row, not a speed.

On a CPU-only machine the ``*_gpu`` impls run the Triton kernels under the interpreter at the
tiny size ``interp_kib`` when ``TRITON_INTERPRET=1`` is set (correctness of the path, not speed),
and otherwise appear once as ``status=skipped: ...`` rows; the d2h impls need a GPU.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import numpy
import torch

from fieldprint import hashing
from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, progress, resolve_device
from fieldprint.experiments.e4_stability import page_rows
from fieldprint.formats import get_format, pow2, scale_exponent
from fieldprint.hashing.fused import FUSED_FORMATS, LeafPlan, launch_leaves
from fieldprint.leaf import LeafSpec
from fieldprint.merkle import hash_pages
from fieldprint.quant import quantize, seed_keys
from fieldprint.quant_kernels import launch_quantize
from fieldprint.timing import bench

GPU_IMPLS = ("blake3_gpu", "blake3_many_gpu", "quant_gpu", "quant_blake3_gpu", "fused_quant_blake3_gpu",
             "d2d_copy")
# Impls that quantize: one row per quant case (the fused one: the 1-byte formats only).
QUANT_IMPLS = ("quant_gpu", "quant_blake3_gpu", "fused_quant_blake3_gpu")
CPU_IMPLS = ("blake3_cpu_1t", "blake3_cpu_all", "sha256_cpu_1t")
D2H_IMPLS = ("d2h_pinned_blake3", "d2h_pageable_blake3")
IMPLS = GPU_IMPLS + CPU_IMPLS + D2H_IMPLS
FORMATS = ("e4m3", "e5m2", "int8", "bf16", "fp16")
ROUNDINGS = ("rne", "trunc", "stochastic", "two_grid")
KIB = 1024
CHECK_ELEMS = 16384  # elements of the quantizer's pre-timing check against the torch quantizer


def parse_case(case: str) -> tuple[str, str]:
    """'e4m3/two_grid' -> ('e4m3', 'two_grid'); a clear ValueError for anything else."""
    fmt, sep, rounding = case.partition("/")
    if not sep or fmt not in FORMATS or rounding not in ROUNDINGS:
        raise ValueError(
            f"quant case {case!r} must be '<fmt>/<rounding>' with fmt in {FORMATS} "
            f"and rounding in {ROUNDINGS}"
        )
    return fmt, rounding


@dataclass
class E3Config(ExperimentConfig):
    sizes_kib: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    impls: list[str] = field(default_factory=lambda: list(IMPLS))
    quant_cases: list[str] = field(default_factory=lambda: ["e4m3/rne", "e4m3/two_grid"])
    page_elems: int = 16384  # one page: block_size 16 x 8 KV heads x head dim 128
    cpu_max_kib: int = 1024 * 1024  # CPU-only impls and d2h stop here
    quant_max_kib: int = 2 * 1024 * 1024  # quantize temporaries are several times the input
    interp_kib: int = 64  # size of the Triton-interpreter rows on a CPU-only machine
    l2_mib: int = 50  # inputs smaller than this rotate through >= 2x this many bytes
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    time_budget_s: float = 170.0  # no new size starts after this (sizes run largest first)

    def validate(self) -> None:
        super().validate()
        check(len(self.sizes_kib) > 0, "sizes_kib must not be empty")
        check(all(s > 0 for s in self.sizes_kib), f"sizes_kib must be positive, got {self.sizes_kib}")
        check(sorted(self.sizes_kib) == list(self.sizes_kib),
              f"sizes_kib must be ascending, got {self.sizes_kib}")
        bad = [i for i in self.impls if i not in IMPLS]
        check(not bad, f"impls has unknown names {bad}; known: {IMPLS}")
        check(len(self.impls) > 0, "impls must not be empty")
        for case in self.quant_cases:
            parse_case(case)
        check(self.page_elems > 0 and self.page_elems % 512 == 0,
              f"page_elems must be a positive multiple of 512, got {self.page_elems}")
        page_kib = self.page_elems * 2 / KIB
        for s in [*self.sizes_kib, self.interp_kib]:
            check(s == 0 or s % page_kib == 0,
                  f"every size (sizes_kib, interp_kib) must be a multiple of one bf16 page "
                  f"({page_kib:g} KiB for page_elems={self.page_elems}), got {s}")
        check(self.interp_kib >= 0, f"interp_kib must be >= 0, got {self.interp_kib}")
        check(self.cpu_max_kib > 0, f"cpu_max_kib must be positive, got {self.cpu_max_kib}")
        check(self.quant_max_kib > 0, f"quant_max_kib must be positive, got {self.quant_max_kib}")
        check(self.l2_mib >= 0, f"l2_mib must be >= 0, got {self.l2_mib}")
        check(self.warmup_ms > 0 and self.rep_ms > 0, "warmup_ms and rep_ms must be positive")
        check(self.time_budget_s > 0, f"time_budget_s must be positive, got {self.time_budget_s}")


# ---------------------------------------------------------------- inputs


def rotation_count(nbytes: int, l2_bytes: int) -> int:
    """Buffers to rotate through so consecutive calls never find their input in cache."""
    if nbytes >= l2_bytes:
        return 1
    return min(128, math.ceil(2 * l2_bytes / nbytes))


def bf16_buffers(nbytes: int, count: int, device: str, seed: int) -> list[torch.Tensor]:
    """``count`` random bf16 tensors of ``nbytes`` bytes each: [nbytes // 2]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(nbytes // 2, generator=gen, device=device, dtype=torch.bfloat16)
            for _ in range(count)]


def cycling(fn: Callable[[torch.Tensor], object], bufs: list[torch.Tensor]) -> Callable[[], object]:
    it = itertools.cycle(bufs)
    return lambda: fn(next(it))


def cpu_threads() -> int:
    """Threads `blake3`'s AUTO mode uses: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---------------------------------------------------------------- the implementations


def tensor_exponent(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The per-tensor scale exponent of x for ``fmt``: int32 [1] (0 for bf16/fp16), the rule of
    `fieldprint.formats.scale_exponent`, found without a float32 copy of x (which would double
    the memory of an 8 GB input)."""
    amax = torch.maximum(x.max(), -x.min()).float().reshape(1)
    return scale_exponent(amax, fmt)


def tensor_scale(x: torch.Tensor, fmt: str) -> torch.Tensor | None:
    """The per-tensor power-of-two scale of x for ``fmt`` ([] float32), None for bf16/fp16."""
    return pow2(tensor_exponent(x, fmt)).reshape(()) if get_format(fmt).scaled else None


def quant_kernel_fn(fmt: str, rounding: str, seed: int | None, bufs: list[torch.Tensor]):
    """fn(x) for x in bufs (each [n] bf16, the same n): the quantizer kernel alone, one
    `launch_quantize` per call. Every buffer's exponent ([1] int32) and the outputs (codes [n],
    helper bits [n / 8] for two_grid) are made here, once; a call neither checks nor syncs, and
    allocates only what `launch_quantize` itself does (its [1] flag and [1] placeholder). One
    call is checked against the torch quantizer first."""
    n, dev = bufs[0].numel(), bufs[0].device
    exps = {id(x): tensor_exponent(x, fmt) for x in bufs}
    codes = torch.empty(n, dtype=get_format(fmt).code_dtype, device=dev)
    helper = torch.empty((n + 7) // 8, dtype=torch.uint8, device=dev) if rounding == "two_grid" else None
    key0, key1 = seed_keys(seed) if seed is not None else (0, 0)

    def fn(x):
        return launch_quantize(x, exps[id(x)], fmt, rounding, key0, key1, None, codes, helper)

    x = bufs[0]
    if int(fn(x).item()):
        raise RuntimeError(f"quant_gpu check ({fmt}/{rounding}): the kernel flags finite input as NaN/Inf")
    m = min(n, CHECK_ELEMS)  # counter bits follow the flat index: a prefix quantizes alike alone
    ref = quantize(x[:m].cpu(), fmt, rounding, seed=seed, scale=tensor_scale(x, fmt), backend="torch")
    if not torch.equal(codes[:m].cpu(), ref.codes) or (
            helper is not None and not torch.equal(helper[:m // 8].cpu(), ref.helper)):
        raise RuntimeError(f"quant_gpu check ({fmt}/{rounding}): launch_quantize's codes differ from "
                           "the torch quantizer's")
    return fn


def fused_leaf_fn(fmt: str, rounding: str, page_elems: int, seed: int | None, bufs: list[torch.Tensor]):
    """fn(x) for x in bufs (each [n] bf16, the same n, P = n / page_elems pages): the committer's
    fused launch, `launch_leaves`, reading x as a K pool of one layer and P pages, one page
    described per pool page (page id = pool page, every token row valid). The plan, its leaf rows
    [P, leaf bytes], the descriptors [P, 3], the page count and the base row are made here, once,
    and shared by the buffers (they have one shape): a call neither allocates nor syncs. The
    first and last page's digests of one call are checked against the torch quantizer + the
    reference BLAKE3 first."""
    n_pages, dev = bufs[0].numel() // page_elems, bufs[0].device
    plan = LeafPlan(LeafSpec(fmt, rounding, elems=page_elems, seed=seed), layers=1, kinds=1,
                    max_pages=n_pages, tokens_per_page=1, layer_ids=(0,), kind_ids=("k",))
    leaf_bufs = plan.buffers(dev, capacity=n_pages)
    pool_page = torch.arange(n_pages, dtype=torch.int64, device=dev)
    desc = torch.stack([pool_page, torch.ones_like(pool_page), pool_page], dim=1).contiguous()
    count = torch.tensor([n_pages], dtype=torch.int32, device=dev)
    base = torch.zeros(1, dtype=torch.int32, device=dev)

    def fn(x):
        launch_leaves(plan, leaf_bufs, x.view(1, n_pages, page_elems), None, desc, count, base, seed)

    x = bufs[0]
    fn(x)
    if not bool(leaf_bufs.finite[:n_pages].all()):
        raise RuntimeError(f"fused check ({fmt}/{rounding}): the kernel flags finite pages as NaN/Inf")
    for p in sorted({0, n_pages - 1}):
        qt = quantize(x[p * page_elems:(p + 1) * page_elems].cpu().view(1, page_elems), fmt, rounding,
                      seed=seed, backend="torch")
        ref = hash_pages(qt, page_ids=[p], layer=0, kind="k", backend="reference")[0]
        if not torch.equal(leaf_bufs.digests[p].cpu(), ref):
            raise RuntimeError(f"fused check ({fmt}/{rounding}): page {p}'s leaf digest differs from "
                               "quantize + merkle.hash_pages")
    return fn


def gpu_fn(impl: str, fmt: str, rounding: str, page_elems: int, seed: int,
           bufs: list[torch.Tensor]):
    """fn(x) for one GPU impl and x in bufs (each [n] bf16). The per-tensor scales of the
    quantizer and of the three-pass path, and every output buffer of the quantizer and of the
    fused launch (which finds each page's scale itself), are made here, before timing. Hashing
    and quantization always take the project's Triton kernels (on a CPU tensor: the interpreter)."""
    s = seed if rounding == "stochastic" else None
    if impl == "blake3_gpu":
        return lambda x: hashing.blake3(x.view(torch.uint8), backend="triton")
    if impl == "blake3_many_gpu":
        return lambda x: hashing.blake3_many(x.view(torch.uint8).view(-1, 2 * page_elems), backend="triton")
    if impl == "quant_gpu":
        return quant_kernel_fn(fmt, rounding, s, bufs)
    if impl == "quant_blake3_gpu":
        scales = {id(x): tensor_scale(x, fmt) for x in bufs}
        return lambda x: hashing.blake3_many(page_rows(quantize(x, fmt, rounding, seed=s, scale=scales[id(x)],
                                                        backend="triton"), page_elems), backend="triton")
    if impl == "fused_quant_blake3_gpu":
        return fused_leaf_fn(fmt, rounding, page_elems, s, bufs)
    if impl == "d2d_copy":
        dst: list[torch.Tensor] = []  # allocated on the first call, reused after

        def copy(x):
            if not dst:
                dst.append(torch.empty_like(x))
            if x.is_cuda:
                return dst[0].copy_(x)
            # host: a plain memcpy; torch's CPU copy_ wakes its thread pool, which on a busy
            # machine costs milliseconds regardless of size
            return numpy.copyto(dst[0].view(torch.uint8).numpy(), x.view(torch.uint8).numpy())

        return copy
    raise ValueError(f"not a GPU impl: {impl}")


def cpu_hash(impl: str) -> tuple[Callable[[memoryview], bytes], int]:
    """(hash function of a host buffer, threads it uses)."""
    if impl == "sha256_cpu_1t":
        return (lambda buf: hashlib.sha256(buf).digest()), 1
    if impl == "blake3_cpu_1t":
        return (lambda buf: blake3.blake3(buf, max_threads=1).digest()), 1
    if impl in ("blake3_cpu_all", *D2H_IMPLS):
        auto = blake3.blake3.AUTO
        return (lambda buf: blake3.blake3(buf, max_threads=auto).digest()), cpu_threads()
    raise ValueError(f"not a CPU impl: {impl}")


def d2h_fn(impl: str, nbytes: int):
    """fn(x) copying x: [n] bf16 on the GPU to host memory and hashing it there on all threads."""
    hash_fn, _ = cpu_hash(impl)
    pinned = impl == "d2h_pinned_blake3"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    view = host.numpy()

    def fn(x):
        host.copy_(x.view(torch.uint8), non_blocking=pinned)
        if pinned:
            torch.cuda.current_stream().synchronize()
        return hash_fn(view)

    return fn


# ---------------------------------------------------------------- the run


def _row(impl, nbytes, ms, *, device, backend, fmt="", rounding="", threads="", counted="input",
         page_elems="", peak_gib="", status="ok") -> dict:
    moved = 2 * nbytes if counted == "read+write" else nbytes
    return {
        "impl": impl, "fmt": fmt, "rounding": rounding, "bytes": nbytes,
        "ms": "" if ms is None else float(f"{ms:.5g}"),
        "gbps": "" if ms is None else float(f"{moved / ms / 1e6:.5g}"),
        "threads": threads, "device": device, "backend": backend, "counted": counted,
        "page_elems": page_elems, "peak_gpu_gib": peak_gib, "status": status,
    }


def _cases(impl: str, cfg: E3Config) -> list[tuple[str, str]]:
    if impl == "fused_quant_blake3_gpu":
        return [c for c in map(parse_case, cfg.quant_cases) if c[0] in FUSED_FORMATS]
    if impl in QUANT_IMPLS:
        return [parse_case(c) for c in cfg.quant_cases]
    return [("", "")]


def _peak_gib(device: str) -> str:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else ""


def _measure_gpu(cfg, impl, nbytes, bufs, device, label) -> list[dict]:
    """Rows of one GPU impl (each quant case); ``label``: the backend column."""
    rows = []
    for fmt, rounding in _cases(impl, cfg):
        if impl in QUANT_IMPLS and nbytes > cfg.quant_max_kib * KIB:
            continue
        ms, status = _timed(lambda f=fmt, r=rounding: cycling(
            gpu_fn(impl, f, r, cfg.page_elems, cfg.seed, bufs), bufs), device, cfg)
        progress("e3_hash", f"{impl} {fmt}/{rounding} at {nbytes // KIB} KiB: {status}")
        rows.append(_row(impl, nbytes, ms, device=device, fmt=fmt,
                         backend=("torch" if device == "cuda" else "numpy") if impl == "d2d_copy"
                         else label,
                         rounding=rounding, page_elems=cfg.page_elems if impl != "d2d_copy" else "",
                         counted="read+write" if impl == "d2d_copy" else "input",
                         peak_gib=_peak_gib(device), status=status))
    return rows


def _timed(make_fn, device: str, cfg: E3Config) -> tuple[float | None, str]:
    """(median ms, "ok") of the fn ``make_fn()`` builds, or (None, "error: ...") when building
    or running it fails (out of memory, a kernel error), so one failing size does not discard
    the rest of a sweep; the error is in the CSV and on stderr."""
    try:
        return bench(make_fn(), device, cfg.warmup_ms, cfg.rep_ms), "ok"
    except (RuntimeError, ValueError) as e:
        msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"e3_hash: {msg}", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
        return None, msg


def _measure_cpu(cfg, impl, nbytes, host_bufs) -> dict:
    hash_fn, threads = cpu_hash(impl)
    views = [b.numpy() for b in host_bufs]
    ms, status = _timed(lambda: cycling(hash_fn, views), "cpu", cfg)
    backend = "hashlib" if impl.startswith("sha") else "blake3-package"
    return _row(impl, nbytes, ms, device="cpu", backend=backend, threads=threads, status=status)


def _measure_d2h(cfg, impl, nbytes, bufs) -> dict:
    ms, status = _timed(lambda: cycling(d2h_fn(impl, nbytes), bufs), "cuda", cfg)
    return _row(impl, nbytes, ms, device="cuda", backend="blake3-package",
                threads=cpu_hash(impl)[1], peak_gib=_peak_gib("cuda"), status=status)


def _interpreter_rows(cfg: E3Config) -> list[dict]:
    """The Triton path on a CPU-only machine: one call each at ``interp_kib`` under the
    interpreter (quantize + hash for the first quant case only: seconds per call), or skipped."""
    # The fused kernel takes over a minute per 16K-element page in the interpreter: its CPU check
    # is tests/test_fused_hash.py, not this table.
    impls = [i for i in cfg.impls if i in GPU_IMPLS and i not in ("d2d_copy", "fused_quant_blake3_gpu")]
    if os.environ.get("TRITON_INTERPRET") != "1" or cfg.interp_kib == 0:
        why = "skipped: no CUDA and TRITON_INTERPRET unset" if cfg.interp_kib else \
            "skipped: no CUDA and interp_kib=0"
        return [_row(i, 0, None, device="cpu", backend="triton-interpreter", fmt=f, rounding=r,
                     status=why) for i in impls for f, r in _cases(i, cfg)]
    nbytes = cfg.interp_kib * KIB
    bufs = bf16_buffers(nbytes, 1, "cpu", cfg.seed)
    rows = []
    for impl in impls:
        cases = _cases(impl, cfg)
        for fmt, rounding in cases[:1] if impl == "quant_blake3_gpu" else cases:
            fn = gpu_fn(impl, fmt, rounding, cfg.page_elems, cfg.seed, bufs)
            t0 = time.perf_counter()
            fn(bufs[0])
            ms = (time.perf_counter() - t0) * 1e3
            rows.append(_row(impl, nbytes, ms, device="cpu", backend="triton-interpreter",
                             fmt=fmt, rounding=rounding, page_elems=cfg.page_elems,
                             status="ok: one call in the interpreter (not a speed)"))
    return rows


def run(cfg: E3Config) -> list[dict]:
    """Rows ``impl, fmt, rounding, bytes, ms, gbps, threads, device, backend, counted, ...``."""
    device = resolve_device(cfg.device)
    started = time.monotonic()
    rows: list[dict] = []
    # Largest first: those are the sizes the claims use, and kernels compile on the first call.
    for size_kib in reversed(cfg.sizes_kib):
        if time.monotonic() - started > cfg.time_budget_s:
            print(f"e3_hash: time budget spent, sizes below {size_kib} KiB not run",
                  file=sys.stderr)
            break
        nbytes = size_kib * KIB
        count = rotation_count(nbytes, cfg.l2_mib * 2**20)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            bufs = bf16_buffers(nbytes, count, "cuda", cfg.seed)
            for impl in cfg.impls:
                if impl in GPU_IMPLS:
                    rows += _measure_gpu(cfg, impl, nbytes, bufs, device, "triton")
                elif impl in D2H_IMPLS and nbytes <= cfg.cpu_max_kib * KIB:
                    rows.append(_measure_d2h(cfg, impl, nbytes, bufs))
        else:
            bufs = bf16_buffers(nbytes, count, "cpu", cfg.seed)
            if "d2d_copy" in cfg.impls:  # host memcpy: the CPU's own memory ceiling
                rows += _measure_gpu(cfg, "d2d_copy", nbytes, bufs, "cpu", "torch")
        cpu_impls = [i for i in cfg.impls if i in CPU_IMPLS]
        if cpu_impls and nbytes <= cfg.cpu_max_kib * KIB:
            host = [b.cpu().view(torch.uint8) for b in bufs]
            rows += [_measure_cpu(cfg, impl, nbytes, host) for impl in cpu_impls]
            progress("e3_hash", f"CPU hashing at {size_kib} KiB done")
            del host
        del bufs
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cpu":
        rows += _interpreter_rows(cfg)
        rows += [_row(i, 0, None, device="cpu", backend="", status="skipped: needs CUDA")
                 for i in cfg.impls if i in D2H_IMPLS]
    return rows


if __name__ == "__main__":
    hydra_main("e3_hash", E3Config, run)
