"""Fixed-shape decode steps, replayed from CUDA graphs as serving engines run them.

    decoder = GraphDecoder(model, cache, max_batch=64, max_blocks=256)
    next_tokens, slots = decoder.step(seqs, tokens)   # tokens: [B] int64 on the cache's device

One decode token per sequence through :meth:`fieldprint.model.Transformer.forward_paged` with the
fused kernel (``validate=False``: no host synchronization). Every tensor the step reads lives in
static buffers of a batch-size *bucket* (the smallest of ``buckets`` >= B), so that the step can
be captured once per bucket and replayed. Per step the host only

1. grows the sequences (:meth:`PagedKVCache.extend` into the bucket's static slot buffer),
2. updates positions, ``seq_lens`` and the block tables of rows whose sequence changed pages in a
   host int32 buffer, and copies it to the device in one transfer (pinned, double-buffered),
3. replays the bucket's graph (or, with ``graphs=False``, runs the same code eagerly: the CPU
   path of the tests).

Rows past B (padding up to the bucket) attend to and write into the cache's scratch page
(:meth:`PagedKVCache.scratch_slot`), which no sequence reads. The next token is the greedy argmax,
computed inside the graph; ``sync=True`` also copies it to the host every step, the host
synchronization that sampling in a real server has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fieldprint.cache import KernelArgs, PagedKVCache
from fieldprint.model import PagedStep, Transformer


@dataclass
class _Bucket:
    """Static buffers of one batch size ``b``; ``meta`` [4b + 1 + b*W + b*AW] int32 holds
    positions, seq_lens, query_start_loc, anchor_lens, block table [b, W], anchor table [b, AW].

    ``host`` is the same layout on the host, updated in place each step (a table row is
    rewritten only when its sequence changed pages); ``staging`` are the pinned copies the
    transfer reads, two on a GPU so that the host fills one while the other's copy may still be
    in flight (``copied`` records when each transfer is done)."""

    size: int
    tokens: torch.Tensor  # [b] int64
    slots: torch.Tensor  # [b] int64
    meta: torch.Tensor  # int32, layout above
    args: KernelArgs  # views into meta
    positions: torch.Tensor  # [b] int32 view into meta
    host: np.ndarray  # int32, meta's layout
    staging: list[torch.Tensor]
    copied: list[torch.cuda.Event | None]
    rows: list[tuple[int, int, int] | None]  # per row: (sequence, its epoch, pages written)
    turn: int = 0
    next_tokens: torch.Tensor | None = None  # [b] int64, written by the step
    graph: torch.cuda.CUDAGraph | None = None


class GraphDecoder:
    """Greedy decode steps of ``model`` over ``cache`` at fixed shapes (see the module doc).

    max_blocks / max_anchor_blocks: block-table widths (the longest sequence / anchor in pages).
    buckets: the batch sizes a step is padded to (default powers of two up to ``max_batch``).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, *, max_batch: int, max_blocks: int,
                 max_anchor_blocks: int = 1, buckets: list[int] | None = None, graphs: bool | None = None,
                 sync: bool = False) -> None:
        for name, val in (("max_batch", max_batch), ("max_blocks", max_blocks),
                          ("max_anchor_blocks", max_anchor_blocks)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if buckets is None:
            buckets = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]
        if not buckets or sorted(set(buckets)) != list(buckets) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive batch sizes, got {buckets!r}")
        self.graphs = cache.device.type == "cuda" if graphs is None else graphs
        if self.graphs and cache.device.type != "cuda":
            raise ValueError("graphs=True needs a CUDA cache")
        self.model, self.cache, self.sync = model, cache, sync
        self.width, self.anchor_width = max_blocks, max_anchor_blocks
        self.buckets = {b: self._bucket(b) for b in buckets}
        self._pool = None  # one memory pool shared by every bucket's graph

    def step(self, seqs: list[int], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``tokens [B] int64`` for each of ``seqs``; returns (greedy next tokens [B],
        slots [B] where their K/V went: views of the bucket's static buffers, valid until the
        next step of that bucket)."""
        B = len(seqs)
        fits = [b for b in self.buckets if b >= B]
        if not fits or B == 0:
            raise ValueError(f"a step needs 1..{max(self.buckets)} sequences, got {B}")
        if tokens.shape != (B,) or tokens.dtype != torch.int64 or tokens.device != self.cache.device:
            raise ValueError(f"tokens must be [{B}] int64 on {self.cache.device}, got "
                             f"{tuple(tokens.shape)} {tokens.dtype} on {tokens.device}")
        bucket = self.buckets[fits[0]]
        self._check_fits(seqs)
        self.cache.extend(seqs, [1] * B, out=bucket.slots)
        self._update_host(bucket, seqs)
        self._transfer(bucket)
        bucket.tokens[:B].copy_(tokens)
        if not self.graphs:
            self._forward(bucket)
        else:
            if bucket.graph is None:
                self._capture(bucket)
            bucket.graph.replay()
        if self.sync:
            bucket.next_tokens[:B].cpu()
        return bucket.next_tokens[:B], bucket.slots[:B]

    # ------------------------------------------------------------------ internals

    def _bucket(self, b: int) -> _Bucket:
        dev, W, AW = self.cache.device, self.width, self.anchor_width
        n = 4 * b + 1 + b * W + b * AW
        meta = torch.zeros(n, dtype=torch.int32, device=dev)
        pos, lens, qsl, alens, rest = meta.split([b, b, b + 1, b, b * (W + AW)])
        table, atable = rest.split([b * W, b * AW])
        args = KernelArgs(block_table=table.view(b, W), seq_lens=lens, query_start_loc=qsl,
                          anchor_block_table=atable.view(b, AW), anchor_lens=alens)
        host = np.zeros(n, dtype=np.int32)
        # every row starts padded: one token in the scratch page, no anchor
        host[b:2 * b] = 1
        host[2 * b:3 * b + 1] = np.arange(b + 1)  # query_start_loc: one query per row, always
        host[4 * b + 1:4 * b + 1 + b * W] = self.cache.scratch_slot() // self.cache.block_size
        cuda = dev.type == "cuda"
        staging = [torch.zeros(n, dtype=torch.int32, pin_memory=cuda) for _ in range(2 if cuda else 1)]
        return _Bucket(b, torch.zeros(b, dtype=torch.int64, device=dev),
                       torch.zeros(b, dtype=torch.int64, device=dev), meta, args, pos,
                       host, staging, [None] * len(staging), [None] * b)

    def _check_fits(self, seqs: list[int]) -> None:
        """Every table of the step fits the static widths (checked before anything changes)."""
        S = self.cache.block_size
        for sid in seqs:
            seq = self.cache.sequences.get(sid)
            if seq is None:
                raise ValueError(f"unknown sequence id {sid!r}")
            if -(-(seq.length + 1) // S) > self.width:
                raise ValueError(f"sequence {sid} needs {-(-(seq.length + 1) // S)} pages, more than "
                                 f"max_blocks={self.width}")
            if seq.anchor is not None and len(self.cache.anchors[seq.anchor].blocks) > self.anchor_width:
                raise ValueError(f"anchor {seq.anchor} has more pages than max_anchor_blocks={self.anchor_width}")

    def _update_host(self, bucket: _Bucket, seqs: list[int]) -> None:
        """The step's tables (after extend) into ``bucket.host``: positions and lengths of every
        row; a row's block and anchor tables only when its sequence changed (another sequence in
        the row, pages added, or pages taken away); padded rows hold one token in the scratch
        page and no anchor."""
        b, W, AW, cache = bucket.size, self.width, self.anchor_width, self.cache
        h = bucket.host
        pos, lens, alens = h[0:b], h[b:2 * b], h[3 * b + 1:4 * b + 1]
        table = h[4 * b + 1:4 * b + 1 + b * W].reshape(b, W)
        atable = h[4 * b + 1 + b * W:].reshape(b, AW)
        scratch = cache.scratch_slot() // cache.block_size
        for i in range(b):
            seq = cache.sequences[seqs[i]] if i < len(seqs) else None
            if seq is None:  # a padded row
                if bucket.rows[i] is not None:
                    pos[i], lens[i], alens[i] = 0, 1, 0
                    table[i] = scratch
                    bucket.rows[i] = None
                continue
            lens[i] = seq.length
            pos[i] = cache.position(seq.id) - 1  # the token just appended
            known = bucket.rows[i]
            if known is None or known[:2] != (seq.id, seq.epoch):  # another sequence: whole row
                table[i] = scratch
                table[i, :len(seq.blocks)] = seq.blocks
                anchor = cache.anchors[seq.anchor] if seq.anchor is not None else None
                atable[i] = 0
                if anchor is not None:
                    atable[i, :len(anchor.blocks)] = anchor.blocks
                alens[i] = anchor.length if anchor is not None else 0
            elif known[2] != len(seq.blocks):  # pages added since the last step
                table[i, known[2]:len(seq.blocks)] = seq.blocks[known[2]:]
            bucket.rows[i] = (seq.id, seq.epoch, len(seq.blocks))

    def _transfer(self, bucket: _Bucket) -> None:
        """One host-to-device copy of ``bucket.host`` into ``bucket.meta`` (through a pinned
        staging buffer whose previous transfer has finished)."""
        k = bucket.turn
        bucket.turn = (k + 1) % len(bucket.staging)
        if bucket.copied[k] is not None:
            bucket.copied[k].synchronize()  # its last transfer must have read it
        bucket.staging[k].numpy()[:] = bucket.host
        bucket.meta.copy_(bucket.staging[k], non_blocking=True)
        if bucket.meta.is_cuda:
            bucket.copied[k] = torch.cuda.Event()
            bucket.copied[k].record()

    def _forward(self, bucket: _Bucket) -> None:
        step = PagedStep(self.cache, bucket.args,
                         lambda layer, k, v: self.cache.write(layer, bucket.slots, k, v),
                         backend="kernel", validate=False)
        logits = self.model.forward_paged(bucket.tokens, bucket.positions.long(), step)
        next_tokens = logits.argmax(-1)
        if bucket.next_tokens is None:
            bucket.next_tokens = next_tokens
        else:
            bucket.next_tokens.copy_(next_tokens)

    def _capture(self, bucket: _Bucket) -> None:
        # warm up (compiles the kernels, settles the allocator) on a side stream, then capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph, pool=self._pool):
            self._forward(bucket)
        self._pool = bucket.graph.pool()
