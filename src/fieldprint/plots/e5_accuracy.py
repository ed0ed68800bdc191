"""E5 figure: what each KV storage format and rounding costs.

Top: increase of validation bits per byte over the float32-KV reference (in percent of the
reference), anchors stored in the format (filled) or kept in float32 (hatched); error bars span
the seeds of stochastic rounding (min to max). Bottom: relative error of attention outputs at
Llama-like shapes on synthetic data (log scale), same bars.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from fieldprint.plots.style import printed_figure, save, source_label

ORDER = ["bf16:rne", "fp16:rne", "e4m3:rne", "e4m3:trunc", "e4m3:stochastic", "e4m3:two_grid",
         "e5m2:rne", "e5m2:trunc", "e5m2:stochastic", "int8:rne", "int8:two_grid"]
FLOAT_ATTENTION = ("reference", "naive")  # the grid; kernel rows are a separate check
SHORT = {"rne": "RNE", "trunc": "trunc", "stochastic": "SR", "two_grid": "2-grid"}


def _label(item: str) -> str:
    fmt, _, rounding = item.partition(":")
    return f"{fmt} {SHORT.get(rounding, rounding)}"


def grid(rows: list[dict[str, Any]], kind: str, value) -> dict[tuple[str, bool], list[float]]:
    """(fmt:rounding, anchors_quantized) -> values over seeds, float-attention rows only."""
    out: dict[tuple[str, bool], list[float]] = defaultdict(list)
    for r in rows:
        if r["kind"] != kind or r["fmt"] == "reference":
            continue
        if r["attention"] not in FLOAT_ATTENTION:
            continue
        out[(f"{r['fmt']}:{r['rounding']}", r["anchors_quantized"])].append(value(r))
    return out


def reference_bpb(rows: list[dict[str, Any]]) -> float:
    refs = [r["bpb"] for r in rows if r["kind"] == "lm" and r["fmt"] == "reference"]
    if len(refs) != 1:
        raise ValueError(f"expected one reference row, found {len(refs)}")
    return refs[0]


def _bars(ax, data: dict[tuple[str, bool], list[float]], labels: list[str]) -> None:
    width = 0.4
    for offset, aq, hatch in ((-width / 2, True, None), (width / 2, False, "///")):
        xs, means, lo, hi = [], [], [], []
        for i, lab in enumerate(labels):
            vals = data.get((lab, aq))
            if not vals:
                continue
            m = statistics.fmean(vals)
            xs.append(i + offset)
            means.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
        ax.bar(xs, means, width, hatch=hatch, color="C0" if aq else "white", edgecolor="C0",
               linewidth=0.6, label="anchors in format" if aq else "anchors float32")
        spread = [i for i in range(len(xs)) if lo[i] or hi[i]]  # seeds of random rounding
        if spread:
            ax.errorbar([xs[i] for i in spread], [means[i] for i in spread],
                        yerr=[[lo[i] for i in spread], [hi[i] for i in spread]],
                        fmt="none", ecolor="black", elinewidth=0.6, capsize=1.5)


def draw(rows: list[dict[str, Any]], manifest: dict[str, Any], out_stem) -> None:
    ref = reference_bpb(rows)
    lm = grid(rows, "lm", lambda r: 100 * (r["bpb"] - ref) / ref)
    attn = grid(rows, "attention", lambda r: r["rel_err"])
    labels = [lab for lab in ORDER if any(k[0] == lab for k in lm)]
    labels += sorted({k[0] for k in lm} - set(labels))
    fig = printed_figure(height=3.9)
    top, bottom = fig.subplots(2, 1, sharex=True)
    _bars(top, lm, labels)
    top.axhline(0, color="black", linewidth=0.5)
    top.set_ylabel("bits/byte increase (%)")
    top.set_title(f"KV storage format vs accuracy (reference {ref:.3f} bits/byte)\n"
                  f"{source_label(manifest)}", fontsize=7)
    top.legend(loc="upper left", frameon=False)
    _bars(bottom, attn, labels)
    bottom.set_yscale("log")
    bottom.set_ylabel("attention rel. error")
    # upright, eleven labels would overlap at 7 pt in one column
    bottom.set_xticks(range(len(labels)), [_label(lab) for lab in labels], rotation=90)
    bottom.set_xlim(-0.6, len(labels) - 0.4)
    save(fig, out_stem)
