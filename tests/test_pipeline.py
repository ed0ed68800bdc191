"""The Snakemake pipeline, run from a copy of the repository into a temporary folder with the
venv's ``snakemake`` and the venv NOT on PATH (as ``.venv/bin/snakemake`` from a plain shell).

Fast: a config error stops before anything runs; an edited manifest re-runs the rules that read
it. Slow (the whole CPU pipeline): every figure is drawn, every generated number equals what its
results file gives, the PDF builds, also with a GPU name full of LaTeX specials; a LaTeX build
interrupted with Ctrl-C recovers on the next run."""

import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fieldprint.experiments.common import REPO_ROOT
from fieldprint.report import latex_escape, render_macros
from fieldprint.results import load_results, read_manifest, write_manifest

VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = VENV_BIN / "snakemake"
CONFIG = ["--config", "gpu=False", "sram_scale=smoke"]
E1_MANIFEST = "data/reference/h200/e1_throughput.manifest.json"
GGUF = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
HOSTILE_GPU = "NVIDIA H200 100% & R&D #1 {x}_y $z$ ~a^b \\fpdef{env.gpu}{H100}"


def tracked_copy(dst: Path) -> None:
    """Copy the files git knows (tracked, or untracked and not ignored): a fresh clone's tree;
    the weights ``make model`` cached are linked in, as a user who ran it first has them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO_ROOT / name.decode()
        if src.is_file():
            (dst / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name.decode())
    weights = REPO_ROOT / GGUF
    if weights.exists():
        (dst / GGUF).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(weights, dst / GGUF)  # no 98 MB copy where both are on one file system
        except OSError:
            shutil.copy2(weights, dst / GGUF)


def user_env(root: Path) -> dict[str, str]:
    """A user's shell that has not activated the venv: its bin folder is not on PATH."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != VENV_BIN.resolve()]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "PATH": os.pathsep.join(path)}
    for name in ("TRITON_INTERPRET", "VIRTUAL_ENV"):  # the workflow sets TRITON_INTERPRET per rule
        env.pop(name, None)
    return env


def snakemake(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), "--cores", "2", *args, *CONFIG], cwd=root, env=user_env(root),
                          capture_output=True, text=True, timeout=timeout)


def set_gpu_name(root: Path, name: str) -> None:
    path = root / E1_MANIFEST
    write_manifest(path, {**read_manifest(path), "gpu": name})


@pytest.fixture
def repo(tmp_path):
    tracked_copy(tmp_path)
    assert shutil.which("python", path=user_env(tmp_path)["PATH"]) != str(VENV_BIN / "python")
    return tmp_path


# ---------------------------------------------------------------- fast


def test_empty_results_folder_is_a_config_error(repo):
    done = subprocess.run([str(SNAKEMAKE), "--cores", "1", "--config", "gpu=False", "results="], cwd=repo,
                          env=user_env(repo), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "results=None: must name a directory" in done.stdout + done.stderr
    assert not (repo / "results").exists() and not (repo / "None").exists()


def test_manifest_edit_reruns_the_rules_that_read_it(repo):
    """Without the venv on PATH the macros rule runs (the interpreter snakemake runs under); then
    a new GPU name in the manifest makes it out of date, and the re-run escapes the name."""
    target = "paper/generated/e1_throughput.tex"
    done = snakemake(repo, target)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "\\fpdef{e1.gpu}{NVIDIA H200}" in (repo / target).read_text()
    assert "Nothing to be done" in snakemake(repo, "-n", target).stdout
    set_gpu_name(repo, HOSTILE_GPU)
    plan = snakemake(repo, "-n", target).stdout
    assert f"reason: Updated input files: {E1_MANIFEST}" in plan and "Nothing to be done" not in plan
    done = snakemake(repo, target)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"\\fpdef{{e1.gpu}}{{{latex_escape(HOSTILE_GPU)}}}" in (repo / target).read_text()


# ---------------------------------------------------------------- the whole pipeline (slow)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if shutil.which("latexmk") is None:
        pytest.skip("latexmk missing: `make setup` installs TeX Live")
    root = tmp_path_factory.mktemp("repo")
    tracked_copy(root)
    done = snakemake(root, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root


def sources(root: Path) -> dict[str, Path]:
    """experiment -> the results file its generated macros came from (named in claims.md)."""
    text = (root / "results" / "claims.md").read_text()
    return {exp: root / path for exp, path in re.findall(r"^## (\w+) \(.*`(.+?)`\)$", text, re.M)}


@pytest.mark.slow
def test_figures_and_pdf(pipeline):
    for exp in sources(pipeline):
        for ext in ("pdf", "png"):
            assert (pipeline / "figures" / f"{exp}.{ext}").stat().st_size > 1000
    pdf = (pipeline / "paper" / "main.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 50_000


@pytest.mark.slow
def test_generated_numbers_come_from_results(pipeline):
    found = sources(pipeline)
    assert {"e0_unfused", "e1_throughput", "e2_sram", "e5_accuracy"} <= set(found)
    for exp, csv_path in found.items():
        res = load_results(exp, csv_path)
        expected = importlib.import_module(f"fieldprint.report.{exp}").macros(res.rows, res.manifest)
        generated = (pipeline / "paper" / "generated" / f"{exp}.tex").read_text()
        assert expected and generated == render_macros(expected), exp


@pytest.mark.slow
def test_no_half_written_or_stray_outputs(pipeline):
    leftovers = [p for p in pipeline.rglob("*.tmp")] + list(pipeline.glob("outputs")) + list(pipeline.rglob(".hydra"))
    leftovers += list((pipeline / "paper").glob(".latex-*"))  # the LaTeX rule's build folders
    assert not leftovers


@pytest.mark.slow
def test_gpu_name_with_latex_specials_rebuilds_the_paper(pipeline):
    """The manifest is an input of every rule that reads it: a new GPU name re-runs the numbers,
    the figure, the claims and the PDF (which builds), and nothing fed only by other results."""
    outputs = ["paper/generated/env.tex", "paper/generated/e1_throughput.tex", "figures/e1_throughput.pdf",
               "results/claims.md", "paper/main.pdf"]
    untouched = ["paper/generated/e3_hash.tex", "figures/e3_hash.pdf"]
    before = {p: (pipeline / p).stat().st_mtime_ns for p in outputs + untouched}
    set_gpu_name(pipeline, HOSTILE_GPU)
    done = snakemake(pipeline)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for p in outputs:
        assert (pipeline / p).stat().st_mtime_ns > before[p], p
    for p in untouched:
        assert (pipeline / p).stat().st_mtime_ns == before[p], p
    assert f"\\fpdef{{env.gpu}}{{{latex_escape(HOSTILE_GPU)}}}" in (pipeline / "paper/generated/env.tex").read_text()
    assert HOSTILE_GPU in (pipeline / "results/claims.md").read_text()
    assert (pipeline / "paper/main.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
def test_interrupted_latex_build_recovers(pipeline):
    """Ctrl-C while latexmk runs, with stale state from an earlier killed build lying around:
    the next plain run builds the PDF."""
    paper = pipeline / "paper"
    (paper / ".latex-stale").mkdir()
    (paper / ".latex-stale" / "main.aux").write_text("\\relax\n\\bibdata{re")  # cut mid-write
    (paper / "build").mkdir(exist_ok=True)
    (paper / "build" / "main.fdb_latexmk").write_text("# Fdb version 4\n[\"pdflatex\"] 0 \"main.tex\"")
    with open(paper / "sections" / "conclusion.tex", "a") as f:  # new content: the PDF is out of date
        f.write("% edited\n")
    # SIGINT back to its default in the child: a test run started in the background (nohup, `&` in
    # a script) ignores SIGINT, snakemake would inherit that and finish the build (seen in CI runs
    # started with nohup); a terminal's Ctrl-C reaches a foreground run that does not ignore it.
    job = subprocess.Popen([str(SNAKEMAKE), "--cores", "2", *CONFIG], cwd=pipeline, env=user_env(pipeline),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not any(paper.glob(".latex-??????/main.log")):
        assert job.poll() is None and time.monotonic() < deadline, "the LaTeX build did not start"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    code = job.wait(timeout=120)
    assert code != 0, "interrupted too late: the build had finished\n" + job.stdout.read().decode()[-4000:]
    done = snakemake(pipeline)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (paper / "main.pdf").read_bytes().startswith(b"%PDF")
    assert not list(paper.glob(".latex-*"))
