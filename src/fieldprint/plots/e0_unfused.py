"""E0 figure (one column): intermediate bytes written (left) and time per call (right) of the
unfused forms and the single pass, against context length.

The bytes axis is symmetric-log: linear from 0 up to the decade below the smallest nonzero count,
logarithmic above, so the single pass's zero-byte points (no split below one split-KV chunk) are
drawn on a labelled "0" line instead of vanishing. The naive and two-softmax forms write almost
the same bytes; :func:`~fieldprint.plots.style.line_style` keeps both visible.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter

from fieldprint.plots.style import implementation, line_style, printed_figure, save, source_label, tokens_axis

ORDER = ["naive", "two_softmax", "sdpa_fused"]


def series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, int, float]]]:
    """form -> [(context, intermediate bytes, ms)] sorted by context, forms in figure order."""
    out: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for r in rows:
        implementation(r["form"])  # an unknown form would be drawn without a legend entry
        out[r["form"]].append((r["context"], r["intermediate_bytes"], r["ms"]))
    order = [f for f in ORDER if f in out] + sorted(set(out) - set(ORDER))
    return {f: sorted(out[f]) for f in order}


def zero_threshold(byte_counts) -> float:
    """The symlog axis's linear range: up to the decade at or below the smallest nonzero count."""
    positive = [b for b in byte_counts if b > 0]
    if not positive:
        raise ValueError("e0_unfused: every intermediate_bytes is 0; nothing to put on a log axis")
    return 10.0 ** math.floor(math.log10(min(positive)))


def _bytes_ticks(ax, linthresh: float, top: float) -> None:
    decades = [10.0 ** e for e in range(int(math.log10(linthresh)), math.ceil(math.log10(top)) + 1)]
    ax.yaxis.set_major_locator(FixedLocator([0.0, *decades]))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda y, _: "0" if y == 0 else f"$10^{{{round(math.log10(y))}}}$"))


def draw(rows: list[dict[str, Any]], manifest: dict[str, Any], out_stem) -> None:
    by_form = series(rows)
    counts = [p[1] for pts in by_form.values() for p in pts]
    linthresh = zero_threshold(counts)

    fig = printed_figure(height=2.55)
    ax_bytes, ax_ms = fig.subplots(1, 2)
    for form, pts in by_form.items():
        ctx = [p[0] for p in pts]
        ax_bytes.plot(ctx, [p[1] for p in pts], **line_style(form))
        ax_ms.plot(ctx, [p[2] for p in pts], **line_style(form))
    ax_bytes.set_yscale("symlog", linthresh=linthresh, linscale=0.4)
    ax_bytes.set_ylim(bottom=-0.08 * linthresh)
    _bytes_ticks(ax_bytes, linthresh, max(counts))
    zeros = [(p[0], form) for form, pts in by_form.items() for p in pts if p[1] == 0]
    if zeros:
        ax_bytes.annotate("0 B", (zeros[-1][0], 0), xytext=(5, 3), textcoords="offset points",
                          color=implementation(zeros[-1][1]).color, fontsize=7)
    ax_bytes.set(xlabel="context tokens", ylabel="intermediate bytes written")
    ax_ms.set(yscale="log", xlabel="context tokens", ylabel="ms per call (median)")
    for ax in (ax_bytes, ax_ms):
        tokens_axis(ax)
    fig.suptitle(source_label(manifest), fontsize=7, x=0.98, ha="right")

    handles = [Line2D([], [], label=implementation(form).label, **line_style(form)) for form in by_form]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False,
               columnspacing=1.0, handletextpad=0.4)
    save(fig, out_stem)
