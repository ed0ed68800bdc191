"""The committed leaves of a `fieldprint.commit.Committer` and their verification.

`LeafStore` keeps, per commit, the leaf rows on the device (the committed copy of the quantized
pages, layout `fieldprint.leaf`) and what each leaf commits to (`LeafRef`), plus a host copy of
the committed leaf digests (pinned on CUDA, filled by the commit stream). `LeafStore.verify`
re-hashes the stored rows, rebuilds the root and localizes every leaf whose digest no longer
matches with its Merkle inclusion proof against the committed root. `LeafStore.verify_live`
does the same for the pages the live cache holds now, re-quantized with the committed scales and
helper bits: a commitment binds the live cache, not only the committer's copy.

Threat model of `verify_live`: a leaf commits to the quantized page, so a change of the live
page is detected when it changes a code (or, with two_grid, when it crosses the helper's grid),
and by construction not when it stays below the format's tolerance (two_grid: a quarter of the
element's grid spacing at the committed scale, `fieldprint.quant.code_spacing`).

Flip any bit of a stored row (codes, helper, scale, header or padding) and the recomputed root
differs, and the leaf's proof fails: `row_fields` gives views into a row by field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit_pages import LeafRef, LeafRefs, gather_pages, leaf_headers, live_blocks
from fieldprint.formats import get_format
from fieldprint.hashing import blake3_many
from fieldprint.leaf import LeafSpec, leaf_bytes
from fieldprint.merkle import LEAF_KEY, MerkleTree, verify_proof
from fieldprint.quant import code_bytes, quantize

__all__ = ["LeafStore", "VerifyResult"]


@dataclass(frozen=True)
class VerifyResult:
    """``ok``: the checked leaves hash to the committed root. ``tampered``: the leaves whose Merkle
    proof fails against the committed root, with what they hold."""

    ok: bool
    root: bytes
    recomputed_root: bytes
    num_leaves: int
    tampered: list[int]
    tampered_pages: list[LeafRef]


def as_bytes(x) -> bytes:
    """A digest (uint8 tensor on any device, or bytes) as bytes."""
    if isinstance(x, torch.Tensor):
        return bytes(x.cpu().flatten().tolist())
    return bytes(x)


class LeafStore:
    """Leaf rows and refs of every commit, and the host copy of their digests.

    spec: the leaves' `LeafSpec`; device: where rows live; hash_backend: as for `blake3_many`;
    host_digests: keep the host copy (needed by `verify`).
    """

    def __init__(self, spec: LeafSpec, device: torch.device, hash_backend: str, host_digests: bool,
                 num_layers: int) -> None:
        self.spec, self.device, self.hash_backend = spec, device, hash_backend
        self.host_digests = host_digests
        self.leaves = LeafRefs([], num_layers)
        self.rows: list[torch.Tensor] = []  # [n_i, spec.length] uint8, one per commit
        self._digests = torch.zeros((0, 32), dtype=torch.uint8)  # host, capacity >= len(leaves)
        self._trusted: tuple[int, MerkleTree] | None = None  # (leaves, tree of the host digests)

    def __len__(self) -> int:
        return len(self.leaves)

    @property
    def capacity(self) -> int:
        """Leaves the host digest buffer holds without growing."""
        return self._digests.shape[0]

    def reserve(self, n: int) -> None:
        """Room for ``n`` host digests. The caller makes sure no copy into the buffer is in flight
        (the buffer is replaced when it grows)."""
        if not self.host_digests or n <= self._digests.shape[0]:
            return
        cap = max(2 * n, 64)  # doubling: a wait for the commit stream only when the count doubles
        new = torch.zeros((cap, 32), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        new[: self._digests.shape[0]] = self._digests
        self._digests = new

    def append(self, refs: LeafRefs, rows: torch.Tensor, digests: torch.Tensor | None) -> None:
        """Add one commit: ``refs`` and ``rows [len(refs), spec.length]`` on the device, and copy
        ``digests [len(refs), 32]`` (device) to the host without blocking (call `reserve` first);
        None: the caller writes them later (`write_digests`)."""
        first = len(self.leaves)
        if self.host_digests and digests is not None:
            self._digests[first:first + len(refs)].copy_(digests, non_blocking=True)
        self.leaves.extend(refs)
        self.rows.append(rows)

    def write_digests(self, first: int, digests: torch.Tensor) -> None:
        """Host digests ``[n, 32]`` uint8 of leaves ``first .. first + n`` (already appended)."""
        if self.host_digests:
            self._digests[first:first + digests.shape[0]] = digests

    def truncate(self, num_leaves: int, num_commits: int) -> None:
        """Drop every leaf past ``num_leaves`` and every commit past ``num_commits`` (a rollback)."""
        self.leaves.truncate(num_leaves)
        del self.rows[num_commits:]
        self._trusted = None

    def row_fields(self, leaf: int) -> dict[str, torch.Tensor]:
        """Views into the stored row of leaf ``leaf`` (uint8): header, codes, scale (float32
        bytes), helper (empty unless two_grid), padding (zeros up to a multiple of 64 bytes)."""
        if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf < len(self.leaves):
            raise ValueError(f"leaf must be an int in [0, {len(self.leaves)}), got {leaf!r}")
        for rows in self.rows:
            if leaf < rows.shape[0]:
                row = rows[leaf]
                break
            leaf -= rows.shape[0]
        return {name: row[at:at + size] for name, (at, size) in self.spec.offsets().items()}

    def verify(self, root: bytes, n: int) -> VerifyResult:
        """Re-hash the first ``n`` stored leaves (the leaves that ``root`` covers) and check them
        against the committed ``root``; localize mismatches with Merkle proofs over the host
        digests. The commit stream must be done with those leaves (the caller synchronizes)."""
        tree = self._trusted_tree(root, n)
        fresh = torch.cat([blake3_many(r, key=LEAF_KEY, backend=self.hash_backend) for r in self._rows_of(n)])[:n]
        return self._result(root, n, tree, fresh, [])

    def verify_live(self, cache: PagedKVCache, root: bytes, n: int) -> VerifyResult:
        """Check that the live ``cache`` still holds the first ``n`` committed leaves: re-read
        each leaf's page through the cache's current block tables (`live_blocks`: what the
        attention kernel reads), re-quantize it with the committed scale and helper bits (the
        verifier path of `fieldprint.quant.quantize`), rebuild its leaf (header from what the
        leaf commits to), hash, and check against ``root`` as `verify` does. A leaf whose page
        the cache no longer holds, whose live values are not finite, or whose stored scale is
        not a power of two is a mismatch too."""
        tree = self._trusted_tree(root, n)
        spec, L = self.spec, cache.num_layers
        pages = [ref.page for ref in self.leaves[:n:2 * L]]
        where = live_blocks(cache, pages)
        gone = torch.tensor([b is None for b in where]).repeat_interleave(2 * L)  # [n] per leaf
        blocks = torch.tensor([0 if b is None else b for b in where], dtype=torch.int64).to(cache.device)
        tokens = torch.tensor([p.tokens for p in pages], dtype=torch.int64).to(cache.device)
        x = gather_pages(cache, blocks, tokens)  # [n, E]
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            x = x.float()  # a float8 cache: exact in float32, as the commit path quantizes it
        stored = torch.cat(self._rows_of(n))[:n]
        at = spec.offsets()
        scale_bits = stored[:, at["scale"][0]:at["scale"][0] + 4].to(torch.int64)
        scale = ((scale_bits << torch.tensor([0, 8, 16, 24], device=stored.device)).sum(1)
                 .to(torch.int32).view(torch.float32)[:, None])  # the committed float32, little-endian
        f = get_format(spec.fmt)
        mant, _ = torch.frexp(scale)
        scale_ok = (mant == 0.5) & (scale >= 2.0**-126) & torch.isfinite(scale) if f.scaled else scale == 1
        finite = torch.isfinite(x).all(dim=1)
        bad = gone.to(x.device) | ~finite | ~scale_ok[:, 0]
        x = torch.where(finite[:, None], x, 0)  # quantize refuses NaN/Inf: the leaf is a mismatch anyway
        helper = None
        if spec.helper_bytes:
            helper = stored[:, at["helper"][0]:at["helper"][0] + spec.helper_bytes].contiguous()
        qt = quantize(x, spec.fmt, spec.rounding, scale=torch.where(scale_ok, scale, 1.0) if f.scaled else None,
                      helper=None if helper is None else helper.reshape(-1))
        header = leaf_headers(cache, spec, pages).to(x.device)
        rows = leaf_bytes(spec, header, code_bytes(qt.codes), torch.where(scale_ok, scale, 1.0), helper)
        fresh = blake3_many(rows, key=LEAF_KEY, backend=self.hash_backend)
        return self._result(root, n, tree, fresh, torch.nonzero(bad.cpu()).flatten().tolist())

    # ------------------------------------------------------------------ internals

    def _rows_of(self, n: int) -> list[torch.Tensor]:
        """The stored row tensors that hold the first n leaves (marked used on this stream)."""
        rows, count = [], 0
        for r in self.rows:
            if count >= n:
                break
            if self.device.type == "cuda":
                r.record_stream(torch.cuda.current_stream(self.device))
            rows.append(r)
            count += r.shape[0]
        return rows

    def _trusted_tree(self, root: bytes, n: int) -> MerkleTree:
        """The host tree of the first n committed digests, which must hash to ``root``."""
        if not self.host_digests:
            raise ValueError("verify() needs the leaf digests on the host: use fetch_leaves=True")
        if self._trusted is None or self._trusted[0] != n:
            self._trusted = (n, MerkleTree(self._digests[:n].clone()))
        tree = self._trusted[1]
        if as_bytes(tree.root) != root:
            raise ValueError("the host's leaf digests do not hash to the committed root")
        return tree

    def _result(self, root: bytes, n: int, tree: MerkleTree, fresh_dev: torch.Tensor, bad: list[int]) -> VerifyResult:
        """Compare recomputed digests ``fresh_dev [n, 32]`` with the committed ones; ``bad``:
        leaves known to mismatch whatever their digest."""
        recomputed = as_bytes(MerkleTree(fresh_dev, backend=self.hash_backend).root)
        fresh = fresh_dev.cpu()
        differ = set(torch.nonzero((fresh != self._digests[:n]).any(dim=1)).flatten().tolist())
        known = set(bad)
        tampered = sorted(i for i in differ | known
                          if i in known or not verify_proof(root, as_bytes(fresh[i]), i, n, tree.proof(i)))
        return VerifyResult(ok=recomputed == root and not tampered, root=root, recomputed_root=recomputed,
                            num_leaves=n, tampered=tampered, tampered_pages=[self.leaves[i] for i in tampered])
