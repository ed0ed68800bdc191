"""Attention of many query rows against ONE shared paged prefix, read once per tile of rows (the
first level of cascade attention: FlashInfer's MultiLevelCascadeAttentionWrapper, Hydragen).

:func:`shared_prefix_attention` takes the query tokens of every sequence that shares a prefix
(decode tokens, prefill chunks, any mix), and attends them to the prefix's pages without a causal
mask (every query sees every prefix token), returning the output and its log-sum-exp so that the
caller merges it with the attention over each sequence's own keys (:func:`fieldprint.attention.
baselines.merge_states`).

Grid: ``(row tiles, KV heads)``. The rows of KV head ``h`` are the ``T x GROUP`` pairs (token,
query head of ``h``'s GQA group), flattened token-major; a program takes ``BLOCK_M`` consecutive
rows, so the queries of many tokens (of many sequences) share one tile, as Hydragen batches them.
It streams the prefix in tiles of ``TILE_N`` tokens through one online softmax
(:func:`fieldprint.attention.kernel._attend_tile`, the paged kernel's own step: the same page
gather, fp8 handling and ``tl.dot`` products), so each prefix tile is loaded from memory once per
``BLOCK_M`` query rows instead of once per sequence. Only the last, partial tile is masked.

Row independence: a row's result depends only on its own query, the prefix and the tile sizes
(the score row, its max and sum, and its output row never mix rows), never on which other rows
share its tile or where in the tile it sits; tile sizes depend only on the head dim
(:func:`prefix_config`), never on the number of rows.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fieldprint.attention.inputs import _positive_number, _scale, _scale_values
from fieldprint.attention.kernel import _attend_tile, _dot_fp16, _e4m3_asm, _kv_scale, _scale_arg

_Q_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _shared_prefix_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, table_ptr,
    k_scale_ptr, v_scale_ptr, k_scale_val, v_scale_val, sm_scale,
    n_rows, prefix_len, num_q_heads,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
    TILE_N: tl.constexpr, KS_MODE: tl.constexpr, VS_MODE: tl.constexpr, DOT_FP16: tl.constexpr,
    E4M3_ASM: tl.constexpr,
):
    """q_ptr: [T, Hq, D] (strides stride_qt, stride_qh, 1); k_ptr, v_ptr: [num_blocks, BS, Hkv, D]
    (strides stride_kb / stride_vb, stride_ks / stride_vs, stride_kh / stride_vh, 1);
    out_ptr: [T, Hq, D] contiguous; lse_ptr: [T, Hq] fp32 contiguous, natural log;
    table_ptr: [cdiv(prefix_len, BS)] int32 page ids; k_scale_ptr, v_scale_ptr: [1] or [Hkv] fp32
    (read per KS_MODE / VS_MODE: 0 = the scalar argument, 1 = one element, 2 = per KV head).
    ``n_rows = T * GROUP``."""
    kvh = tl.program_id(1)
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
    # The non-causal step ignores positions and the window: placeholders.
    for t in range(0, full_tiles):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, t, prefix_len, offs_m, 0, k_head, v_head,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, 1.0, 1.0, offs_n, offs_d,
            BS, TILE_N, False, False, False, False, E4M3_ASM)
    for t in range(full_tiles, tl.cdiv(prefix_len, TILE_N)):  # the partial last tile, if any
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, t, prefix_len, offs_m, 0, k_head, v_head,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, 1.0, 1.0, offs_n, offs_d,
            BS, TILE_N, True, False, False, False, E4M3_ASM)

    seen = l_i > 0.0  # false only for an empty prefix: out 0, lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * (vs / l_safe)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row_hd = tok * num_q_heads + head  # [T, Hq] index of each row
    tl.store(out_ptr + row_hd[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + row_hd, lse, mask=row_ok)


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
                            k_scale=None, v_scale=None, validate=True, config=None):
    """Every query row attends to the first ``prefix_len`` tokens of one paged prefix (no mask).

    q: [T, Hq, D] fp16/bf16 (any tokens of any sequences); k_cache, v_cache:
    [num_blocks, block_size, Hkv, D] of q's dtype or float8_e4m3fn (with k_scale / v_scale: float,
    1-element or [Hkv] tensor); prefix_block_table: [NB] int32 page ids, the first
    ``ceil(prefix_len / block_size)`` of them read; prefix_len: int (any, not block-aligned; 0
    gives out 0 and lse -inf). ``validate=False`` skips the checks that read tensors (no host
    synchronization, for CUDA-graph capture). ``config``: overrides of :func:`prefix_config`.
    Returns out [T, Hq, D] in q's dtype and lse [T, Hq] float32 (natural log).
    """
    _check(q, k_cache, v_cache, prefix_block_table, prefix_len, softmax_scale, k_scale, v_scale)
    cfg = prefix_config(q.shape[2], **(config or {}))
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
    ks_t, ks_f = _scale_arg(k_scale)
    vs_t, vs_f = _scale_arg(v_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    grid = (triton.cdiv(T * group, cfg["block_m"]), Hkv)
    _shared_prefix_kernel[grid](
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, out_ptr=out, lse_ptr=lse, table_ptr=prefix_block_table,
        k_scale_ptr=ks_t if ks_t is not None else lse, v_scale_ptr=vs_t if vs_t is not None else lse,
        k_scale_val=ks_f, v_scale_val=vs_f, sm_scale=scale,
        n_rows=T * group, prefix_len=prefix_len, num_q_heads=Hq,
        stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        GROUP=group, BLOCK_M=cfg["block_m"], HEAD_DIM=D, BS=BS, TILE_N=cfg["tile_n"],
        KS_MODE=0 if ks_t is None else (2 if ks_t.numel() > 1 else 1),
        VS_MODE=0 if vs_t is None else (2 if vs_t.numel() > 1 else 1),
        DOT_FP16=_dot_fp16(q.dtype, k_cache.dtype), E4M3_ASM=_e4m3_asm(k_cache.dtype, q.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse
