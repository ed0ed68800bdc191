"""Shared test set-up: without a GPU, Triton kernels run in the interpreter; torch uses one thread;
no test module or test changes the environment of the others.

TRITON_INTERPRET must be set before any module decorates a kernel, so it is set here, before
test modules are imported, and nowhere else: a test module that set it at import would switch
the interpreter on for every module collected after it (on a GPU machine, kernels then ran
interpreted on CUDA tensors and failed). Tests that change a variable use ``monkeypatch``;
``_no_environment_leaks`` fails any test that leaves a change behind, and collection fails if
importing the test modules changed the environment.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests use tiny tensors: one thread avoids OpenMP oversubscription on a 2-core CI machine
# (measured: tiny nn.Linear calls took ~17 ms each with 2 threads on a busy machine).
torch.set_num_threads(1)

# Set by the tools themselves, not by tests: pytest names the running test; torch's inductor
# writes down the cache folder it picked (the default, /tmp/torchinductor_<user>) on first use.
# Intel's OpenMP runtime (imported by some libraries of the GPU image) sets KMP_* for itself, and
# torch.compile's inductor points Triton at its cache and ptxas on its first compile (seen on the
# H200: test_torch_compile).
TOOL_OWNED = frozenset({"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK",
                        "KMP_INIT_AT_FORK", "TRITON_CACHE_DIR", "TRITON_PTXAS_PATH"})
SESSION_ENV = dict(os.environ)


def environment_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The variables that differ between two snapshots of os.environ, as readable lines."""
    lines = []
    for name in sorted((before.keys() | after.keys()) - TOOL_OWNED):
        if name not in after:
            lines.append(f"{name} unset (was {before[name]!r})")
        elif name not in before:
            lines.append(f"{name}={after[name]!r} set")
        elif before[name] != after[name]:
            lines.append(f"{name} changed from {before[name]!r} to {after[name]!r}")
    return lines


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreted: runs Triton kernels on CPU tensors (skipped unless TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    changes = environment_changes(SESSION_ENV, dict(os.environ))
    if changes:
        raise pytest.UsageError(
            "importing the test modules changed the environment (set variables in conftest.py or "
            "with monkeypatch, never at import): " + "; ".join(changes))
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpreted = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreted" in item.keywords and not interpret:
            item.add_marker(skip_interpreted)


@pytest.fixture(autouse=True)
def _no_environment_leaks():
    """Fails a test that leaves os.environ changed (after its monkeypatch is undone), and puts
    the environment back so that the tests after it run as they would alone."""
    before = dict(os.environ)
    yield
    changes = environment_changes(before, dict(os.environ))
    if changes:
        os.environ.clear()
        os.environ.update(before)
        pytest.fail("the test changed the environment (use monkeypatch): " + "; ".join(changes))
