"""Where the numbers came from: environment macros, and the reproduction report that compares a
fresh GPU run with the committed reference measurements."""

from __future__ import annotations

from pathlib import Path

from fieldprint.report import latex_escape
from fieldprint.results import load_results, read_manifest


def environment_macros(gpu_manifest: Path, local_manifest: Path) -> dict[str, str]:
    """``env.*`` keys from the manifest of a GPU experiment and of a locally run one."""
    gpu, local = read_manifest(gpu_manifest), read_manifest(local_manifest)
    values = {
        "env.gpu": gpu["gpu"] or "no GPU",
        "env.date": gpu["date"][:10],
        "env.driver": gpu["driver"],
        "env.cuda": gpu["cuda"],
        "env.torch": gpu["torch"],
        "env.triton": gpu["triton"],
        "env.python": gpu["python"],
        "env.commit": gpu["commit"][:10],
        "env.local_cpu_count": local["cpu_count"],
        "env.local_torch": local["torch"],
        "env.local_date": local["date"][:10],
    }
    return {key: latex_escape(value) for key, value in values.items()}


def _numeric(values: dict[str, str]) -> dict[str, float]:
    out = {}
    for key, text in values.items():
        try:
            out[key] = float(text.replace("{,}", "").replace(",", ""))
        except ValueError:
            continue
    return out


def reproduction_report(reference_dir: Path, pairs: list[tuple[str, Path]], report_module) -> str:
    """Markdown: for each experiment, every numeric paper value of the fresh run next to the
    committed reference (ratios are what should reproduce across machines, not absolute
    times), and the claims each supports."""
    lines = ["# Reproduction report: this run vs the committed reference", ""]
    for exp, fresh_csv in pairs:
        ref_csv = reference_dir / f"{exp}.csv"
        mod = report_module(exp)
        fresh = load_results(exp, fresh_csv)
        fresh_rows, fresh_man = fresh.rows, fresh.manifest
        lines += [f"## {exp}", "", f"- this run: {fresh_man['gpu']}, {fresh_man['date'][:10]}"]
        if not ref_csv.exists():
            lines += [f"- no committed reference at `{ref_csv}`", ""]
            continue
        ref = load_results(exp, ref_csv)
        ref_rows, ref_man = ref.rows, ref.manifest
        lines += [f"- reference: {ref_man['gpu']}, {ref_man['date'][:10]}", "",
                  "| value | reference | this run | this / reference |", "| --- | --- | --- | --- |"]
        fresh_vals = _numeric(mod.macros(fresh_rows, fresh_man))
        ref_vals = _numeric(mod.macros(ref_rows, ref_man))
        for key in sorted(set(fresh_vals) & set(ref_vals)):
            r, f = ref_vals[key], fresh_vals[key]
            ratio = f"{f / r:.2f}" if r else "n/a"
            lines.append(f"| `{key}` | {r:g} | {f:g} | {ratio} |")
        ref_claims = {c.id: c.supported for c in mod.claims(ref_rows, ref_man)}
        lines += ["", "| claim | reference | this run |", "| --- | --- | --- |"]
        for c in mod.claims(fresh_rows, fresh_man):
            lines.append(f"| `{c.id}` | {ref_claims.get(c.id, 'n/a')} | {c.supported} ({c.evidence}) |")
        lines.append("")
    return "\n".join(lines) + "\n"
