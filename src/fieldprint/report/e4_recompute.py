"""E4 (recomputation) numbers for the paper: page-digest match rates of SmolLM2 per scenario and
depth, in the default and the batch-invariant mode, and what the batch-invariant mode costs."""

from __future__ import annotations

from collections import defaultdict

from fieldprint.report import Claim, latex_escape, ratio_text

# the scenarios that keep the kernel's arithmetic: the batch-invariant mode should reproduce them
SAME_STACK = ("same_stack", "batch_order", "chunk", "prefix_hit")
HEADLINE = ("e4m3", "two_grid")


def _recompute(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["measure"] == "recompute"]


def match_rates(rows: list[dict], fmt: str, rounding: str) -> dict[tuple[str, str], tuple[int, int, int, float]]:
    """(mode, scenario) -> (matched, bitwise, pages, largest perturbation over the bound), summed
    over every layer and K/V for one format and rounding."""
    acc: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0, 0.0])
    for r in _recompute(rows):
        if (r["fmt"], r["rounding"]) == (fmt, rounding):
            a = acc[(r["mode"], r["scenario"])]
            a[0] += r["matched"]
            a[1] += r["bitwise"]
            a[2] += r["pages"]
            a[3] = max(a[3], r["max_over_bound"])
    return {k: tuple(v) for k, v in acc.items()}


def first_mismatch_layer(rows: list[dict], mode: str, scenario: str, fmt: str, rounding: str) -> int | None:
    """The shallowest layer where some page's digest differs (None: every layer matches)."""
    bad = [r["layer"] for r in _recompute(rows) if (r["mode"], r["scenario"], r["fmt"], r["rounding"])
           == (mode, scenario, fmt, rounding) and r["matched"] < r["pages"]]
    return min(bad) if bad else None


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}" if b else "--"


def macros(rows: list[dict], manifest: dict) -> dict[str, str]:
    rec = _recompute(rows)
    layers = max(r["layer"] for r in rec) + 1
    out = {"e4r.model": latex_escape(rec[0]["model"]), "e4r.layers": str(layers),
           "e4r.where": latex_escape(manifest["gpu"] or "CPU"),
           "e4r.sequences": str(len(manifest["config"]["prompt_tokens"])),
           "e4r.decode_steps": str(manifest["config"]["decode_steps"]),
           "e4r.anchor_tokens": str(manifest["config"]["anchor_tokens"])}
    formats = sorted({(r["fmt"], r["rounding"]) for r in rec})
    for fmt, rounding in formats:
        for (mode, scenario), (matched, bitwise, pages, over) in match_rates(rows, fmt, rounding).items():
            k = f"e4r.{mode}.{scenario}.{fmt}.{rounding}"
            out[f"{k}.match_pct"] = _pct(matched, pages)
            out[f"{k}.bitwise_pct"] = _pct(bitwise, pages)
            out[f"{k}.max_over_bound"] = ratio_text(over)
            first = first_mismatch_layer(rows, mode, scenario, fmt, rounding)
            out[f"{k}.first_layer"] = "none" if first is None else str(first)
        out[f"e4r.pages.{fmt}.{rounding}"] = str(sum(r["pages"] for r in rec if (r["fmt"], r["rounding"]) ==
                                                    (fmt, rounding) and r["scenario"] == "same_stack"
                                                    and r["mode"] == rec[0]["mode"]))
    cost = {(r["mode"], r["what"]): r for r in rows if r["measure"] == "cost"}
    for what in ("prefill", "decode"):
        if ("default", what) in cost and ("batch_invariant", what) in cost:
            d, b = cost[("default", what)], cost[("batch_invariant", what)]
            out[f"e4r.cost.{what}.default_ms"] = f"{d['ms']:.2f}"
            out[f"e4r.cost.{what}.invariant_ms"] = f"{b['ms']:.2f}"
            out[f"e4r.cost.{what}.ratio"] = f"{b['ms'] / d['ms']:.2f}"
    return out


def claims(rows: list[dict], manifest: dict) -> list[Claim]:
    result = []
    fmt, rounding = HEADLINE
    rates = match_rates(rows, fmt, rounding)
    same = [(s, rates[("batch_invariant", s)]) for s in SAME_STACK if ("batch_invariant", s) in rates]
    if same:
        ok = all(m == p for _, (m, _, p, _) in same)
        result.append(Claim(
            "recompute.batch_invariant_same_stack",
            "In batch-invariant mode, an honest re-prefill on the same stack (other batch composition "
            "and order, other prefill chunks, a prefix-cache hit) reproduces every committed page digest "
            f"of {rows[0]['model']} at every layer ({fmt} {rounding}).",
            bool(manifest["gpu"]) and ok,
            "; ".join(f"{s}: {m}/{p}" for s, (m, _, p, _) in same) + f" on {manifest['gpu'] or 'CPU'}",
        ))
    return result
