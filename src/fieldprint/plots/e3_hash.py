"""E3 figure: throughput (GB/s of input) vs input bytes, log-log, one line per implementation."""

from __future__ import annotations

from collections import defaultdict

from fieldprint.plots.style import figure, save, source_label

LABELS = {
    "blake3_gpu": "BLAKE3 GPU (one message)",
    "blake3_many_gpu": "BLAKE3 GPU (16K-elem. bf16 pages)",
    "d2d_copy": "memory copy (read+write)",
    "blake3_cpu_1t": "BLAKE3 CPU, 1 thread",
    "blake3_cpu_all": "BLAKE3 CPU, all threads",
    "sha256_cpu_1t": "SHA-256 CPU, 1 thread",
    "d2h_pinned_blake3": "copy to host (pinned) + CPU BLAKE3",
    "d2h_pageable_blake3": "copy to host (pageable) + CPU BLAKE3",
}
QUANT_SHOWN = (("e4m3", "rne"), ("e4m3", "two_grid"))


def _timed(rows):
    """Rows that are speeds: measured ('ok'), not one interpreter call."""
    return [r for r in rows if r["status"] == "ok" and r["backend"] != "triton-interpreter"]


def draw(rows, manifest, out_stem) -> None:
    series = defaultdict(list)
    band = defaultdict(list)  # bytes -> quant+hash GB/s of every case
    for r in _timed(rows):
        b, g = r["bytes"], r["gbps"]
        if r["impl"] == "quant_blake3_gpu":
            band[b].append(g)
            if (r["fmt"], r["rounding"]) in QUANT_SHOWN:
                series[f"quantize ({r['fmt']} {r['rounding']}) + BLAKE3"].append((b, g))
        elif r["impl"] == "fused_quant_blake3_gpu":
            if (r["fmt"], r["rounding"]) in QUANT_SHOWN:
                series[f"fused quantize+BLAKE3 ({r['fmt']} {r['rounding']})"].append((b, g))
        elif r["impl"] in LABELS:
            series[LABELS[r["impl"]]].append((b, g))
    fig, axes = figure(height=2.4)
    ax = axes[0][0]
    if band:
        xs = sorted(band)
        ax.fill_between(xs, [min(band[x]) for x in xs], [max(band[x]) for x in xs], alpha=0.15,
                        color="C3", label="quantize + BLAKE3, all cases")
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        style = "--" if "copy" in label else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=2.5,
                label=label, color=f"C{i % 10}")
    ax.set(xscale="log", yscale="log", xlabel="input bytes", ylabel="GB/s of input")
    ax.set_title(source_label(manifest), loc="right")
    ax.legend(fontsize=5.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    save(fig, out_stem)
