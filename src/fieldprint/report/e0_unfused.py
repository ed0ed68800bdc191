"""E0 numbers for the paper: how the unfused forms' intermediates and time grow with context."""

from __future__ import annotations

from fieldprint.report import Claim


def _by(rows, form):
    return sorted((r for r in rows if r["form"] == form), key=lambda r: r["context"])


def macros(rows, manifest) -> dict[str, str]:
    naive, two, fused = _by(rows, "naive"), _by(rows, "two_softmax"), _by(rows, "sdpa_fused")
    lo, hi = naive[0], naive[-1]
    out = {
        "e0.context_min": f"{lo['context']:,}".replace(",", "{,}"),
        "e0.context_max": f"{hi['context']:,}".replace(",", "{,}"),
        "e0.naive_mib_max": f"{hi['intermediate_bytes'] / 2**20:.1f}",
        "e0.two_softmax_mib_max": f"{two[-1]['intermediate_bytes'] / 2**20:.1f}",
        "e0.naive_bytes_growth": f"{hi['intermediate_bytes'] / lo['intermediate_bytes']:.1f}",
        "e0.context_growth": f"{hi['context'] / lo['context']:.0f}",
        "e0.device": "a GPU" if manifest["gpu"] else f"{manifest['cpu_count']} CPU cores",
    }
    if fused:
        out["e0.naive_over_fused_ms_max"] = f"{hi['ms'] / fused[-1]['ms']:.1f}"
        out["e0.fused_kib_max"] = f"{fused[-1]['intermediate_bytes'] / 2**10:.0f}"
    return out


def claims(rows, manifest) -> list[Claim]:
    naive, fused = _by(rows, "naive"), _by(rows, "sdpa_fused")
    growth = naive[-1]["intermediate_bytes"] / naive[0]["intermediate_bytes"]
    ctx_growth = naive[-1]["context"] / naive[0]["context"]
    result = [Claim(
        "fusion.unfused_bytes_linear",
        "The unfused forms write score matrices whose size grows linearly with the context.",
        growth >= 0.8 * ctx_growth,
        f"naive intermediates grew {growth:.1f}x over a {ctx_growth:.0f}x context range",
    )]
    if fused:
        ratio = naive[-1]["intermediate_bytes"] / max(fused[-1]["intermediate_bytes"], 1)
        result.append(Claim(
            "fusion.fused_bytes_small",
            "A single online softmax writes at least 50x fewer intermediate bytes than the materialized form.",
            ratio >= 50,
            f"{ratio:.0f}x fewer at context {naive[-1]['context']}",
        ))
    return result
