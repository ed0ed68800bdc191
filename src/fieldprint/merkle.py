"""Merkle commitments over KV pages: page leaves, tree, inclusion proofs.

    leaves = page_leaf_bytes(qt, page_ids=ids, layer=3, kind="k")   # [P, L] uint8
    digests = hash_pages(qt, page_ids=ids, layer=3, kind="k")        # [P, 32] uint8
    tree = MerkleTree(digests); tree.root; tree.proof(i)
    verify_proof(tree.root, digests[i], i, P, tree.proof(i)) -> bool
    grown = DeviceMerkleTree(device).append(digests[:3]).append(digests[3:])  # grown.root == tree.root

Tree shape: RFC 6962, MTH(D[0:n]) = NODE(MTH(D[0:k]) || MTH(D[k:n])) with k the largest power
of two < n, and MTH of one leaf digest = the digest itself. Built bottom-up by pairing
neighbours and carrying an odd last node up unchanged, which gives exactly that shape.

Domain separation (BLAKE3 keyed mode, O'Connor et al. 2020):
    leaf digest = BLAKE3(leaf bytes, key = LEAF_KEY)
    node digest = BLAKE3(left digest || right digest, key = NODE_KEY)
    LEAF_KEY = BLAKE3 derive_key(context = "fieldprint 2026 page leaf v1", key material = b"")
    NODE_KEY = BLAKE3 derive_key(context = "fieldprint 2026 merkle node v1", key material = b"")
A leaf can therefore never be read as a node, nor a node as a leaf.

Page leaves: the bytes of a leaf (layout version 1: header, codes, scales, helper bits, padding)
are defined by `fieldprint.leaf`; `page_leaf_bytes` builds them for a `QTensor` of pages (codes in
the storage order of the page layout it names).
"""

from __future__ import annotations

import blake3
import torch

from fieldprint.hashing import blake3_many
from fieldprint.leaf import LeafSpec, check_page_ids, header_rows, leaf_bytes
from fieldprint.quant import QTensor, code_bytes

__all__ = [
    "LEAF_KEY",
    "NODE_KEY",
    "DeviceMerkleTree",
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


class DeviceMerkleTree:
    """The same RFC 6962 tree kept level by level on the device and grown by appending leaves:
    the commit path's tree (`fieldprint.commit`), whose roots never leave the device until fetched.

    Level 0 holds the leaf digests; node ``i`` of level ``h+1`` hashes nodes ``2i, 2i+1`` of
    level ``h`` (keyed with NODE_KEY), or is node ``2i`` itself when that has no right sibling:
    bottom-up promotion of a lone last node, as in `MerkleTree`. Appending recomputes only the
    nodes to the right of the first new leaf. A tree is never changed in place: `append` returns
    a new tree (sharing the untouched levels' tensors), so a caller can keep or drop either.
    backend: as for `blake3_many`.
    """

    def __init__(self, device: torch.device | str, backend: str = "auto",
                 levels: tuple[torch.Tensor, ...] = ()) -> None:
        self.device, self.backend = torch.device(device), backend
        self.levels = levels  # levels[0]: [n, 32] leaf digests, levels[-1]: [1, 32] the root

    @property
    def n(self) -> int:
        """Number of leaves."""
        return self.levels[0].shape[0] if self.levels else 0

    @property
    def root(self) -> torch.Tensor:
        """[32] uint8 on the device (the tree must hold a leaf)."""
        if not self.levels:
            raise ValueError("an empty tree has no root: append leaves first")
        return self.levels[-1][0]

    def append(self, digests: torch.Tensor) -> DeviceMerkleTree:
        """The tree with ``digests [m >= 1, 32]`` uint8 (on the tree's device) appended as leaves."""
        if not isinstance(digests, torch.Tensor) or digests.dtype != torch.uint8:
            raise TypeError("digests must be a uint8 tensor of shape [m, 32]")
        if digests.dim() != 2 or digests.shape[1] != 32 or digests.shape[0] < 1:
            raise ValueError(f"digests must have shape [m >= 1, 32], got {tuple(digests.shape)}")
        if digests.device != self.device:
            raise ValueError(f"digests is on {digests.device} but the tree is on {self.device}")
        first = self.n
        levels = [torch.cat([self.levels[0], digests]) if self.levels else digests.contiguous()]
        h = 0
        while levels[h].shape[0] > 1:
            cur = levels[h]
            n = cur.shape[0]
            start = first // 2  # parents left of it are unchanged
            pairs = (n - 2 * start) // 2
            new = blake3_many(cur[2 * start: 2 * start + 2 * pairs].reshape(pairs, 64), key=NODE_KEY,
                              backend=self.backend)
            if n % 2:
                new = torch.cat([new, cur[-1:]])
            old = self.levels[h + 1][:start] if h + 1 < len(self.levels) else new[:0]
            levels.append(torch.cat([old, new]))
            first, h = start, h + 1
        return DeviceMerkleTree(self.device, self.backend, tuple(levels))


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


def page_leaf_bytes(qt: QTensor, *, page_ids, layer: int, kind: str, page_layout: str = "nhd") -> torch.Tensor:
    """Leaf bytes of P quantized KV pages (layout of `fieldprint.leaf`).

    qt: a fieldprint.quant.QTensor whose codes are [P, ...] (one page per leading index,
    e.g. [P, block_size, Hkv, D]), quantized in one call so its helper bits run page after page;
    its scale is per tensor or per row of the pages. page_ids: [P] ints (integer tensor or
    sequence of ints); layer: int in [0, 2**32); kind: "k" or "v"; page_layout: the pages'
    layout (`fieldprint.page_layout`), which the header names: each page's codes must already
    run in its storage order (for "hdn", quantize ``page_layout.page_elements(pages, "hdn")``).
    Returns [P, L] uint8 on the codes' device, L a multiple of 64.
    """
    if not isinstance(qt, QTensor):
        raise TypeError(f"qt must be a fieldprint.quant.QTensor, got {type(qt).__name__}")
    codes = qt.codes
    if codes.dim() < 1 or codes.shape[0] < 1 or codes[0].numel() < 1:
        raise ValueError(f"qt.codes must be [P >= 1, ...] with elements in each page, got {tuple(codes.shape)}")
    n_pages, e = codes.shape[0], codes[0].numel()
    scale = qt.scale.to(torch.float32)
    if scale.numel() == 1:
        scales = scale.reshape(1, 1).expand(n_pages, 1)
    elif scale.dim() >= 1 and scale.shape[0] == n_pages and scale.numel() % n_pages == 0:
        scales = scale.reshape(n_pages, -1)
    else:
        raise ValueError(f"qt.scale must be per tensor or per row of the pages, got {tuple(scale.shape)}")
    spec = LeafSpec(qt.fmt, qt.rounding, elems=e, scales=scales.shape[1], seed=qt.seed, page_layout=page_layout)
    ids = check_page_ids(page_ids, n_pages)
    header = header_rows(spec, ids, [layer] * n_pages, [kind] * n_pages)
    helper = None if qt.helper is None else qt.helper.reshape(n_pages, spec.helper_bytes)
    dev = codes.device
    return leaf_bytes(spec, header.to(dev), code_bytes(codes.reshape(n_pages, e)), scales.to(dev), helper)


def hash_pages(qt, *, page_ids, layer: int, kind: str, page_layout: str = "nhd",
               backend: str = "auto") -> torch.Tensor:
    """Leaf digests [P, 32] uint8 of P quantized pages: BLAKE3(page_leaf_bytes(...), LEAF_KEY),
    all pages in one `blake3_many` launch (Triton on CUDA). Arguments as in `page_leaf_bytes`."""
    return blake3_many(page_leaf_bytes(qt, page_ids=page_ids, layer=layer, kind=kind, page_layout=page_layout),
                       key=LEAF_KEY, backend=backend)

