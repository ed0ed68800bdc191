"""``python -m fieldprint.plots <experiment> <results.csv> <out_stem>``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from fieldprint.results import ResultsError, load_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment", help="module name under fieldprint.plots, e.g. e1_throughput")
    parser.add_argument("csv", type=Path, help="results CSV; its .manifest.json must sit beside it")
    parser.add_argument("out_stem", type=Path, help="output path without extension")
    args = parser.parse_args()
    try:
        res = load_results(args.experiment, args.csv)
    except ResultsError as err:  # bad data: the file, line and column, without a traceback
        sys.exit(f"fieldprint.plots: {err}")
    module = importlib.import_module(f"fieldprint.plots.{args.experiment}")
    module.draw(res.rows, res.manifest, args.out_stem)


if __name__ == "__main__":
    main()
