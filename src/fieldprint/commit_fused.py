"""The fixed-shape commit of `fieldprint.commit`: what one batch of at most ``max_pages`` pages
costs at a commit boundary, replayable from a CUDA graph.

    path = FusedCommitPath(cache, spec, max_pages=64, ring=8, capacity=4096, stream=side, graphs=True)
    rows = path.launch(slot, blocks, tokens, page_ids)     # enqueue one batch (no sync, no allocation)
    ... once the slot's work is done (an event):
    path.root_host[slot], path.digests_host[slot][:n], path.finite_host[slot][:n]

One batch is, in stream order: one host-to-device copy of the slot's page descriptors (a pinned
ring of ``ring`` slots) and of its counts; one launch of the fused leaf kernel
(`fieldprint.hashing.fused.launch_leaves`), which reads the pages straight from the cache's
pools as stored (`_storage`: an ``"hdn"`` V pool's pages token-minor, the order its leaves commit
to) and writes each leaf row into the row store at the tree's leaf count, its digest and its
finite flag; one launch that appends the digests to the Merkle frontier in preallocated levels
(`fieldprint.merkle_frontier.MerkleFrontier`); copies of the root, the leaf digests and the
finite flags into the slot's pinned buffers. Every size the work varies with is in device
memory, so on CUDA each slot's batch is captured once in a CUDA graph (on the commit stream) and
replayed; on a CPU (the Triton interpreter) the same operations run eagerly.

Leaf order within a batch: page, then layer, then K before V (`fieldprint.commit_pages`).
"""

from __future__ import annotations

import contextlib

import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit_pages import half_layouts
from fieldprint.hashing.fused import DESC_FIELDS, LeafPlan, launch_leaves
from fieldprint.leaf import LeafSpec
from fieldprint.merkle_frontier import MerkleFrontier
from fieldprint.page_layout import page_elements

__all__ = ["FusedCommitPath"]


class FusedCommitPath:
    """Fixed-shape commit batches of ``cache``'s pages (see the module doc).

    spec: the leaves' `LeafSpec` (1-byte codes, one scale per leaf); max_pages: pages per batch;
    ring: pinned slots (batches in flight at most); capacity: leaf rows the store and the tree
    hold before they grow; stream: where the batches run (None: the current stream); graphs:
    replay each slot's batch from a CUDA graph (CUDA only).
    """

    def __init__(self, cache: PagedKVCache, spec: LeafSpec, max_pages: int, ring: int, capacity: int,
                 stream: torch.cuda.Stream | None, graphs: bool) -> None:
        self.cache, self.ring, self.stream = cache, ring, stream
        self.plan = LeafPlan(spec, layers=cache.num_layers, kinds=2, max_pages=max_pages,
                             tokens_per_page=cache.block_size, v_layout=half_layouts(cache)["v"])
        cuda = cache.device.type == "cuda"
        self.graphs = graphs and cuda
        dev = cache.device
        n = self.plan.max_leaves
        self.bufs = self.plan.buffers(dev, capacity)
        self.frontier = MerkleFrontier(capacity, dev)
        self.leaves = 0  # leaves committed (host count; the frontier keeps the device one)
        # per slot: the descriptors and counts the host fills, the results the device copies back
        self.desc_host = torch.zeros((ring, max_pages, DESC_FIELDS), dtype=torch.int64, pin_memory=cuda)
        self.counts_host = torch.zeros((ring, 2), dtype=torch.int32, pin_memory=cuda)  # pages, leaves
        self.root_host = torch.zeros((ring, 32), dtype=torch.uint8, pin_memory=cuda)
        self.digests_host = torch.zeros((ring, n, 32), dtype=torch.uint8, pin_memory=cuda)
        self.finite_host = torch.zeros((ring, n), dtype=torch.int8, pin_memory=cuda)
        self._desc = torch.zeros((max_pages, DESC_FIELDS), dtype=torch.int64, device=dev)
        self._counts = torch.zeros(2, dtype=torch.int32, device=dev)
        self._root = torch.zeros(32, dtype=torch.uint8, device=dev)
        self._replays: list[torch.cuda.CUDAGraph | None] = [None] * ring

    @property
    def capacity(self) -> int:
        return self.bufs.rows.shape[0]

    def launch(self, slot: int, blocks: list[int], tokens: list[int], page_ids: list[int]) -> torch.Tensor:
        """Enqueue the batch of pages ``blocks`` (pool pages) with ``tokens`` valid tokens and
        ``page_ids`` (at most ``max_pages``; the caller checked them) on the commit stream, in
        ring ``slot``, whose previous batch must be harvested. Returns the batch's leaf rows
        ``[P * 2L, spec.length]`` uint8 (a view into the row store, written by the batch)."""
        p = len(blocks)
        n = p * self.plan.leaves_per_page
        if not 0 < p <= self.plan.max_pages:
            raise ValueError(f"a batch holds 1 to max_pages={self.plan.max_pages} pages, got {p}")
        if self.leaves + n > self.capacity:
            self._grow(max(2 * self.capacity, self.leaves + n))
        self.desc_host[slot, :p] = torch.tensor(list(zip(blocks, tokens, page_ids, strict=True)), dtype=torch.int64)
        self.counts_host[slot, 0], self.counts_host[slot, 1] = p, n
        if self.graphs and self._replays[slot] is None:
            self._replays[slot] = self._capture(slot)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            if self.graphs:
                self._replays[slot].replay()
            else:
                self._batch(slot)
        rows = self.bufs.rows[self.leaves:self.leaves + n]
        self.leaves += n
        return rows

    def reset(self, leaves: int) -> None:
        """Back to the first ``leaves`` leaves (a rollback; no batch may be in flight)."""
        self.frontier.reset(leaves)
        self.leaves = leaves

    # ------------------------------------------------------------------ internals

    def _batch(self, slot: int) -> None:
        """The batch's work, enqueued on the current stream (eagerly or under graph capture)."""
        self._desc.copy_(self.desc_host[slot], non_blocking=True)
        self._counts.copy_(self.counts_host[slot], non_blocking=True)
        layouts = half_layouts(self.cache)
        k, v = _storage(self.cache.k, layouts["k"]), _storage(self.cache.v, layouts["v"])
        launch_leaves(self.plan, self.bufs, k, v, self._desc, self._counts[0:1], self.frontier.count)
        self.frontier.append(self.bufs.digests, self._counts[1:2], self._root)
        self.root_host[slot].copy_(self._root, non_blocking=True)
        self.digests_host[slot].copy_(self.bufs.digests, non_blocking=True)
        self.finite_host[slot].copy_(self.bufs.finite, non_blocking=True)

    def _capture(self, slot: int) -> torch.cuda.CUDAGraph:
        """Slot ``slot``'s batch as a CUDA graph (captured on torch's capture stream, replayed on
        the commit stream). The kernels are compiled first by an empty batch (zero pages: nothing
        is written)."""
        saved = self.counts_host[slot].clone()
        self.counts_host[slot] = 0
        self._batch(slot)
        torch.cuda.synchronize(self.cache.device)
        self.counts_host[slot] = saved
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._batch(slot)
        return graph

    def _grow(self, capacity: int) -> None:
        """A store and tree of ``capacity`` leaves holding the current ones (no batch in flight:
        the caller harvested); the graphs are captured again on their next use."""
        if self.cache.device.type == "cuda":
            torch.cuda.synchronize(self.cache.device)
        old_rows, old_tree = self.bufs.rows, self.frontier
        self.bufs = self.plan.buffers(self.cache.device, capacity)
        self.bufs.rows[:self.leaves] = old_rows[:self.leaves]
        self.frontier = MerkleFrontier(capacity, self.cache.device)
        if self.leaves:
            self.frontier.append(old_tree.level(0)[:self.leaves].contiguous(), torch.tensor(
                [self.leaves], dtype=torch.int32, device=self.cache.device), self._root)
        self._replays = [None] * self.ring


def _storage(pool: torch.Tensor, layout: str) -> torch.Tensor:
    """A pool's logical view ``[L, N, S, Hkv, D]`` -> its storage ``[L, N, S * Hkv * D]``, each
    page's elements in the order ``layout`` stores them (`fieldprint.page_layout.page_elements`).
    A view, never a copy: the kernel (and a CUDA graph replaying it) must read the live pool."""
    flat = page_elements(pool.flatten(0, 1), layout).view(pool.shape[0], pool.shape[1], -1)
    if flat.data_ptr() != pool.data_ptr():  # page_elements copied: the pool is not stored that way
        raise ValueError(f"the cache's pool of shape {tuple(pool.shape)}, strides {pool.stride()} is not "
                         f"stored in its page layout {layout!r}")
    return flat
