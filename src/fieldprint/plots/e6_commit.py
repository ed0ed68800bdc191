"""E6 figure: decode overhead of each verification mode vs the commit interval, one column per
batch size (linear axes; error bars from the repetitions' quartiles). Top row: every mode; bottom
row: the commit modes near the targets (a few percent), each point above that range marked at the
top edge with its value."""

from __future__ import annotations

from matplotlib.lines import Line2D

from fieldprint.plots.style import figure, save, source_label
from fieldprint.report.e6_commit import COMMIT, MODE_LABELS, PER_STEP, TARGET_INTERVAL, TARGETS, graph_captured

LOOK = {  # mode -> (colour, line style, marker)
    "per_step_copy_cpu": ("C3", "--", None),
    "per_step_gpu": ("C1", "-.", None),
    "commit_sync": ("C0", "-", "o"),
    "commit_async": ("C2", "-", "s"),
}
TARGET_LOOK = {TARGET_INTERVAL: ("0.25", ":"), 1: ("0.55", (0, (1, 2)))}  # interval -> (colour, style)
DODGE = 2 ** 0.06  # commit_sync and commit_async drawn a little left and right of each interval
ZOOM_PCT = (-1.0, 5.0)  # the bottom row's range: the targets (1% and 3%) and what is near them


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _ylim(timing: list[dict]) -> tuple[float, float]:
    """The y range (%): the commit modes' quartiles, the targets and zero, with a margin; a
    per-step level joins it only where that keeps at least half the commit range's resolution."""
    ys = [100 * t for t in TARGETS.values()] + [0.0]
    for r in timing:
        if r["mode"] in COMMIT:
            ys += [_pct(r[k]) for k in ("overhead", "overhead_q1", "overhead_q3") if r[k] is not None]
    hi = max(ys)
    ys += [y for y in (_pct(r["overhead"]) for r in timing if r["mode"] in PER_STEP) if y <= 2 * hi]
    lo, hi = min(ys), max(ys)
    pad = 0.08 * (hi - lo)
    return lo - pad, hi + pad


def _panel(ax, timing: list[dict], intervals: list[int]) -> list[str]:
    """Draw one batch size's rows; returns a note for each per-step mode beyond the y range."""
    commit_rows = [r for r in timing if r["mode"] in COMMIT]
    lo, hi = _ylim(timing)
    off_scale = []
    for mode in PER_STEP:
        rows = [r for r in timing if r["mode"] == mode]
        if not rows:
            continue
        color, ls, _ = LOOK[mode]
        y = _pct(rows[0]["overhead"])  # independent of the interval: a level line
        if lo <= y <= hi:
            ax.axhline(y, color=color, ls=ls, lw=1.2)
        else:
            off_scale.append(f"{MODE_LABELS[mode]}: {y:+.1f}% (off scale)")
    for mode, shift in (("commit_sync", 1 / DODGE), ("commit_async", DODGE)):
        pts = sorted((r for r in commit_rows if r["mode"] == mode), key=lambda r: r["interval"])
        if not pts:
            continue
        color, ls, marker = LOOK[mode]
        xs = [r["interval"] * shift for r in pts]
        ys = [_pct(r["overhead"]) for r in pts]
        have_q = all(r["overhead_q1"] is not None and r["overhead_q3"] is not None for r in pts)
        # error bars: from the lower to the upper quartile (none where the run has no quartiles)
        yerr = ([[100 * (r["overhead"] - r["overhead_q1"]) for r in pts],
                 [100 * (r["overhead_q3"] - r["overhead"]) for r in pts]] if have_q else None)
        ax.errorbar(xs, ys, yerr=yerr, color=color, ls=ls, marker=marker, ms=3.5, lw=1.2, capsize=2.5)
    for interval, target in TARGETS.items():
        color, ls = TARGET_LOOK[interval]
        ax.axhline(100 * target, color=color, ls=ls, lw=1.0)
    ax.axhline(0.0, color="0.6", lw=0.6)
    # room above the data for the note on the per-step modes beyond the axis
    ax.set_ylim(lo, hi + (0.12 + 0.1 * len(off_scale)) * (hi - lo) if off_scale else hi)
    ax.set_xscale("log", base=2)
    ax.set_xticks(intervals, [str(i) for i in intervals])
    ax.minorticks_off()
    ax.set_xlabel("commit interval (decode steps)")
    return off_scale


def _zoom(ax, timing: list[dict], intervals: list[int]) -> None:
    """The commit modes within ``ZOOM_PCT``, with the targets; points above it become a marker at
    the top edge labelled with their median."""
    lo, hi = ZOOM_PCT
    # labels of clipped points: the synchronous mode's left of its marker, the asynchronous right
    for mode, shift, dx, ha in (("commit_sync", 1 / DODGE, -3, "right"), ("commit_async", DODGE, 3, "left")):
        pts = sorted((r for r in timing if r["mode"] == mode), key=lambda r: r["interval"])
        color, ls, marker = LOOK[mode]
        inside = [r for r in pts if _pct(r["overhead"]) <= hi]
        if inside:
            have_q = all(r["overhead_q1"] is not None and r["overhead_q3"] is not None for r in inside)
            yerr = ([[100 * (r["overhead"] - r["overhead_q1"]) for r in inside],
                     [100 * (r["overhead_q3"] - r["overhead"]) for r in inside]] if have_q else None)
            ax.errorbar([r["interval"] * shift for r in inside], [_pct(r["overhead"]) for r in inside],
                        yerr=yerr, color=color, ls="none", marker=marker, ms=3.5, capsize=2.5)
        for r in pts:
            if _pct(r["overhead"]) > hi:
                x = r["interval"] * shift
                ax.plot([x], [hi], color=color, marker="^", ms=4, clip_on=False)
                ax.annotate(f"{_pct(r['overhead']):.0f}%", (x, hi), xytext=(dx, -6), textcoords="offset points",
                            ha=ha, va="top", fontsize=7, color=color)
    for interval, target in TARGETS.items():
        color, ls = TARGET_LOOK[interval]
        ax.axhline(100 * target, color=color, ls=ls, lw=1.0)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_ylim(lo, hi)
    ax.set_xscale("log", base=2)
    ax.set_xticks(intervals, [str(i) for i in intervals])
    ax.minorticks_off()
    ax.set_xlabel("commit interval (decode steps)")


def _legend_handles() -> tuple[list, list[str]]:
    handles, labels = [], []
    for mode in (*COMMIT, *PER_STEP):
        color, ls, marker = LOOK[mode]
        handles.append(Line2D([], [], color=color, ls=ls, marker=marker, ms=3.5, lw=1.2))
        labels.append(MODE_LABELS[mode] + (" (level: any interval)" if mode in PER_STEP else ""))
    for interval, target in TARGETS.items():
        color, ls = TARGET_LOOK[interval]
        handles.append(Line2D([], [], color=color, ls=ls, lw=1.0))
        labels.append(f"target {100 * target:g}% (side stream, interval {interval})")
    return handles, labels


def draw(rows: list[dict], manifest: dict, out_stem) -> None:
    timing = [r for r in rows if r["kind"] == "timing"]
    batches = sorted({r["batch"] for r in timing})
    if not batches:
        raise ValueError("rows: no timing rows to draw")
    intervals = sorted({r["interval"] for r in timing if r["mode"] in COMMIT}) or [1]
    # the full text width (the paper prints it at its size in a figure*), one panel per batch size
    fig, axes = figure(ncols=len(batches), nrows=2, wide=True, height=2.1)
    for col, b in enumerate(batches):
        ax = axes[0][col]
        off_scale = _panel(ax, [r for r in timing if r["batch"] == b], intervals)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("")
        if off_scale:  # per-step modes beyond the axis: their value, not a squashed axis
            ax.text(0.03, 0.96, "\n".join(off_scale), transform=ax.transAxes, va="top", ha="left",
                    fontsize=7, bbox={"fc": "white", "ec": "0.7", "lw": 0.5})
        _zoom(axes[1][col], [r for r in timing if r["batch"] == b], intervals)
    axes[0][0].set_ylabel("decode overhead vs\nno verification (%)")
    axes[1][0].set_ylabel("near the targets (%)")
    r0 = timing[0]
    baseline = "graph-captured decode" if graph_captured(rows) else "eager decode"
    fig.suptitle(f"context {r0['context']}, {r0['layers']} layers, against {baseline}; "
                 f"{source_label(manifest)}", fontsize=8)
    handles, labels = _legend_handles()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    fig.tight_layout()
    save(fig, out_stem)
