"""Commit-boundary verification of a paged KV cache.

Every ``interval`` decode steps the pages sealed since the last commit (and, at the first commit,
the pinned anchor pages) are quantized deterministically (:func:`fieldprint.quant.quantize`),
serialized as *page leaves*, hashed on the GPU (:func:`fieldprint.hashing.blake3_many`) and
appended to a Merkle tree (RFC 6962 shape, :mod:`fieldprint.merkle`) whose root commits to every
page committed so far. Only the 32-byte root (and, with ``fetch_leaves``, the 32-byte leaf
digests of the new pages) crosses PCIe, into pinned host memory with ``non_blocking=True``.

    committer = Committer(cache, mode="commit_async", interval=16, fmt="e4m3", rounding="two_grid")
    for step in ...:
        slots = cache.extend(seqs, [1] * B)
        ... per layer: cache.write(layer, slots, k, v); attention ...
        committer.step(slots)          # a commit every `interval` calls (per-step modes: every call)
    committer.root()                   # bytes(32): the latest committed root (waits if pending)
    committer.verify()                 # re-hash the stored pages, check root, localize tampering
    committer.verify(root=r)           # the same for any root r of committer.roots()
    committer.verify_live()            # the same for the live cache's pages, re-quantized

Modes (:data:`MODES`):

* ``none``: nothing (the baseline).
* ``per_step_copy_cpu``: every step copies the step's new K/V (all layers, raw cache dtype) to
  the host and hashes it with the CPU ``blake3`` package (all threads): the "PCIe death sentence".
* ``per_step_gpu``: every step quantizes and hashes the new K/V on the GPU and fetches the
  digests synchronously.
* ``commit_sync``: at each boundary, the commit runs on the current stream and the root is
  fetched before ``step`` returns.
* ``commit_async``: at each boundary, the commit runs on a side CUDA stream; the root is fetched
  lazily (``root()``), so decode never waits for hashing. On a CPU this is ``commit_sync``.

Stream ordering (``commit_async``): ``step`` records an event on the current (decode) stream
after the step's KV writes; the side stream waits on it, gathers the sealed pages out of the pool
(a copy, so later writes cannot race the hash), and does all the commit work on tensors it
allocated itself. It records a *done* event after the copies to pinned memory; ``root()``
synchronizes on it. A sealed page is never written again while its sequence lives; before
freeing or truncating sequences (which lets pages be reused), call :meth:`Committer.fence` so
the decode stream waits for the gather. The stored leaf rows are read by :meth:`verify` on the
decode stream after a full synchronization, and ``record_stream`` marks each one used there.

Parts (each its own module): `fieldprint.commit_pages` turns cache pages into page leaves
(layout `fieldprint.leaf`; page ids, quantization with one power-of-two scale per half-page, codes
in the storage order of the pool's page layout: an ``"hdn"`` V pool gives ``"hdn"`` V leaves);
`fieldprint.commit_store.LeafStore` keeps the committed rows and the host copy of their digests
and verifies them; `fieldprint.merkle.DeviceMerkleTree` is the tree on the device;
`fieldprint.commit_baselines` holds the per-step modes. This module runs the commit stream and
keeps the roots.

Atomic commits. A commit either lands whole (leaves, rows, digests, tree, root) or leaves the
committer as it was and raises a ValueError naming the reason: a page that cannot be a leaf
(unknown kind, a block outside the pool, or a sequence/anchor id, page index or token count that
does not fit the leaf header's page id, `fieldprint.commit_pages.page_id`) is refused before
anything changes; a page holding NaN/Inf is found when the commit's work is read back (at once
in ``commit_sync`` and on a CPU; at the next ``root()``, ``roots()``, ``verify()`` or commit in
``commit_async``), and that commit and every later one still in flight are rolled back. Pages
that a commit took from the cache's sealed list are kept by the committer until a commit lands
them (pages of sequences freed or truncated meanwhile are dropped), so a failed commit loses
none.

The leaf digest is ``blake3_many(rows, key=merkle.LEAF_KEY)``; the rows themselves are kept on the
device as the committed copy of the quantized pages (:attr:`Committer.store`), which
:meth:`Committer.verify` re-hashes. The rows are built on the device in one pass (headers prepared
on the host and copied from pinned memory): ``page_leaf_bytes`` itself builds its headers with a
pageable copy, which would make the host wait for the side stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fieldprint.cache import PagedKVCache, PageRef
from fieldprint.commit_baselines import PerStepCopyCPU, PerStepGPU
from fieldprint.commit_fused import FusedCommitPath
from fieldprint.commit_pages import LeafRef, LeafRefs, check_pages, leaf_headers, leaf_refs, page_id, page_leaf_rows
from fieldprint.commit_store import LeafStore, VerifyResult
from fieldprint.formats import FORMATS, ROUNDING_IDS
from fieldprint.hashing import BACKENDS as HASH_BACKENDS
from fieldprint.hashing import blake3_many
from fieldprint.hashing.fused import FUSED_FORMATS, POOL_DTYPES
from fieldprint.leaf import LeafSpec
from fieldprint.merkle import LEAF_KEY, DeviceMerkleTree
from fieldprint.quant import BACKENDS as QUANT_BACKENDS

__all__ = ["COMMIT_MODES", "MODES", "Committer", "LeafRef", "VerifyResult", "page_id"]

MODES = ("none", "per_step_copy_cpu", "per_step_gpu", "commit_sync", "commit_async")
COMMIT_MODES = ("commit_sync", "commit_async")
ROUNDINGS = tuple(r for r in ROUNDING_IDS if r != "stochastic")  # stochastic would need a seed per page
_ROOT_RING = 8  # pinned root buffers in flight


@dataclass(frozen=True)
class _Before:
    """The committer's state before a commit landed: what a rollback restores."""

    leaves: int
    commits: int
    tree: DeviceMerkleTree
    anchors_done: frozenset[int]
    backlog: tuple[PageRef, ...]


@dataclass(frozen=True)
class _Unfused:
    """The work of a commit on the kernel-by-kernel path."""

    done: torch.cuda.Event | None  # after its copies to pinned memory (None: already done)
    slot: int  # its root's row of the pinned ring
    finite: torch.Tensor  # [n] bool on the device: which of its leaves held no NaN/Inf
    digests: torch.Tensor  # [n, 32] uint8 on the device: its leaf digests


@dataclass
class _Batch:
    """One fixed-shape batch of the fused path (`fieldprint.commit_fused`) and, once folded, its
    results copied out of its pinned ring slot."""

    slot: int
    leaves: int
    done: torch.cuda.Event | None  # after its copies to pinned memory (None: already done)
    root: bytes | None = None
    digests: torch.Tensor | None = None  # [leaves, 32] uint8, host
    finite: torch.Tensor | None = None  # [leaves] int8, host


@dataclass(frozen=True)
class _Fused:
    """The work of a commit on the fused path: its batches, in order."""

    done: torch.cuda.Event | None  # its last batch's
    batches: list[_Batch]


@dataclass(frozen=True)
class _Pending:
    """A landed commit whose root is not on the host yet."""

    work: _Unfused | _Fused
    leaves: int  # leaves covered by its root
    refs: LeafRefs  # its leaves
    taken: tuple[PageRef, ...]  # pages it took from the cache's sealed list
    before: _Before


def _event(device: torch.device) -> torch.cuda.Event | None:
    """An event recorded now on the current stream (None on a CPU: the work is already done)."""
    if device.type != "cuda":
        return None
    done = torch.cuda.Event()
    done.record()
    return done


def _fold(path: FusedCommitPath, batch: _Batch) -> None:
    """Copy ``batch``'s results out of its pinned slot (waiting for the batch), once."""
    if batch.root is not None:
        return
    if batch.done is not None:
        batch.done.synchronize()
    batch.root = bytes(path.root_host[batch.slot].tolist())
    batch.digests = path.digests_host[batch.slot, :batch.leaves].clone()
    batch.finite = path.finite_host[batch.slot, :batch.leaves].clone()


class Committer:
    """Commits the pages of ``cache`` every ``interval`` steps (see the module doc).

    mode: one of :data:`MODES`; fmt, rounding: the quantization of the pages
    (``fieldprint.quant``; rounding not stochastic); fetch_leaves: also copy the leaf digests to
    the host (needed by :meth:`verify`); hash_backend: ``fieldprint.hashing.BACKENDS`` ("auto":
    CUDA -> Triton, CPU -> the blake3 package); quant_backend: ``fieldprint.quant.BACKENDS``
    ("auto": CUDA -> Triton, CPU -> torch); stream: the side stream of ``commit_async`` (default:
    a new one); max_pages: pages per fixed-shape batch of the fused path; graphs: replay the fused
    path's batches from CUDA graphs (CUDA only); capacity: leaves the fused path's row store and
    tree hold before they first grow (growing waits for the commit stream and captures the graphs
    again: size it for a run whose timing matters).

    Path: when both backends are Triton (CUDA with "auto", or "triton" under the interpreter),
    the format has 1-byte codes and the cache holds fp16/bf16/fp32, a commit is the fused
    fixed-shape path (`fieldprint.commit_fused`: one leaf kernel reading the pools, one Merkle
    frontier launch, CUDA graphs); otherwise the kernel-by-kernel path (`page_leaf_rows`,
    `blake3_many`, `DeviceMerkleTree`), e.g. with the torch quantizer and the blake3 package on
    a CPU. Both commit to the same roots (`fused` says which one runs).
    """

    def __init__(
        self, cache: PagedKVCache, mode: str = "commit_async", interval: int = 16, fmt: str = "e4m3",
        rounding: str = "two_grid", fetch_leaves: bool = True, hash_backend: str = "auto",
        quant_backend: str = "auto", stream: torch.cuda.Stream | None = None, max_pages: int = 64,
        graphs: bool = True, capacity: int | None = None,
    ) -> None:
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int, got {interval!r}")
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS} (stochastic would need a seed per page), "
                             f"got {rounding!r}")
        if quant_backend not in QUANT_BACKENDS:
            raise ValueError(f"quant_backend must be one of {QUANT_BACKENDS}, got {quant_backend!r}")
        if hash_backend not in HASH_BACKENDS:
            raise ValueError(f"hash_backend must be one of {HASH_BACKENDS}, got {hash_backend!r}")
        if (cache.num_kv_heads * cache.head_dim) % 8:
            raise ValueError("num_kv_heads * head_dim of the cache must be a multiple of 8 (whole helper bytes "
                             f"per token), got {cache.num_kv_heads} * {cache.head_dim}")
        if cache.block_size >= 2**16:
            raise ValueError(f"the cache's block_size must be below 2**16 (a page's valid tokens fit the "
                             f"leaf header's page id), got {cache.block_size}")
        for name, value in (("max_pages", max_pages), ("capacity", 1 if capacity is None else capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        cuda = cache.device.type == "cuda"
        if stream is not None and not (cuda and mode == "commit_async"):
            raise ValueError("stream applies only to mode='commit_async' on a CUDA cache")
        self.cache, self.mode, self.interval = cache, mode, interval
        self.fmt, self.rounding = fmt, rounding
        self.fetch_leaves, self.hash_backend, self.quant_backend = fetch_leaves, hash_backend, quant_backend
        self.device = cache.device
        # One side stream per committer unless given: pass the same stream to successive
        # committers so that the caching allocator can reuse their freed memory.
        self._side = (stream or torch.cuda.Stream(self.device)) if cuda and mode == "commit_async" else None
        self._per_step = {"per_step_copy_cpu": lambda: PerStepCopyCPU(cache),
                          "per_step_gpu": lambda: PerStepGPU(cache, fmt, rounding, quant_backend, hash_backend),
                          }.get(mode, lambda: None)()
        self.steps = 0
        self.commits = 0
        self.step_digests: list[bytes] = []  # per-step modes: one digest per step (host)
        spec = LeafSpec(fmt, rounding, elems=cache.block_size * cache.num_kv_heads * cache.head_dim)
        self._store = LeafStore(spec, self.device, hash_backend, host_digests=fetch_leaves,
                                num_layers=cache.num_layers)
        self._tree = DeviceMerkleTree(self.device, hash_backend)
        self._anchors_done: frozenset[int] = frozenset()
        self._backlog: tuple[PageRef, ...] = ()  # sealed pages taken from the cache, not committed yet
        self._roots: list[tuple[int, bytes]] = []  # (leaves covered, root) fetched to the host
        self._pending: list[_Pending] = []
        self._root_host = torch.zeros((_ROOT_RING, 32), dtype=torch.uint8, pin_memory=cuda)
        self._last_done: torch.cuda.Event | None = None
        triton_hash = hash_backend == "triton" or (hash_backend == "auto" and cuda)
        triton_quant = quant_backend == "triton" or (quant_backend == "auto" and cuda)
        self.fused = (mode in COMMIT_MODES and triton_hash and triton_quant and fmt in FUSED_FORMATS
                      and cache.dtype in POOL_DTYPES)
        if capacity is None:
            capacity = max(8 * max_pages * 2 * cache.num_layers, 4096)
        self._fused = (FusedCommitPath(cache, spec, max_pages, _ROOT_RING, capacity, self._side, graphs)
                       if self.fused else None)
        self._fused_batches = 0  # batches launched on the fused path: the next one's ring slot
        self._slot_owner: dict[int, _Batch] = {}  # fused ring slot -> the batch whose results it holds

    @property
    def leaves(self) -> LeafRefs:
        """What each committed leaf holds, in tree order."""
        return self._store.leaves

    @property
    def store(self) -> list[torch.Tensor]:
        """The committed leaf rows on the device, one ``[n_i, row bytes]`` uint8 tensor per commit."""
        return self._store.rows

    # ------------------------------------------------------------------ the decode-loop hook

    def step(self, slots: torch.Tensor) -> None:
        """Call once per decode step after the step's KV writes; ``slots [T]`` are the new tokens'
        slots (from ``PagedKVCache.extend``)."""
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.dim() != 1:
            raise TypeError("slots must be the 1-D int64 tensor PagedKVCache.extend returned")
        if slots.device != self.device:
            raise ValueError(f"slots is on {slots.device} but the cache is on {self.device}")
        self.steps += 1
        if self._per_step is not None:
            self.step_digests.append(self._per_step.step(slots))
        elif self.mode in COMMIT_MODES and self.steps % self.interval == 0:
            self.commit()

    def commit(self, pages: list[PageRef] | None = None) -> None:
        """Commit new anchors and ``pages`` (default: the pages sealed since the last commit) now.
        Atomic: see the module doc."""
        if self.mode not in COMMIT_MODES:
            raise ValueError(f"commit() needs mode in {COMMIT_MODES}, this committer is {self.mode!r}")
        if pages is not None and (not isinstance(pages, list | tuple) or not all(isinstance(p, PageRef)
                                                                                  for p in pages)):
            raise TypeError("pages must be a list of PageRef (from PagedKVCache.complete_pages)")
        self._harvest(wait=False)  # a failed commit in flight raises here, before this one starts
        # an anchor whose prefill is still writing its layers is committed once it is complete
        new_anchors = [a for a in sorted(self.cache.anchors)
                       if a not in self._anchors_done and self.cache.anchor_complete(a)]
        taken: tuple[PageRef, ...] = ()
        if pages is None:
            taken = tuple(self.cache.take_sealed())
            self._backlog = self._live(self._backlog + taken)
        body = list(self._backlog) if pages is None else list(pages)
        todo = [p for a in new_anchors for p in self.cache.anchor_pages(a)] + body
        if not todo:
            return
        check_pages(todo, self.cache)  # bad pages and header overflows: refused before anything changes
        refs = leaf_refs(todo, self.cache.num_layers)
        n_after = len(self._store) + len(refs)
        if self.fetch_leaves and n_after > self._store.capacity:
            self._harvest(wait=True)  # no digest copy into the host buffer may be in flight
            self._store.reserve(n_after)
        while len(self._pending) >= _ROOT_RING:
            self._harvest_one()
        before = _Before(len(self._store), self.commits, self._tree, self._anchors_done, self._backlog)
        stream_ctx = contextlib.nullcontext()
        if self._side is not None:
            written = torch.cuda.Event()
            written.record()
            self._side.wait_event(written)
            stream_ctx = torch.cuda.stream(self._side)
        with stream_ctx:
            if self._fused is not None:
                rows, work = self._launch_fused(todo)
            else:
                rows, work = self._launch_unfused(todo)
            # landing: from here on nothing can fail but the finite check at harvest
            self._store.append(refs, rows, None if self._fused is not None else work.digests)
        self._anchors_done = self._anchors_done | set(new_anchors)
        if pages is None:
            self._backlog = ()
        self._pending.append(_Pending(work, n_after, refs, taken, before))
        self._last_done = work.done
        self.commits += 1
        if self._side is None:
            self._harvest(wait=True)  # commit_sync (and every CPU run): the root is on the host now

    def _launch_unfused(self, todo: list[PageRef]) -> tuple[torch.Tensor, _Unfused]:
        """The commit's work on the current stream, kernel by kernel (`fieldprint.commit_pages`,
        `blake3_many`, `DeviceMerkleTree`): leaf rows [n, row bytes] and the work record."""
        dev = self.device
        header = leaf_headers(self.cache, self._store.spec, todo)
        blocks = torch.tensor([p.block for p in todo], dtype=torch.int64)
        tokens = torch.tensor([p.tokens for p in todo], dtype=torch.int64)
        if dev.type == "cuda":
            header, blocks, tokens = header.pin_memory(), blocks.pin_memory(), tokens.pin_memory()
        rows, finite = page_leaf_rows(self.cache, self._store.spec, header.to(dev, non_blocking=True),
                                      blocks.to(dev, non_blocking=True), tokens.to(dev, non_blocking=True),
                                      self.quant_backend)
        digests = blake3_many(rows, key=LEAF_KEY, backend=self.hash_backend)
        self._tree = self._tree.append(digests)
        slot = self.commits % _ROOT_RING
        self._root_host[slot].copy_(self._tree.root, non_blocking=True)
        return rows, _Unfused(_event(dev), slot, finite, digests)

    def _launch_fused(self, todo: list[PageRef]) -> tuple[torch.Tensor, _Fused]:
        """The commit's work as fixed-shape batches of at most ``max_pages`` pages
        (`fieldprint.commit_fused`), each replayed from a CUDA graph on CUDA: leaf rows and the
        work record."""
        path, step = self._fused, self._fused.plan.max_pages
        start, rows, batches = path.leaves, [], []
        for i in range(0, len(todo), step):
            part = todo[i:i + step]
            slot = self._fused_batches % path.ring
            self._free_slot(slot)
            rows.append(path.launch(slot, [p.block for p in part], [p.tokens for p in part],
                                    [page_id(p) for p in part]))
            batch = _Batch(slot, len(part) * path.plan.leaves_per_page, _event(self.device))
            self._slot_owner[slot] = batch
            batches.append(batch)
            self._fused_batches += 1
        return path.bufs.rows[start:path.leaves], _Fused(batches[-1].done, batches)

    def root(self) -> bytes:
        """The latest committed root (32 bytes); waits for a commit still in flight."""
        self._harvest(wait=True)
        if not self._roots:
            raise ValueError("nothing committed yet: call commit() (or step() past a boundary) first")
        return self._roots[-1][1]

    def roots(self) -> list[tuple[int, bytes]]:
        """Every committed root as ``(leaves covered, root)``, oldest first."""
        self._harvest(wait=True)
        return list(self._roots)

    def fence(self) -> None:
        """Make the current stream wait for the commits in flight (before freeing pages)."""
        if self._last_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_done)

    # ------------------------------------------------------------------ verification

    def verify(self, root: bytes | None = None) -> VerifyResult:
        """Re-hash the stored page leaves that ``root`` covers (default: the latest root; any root
        of :meth:`roots`) and check them against it; localize mismatches with Merkle proofs over
        the host's leaf digests."""
        return self._store.verify(*self._covered(root))

    def verify_live(self, root: bytes | None = None) -> VerifyResult:
        """As :meth:`verify`, for the pages the live cache holds now: each committed leaf's page is
        re-read through the cache's current block tables, re-quantized with the committed scale
        and helper bits, rebuilt as a leaf and hashed (`fieldprint.commit_store.LeafStore.verify_live`,
        which states what this binds). Pages of freed sequences count as mismatches."""
        return self._store.verify_live(self.cache, *self._covered(root))

    def row_fields(self, leaf: int) -> dict[str, torch.Tensor]:
        """Views into the stored row of leaf ``leaf`` (uint8): header, codes, scale (float32
        bytes), helper (empty unless two_grid), padding (zeros up to a multiple of 64 bytes)."""
        return self._store.row_fields(leaf)

    # ------------------------------------------------------------------ the commit stream

    def _covered(self, root: bytes | None) -> tuple[bytes, int]:
        """(root, leaves it covers) for ``root`` (default: the latest), once the commit stream
        is done with them."""
        if not self.fetch_leaves:
            raise ValueError("verify() needs the leaf digests on the host: use fetch_leaves=True")
        if root is not None and (not isinstance(root, bytes | bytearray) or len(root) != 32):
            raise ValueError(f"root must be 32 bytes, got {root!r}")
        trusted = bytes(self.root() if root is None else root)
        covered = [n for n, r in self.roots() if r == trusted]
        if not covered:
            raise ValueError("root is not one of this committer's committed roots (see roots())")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return trusted, covered[-1]

    def _live(self, pages: tuple[PageRef, ...]) -> tuple[PageRef, ...]:
        """The pages that still hold what they held when sealed: their sequence lives, the page
        is still its ``index``-th page and is still full."""
        out = []
        for p in pages:
            s = self.cache.sequences.get(p.owner)
            if (s is not None and p.index < len(s.blocks) and s.blocks[p.index] == p.block
                    and (p.index + 1) * self.cache.block_size <= s.length):
                out.append(p)
        return tuple(out)

    def _harvest(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].work.done is None or self._pending[0].work.done.query()):
            self._harvest_one()

    def _harvest_one(self) -> None:
        p = self._pending[0]
        if isinstance(p.work, _Fused):
            for b in p.work.batches:
                _fold(self._fused, b)
                self._slot_owner.pop(b.slot, None)
            finite = torch.cat([b.finite for b in p.work.batches])
        else:
            if p.work.done is not None:
                p.work.done.synchronize()
            finite = p.work.finite.cpu()
        bad = torch.nonzero(finite == 0).flatten().tolist()
        if bad:
            self._roll_back()
            leaf = p.refs[bad[0]]
            raise ValueError(
                f"NaN or Inf in the {leaf.kind.upper()} half of {leaf.page.kind} page {leaf.page.index} of "
                f"owner {leaf.page.owner} (pool page {leaf.page.block}), layer {leaf.layer}: nothing committed, "
                "the committer is back to its state before that commit")
        self._pending.pop(0)
        if isinstance(p.work, _Fused):
            if self.fetch_leaves:
                self._store.write_digests(p.before.leaves, torch.cat([b.digests for b in p.work.batches]))
            root = p.work.batches[-1].root
        else:
            root = bytes(self._root_host[p.work.slot].tolist())
        self._roots.append((p.leaves, root))

    def _free_slot(self, slot: int) -> None:
        """Make ring ``slot`` of the fused path free: fold the batch that holds it (waiting for it)."""
        held = self._slot_owner.pop(slot, None)
        if held is not None:
            _fold(self._fused, held)

    def _roll_back(self) -> None:
        """Undo the oldest pending commit and every later one: the committer's state before it,
        with the sealed pages those commits took from the cache kept for the next commit."""
        for p in self._pending:
            if p.work.done is not None:
                p.work.done.synchronize()  # no copy into a host buffer may still land
        first = self._pending[0].before
        taken = tuple(page for p in self._pending[1:] for page in p.taken)
        self._pending.clear()
        self._slot_owner.clear()
        self._store.truncate(first.leaves, first.commits)
        self._tree, self.commits = first.tree, first.commits
        if self._fused is not None:
            self._fused.reset(first.leaves)
        self._anchors_done = first.anchors_done
        self._backlog = self._live(first.backlog + taken)
