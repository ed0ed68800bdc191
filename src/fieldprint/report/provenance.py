"""Where the numbers came from: environment macros, and the reproduction report that compares a
fresh GPU run with the committed reference measurements."""

from __future__ import annotations

import json
from pathlib import Path

from fieldprint.experiments.common import read_csv
from fieldprint.report import latex_escape


def manifest_of(csv_path: Path) -> dict:
    return json.loads(csv_path.with_name(csv_path.name.removesuffix(".csv") + ".manifest.json").read_text())


def environment_macros(gpu_csv: Path, local_csv: Path) -> dict[str, str]:
    """``env.*`` keys from the manifest of a GPU experiment and of a locally run one."""
    gpu, local = manifest_of(gpu_csv), manifest_of(local_csv)
    return {
        "env.gpu": latex_escape(gpu.get("gpu") or "no GPU"),
        "env.date": str(gpu.get("date", "?"))[:10],
        "env.driver": latex_escape(str(gpu.get("driver"))),
        "env.cuda": latex_escape(str(gpu.get("cuda"))),
        "env.torch": latex_escape(str(gpu.get("torch"))),
        "env.triton": latex_escape(str(gpu.get("triton"))),
        "env.python": str(gpu.get("python")),
        "env.commit": str(gpu.get("commit", "?"))[:10],
        "env.local_cpu_count": str(local.get("cpu_count")),
        "env.local_torch": latex_escape(str(local.get("torch"))),
        "env.local_date": str(local.get("date", "?"))[:10],
    }


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
        fresh_rows, fresh_man = read_csv(fresh_csv), manifest_of(fresh_csv)
        lines += [f"## {exp}", "", f"- this run: {fresh_man.get('gpu')}, {str(fresh_man.get('date'))[:10]}"]
        if not ref_csv.exists():
            lines += [f"- no committed reference at `{ref_csv}`", ""]
            continue
        ref_rows, ref_man = read_csv(ref_csv), manifest_of(ref_csv)
        lines += [f"- reference: {ref_man.get('gpu')}, {str(ref_man.get('date'))[:10]}", "",
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
