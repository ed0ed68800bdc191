"""E6 numbers for the paper (``\\fp{e6....}``) and the commit-pipeline claims."""

from __future__ import annotations

from fieldprint.report import Claim, latex_escape

PER_STEP = ("per_step_copy_cpu", "per_step_gpu")
COMMIT = ("commit_sync", "commit_async")
TARGET_INTERVAL = 16
TARGET_OVERHEAD = 0.01  # async commit at interval 16, against the graph-captured decode baseline
TARGET_OVERHEAD_EVERY_STEP = 0.03  # async commit at interval 1


def _batches(rows: list[dict]) -> list[int]:
    return sorted({r["batch"] for r in rows if r["kind"] == "timing"})


def _timing(rows: list[dict], batch: int | None = None) -> dict[tuple[str, int], dict[str, str]]:
    """Timing rows of one batch size (default: the smallest) by (mode, interval)."""
    batch = _batches(rows)[0] if batch is None else batch
    return {(r["mode"], r["interval"]): r for r in rows if r["kind"] == "timing" and r["batch"] == batch}


def _tamper(rows: list[dict]) -> dict[str, int]:
    out = {"flips": 0, "detected": 0, "localized": 0, "anchor_flips": 0, "anchor_detected": 0,
           "false_positive": 0}
    for r in rows:
        if r["kind"] != "tamper":
            continue
        out["flips"] += r["flips"]
        out["detected"] += r["detected"]
        out["localized"] += r["localized"]
        out["false_positive"] = max(out["false_positive"], r["false_positive"])
        if r["target"] == "anchor":
            out["anchor_flips"] += r["flips"]
            out["anchor_detected"] += r["detected"]
    return out


def _key(mode: str, interval: int) -> str:
    return f"e6.{mode}" if mode not in COMMIT else f"e6.{mode}.i{interval}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _async_interval(timing: dict) -> int | None:
    """The commit interval the 2% target is checked at: 16, else the nearest measured one."""
    intervals = sorted(i for m, i in timing if m == "commit_async")
    return min(intervals, key=lambda i: abs(i - TARGET_INTERVAL)) if intervals else None


def macros(rows: list[dict], manifest: dict) -> dict[str, str]:
    timing = _timing(rows)
    base = timing[("none", 1)]
    out = {
        **{f"e6.{name}": str(base[name]) for name in ("batch", "context", "layers", "anchors", "steps", "reps")},
        "e6.where": latex_escape(manifest["gpu"] or "CPU"),
        "e6.none.ms_per_step": f"{base['ms_per_step']:.2f}",
        "e6.none.tokens_per_s": f"{base['tokens_per_s']:,.0f}".replace(",", "{,}"),
    }
    base_ms = base["ms_per_step"]
    for (mode, interval), r in timing.items():
        if mode == "none":
            continue
        k = _key(mode, interval)
        ms = r["ms_per_step"]
        out[f"{k}.overhead_pct"] = _pct(r["overhead"])
        out[f"{k}.slowdown"] = f"{ms / base_ms:.2f}"
        out[f"{k}.tokens_per_s"] = f"{r['tokens_per_s']:,.0f}".replace(",", "{,}")
        out[f"{k}.d2h_bytes_per_step"] = f"{r['d2h_bytes_per_step']:,.0f}".replace(",", "{,}")
    # Interval-independent names for the text: the target interval (16, else the nearest run).
    i = _async_interval(timing)
    if i is not None:
        a = timing[("commit_async", i)]
        out["e6.target.interval"] = str(i)
        out["e6.target.async_overhead_pct"] = _pct(a["overhead"])
        out["e6.target.async_d2h_bytes_per_step"] = f"{a['d2h_bytes_per_step']:.0f}"
        # Extra time per commit: the per-step overhead times the steps between two commits.
        out["e6.target.ms_per_commit"] = f"{(a['ms_per_step'] - base_ms) * i:.1f}"
        if ("commit_sync", i) in timing:
            out["e6.target.sync_overhead_pct"] = _pct(timing[("commit_sync", i)]["overhead"])
        if ("per_step_copy_cpu", 1) in timing:
            copy_ms = timing[("per_step_copy_cpu", 1)]["ms_per_step"]
            out["e6.target.copy_vs_async"] = f"{copy_ms / a['ms_per_step']:.2f}"
    if ("per_step_copy_cpu", 1) in timing:
        r = timing[("per_step_copy_cpu", 1)]
        out["e6.copy.kib_per_step"] = f"{r['d2h_bytes_per_step'] / 1024:,.0f}".replace(",", "{,}")
    out["e6.batches"] = " and ".join(str(b) for b in _batches(rows))
    for b in _batches(rows):  # every batch size: the baseline, each commit mode's overhead and spread
        tb = _timing(rows, b)
        out[f"e6.b{b}.none.ms_per_step"] = f"{tb[('none', 1)]['ms_per_step']:.2f}"
        for (mode, interval), r in tb.items():
            if mode not in COMMIT:
                continue
            k = f"e6.b{b}.{mode}.i{interval}"
            out[f"{k}.overhead_pct"] = _pct(r["overhead"])
            if r.get("overhead_q1") is not None:
                out[f"{k}.overhead_iqr"] = f"{_pct(r['overhead_q1'])}--{_pct(r['overhead_q3'])}"
            if r.get("commit_host_ms") is not None:
                out[f"{k}.commit_host_ms"] = f"{r['commit_host_ms']:.2f}"
                out[f"{k}.ms_per_commit"] = f"{(r['ms_per_step'] - tb[('none', 1)]['ms_per_step']) * interval:.2f}"
            if r.get("launches_per_commit") is not None:
                out[f"{k}.launches"] = str(r["launches_per_commit"])
            if r.get("commit_gpu_ms") is not None:
                out[f"{k}.commit_gpu_ms"] = f"{r['commit_gpu_ms']:.3f}"
    t = _tamper(rows)
    if t["flips"]:
        out.update({
            "e6.tamper.flips": str(t["flips"]), "e6.tamper.anchor_flips": str(t["anchor_flips"]),
            "e6.tamper.detected_pct": _pct(t["detected"] / t["flips"]),
            "e6.tamper.localized_pct": _pct(t["localized"] / t["flips"]),
            "e6.tamper.false_positives": str(t["false_positive"]),
        })
    return out


def claims(rows: list[dict], manifest: dict) -> list[Claim]:
    timing = _timing(rows)
    gpu = manifest["gpu"]
    where = gpu or "CPU (a CPU run does not test the GPU timing claims)"
    result = []
    i = _async_interval(timing)
    graphs = bool(timing[("none", 1)].get("graphs"))
    baseline = "graph-captured decode" if graphs else "eager decode (not graph-captured)"
    if i is not None:
        worst = max(_timing(rows, b)[("commit_async", i)]["overhead"] for b in _batches(rows))
        result.append(Claim(
            "commit.async_overhead",
            f"Asynchronous commit-boundary verification costs at most {100 * TARGET_OVERHEAD:.0f}% of "
            f"graph-captured decode time at interval {TARGET_INTERVAL}, at every batch size measured.",
            bool(gpu) and graphs and i == TARGET_INTERVAL and worst <= TARGET_OVERHEAD,
            f"at most {100 * worst:.2f}% at interval {i} over batch sizes {_batches(rows)} on {where}, "
            f"against {baseline}",
        ))
    if ("commit_async", 1) in timing:
        worst = max(_timing(rows, b)[("commit_async", 1)]["overhead"] for b in _batches(rows))
        result.append(Claim(
            "commit.async_overhead_every_step",
            f"Committing after every decode step asynchronously costs at most "
            f"{100 * TARGET_OVERHEAD_EVERY_STEP:.0f}% of graph-captured decode time.",
            bool(gpu) and graphs and worst <= TARGET_OVERHEAD_EVERY_STEP,
            f"at most {100 * worst:.2f}% at interval 1 over batch sizes {_batches(rows)} on {where}, "
            f"against {baseline}",
        ))
    if ("per_step_copy_cpu", 1) in timing:
        copy = timing[("per_step_copy_cpu", 1)]["overhead"]
        ref = timing[("commit_async", i)]["overhead"] if i is not None else None
        result.append(Claim(
            "commit.per_step_copy",
            "Copying every step's new KV to the host and hashing it there costs far more than "
            "hashing on the GPU at commit boundaries (reported as a ratio of decode times).",
            bool(gpu) and ref is not None and copy > max(ref, 0.0) + 0.05,
            f"per-step copy+CPU hash: {1 + copy:.2f}x the decode time without verification; "
            + (f"async commit at interval {i}: {1 + ref:.3f}x" if ref is not None else "no async run")
            + f" ({where}; the design brief quotes ~30x)",
        ))
    t = _tamper(rows)
    if t["flips"]:
        result.append(Claim(
            "commit.tamper_detection",
            "Every single-bit flip in a committed page or an anchor page is detected and localized "
            "to its page by a Merkle proof, with no false alarm on the untouched cache.",
            t["detected"] == t["localized"] == t["flips"] and t["anchor_flips"] > 0 and t["false_positive"] == 0,
            f"{t['detected']}/{t['flips']} detected, {t['localized']}/{t['flips']} localized "
            f"({t['anchor_flips']} in anchor pages), {t['false_positive']} false alarms",
        ))
    return result
