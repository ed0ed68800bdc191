"""Figures: ``fieldprint.plots.<experiment>.draw(rows, manifest, out_stem)`` for each experiment.

``python -m fieldprint.plots <experiment> <results.csv> <out_stem>`` reads the CSV and the
manifest beside it and writes ``<out_stem>.pdf`` and ``<out_stem>.png``.
"""
