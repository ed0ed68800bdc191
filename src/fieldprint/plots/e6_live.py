"""E6 (live) figure: detection rate of single-bit flips in live bf16 pages against the bit
position (sign, exponent, mantissa), one line per page format and rounding, anchor and context
pages side by side."""

from __future__ import annotations

from fieldprint.plots.style import figure, save, source_label
from fieldprint.report.e6_live import bit_name, cases, flip_counts

BITS = list(range(15, -1, -1))  # the bf16 word from its sign bit down
STYLE = {  # (fmt, rounding) -> (color, marker, line style); other cases get the cycle's next
    ("bf16", "rne"): ("C0", "o", "-"),
    ("e4m3", "rne"): ("C1", "s", "-"),
    ("e4m3", "two_grid"): ("C2", "^", "--"),
    ("e5m2", "two_grid"): ("C3", "v", "--"),
    ("int8", "rne"): ("C4", "D", ":"),
}


def draw(rows: list[dict], manifest: dict, out_stem) -> None:
    fig, axes = figure(ncols=2, wide=True, height=2.4)
    for ax, target in zip(axes[0], ("anchor", "context"), strict=True):
        for n, (fmt, rounding) in enumerate(cases(rows)):
            color, marker, ls = STYLE.get((fmt, rounding), (f"C{5 + n}", "x", "-"))
            rates = []
            for bit in BITS:
                t, d, _ = flip_counts(rows, fmt, rounding, target, bit=bit)
                rates.append(100 * d / t)
            ax.plot(range(len(BITS)), rates, ls, color=color, marker=marker, ms=3, lw=1.2,
                    label=f"{fmt} {rounding.replace('_', '-')}")
        for edge in (0.5, 8.5):  # sign | exponent | mantissa
            ax.axvline(edge, color="0.5", lw=0.6)
        ax.set_xticks(range(len(BITS)), [bit_name(b) for b in BITS], rotation=90)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("flipped bit of a bf16 element")
        ax.set_title(f"{target} pages")
    axes[0][0].set_ylabel("flips detected (%)")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    trials = manifest["config"]["trials"]
    fig.suptitle(f"verify_live on the live cache, {trials} random elements per bit; {source_label(manifest)}",
                 fontsize=8, y=1.04)
    save(fig, out_stem)
