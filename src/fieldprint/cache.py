"""Paged KV cache with pinned, shared anchor pages.

One pool of pages per layer, as in PagedAttention (Kwon et al. 2023)::

    cache = PagedKVCache(num_layers=L, num_blocks=N, block_size=S, num_kv_heads=Hkv, head_dim=D,
                         dtype=torch.bfloat16, device="cuda")
    cache.k, cache.v          # [L, N, S, Hkv, D]; cache.k_cache(l) is layer l's [N, S, Hkv, D] view

``v_layout="hdn"`` stores each V page with its tokens contiguous (``fieldprint.page_layout``);
``cache.v`` is then a non-contiguous view of the same logical shape, which the attention kernel
reads by its strides and a commit hashes in storage order (the leaf header names the layout).

Pages are handed out by a :class:`BlockAllocator` (free list + reference counts + pins). A
sequence owns a *block table* (its pages, in token order); its token ``t`` lives in page
``table[t // S]`` at offset ``t % S``.

*Anchors* (for example the KV of a system prompt) are written once by :meth:`add_anchor` into
pages that are **pinned**: never returned to the free list, never in a sequence's own block table,
so no append can overwrite them. Any number of sequences share one anchor
(``add_sequence(anchor=a)``); the anchor's reference count says how many do. A model's prefill
writes an anchor layer by layer instead: :meth:`reserve_anchor` pins its pages,
:meth:`write_anchor` stores one layer, :meth:`anchor_prefill_args` gives the kernel arguments of
the anchor attending to itself; sequences may share it once every layer is written, after which
its pages are read-only.

Writing new tokens is two steps, so that a decode step allocates once and writes per layer:

* :meth:`extend` ``(seqs, counts) -> slots [T] int64`` grows the sequences, allocating pages as
  needed, and returns the flat slot (``page * S + offset``) of each new token in packed order;
* :meth:`write` ``(layer, slots, k, v)`` stores ``k, v: [T, Hkv, D]`` with one ``index_copy_``
  per tensor (no Python loop over tokens). It accepts only the slots of the latest ``extend``,
  the one narrow way into the pool for sequences.

:meth:`append` ``(seq, k, v)`` does both for one sequence and all layers
(``k, v: [L, n, Hkv, D]``, one indexed write per tensor).

:meth:`kernel_args` ``(seqs, query_lens)`` builds the arguments of
:func:`fieldprint.attention.paged_anchor_attention` (docs/DESIGN.md, "Kernel arguments"):
``block_table [B, max_blocks]``, ``seq_lens [B]``, ``query_start_loc [B+1]``,
``anchor_block_table [B, max_anchor_blocks]``, ``anchor_lens [B]``, all int32 on the cache's
device; unused table entries are 0 (a valid page that the kernel never reads past the lengths).
:meth:`anchor_groups` ``(seqs)`` lists the batch positions that share each anchor (the kernel's
optional ``anchor_groups``, read-once anchors in decode and chunked-prefill batches).

:meth:`free_sequence` returns a sequence's pages to the pool (its anchor stays pinned);
:meth:`truncate` cuts a sequence back. :meth:`complete_pages` lists a sequence's full pages.

A page is *sealed* when its last slot has been handed out; :meth:`take_sealed` returns the
pages sealed since its previous call (what the commit pipeline, :mod:`fieldprint.commit`, hashes
at the next boundary). Anchor pages are complete from the start and are listed by
:meth:`anchor_pages`. A sequence's partial last page is not sealed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fieldprint.page_layout import check_layout, empty_pool

CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn)


class CacheFullError(RuntimeError):
    """The pool has no free page left."""


class BlockAllocator:
    """Free-list allocator of ``num_blocks`` page ids with reference counts and pins.

    ``allocate(n)`` hands out ``n`` free pages (refcount 1); ``incref`` shares a page; ``free``
    drops one reference and returns the page to the free list at zero. Pinned pages are never
    freed: ``free`` of a pinned page is an error, and so is a double free.
    """

    def __init__(self, num_blocks: int, seed: int | None = None) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        if seed is None:
            self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        else:  # a seeded random order: block tables scrambled as in a long-running server
            self._free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self._refs = [0] * num_blocks
        self._pinned: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[self._check(block)]

    def is_pinned(self, block: int) -> bool:
        return self._check(block) in self._pinned

    def allocate(self, n: int) -> list[int]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if n > len(self._free):
            raise CacheFullError(f"need {n} free pages, only {len(self._free)} of {self.num_blocks} left")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[self._check(b)] == 0:
                raise ValueError(f"block {b} is free; allocate it before sharing it")
        for b in blocks:
            self._refs[b] += 1

    def pin(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[self._check(b)] == 0:
                raise ValueError(f"block {b} is free; only allocated pages can be pinned")
        self._pinned.update(blocks)

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._check(b) in self._pinned:
                raise ValueError(f"block {b} is pinned (an anchor page) and cannot be freed")
            if self._refs[b] == 0:
                raise ValueError(f"block {b} is already free (double free)")
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def _check(self, block: int) -> int:
        if not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block!r} outside the pool [0, {self.num_blocks})")
        return block


@dataclass
class Anchor:
    """Pinned anchor tokens shared by sequences: ``length`` tokens in ``blocks``."""

    id: int
    blocks: list[int]
    length: int
    refcount: int = 0
    # layers whose K/V have been written; sequences may share the anchor once all are
    written: set[int] = field(default_factory=set)


@dataclass
class Sequence:
    id: int
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    anchor: int | None = None
    # Host int32 mirror of ``blocks`` (capacity doubling), so kernel_args copies rows instead of
    # converting Python lists every decode step.
    table: torch.Tensor = field(default_factory=lambda: torch.zeros(16, dtype=torch.int32))
    # Bumped whenever pages are taken away (truncate): a mirror of ``blocks`` that only watched
    # its length could miss pages replaced at the same count.
    epoch: int = 0

    def set_blocks(self, blocks: list[int]) -> None:
        old = len(self.blocks)
        if len(blocks) > self.table.numel():  # grow: the mirrored pages come along
            grown = torch.zeros(max(len(blocks), 2 * self.table.numel()), dtype=torch.int32)
            grown[:old] = self.table[:old]
            self.table = grown
        if len(blocks) > old:
            self.table[old:len(blocks)] = torch.tensor(blocks[old:], dtype=torch.int32)
        self.blocks = blocks


@dataclass(frozen=True)
class PageRef:
    """A complete page: ``index``-th page of sequence (or anchor) ``owner`` in pool page ``block``;
    ``tokens`` valid tokens (``block_size`` except an anchor's last page)."""

    kind: str  # "context" or "anchor"
    owner: int
    index: int
    block: int
    tokens: int


@dataclass(frozen=True)
class KernelArgs:
    """Index arguments of ``paged_anchor_attention`` (docs/DESIGN.md, "Kernel arguments"), int32 on the cache device."""

    block_table: torch.Tensor  # [B, max_blocks]
    seq_lens: torch.Tensor  # [B]
    query_start_loc: torch.Tensor  # [B + 1]
    anchor_block_table: torch.Tensor  # [B, max_anchor_blocks], at least one column
    anchor_lens: torch.Tensor  # [B]


class PagedKVCache:
    """Per-layer page pools ``k, v: [L, num_blocks, block_size, Hkv, D]`` (see the module doc;
    ``v_layout``: the V pool's page layout, ``"nhd"`` or ``"hdn"``)."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", *,
        seed: int | None = None, poison: bool = False, v_layout: str = "nhd",
    ) -> None:
        for name, val in (("num_layers", num_layers), ("block_size", block_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if dtype not in CACHE_DTYPES:
            raise TypeError(f"dtype must be one of {CACHE_DTYPES}, got {dtype}")
        self.v_layout = check_layout("v_layout", v_layout)
        self.allocator = BlockAllocator(num_blocks, seed)
        # poison: pages hold NaN until written, and again once freed, so that a read of a slot
        # never written (or of a freed page) shows up in any result instead of passing silently
        self.poison = poison
        self.num_layers, self.block_size = num_layers, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", comparable with tensors
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        fill = float("nan") if poison else 0.0
        self.k = torch.full(shape, fill, dtype=dtype, device=self.device)
        self.v = empty_pool(shape, v_layout, fill, dtype, self.device)
        self.sequences: dict[int, Sequence] = {}
        self.anchors: dict[int, Anchor] = {}
        self._sealed: list[PageRef] = []
        self._next_seq = 0
        self._next_anchor = 0
        self._writable: torch.Tensor | None = None  # the slots of the latest extend()
        self._scratch: int | None = None  # page of scratch_slot()

    # ------------------------------------------------------------------ views

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s key pool ``[num_blocks, block_size, Hkv, D]`` (a view)."""
        return self.k[self._layer(layer)]

    def v_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s value pool ``[num_blocks, block_size, Hkv, D]`` (a view)."""
        return self.v[self._layer(layer)]

    def seq_len(self, seq: int) -> int:
        return self._seq(seq).length

    def position(self, seq: int) -> int:
        """Rotary position of the next token of ``seq``: its anchor's length + its own length."""
        s = self._seq(seq)
        return s.length + (self.anchors[s.anchor].length if s.anchor is not None else 0)

    # ------------------------------------------------------------------ anchors and sequences

    def add_anchor(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write anchor tokens ``k, v: [L, n, Hkv, D]`` into fresh pinned pages; returns its id."""
        n = self._check_kv(k, v, leading=self.num_layers)
        if n == 0:
            raise ValueError("k must hold at least one anchor token (shape [L, n, Hkv, D] with n > 0)")
        anchor = self.reserve_anchor(n)
        a = self.anchors[anchor]
        self._write_all_layers(self._slots(a.blocks, 0, n), k, v)
        a.written.update(range(self.num_layers))
        return anchor

    def reserve_anchor(self, n: int) -> int:
        """Fresh pinned pages for ``n`` anchor tokens whose K/V a prefill writes layer by layer
        with :meth:`write_anchor`; sequences may share it once every layer is written."""
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"n must be a positive int (anchor tokens), got {n!r}")
        blocks = self.allocator.allocate(-(-n // self.block_size))
        self.allocator.pin(blocks)
        anchor = Anchor(self._next_anchor, blocks, n)
        self.anchors[anchor.id] = anchor
        self._next_anchor += 1
        return anchor.id

    def write_anchor(self, layer: int, anchor: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The anchor-write path of a prefill: ``k, v: [n, Hkv, D]`` of layer ``layer`` for all
        ``n`` tokens of a reserved anchor. Refused once a sequence shares the anchor (its pages
        are then read-only)."""
        layer, a = self._layer(layer), self._anchor(anchor)
        if a.refcount:
            raise ValueError(f"anchor {anchor} is shared by {a.refcount} sequence(s); its pages are read-only")
        n = self._check_kv(k, v, leading=None)
        if n != a.length:
            raise ValueError(f"k/v hold {n} tokens but anchor {anchor} has {a.length}")
        self._store_layer(layer, self._slots(a.blocks, 0, n), k, v)
        a.written.add(layer)

    def anchor_complete(self, anchor: int) -> bool:
        """Every layer of the anchor is written (sequences may share it; a commit may hash it)."""
        return len(self._anchor(anchor).written) == self.num_layers

    def anchor_prefill_args(self, anchor: int) -> KernelArgs:
        """Kernel arguments of the anchor's own prefill: its tokens as one sequence without
        anchors, every token a query (causal over the anchor)."""
        a = self._anchor(anchor)

        def dev(x) -> torch.Tensor:
            return self._to_device(torch.as_tensor(x, dtype=torch.int32))

        return KernelArgs(block_table=dev([a.blocks]), seq_lens=dev([a.length]),
                          query_start_loc=dev([0, a.length]), anchor_block_table=dev([[0]]),
                          anchor_lens=dev([0]))

    def anchor_pages(self, anchor: int) -> list[PageRef]:
        a = self._anchor(anchor)
        S = self.block_size
        return [PageRef("anchor", a.id, i, b, min(S, a.length - i * S)) for i, b in enumerate(a.blocks)]

    def add_sequence(self, anchor: int | None = None) -> int:
        """A new empty sequence, optionally attending to shared anchor ``anchor``; returns its id."""
        if anchor is not None:
            a = self._anchor(anchor)
            if not self.anchor_complete(anchor):
                missing = sorted(set(range(self.num_layers)) - a.written)
                raise ValueError(f"anchor {anchor} has no K/V yet for layers {missing} (write_anchor)")
            a.refcount += 1
        seq = Sequence(self._next_seq, anchor=anchor)
        self.sequences[seq.id] = seq
        self._next_seq += 1
        return seq.id

    def free_sequence(self, seq: int) -> None:
        """Return the sequence's own pages to the pool (its anchor's pages stay pinned)."""
        s = self._seq(seq)
        self.allocator.free(s.blocks)
        self._repoison(s.blocks)
        if s.anchor is not None:
            self.anchors[s.anchor].refcount -= 1
        del self.sequences[seq]
        self._writable = None

    def truncate(self, seq: int, length: int) -> None:
        """Drop tokens ``length..`` of ``seq`` (frees pages past the new end)."""
        s = self._seq(seq)
        if not isinstance(length, int) or not 0 <= length <= s.length:
            raise ValueError(f"length must be an int in [0, {s.length}], got {length!r}")
        keep = -(-length // self.block_size)
        self.allocator.free(s.blocks[keep:])
        self._repoison(s.blocks[keep:])
        s.epoch += 1
        self._writable = None
        s.set_blocks(s.blocks[:keep])
        s.length = length
        self._sealed = [p for p in self._sealed if not (p.kind == "context" and p.owner == seq
                                                        and p.index >= length // self.block_size)]

    # ------------------------------------------------------------------ writing

    def extend(self, seqs: list[int], counts: list[int], *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve ``counts[i]`` new slots at the end of sequence ``seqs[i]``.

        Returns ``slots [sum(counts)] int64`` on the cache device, in packed order (sequence by
        sequence), to pass to :meth:`write`. Pages that become full are recorded as sealed.
        With ``out`` (a 1-D int64 tensor on the cache device, at least ``sum(counts)`` long: the
        static slot buffer of a CUDA graph), the slots are copied into ``out[:n]``, the entries
        past them point at the cache's scratch page (:meth:`scratch_slot`), and ``out`` is
        returned. On an error (:class:`CacheFullError` included) nothing is changed.
        """
        if out is not None:
            if (not isinstance(out, torch.Tensor) or out.dtype != torch.int64 or out.dim() != 1
                    or out.device != self.device or out.numel() < sum(counts)):
                raise ValueError(f"out must be a 1-D int64 tensor on {self.device} with at least "
                                 f"sum(counts) = {sum(counts)} entries")
            self.scratch_slot()
        if len(seqs) != len(counts):
            raise ValueError(f"seqs and counts must have the same length, got {len(seqs)} and {len(counts)}")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs must not repeat a sequence, got {seqs}")
        S = self.block_size
        need = 0
        for sid, c in zip(seqs, counts, strict=True):
            if not isinstance(c, int) or c < 0:
                raise ValueError(f"counts must be non-negative ints, got {c!r}")
            s = self._seq(sid)
            need += -(-(s.length + c) // S) - len(s.blocks)
        if need > self.allocator.num_free:
            raise CacheFullError(f"need {need} free pages, only {self.allocator.num_free} left")
        parts = []
        for sid, c in zip(seqs, counts, strict=True):
            s = self.sequences[sid]
            start = s.length
            s.set_blocks(s.blocks + self.allocator.allocate(-(-(start + c) // S) - len(s.blocks)))
            s.length = start + c
            parts.append(self._slots(s.blocks, start, c, as_tensor=False))
            for i in range(start // S, s.length // S):  # pages whose last slot is now handed out
                self._sealed.append(PageRef("context", sid, i, s.blocks[i], S))
        flat = [x for p in parts for x in p]
        if out is None:
            self._writable = self._to_device(torch.tensor(flat, dtype=torch.int64))
        else:
            host = torch.full((out.numel(),), self.scratch_slot(), dtype=torch.int64)
            host[:len(flat)] = torch.tensor(flat, dtype=torch.int64)
            out.copy_(self._to_device(host), non_blocking=True)
            self._writable = out
        return self._writable

    def scratch_slot(self) -> int:
        """First slot of the scratch page: one pinned page that no sequence or anchor owns or
        reads, written by the padded rows of a fixed-shape (graph-captured) step. Allocated on
        first use."""
        if self._scratch is None:
            self._scratch = self.allocator.allocate(1)[0]
            self.allocator.pin([self._scratch])
        return self._scratch * self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v: [T, Hkv, D]`` of layer ``layer`` at ``slots [T]``.

        ``slots`` must be the tensor returned by the latest :meth:`extend` (the slots the writing
        sequences own now): any other tensor is refused, so stale slots of a freed or truncated
        sequence and pinned anchor pages can never be overwritten (anchors are written through
        :meth:`write_anchor`). The check is an identity test: no host synchronization.
        """
        layer = self._layer(layer)
        n = self._check_kv(k, v, leading=None)
        self._check_slots(slots, n)
        if slots is not self._writable:
            raise ValueError("slots must be the tensor returned by the latest extend() of this cache "
                             "(slots the writing sequences own); anchors are written with write_anchor()")
        self._store_layer(layer, slots, k, v)

    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append ``k, v: [L, n, Hkv, D]`` (all layers) to ``seq``; returns the slots ``[n]``."""
        n = self._check_kv(k, v, leading=self.num_layers)
        slots = self.extend([seq], [n])
        self._write_all_layers(slots, k, v)
        return slots

    def complete_pages(self, seq: int) -> list[PageRef]:
        """Every full page of ``seq`` now (sealed or not yet taken), in token order."""
        s = self._seq(seq)
        return [PageRef("context", s.id, i, s.blocks[i], self.block_size)
                for i in range(s.length // self.block_size)]

    def take_sealed(self) -> list[PageRef]:
        """Context pages sealed since the previous call (in sealing order); resets the list."""
        sealed, self._sealed = self._sealed, []
        return [p for p in sealed if p.owner in self.sequences]

    # ------------------------------------------------------------------ kernel arguments

    def kernel_args(self, seqs: list[int], query_lens: list[int] | None = None) -> KernelArgs:
        """Arguments of ``paged_anchor_attention`` for ``seqs`` whose last ``query_lens[i]`` tokens
        (default 1: decode) are the new query tokens."""
        if not seqs:
            raise ValueError("seqs must name at least one sequence")
        query_lens = [1] * len(seqs) if query_lens is None else list(query_lens)
        if len(query_lens) != len(seqs):
            raise ValueError(f"query_lens must have {len(seqs)} entries, got {len(query_lens)}")
        ss = [self._seq(s) for s in seqs]
        for s, q in zip(ss, query_lens, strict=True):
            if not isinstance(q, int) or not 0 <= q <= s.length:
                raise ValueError(f"query_lens entry {q!r} for sequence {s.id} must be in [0, {s.length}]")
        anchors = [self.anchors[s.anchor] if s.anchor is not None else None for s in ss]
        width = max(1, max(len(s.blocks) for s in ss))
        awidth = max(1, max(len(a.blocks) if a else 0 for a in anchors))
        table = torch.zeros((len(ss), width), dtype=torch.int32)
        for i, s in enumerate(ss):
            table[i, : len(s.blocks)] = s.table[: len(s.blocks)]
        atable = [(a.blocks if a else []) + [0] * (awidth - (len(a.blocks) if a else 0)) for a in anchors]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)

        def dev(x) -> torch.Tensor:
            return self._to_device(torch.as_tensor(x, dtype=torch.int32))

        return KernelArgs(
            block_table=dev(table), seq_lens=dev([s.length for s in ss]), query_start_loc=dev(starts),
            anchor_block_table=dev(atable), anchor_lens=dev([a.length if a else 0 for a in anchors]),
        )

    def anchor_groups(self, seqs: list[int]) -> torch.Tensor:
        """``anchor_groups`` argument of ``paged_anchor_attention`` for the batch ``seqs`` (in
        :meth:`kernel_args` order): one row per anchor shared by at least two of them, listing
        their batch positions, -1 padded; int32 ``[G, max group size]`` on the cache device
        (``[0, 1]`` when no anchor is shared)."""
        members: dict[int, list[int]] = {}
        for i, s in enumerate(self._seq(s) for s in seqs):
            if s.anchor is not None:
                members.setdefault(s.anchor, []).append(i)
        rows = [m for m in members.values() if len(m) > 1]
        width = max((len(m) for m in rows), default=1)
        table = torch.tensor([m + [-1] * (width - len(m)) for m in rows], dtype=torch.int32).reshape(-1, width)
        return self._to_device(table)

    # ------------------------------------------------------------------ internals

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        # Through pinned memory: a copy from pageable memory may wait for the stream, which would
        # stop the host from running ahead of the GPU in a decode loop.
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _repoison(self, blocks: list[int]) -> None:
        if self.poison and blocks:
            idx = torch.tensor(blocks, device=self.device)
            self.k.index_fill_(1, idx, float("nan"))
            self.v.index_fill_(1, idx, float("nan"))

    def _slots(self, blocks: list[int], start: int, n: int, as_tensor: bool = True):
        S = self.block_size
        flat = [blocks[t // S] * S + t % S for t in range(start, start + n)]
        return self._to_device(torch.tensor(flat, dtype=torch.int64)) if as_tensor else flat

    def _store_layer(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v: [T, Hkv, D]`` into layer ``layer`` at the flat ``slots [T]``: one indexed write
        per tensor (the pool's layer viewed as ``[N * S, Hkv, D]``; an ``"hdn"`` V pool, whose
        tokens are not rows, by page and offset)."""
        shape = (self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        self.k[layer].view(shape).index_copy_(0, slots, k.to(self.dtype))
        if self.v_layout == "nhd":
            self.v[layer].view(shape).index_copy_(0, slots, v.to(self.dtype))
        else:
            self.v[layer][slots // self.block_size, slots % self.block_size] = v.to(self.dtype)

    def _write_all_layers(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # One indexed write per tensor for all layers: pool viewed as [L, N*S, Hkv, D].
        shape = (self.num_layers, self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        self.k.view(shape)[:, slots] = k.to(self.dtype)
        if self.v_layout == "nhd":
            self.v.view(shape)[:, slots] = v.to(self.dtype)
        else:
            self.v[:, slots // self.block_size, slots % self.block_size] = v.to(self.dtype)

    def _check_kv(self, k, v, leading: int | None) -> int:
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            want = (self.num_kv_heads, self.head_dim)
            ndim = 3 if leading is None else 4
            if x.dim() != ndim or tuple(x.shape[-2:]) != want or (leading is not None and x.shape[0] != leading):
                lead = "[T, " if leading is None else f"[{leading}, n, "
                raise ValueError(f"{name} must have shape {lead}{want[0]}, {want[1]}], got {tuple(x.shape)}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device} but the cache is on {self.device}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        return k.shape[-3]

    def _check_slots(self, slots, n: int) -> None:
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.dim() != 1:
            raise TypeError("slots must be a 1-D int64 tensor (from PagedKVCache.extend)")
        if slots.numel() != n:
            raise ValueError(f"slots has {slots.numel()} entries but k/v hold {n} tokens")
        if slots.device != self.device:
            raise ValueError(f"slots is on {slots.device} but the cache is on {self.device}")

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _seq(self, seq: int) -> Sequence:
        if seq not in self.sequences:
            raise ValueError(f"unknown sequence id {seq!r}")
        return self.sequences[seq]

    def _anchor(self, anchor: int) -> Anchor:
        if anchor not in self.anchors:
            raise ValueError(f"unknown anchor id {anchor!r}")
        return self.anchors[anchor]
