"""Generated LaTeX and the claims report.

    python -m fieldprint.report macros <experiment> <results.csv> <out.tex>
    python -m fieldprint.report claims <out.md> <experiment>=<results.csv> ...
    python -m fieldprint.report environment <gpu_results.csv> <local_results.csv> <out.tex>
    python -m fieldprint.report reproduction <out.md> <reference_dir> <experiment>=<results.csv> ...
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from fieldprint.experiments.common import atomic_write_text, read_csv
from fieldprint.report import Claim, render_macros
from fieldprint.report.provenance import environment_macros, reproduction_report


def _load(csv_path: Path) -> tuple[list[dict[str, str]], dict]:
    manifest_path = csv_path.with_name(csv_path.name.removesuffix(".csv") + ".manifest.json")
    return read_csv(csv_path), json.loads(manifest_path.read_text())


def _report(experiment: str):
    return importlib.import_module(f"fieldprint.report.{experiment}")


def write_macros(experiment: str, csv_path: Path, out: Path) -> None:
    rows, manifest = _load(csv_path)
    atomic_write_text(out, render_macros(_report(experiment).macros(rows, manifest)))


def write_claims(out: Path, inputs: list[str]) -> None:
    sections = ["# Claims and the results that support them", ""]
    total = supported = 0
    for item in inputs:
        experiment, _, csv_name = item.partition("=")
        rows, manifest = _load(Path(csv_name))
        claims: list[Claim] = _report(experiment).claims(rows, manifest)
        where = manifest.get("gpu") or "CPU"
        sections += [f"## {experiment} ({where}, {str(manifest.get('date'))[:10]}, `{csv_name}`)", ""]
        for c in claims:
            total += 1
            supported += c.supported
            mark = "SUPPORTED" if c.supported else "NOT SUPPORTED"
            sections.append(f"- **{mark}** `{c.id}`: {c.text} — {c.evidence}")
        sections.append("")
    sections.insert(1, f"\n{supported} of {total} claims supported by the current results.")
    atomic_write_text(out, "\n".join(sections) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("macros")
    m.add_argument("experiment")
    m.add_argument("csv", type=Path)
    m.add_argument("out", type=Path)
    c = sub.add_parser("claims")
    c.add_argument("out", type=Path)
    c.add_argument("inputs", nargs="+", help="experiment=results.csv")
    e = sub.add_parser("environment")
    e.add_argument("gpu_csv", type=Path)
    e.add_argument("local_csv", type=Path)
    e.add_argument("out", type=Path)
    r = sub.add_parser("reproduction")
    r.add_argument("out", type=Path)
    r.add_argument("reference_dir", type=Path)
    r.add_argument("inputs", nargs="+", help="experiment=results.csv")
    args = parser.parse_args()
    if args.command == "macros":
        write_macros(args.experiment, args.csv, args.out)
    elif args.command == "claims":
        write_claims(args.out, args.inputs)
    elif args.command == "environment":
        atomic_write_text(args.out, render_macros(environment_macros(args.gpu_csv, args.local_csv)))
    else:
        pairs = [(exp, Path(p)) for exp, _, p in (item.partition("=") for item in args.inputs)]
        atomic_write_text(args.out, reproduction_report(args.reference_dir, pairs, _report))


if __name__ == "__main__":
    main()
