"""Timing a callable: the one median-of-repetitions rule every measurement uses."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def bench_quartiles(fn: Callable[[], Any], device: str, warmup_ms: float = 25,
                    rep_ms: float = 100) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) milliseconds of ``fn()`` over its repetitions:
    CUDA events around each call via ``triton.testing.do_bench`` on a GPU (``warmup_ms`` of
    calls first, then about ``rep_ms`` of timed ones), a host clock around each call on the CPU
    (at least 3 calls, at most 1000)."""
    if device == "cuda":
        from triton.testing import do_bench

        q1, med, q3 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return float(q1), float(med), float(q3)
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return quartiles(times)


def quartiles(ms: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of repeated timings, inclusive method (all three
    equal for one value): the spread every experiment reports."""
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return q1, med, q3


def bench(fn: Callable[[], Any], device: str, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()`` (:func:`bench_quartiles`)."""
    return bench_quartiles(fn, device, warmup_ms, rep_ms)[1]
