"""Random paged-attention inputs for tests and experiments: scrambled block tables, ragged
lengths, anchors in pinned blocks shared between sequences, and poison in every unowned slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    """Arguments of one attention call (docs/DESIGN.md, "Kernel arguments")."""

    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    anchor_block_table: torch.Tensor | None  # [B, max_anchor_blocks] int32
    anchor_lens: torch.Tensor | None  # [B] int32

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens,
                self.query_start_loc, self.anchor_block_table, self.anchor_lens)


def make_case(
    seq_lens: list[int], q_lens: list[int], anchor_lens: list[int] | None, *, heads_q: int,
    heads_kv: int, head_dim: int, block_size: int, dtype=torch.float32, kv_dtype=None, device="cpu",
    shared_anchors: bool = True, poison: float = float("nan"), spare_blocks: int = 3,
    unused_ids: str = "in_pool", extra_cols: int = 0, generator: torch.Generator | None = None,
) -> PagedCase:
    """A random case. Each sequence owns its context blocks (placed at random pool slots); the
    anchor blocks are allocated once and shared by every sequence when ``shared_anchors`` (each
    sequence sees its own ``anchor_lens[b]`` prefix of them), else one set per sequence. Slots past
    a sequence's length and spare blocks hold ``poison``.

    q is in ``dtype``, the caches in ``kv_dtype`` (default ``dtype``). Table entries past a
    sequence's blocks (``extra_cols`` more columns than needed) are random pool blocks with
    ``unused_ids="in_pool"`` (what gather-based baselines can index) or ids past the end of the
    pool with ``"out_of_pool"`` (a kernel that read one would fault or read garbage)."""
    if unused_ids not in ("in_pool", "out_of_pool"):
        raise ValueError(f"unused_ids must be 'in_pool' or 'out_of_pool', got {unused_ids!r}")
    g = generator or torch.Generator().manual_seed(0)
    B = len(seq_lens)
    if len(q_lens) != B or (anchor_lens is not None and len(anchor_lens) != B):
        raise ValueError("seq_lens, q_lens and anchor_lens must have one entry per sequence")

    def nblocks(n: int) -> int:
        return -(-n // block_size)

    ctx_blocks = [nblocks(n) for n in seq_lens]
    a_blocks = [nblocks(n) for n in (anchor_lens or [0] * B)]
    anchor_sets = [max(a_blocks, default=0)] if shared_anchors else a_blocks
    num_blocks = sum(ctx_blocks) + sum(anchor_sets) + spare_blocks
    slots = torch.randperm(num_blocks, generator=g)

    k_cache = torch.full((num_blocks, block_size, heads_kv, head_dim), poison, dtype=torch.float32)
    v_cache = torch.full_like(k_cache, poison)
    taken = 0

    def fill(n_tokens: int) -> list[int]:
        nonlocal taken
        ids = slots[taken:taken + nblocks(n_tokens)].tolist()
        taken += len(ids)
        for i, blk in enumerate(ids):
            n = min(block_size, n_tokens - i * block_size)
            k_cache[blk, :n] = torch.randn(n, heads_kv, head_dim, generator=g)
            v_cache[blk, :n] = torch.randn(n, heads_kv, head_dim, generator=g)
        return ids

    def table(rows: list[list[int]], width: int) -> torch.Tensor:
        # Unused entries: the kernel must never read them.
        shape = (B, max(width, 1) + extra_cols)
        if unused_ids == "in_pool":
            t = torch.randint(0, num_blocks, shape, generator=g, dtype=torch.int32)
        else:
            t = torch.full(shape, num_blocks + 1000, dtype=torch.int32)
        for b, ids in enumerate(rows):
            t[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        return t

    block_table = table([fill(n) for n in seq_lens], max(ctx_blocks, default=1))
    abt = alens = None
    if anchor_lens is not None:
        if shared_anchors:
            shared = fill(max(anchor_lens, default=0))
            rows = [shared[:a] for a in a_blocks]
        else:
            rows = [fill(n) for n in anchor_lens]
        abt = table(rows, max(a_blocks, default=1) + 1)
        alens = torch.tensor(anchor_lens, dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads_q, head_dim, generator=g)
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)

    def to(x):
        return None if x is None else x.to(device)

    kv_dtype = kv_dtype or dtype
    return PagedCase(
        q.to(dtype).to(device), k_cache.to(kv_dtype).to(device), v_cache.to(kv_dtype).to(device),
        to(block_table), torch.tensor(seq_lens, dtype=torch.int32, device=device), to(qsl),
        to(abt), to(alens),
    )
