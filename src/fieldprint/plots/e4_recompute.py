"""E4 (recomputation) figure: page-digest match rate against depth, per scenario, in the default
and the batch-invariant mode (e4m3, two-grid rounding)."""

from __future__ import annotations

from collections import defaultdict

from fieldprint.plots.style import figure, save, source_label
from fieldprint.report.e4_recompute import HEADLINE

STYLE = {  # scenario -> (label, color, line style)
    "same_stack": ("same stack", "C0", "-"),
    "batch_order": ("other batch, order", "C1", "-"),
    "chunk": ("other prefill chunks", "C2", "-"),
    "prefix_hit": ("prefix-cache hit", "C4", "-"),
    "cold_prefix": ("cold prefix (no anchor pages)", "C5", "--"),
    "full_prefill": ("generated tokens prefilled", "C6", "--"),
    "split_kv": ("other split-KV length", "C7", ":"),
    "reference": ("reference attention", "C3", ":"),
    "cpu": ("CPU verifier", "C8", ":"),
}


def draw(rows: list[dict], manifest: dict, out_stem) -> None:
    fmt, rounding = HEADLINE
    rec = [r for r in rows if r["measure"] == "recompute" and (r["fmt"], r["rounding"]) == (fmt, rounding)]
    modes = [m for m in ("default", "batch_invariant") if any(r["mode"] == m for r in rec)]
    fig, axes = figure(ncols=len(modes), wide=True, height=2.4)
    for ax, mode in zip(axes[0], modes, strict=True):
        acc: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for r in rec:
            if r["mode"] == mode:
                a = acc[r["scenario"]][r["layer"]]
                a[0] += r["matched"]
                a[1] += r["pages"]
        for scenario, (label, color, ls) in STYLE.items():
            if scenario not in acc:
                continue
            layers = sorted(acc[scenario])
            ax.plot(layers, [100 * acc[scenario][i][0] / acc[scenario][i][1] for i in layers], ls,
                    color=color, marker="o", ms=2.5, lw=1.2, label=label)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("layer")
        ax.set_title(f"{mode.replace('_', '-')} mode")
    axes[0][0].set_ylabel(f"pages whose digest matches (%)\n{fmt} {rounding.replace('_', '-')}")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(f"{rec[0]['model']}, honest recomputation; {source_label(manifest)}", fontsize=8, y=1.05)
    save(fig, out_stem)
