"""E4 figure: page-digest match rate per format and rounding (bf16-stored K, each honest
recomputation), measured (filled) next to the independent-flip theory (open)."""

from __future__ import annotations

from fieldprint.plots.style import figure, save, source_label

SHOWN_DTYPE = "bfloat16"


def draw(rows, manifest, out_stem) -> None:
    ok = [r for r in rows if r["status"] == "ok" and r["out_dtype"] == SHOWN_DTYPE
          and r["variant"] != "rehash"]  # rehash is 100% by construction (stated in the text)
    cases = list(dict.fromkeys(f"{r['fmt']}/{r['rounding']}" for r in ok))
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    pages = sorted({r["page_elems"] for r in ok})
    fig, axes = figure(nrows=max(len(pages), 1), height=1.7)
    width = 0.8 / max(len(variants), 1)
    for ax, n in zip((a[0] for a in axes), pages, strict=False):
        for j, v in enumerate(variants):
            pts = {f"{r['fmt']}/{r['rounding']}": r for r in ok
                   if r["variant"] == v and r["page_elems"] == n}
            xs = [i - 0.4 + (j + 0.5) * width for i, c in enumerate(cases) if c in pts]
            got = [pts[c] for c in cases if c in pts]
            ax.scatter(xs, [100 * r["match_rate"] for r in got], s=10, color=f"C{j}",
                       label=v)
            ax.scatter(xs, [100 * r["theory_match"] for r in got], s=18,
                       facecolors="none", edgecolors=f"C{j}", linewidths=0.6)
        ax.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=5.5)
        ax.tick_params(labelbottom=n == pages[-1])
        ax.set(ylabel="pages matching (%)", ylim=(-5, 105))
        ax.set_title(f"{n:,}-element pages (bf16-stored K); open: theory $(1-p)^n$", loc="left",
                     fontsize=6)
    fig.suptitle(source_label(manifest), fontsize=6, x=0.98, ha="right")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=5.5, ncol=3, loc="upper center",
               bbox_to_anchor=(0.5, -0.14))
    save(fig, out_stem)
