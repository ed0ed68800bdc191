"""workflow/scripts/gpu_stage.sh: a file too large for one device call travels in parts, one per
call, and is assembled on the machine only when every part is there and the checksum matches.
Each "call" here is a fresh copy of the checkout holding one part, as the device tool sends it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "workflow" / "scripts" / "gpu_stage.sh"
MIB = 2**20


def _checkout(root: Path) -> Path:
    """A minimal checkout: the script at its path (it finds the repo root from its own place)."""
    (root / "workflow" / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "workflow" / "scripts" / "gpu_stage.sh")
    return root


def _stage(checkout: Path, *args: str, stage: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(checkout / "workflow" / "scripts" / "gpu_stage.sh"), *args],
                          cwd=checkout, env={**os.environ, "STAGE": str(stage), **env},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def split(tmp_path):
    """(here, the original bytes, the part names): a 2.5 MiB file split into 1 MiB parts."""
    here = _checkout(tmp_path / "here")
    (here / "models").mkdir()
    data = os.urandom(5 * MIB // 2)
    (here / "models" / "w.gguf").write_bytes(data)
    proc = _stage(here, "split", "models/w.gguf", stage=tmp_path / "unused", PART_MIB="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = sorted(p.name for p in (here / ".stage").glob("w.gguf.part-*"))
    return here, data, parts


def _call(tmp_path: Path, here: Path, k: int, part: str) -> tuple[Path, subprocess.CompletedProcess]:
    """One device call carrying one part and the checksum, in a fresh copy of the checkout."""
    there = _checkout(tmp_path / f"call{k}")
    (there / ".stage").mkdir()
    for name in (part, "w.gguf.sha256"):
        shutil.copy(here / ".stage" / name, there / ".stage" / name)
    return there, _stage(there, "collect", "models", stage=tmp_path / "machine")


def test_parts_cover_the_file_and_assemble_only_when_all_arrived(tmp_path, split):
    here, data, parts = split
    assert parts == ["w.gguf.part-1-of-3", "w.gguf.part-2-of-3", "w.gguf.part-3-of-3"]
    assert b"".join((here / ".stage" / p).read_bytes() for p in parts) == data
    for k, part in enumerate([parts[2], parts[0]], start=1):  # any order
        there, proc = _call(tmp_path, here, k, part)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{k} of 3 parts" in proc.stdout
        assert not (there / "models" / "w.gguf").exists()
    there, proc = _call(tmp_path, here, 3, parts[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (there / "models" / "w.gguf").read_bytes() == data
    assert "assembled from 3 parts" in proc.stdout


def test_a_corrupt_part_leaves_no_file_and_fails(tmp_path, split):
    here, data, parts = split
    broken = bytearray((here / ".stage" / parts[1]).read_bytes())
    broken[1000] ^= 1
    (here / ".stage" / parts[1]).write_bytes(bytes(broken))
    for k, part in enumerate(parts[:2], start=1):
        _call(tmp_path, here, k, part)
    there, proc = _call(tmp_path, here, 3, parts[2])
    assert proc.returncode == 1
    assert "SHA-256 of the joined parts" in proc.stdout
    assert not list((there / "models").iterdir())


def test_bad_arguments(tmp_path):
    here = _checkout(tmp_path / "here")
    assert _stage(here, "split", "missing.bin", stage=tmp_path / "s").returncode == 2
    assert _stage(here, "unpack", stage=tmp_path / "s").returncode == 2
