"""E3 numbers for the paper: GPU BLAKE3 throughput, its ratio to the CPU, the quantize cost, and
what copying to the host instead costs. Values missing from a run (a CPU-only run has no GPU
rows) print as "n/a" and their claims are not supported."""

from __future__ import annotations

from fieldprint.report import Claim, latex_escape

NA = "n/a"


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


def _quant_cases(rows):
    return sorted({(r["fmt"], r["rounding"]) for r in rows
                   if r["impl"] == "quant_blake3_gpu" and r["status"] == "ok"
                   and r["device"] == "cuda"})


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
               "quant_bytes": None, "quant_ratios": {}, "fused_ratios": {}, "fused_over_unfused": {},
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
    for fmt, rounding in _quant_cases(rows):
        q = _ok(rows, "quant_blake3_gpu", fmt, rounding)
        both = sorted(set(q) & set(many))
        if both:
            b = both[-1]
            s["quant_bytes"] = b
            s["quant_ratios"][(fmt, rounding)] = q[b]["gbps"] / many[b]["gbps"]
    for fmt, rounding in _quant_cases(rows):
        fused = _ok(rows, "fused_quant_blake3_gpu", fmt, rounding)
        q = _ok(rows, "quant_blake3_gpu", fmt, rounding)
        both = sorted(set(fused) & set(many) & set(q))
        if both:
            b = both[-1]
            s["fused_ratios"][(fmt, rounding)] = fused[b]["gbps"] / many[b]["gbps"]
            s["fused_over_unfused"][(fmt, rounding)] = fused[b]["gbps"] / q[b]["gbps"]
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


def _f(v, fmt: str) -> str:
    return NA if v is None else format(v, fmt)


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
        "e3.blake3_gpu_tbps": _f(s["gpu_gbps"] and s["gpu_gbps"] / 1e3, ".2f"),
        "e3.blake3_many_gpu_tbps": _f(s["many_gbps"] and s["many_gbps"] / 1e3, ".2f"),
        "e3.d2d_copy_tbps": _f(s["copy_gbps"] and s["copy_gbps"] / 1e3, ".2f"),
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
    fused, vs = s["fused_ratios"], s["fused_over_unfused"]
    out["e3.fused_over_hash_min"] = _f(min(fused.values()) if fused else None, ".2f")
    out["e3.fused_over_hash_max"] = _f(max(fused.values()) if fused else None, ".2f")
    out["e3.fused_over_unfused_min"] = _f(min(vs.values()) if vs else None, ".2f")
    out["e3.fused_over_unfused_max"] = _f(max(vs.values()) if vs else None, ".2f")
    for (fmt, rounding), r in vs.items():
        out[f"e3.fused_over_unfused.{fmt}.{rounding}"] = f"{r:.2f}"
    return out


def claims(rows, manifest) -> list[Claim]:
    s = summary(rows)
    where = manifest["gpu"] or "no GPU in this run"
    gpu, cpu = s["gpu_gbps"], s["gpu_over_cpu"]
    ratios = s["quant_ratios"]
    worst = min(ratios, key=ratios.get) if ratios else None
    d2h = s["d2h_pinned_x"]
    return [
        Claim("hash.gpu_blake3_1tbps",
              "BLAKE3 on the GPU hashes large inputs at >= 1 TB/s.",
              gpu is not None and gpu >= 1000,
              f"{gpu / 1e3:.2f} TB/s at {s['gpu_bytes'] / 2**30:g} GiB ({where})" if gpu
              else f"no GPU BLAKE3 rows ({where})"),
        Claim("hash.quant_hash_0p8",
              "Quantize + hash runs at >= 0.8x the throughput of hashing the unquantized pages "
              "(bf16 input bytes counted), for every format and rounding.",
              worst is not None and ratios[worst] >= 0.8,
              (f"worst {'/'.join(worst)}: {ratios[worst]:.2f}x at "
               f"{s['quant_bytes'] / 2**20:g} MiB; best {max(ratios.values()):.2f}x")
              if worst else f"no quantize+hash rows ({where})"),
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
