"""workflow/scripts/flashinfer_install.sh on the GPU machine: the carried bundle is installed
outside the checkout, and marked ready only when its check passed; checked either way, so that a
chain waiting for it (gpu_chain.sh's NEEDS) goes on. The check script is replaced by a stub that
exits with the status the test asks for and records the environment it saw."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUB = """import os, sys
open(os.environ["STUB_LOG"], "w").write(os.environ["PYTHONPATH"] + "\\n" + os.environ["FLASHINFER_EXTRA_CUDAFLAGS"])
sys.exit(int(os.environ["STUB_EXIT"]))
"""


def _checkout(root: Path) -> Path:
    scripts = root / "workflow" / "scripts"
    scripts.mkdir(parents=True)
    shutil.copy(REPO / "workflow" / "scripts" / "flashinfer_install.sh", scripts)
    (scripts / "flashinfer_check.py").write_text(STUB)
    site = root / ".fi" / "site" / "flashinfer"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("__version__ = 'bundle'\n")
    headers = root / "headers"
    (headers / "cuda_include").mkdir(parents=True)
    (headers / "cuda_include" / "curand.h").write_text("/* header */\n")
    with tarfile.open(root / ".fi" / "jit-headers.tar.xz", "w:xz") as tar:
        tar.add(headers / "cuda_include", arcname="cuda_include")
    return root


def _install(checkout: Path, home: Path, exit_status: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLASHINFER_HOME": str(home), "STUB_EXIT": str(exit_status),
           "STUB_LOG": str(checkout / "stub.log")}
    return subprocess.run(["bash", "workflow/scripts/flashinfer_install.sh"], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("check_exit,ready", [(0, True), (1, False)])
def test_installed_outside_the_checkout_and_ready_only_when_checked(tmp_path, check_exit, ready):
    here = _checkout(tmp_path / "repo")
    home = tmp_path / "flashinfer"
    proc = _install(here, home, check_exit)
    assert proc.returncode == check_exit, proc.stdout + proc.stderr
    assert (home / "site" / "flashinfer" / "__init__.py").is_file()
    assert (home / "cuda_include" / "curand.h").is_file()
    assert (home / ".checked").exists() and (home / ".ready").exists() == ready
    path, flags = (here / "stub.log").read_text().split("\n")
    assert path.split(":")[0] == str(home / "site") and flags == f"-isystem {home / 'cuda_include'}"
    assert f"ready: {'yes' if ready else 'no'}" in proc.stdout


def test_a_call_without_the_bundle_is_refused(tmp_path):
    here = _checkout(tmp_path / "repo")
    shutil.rmtree(here / ".fi")
    proc = _install(here, tmp_path / "flashinfer", 0)
    assert proc.returncode == 2 and "no .fi/site in this call (carry .fi)" in proc.stdout
    assert not (tmp_path / "flashinfer").exists()


def test_a_second_install_replaces_the_first(tmp_path):
    here = _checkout(tmp_path / "repo")
    home = tmp_path / "flashinfer"
    assert _install(here, home, 0).returncode == 0
    (home / "site" / "stale.py").write_text("")
    assert _install(here, home, 1).returncode == 1
    assert not (home / "site" / "stale.py").exists() and not (home / ".ready").exists()
