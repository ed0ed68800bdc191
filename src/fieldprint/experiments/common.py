"""What every experiment shares: typed Hydra configs, and running one into its results files.

An experiment module defines a dataclass config that extends :class:`ExperimentConfig`, a
``run(cfg) -> list[dict]`` that returns tidy rows, and ends with::

    if __name__ == "__main__":
        hydra_main("e1_throughput", E1Config, run)

``hydra_main`` composes ``configs/<name>.yaml`` (which selects ``scale`` and the experiment's
own group, ``configs/<name>/<scale>.yaml``), validates it against the dataclass (an unknown key or
a bad value is an error), runs the experiment and writes ``<out_dir>/<name>.csv`` (its columns
declared in :data:`fieldprint.results.SCHEMAS`) and ``<out_dir>/<name>.manifest.json``, both
through :mod:`fieldprint.results`. Timing helpers are in :mod:`fieldprint.timing`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fieldprint.results import (
    ResultsError,
    atomic_write_text,
    manifest_path,
    schema_of,
    write_manifest,
    write_rows,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO_ROOT / "configs"

SCALES = ("smoke", "paper")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ExperimentConfig:
    """Fields every experiment has; subclasses add their own and extend ``validate``."""

    out_dir: str = "results/adhoc"
    scale: str = "smoke"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        # An empty out_dir would write the results into whatever the current directory is.
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"out_dir must name a directory, got {self.out_dir!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")


_STARTED = time.perf_counter()


def progress(name: str, msg: str) -> None:
    """A line on stderr (the run's log) with the seconds since the process started: where a long
    paper-scale run spends its time, also when the run is cut short."""
    print(f"[{name} +{time.perf_counter() - _STARTED:7.1f} s] {msg}", file=sys.stderr, flush=True)


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: for config ``validate`` methods."""
    if not condition:
        raise ValueError(message)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    return name


# ---------------------------------------------------------------- outputs


def _git_commit() -> dict[str, Any]:
    """The commit the code came from; a copy without .git (the GPU machine) is told it through
    FIELDPRINT_GIT_COMMIT / FIELDPRINT_GIT_DIRTY."""
    if os.environ.get("FIELDPRINT_GIT_COMMIT"):
        return {"commit": os.environ["FIELDPRINT_GIT_COMMIT"],
                "dirty": os.environ.get("FIELDPRINT_GIT_DIRTY", "unknown") == "1"}

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows. Host-bound rows
    (CPU hashing, E6's copy-and-hash mode) move by tens of percent between leased machines of one
    GPU type whose CPUs differ; ``platform`` alone says only "x86_64"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where a result came from: host, GPU, driver, library versions."""
    import torch
    import triton

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
        "driver": None,
        "cuda": torch.version.cuda,
        # E1's external baseline, when installed (its version decides what its rows measured)
        "flashinfer": _installed_version("flashinfer-python"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    return env


def run_manifest(cfg: ExperimentConfig, started: float) -> dict[str, Any]:
    """The manifest of a run that started at ``started`` (``time.time()``) and just ended."""
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        **_git_commit(),
        **environment(),
        "config": asdict(cfg),
    }


def output_paths(cfg: ExperimentConfig, name: str) -> tuple[Path, Path]:
    csv_path = Path(cfg.out_dir) / f"{name}.csv"
    return csv_path, manifest_path(csv_path)


def run_and_save(name: str, cfg: ExperimentConfig, run: Callable[[Any], list[dict]]) -> list[dict]:
    """Run an experiment and write its CSV (checked against its declared columns) and manifest
    (last, as the done-marker). Rows that do not match the declaration are kept for inspection
    in ``<name>.rejected.json`` (a long GPU run is not lost), and the error is raised."""
    started = time.time()
    rows = run(cfg)
    csv_path, mpath = output_paths(cfg, name)
    try:
        digest = write_rows(csv_path, rows, schema_of(name))
    except ResultsError as err:
        rejected = csv_path.with_name(f"{name}.rejected.json")
        atomic_write_text(rejected, json.dumps(rows, indent=1, default=repr) + "\n")
        raise ResultsError(f"{err} (the rows are in {rejected})") from None
    write_manifest(mpath, {**run_manifest(cfg, started), "rows": len(rows), "csv_sha256": digest})
    return rows


# ---------------------------------------------------------------- Hydra


def _store_schema(name: str, schema: type) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{name}_schema", node=schema)


def to_typed(cfg: Any, schema: type) -> Any:
    """Hydra's DictConfig -> the dataclass, running its validation (``__post_init__``)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return schema(**container)


def compose(name: str, schema: type, overrides: Sequence[str] = ()) -> Any:
    """The typed config ``python -m fieldprint.experiments.<name> overrides...`` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _store_schema(name, schema)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=name, overrides=list(overrides))
    return to_typed(cfg, schema)


def hydra_main(name: str, schema: type, run: Callable[[Any], list[dict]]) -> None:
    """Command-line entry point of experiment ``name`` (see the module docstring)."""
    import hydra

    _store_schema(name, schema)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=name)
    def _main(cfg: Any) -> None:
        run_and_save(name, to_typed(cfg, schema), run)

    _main()
