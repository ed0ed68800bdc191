"""Merkle commitments over KV pages: page leaves, tree, inclusion proofs.

    leaves = page_leaf_bytes(qt, page_ids=ids, layer=3, kind="k")   # [P, L] uint8
    digests = hash_pages(qt, page_ids=ids, layer=3, kind="k")        # [P, 32] uint8
    tree = MerkleTree(digests); tree.root; tree.proof(i)
    verify_proof(tree.root, digests[i], i, P, tree.proof(i)) -> bool

Tree shape: RFC 6962, MTH(D[0:n]) = NODE(MTH(D[0:k]) || MTH(D[k:n])) with k the largest power
of two < n, and MTH of one leaf digest = the digest itself. Built bottom-up by pairing
neighbours and carrying an odd last node up unchanged, which gives exactly that shape.

Domain separation (BLAKE3 keyed mode, O'Connor et al. 2020):
    leaf digest = BLAKE3(leaf bytes, key = LEAF_KEY)
    node digest = BLAKE3(left digest || right digest, key = NODE_KEY)
    LEAF_KEY = BLAKE3 derive_key(context = "fieldprint 2026 page leaf v1", key material = b"")
    NODE_KEY = BLAKE3 derive_key(context = "fieldprint 2026 merkle node v1", key material = b"")
A leaf can therefore never be read as a node, nor a node as a leaf.

Page leaf layout (version 1), all integers little-endian:

    offset size  field
    0      4     magic b"FPKV"
    4      2     layout version = 1 (u16)
    6      2     header bytes = 64 (u16)
    8      8     page id (u64)
    16     4     layer (u32)
    20     1     kind: 0 = K, 1 = V
    21     1     format: fieldprint.formats.FORMAT_IDS (1 e4m3, 2 e5m2, 3 int8, 4 bf16, 5 fp16)
    22     1     rounding: fieldprint.formats.ROUNDING_IDS (rne 0, trunc 1, stochastic 2, two_grid 3)
    23     1     code width in bytes (1 or 2)
    24     4     element count E of the page (u32)
    28     4     code bytes = E * width (u32)
    32     4     scale count S (u32): 1 for a per-tensor scale, else the page's rows
    36     4     helper bytes (u32): ceil(E / 8) for two_grid, else 0
    40     8     rounding seed (u64), 0 when none
    48     1     1 if a seed is present, else 0
    49     15    zero
    64     E*w   codes in row-major order, as fieldprint.quant.canonical_bytes writes them
                 (16-bit codes as two little-endian bytes)
    ...    4*S   scales as IEEE-754 binary32, little-endian
    ...    H     helper bits (bit i of byte j = element 8j + i of the page)
    ...          zero padding to a multiple of 64 bytes (whole BLAKE3 blocks)

Every byte that decides the dequantized values is in the leaf, so a flipped bit anywhere in
the page, its scale or its helper changes the leaf digest and the root.
"""

from __future__ import annotations

import dataclasses
import struct

import blake3
import torch

from fieldprint.formats import FORMAT_IDS, ROUNDING_IDS
from fieldprint.hashing import blake3_many
from fieldprint.quant import canonical_bytes

__all__ = [
    "LEAF_KEY",
    "NODE_KEY",
    "MerkleTree",
    "hash_pages",
    "page_leaf_bytes",
    "verify_proof",
]

LEAF_CONTEXT = "fieldprint 2026 page leaf v1"
NODE_CONTEXT = "fieldprint 2026 merkle node v1"


def _derive(context: str) -> bytes:
    return blake3.blake3(b"", derive_key_context=context).digest()


LEAF_KEY = _derive(LEAF_CONTEXT)
NODE_KEY = _derive(NODE_CONTEXT)

MAGIC = b"FPKV"
LAYOUT_VERSION = 1
HEADER_BYTES = 64
KIND_IDS = {"k": 0, "v": 1}


def _digest_bytes(x, name: str) -> bytes:
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8:
            raise TypeError(f"{name} must be a uint8 tensor or bytes, got dtype {x.dtype}")
        b = bytes(x.detach().cpu().reshape(-1).tolist())
    elif isinstance(x, bytes | bytearray):
        b = bytes(x)
    else:
        raise TypeError(f"{name} must be 32 bytes (bytes or uint8 tensor), got {type(x).__name__}")
    if len(b) != 32:
        raise ValueError(f"{name} must be 32 bytes, got {len(b)}")
    return b


def _node(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(left + right, key=NODE_KEY).digest()


class MerkleTree:
    """RFC 6962-shaped Merkle tree over leaf digests.

    leaf_digests: [N, 32] uint8 (N >= 1), e.g. from `hash_pages`. The inner nodes are hashed
    level by level with `blake3_many` on the digests' device (Triton on CUDA), so only the
    root (32 bytes) needs to cross PCIe. backend: as for `blake3_many`.
    """

    def __init__(self, leaf_digests: torch.Tensor, backend: str = "auto"):
        if not isinstance(leaf_digests, torch.Tensor):
            raise TypeError(f"leaf_digests must be a torch.Tensor, got {type(leaf_digests).__name__}")
        if leaf_digests.dtype != torch.uint8:
            raise TypeError(f"leaf_digests must have dtype torch.uint8, got {leaf_digests.dtype}")
        if leaf_digests.dim() != 2 or leaf_digests.shape[1] != 32 or leaf_digests.shape[0] < 1:
            raise ValueError(f"leaf_digests must have shape [N >= 1, 32], got {tuple(leaf_digests.shape)}")
        cur = leaf_digests.contiguous()
        self.n = cur.shape[0]
        self.levels = [cur]  # levels[0] = leaves, levels[-1] = [root]
        while cur.shape[0] > 1:
            m = cur.shape[0]
            parents = blake3_many(cur[: m - m % 2].reshape(m // 2, 64), key=NODE_KEY, backend=backend)
            if m % 2:
                parents = torch.cat([parents, cur[m - 1:]])
            self.levels.append(parents)
            cur = parents
        self._host = None

    @property
    def root(self) -> torch.Tensor:
        """[32] uint8 on the leaves' device."""
        return self.levels[-1][0]

    def proof(self, i: int) -> list[bytes]:
        """Audit path of leaf i (RFC 6962 order: siblings from the leaf level up), 32 bytes each."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"i must be an int, got {type(i).__name__}")
        if not 0 <= i < self.n:
            raise ValueError(f"i must be in [0, {self.n}), got {i}")
        if self._host is None:
            self._host = [lvl.cpu() for lvl in self.levels]
        path = []
        for lvl in self._host[:-1]:
            sib = i ^ 1
            if sib < lvl.shape[0]:  # an odd last node has no sibling: it moves up as is
                path.append(bytes(lvl[sib].tolist()))
            i //= 2
        return path


def verify_proof(root, leaf_digest, i: int, n: int, proof) -> bool:
    """True iff ``proof`` shows that ``leaf_digest`` is leaf i of the n-leaf tree with ``root``
    (the verification algorithm of RFC 9162, section 2.1.3.2, with our node hash).

    root, leaf_digest: 32 bytes (bytes or [32] uint8 tensor); proof: sequence of 32-byte digests.
    """
    root_b = _digest_bytes(root, "root")
    r = _digest_bytes(leaf_digest, "leaf_digest")
    for name, v in (("i", i), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(f"i must be in [0, n={n}), got {i}")
    if not isinstance(proof, list | tuple):
        raise TypeError(f"proof must be a list of 32-byte digests, got {type(proof).__name__}")
    fn, sn = i, n - 1
    for k, p in enumerate(proof):
        p = _digest_bytes(p, f"proof[{k}]")
        if sn == 0:
            return False  # path longer than the tree is deep
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:  # skip the levels where this node was carried up alone
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_b


def _page_parts(qt, n_pages: int):
    """Per-page code bytes [P, E*w], scales [P, S] float32, helper bytes [P, H] of a QTensor
    whose codes have the pages as their leading dimension."""
    codes = qt.codes
    e = codes[0].numel()
    width = codes.element_size()
    code_bytes = canonical_bytes(dataclasses.replace(qt, helper=None)).reshape(n_pages, e * width)
    scale = qt.scale.to(torch.float32)
    if scale.numel() == 1:
        scales = scale.reshape(1, 1).expand(n_pages, 1)
    elif scale.shape[0] == n_pages and scale.numel() % n_pages == 0:
        scales = scale.reshape(n_pages, -1)
    else:
        raise ValueError(f"qt.scale must be per tensor or per row of the pages, got {tuple(scale.shape)}")
    if qt.helper is None:
        helper = code_bytes.new_zeros((n_pages, 0))
    else:
        if e % 8:
            raise ValueError(f"two_grid pages need a multiple of 8 elements per page, got {e}")
        helper = qt.helper.reshape(n_pages, e // 8)
    return code_bytes, scales.contiguous(), helper, e, width


def page_leaf_bytes(qt, *, page_ids, layer: int, kind: str) -> torch.Tensor:
    """Leaf bytes of P quantized KV pages (layout in the module docstring).

    qt: a fieldprint.quant.QTensor whose codes are [P, ...] (one page per leading index,
    e.g. [P, block_size, Hkv, D]), quantized in one call so its helper bits run page after page.
    page_ids: [P] ints (tensor or sequence); layer: int >= 0; kind: "k" or "v".
    Returns [P, L] uint8 on the codes' device, L a multiple of 64.
    """
    codes = getattr(qt, "codes", None)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"qt must be a fieldprint.quant.QTensor, got {type(qt).__name__}")
    if codes.dim() < 1 or codes.shape[0] < 1:
        raise ValueError(f"qt.codes must be [P >= 1, ...], got {tuple(codes.shape)}")
    if qt.fmt not in FORMAT_IDS:
        raise ValueError(f"qt.fmt must be one of {sorted(FORMAT_IDS)}, got {qt.fmt!r}")
    if kind not in KIND_IDS:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < 2**32:
        raise ValueError(f"layer must be an int in [0, 2**32), got {layer!r}")
    n_pages = codes.shape[0]
    ids = torch.as_tensor(page_ids, dtype=torch.int64).reshape(-1).tolist()
    if len(ids) != n_pages:
        raise ValueError(f"page_ids must have {n_pages} entries (one per page), got {len(ids)}")
    if any(not 0 <= p < 2**63 for p in ids):
        raise ValueError("page_ids must be non-negative")
    code_bytes, scales, helper, e, width = _page_parts(qt, n_pages)
    seed = qt.seed
    fixed = struct.pack("<4sHH", MAGIC, LAYOUT_VERSION, HEADER_BYTES)
    rest = struct.pack(
        "<IBBBBIIIIQB15x", layer, KIND_IDS[kind], FORMAT_IDS[qt.fmt], ROUNDING_IDS[qt.rounding],
        width, e, e * width, scales.shape[1], helper.shape[1],
        0 if seed is None else seed & (2**64 - 1), 0 if seed is None else 1)
    header = torch.tensor(
        [list(fixed + struct.pack("<Q", p) + rest) for p in ids], dtype=torch.uint8)
    dev = codes.device
    bits = scales.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    scale_bytes = torch.stack([(bits >> s) & 0xFF for s in (0, 8, 16, 24)], dim=2)
    body = [header.to(dev), code_bytes.to(dev),
            scale_bytes.reshape(n_pages, -1).to(torch.uint8).to(dev), helper.to(dev)]
    length = sum(b.shape[1] for b in body)
    pad = -length % 64
    if pad:
        body.append(torch.zeros((n_pages, pad), dtype=torch.uint8, device=dev))
    return torch.cat(body, dim=1)


def hash_pages(qt, *, page_ids, layer: int, kind: str, backend: str = "auto") -> torch.Tensor:
    """Leaf digests [P, 32] uint8 of P quantized pages: BLAKE3(page_leaf_bytes(...), LEAF_KEY),
    all pages in one `blake3_many` launch (Triton on CUDA). Arguments as in `page_leaf_bytes`."""
    return blake3_many(page_leaf_bytes(qt, page_ids=page_ids, layer=layer, kind=kind),
                       key=LEAF_KEY, backend=backend)

