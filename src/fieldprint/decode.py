"""Fixed-shape decode steps, replayed from CUDA graphs as serving engines run them.

    decoder = GraphDecoder(model, cache, max_batch=64, max_blocks=256)
    next_tokens, slots = decoder.step(seqs, tokens)   # tokens: [B] int64 on the cache's device

One decode token per sequence through :meth:`fieldprint.model.Transformer.forward_paged` with the
fused kernel (``validate=False``: no host synchronization). Every tensor the step reads lives in
static buffers of a batch-size *bucket* (the smallest of ``buckets`` >= B), so that the step can
be captured once per bucket and replayed. Per step the host only

1. grows the sequences (:meth:`PagedKVCache.extend` into the bucket's static slot buffer),
2. packs positions, ``seq_lens``, ``query_start_loc``, ``anchor_lens`` and both block tables into
   one pinned int32 buffer and copies it to the device in one transfer,
3. replays the bucket's graph (or, with ``graphs=False``, runs the same code eagerly: the CPU
   path of the tests).

Rows past B (padding up to the bucket) attend to and write into the cache's scratch page
(:meth:`PagedKVCache.scratch_slot`), which no sequence reads. The next token is the greedy argmax,
computed inside the graph; ``sync=True`` also copies it to the host every step, the host
synchronization that sampling in a real server has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fieldprint.cache import KernelArgs, PagedKVCache
from fieldprint.model import PagedStep, Transformer


@dataclass
class _Bucket:
    """Static buffers of one batch size ``b``; ``meta`` [4b + 1 + b*W + b*AW] int32 holds
    positions, seq_lens, query_start_loc, anchor_lens, block table [b, W], anchor table [b, AW]."""

    size: int
    tokens: torch.Tensor  # [b] int64
    slots: torch.Tensor  # [b] int64
    meta: torch.Tensor  # int32, layout above
    args: KernelArgs  # views into meta
    positions: torch.Tensor  # [b] int32 view into meta
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
        bucket.meta.copy_(self._host_meta(seqs, bucket.size), non_blocking=True)
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
        meta = torch.zeros(4 * b + 1 + b * W + b * AW, dtype=torch.int32, device=dev)
        pos, lens, qsl, alens, rest = meta.split([b, b, b + 1, b, b * (W + AW)])
        table, atable = rest.split([b * W, b * AW])
        args = KernelArgs(block_table=table.view(b, W), seq_lens=lens, query_start_loc=qsl,
                          anchor_block_table=atable.view(b, AW), anchor_lens=alens)
        return _Bucket(b, torch.zeros(b, dtype=torch.int64, device=dev),
                       torch.zeros(b, dtype=torch.int64, device=dev), meta, args, pos)

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

    def _host_meta(self, seqs: list[int], b: int) -> torch.Tensor:
        """The step's tables (after extend) in ``meta``'s layout for bucket size ``b``, as a host
        int32 tensor; padded rows hold one token in the scratch page and no anchor."""
        cache = self.cache
        pos = torch.zeros(b, dtype=torch.int32)
        lens = torch.ones(b, dtype=torch.int32)
        alens = torch.zeros(b, dtype=torch.int32)
        table = torch.full((b, self.width), cache.scratch_slot() // cache.block_size, dtype=torch.int32)
        atable = torch.zeros((b, self.anchor_width), dtype=torch.int32)
        for i, sid in enumerate(seqs):
            seq = cache.sequences[sid]
            lens[i] = seq.length
            pos[i] = cache.position(sid) - 1  # the token just appended
            table[i, :len(seq.blocks)] = seq.table[:len(seq.blocks)]
            if seq.anchor is not None:
                anchor = cache.anchors[seq.anchor]
                atable[i, :len(anchor.blocks)] = torch.tensor(anchor.blocks, dtype=torch.int32)
                alens[i] = anchor.length
        host = torch.cat([pos, lens, torch.arange(b + 1, dtype=torch.int32), alens, table.flatten(),
                          atable.flatten()])
        return host.pin_memory() if cache.device.type == "cuda" else host

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
