"""Attention of many query rows against ONE shared paged prefix, read once per tile of rows (the
first level of cascade attention: FlashInfer's MultiLevelCascadeAttentionWrapper, Hydragen).

:func:`shared_prefix_attention` takes the query tokens of every sequence that shares a prefix
(decode tokens, prefill chunks, any mix), and attends them to the prefix's pages without a causal
mask (every query sees every prefix token), returning the output and its log-sum-exp so that the
caller merges it with the attention over each sequence's own keys (:func:`fieldprint.attention.
baselines.merge_states`).

Grid: ``(row tiles, KV heads, prefix splits)``. The rows of KV head ``h`` are the ``T x GROUP``
pairs (token, query head of ``h``'s GQA group), flattened token-major; a program takes ``BLOCK_M``
consecutive rows, so the queries of many tokens (of many sequences) share one tile, as Hydragen batches them.
It streams the prefix in tiles of ``TILE_N`` tokens through one online softmax
(:func:`fieldprint.attention.kernel._attend_tile`, the paged kernel's own step: the same page
gather, fp8 handling and ``tl.dot`` products), so each prefix tile is loaded from memory once per
``BLOCK_M`` query rows instead of once per sequence. Only the last, partial tile is masked.

Split along the prefix: with few rows (decode: B = 32, Hq = 32, Hkv = 8 gives 128 rows per KV
head, 2 row tiles, 16 programs) the grid would leave most of an H200's 132 SMs idle, so the
prefix is cut into splits of ``split_tokens`` tokens (a multiple of ``TILE_N``; the last split
ragged), one program per (row tile, KV head, split). With one split the program writes its
output directly (the unsplit kernel, bit for bit); otherwise each writes an fp32 partial output
and log-sum-exp and :func:`_merge_splits_kernel` merges them in split-index order in fp32, as
the paged kernel's ``_combine_kernel`` does.

Split rule (:func:`prefix_split_tokens`, shapes only, no host synchronization; owned by
:mod:`fieldprint.attention.kernel`, whose anchor groups cut a shared anchor the same way): aim
for ``SPLIT_TARGET_PROGRAMS`` programs (2 waves of an H200's 132 SMs) per row tile, i.e.
``cdiv(264, Hkv)`` splits, at most ``MAX_PREFIX_SPLITS``, each at least ``MIN_SPLIT_TILES`` KV
tiles long. The rule reads only the prefix length, the number of KV
heads and the KV tile (fixed per head dim), never the number of query rows, and its constants
are fixed (not read from the device), so the split boundaries and the merge order of a row do
not change with the batch or the GPU. At B = 32, Hq = 32, Hkv = 8, 8K prefix, D = 128: 16 splits
of 512 tokens, 256 programs. The price: the partials cost ``T x Hq x splits x D`` fp32 words
written and read again, which grows with the rows while the K/V bytes do not; where the row
tiles alone fill the GPU (long prefill chunks), a caller can pass a longer ``split_tokens``.

Row independence: a row's result depends only on its own query, the prefix, the tile sizes and
the split length (the score row, its max and sum, its output row and its merge never mix rows),
never on which other rows share its tile or where in the tile it sits; tile sizes depend only
on the head dim (:func:`prefix_config`) and the split length only on the prefix length, the KV
heads and the KV tile, never on the number of rows.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fieldprint.attention.inputs import _positive_number, _scale, _scale_values
from fieldprint.attention.kernel import (
    _attend_tile,
    _cdiv,
    _dot_fp16,
    _e4m3_asm,
    _kv_scale,
    _normalize,
    _scale_arg,
    merge_split_partials,
    shared_split_tiles,
)

_Q_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _shared_prefix_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, table_ptr,
    k_scale_ptr, v_scale_ptr, k_scale_val, v_scale_val, sm_scale,
    n_rows, prefix_len, num_q_heads, split_tiles, n_splits,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
    TILE_N: tl.constexpr, KS_MODE: tl.constexpr, VS_MODE: tl.constexpr, DOT_FP16: tl.constexpr,
    E4M3_ASM: tl.constexpr,
):
    """q_ptr: [T, Hq, D] (strides stride_qt, stride_qh, 1); k_ptr, v_ptr: [num_blocks, BS, Hkv, D]
    (strides stride_kb / stride_vb, stride_ks / stride_vs, stride_kh / stride_vh, 1);
    out_ptr: [T, Hq, D] contiguous; lse_ptr: [T, Hq] fp32 contiguous, natural log;
    part_out_ptr: [T, Hq, n_splits, D] fp32, part_lse_ptr: [T, Hq, n_splits] fp32 (log2 units),
    both written only when ``n_splits > 1`` (program ``split`` takes KV tiles ``split *
    split_tiles ..``, the last split ragged; one split writes out and lse directly);
    table_ptr: [cdiv(prefix_len, BS)] int32 page ids; k_scale_ptr, v_scale_ptr: [1] or [Hkv] fp32
    (read per KS_MODE / VS_MODE: 0 = the scalar argument, 1 = one element, 2 = per KV head).
    ``n_rows = T * GROUP``."""
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_rows
    tok = (offs_m // GROUP).to(tl.int64)
    head = kvh * GROUP + offs_m % GROUP
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP16:
        q = q.to(tl.float16)  # fp8 KV: the dots run in fp16 (see the paged kernel)

    ks = _kv_scale(k_scale_val, k_scale_ptr, kvh, KS_MODE)
    vs = _kv_scale(v_scale_val, v_scale_ptr, kvh, VS_MODE)
    qk_scale = sm_scale * ks * 1.4426950408889634  # scores in log2 units
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a masked tile never gives inf - inf
    k_head = kvh.to(tl.int64) * stride_kh
    v_head = kvh.to(tl.int64) * stride_vh
    full_tiles = prefix_len // TILE_N
    t_lo = split * split_tiles
    t_hi = tl.minimum(t_lo + split_tiles, _cdiv(prefix_len, TILE_N))
    # The non-causal step ignores positions and the window: placeholders.
    for t in range(t_lo, tl.minimum(t_hi, full_tiles)):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, t, prefix_len, offs_m, 0, k_head, v_head,
            stride_kb, stride_ks, stride_vb, stride_vs, 1, qk_scale, 1.0, 1.0, offs_n, offs_d,
            BS, TILE_N, False, False, False, False, E4M3_ASM, False)
    for t in range(tl.maximum(t_lo, full_tiles), t_hi):  # the partial last tile, if in this split
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, t, prefix_len, offs_m, 0, k_head, v_head,
            stride_kb, stride_ks, stride_vb, stride_vs, 1, qk_scale, 1.0, 1.0, offs_n, offs_d,
            BS, TILE_N, True, False, False, False, E4M3_ASM, False)

    out, lse2 = _normalize(acc, l_i, m_i, vs)  # an empty prefix (one split): out 0, lse -inf
    row_hd = tok * num_q_heads + head  # [T, Hq] index of each row
    if n_splits == 1:
        tl.store(out_ptr + row_hd[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse_ptr + row_hd, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        part = row_hd * n_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse2, mask=row_ok)


@triton.jit
def _merge_splits_kernel(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, n_splits, HEAD_DIM: tl.constexpr):
    """Merge the ``n_splits`` partials of one row (program ``r`` = token * Hq + head), splits in
    index order, in fp32 (`fieldprint.attention.kernel.merge_split_partials`, as the paged kernel).
    out_ptr: [T, Hq, D] contiguous; lse_ptr: [T, Hq] fp32 (natural log); part_out_ptr:
    [T, Hq, n_splits, D] fp32; part_lse_ptr: [T, Hq, n_splits] fp32 (log2 units). Every split
    holds at least one prefix token, so every partial lse is finite."""
    row = tl.program_id(0).to(tl.int64)
    out, lse2 = merge_split_partials(part_out_ptr, part_lse_ptr, row * n_splits, n_splits, HEAD_DIM)
    tl.store(out_ptr + row * HEAD_DIM + tl.arange(0, HEAD_DIM), out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse2 * 0.6931471805599453)


def prefix_config(head_dim: int, **overrides) -> dict:
    """Tile sizes and launch options (fixed per head dim, never per batch: see the module's row
    independence). 64 query rows x 64-token KV tiles (32 at D = 256), 4 warps, 2 stages.
    Overrides: ``block_m``, ``tile_n`` (powers of two >= 16), ``num_warps``, ``num_stages``."""
    unknown = set(overrides) - {"block_m", "tile_n", "num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}")
    cfg = {"block_m": 64, "tile_n": 32 if head_dim > 128 else 64, "num_warps": 4, "num_stages": 2}
    cfg.update(overrides)
    for key in ("block_m", "tile_n"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"config: {key} must be a power of two >= 16, got {v!r}")
    for key in ("num_warps", "num_stages"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"config: {key} must be a positive int, got {v!r}")
    return cfg


def prefix_split_tokens(prefix_len: int, num_kv_heads: int, tile_n: int) -> int:
    """Default split length in tokens (a multiple of ``tile_n``) for a prefix of ``prefix_len``
    tokens read by ``num_kv_heads`` KV heads in tiles of ``tile_n`` tokens (the module's split
    rule): ``cdiv(SPLIT_TARGET_PROGRAMS, num_kv_heads)`` splits, at most ``MAX_PREFIX_SPLITS``,
    each at least ``MIN_SPLIT_TILES`` tiles. Independent of the number of query rows. A prefix of
    at most ``MIN_SPLIT_TILES`` tiles is one split."""
    return shared_split_tiles(-(-prefix_len // tile_n), num_kv_heads) * tile_n


def _check(q, k_cache, v_cache, prefix_block_table, prefix_len, softmax_scale, k_scale, v_scale):
    """Metadata checks (no host synchronization), each error naming its argument."""
    for name, x, ndim in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                          ("prefix_block_table", prefix_block_table, 1)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if x.numel() and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")
    if q.dtype not in _Q_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise TypeError(f"k_cache dtype {k_cache.dtype} must equal q dtype {q.dtype} (or be float8_e4m3fn)")
    if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache ({v_cache.dtype}, {tuple(v_cache.shape)}) must match k_cache "
                         f"({k_cache.dtype}, {tuple(k_cache.shape)})")
    T, Hq, D = q.shape
    num_blocks, BS, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache head dim {Dk} differs from q head dim {D}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"q head dim must be a power of two in [16, 256], got {D}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k_cache heads ({Hkv})")
    if num_blocks == 0 or BS == 0 or BS & (BS - 1):
        raise ValueError(f"k_cache must hold pages of a power-of-two block size, got shape {tuple(k_cache.shape)}")
    if prefix_block_table.dtype != torch.int32:
        raise TypeError(f"prefix_block_table must be int32, got {prefix_block_table.dtype}")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len must be an int, got {type(prefix_len).__name__} {prefix_len!r}")
    capacity = prefix_block_table.shape[0] * BS
    if not 0 <= prefix_len <= capacity:
        raise ValueError(f"prefix_len must lie in [0, {capacity}] (prefix_block_table holds "
                         f"{prefix_block_table.shape[0]} pages of {BS}), got {prefix_len}")
    if softmax_scale is not None:
        _positive_number("softmax_scale", softmax_scale, "a finite positive number or None")
    _scale("k_scale", k_scale, k_cache.device, Hkv)
    _scale("v_scale", v_scale, k_cache.device, Hkv)


def _split_tiles(split_tokens, prefix_len: int, num_kv_heads: int, tile_n: int) -> int:
    """KV tiles per split: ``split_tokens`` (checked: a positive multiple of ``tile_n``) or the
    default rule, clipped to the prefix's tile count (same splits, int32-sized)."""
    if split_tokens is None:
        split_tokens = prefix_split_tokens(prefix_len, num_kv_heads, tile_n)
    elif (isinstance(split_tokens, bool) or not isinstance(split_tokens, int) or split_tokens <= 0
          or split_tokens % tile_n):
        raise ValueError(f"split_tokens must be None or a positive multiple of the KV tile ({tile_n} "
                         f"tokens), got {split_tokens!r}")
    return min(split_tokens // tile_n, max(1, -(-prefix_len // tile_n)))


def _check_values(q, k_cache, prefix_block_table, prefix_len, k_scale, v_scale) -> None:
    """Checks that read tensors (host synchronizations): page ids inside the pool, scales, and
    |q| <= 65504 when the dots run in fp16."""
    num_blocks, BS = k_cache.shape[:2]
    pages = prefix_block_table[:-(-prefix_len // BS)]
    bad = (pages < 0) | (pages >= num_blocks)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise ValueError(f"prefix_block_table[{j}] = {int(pages[j])} is outside the pool of {num_blocks} blocks")
    _scale_values("k_scale", k_scale)
    _scale_values("v_scale", v_scale)
    if _dot_fp16(q.dtype, k_cache.dtype) and q.dtype == torch.bfloat16 and q.numel():
        if float(q.abs().amax()) > 65504.0:
            raise ValueError("q: with a float8_e4m3fn KV cache the dots run in fp16, so |q| must be "
                             "<= 65504 (scale q down, or use a bf16 cache)")


def shared_prefix_attention(q, k_cache, v_cache, prefix_block_table, prefix_len, *, softmax_scale=None,
                            k_scale=None, v_scale=None, validate=True, config=None, split_tokens=None):
    """Every query row attends to the first ``prefix_len`` tokens of one paged prefix (no mask).

    q: [T, Hq, D] fp16/bf16 (any tokens of any sequences); k_cache, v_cache:
    [num_blocks, block_size, Hkv, D] of q's dtype or float8_e4m3fn (with k_scale / v_scale: float,
    1-element or [Hkv] tensor); prefix_block_table: [NB] int32 page ids, the first
    ``ceil(prefix_len / block_size)`` of them read; prefix_len: int (any, not block-aligned; 0
    gives out 0 and lse -inf). ``validate=False`` skips the checks that read tensors (no host
    synchronization, for CUDA-graph capture). ``config``: overrides of :func:`prefix_config`.
    ``split_tokens``: tokens per prefix split, a multiple of the KV tile (default
    :func:`prefix_split_tokens`; a value >= prefix_len gives one split, no partials, no merge).
    Returns out [T, Hq, D] in q's dtype and lse [T, Hq] float32 (natural log).
    """
    _check(q, k_cache, v_cache, prefix_block_table, prefix_len, softmax_scale, k_scale, v_scale)
    cfg = prefix_config(q.shape[2], **(config or {}))
    split_tiles = _split_tiles(split_tokens, prefix_len, k_cache.shape[2], cfg["tile_n"])
    if validate:
        _check_values(q, k_cache, prefix_block_table, prefix_len, k_scale, v_scale)
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"shared_prefix_attention runs a Triton kernel and needs CUDA tensors (q is on "
                         f"{q.device}); set TRITON_INTERPRET=1 to run it on a CPU (tests)")
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    tile_n = cfg["tile_n"]
    n_splits = max(1, -(-prefix_len // (split_tiles * tile_n)))
    if n_splits > 1:
        part_out = torch.empty(T, Hq, n_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T, Hq, n_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = lse  # never written: one split stores out and lse directly
    ks_t, ks_f = _scale_arg(k_scale)
    vs_t, vs_f = _scale_arg(v_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    grid = (triton.cdiv(T * group, cfg["block_m"]), Hkv, n_splits)
    _shared_prefix_kernel[grid](
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, out_ptr=out, lse_ptr=lse, part_out_ptr=part_out,
        part_lse_ptr=part_lse, table_ptr=prefix_block_table,
        k_scale_ptr=ks_t if ks_t is not None else lse, v_scale_ptr=vs_t if vs_t is not None else lse,
        k_scale_val=ks_f, v_scale_val=vs_f, sm_scale=scale,
        n_rows=T * group, prefix_len=prefix_len, num_q_heads=Hq, split_tiles=split_tiles, n_splits=n_splits,
        stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        GROUP=group, BLOCK_M=cfg["block_m"], HEAD_DIM=D, BS=BS, TILE_N=tile_n,
        KS_MODE=0 if ks_t is None else (2 if ks_t.numel() > 1 else 1),
        VS_MODE=0 if vs_t is None else (2 if vs_t.numel() > 1 else 1),
        DOT_FP16=_dot_fp16(q.dtype, k_cache.dtype), E4M3_ASM=_e4m3_asm(k_cache.dtype, q.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if n_splits > 1:
        _merge_splits_kernel[(T * Hq,)](out, lse, part_out, part_lse, n_splits, HEAD_DIM=D, num_warps=1)
    return out, lse
