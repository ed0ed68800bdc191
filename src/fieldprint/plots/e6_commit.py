"""E6 figure: decode overhead of each verification mode vs the commit interval."""

from __future__ import annotations

from matplotlib.ticker import FuncFormatter

from fieldprint.plots.style import figure, save, source_label
from fieldprint.report.e6_commit import TARGET_OVERHEAD

STYLE = {
    "per_step_copy_cpu": ("per-step copy + CPU hash", "C3", "--"),
    "per_step_gpu": ("per-step GPU hash (sync)", "C1", "--"),
    "commit_sync": ("commit, same stream", "C0", "-"),
    "commit_async": ("commit, side stream", "C2", "-"),
}


def draw(rows: list[dict], manifest: dict, out_stem) -> None:
    first = min(r["batch"] for r in rows if r["kind"] == "timing")  # the smallest batch size
    timing = [r for r in rows if r["kind"] == "timing" and r["batch"] == first]
    intervals = sorted({r["interval"] for r in timing if r["mode"].startswith("commit")}) or [1]
    fig, axes = figure()
    ax = axes[0][0]
    for mode, (label, color, ls) in STYLE.items():
        pts = sorted((r["interval"], 100 * r["overhead"]) for r in timing if r["mode"] == mode)
        if not pts:
            continue
        if mode.startswith("per_step"):  # independent of the interval: a level line
            ax.plot([intervals[0], intervals[-1]], [pts[0][1]] * 2, ls, color=color, label=label)
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3, color=color, label=label)
    ax.axhline(100 * TARGET_OVERHEAD, color="0.4", lw=0.8, ls=":", label="target (interval 16)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(intervals, [str(i) for i in intervals])
    ax.set_xlabel("commit interval (decode steps)")
    ax.set_ylabel("decode overhead vs no verification (%)")
    r0 = timing[0]
    ax.set_title(f"B={r0['batch']}, context {r0['context']}, {r0['layers']} layers; {source_label(manifest)}")
    ax.legend(loc="best", frameon=False)
    save(fig, out_stem)
