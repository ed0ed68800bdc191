"""``python -m fieldprint.plots <experiment> <results.csv> <out_stem>``."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from fieldprint.experiments.common import read_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment", help="module name under fieldprint.plots, e.g. e1_throughput")
    parser.add_argument("csv", type=Path, help="results CSV; its .manifest.json must sit beside it")
    parser.add_argument("out_stem", type=Path, help="output path without extension")
    args = parser.parse_args()
    manifest_path = args.csv.with_name(args.csv.name.removesuffix(".csv") + ".manifest.json")
    manifest = json.loads(manifest_path.read_text())
    module = importlib.import_module(f"fieldprint.plots.{args.experiment}")
    module.draw(read_csv(args.csv), manifest, args.out_stem)


if __name__ == "__main__":
    main()
