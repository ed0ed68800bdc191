"""Argument checks shared by every attention entry point (docs/DESIGN.md,
"Kernel arguments"; bad input is an error naming the argument).

Checks come in two tiers. :func:`check_shapes` looks only at metadata (shapes, dtypes, devices,
strides) and never synchronizes with the GPU, so it also runs under CUDA-graph capture.
:func:`check_values` reads the index tensors (block ids inside the pool, lengths inside their
tables, ``seq_lens >= q_len``, tensor ``k_scale`` / ``v_scale`` finite and positive); that costs
a host synchronization and is skipped by ``validate=False``. Every failure is a ``ValueError`` or
``TypeError`` naming the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn,)


@dataclass(frozen=True)
class AttentionShapes:
    """Sizes of one call: T query tokens, B sequences, Hq/Hkv heads of dim D, a pool of
    ``num_blocks`` pages of ``block_size`` tokens."""

    T: int
    B: int
    Hq: int
    Hkv: int
    D: int
    num_blocks: int
    block_size: int
    max_blocks: int
    max_anchor_blocks: int  # 0 without anchors

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.Hq // self.Hkv


def _tensor(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _int32(name: str, x, ndim: int, shape0: int | None = None) -> torch.Tensor:
    _tensor(name, x, ndim)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if shape0 is not None and x.shape[0] != shape0:
        raise ValueError(f"{name} must have {shape0} rows, got shape {tuple(x.shape)}")
    return x


def _positive_number(name: str, x, what: str) -> None:
    """``x`` must be a finite Python number > 0. A bool is refused (``True`` would silently mean 1)."""
    if isinstance(x, bool) or not isinstance(x, float | int):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be {what}, got {x!r}")


def _scale(name: str, s, device: torch.device, Hkv: int) -> None:
    """Metadata of k_scale / v_scale; a tensor's values are checked by :func:`check_values`."""
    if s is None:
        return
    if not isinstance(s, torch.Tensor):
        _positive_number(name, s, "a finite positive number, a 0-d tensor or a [Hkv] tensor")
        return
    if s.numel() not in (1, Hkv) or s.dim() > 1:
        raise ValueError(f"{name} must be per-tensor (1 element) or per-KV-head [{Hkv}], got shape {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but the KV cache is on {device}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")


def _scale_values(name: str, s) -> None:
    """A tensor scale must be finite and > 0 in every element (NaN, inf, 0 or a negative scale
    would turn the whole output into NaN, inf or zeros without an error)."""
    if not isinstance(s, torch.Tensor):
        return  # Python numbers were checked with the metadata
    flat = s.reshape(-1)
    bad = ~(torch.isfinite(flat) & (flat > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        where = f"{name}[{i}]" if s.dim() else name
        raise ValueError(f"{name} must be finite and positive, got {where} = {float(flat[i])}")


def check_shapes(
    q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
    anchor_block_table=None, anchor_lens=None, *, softmax_scale=None, k_scale=None,
    v_scale=None, sliding_window=None, logit_softcap=None,
    q_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), kv_dtypes=KV_DTYPES,
) -> AttentionShapes:
    """Metadata checks only (no host synchronization). Returns the call's sizes.

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_table: [B, max_blocks]
    int32; seq_lens: [B] int32; query_start_loc: [B+1] int32; anchor_block_table:
    [B, max_anchor_blocks] int32 and anchor_lens: [B] int32, both or neither.
    """
    _tensor("q", q, 3)
    _tensor("k_cache", k_cache, 4)
    _tensor("v_cache", v_cache, 4)
    if q.dtype not in q_dtypes:
        raise TypeError(f"q must have dtype in {q_dtypes}, got {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype not in kv_dtypes:
            raise TypeError(f"{name} must have dtype in {kv_dtypes}, got {cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache dtype {v_cache.dtype} differs from k_cache {k_cache.dtype}")
    T, Hq, D = q.shape
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache head dim {Dk} differs from q head dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k_cache heads ({Hkv})")
    if num_blocks == 0 or block_size == 0:
        raise ValueError(f"k_cache must hold at least one block of one token, got shape {tuple(k_cache.shape)}")
    _int32("block_table", block_table, 2)
    B = block_table.shape[0]
    _int32("seq_lens", seq_lens, 1, B)
    _int32("query_start_loc", query_start_loc, 1, B + 1)
    if (anchor_block_table is None) != (anchor_lens is None):
        raise ValueError("anchor_block_table and anchor_lens must be given together")
    max_anchor_blocks = 0
    if anchor_block_table is not None:
        _int32("anchor_block_table", anchor_block_table, 2, B)
        _int32("anchor_lens", anchor_lens, 1, B)
        max_anchor_blocks = anchor_block_table.shape[1]
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": block_table,
             "seq_lens": seq_lens, "query_start_loc": query_start_loc,
             "anchor_block_table": anchor_block_table, "anchor_lens": anchor_lens}
    for name, x in named.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    _scale("k_scale", k_scale, k_cache.device, Hkv)
    _scale("v_scale", v_scale, k_cache.device, Hkv)
    if softmax_scale is not None:
        _positive_number("softmax_scale", softmax_scale, "a finite positive number or None")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window must be a positive int (tokens) or None, got "
                            f"{type(sliding_window).__name__} {sliding_window!r}")
        if sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int (tokens) or None, got {sliding_window!r}")
    if logit_softcap is not None:
        _positive_number("logit_softcap", logit_softcap, "a finite positive number or None")
    return AttentionShapes(T, B, Hq, Hkv, D, num_blocks, block_size, block_table.shape[1], max_anchor_blocks)


def _blocks_in_pool(name: str, table: torch.Tensor, lens: torch.Tensor, shapes: AttentionShapes) -> None:
    used = (lens.long() + shapes.block_size - 1) // shapes.block_size  # blocks each row needs
    cols = torch.arange(table.shape[1], device=table.device)
    live = cols[None, :] < used[:, None]
    bad = live & ((table < 0) | (table >= shapes.num_blocks))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{b}, {j}] = {int(table[b, j])} is outside the pool of {shapes.num_blocks} blocks"
        )


def check_values(
    shapes: AttentionShapes, block_table, seq_lens, query_start_loc,
    anchor_block_table=None, anchor_lens=None, *, k_scale=None, v_scale=None,
) -> None:
    """Checks that read the index tensors and tensor scales (host synchronizations); run after
    :func:`check_shapes` on the same arguments."""
    qsl = query_start_loc
    if int(qsl[0]) != 0 or int(qsl[-1]) != shapes.T:
        raise ValueError(f"query_start_loc must start at 0 and end at T={shapes.T}, got {qsl.tolist()}")
    q_lens = qsl[1:] - qsl[:-1]
    if bool((q_lens < 0).any()):
        raise ValueError(f"query_start_loc must be non-decreasing, got {qsl.tolist()}")
    if bool((seq_lens < q_lens).any()):
        b = int((seq_lens < q_lens).nonzero()[0])
        raise ValueError(f"seq_lens[{b}] = {int(seq_lens[b])} is smaller than its query count {int(q_lens[b])}")
    capacity = shapes.max_blocks * shapes.block_size
    if bool((seq_lens > capacity).any()):
        b = int((seq_lens > capacity).nonzero()[0])
        raise ValueError(f"seq_lens[{b}] = {int(seq_lens[b])} exceeds block_table capacity {capacity}")
    _blocks_in_pool("block_table", block_table, seq_lens, shapes)
    if anchor_block_table is not None:
        capacity = shapes.max_anchor_blocks * shapes.block_size
        if bool(((anchor_lens < 0) | (anchor_lens > capacity)).any()):
            raise ValueError(f"anchor_lens must lie in [0, {capacity}], got {anchor_lens.tolist()}")
        _blocks_in_pool("anchor_block_table", anchor_block_table, anchor_lens, shapes)
    _scale_values("k_scale", k_scale)
    _scale_values("v_scale", v_scale)
