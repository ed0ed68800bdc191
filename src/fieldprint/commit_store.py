"""The committed leaves of a `fieldprint.commit.Committer` and their verification.

`LeafStore` keeps, per commit, the leaf rows on the device (the committed copy of the quantized
pages, layout `fieldprint.leaf`) and what each leaf commits to (`LeafRef`), plus a host copy of
the committed leaf digests (pinned on CUDA, filled by the commit stream). `LeafStore.verify`
re-hashes the stored rows, rebuilds the root and localizes every leaf whose digest no longer
matches with its Merkle inclusion proof against the committed root.

Flip any bit of a stored row (codes, helper, scale, header or padding) and the recomputed root
differs, and the leaf's proof fails: `row_fields` gives views into a row by field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fieldprint.commit_pages import LeafRef
from fieldprint.hashing import blake3_many
from fieldprint.leaf import LeafSpec
from fieldprint.merkle import LEAF_KEY, MerkleTree, verify_proof

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

    def __init__(self, spec: LeafSpec, device: torch.device, hash_backend: str, host_digests: bool) -> None:
        self.spec, self.device, self.hash_backend = spec, device, hash_backend
        self.host_digests = host_digests
        self.leaves: list[LeafRef] = []
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

    def append(self, refs: list[LeafRef], rows: torch.Tensor, digests: torch.Tensor) -> None:
        """Add one commit: ``refs`` and ``rows [len(refs), spec.length]`` on the device, and copy
        ``digests [len(refs), 32]`` to the host without blocking (call `reserve` first)."""
        first = len(self.leaves)
        if self.host_digests:
            self._digests[first:first + len(refs)].copy_(digests, non_blocking=True)
        self.leaves += refs
        self.rows.append(rows)

    def truncate(self, num_leaves: int, num_commits: int) -> None:
        """Drop every leaf past ``num_leaves`` and every commit past ``num_commits`` (a rollback)."""
        del self.leaves[num_leaves:]
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
        if not self.host_digests:
            raise ValueError("verify() needs the leaf digests on the host: use fetch_leaves=True")
        trusted = self._digests[:n]
        if self._trusted is None or self._trusted[0] != n:
            self._trusted = (n, MerkleTree(trusted.clone()))
        tree = self._trusted[1]
        if as_bytes(tree.root) != root:
            raise ValueError("the host's leaf digests do not hash to the committed root")
        rows = []
        for r in self.rows:
            if sum(x.shape[0] for x in rows) >= n:
                break
            if self.device.type == "cuda":
                r.record_stream(torch.cuda.current_stream(self.device))
            rows.append(r)
        fresh_dev = torch.cat([blake3_many(r, key=LEAF_KEY, backend=self.hash_backend) for r in rows])[:n]
        recomputed = as_bytes(MerkleTree(fresh_dev, backend=self.hash_backend).root)
        fresh = fresh_dev.cpu()
        tampered = [i for i in torch.nonzero((fresh != trusted).any(dim=1)).flatten().tolist()
                    if not verify_proof(root, as_bytes(fresh[i]), i, n, tree.proof(i))]
        return VerifyResult(ok=recomputed == root and not tampered, root=root, recomputed_root=recomputed,
                            num_leaves=n, tampered=tampered, tampered_pages=[self.leaves[i] for i in tampered])
