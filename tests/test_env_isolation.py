"""Tests do not leak environment into each other.

The failure this guards against: on a GPU machine (where conftest leaves TRITON_INTERPRET unset),
two test modules set TRITON_INTERPRET=1 at import, so collecting the whole tests/ folder switched
the Triton interpreter on for every module imported after them, and the commit tests then ran
their kernels interpreted on CUDA tensors and failed. Both checks run pytest in a fresh process.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Collects tests/ without conftest.py and without TRITON_INTERPRET, as a GPU session does, and
# prints the variables that differ afterwards, except those the tools set for themselves (argv[2]:
# importing transformers sets TORCHINDUCTOR_CACHE_DIR, so this failed when run alone, and passed in
# the suite only because an earlier test had already set it in the parent process).
COLLECT = """
import os, sys, pytest
before = dict(os.environ)
code = pytest.main(["--collect-only", "-q", "--noconftest", "-p", "no:cacheprovider", sys.argv[1]])
after = dict(os.environ)
tool_owned = set(sys.argv[2].split(","))
print("CHANGED:", sorted(k for k in before.keys() | after.keys()
                         if before.get(k) != after.get(k) and k not in tool_owned))
sys.exit(code)
"""

LEAKY_TESTS = """
import os


def test_leaks():
    os.environ["FIELDPRINT_LEAK"] = "1"


def test_after_the_leak():
    assert "FIELDPRINT_LEAK" not in os.environ


def test_monkeypatch_is_fine(monkeypatch):
    monkeypatch.setenv("FIELDPRINT_LEAK", "2")
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_CURRENT_TEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def test_collecting_every_test_module_leaves_the_environment_unchanged():
    # Imported here, not at the top: the collection below imports this module, and importing
    # conftest there would set TRITON_INTERPRET (no CUDA) and fail the very check it serves.
    from conftest import TOOL_OWNED

    proc = subprocess.run([sys.executable, "-c", COLLECT, str(TESTS), ",".join(sorted(TOOL_OWNED))], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CHANGED: []" in proc.stdout, proc.stdout[-3000:]


def test_conftest_fails_a_test_that_leaks_and_restores_the_environment(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY_TESTS)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "ERROR test_leaky.py::test_leaks" in out and "FIELDPRINT_LEAK='1' set" in out, out
    assert "PASSED test_leaky.py::test_after_the_leak" in out, out
    assert "PASSED test_leaky.py::test_monkeypatch_is_fine" in out, out
