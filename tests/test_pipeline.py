"""The whole CPU pipeline, run from a copy of the repository into a temporary folder: every
figure is drawn, every generated number equals what its results file gives, the PDF builds."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fieldprint.experiments.common import REPO_ROOT
from fieldprint.report import render_macros
from fieldprint.results import load_results

pytestmark = pytest.mark.slow


def tracked_copy(dst: Path) -> None:
    """Copy the files git knows (tracked, or untracked and not ignored): a fresh clone's tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO_ROOT / name.decode()
        if src.is_file():
            (dst / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name.decode())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if shutil.which("latexmk") is None:
        pytest.skip("latexmk missing: `make setup` installs TeX Live")
    root = tmp_path_factory.mktemp("repo")
    tracked_copy(root)
    env = {**os.environ, "PYTHONPATH": str(root / "src"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: the workflow sets it per rule
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--config", "gpu=False", "sram_scale=smoke"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root


def sources(root: Path) -> dict[str, Path]:
    """experiment -> the results file its generated macros came from (named in claims.md)."""
    text = (root / "results" / "claims.md").read_text()
    return {exp: root / path for exp, path in re.findall(r"^## (\w+) \(.*`(.+?)`\)$", text, re.M)}


def test_figures_and_pdf(pipeline):
    for exp in sources(pipeline):
        for ext in ("pdf", "png"):
            assert (pipeline / "figures" / f"{exp}.{ext}").stat().st_size > 1000
    pdf = (pipeline / "paper" / "main.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 50_000


def test_generated_numbers_come_from_results(pipeline):
    import importlib

    found = sources(pipeline)
    assert {"e0_unfused", "e1_throughput", "e2_sram", "e5_accuracy"} <= set(found)
    for exp, csv_path in found.items():
        res = load_results(exp, csv_path)
        expected = importlib.import_module(f"fieldprint.report.{exp}").macros(res.rows, res.manifest)
        generated = (pipeline / "paper" / "generated" / f"{exp}.tex").read_text()
        assert expected and generated == render_macros(expected), exp


def test_no_half_written_or_stray_outputs(pipeline):
    leftovers = [p for p in pipeline.rglob("*.tmp")] + list(pipeline.glob("outputs")) + list(pipeline.rglob(".hydra"))
    assert not leftovers
