"""Experiment entry points: each module is a Hydra app, ``python -m fieldprint.experiments.<name>``."""
