"""E3 numbers for the paper: GPU BLAKE3 throughput, its ratio to the CPU, the quantize cost, and
what copying to the host instead costs. Values missing from a run (a CPU-only run has no GPU
rows) print as "n/a" and their claims are not supported.

Issue 11's targets, judged at the largest size measured (throughput always over the bf16 input
bytes, for the quantizer as for quantize + hash):
  the quantizer kernel alone (``quant_gpu``) >= `TARGET_QUANT_TBPS` TB/s, in each case of
  `TARGET_CASES` and in every 1-byte format case measured;
  the committer's fused launch (``fused_quant_blake3_gpu``) >= `TARGET_FUSED_OVER_HASH` times
  hashing the unquantized pages alone (``blake3_many_gpu``, the same size and page size).
Each is a claim, and a ``e3.verdict.*`` macro ("met", "missed", "not measured") says the same in
the paper's text.
"""

from __future__ import annotations

from fieldprint import sass
from fieldprint.formats import FORMATS
from fieldprint.report import Claim, latex_escape

NA = "n/a"
TARGET_QUANT_TBPS = 1.5
TARGET_FUSED_OVER_HASH = {("e4m3", "rne"): 1.0, ("e4m3", "two_grid"): 0.9}
TARGET_CASES = tuple(TARGET_FUSED_OVER_HASH)  # the cases every target names


def _ok(rows, impl, fmt=None, rounding=None):
    """{bytes: row} of the successful measurements of one impl (and quant case)."""
    return {r["bytes"]: r for r in rows
            if r["impl"] == impl and r["status"] == "ok" and r["device"] == "cuda"
            and r["fmt"] == fmt and r["rounding"] == rounding}


def _cpu(rows, impl):
    return {r["bytes"]: r for r in rows if r["impl"] == impl and r["status"] == "ok"}


def _size(nbytes: int) -> str:
    """'8\\,GiB' / '256\\,MiB' (LaTeX)."""
    return f"{nbytes / 2**30:g}\\,GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:g}\\,MiB"


def _cases(rows, impl):
    """The (fmt, rounding) cases of ``impl`` measured on the GPU, sorted."""
    return sorted({(r["fmt"], r["rounding"]) for r in rows
                   if r["impl"] == impl and r["status"] == "ok" and r["device"] == "cuda"})


def _case_key(case) -> str:
    return ".".join(case)


def verdict(value: float | None, target: float) -> str:
    """A target's verdict: "met" (value >= target), "missed", or "not measured" (value None)."""
    if value is None:
        return "not measured"
    return "met" if value >= target else "missed"


def summary(rows) -> dict:
    """The numbers behind the macros and claims (floats; None when the run lacks them)."""
    gpu = _ok(rows, "blake3_gpu")
    many = _ok(rows, "blake3_many_gpu")
    copy = _ok(rows, "d2d_copy")
    cpu_all, cpu_1t, sha = _cpu(rows, "blake3_cpu_all"), _cpu(rows, "blake3_cpu_1t"), \
        _cpu(rows, "sha256_cpu_1t")
    s: dict = {"gpu_bytes": None, "gpu_gbps": None, "many_gbps": None, "copy_gbps": None,
               "cpu_bytes": None, "cpu_all_gbps": None, "cpu_1t_gbps": None, "sha_gbps": None,
               "cpu_threads": None, "common_bytes": None, "gpu_over_cpu": None,
               "quant_bytes": None, "quant_ratios": {},
               "quant_alone_bytes": None, "quant_alone_gbps": {},
               "fused_bytes": None, "fused_gbps": {}, "fused_ratios": {}, "fused_over_unfused": {},
               "d2h_bytes": None,
               "d2h_pinned_x": None, "d2h_pageable_x": None, "peak_gib": None}
    if gpu:
        top = max(gpu)
        s.update(gpu_bytes=top, gpu_gbps=gpu[top]["gbps"])
        if top in many:
            s["many_gbps"] = many[top]["gbps"]
        if top in copy:
            s["copy_gbps"] = copy[top]["gbps"]
    if cpu_all:
        top = max(cpu_all)
        s.update(cpu_bytes=top, cpu_all_gbps=cpu_all[top]["gbps"],
                 cpu_threads=cpu_all[top]["threads"])
        if top in cpu_1t:
            s["cpu_1t_gbps"] = cpu_1t[top]["gbps"]
        if top in sha:
            s["sha_gbps"] = sha[top]["gbps"]
    common = sorted(set(gpu) & set(cpu_all))
    if common:
        b = common[-1]
        s.update(common_bytes=b,
                 gpu_over_cpu=gpu[b]["gbps"] / cpu_all[b]["gbps"])
    for fmt, rounding in _cases(rows, "quant_blake3_gpu"):
        q = _ok(rows, "quant_blake3_gpu", fmt, rounding)
        both = sorted(set(q) & set(many))
        if both:
            b = both[-1]
            s["quant_bytes"] = b
            s["quant_ratios"][(fmt, rounding)] = q[b]["gbps"] / many[b]["gbps"]
    # the quantizer alone: every case at the largest size it was measured at
    alone = {c: _ok(rows, "quant_gpu", *c) for c in _cases(rows, "quant_gpu")}
    if alone:
        top = max(b for q in alone.values() for b in q)
        s["quant_alone_bytes"] = top
        s["quant_alone_gbps"] = {c: q[top]["gbps"] for c, q in alone.items() if top in q}
    # the fused launch against hashing alone: the largest size both were measured at
    fused = {c: _ok(rows, "fused_quant_blake3_gpu", *c) for c in _cases(rows, "fused_quant_blake3_gpu")}
    both = sorted({b for f in fused.values() for b in f} & set(many))
    if both:
        top = both[-1]
        s["fused_bytes"] = top
        for c, f in fused.items():
            if top in f and f[top]["page_elems"] == many[top]["page_elems"]:
                s["fused_gbps"][c] = f[top]["gbps"]
                s["fused_ratios"][c] = f[top]["gbps"] / many[top]["gbps"]
                q = _ok(rows, "quant_blake3_gpu", *c)
                if top in q:
                    s["fused_over_unfused"][c] = f[top]["gbps"] / q[top]["gbps"]
    for impl, key in (("d2h_pinned_blake3", "d2h_pinned_x"), ("d2h_pageable_blake3",
                                                              "d2h_pageable_x")):
        d = _ok(rows, impl)
        both = sorted(set(d) & set(gpu))
        if both:
            b = both[-1]
            s["d2h_bytes"] = b
            s[key] = d[b]["ms"] / gpu[b]["ms"]
    peaks = [r["peak_gpu_gib"] for r in rows if r["peak_gpu_gib"] is not None]
    if peaks:
        s["peak_gib"] = max(peaks)
    return s


def _one_byte(cases: dict) -> dict:
    """The entries of a {(fmt, rounding): value} map whose format has 1-byte codes."""
    return {c: v for c, v in cases.items() if FORMATS[c[0]].width == 1}


def _f(v, fmt: str) -> str:
    return NA if v is None else format(v, fmt)


def _tbps(gbps) -> str:
    return _f(gbps and gbps / 1e3, ".2f")


def macros(rows, manifest) -> dict[str, str]:
    s = summary(rows)
    ratios = s["quant_ratios"]
    worst = min(ratios, key=ratios.get) if ratios else None
    out = {
        "e3.device": latex_escape(manifest["gpu"] or "CPU only"),
        "e3.date": latex_escape(manifest["date"][:10]),
        "e3.cpu": latex_escape(manifest["cpu"] or "?"),
        "e3.cpu_threads": _f(s["cpu_threads"], "d"),
        "e3.gpu_bytes": _size(s["gpu_bytes"]) if s["gpu_bytes"] else NA,
        "e3.blake3_gpu_tbps": _tbps(s["gpu_gbps"]),
        "e3.blake3_many_gpu_tbps": _tbps(s["many_gbps"]),
        "e3.d2d_copy_tbps": _tbps(s["copy_gbps"]),
        "e3.hash_over_copy": _f(s["gpu_gbps"] and s["copy_gbps"]
                                and s["gpu_gbps"] / s["copy_gbps"], ".2f"),
        "e3.cpu_bytes": _size(s["cpu_bytes"]) if s["cpu_bytes"] else NA,
        "e3.blake3_cpu_all_gbps": _f(s["cpu_all_gbps"], ".1f"),
        "e3.blake3_cpu_1t_gbps": _f(s["cpu_1t_gbps"], ".2f"),
        "e3.sha256_cpu_1t_gbps": _f(s["sha_gbps"], ".2f"),
        "e3.common_bytes": _size(s["common_bytes"]) if s["common_bytes"] else NA,
        "e3.gpu_over_cpu_all": _f(s["gpu_over_cpu"], ".0f"),
        "e3.quant_bytes": _size(s["quant_bytes"]) if s["quant_bytes"] else NA,
        "e3.quant_over_hash_min": _f(ratios[worst] if worst else None, ".2f"),
        "e3.quant_over_hash_min_case": latex_escape("/".join(worst)) if worst else NA,
        "e3.d2h_bytes": _size(s["d2h_bytes"]) if s["d2h_bytes"] else NA,
        "e3.d2h_pinned_slowdown": _f(s["d2h_pinned_x"], ".0f"),
        "e3.d2h_pageable_slowdown": _f(s["d2h_pageable_x"], ".0f"),
        "e3.peak_gpu_gib": _f(s["peak_gib"], ".1f"),
    }
    for (fmt, rounding), r in ratios.items():
        out[f"e3.quant_over_hash.{fmt}.{rounding}"] = f"{r:.2f}"

    # issue 11's targets: the quantizer alone, the fused launch against hashing alone
    alone, fused_gbps = s["quant_alone_gbps"], s["fused_gbps"]
    fused, vs = s["fused_ratios"], s["fused_over_unfused"]
    out["e3.target.quant_alone_tbps"] = f"{TARGET_QUANT_TBPS:.1f}"
    out["e3.quant_alone_bytes"] = _size(s["quant_alone_bytes"]) if s["quant_alone_bytes"] else NA
    out["e3.fused_bytes"] = _size(s["fused_bytes"]) if s["fused_bytes"] else NA
    for case in sorted(set(alone) | set(TARGET_CASES)):
        out[f"e3.quant_alone_tbps.{_case_key(case)}"] = _tbps(alone.get(case))
    for case in TARGET_CASES:
        key = _case_key(case)
        out[f"e3.verdict.quant_alone.{key}"] = verdict(alone.get(case) and alone[case] / 1e3,
                                                       TARGET_QUANT_TBPS)
        out[f"e3.target.fused_over_hash.{key}"] = f"{TARGET_FUSED_OVER_HASH[case]:.1f}"
        out[f"e3.verdict.fused_over_hash.{key}"] = verdict(fused.get(case), TARGET_FUSED_OVER_HASH[case])
        out[f"e3.fused_tbps.{key}"] = _tbps(fused_gbps.get(case))
    one_byte = _one_byte(alone)
    slowest = min(one_byte, key=one_byte.get) if one_byte else None
    out["e3.quant_alone_min_tbps"] = _tbps(one_byte[slowest] if slowest else None)
    out["e3.quant_alone_min_case"] = latex_escape("/".join(slowest)) if slowest else NA
    out["e3.verdict.quant_alone.all"] = verdict(one_byte[slowest] / 1e3 if slowest else None,
                                                TARGET_QUANT_TBPS)
    for case in sorted(set(fused) | set(TARGET_CASES)):
        out[f"e3.fused_over_hash.{_case_key(case)}"] = _f(fused.get(case), ".2f")
    out["e3.fused_over_hash_min"] = _f(min(fused.values()) if fused else None, ".2f")
    out["e3.fused_over_hash_max"] = _f(max(fused.values()) if fused else None, ".2f")
    out["e3.fused_over_unfused_min"] = _f(min(vs.values()) if vs else None, ".2f")
    out["e3.fused_over_unfused_max"] = _f(max(vs.values()) if vs else None, ".2f")
    for (fmt, rounding), r in vs.items():
        out[f"e3.fused_over_unfused.{fmt}.{rounding}"] = f"{r:.2f}"
    return out


def _target_claims(s: dict, where: str) -> list[Claim]:
    """Issue 11's targets, one claim each (`verdict` decides, as it does for the macros)."""
    alone, fused = s["quant_alone_gbps"], s["fused_ratios"]
    at_q = f"{s['quant_alone_bytes'] / 2**30:g} GiB" if s["quant_alone_bytes"] else None
    at_f = f"{s['fused_bytes'] / 2**30:g} GiB" if s["fused_bytes"] else None
    out = []
    for case in TARGET_CASES:
        name = "/".join(case)
        v = alone.get(case)
        out.append(Claim(
            f"hash.quant_alone_1p5tbps.{_case_key(case)}",
            f"The quantizer kernel alone ({name}) runs at >= {TARGET_QUANT_TBPS} TB/s of bf16 input.",
            verdict(v and v / 1e3, TARGET_QUANT_TBPS) == "met",
            f"{v / 1e3:.2f} TB/s at {at_q}" if v else f"no quant_gpu row for {name} at the largest size ({where})"))
    one_byte = _one_byte(alone)
    slowest = min(one_byte, key=one_byte.get) if one_byte else None
    out.append(Claim(
        "hash.quant_alone_1p5tbps.all",
        f"The quantizer kernel alone runs at >= {TARGET_QUANT_TBPS} TB/s of bf16 input in every "
        "1-byte format and rounding measured.",
        verdict(one_byte[slowest] / 1e3 if slowest else None, TARGET_QUANT_TBPS) == "met",
        f"slowest {'/'.join(slowest)}: {one_byte[slowest] / 1e3:.2f} TB/s at {at_q}, over "
        f"{len(one_byte)} cases" if slowest else f"no 1-byte quant_gpu rows ({where})"))
    for case, target in TARGET_FUSED_OVER_HASH.items():
        name = "/".join(case)
        r = fused.get(case)
        out.append(Claim(
            f"hash.fused_over_hash.{_case_key(case)}",
            f"The committer's fused quantize-and-hash launch ({name}) runs at >= {target}x the "
            "throughput of hashing the unquantized pages alone (bf16 input bytes counted, same page size).",
            verdict(r, target) == "met",
            f"{r:.2f}x at {at_f} ({s['fused_gbps'][case] / 1e3:.2f} TB/s)" if r is not None
            else f"no fused and hash-alone rows for {name} at one size ({where})"))
    return out


def claims(rows, manifest) -> list[Claim]:
    s = summary(rows)
    where = manifest["gpu"] or "no GPU in this run"
    gpu, cpu = s["gpu_gbps"], s["gpu_over_cpu"]
    d2h = s["d2h_pinned_x"]
    return [
        Claim("hash.gpu_blake3_1tbps",
              "BLAKE3 on the GPU hashes large inputs at >= 1 TB/s.",
              gpu is not None and gpu >= 1000,
              f"{gpu / 1e3:.2f} TB/s at {s['gpu_bytes'] / 2**30:g} GiB ({where})" if gpu
              else f"no GPU BLAKE3 rows ({where})"),
        *_target_claims(s, where),
        Claim("hash.gpu_15x_cpu_all",
              "GPU BLAKE3 is >= 15x the `blake3` package on all CPU threads of the same machine.",
              cpu is not None and cpu >= 15,
              f"{cpu:.1f}x at {s['common_bytes'] / 2**20:g} MiB vs {s['cpu_threads']} CPU "
              f"threads" if cpu else f"no common GPU/CPU size ({where})"),
        Claim("hash.d2h_slowdown_10x",
              "Copying to pinned host memory and hashing there (all threads) is >= 10x slower "
              "than hashing on the GPU.",
              d2h is not None and d2h >= 10,
              f"{d2h:.1f}x (pinned), {_f(s['d2h_pageable_x'], '.1f')}x (pageable) at "
              f"{s['d2h_bytes'] / 2**20:g} MiB" if d2h else f"no d2h rows ({where})"),
    ]


# ---------------------------------------------------------------- the integer-issue ceiling
# The SASS counts of BLAKE3's compression loop (experiments/e3_sass.py, one row per launch and
# mnemonic) through the issue model of fieldprint.sass, against E3's measurement of the same
# launches at the largest size measured. Macros go to their own file (python -m fieldprint.report
# ceiling), so `macros` above keeps reading E3's rows alone.

CEILING_IMPLS = ("blake3_gpu", "blake3_many_gpu")
ROUND_OPCODES = ("LOP3", "SHF", "IADD3", "IMAD")  # what BLAKE3's rounds compile to
BINDING_NAMES = {"alu": "ALU", "fma": "FMA", "issue": "issued"}  # as the paper names the limit


def ceiling_summary(sass_rows, hash_rows) -> dict:
    """Per impl of ``CEILING_IMPLS`` in the SASS rows: ``opcodes`` (count per 64-byte block by
    opcode, ROUND_OPCODES and ``other``), ``pipes`` (fieldprint.sass.pipe_counts), ``ceiling``
    (fieldprint.sass.Ceiling), ``one_pipe`` (the bound if every integer instruction shared the ALU
    pipe, in bytes/s), ``measured_bytes`` / ``measured_gbps`` (E3 at its largest size, or None)."""
    out = {}
    for impl in CEILING_IMPLS:
        counts = {r["mnemonic"]: r["count"] for r in sass_rows if r["impl"] == impl}
        if not counts:
            continue
        by_opcode = dict.fromkeys(ROUND_OPCODES, 0) | {"other": 0}
        for mnemonic, n in counts.items():
            opcode = mnemonic.split(".", 1)[0]
            by_opcode[opcode if opcode in ROUND_OPCODES else "other"] += n
        pipes = sass.pipe_counts(counts)
        one_pipe = sass.ceiling({"alu": pipes["alu"] + pipes["fma"], "fma": 0, "issue": pipes["issue"]})
        measured = _ok(hash_rows, impl)
        top = max(measured) if measured else None
        out[impl] = {"opcodes": by_opcode, "pipes": pipes, "ceiling": sass.ceiling(pipes),
                     "one_pipe": one_pipe.bytes_per_s, "measured_bytes": top,
                     "measured_gbps": measured[top]["gbps"] if measured else None}
    return out


def ceiling_verdict(summary: dict) -> str:
    """The ceiling's verdict, worded to follow "the ceiling": "holds" (every measured impl at or
    below its ceiling), "is exceeded" or "is not tested" (no GPU measurement)."""
    pairs = [(s["ceiling"].bytes_per_s, s["measured_gbps"] * 1e9) for s in summary.values()
             if s["measured_gbps"] is not None]
    if not pairs:
        return "is not tested"
    return "holds" if all(measured <= bound for bound, measured in pairs) else "is exceeded"


def one_pipe_vs_measured(summary: dict) -> str:
    """How the measurement relates to the one-pipe bound (every integer instruction on the ALU
    pipe), worded to follow "the measurement": "exceeds" (some impl measured above its one-pipe
    bound), "stays within" or "does not test" (no GPU measurement)."""
    pairs = [(s["one_pipe"], s["measured_gbps"] * 1e9) for s in summary.values()
             if s["measured_gbps"] is not None]
    if not pairs:
        return "does not test"
    return "exceeds" if any(measured > bound for bound, measured in pairs) else "stays within"


def ceiling_macros(sass_rows, hash_rows) -> dict[str, str]:
    """``e3.sass.<impl>.*`` (instructions per 64-byte block) and ``e3.ceiling.*`` macros."""
    summary = ceiling_summary(sass_rows, hash_rows)
    missing = set(CEILING_IMPLS) - set(summary)
    if missing:
        raise ValueError(f"the SASS rows lack the launch(es) {sorted(missing)}")
    m, rates = sass.H200, sass.pipe_rates(sass.H200)
    out = {"e3.ceiling.sms": str(m.sms), "e3.ceiling.clock_ghz": f"{m.clock_hz / 1e9:.2f}",
           "e3.ceiling.pipe_per_clk": str(rates["alu"]), "e3.ceiling.issue_per_clk": str(rates["issue"]),
           "e3.ceiling.hbm_tbps": f"{m.hbm_bytes_per_s / 1e12:.1f}",
           "e3.ceiling.verdict": ceiling_verdict(summary),
           "e3.ceiling.one_pipe_vs_measured": one_pipe_vs_measured(summary),
           # what limits a hash that reads each byte once: the lower of issue ceiling and HBM
           "e3.ceiling.bound": "integer issue" if all(s["ceiling"].bytes_per_s < m.hbm_bytes_per_s
                                                      for s in summary.values()) else "memory bandwidth"}
    for impl, s in summary.items():
        for op, n in s["opcodes"].items():
            out[f"e3.sass.{impl}.{op.lower()}"] = str(n)
        for pipe, n in s["pipes"].items():
            out[f"e3.sass.{impl}.{pipe}"] = str(n)
        out[f"e3.sass.{impl}.per_byte"] = f"{s['pipes']['issue'] / sass.BLOCK_BYTES:.1f}"
        bound, measured = s["ceiling"].bytes_per_s, s["measured_gbps"]
        out[f"e3.ceiling.{impl}.tbps"] = f"{bound / 1e12:.2f}"
        # the limit that sets the bound, for the paper's formula: its name, count and rate
        binding = s["ceiling"].binding
        out[f"e3.ceiling.{impl}.binding"] = BINDING_NAMES[binding]
        out[f"e3.ceiling.{impl}.binding_count"] = str(s["pipes"][binding])
        out[f"e3.ceiling.{impl}.binding_per_clk"] = str(rates[binding])
        out[f"e3.ceiling.{impl}.one_pipe_tbps"] = f"{s['one_pipe'] / 1e12:.2f}"
        out[f"e3.ceiling.{impl}.hbm_percent"] = f"{100 * bound / m.hbm_bytes_per_s:.0f}"
        out[f"e3.ceiling.{impl}.measured_tbps"] = _tbps(measured)
        out[f"e3.ceiling.{impl}.measured_bytes"] = _size(s["measured_bytes"]) if measured else NA
        out[f"e3.ceiling.{impl}.percent"] = _f(measured and 100 * measured * 1e9 / bound, ".0f")
    return out
