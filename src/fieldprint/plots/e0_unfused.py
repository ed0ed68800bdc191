"""E0 figure: intermediate bytes and time of the unfused forms vs context."""

from __future__ import annotations

from collections import defaultdict

from fieldprint.plots.style import figure, save, source_label, tokens_axis

LABELS = {"naive": "naive (materialized)", "two_softmax": "v2.5 two-softmax", "sdpa_fused": "single pass (torch SDPA)"}


def draw(rows, manifest, out_stem) -> None:
    series = defaultdict(list)
    for r in rows:
        series[r["form"]].append((r["context"], r["intermediate_bytes"], r["ms"]))
    fig, axes = figure(ncols=2, wide=True)
    ax_bytes, ax_ms = axes[0]
    for form, pts in series.items():
        pts.sort()
        ctx = [p[0] for p in pts]
        # A single pass writes nothing below one split-KV chunk: log axes show only what is written.
        written = [p for p in pts if p[1] > 0]
        ax_bytes.plot([p[0] for p in written], [p[1] for p in written], marker="o", label=LABELS.get(form, form))
        ax_ms.plot(ctx, [p[2] for p in pts], marker="o", label=LABELS.get(form, form))
    ax_bytes.set(yscale="log", xlabel="context tokens", ylabel="intermediate bytes written")
    ax_ms.set(yscale="log", xlabel="context tokens", ylabel="ms per call (median)")
    for ax in (ax_bytes, ax_ms):
        tokens_axis(ax)
    ax_bytes.legend()
    ax_ms.set_title(source_label(manifest), loc="right")
    save(fig, out_stem)
