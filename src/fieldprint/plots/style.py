"""One look for every figure, and deterministic files (fixed fonts and metadata).

A paper figure is drawn at the size the paper prints it (:func:`printed_figure`): one IEEEtran
column, or the full text width for a ``figure*``. Its file keeps exactly that size, so a font
size in points here is the size on the page, and :func:`save` refuses a printed figure with any
text smaller than :data:`MIN_FONT_PT`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.layout_engine import ConstrainedLayoutEngine  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from fieldprint.results import atomic_write_bytes  # noqa: E402

matplotlib.rcParams.update(
    {
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "font.size": 8,
        "axes.titlesize": 8,
        "axes.labelsize": 8,
        "legend.fontsize": 7,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "figure.dpi": 150,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "svg.hashsalt": "fieldprint",
    }
)

TEX_PT = 1 / 72.27  # inches per TeX point
COLUMN_WIDTH = 252 * TEX_PT  # IEEEtran \columnwidth (two-column): include with width=\columnwidth
TEXT_WIDTH = 516 * TEX_PT  # IEEEtran \textwidth: a figure* included with width=\textwidth
MIN_FONT_PT = 7.0  # smallest text a printed figure may carry


class Impl(NamedTuple):
    """How one attention implementation looks in every figure that shows it."""

    label: str
    color: str
    marker: str


# One entry per implementation or unfused form in the results (``impl`` in E1, ``form`` in E0
# and E2), so that a form has the same name, colour and marker in every figure.
IMPLEMENTATIONS = {
    "fused": Impl("fused kernel (ours)", "C0", "o"),
    "fused_groups": Impl("fused, read-once anchor groups (ours)", "C8", "P"),
    "fused_pipelined": Impl("fused, pipelined gather (ours)", "navy", "d"),
    "fused_hdn": Impl("fused, token-contiguous V pages (ours)", "teal", "8"),
    "cudnn_sdpa": Impl("cuDNN SDPA (contiguous)", "k", "s"),
    "flash_sdpa": Impl("flash SDPA (contiguous)", "C7", "D"),
    "gather_sdpa": Impl("gather + SDPA", "C3", "v"),
    "cascade": Impl("cascade", "C1", "^"),
    "flashinfer_decode": Impl("FlashInfer paged decode", "m", "<"),
    "flashinfer_cascade": Impl("FlashInfer cascade", "saddlebrown", "X"),
    "prefix_blocks": Impl("prefix blocks", "C2", ">"),
    "flex": Impl("FlexAttention", "C4", "*"),
    "naive": Impl("naive (materialized)", "C5", "h"),
    "two_softmax": Impl("two-softmax (materialized)", "C6", "x"),
    "sdpa_fused": Impl("single pass (torch SDPA)", "C9", "p"),
}


def implementation(name: str) -> Impl:
    """The look of ``name``; an unknown name is an error (it would get no legend entry)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {name!r} has no style; known: {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name]


# The naive and two-softmax forms write nearly the same bytes: naive is drawn underneath, large,
# open and pale, so that two-softmax's small markers on top leave it visible.
UNDERNEATH = {"naive": {"markersize": 7, "markerfacecolor": "none", "linewidth": 2.2, "alpha": 0.6,
                        "zorder": 2},
              "two_softmax": {"linestyle": "--"}}


def line_style(name: str) -> dict[str, Any]:
    """Plot keywords (colour, marker, line) of ``name`` drawn as a line; the same for its
    legend entry (``Line2D([], [], label=..., **line_style(name))``)."""
    look = implementation(name)
    return {"color": look.color, "marker": look.marker, "markersize": 4, "linewidth": 1,
            "linestyle": "-", "zorder": 3, **UNDERNEATH.get(name, {})}


def figure(ncols: int = 1, nrows: int = 1, wide: bool = False, height: float = 2.3):
    """A figure about one column wide (or the text width when ``wide``), saved cropped to its
    contents, so its printed scale is only approximately one."""
    width = TEXT_WIDTH if wide else COLUMN_WIDTH
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False)


def printed_figure(height: float, wide: bool = False):
    """An empty figure of exactly the printed size: ``height`` inches by one column (or the text
    width when ``wide``), with a constrained layout that keeps every label inside it."""
    if height <= 0:
        raise ValueError(f"height must be positive inches, got {height!r}")
    return plt.figure(figsize=(TEXT_WIDTH if wide else COLUMN_WIDTH, height), layout="constrained")


def is_printed(fig) -> bool:
    """Whether ``fig`` came from :func:`printed_figure` (its file keeps the figure's size)."""
    return isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)


def visible_texts(fig) -> list[Text]:
    """Every visible, non-empty text in ``fig``: labels, ticks, titles, legends, annotations."""
    fig.canvas.draw()  # tick labels exist only once drawn
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def source_label(manifest: dict[str, Any]) -> str:
    """'NVIDIA H200, 2026-11-29' or 'CPU, 2026-11-29': where the plotted numbers came from."""
    where = manifest["gpu"] or f"CPU ({manifest['cpu_count']} cores)"
    # a "$" in a name would start matplotlib's math mode
    return f"{where}, {manifest['date'][:10]}".replace("$", r"\$")


def save(fig, out_stem: str | Path) -> None:
    """Write ``out_stem``.pdf and .png with no timestamps inside, then close the figure.

    A printed figure keeps its size (its layout already fits everything inside it) and must not
    carry text below :data:`MIN_FONT_PT`; any other figure is cropped to its contents."""
    out_stem = Path(out_stem)
    if is_printed(fig):
        small = sorted({f"{t.get_text()!r} ({t.get_fontsize():g} pt)" for t in visible_texts(fig)
                        if t.get_fontsize() < MIN_FONT_PT})
        if small:
            plt.close(fig)
            raise ValueError(f"{out_stem}: text below {MIN_FONT_PT:g} pt at print size: {', '.join(small)}")
        bbox = None  # the whole figure: its printed size
    else:
        bbox = "tight"
    for ext, kwargs in (("pdf", {"metadata": {"CreationDate": None, "ModDate": None}}),
                        ("png", {"metadata": {"Software": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches=bbox, **kwargs)
        atomic_write_bytes(out_stem.with_suffix(f".{ext}"), buf.getvalue())
    plt.close(fig)


def tokens_label(n: float) -> str:
    """512, 1K, 2K, ... 128K, 1M: a token count as the axes and tick labels print it."""
    return f"{n / 1024 / 1024:g}M" if n >= 2**20 else f"{n / 1024:g}K" if n >= 1024 else f"{n:g}"


def tokens_axis(ax) -> None:
    """Log2 x axis labelled 512, 1K, 2K, ... 128K."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_minor_locator(LogLocator(base=2, subs=[]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: tokens_label(x)))
