"""workflow/scripts/gpu_chain.sh: experiments run one after another in a background chain that
outlives the call that started it, in its own copy of the checkout; an experiment named in NEEDS
waits for a file that a later call brings, while the experiments before it run. gpu_run.sh is
replaced by a stub that records the order of the runs, the code version it ran and whether the
needed file was there when its experiment started."""

import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STUB = """#!/usr/bin/env bash
echo "$1 model=$([ -e models/w.gguf ] && echo yes || echo no) code=$(cat code.txt)" >> runs.txt
echo "result of $1" > "$OUT/result.txt"
"""


def _checkout(root: Path) -> Path:
    (root / "workflow" / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "workflow" / "scripts" / "gpu_chain.sh", root / "workflow" / "scripts")
    stub = root / "workflow" / "scripts" / "gpu_run.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (root / "code.txt").write_text("v1")
    return root


def _chain(checkout: Path, state: Path, out: Path, *exps: str, **env: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["bash", "workflow/scripts/gpu_chain.sh", *exps], cwd=checkout,
                          env={**os.environ, "CHAIN_STATE": str(state), "OUT": str(out), **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_needed_file_is_waited_for_while_the_others_run(tmp_path):
    here = _checkout(tmp_path / "repo")
    state = tmp_path / "state"
    exps = ("e2_sram", "e4_recompute", "e5_accuracy")
    first = _chain(here, state, tmp_path / "out1", *exps, WAIT="20",
                   NEEDS="e4_recompute=models/w.gguf", NEEDS_WAIT="40")
    assert "== e2_sram: exit 0" in first
    assert (tmp_path / "out1" / "e2_sram" / "result.txt").read_text() == "result of e2_sram\n"
    runs = state / "tree" / "runs.txt"  # the chain's own copy of the checkout
    # e4_recompute holds the chain: nothing after e2_sram has run
    waiting = _chain(here, state, tmp_path / "out2", *exps, WAIT="3")
    assert "still running" in waiting
    assert runs.read_text() == "e2_sram model=no code=v1\n"
    # a later call rewrites the checkout (new code) and stages the model: the chain sees the
    # model (models/ is shared) but keeps the code it started with
    (here / "code.txt").write_text("v2")
    (here / "models" / "w.gguf").write_text("weights")
    delivered = [_chain(here, state, tmp_path / f"out{k}", *exps, WAIT="20") for k in (3, 4)]
    assert "== e4_recompute: exit 0" in delivered[0] and "== e5_accuracy: exit 0" in delivered[1]
    assert runs.read_text() == ("e2_sram model=no code=v1\ne4_recompute model=yes code=v1\n"
                                "e5_accuracy model=yes code=v1\n")
    assert "e4_recompute: models/w.gguf came after" in (state / "needs.log").read_text()
    assert not (here / "runs.txt").exists()


def test_missing_file_runs_the_experiment_anyway_after_the_wait(tmp_path):
    here = _checkout(tmp_path / "repo")
    state = tmp_path / "state"
    t0 = time.time()
    out = _chain(here, state, tmp_path / "out", "e4_recompute", WAIT="30",
                 NEEDS="e4_recompute=models/w.gguf", NEEDS_WAIT="4")
    assert "== e4_recompute: exit 0" in out and time.time() - t0 >= 4
    assert (state / "tree" / "runs.txt").read_text() == "e4_recompute model=no code=v1\n"
    assert "missing after 4 s; running without it" in (state / "needs.log").read_text()


def test_a_second_chain_of_other_experiments_is_refused(tmp_path):
    here = _checkout(tmp_path / "repo")
    state = tmp_path / "state"
    _chain(here, state, tmp_path / "out1", "e2_sram", WAIT="20")
    proc = subprocess.run(["bash", "workflow/scripts/gpu_chain.sh", "e3_hash"], cwd=here,
                          env={**os.environ, "CHAIN_STATE": str(state), "OUT": str(tmp_path / "out2")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "a chain of other experiments runs here: e2_sram" in proc.stdout


def test_a_plus_step_runs_its_experiments_side_by_side_before_the_next(tmp_path):
    here = _checkout(tmp_path / "repo")
    stub = here / "workflow" / "scripts" / "gpu_run.sh"
    # each run logs its start and end; "tests" (the GPU tests) gets the files named in TESTS
    stub.write_text('#!/usr/bin/env bash\necho "start $*" >> runs.txt\nsleep 2\n'
                    'echo "end $1" >> runs.txt\necho "result of $1" > "$OUT/result.txt"\n')
    state = tmp_path / "state"
    steps = ("e4_stability+tests", "e1_throughput")
    outs = [_chain(here, state, tmp_path / f"out{k}", *steps, WAIT="30",
                   TESTS="tests/test_a.py tests/test_b.py") for k in range(3)]
    assert sorted(o.split(":")[0] for o in outs) == [
        "== e1_throughput", "== e4_stability", "== tests"]
    runs = (state / "tree" / "runs.txt").read_text().splitlines()
    # both members started before either ended; the next step started after both ended
    assert sorted(runs[:2]) == ["start e4_stability", "start tests tests/test_a.py tests/test_b.py"]
    assert sorted(runs[2:4]) == ["end e4_stability", "end tests"]
    assert runs[4:] == ["start e1_throughput", "end e1_throughput"]
    assert (tmp_path / "out0" / outs[0].split(":")[0][3:] / "result.txt").exists()
    assert "every experiment of the chain was handed back" in _chain(
        here, state, tmp_path / "out3", *steps, WAIT="5")


def test_a_side_by_side_member_cut_off_at_the_tests_limit(tmp_path):
    here = _checkout(tmp_path / "repo")
    stub = here / "workflow" / "scripts" / "gpu_run.sh"
    stub.write_text('#!/usr/bin/env bash\nsleep 30\n')
    t0 = time.time()
    out = _chain(here, tmp_path / "state", tmp_path / "out", "tests", WAIT="20", TESTS_LIMIT="2")
    assert "== tests: exit 124" in out and time.time() - t0 < 15
