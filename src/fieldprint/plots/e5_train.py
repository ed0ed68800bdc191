"""E5 training curve: training and held-out validation loss (bits per byte) against tokens seen."""

from __future__ import annotations

import math
from typing import Any

from fieldprint.plots.style import figure, save, source_label


def draw(rows: list[dict[str, Any]], manifest: dict[str, Any], out_stem) -> None:
    tokens = [r["tokens"] / 1e6 for r in rows]
    train = [r["train_loss"] / math.log(2) for r in rows]
    valid = [r["val_bpb"] for r in rows]
    fig, axes = figure()
    ax = axes[0][0]
    ax.plot(tokens, train, marker=".", label="training plays (running mean)")
    ax.plot(tokens, valid, marker=".", label="held-out plays")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"Byte-level model, final held-out {valid[-1]:.3f} bits/byte\n{source_label(manifest)}",
                 fontsize=7)
    ax.legend(frameon=False)
    save(fig, out_stem)
