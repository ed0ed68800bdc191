"""E4 numbers for the paper: page-digest match rates between honest recomputations, measured
next to the independent-flip theory, and whether two_grid held wherever its bound applies."""

from __future__ import annotations

import math

from fieldprint.report import Claim, latex_escape, ratio_text

GEMM_EXCLUDED = ("rehash", "attention")


def _ok(rows):
    return [r for r in rows if r["status"] == "ok"]


def _pct(v: float) -> str:
    """A percentage with enough digits to show small rates ('0.0085', '25.3', '100')."""
    p = 100 * v
    if p in (0.0, 100.0):
        return f"{p:.0f}"
    return f"{p:.2g}" if p < 1 else f"{p:.1f}"


def _key(*parts: str) -> str:
    return ".".join(str(p).lower().replace("/", "_") for p in parts)


def headline(rows) -> dict | None:
    """The GEMM recomputation that perturbs the stored bf16 values most (highest raw difference
    rate), and its e4m3 rows: the paper's measured example."""
    cands = [r for r in _ok(rows) if r["variant"] not in GEMM_EXCLUDED
             and r["out_dtype"] == "bfloat16" and r["fmt"] == "e4m3" and r["rounding"] == "rne"]
    if not cands:
        return None
    return max(cands, key=lambda r: (r["raw_diff_rate"], -r["page_elems"]))


def macros(rows, manifest) -> dict[str, str]:
    ok = _ok(rows)
    out = {
        "e4.device": latex_escape(manifest["gpu"] or f"CPU ({manifest['cpu_count']} cores)"),
        "e4.date": latex_escape(manifest["date"][:10]),
    }
    cfg = manifest["config"]
    for name in ("tokens", "d_model", "heads_kv", "head_dim"):
        if name in cfg:
            out[f"e4.{name}"] = f"{int(cfg[name]):,}".replace(",", "{,}")
    for r in ok:
        base = _key("e4", r["variant"], r["out_dtype"], r["fmt"], r["rounding"],
                    f"{r['page_elems'] // 1024}k")
        out[f"{base}.match"] = _pct(r["match_rate"])
        out[f"{base}.theory"] = _pct(r["theory_match"])
        out[f"{base}.pflip"] = _pct(r["p_flip"])
        out[f"{base}.pages"] = f"{r['pages']:,}".replace(",", "{,}")
        raw = _key("e4", r["variant"], r["out_dtype"], f"{r['page_elems'] // 1024}k")
        out[f"{raw}.raw_diff"] = _pct(r["raw_diff_rate"])
        out[f"{raw}.raw_match"] = _pct(r["raw_page_match"])
    h = headline(rows)
    if h:
        same = [r for r in ok if r["variant"] == h["variant"] and r["out_dtype"] == "bfloat16"
                and r["fmt"] == "e4m3"]
        out["e4.head.variant"] = latex_escape(h["variant"])
        out["e4.head.raw_diff"] = _pct(h["raw_diff_rate"])
        for r in same:
            k = f"e4.head.{r['rounding']}.{r['page_elems'] // 1024}k"
            out[f"{k}.match"] = _pct(r["match_rate"])
            out[f"{k}.theory"] = _pct(r["theory_match"])
            out[f"{k}.pflip"] = _pct(r["p_flip"])
        for r in (x for x in ok if x["variant"] == h["variant"] and x["out_dtype"] == "bfloat16"
                  and x["fmt"] == "e4m3" and x["rounding"] == "rne"):
            out[f"e4.head.raw_match.{r['page_elems'] // 1024}k"] = _pct(
                r["raw_page_match"])
        p = h["p_flip"]
        out["e4.head.rne_reduction"] = f"{h['raw_diff_rate'] / p:.0f}" if p else "n/a"
    attn = {r["rounding"]: r for r in ok if r["variant"] == "attention" and r["fmt"] == "e4m3"
            and r["page_elems"] == min(x["page_elems"] for x in ok)}
    for rounding in ("rne", "two_grid"):
        r = attn.get(rounding)
        out[f"e4.attn.{rounding}.match"] = _pct(r["match_rate"]) if r else "n/a"
    r = attn.get("two_grid")
    out["e4.attn.max_ratio"] = f"{r['max_rel_perturbation']:.3g}" if r else "n/a"
    out["e4.attn.frac_over"] = _pct(r["frac_over_bound"]) if r else "n/a"
    out["e4.attn.raw_diff"] = _pct(r["raw_diff_rate"]) if r else "n/a"
    rehash = [r["match_rate"] for r in ok if r["variant"] == "rehash"]
    out["e4.rehash.min_match"] = _pct(min(rehash)) if rehash else "n/a"
    tg = [r for r in ok if r["rounding"] == "two_grid"]
    inside = [r for r in tg if r["max_rel_perturbation"] < 1]
    out["e4.two_grid.rows"] = str(len(tg))
    out["e4.two_grid.rows_inside"] = str(len(inside))
    out["e4.two_grid.min_match_inside"] = _pct(min((r["match_rate"] for r in inside),
                                                   default=float("nan")))
    # over every GEMM row, not only those inside the bound: the largest perturbation, and the
    # share of all elements that lie inside the bound
    gemm_tg = [r for r in tg if r["variant"] not in GEMM_EXCLUDED]
    out["e4.two_grid.max_ratio_gemm"] = (
        ratio_text(max(r['max_rel_perturbation'] for r in gemm_tg)) if gemm_tg else "n/a")
    out["e4.two_grid.rows_gemm"] = str(len(gemm_tg))
    out["e4.two_grid.rows_outside_gemm"] = str(sum(r["max_rel_perturbation"] >= 1 for r in gemm_tg))
    elements = sum(r["elements"] for r in gemm_tg)
    inside_elements = sum(r["elements"] * (1 - r["frac_over_bound"]) for r in gemm_tg)
    out["e4.two_grid.pct_elements_inside_gemm"] = (
        f"{100 * inside_elements / elements:.4f}" if elements else "n/a")
    return out


def theory_agreement(rows, min_pages: int = 16) -> tuple[int, int, dict | None]:
    """(rows within 3 binomial sigma + 0.02 of theory, rows compared, worst row) over the
    rne/trunc/stochastic rows with at least ``min_pages`` pages and some flips."""
    cmp = [r for r in _ok(rows) if r["rounding"] in ("rne", "trunc", "stochastic")
           and r["pages"] >= min_pages and r["p_flip"] > 0]
    good, worst, worst_z = 0, None, -1.0
    for r in cmp:
        t, m, n = r["theory_match"], r["match_rate"], r["pages"]
        sigma = math.sqrt(max(t * (1 - t), 1e-12) / n)
        z = (abs(m - t) - 0.02) / sigma
        good += z <= 3
        if z > worst_z:
            worst, worst_z = r, z
    return good, len(cmp), worst


def claims(rows, manifest) -> list[Claim]:
    ok = _ok(rows)
    tg = [r for r in ok if r["rounding"] == "two_grid"]
    inside = [r for r in tg if r["max_rel_perturbation"] < 1]
    perturbed = [r for r in inside if r["raw_diff_rate"] > 0]
    broken = [r for r in inside if r["match_rate"] < 1]
    outside = [r for r in tg if r["max_rel_perturbation"] >= 1]
    out_txt = "; ".join(f"{r['variant']}/{r['out_dtype']}/{r['fmt']}@{r['page_elems']}: "
                        f"ratio {r['max_rel_perturbation']:.3g}, "
                        f"{100 * r['frac_over_bound']:.2g}% over, "
                        f"match {100 * r['match_rate']:.3g}%" for r in outside[:4])
    rehash = [r for r in ok if r["variant"] == "rehash"]
    h = headline(rows)
    good, n_cmp, worst = theory_agreement(rows)
    raw_unstable = [r for r in ok if r["variant"] not in GEMM_EXCLUDED
                    and r["raw_page_match"] < 1]
    return [
        Claim("stability.two_grid_within_bound",
              "two_grid pages match 100% whenever every perturbation is below a quarter of the "
              "local code spacing.",
              bool(perturbed) and not broken,
              f"{len(inside)} two_grid rows inside the bound ({len(perturbed)} with perturbed "
              f"inputs), {len(broken)} of them below 100%; {len(outside)} rows outside the "
              f"bound" + (f" ({out_txt})" if outside else "")),
        Claim("stability.rne_not_stable",
              "Plain RNE quantization does not make digests stable: honest recomputations still "
              "flip codes near rounding boundaries.",
              h is not None and h["match_rate"] < 1,
              (f"{h['variant']} (bf16 stored, e4m3 rne, {h['page_elems']}-element pages): "
               f"raw {100 * h['raw_diff_rate']:.3g}% elements differ, code flips "
               f"{100 * h['p_flip']:.3g}%, page match {100 * h['match_rate']:.3g}%")
              if h else "no GEMM variant rows"),
        Claim("stability.theory_matches",
              "The independent-flip model 1-(1-p)^n predicts the measured page match rate.",
              n_cmp > 0 and good >= 0.9 * n_cmp,
              f"{good} of {n_cmp} rows (>= 16 pages, p > 0) within 3 sigma + 0.02"
              + (f"; worst {worst['variant']}/{worst['fmt']}/{worst['rounding']}@"
                 f"{worst['page_elems']}: measured {worst['match_rate']:.3f} vs theory "
                 f"{worst['theory_match']:.3f} over {worst['pages']} pages"
                 if worst else "")),
        Claim("stability.rehash_always",
              "Re-hashing the same stored bytes always matches.",
              bool(rehash) and all(r["match_rate"] == 1 for r in rehash),
              f"{len(rehash)} rehash rows, min match "
              f"{min((r['match_rate'] for r in rehash), default=float('nan')):.3f}"),
        Claim("stability.raw_floats_unstable",
              "Hashes of the raw (unquantized) floats do not match between honest "
              "recomputations.",
              bool(raw_unstable),
              f"{len({r['variant'] for r in raw_unstable})} GEMM variants with raw page match "
              f"< 100%" + (f", e.g. {h['variant']}: {100 * h['raw_page_match']:.3g}% of "
                          f"{h['page_elems']}-element bf16 pages" if h else "")),
    ]
