"""E3 figure: throughput (GB/s of input) vs input bytes, log-log, one line per implementation.

Every series has its own colour and its own marker (`SERIES`), fixed whatever subset a run
has, so no two lines share a look at print size; line styles group the kinds (solid: GPU
hashing, dash-dot: the quantizer and the fused launch, dotted: CPU hashing, dashed: copies).
The three-pass quantize + hash path is a hatched band over all its cases."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from fieldprint.plots.style import figure, save, source_label


class Look(NamedTuple):
    label: str
    color: str
    marker: str
    line: str


QUANT_SHOWN = (("e4m3", "rne"), ("e4m3", "two_grid"))
# series key: an impl, or (impl, fmt, rounding) for the quantizing impls of QUANT_SHOWN
SERIES: dict[str | tuple[str, str, str], Look] = {
    "blake3_gpu": Look("BLAKE3 GPU (one message)", "tab:blue", "o", "-"),
    "blake3_many_gpu": Look("BLAKE3 GPU (16K-elem. bf16 pages)", "tab:cyan", "s", "-"),
    ("quant_gpu", "e4m3", "rne"): Look("quantizer alone (e4m3 rne)", "tab:green", "^", "-."),
    ("quant_gpu", "e4m3", "two_grid"): Look("quantizer alone (e4m3 two_grid)", "tab:olive", "v", "-."),
    ("fused_quant_blake3_gpu", "e4m3", "rne"): Look("fused quantize+BLAKE3 (e4m3 rne)", "tab:red", "D", "-."),
    ("fused_quant_blake3_gpu", "e4m3", "two_grid"): Look("fused quantize+BLAKE3 (e4m3 two_grid)",
                                                         "tab:purple", "P", "-."),
    "d2d_copy": Look("memory copy (read+write)", "tab:gray", "x", "--"),
    "blake3_cpu_1t": Look("BLAKE3 CPU, 1 thread", "tab:brown", "<", ":"),
    "blake3_cpu_all": Look("BLAKE3 CPU, all threads", "tab:orange", ">", ":"),
    "sha256_cpu_1t": Look("SHA-256 CPU, 1 thread", "tab:pink", "*", ":"),
    "d2h_pinned_blake3": Look("copy to host (pinned) + CPU BLAKE3", "black", "h", "--"),
    "d2h_pageable_blake3": Look("copy to host (pageable) + CPU BLAKE3", "#e6ab02", "p", "--"),
}
BAND_IMPL = "quant_blake3_gpu"  # drawn as a band: min..max over every case


def _timed(rows):
    """Rows that are speeds: measured ('ok'), not one interpreter call."""
    return [r for r in rows if r["status"] == "ok" and r["backend"] != "triton-interpreter"]


def _key(row):
    """The `SERIES` key of a row, or None when it is not drawn as a line."""
    case = (row["impl"], row["fmt"], row["rounding"])
    return case if case in SERIES else row["impl"] if row["impl"] in SERIES else None


def draw(rows, manifest, out_stem) -> None:
    series = defaultdict(list)
    band = defaultdict(list)  # bytes -> three-pass quantize + hash GB/s of every case
    for r in _timed(rows):
        if r["impl"] == BAND_IMPL:
            band[r["bytes"]].append(r["gbps"])
        elif (key := _key(r)) is not None:
            series[key].append((r["bytes"], r["gbps"]))
    fig, axes = figure(height=2.4)
    ax = axes[0][0]
    if band:
        xs = sorted(band)
        ax.fill_between(xs, [min(band[x]) for x in xs], [max(band[x]) for x in xs], facecolor="none",
                        edgecolor="0.55", hatch="////", linewidth=0.0,
                        label="three-pass quantize + BLAKE3, all cases")
    for key, look in SERIES.items():  # the table's order: the legend's order
        if key in series:
            pts = sorted(series[key])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], look.line, marker=look.marker,
                    markersize=3.5, linewidth=1.0, color=look.color, label=look.label)
    ax.set(xscale="log", yscale="log", xlabel="input bytes", ylabel="GB/s of input")
    ax.set_title(source_label(manifest), loc="right")
    ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    save(fig, out_stem)
