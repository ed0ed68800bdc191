"""E2 figure (one column). Left: shared memory and registers per program of one compiled decode
launch at each (anchors, context) pair (categories: markers, no lines), next to the analytic
model. Right: the HBM bytes of scores and probabilities the unfused forms would write against
context, for one prefill sequence and for a decode batch, with the H200's capacity."""

from __future__ import annotations

from typing import Any

from matplotlib.lines import Line2D

from fieldprint.plots.style import (
    implementation,
    line_style,
    printed_figure,
    save,
    source_label,
    tokens_axis,
    tokens_label,
)
from fieldprint.report.e2_sram import launch_defaults, variant_knobs

H200_HBM = 141e9
FORMS = ["naive", "two_softmax"]
SMEM = {"color": "C0", "marker": "o", "label": "shared memory (KiB)"}
REGS = {"color": "C1", "marker": "s", "label": "registers / thread"}
MODEL = {"color": "k", "linestyle": "--", "linewidth": 1, "label": "model: Q + K + V tiles (KiB)"}


def model_row(rows: list[dict[str, Any]], head_dim: int, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The default decode bf16 attention variant at ``head_dim`` (whose model the flat rows
    compile), if the run compiled it."""
    defaults = launch_defaults(manifest)
    return next((r for r in rows if r["kind"] == "variant" and r["kernel"] == "attention"
                 and r["mode"] == "decode" and r["head_dim"] == head_dim and r["kv_dtype"] == "bf16"
                 and not variant_knobs(r, defaults)), None)


def _flat(ax, rows, manifest) -> None:
    flat = [r for r in rows if r["kind"] == "flat"]
    if not flat:
        raise ValueError("e2_sram: no 'flat' rows to plot")
    x = range(len(flat))
    ax.plot(x, [r["shared_bytes"] / 1024 for r in flat], linestyle="none", markersize=5, **SMEM)
    ax.plot(x, [r["registers"] for r in flat], linestyle="none", markersize=5, **REGS)
    model = model_row(rows, flat[0]["head_dim"], manifest)
    if model is not None:
        ax.axhline(model["model_bytes"] / 1024, **MODEL)
    ax.set_xticks(list(x), [f"{tokens_label(r['anchors'])}\n{tokens_label(r['context'])}" for r in flat])
    ax.set_xlim(-0.5, len(flat) - 0.5)
    ax.set_ylim(bottom=0, top=1.15 * max(max(r["registers"], r["shared_bytes"] / 1024) for r in flat))
    ax.set_xlabel("anchors / context")
    ax.set_ylabel("per program")
    ax.set_title(f"decode, D={flat[0]['head_dim']}, sm_90", fontsize=7)


def _hbm(ax, rows) -> None:
    for form in FORMS:
        for mode in ("prefill", "decode"):
            pts = sorted((r["context"], r["hbm_bytes"]) for r in rows
                         if r["kind"] == "hbm" and r["form"] == form and r["mode"] == mode)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] / 1e9 for p in pts], **line_style(form))
            if form == FORMS[0]:  # name the curve in the empty corner beside it
                batch = next(r["batch"] for r in rows if r["kind"] == "hbm" and r["mode"] == mode)
                above = mode == "prefill"
                ax.text(0.04 if above else 0.96, 0.96 if above else 0.04, f"{mode}, B={batch}",
                        transform=ax.transAxes, fontsize=7, ha="left" if above else "right",
                        va="top" if above else "bottom")
    ax.axhline(H200_HBM / 1e9, color="C3", linewidth=1)
    tokens_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("unfused intermediates (GB)")


def draw(rows: list[dict[str, Any]], manifest: dict[str, Any], out_stem) -> None:
    fig = printed_figure(height=3.0)
    ax_flat, ax_hbm = fig.subplots(1, 2, width_ratios=[1.2, 1])
    _flat(ax_flat, rows, manifest)
    _hbm(ax_hbm, rows)
    fig.suptitle(source_label(manifest), fontsize=7, x=0.98, ha="right")
    handles = [Line2D([], [], linestyle="none", **SMEM), Line2D([], [], linestyle="none", **REGS),
               Line2D([], [], **MODEL)]
    handles += [Line2D([], [], label=implementation(f).label, **line_style(f)) for f in FORMS]
    handles.append(Line2D([], [], color="C3", linewidth=1, label=f"H200 HBM {H200_HBM / 1e9:.0f} GB"))
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False,
               columnspacing=1.0, handletextpad=0.4)
    save(fig, out_stem)
