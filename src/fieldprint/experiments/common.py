"""What every experiment shares: typed Hydra configs, atomic outputs, manifests, timing.

An experiment module defines a dataclass config that extends :class:`ExperimentConfig`, a
``run(cfg) -> list[dict]`` that returns tidy rows, and ends with::

    if __name__ == "__main__":
        hydra_main("e1_throughput", E1Config, run)

``hydra_main`` composes ``configs/<name>.yaml`` (which selects ``scale`` and the experiment's
own group, ``configs/<name>/<scale>.yaml``), validates it against the dataclass (an unknown key or
a bad value is an error), runs the experiment and writes ``<out_dir>/<name>.csv`` and
``<out_dir>/<name>.manifest.json`` atomically.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")


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


# ---------------------------------------------------------------- outputs, written atomically


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Tidy CSV: one row per measurement, columns in first-seen order across all rows."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def environment() -> dict[str, Any]:
    """Where a result came from: host, GPU, driver, library versions."""
    import torch
    import triton

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
        "driver": None,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    return env


def write_manifest(path: str | Path, cfg: Any, started: float, extra: dict | None = None) -> None:
    manifest = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        **_git_commit(),
        **environment(),
        "config": asdict(cfg),
        **(extra or {}),
    }
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def output_paths(cfg: ExperimentConfig, name: str) -> tuple[Path, Path]:
    out = Path(cfg.out_dir)
    return out / f"{name}.csv", out / f"{name}.manifest.json"


def run_and_save(name: str, cfg: ExperimentConfig, run: Callable[[Any], list[dict]]) -> list[dict]:
    """Run an experiment and write its CSV and manifest (the manifest last, as the done-marker)."""
    started = time.time()
    rows = run(cfg)
    csv_path, manifest_path = output_paths(cfg, name)
    write_csv(csv_path, rows)
    write_manifest(manifest_path, cfg, started)
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


# ---------------------------------------------------------------- timing


def bench(fn: Callable[[], Any], device: str, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()``: CUDA events via ``triton.testing.do_bench`` on a GPU,
    a host clock around each call on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times)
