"""E2 numbers (and the LaTeX table body) for the paper; flat-SRAM and model claims."""

from __future__ import annotations

from fieldprint.report import Claim, latex_escape

H200_HBM = 141e9
# The launch knobs a variant can change, as the table names them (keys: the config's and the
# ``varied`` column's knob names).
KNOB_NAMES = {"block_size": "page", "group": "group", "tile_n": "$T_N$", "block_m": "$B_M$",
              "num_stages": "stages", "num_warps": "warps", "anchor_groups": "read-once groups",
              "v_hdn": "token-contiguous V"}
FLAG_KNOBS = {"anchor_groups", "v_hdn"}  # on/off knobs: the table names them without their value
DEFAULT_LABEL = "default"
# An H200 (sm_90) streaming multiprocessor: 64K 32-bit registers, allocated per warp in units of
# 256; 228 KiB of shared memory, of which each resident program reserves 1 KiB more than it asks
# for; at most 64 warps and 32 programs (CUDA C Programming Guide, compute capability 9.0).
SM90_REGISTERS, SM90_REG_UNIT, SM90_SHARED, SM90_SHARED_RESERVED = 65536, 256, 228 * 1024, 1024
SM90_WARPS, SM90_PROGRAMS = 64, 32


def _variants(rows, kernel="attention"):
    return [r for r in rows if r["kind"] == "variant" and r["kernel"] == kernel]


def launch_defaults(manifest) -> dict[str, int]:
    """Page size and GQA group that every variant uses unless it is a sweep over them: the run's
    config in its manifest (the rows alone cannot tell a sweep's value from the default)."""
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(config, dict) or not {"block_size", "group"} <= config.keys():
        raise ValueError("manifest: the E2 table needs config.block_size and config.group "
                         "(the defaults each variant is labelled against)")
    return {"block_size": int(config["block_size"]), "group": int(config["group"])}


def variant_knobs(row, defaults: dict[str, int]) -> list[tuple[str, str]]:
    """(knob, value) pairs in which ``row`` differs from the default launch: a page size or group
    other than the defaults, then the overrides its ``varied`` column lists ("tile_n=32,...")."""
    knobs = [(k, str(row[k])) for k in ("block_size", "group") if row[k] != defaults[k]]
    for item in filter(None, (row["varied"] or "").split(",")):
        knob, _, value = item.partition("=")
        knobs.append((knob, value))
    return knobs


def variant_label(row, defaults: dict[str, int]) -> str:
    """LaTeX label of a variant: "default", or what it changes ("page 32", "$T_N$ 128",
    "read-once groups")."""
    knobs = variant_knobs(row, defaults)
    if not knobs:
        return DEFAULT_LABEL
    return ", ".join(_knob_label(k, v) for k, v in knobs)


def _knob_label(knob: str, value: str) -> str:
    name = KNOB_NAMES.get(knob, latex_escape(knob))
    return name if knob in FLAG_KNOBS else f"{name} {latex_escape(value)}"


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs (CTAs) of one compiled kernel that fit on an H200 SM at once: the least of what its
    registers, its shared memory and its warps allow."""
    warp_regs = -(-registers * 32 // SM90_REG_UNIT) * SM90_REG_UNIT
    by_regs = SM90_REGISTERS // (warp_regs * num_warps)
    by_shared = SM90_SHARED // (shared_bytes + SM90_SHARED_RESERVED)
    return min(by_regs, by_shared, SM90_WARPS // num_warps, SM90_PROGRAMS)


def _table(rows, manifest) -> str:
    """Body of a booktabs tabular: mode & D & KV & variant & tiles & smem & model & regs & spills."""
    defaults = launch_defaults(manifest)
    lines = []
    for r in _variants(rows):
        tiles = f"{r['block_m']}$\\times${r['tile_n']}"
        lines.append(f"{latex_escape(r['mode'])} & {r['head_dim']} & {latex_escape(r['kv_dtype'])} & "
                     f"{variant_label(r, defaults)} & {tiles} & {r['shared_bytes'] / 1024:.1f} & "
                     f"{r['model_bytes'] / 1024:.1f} & {r['registers']} & "
                     f"{r['spill_stores'] + r['spill_loads']} \\\\")
    return "\n".join(lines)


def _first_exceeding(rows, form, mode):
    over = sorted(r["context"] for r in rows if r["kind"] == "hbm" and r["form"] == form
                  and r["mode"] == mode and r["exceeds_h200"] == 1)
    return over[0] if over else None


def _ctx(n: int | None) -> str:
    if n is None:
        return "none measured"
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"


def macros(rows, manifest) -> dict[str, str]:
    var = _variants(rows)
    flat = [r for r in rows if r["kind"] == "flat"]
    ratios = [r["model_ratio"] for r in var]
    defaults = launch_defaults(manifest)
    m = {
        "e2.table": _table(rows, manifest),
        "e2.default_page": str(defaults["block_size"]),
        "e2.default_group": str(defaults["group"]),
        "e2.variants": str(len(var)),
        "e2.model_ratio_min": f"{min(ratios):.2f}" if ratios else "n/a",
        "e2.model_ratio_max": f"{max(ratios):.2f}" if ratios else "n/a",
        "e2.within10": str(sum(abs(x - 1) <= 0.1 for x in ratios)),
        "e2.smem_max_kib": f"{max(r['shared_bytes'] for r in var) / 1024:.0f}" if var else "n/a",
        "e2.spill_variants": str(sum(r["spill_stores"] > 0 for r in var)),
        "e2.flat_pairs": str(len(flat)),
        "e2.flat_smem_kib": f"{flat[0]['shared_bytes'] / 1024:.1f}" if flat else "n/a",
        "e2.flat_regs": str(flat[0]["registers"]) if flat else "n/a",
        "e2.flat_max_anchors": str(max(r["anchors"] for r in flat)) if flat else "n/a",
        "e2.flat_max_context": _ctx(max(r["context"] for r in flat)) if flat else "n/a",
        "e2.naive_exceeds_prefill": _ctx(_first_exceeding(rows, "naive", "prefill")),
        "e2.naive_exceeds_decode": _ctx(_first_exceeding(rows, "naive", "decode")),
    }
    m.update(_groups_macros(var, defaults))
    for r in rows:
        if r["kind"] == "hbm" and r["form"] == "naive" and r["mode"] == "prefill" and r["context"] == 131072:
            m["e2.naive_prefill_128k_gb"] = f"{r['hbm_bytes'] / 1e9:,.0f}".replace(",", "\\,")
    return m


def _groups_macros(variants, defaults: dict[str, int]) -> dict[str, str]:
    """Decode at D=128, the default launch and the opt-in variants: with bf16 KV, read-once
    anchor groups (``e2.{plain,groups}_decode_*``); with fp8 KV, the "hdn" V page layout
    (``e2.{plain,hdn}_fp8_decode_*``); ``*`` = ``regs``, ``smem_kib``, ``programs`` (registers per
    thread, shared memory per program, programs per SM; "n/a" where the rows lack the variant)."""
    m = {}
    for name, kv, want in (("plain", "bf16", []), ("groups", "bf16", [("anchor_groups", "1")]),
                           ("plain_fp8", "fp8", []), ("hdn_fp8", "fp8", [("v_hdn", "1")])):
        found = [r for r in variants if r["mode"] == "decode" and r["head_dim"] == 128 and r["kv_dtype"] == kv
                 and variant_knobs(r, defaults) == want]
        r = found[0] if found else None
        m[f"e2.{name}_decode_regs"] = str(r["registers"]) if r else "n/a"
        m[f"e2.{name}_decode_smem_kib"] = f"{r['shared_bytes'] / 1024:.1f}" if r else "n/a"
        m[f"e2.{name}_decode_programs"] = (str(programs_per_sm(r["registers"], r["num_warps"], r["shared_bytes"]))
                                           if r else "n/a")
    return m


def _variant_name(r, defaults: dict[str, int]) -> str:
    changed = ",".join(f"{k}={v}" for k, v in variant_knobs(r, defaults)) or DEFAULT_LABEL
    return f"{r['mode']} D{r['head_dim']} {r['kv_dtype']} {changed}"


def claims(rows, manifest) -> list[Claim]:
    flat = [r for r in rows if r["kind"] == "flat"]
    same = len({(r["hash"], r["shared_bytes"], r["registers"]) for r in flat}) == 1
    grids = len({r["grid"] for r in flat})
    var = _variants(rows)
    defaults = launch_defaults(manifest)
    ratios = [(_variant_name(r, defaults), r["model_ratio"]) for r in var]
    off = [f"{n}: {x:.2f}" for n, x in ratios if abs(x - 1) > 0.1]
    spills = [f"{_variant_name(r, defaults)}: {r['spill_stores']} B" for r in var if r["spill_stores"] > 0]
    first = _first_exceeding(rows, "naive", "prefill")
    return [
        Claim("e2.flat", "Shared memory and registers per program do not depend on anchors or context.",
              bool(flat) and same,
              f"{len(flat)} (anchors, context) pairs up to {max((r['anchors'] for r in flat), default=0)} "
              f"anchors / {_ctx(max((r['context'] for r in flat), default=0))} context: one binary, "
              f"{grids} different grids"),
        Claim("e2.model10", "Compiled shared memory is within 10% of the analytic model "
              "(Q tile + pipelined K and V tiles).",
              bool(ratios) and not off,
              f"{len(ratios) - len(off)} of {len(ratios)} variants within 10%"
              + (f"; off: {'; '.join(off)}" if off else "")),
        Claim("e2.no_spills", "No compiled variant spills registers.", bool(var) and not spills,
              ", ".join(spills) or f"{len(var)} variants, 0 spill bytes"),
        Claim("e2.unfused_exceeds", "The materialized unfused forms exceed the H200's 141 GB at long prefill.",
              first is not None, f"naive prefill scores pass 141 GB at {_ctx(first)} context"),
    ]
