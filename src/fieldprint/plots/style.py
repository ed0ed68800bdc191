"""One look for every figure, and deterministic files (fixed fonts and metadata)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
        "savefig.bbox": "tight",
        "axes.grid": True,
        "grid.alpha": 0.3,
        "svg.hashsalt": "fieldprint",
    }
)

COLUMN_WIDTH = 3.4  # inches, one IEEEtran column
TEXT_WIDTH = 7.0


def figure(ncols: int = 1, nrows: int = 1, wide: bool = False, height: float = 2.3):
    """A figure sized for one column (or the full text width when ``wide``)."""
    width = TEXT_WIDTH if wide else COLUMN_WIDTH
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False)


def source_label(manifest: dict[str, Any]) -> str:
    """'NVIDIA H200, 2026-11-29' or 'CPU, 2026-11-29': where the plotted numbers came from."""
    where = manifest["gpu"] or f"CPU ({manifest['cpu_count']} cores)"
    # a "$" in a name would start matplotlib's math mode
    return f"{where}, {manifest['date'][:10]}".replace("$", r"\$")


def save(fig, out_stem: str | Path) -> None:
    """Write ``out_stem``.pdf and .png with no timestamps inside, then close the figure."""
    out_stem = Path(out_stem)
    for ext, kwargs in (("pdf", {"metadata": {"CreationDate": None, "ModDate": None}}),
                        ("png", {"metadata": {"Software": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, **kwargs)
        atomic_write_bytes(out_stem.with_suffix(f".{ext}"), buf.getvalue())
    plt.close(fig)


def tokens_axis(ax) -> None:
    """Log2 x axis labelled 512, 1K, 2K, ... 128K."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_minor_locator(LogLocator(base=2, subs=[]))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _: f"{x / 1024 / 1024:g}M" if x >= 2**20 else f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"))
