"""E6 (live) numbers for the paper (``\\fp{e6live....}``) and the claims that a commitment binds
the live cache: detection of single-bit flips by bf16 bit position, anchor swaps and block-table
remaps, and false alarms on honest caches."""

from __future__ import annotations

from collections import defaultdict

from fieldprint.report import Claim, latex_escape

PARTS = ("sign", "exponent", "mantissa")
FLOAT_FORMATS = ("e4m3", "e5m2", "bf16")  # floating-point codes: an exponent flip moves a code


def bit_name(bit: int) -> str:
    """bf16 bit 15 -> 's', 14..7 -> 'e7'..'e0', 6..0 -> 'm6'..'m0' (the figure's axis)."""
    return "s" if bit == 15 else f"e{bit - 7}" if bit >= 7 else f"m{bit}"


def cases(rows: list[dict]) -> list[tuple[str, str]]:
    """The (fmt, rounding) pairs measured, in the order of the run."""
    return list(dict.fromkeys((r["fmt"], r["rounding"]) for r in rows))


def flip_counts(rows: list[dict], fmt: str, rounding: str, target: str | None = None,
                part: str | None = None, bit: int | None = None) -> tuple[int, int, int]:
    """(trials, detected, localized) of the flip rows of one case, over every target/part/bit
    unless one is given."""
    t = d = loc = 0
    for r in rows:
        if (r["kind"] == "flip" and (r["fmt"], r["rounding"]) == (fmt, rounding)
                and target in (None, r["target"]) and part in (None, r["part"]) and bit in (None, r["bit"])):
            t, d, loc = t + r["trials"], d + r["detected"], loc + r["localized"]
    return t, d, loc


def full_from(rows: list[dict], fmt: str, rounding: str) -> int | None:
    """The lowest bf16 bit b such that every flip of b and every higher bit was detected, in both
    targets (None: some sign flip was missed)."""
    lowest = None
    for bit in range(15, -1, -1):
        t, d, _ = flip_counts(rows, fmt, rounding, bit=bit)
        if d < t:
            break
        lowest = bit
    return lowest


def _other(rows: list[dict], kind: str) -> dict[tuple[str, str], dict]:
    return {(r["fmt"], r["rounding"]): r for r in rows if r["kind"] == kind}


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}" if b else "--"


def macros(rows: list[dict], manifest: dict) -> dict[str, str]:
    cfg = manifest["config"]
    out = {"e6live.where": latex_escape(manifest["gpu"] or "CPU"), "e6live.trials": str(cfg["trials"]),
           "e6live.leaves": str(rows[0]["leaves"]), "e6live.layers": str(cfg["layers"]),
           "e6live.sequences": str(cfg["sequences"]), "e6live.anchor_tokens": str(cfg["anchor_tokens"]),
           "e6live.context": str(cfg["context"]), "e6live.block_size": str(cfg["block_size"]),
           "e6live.spread": f"{2 ** cfg['spread']:g}", "e6live.cases": str(len(cases(rows)))}
    swaps, remaps, honest = _other(rows, "swap"), _other(rows, "remap"), _other(rows, "honest")
    for fmt, rounding in cases(rows):
        k = f"e6live.{fmt}.{rounding}"
        for target in ("anchor", "context", None):
            for part in (*PARTS, None):
                t, d, _ = flip_counts(rows, fmt, rounding, target, part)
                out[f"{k}.{target or 'all'}.{part or 'all'}_pct"] = _pct(d, t)
        t, d, loc = flip_counts(rows, fmt, rounding)
        out[f"{k}.localized_of_detected_pct"] = _pct(loc, d)
        lowest = full_from(rows, fmt, rounding)
        out[f"{k}.full_from"] = "none" if lowest is None else bit_name(lowest)
    totals: dict[str, int] = defaultdict(int)
    for name, table in (("swap", swaps), ("remap", remaps)):
        for r in table.values():
            for column in ("trials", "detected", "localized"):
                totals[f"{name}.{column}"] += r[column]
    totals["honest.checks"] = sum(r["trials"] for r in honest.values())
    totals["false_alarms"] = sum(r["detected"] for r in honest.values())  # honest rows: detected = alarms
    out.update({f"e6live.{key}": str(v) for key, v in totals.items()})
    flips = [flip_counts(rows, *c) for c in cases(rows)]
    out["e6live.flips"] = str(sum(t for t, _, _ in flips))
    out["e6live.localized_of_detected_pct"] = _pct(sum(loc for *_, loc in flips), sum(d for _, d, _ in flips))
    return out


def claims(rows: list[dict], manifest: dict) -> list[Claim]:
    result = []
    honest = _other(rows, "honest")
    alarms = sum(r["detected"] for r in honest.values())
    checks = sum(r["trials"] for r in honest.values())
    result.append(Claim(
        "live.no_false_alarm", "verify_live never reports an honest cache as tampered.",
        alarms == 0, f"{alarms} false alarms in {checks} verifications of honest caches"))
    moved = [r for r in rows if r["kind"] in ("swap", "remap")]
    trials = sum(r["trials"] for r in moved)
    result.append(Claim(
        "live.swap_remap",
        "Pointing an anchor page at another sequence's page, or a block-table entry at another "
        "page, is detected and localized to exactly the remapped page.",
        all(r["detected"] == r["localized"] == r["trials"] for r in moved),
        f"{sum(r['detected'] for r in moved)}/{trials} detected, {sum(r['localized'] for r in moved)}/{trials} "
        "localized"))
    flips = [flip_counts(rows, *c) for c in cases(rows)]
    detected, localized = sum(d for _, d, _ in flips), sum(loc for *_, loc in flips)
    result.append(Claim(
        "live.flip_localized", "Every detected bit flip in a live page is localized to exactly its leaf.",
        detected == localized, f"{localized}/{detected} detected flips localized"))
    evidence, ok = [], True
    for fmt, rounding in cases(rows):
        if fmt not in FLOAT_FORMATS:
            continue
        for part in ("sign", "exponent"):
            t, d, loc = flip_counts(rows, fmt, rounding, part=part)
            ok &= d == loc == t
            evidence.append(f"{fmt} {rounding} {part}: {d}/{t}")
    if evidence:
        result.append(Claim(
            "live.sign_exponent",
            "With a floating-point page format (E4M3, E5M2, bf16), every flip of a sign or exponent bit "
            "of a live bf16 page is detected and localized.",
            ok, "; ".join(evidence)))
    if ("bf16", "rne") in cases(rows):
        t, d, loc = flip_counts(rows, "bf16", "rne")
        result.append(Claim(
            "live.bf16_every_bit", "A bf16 commitment detects and localizes a flip of any bit of a live bf16 page.",
            d == loc == t, f"{d}/{t} detected, {loc} localized"))
    return result
