"""Timing a callable: the one median-of-repetitions rule every measurement uses."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def bench(fn: Callable[[], Any], device: str, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()``: CUDA events via ``triton.testing.do_bench`` on a GPU,
    a host clock around each call on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times)
