"""E2 figure: shared memory and registers per program vs (anchors, context) — a flat line — next
to the analytic model, and the HBM bytes the unfused forms would write vs context."""

from __future__ import annotations

from fieldprint.plots.style import figure, save, source_label

H200_HBM = 141e9


def draw(rows, manifest, out_stem) -> None:
    fig, axes = figure(ncols=2, wide=True, height=2.4)
    ax = axes[0][0]
    flat = [r for r in rows if r["kind"] == "flat"]
    x = range(len(flat))
    ax.plot(x, [r["shared_bytes"] / 1024 for r in flat], "o-", label="shared memory (KiB)")
    ax.plot(x, [r["registers"] for r in flat], "s-", label="registers / thread")
    var = [r for r in rows if r["kind"] == "variant" and r["kernel"] == "attention"
           and r["mode"] == "decode" and r["head_dim"] == flat[0]["head_dim"]
           and r["kv_dtype"] == "bf16" and not r["varied"]] if flat else []
    if var:
        ax.axhline(var[0]["model_bytes"] / 1024, color="k", linestyle="--", linewidth=1,
                   label="model: Q + K + V tiles (KiB)")
    ax.set_xticks(list(x), [f"A={r['anchors']}\nL={r['context'] // 1024}K" for r in flat], fontsize=6)
    ax.set_ylim(bottom=0)
    ax.set_title(f"per program, decode D={flat[0]['head_dim'] if flat else '?'} (sm_90)")
    ax.legend(fontsize=6)
    ax = axes[0][1]
    for form, color in (("naive", "C3"), ("two_softmax", "C6")):
        for mode, ls in (("prefill", "-"), ("decode", "--")):
            pts = sorted((r["context"], r["hbm_bytes"]) for r in rows
                         if r["kind"] == "hbm" and r["form"] == form and r["mode"] == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / 1e9 for p in pts], ls, color=color, marker=".",
                        label=f"{form} {mode}")
    ax.axhline(H200_HBM / 1e9, color="k", linewidth=1, label="H200 HBM 141 GB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("intermediate bytes (GB)")
    ax.set_title(f"unfused scores + probabilities — {source_label(manifest)}")
    ax.legend(fontsize=6)
    save(fig, out_stem)
