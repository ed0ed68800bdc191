"""E1 figure: decode bandwidth vs context (anchors = 64, bf16) per implementation, with the
contiguous cuDNN SDPA ceiling dashed; and fused / cascade / prefix-block bandwidth vs anchors."""

from __future__ import annotations

from fieldprint.plots.style import figure, save, source_label

STYLE = {"fused": ("C0", "o"), "cudnn_sdpa": ("k", "s"), "flash_sdpa": ("C7", "s"),
         "gather_sdpa": ("C3", "v"), "naive": ("C5", "x"), "two_softmax": ("C6", "+"),
         "cascade": ("C1", "^"), "prefix_blocks": ("C2", "D"), "flex": ("C4", "*")}


def _decode(rows, impl, anchors=None, shape=None):
    out = []
    for r in rows:
        if r["mode"] != "decode" or r["impl"] != impl or r["kv_dtype"] != "bf16" or r["tbps"] is None:
            continue
        if anchors is not None and r["anchors"] != anchors:
            continue
        if shape is not None and (r["batch"], r["context"]) != shape:
            continue
        out.append(r)
    return out


def draw(rows, manifest, out_stem) -> None:
    fig, axes = figure(ncols=2, wide=True, height=2.4)
    ax = axes[0][0]
    shapes = sorted({(r["batch"], r["context"]) for r in rows if r["mode"] == "decode"},
                    key=lambda s: (s[1], -s[0]))
    labels = [f"B={b}\nL={c // 1024}K" for b, c in shapes]
    present = {r["anchors"] for r in rows if r["mode"] == "decode"}
    a_plot = 64 if 64 in present else max(present)
    for impl, (color, marker) in STYLE.items():
        ys = []
        for s in shapes:
            got = _decode(rows, impl, anchors=a_plot, shape=s)
            ys.append(got[0]["tbps"] if got else float("nan"))
        if all(y != y for y in ys):
            continue
        ax.plot(range(len(shapes)), ys, marker=marker, color=color, label=impl,
                linestyle="--" if impl == "cudnn_sdpa" else "-", linewidth=1)
    ax.set_xticks(range(len(shapes)), labels, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("bandwidth (TB/s)")
    ax.set_title(f"decode, {a_plot} anchors, bf16", loc="left")
    ax.legend(ncol=2, fontsize=6)
    ax = axes[0][1]
    for impl in ("fused", "cascade", "prefix_blocks", "cudnn_sdpa"):
        color, marker = STYLE[impl]
        for s, ls in zip(shapes, ("-", "--", ":", "-."), strict=False):
            got = sorted(_decode(rows, impl, shape=s), key=lambda r: r["anchors"])
            if got:
                ax.plot([r["anchors"] for r in got], [r["tbps"] for r in got], marker=marker,
                        color=color, linestyle=ls, linewidth=1,
                        label=f"{impl} B={s[0]} L={s[1] // 1024}K" if impl == "fused" or s == shapes[0] else None)
    ax.set_xscale("symlog", linthresh=64)
    ax.set_xlabel("anchor tokens")
    ax.set_ylabel("bandwidth (TB/s)")
    ax.set_title(f"vs anchors — {source_label(manifest)}", loc="right")
    ax.legend(fontsize=5.5)
    save(fig, out_stem)
