"""The Merkle tree of `fieldprint.merkle` kept in preallocated device levels and extended by one
kernel launch per append, so that a commit can be captured in a CUDA graph and replayed.

    frontier = MerkleFrontier(capacity=4096, device="cuda")
    staging = torch.empty((64, 32), dtype=torch.uint8, device="cuda")  # leaf digests of a commit
    n_new = torch.empty(1, dtype=torch.int32, device="cuda")          # how many rows are real
    root = torch.empty(32, dtype=torch.uint8, device="cuda")
    frontier.append(staging, n_new, root)  # one launch: fixed shapes, sizes read on the device
    frontier.check()                       # (a sync) raises if the device refused an append

Tree shape and node hash are those of `MerkleTree` / `DeviceMerkleTree`: RFC 6962 built bottom-up
(neighbours paired, a lone last node promoted unchanged), node = BLAKE3(left || right, key =
NODE_KEY). A 64-byte keyed input is one BLAKE3 compression: chaining value = the key words,
message = the 16 words of left || right, counter 0, block length 64, flags CHUNK_START |
CHUNK_END | ROOT | KEYED_HASH.

Layout: level h holds ceil(capacity / 2**h) nodes (h = 0 .. depth, depth = ceil(log2(capacity)),
level depth is one node); all levels live in one [rows, 8] int32 buffer (little-endian words of
the 32-byte nodes), level h starting at row ``level_offsets[h]``. With n leaves, node i of level h
is correct for i < ceil(n / 2**h), and node 0 of level depth is the root (levels above a smaller
tree's root hold copies of it, promoted as lone nodes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldprint.hashing import _key_args
from fieldprint.hashing._kernels import _KEY_ARGS, CHUNK_END, CHUNK_START, ROOT, _merge, _node_words, _u32, store_cv
from fieldprint.merkle import NODE_KEY

__all__ = ["MerkleFrontier", "level_sizes"]

BLOCK = 128  # nodes per step of the one program (one per lane, 4 warps)


def level_sizes(capacity: int) -> list[int]:
    """Nodes per level of a tree over up to ``capacity`` leaves: [capacity, ceil(capacity/2), .., 1]."""
    sizes = [capacity]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


@triton.jit(do_not_specialize=_KEY_ARGS)
def frontier_append_kernel(digests_ptr, n_new_ptr, count_ptr, rejected_ptr, nodes_ptr, offsets_ptr, root_ptr,
                           M, capacity,
                           k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
                           DEPTH: tl.constexpr, BLOCK: tl.constexpr):
    """Append digests[:n_new] as leaves count .. count + n_new - 1, recompute the right edge of
    every level, write the root and count += n_new. One program (grid (1,)).

    digests_ptr: [M, 32] uint8 rows; n_new_ptr, count_ptr, rejected_ptr: [1] int32; nodes_ptr:
    [rows, 8] int32 levels, level h at row offsets_ptr[h] (int64 [DEPTH + 2], the last entry the
    total rows); root_ptr: [32] uint8. An n_new outside [0, min(M, capacity - count)] appends
    nothing and adds one to rejected (the host cannot check it without a sync).
    """
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    cols = tl.arange(0, 32)
    count = tl.load(count_ptr).to(tl.int64)
    n_req = tl.load(n_new_ptr).to(tl.int64)
    ok = (count >= 0) & (count <= capacity) & (n_req >= 0) & (n_req <= M) & (n_req <= capacity - count)
    n = tl.where(ok, n_req, 0)
    # a refused append changes nothing: no partial append to undo (the read-modify-write is safe:
    # Triton issues a scalar store from one thread, and no other thread stores rejected)
    tl.store(rejected_ptr, tl.load(rejected_ptr) + tl.where(ok, 0, 1))
    total = count + n
    node_bytes = nodes_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)

    # level 0: the new leaf digests, copied byte by byte (the staging rows need no alignment)
    r = n * 0
    while r < n:
        rows = r + lanes
        leaf = count + rows
        live = (rows < n) & (leaf >= 0) & (leaf < capacity)
        d = tl.load(digests_ptr + rows[:, None] * 32 + cols[None, :], mask=live[:, None])
        tl.store(node_bytes + leaf[:, None] * 32 + cols[None, :], d, mask=live[:, None])
        r += BLOCK
    # One CTA: bar.sync orders each thread's global writes before it against every thread's reads
    # after it (CUDA's __syncthreads guarantee), so the next level reads the nodes written here.
    tl.debug_barrier()

    flags = (_u32(key_flags) | CHUNK_START | CHUNK_END | ROOT).to(tl.uint32)
    w0 = _u32(k0)
    w1 = _u32(k1)
    w2 = _u32(k2)
    w3 = _u32(k3)
    w4 = _u32(k4)
    w5 = _u32(k5)
    w6 = _u32(k6)
    w7 = _u32(k7)
    first = count  # nodes [first, end) of the level below changed; those left of first did not
    end = total
    for h in range(1, DEPTH + 1):
        below = tl.load(offsets_ptr + h - 1)
        here = tl.load(offsets_ptr + h)
        size = tl.load(offsets_ptr + h + 1) - here
        size_below = here - below
        end_below = end
        # node i depends on nodes 2i, 2i+1 below: recompute from the parent of the first change
        first = first // 2
        end = (end + 1) // 2
        i = first
        while i < end:
            node = i + lanes
            live = (node >= 0) & (node < end) & (node < size)
            pair = live & (2 * node + 1 < end_below) & (2 * node + 1 < size_below)
            l0, l1, l2, l3, l4, l5, l6, l7 = _node_words(nodes_ptr + below * 8, 2 * node, live)
            if 2 * i + 1 < end_below:  # lane 0 has a pair (else no lane has): hash
                q0, q1, q2, q3, q4, q5, q6, q7 = _node_words(nodes_ptr + below * 8, 2 * node + 1, pair)
                l0, l1, l2, l3, l4, l5, l6, l7 = _merge(
                    w0, w1, w2, w3, w4, w5, w6, w7, flags, pair,
                    l0, l1, l2, l3, l4, l5, l6, l7, q0, q1, q2, q3, q4, q5, q6, q7)
            # else a lone last node (the right edge, the levels above a smaller tree's root)
            # moves up as it is, without the compression's latency
            store_cv(nodes_ptr + (here + node) * 8, l0, l1, l2, l3, l4, l5, l6, l7, live)
            i += BLOCK
        tl.debug_barrier()  # as above: level h is complete before level h + 1 reads it

    top = tl.load(offsets_ptr + DEPTH)
    has_root = (cols < 32) & (total > 0)
    root = tl.load(node_bytes + top * 32 + cols, mask=has_root)
    tl.store(root_ptr + cols, root, mask=has_root)
    # every thread read count before the first barrier, so it can be overwritten now
    tl.store(count_ptr, total.to(tl.int32))


def _check_tensor(x, name: str, dtype: torch.dtype, shape: str, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the frontier is on {device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), shape {shape}")


class MerkleFrontier:
    """The RFC 6962 tree of `fieldprint.merkle` (bottom-up pairing, a lone last node promoted
    unchanged, node = BLAKE3 keyed with NODE_KEY of left || right) over up to ``capacity``
    leaves, kept on the device in preallocated levels and extended by one kernel launch per
    append (capturable in a CUDA graph).

    Device state (fixed addresses, so a captured graph keeps working across appends):
    ``nodes`` [sum_h ceil(capacity / 2**h), 8] int32, the levels (layout in the module
    docstring); ``level_offsets`` [depth + 2] int64, first row of each level and the total rows;
    ``count`` [1] int32, leaves so far; ``rejected`` [1] int32, appends the device refused
    (n_new out of range) since the last `check`.
    """

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if not 1 <= capacity < 2**31:
            raise ValueError(f"capacity must be in [1, 2**31), got {capacity}")
        self.capacity = capacity
        sizes = level_sizes(capacity)
        self.depth = len(sizes) - 1
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self._offsets = offsets
        self.nodes = torch.zeros((offsets[-1], 8), dtype=torch.int32, device=device)
        self.device = self.nodes.device  # "cuda" resolved to "cuda:<current>"
        self.level_offsets = torch.tensor(offsets, dtype=torch.int64, device=self.device)
        self.count = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.rejected = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._key_words, self._key_flags = _key_args(NODE_KEY)
        # the empty append that `reset` launches to recompute the right edge
        self._no_digests = torch.zeros((1, 32), dtype=torch.uint8, device=self.device)
        self._zero = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._reset_root = torch.zeros(32, dtype=torch.uint8, device=self.device)

    def append(self, digests: torch.Tensor, n_new: torch.Tensor, root_out: torch.Tensor) -> None:
        """Append ``digests[:n_new]`` as leaves and write the new root to ``root_out``.

        digests: [M >= 1, 32] uint8 (a fixed-size staging buffer); n_new: [1] int32, how many of
        its first rows to append (0 <= n_new <= min(M, capacity - num_leaves), else the device
        appends nothing and counts the append in ``rejected``: see `check`); root_out: [32]
        uint8, receives the root after the append (unchanged while the tree is empty). All on the
        frontier's device, contiguous. One kernel launch, no host sync, no allocation.
        """
        _check_tensor(digests, "digests", torch.uint8, "[M, 32]", self.device)
        if digests.dim() != 2 or digests.shape[0] < 1 or digests.shape[1] != 32:
            raise ValueError(f"digests must have shape [M >= 1, 32], got {tuple(digests.shape)}")
        _check_tensor(n_new, "n_new", torch.int32, "[1]", self.device)
        if tuple(n_new.shape) != (1,):
            raise ValueError(f"n_new must have shape [1], got {tuple(n_new.shape)}")
        _check_tensor(root_out, "root_out", torch.uint8, "[32]", self.device)
        if tuple(root_out.shape) != (32,):
            raise ValueError(f"root_out must have shape [32], got {tuple(root_out.shape)}")
        self._launch(digests, n_new, root_out)

    def _launch(self, digests: torch.Tensor, n_new: torch.Tensor, root_out: torch.Tensor) -> None:
        frontier_append_kernel[(1,)](
            digests, n_new, self.count, self.rejected, self.nodes, self.level_offsets, root_out,
            digests.shape[0], self.capacity, *self._key_words, self._key_flags,
            DEPTH=self.depth, BLOCK=BLOCK, num_warps=BLOCK // 32)

    def check(self) -> None:
        """Raise if the device refused an append since the last check (a sync); clears the count."""
        refused = int(self.rejected.item())
        if refused:
            self.rejected.zero_()
            raise ValueError(
                f"n_new was out of range in {refused} append(s): each must be in [0, min(M, capacity - "
                f"leaves so far)] with capacity {self.capacity}; those appends changed nothing")

    def reset(self, count: int) -> None:
        """Roll back to the first ``count`` leaves (0 <= count <= num_leaves; reading the leaf
        count is a sync). Nodes left of the old right edge are intact; one empty append rewrites
        the right edge, so the levels and `root` describe the shorter tree at once."""
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"count must be an int, got {type(count).__name__}")
        n = self.num_leaves
        if not 0 <= count <= n:
            raise ValueError(f"count must be in [0, {n}] (the leaves so far), got {count}")
        self.count.fill_(count)
        self._launch(self._no_digests, self._zero, self._reset_root)

    @property
    def num_leaves(self) -> int:
        """Leaves so far (reads ``count``: a sync; for tests and debugging)."""
        return int(self.count.item())

    def level(self, h: int) -> torch.Tensor:
        """[ceil(capacity / 2**h), 32] uint8 view of level h (nodes past the tree's edge are stale)."""
        if isinstance(h, bool) or not isinstance(h, int):
            raise TypeError(f"h must be an int, got {type(h).__name__}")
        if not 0 <= h <= self.depth:
            raise ValueError(f"h must be in [0, {self.depth}], got {h}")
        return self.nodes[self._offsets[h]:self._offsets[h + 1]].view(torch.uint8)

    def root(self) -> torch.Tensor:
        """[32] uint8 copy of the current root (leaf 0 when there is one leaf); a sync to check
        that the tree is not empty."""
        if self.num_leaves == 0:
            raise ValueError("an empty tree has no root: append leaves first")
        return self.level(self.depth)[0].clone()
