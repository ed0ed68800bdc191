"""E1 figure (full text width): decode bandwidth per implementation at four (batch, context)
shapes, the strong paged baselines' bandwidth as the number of anchors grows, and the
shared-prefix regime.

Top left: one marker per implementation and shape, side by side within each shape (the shapes
are categories, so nothing joins them), log scale, with a vertical bar over the interquartile
range of the repetitions where the results record it; a dashed segment marks contiguous cuDNN
SDPA across each shape. Top right: one panel per shape, bars per implementation at each anchor count,
on a linear axis from zero. These rows: decode, bf16 KV. Bottom: shared-prefix decode (mode
``shared_decode``, bf16 KV), per (B, L, A, group) shape bars per implementation of the bandwidth
over unique bytes (each shared anchor page once), log scale, with the same time's
bandwidth over logical bytes (anchors once per sequence) marked on each bar; results without
shared-prefix rows (written before the regime existed) draw the panel saying so.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from fieldprint.plots.style import implementation, printed_figure, save, source_label, tokens_label

ORDER = ["fused", "fused_groups", "fused_pipelined", "fused_hdn", "cudnn_sdpa", "flash_sdpa", "flashinfer_decode",
         "gather_sdpa", "cascade", "flashinfer_cascade", "prefix_blocks", "flex", "naive", "two_softmax"]
VS_ANCHORS = ["fused", "cascade", "prefix_blocks", "flashinfer_decode", "cudnn_sdpa"]
# what issue 12's shared targets compare
SHARED = ["fused", "fused_groups", "fused_pipelined", "cascade", "flashinfer_cascade", "prefix_blocks",
          "flashinfer_decode"]
LOGICAL_MARK = {"marker": "_", "color": "k", "markersize": 7, "markeredgewidth": 1.2, "linestyle": "none"}
CEILING = "cudnn_sdpa"
GROUP_WIDTH = 0.8  # of the unit spacing between two categories


def decode_bandwidth(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int, int], float]:
    """(impl, batch, context, anchors) -> TB/s of the measured decode rows with bf16 KV."""
    out = {}
    for r in rows:
        if r["mode"] == "decode" and r["kv_dtype"] == "bf16" and r["tbps"] is not None:
            out[(r["impl"], r["batch"], r["context"], r["anchors"])] = r["tbps"]
    return out


def decode_spread(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int, int], tuple[float, float]]:
    """(impl, batch, context, anchors) -> (low, high) TB/s of the measured decode rows with bf16
    KV that record the quartiles of their repetitions (the bandwidth at the third and first
    quartile of the time); rows written before the quartiles were recorded have none."""
    out = {}
    for r in rows:
        if (r["mode"] == "decode" and r["kv_dtype"] == "bf16" and r["tbps"] is not None
                and r.get("ms_q1") is not None and r.get("ms_q3") is not None):
            out[(r["impl"], r["batch"], r["context"], r["anchors"])] = (r["tbps"] * r["ms"] / r["ms_q3"],
                                                                         r["tbps"] * r["ms"] / r["ms_q1"])
    return out


def shared_bandwidth(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int, int, int], tuple[float, float]]:
    """(impl, batch, context, anchors, group) -> (unique TB/s, logical TB/s) of the measured
    shared-prefix decode rows with bf16 KV of the implementations in :data:`SHARED`."""
    out = {}
    for r in rows:
        if (r["mode"] == "shared_decode" and r["kv_dtype"] == "bf16" and r["impl"] in SHARED
                and r["unique_tbps"] is not None):
            out[(r["impl"], r["batch"], r["context"], r["anchors"], r["share_group"])] = (r["unique_tbps"], r["tbps"])
    return out


def shape_label(batch: int, context: int, sep: str = "\n") -> str:
    return f"B={batch}{sep}L={tokens_label(context)}"


def offsets(n: int) -> list[float]:
    """x offsets of ``n`` side-by-side items centred on their category."""
    step = GROUP_WIDTH / n
    return [(i - (n - 1) / 2) * step for i in range(n)]


def impls_in_order(present) -> list[str]:
    """The implementations in ``present``, in the figure's order (unknown ones are an error)."""
    for name in present:
        implementation(name)
    return [i for i in ORDER if i in present] + sorted(set(present) - set(ORDER))


def _by_shape(ax, bw, spread, shapes, anchors) -> list[str]:
    impls = impls_in_order({k[0] for k in bw if k[3] == anchors})
    dx = offsets(len(impls))
    for g, (b, c) in enumerate(shapes):
        ceiling = bw.get((CEILING, b, c, anchors))
        if ceiling is not None:
            ax.hlines(ceiling, g - GROUP_WIDTH / 2, g + GROUP_WIDTH / 2, colors="k", linestyles="--",
                      linewidth=0.8)
        for name, off in zip(impls, dx, strict=True):
            y = bw.get((name, b, c, anchors))
            if y is not None:
                look = implementation(name)
                ax.plot([g + off], [y], linestyle="none", marker=look.marker, color=look.color,
                        markersize=4.5)
                lo, hi = spread.get((name, b, c, anchors), (y, y))
                if hi > lo:  # the interquartile range of the repetitions (often within the marker)
                    ax.vlines(g + off, lo, hi, colors=look.color, linewidth=0.8)
    for g in range(1, len(shapes)):
        ax.axvline(g - 0.5, color="0.85", linewidth=0.6)
    ax.set_xticks(range(len(shapes)), [shape_label(b, c) for b, c in shapes])
    ax.set_xlim(-0.5, len(shapes) - 0.5)
    ax.grid(axis="x", visible=False)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())  # 1-2-5 majors suffice; minors would use 10^x
    ax.set_ylabel("bandwidth (TB/s)")
    ax.set_title(f"decode, {anchors} anchors, bf16 KV (log scale)", loc="left")
    return impls


def _vs_anchors(axes, bw, shapes) -> list[str]:
    impls = impls_in_order({k[0] for k in bw if k[0] in VS_ANCHORS})
    anchors = sorted({k[3] for k in bw})
    dx = offsets(len(impls))
    width = GROUP_WIDTH / len(impls)
    for ax, (b, c) in zip(axes, shapes, strict=True):
        for name, off in zip(impls, dx, strict=True):
            look = implementation(name)
            xs = [i + off for i, a in enumerate(anchors) if (name, b, c, a) in bw]
            ys = [bw[(name, b, c, a)] for a in anchors if (name, b, c, a) in bw]
            ax.bar(xs, ys, width, color=look.color, edgecolor="white", linewidth=0.3)
        ax.set_xticks(range(len(anchors)), [tokens_label(a) for a in anchors])
        ax.set_xlim(-0.5, len(anchors) - 0.5)
        ax.grid(axis="x", visible=False)
        ax.set_title(shape_label(b, c, sep=", "))
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("bandwidth (TB/s)")
    return impls


def _shared(ax, sbw) -> list[str]:
    """Bars of unique TB/s per implementation at each shared shape, logical TB/s marked. Log
    scale: logical bytes exceed unique ones up to the group size times (a linear axis would
    flatten the bars), and the targets are speed ratios, which a log axis shows as distances."""
    if not sbw:
        ax.set_title("shared-prefix decode, bf16 KV", loc="left")
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no shared-prefix rows in these results (not measured)", ha="center",
                va="center", transform=ax.transAxes)
        return []
    shapes = sorted({k[1:] for k in sbw}, key=lambda s: (s[2], s[1], s[0], s[3]))
    ax.set_title("shared-prefix decode, bf16 KV (log scale): bars over unique bytes, "
                 "ticks over logical bytes", loc="left")
    impls = impls_in_order({k[0] for k in sbw})
    dx = offsets(len(impls))
    width = GROUP_WIDTH / len(impls)
    # bars rise from a floor below every value: on a log axis there is no zero
    floor = 10 ** math.floor(math.log10(min(u for u, _ in sbw.values()) / 1.5))
    for name, off in zip(impls, dx, strict=True):
        at = [(g + off, sbw[(name, *s)]) for g, s in enumerate(shapes) if (name, *s) in sbw]
        xs = [x for x, _ in at]
        ax.bar(xs, [u - floor for _, (u, _) in at], width, bottom=floor, color=implementation(name).color,
               edgecolor="white", linewidth=0.3)
        ax.plot(xs, [lg for _, (_, lg) in at], **LOGICAL_MARK)
    for g in range(1, len(shapes)):
        ax.axvline(g - 0.5, color="0.85", linewidth=0.6)
    # three short lines: seven shapes share the text width, and one line each overran its neighbours
    ax.set_xticks(range(len(shapes)), [f"B={b}, L={tokens_label(c)}\nA={tokens_label(a)}\n{g} per prefix"
                                       for b, c, a, g in shapes])
    ax.set_xlim(-0.5, len(shapes) - 0.5)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor, top=max(lg for _, lg in sbw.values()) * 1.5)
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("bandwidth (TB/s)")
    return impls


def draw(rows: list[dict[str, Any]], manifest: dict[str, Any], out_stem) -> None:
    bw = decode_bandwidth(rows)
    if not bw:
        raise ValueError("e1_throughput: no measured decode rows with bf16 KV to plot")
    shapes = sorted({(k[1], k[2]) for k in bw}, key=lambda s: (s[1], -s[0]))
    present = {k[3] for k in bw}
    a_plot = 64 if 64 in present else max(present)
    sbw = shared_bandwidth(rows)

    fig = printed_figure(height=4.9 if sbw else 4.0, wide=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.75, 2.15 if sbw else 1.25], hspace=0.02)
    left, right = top.subfigures(1, 2, width_ratios=[1.0, 1.45], wspace=0.02)
    shown = _by_shape(left.subplots(), bw, decode_spread(rows), shapes, a_plot)
    right_axes = right.subplots(1, len(shapes), sharey=True, squeeze=False)[0]
    shown_right = _vs_anchors(list(right_axes), bw, shapes)
    right.suptitle(f"decode, bf16 KV, vs anchors — {source_label(manifest)}", fontsize=8)
    right.supxlabel("anchor tokens", fontsize=8)
    shown_shared = _shared(bottom.subplots(), sbw)

    handles = [Line2D([], [], linestyle="none", marker=implementation(n).marker,
                      color=implementation(n).color, markersize=5, label=implementation(n).label)
               for n in impls_in_order(set(shown) | set(shown_right) | set(shown_shared))]
    if CEILING in shown:
        handles.append(Line2D([], [], color="k", linestyle="--", linewidth=0.8,
                              label="cuDNN SDPA level (top left)"))
    if shown_shared:
        handles.append(Line2D([], [], label="over logical bytes (bottom)", **LOGICAL_MARK))
    fig.legend(handles=handles, loc="outside lower center", ncol=4, frameon=False,
               columnspacing=1.0, handletextpad=0.3)
    save(fig, out_stem)
