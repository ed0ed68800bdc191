"""Merkle commitments (fieldprint.merkle): RFC 6962 shape, proofs, page leaves, bit flips."""

import dataclasses
import os
import random
import struct

import blake3 as ref
import pytest
import torch

from fieldprint.merkle import (
    LEAF_KEY,
    NODE_KEY,
    MerkleTree,
    hash_pages,
    page_leaf_bytes,
    verify_proof,
)
from fieldprint.quant import quantize


def _node(a: bytes, b: bytes) -> bytes:
    return ref.blake3(a + b, key=NODE_KEY).digest()


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 MTH written recursively (the definition), with our node hash."""
    n = len(leaves)
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return _node(_mth(leaves[:k]), _mth(leaves[k:]))


def _digests(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32), dtype=torch.uint8, generator=gen)


def test_keys_are_derived_from_the_documented_contexts():
    assert LEAF_KEY == ref.blake3(b"", derive_key_context="fieldprint 2026 page leaf v1").digest()
    assert NODE_KEY == ref.blake3(b"", derive_key_context="fieldprint 2026 merkle node v1").digest()
    assert LEAF_KEY != NODE_KEY


@pytest.mark.parametrize("n", range(1, 34))
def test_root_and_every_proof(n):
    d = _digests(n, n)
    leaves = [bytes(r.tolist()) for r in d]
    tree = MerkleTree(d)
    root = bytes(tree.root.tolist())
    assert root == _mth(leaves)
    other = _digests(1, 1000 + n)[0]
    for i in range(n):
        proof = tree.proof(i)
        assert verify_proof(tree.root, d[i], i, n, proof)
        assert verify_proof(root, leaves[i], i, n, proof)
        assert not verify_proof(root, other, i, n, proof)  # wrong leaf
        if n > 1:
            assert not verify_proof(root, leaves[i], (i + 1) % n, n, proof)  # wrong index
            bad = list(proof)
            j = i % len(bad)
            bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
            assert not verify_proof(root, leaves[i], i, n, bad)  # tampered path
            assert not verify_proof(root, leaves[i], i, n, proof[:-1])  # truncated path
        assert not verify_proof(root, leaves[i], i, n, proof + [leaves[0]])  # overlong path


def _triton_device() -> str:
    """Where the Triton backend runs here: CUDA, or the CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return "cpu"


def test_tree_with_triton_backend():
    d = _digests(5, 9)
    tree = MerkleTree(d.to(_triton_device()), backend="triton")
    assert bytes(tree.root.tolist()) == _mth([bytes(r.tolist()) for r in d])


def _pages(seed: int, rounding: str = "two_grid", fmt: str = "e4m3"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((4, 4, 2, 8), generator=gen)  # [P, block_size, Hkv, D]
    return quantize(x, fmt, rounding, seed=5 if rounding == "stochastic" else None)


def test_page_leaf_layout():
    qt = _pages(1)
    ids = [10, 11, 12, 2**40]
    leaf = page_leaf_bytes(qt, page_ids=ids, layer=7, kind="v")
    e = 4 * 2 * 8
    assert leaf.dtype == torch.uint8 and leaf.shape[0] == 4 and leaf.shape[1] % 64 == 0
    for p in range(4):
        row = bytes(leaf[p].tolist())
        magic, ver, hdr, pid, layer, kind, fmt, rnd, width, count, cbytes, nscale, hbytes, seed, \
            has_seed = struct.unpack("<4sHHQIBBBBIIIIQB", row[:49])
        assert (magic, ver, hdr, pid, layer, kind, fmt, rnd, width) == \
            (b"FPKV", 1, 64, ids[p], 7, 1, 1, 3, 1)
        assert (count, cbytes, nscale, hbytes, seed, has_seed) == (e, e, 1, e // 8, 0, 0)
        assert row[49:64] == bytes(15)
        assert row[64:64 + e] == bytes(qt.codes[p].reshape(-1).tolist())
        assert struct.unpack("<f", row[64 + e:68 + e])[0] == float(qt.scale)
        assert row[68 + e:68 + e + e // 8] == bytes(qt.helper[p * e // 8:(p + 1) * e // 8].tolist())
        assert row[68 + e + e // 8:] == bytes(len(row) - 68 - e - e // 8)


def test_page_leaf_16bit_codes_and_seed():
    qt = _pages(2, rounding="stochastic", fmt="bf16")
    leaf = page_leaf_bytes(qt, page_ids=[0, 1, 2, 3], layer=0, kind="k")
    row = bytes(leaf[1].tolist())
    assert row[23] == 2 and struct.unpack("<Q", row[40:48])[0] == 5 and row[48] == 1
    codes = qt.codes[1].reshape(-1).to(torch.int32) & 0xFFFF
    assert row[64:64 + 2 * codes.numel()] == b"".join(struct.pack("<H", c) for c in codes.tolist())


def test_hash_pages_matches_package_on_both_backends():
    qt = _pages(3)
    ids = [3, 1, 4, 1]
    leaf = page_leaf_bytes(qt, page_ids=ids, layer=2, kind="k")
    want = [ref.blake3(bytes(r.tolist()), key=LEAF_KEY).digest() for r in leaf]
    for backend in ("reference", "triton"):
        dev = "cpu" if backend == "reference" else _triton_device()
        on_dev = dataclasses.replace(qt, codes=qt.codes.to(dev), scale=qt.scale.to(dev), helper=qt.helper.to(dev))
        got = hash_pages(on_dev, page_ids=ids, layer=2, kind="k", backend=backend)
        assert [bytes(r.tolist()) for r in got.cpu()] == want, backend


def test_every_single_bit_flip_is_detected_and_localized():
    """Flip random bits of committed pages (header, codes, scale, helper): the root changes and
    the proofs of the untouched pages still verify against the old root, the flipped one not."""
    qt = _pages(4)
    ids = list(range(4))
    leaf = page_leaf_bytes(qt, page_ids=ids, layer=1, kind="v")
    n, length = leaf.shape
    digests = torch.stack([torch.tensor(list(ref.blake3(bytes(r.tolist()), key=LEAF_KEY).digest()),
                                        dtype=torch.uint8) for r in leaf])
    tree = MerkleTree(digests)
    root = bytes(tree.root.tolist())
    e = 4 * 2 * 8
    regions = {"header": (0, 49), "codes": (64, 64 + e), "scale": (64 + e, 68 + e),
               "helper": (68 + e, 68 + e + e // 8)}
    rng = random.Random(4)
    for name, (lo, hi) in regions.items():
        for _ in range(6):
            page, byte, bit = rng.randrange(n), rng.randrange(lo, hi), rng.randrange(8)
            bad = leaf.clone()
            bad[page, byte] ^= 1 << bit
            new = [ref.blake3(bytes(r.tolist()), key=LEAF_KEY).digest() for r in bad]
            assert bytes(MerkleTree(torch.tensor([list(d) for d in new],
                                                 dtype=torch.uint8)).root.tolist()) != root, name
            failing = [i for i in range(n) if not verify_proof(root, new[i], i, n, tree.proof(i))]
            assert failing == [page], (name, page, byte, bit)


def test_bad_inputs():
    d = _digests(4, 0)
    with pytest.raises(TypeError, match="leaf_digests"):
        MerkleTree(d.tolist())
    with pytest.raises(TypeError, match="leaf_digests"):
        MerkleTree(d.to(torch.int32))
    with pytest.raises(ValueError, match="leaf_digests"):
        MerkleTree(d[:, :31])
    with pytest.raises(ValueError, match="leaf_digests"):
        MerkleTree(d[:0])
    tree = MerkleTree(d)
    for i in (-1, 4):
        with pytest.raises(ValueError, match="i must be in"):
            tree.proof(i)
    with pytest.raises(TypeError, match="i must be an int"):
        tree.proof(1.0)
    root, proof = tree.root, tree.proof(1)
    with pytest.raises(ValueError, match="i must be in"):
        verify_proof(root, d[1], 4, 4, proof)
    with pytest.raises(ValueError, match="n must be"):
        verify_proof(root, d[1], 0, 0, proof)
    with pytest.raises(ValueError, match="root"):
        verify_proof(bytes(31), d[1], 1, 4, proof)
    with pytest.raises(TypeError, match="leaf_digest"):
        verify_proof(root, "x" * 32, 1, 4, proof)
    with pytest.raises(ValueError, match=r"proof\[0\]"):
        verify_proof(root, d[1], 1, 4, [bytes(5)] + proof[1:])
    qt = _pages(5)
    with pytest.raises(ValueError, match="page_ids"):
        page_leaf_bytes(qt, page_ids=[0, 1], layer=0, kind="k")
    with pytest.raises(ValueError, match="kind"):
        page_leaf_bytes(qt, page_ids=[0, 1, 2, 3], layer=0, kind="q")
    with pytest.raises(ValueError, match="layer"):
        page_leaf_bytes(qt, page_ids=[0, 1, 2, 3], layer=-1, kind="k")
    with pytest.raises(TypeError, match="qt"):
        page_leaf_bytes(torch.zeros(4, 8), page_ids=[0, 1, 2, 3], layer=0, kind="k")
