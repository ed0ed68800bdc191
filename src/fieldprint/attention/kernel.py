"""Fused paged attention with pinned anchor blocks: the Triton kernel (docs/DESIGN.md,
"Kernel arguments")

One online softmax per query row walks the sequence's anchor pages (``anchor_block_table``,
``anchor_lens`` tokens, all visible) and then its context pages (``block_table``, causal, optionally
a sliding window), so scores never leave registers.

Grid: ``(query tiles, KV heads, KV splits)``.

* A *query tile* holds ``BLOCK_Q`` consecutive new tokens of one sequence times the ``GROUP`` query
  heads that share a KV head (GQA packing: rows = tokens x heads, padded to ``BLOCK_M >= 16``), so
  every K/V byte is loaded once per tile. A tile finds its sequence by a binary search over
  ``query_start_loc`` (tile ``i`` of sequence ``b`` has index ``query_start_loc[b] // BLOCK_Q + b
  + i``); the grid is the shape-only bound ``T // BLOCK_Q + B`` and surplus programs exit.
* KV is walked in tiles of ``TILE_N`` tokens, each gathered through the block table with int64
  offsets (several pages per tile when ``TILE_N > block_size``, part of one page otherwise).
  Anchor tiles come first (their last tile masked by ``anchor_lens``), then context tiles: tiles
  wholly outside the window are skipped, tiles where every row sees every token run unmasked, and
  only the edge tiles (window start, causal diagonal, ``seq_lens``) are masked. Loads past the
  lengths are masked with ``other=0`` so unwritten slots (NaN) never enter the arithmetic.
* Split-KV (decode mode): the sequence's combined tile range (anchor tiles, then context tiles) is
  cut into splits of a fixed ``kv_split_tokens`` (default :data:`KV_SPLIT_TOKENS`). A sequence
  with one split writes its output directly; otherwise each split writes an fp32 partial output
  and log-sum-exp and :func:`_combine_kernel` merges the splits sequentially in index order in
  fp32. Every choice (split count, tile order, merge order) depends only on the sequence's own
  lengths, never on the batch, so a sequence's output bits do not depend on its neighbours.
* Read-once anchor groups (optional ``anchor_groups [G, W]``, decode and prefill): sequences
  that share one anchor are listed in a group row. Extra programs along axis 0 (after the query
  tiles, a shape-only count ``cdiv(T, GROUP_BLOCK_M // GP) + G``) each take ``GROUP_BLOCK_M //
  GP`` query tokens of a group (its members' tokens in row order: one per sequence in decode,
  chunks in prefill) times the ``GP`` heads of one KV head as rows, and one anchor split (axis
  2): every anchor KV tile is gathered once and multiplied with all of those rows
  (``_anchor_group_tile``). ``GROUP_BLOCK_M`` is the group tiles' own row count (default 64: 16
  tokens at GQA 4), separate from the query tiles' ``BLOCK_M`` (16 in decode mode, which would
  hold only 4 such sequences). A grouped sequence's splits are its anchor splits (written by
  the group tiles) followed by its context splits (its own programs), cut separately
  (``_split_plan``): in decode the anchor by the shared-prefix kernel's split rule
  (:func:`shared_split_tiles`: about ``cdiv(264, Hkv)`` splits of at least 8 tiles, since a
  group's anchor is read by few programs and needs their parallelism), the context every
  ``kv_split_tokens``; in prefill one anchor split and one context split. The combine kernel
  merges them in index order as any other splits. With fixed tile shapes (``GROUP_BLOCK_M``,
  ``BLOCK_M``, ``TILE_N``, ``num_warps``: chosen from shapes only, never from the groups) and
  split length, a sequence's bits do not depend on which sequences share its group or tile:
  ``tl.dot`` and the online softmax are row-wise, the anchor split boundaries come from the
  anchor length, the KV heads and the tile only.

* Pipelined decode (opt-in, ``config={"pipelined": True}``): a split's tiles are walked in one
  loop with runtime masks and the next tile's page ids loaded one iteration ahead, which Triton
  multi-buffers (``num_stages - 1`` K/V tiles through cp.async; see
  :func:`_attend_split_one_loop`); same per-tile arithmetic as the default four-loop walk, whose
  compiled code it leaves unchanged.

Mode rule (shape-only, no host synchronization): *decode* when ``T == B`` (one query row per
token, split-KV on), otherwise *prefill* (``BLOCK_Q`` tokens per tile, one split, enough
parallelism from query tiles). Batch invariance holds between calls of the same mode; a token's
low-order bits may differ between a decode call and a prefill call (different tile shapes).

fp8 KV (``float8_e4m3fn``) is loaded as bytes and converted to fp16 in registers (exact: every
e4m3 value is an fp16 value, and Hopper converts e4m3 pairs to fp16 pairs in one instruction
while e4m3 -> bf16 goes through fp32, which made the fp8 kernel compute-bound on the H200); q is
converted to fp16 as well (exact for |q| <= 65504, checked when ``validate``), so the dots run in
fp16 with fp32 accumulation. V tiles are converted with inline PTX in their load layout (see
``_e4m3_to_fp16``; a plain cast read them from shared memory one byte at a time). ``k_scale`` is
folded into the score scale and ``v_scale`` into the final normalization, per tensor or per KV head.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from fieldprint.attention.inputs import AttentionShapes, check_shapes, check_values
from fieldprint.page_layout import check_layout, layout_of

KV_SPLIT_TOKENS = 2048
"""Default split length (tokens of the combined anchor + context range) of split-KV decode."""

# The shared-prefix split rule: the split of an anchor (prefix) that many query rows read at once,
# in the shared-prefix kernel (fieldprint.attention.prefix) and in the decode anchor groups.
SPLIT_TARGET_PROGRAMS = 264
"""Programs per row tile the split rule aims for: 2 waves of an H200's 132 SMs (a fixed constant,
not the device's SM count, so the split boundaries are the same on every GPU)."""
MIN_SPLIT_TILES = 8
"""Fewest KV tiles in a split: below it the fp32 partial (a [BLOCK_M, D] store and its merge)
costs a sizeable fraction of the split's K/V loads."""
MAX_PREFIX_SPLITS = 64
"""Most splits the rule picks (bounds the partial buffers to 64 fp32 copies of the output)."""
_MIN_SPLIT_TILES: tl.constexpr = tl.constexpr(MIN_SPLIT_TILES)


def shared_splits_wanted(num_kv_heads: int) -> int:
    """Splits the shared-prefix rule aims for: ``cdiv(SPLIT_TARGET_PROGRAMS, num_kv_heads)``, at
    most ``MAX_PREFIX_SPLITS``."""
    return min(-(-SPLIT_TARGET_PROGRAMS // num_kv_heads), MAX_PREFIX_SPLITS)


def shared_split_tiles(n_tiles: int, num_kv_heads: int) -> int:
    """KV tiles per split of a shared prefix of ``n_tiles`` tiles (the rule, on the host):
    ``shared_splits_wanted`` splits, each at least ``MIN_SPLIT_TILES`` tiles. Its device twin
    :func:`_shared_split_tiles` computes the same (tests check them against each other)."""
    return max(MIN_SPLIT_TILES, -(-n_tiles // shared_splits_wanted(num_kv_heads)))


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_NO_SPLIT = 1 << 30  # tiles per split in prefill mode: one split


def _patch_interpreter() -> None:
    """Two fixes to Triton 3.6's CPU interpreter (tests only, never on a GPU):

    * it holds scalars as 1-element arrays and converts them with ``int(array)``, which
      NumPy >= 2.4 refuses for arrays of ndim > 0, so every ``range`` with a runtime bound fails:
      convert through ``.item()``;
    * it stores bf16 as uint16 bit patterns and ``tl.dot`` multiplies those integers: widen bf16
      operands to fp32 first (exact, as the tensor cores' products are).
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_fieldprint_patched", False):
        return
    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        def widen(x):
            if x.dtype.scalar == tl.bfloat16:
                data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interpreter.TensorHandle(data, tl.float32)
            return x

        return dot(self, widen(a), widen(b), d, *args)

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._fieldprint_patched = True
    interpreter._patch_lang_tensor = patched
    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter()


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _shared_split_tiles(n_tiles, wanted):
    """:func:`shared_split_tiles` in a kernel, ``wanted = shared_splits_wanted(Hkv)``."""
    return tl.maximum(_MIN_SPLIT_TILES, _cdiv(n_tiles, wanted))


@triton.jit
def _kv_scale(value, ptr, kvh, MODE: tl.constexpr):
    """k_scale / v_scale of KV head ``kvh``: 0 = the scalar ``value``, 1 = one-element tensor,
    2 = per-KV-head tensor."""
    if MODE == 0:
        s = value
    elif MODE == 1:
        s = tl.load(ptr).to(tl.float32)
    else:
        s = tl.load(ptr + kvh).to(tl.float32)
    return s


@triton.jit
def _e4m3_to_fp16(x):
    """An e4m3 tile as fp16 (exact) through an explicit ``cvt.rn.f16x2.e4m3x2`` (compiled kernels
    only: the interpreter has no PTX). A plain cast lets Triton move the conversion after the
    shared-memory read into the mma operand layout; for the V tile (tokens on the reduction axis,
    bytes contiguous along D) that layout is read one byte per instruction, which kept fp8 decode
    barely faster than bf16 on the H200. The inline conversion happens in the load layout, and
    the fp16 tile then reaches the mma through the 16-bit transposing path."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.e4m3x2 $0, $1;", "=r,h", [x.to(tl.uint8, bitcast=True)],
                                     dtype=tl.float16, is_pure=False, pack=2)


@triton.jit
def _load_v_hdn(v_ptr, page, slot, tok_ok, v_head, stride_vb, stride_vd, offs_d, BS: tl.constexpr,
                TILE_N: tl.constexpr, MASKED: tl.constexpr):
    """The [TILE_N, D] V tile of a pool in the ``"hdn"`` layout (pages ``[Hkv, D, BS]``: a
    page's tokens contiguous, so that the tile is loaded in runs of up to ``BS`` tokens). The page
    ids are constant over ``min(BS, TILE_N)`` tokens (told to the compiler, which cannot see it
    through the block-table load). Masked tiles load every slot of their pages (the page ids past
    ``n_tokens`` are 0: in bounds) and zero the tokens past it afterwards, so that the mask does
    not split the runs; a NaN in an unwritten slot is zeroed with them."""
    base = page * stride_vb + v_head
    if TILE_N > BS:
        base = tl.max_constancy(base, [BS])
    v = tl.load(v_ptr + (base + slot)[:, None] + offs_d[None, :] * stride_vd)
    if MASKED:
        v = tl.where(tok_ok[:, None], v, 0.0)
    return v


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_ptr, v_ptr, table_row, tile, n_tokens, pos, window, k_head, v_head,
    stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap,
    offs_n, offs_d,
    BS: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, E4M3_ASM: tl.constexpr, V_HDN: tl.constexpr,
    pages=0, GIVEN_PAGES: tl.constexpr = False,
):
    """One online-softmax step over KV tile ``tile`` of a block table row.

    acc: [BLOCK_M, D] fp32; l_i, m_i: [BLOCK_M] (m_i in log2 units); q: [BLOCK_M, D];
    pos: [BLOCK_M] query positions (context coordinates). ``MASKED`` masks tokens
    ``>= n_tokens`` (and, with ``CAUSAL``, tokens after each row's position / outside its window).
    """
    start = tile * TILE_N
    tok = start + offs_n
    tok_ok = tok < n_tokens
    if GIVEN_PAGES:
        page = pages.to(tl.int64)
        if TILE_N <= BS:
            slot = (start % BS + offs_n).to(tl.int64)
        else:
            slot = (tok % BS).to(tl.int64)
    elif TILE_N <= BS:
        # The tile lies inside one page: one page id.
        page = tl.load(table_row + start // BS).to(tl.int64)
        slot = (start % BS + offs_n).to(tl.int64)
    else:
        if MASKED:
            page = tl.load(table_row + tok // BS, mask=tok_ok, other=0).to(tl.int64)
        else:
            page = tl.load(table_row + tok // BS).to(tl.int64)
        slot = (tok % BS).to(tl.int64)
    k_off = page * stride_kb + slot * stride_ks + k_head
    v_off = page * stride_vb + slot * stride_vs + v_head
    if MASKED:
        k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=tok_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None])
    s = tl.dot(q, k.to(q.dtype)) * qk_scale  # [BLOCK_M, TILE_N]
    if HAS_SOFTCAP:
        # softcap * tanh(s / softcap), tanh via exp2 (saturates cleanly to +-1).
        e = tl.math.exp2(s * (2.0 * 1.4426950408889634 / softcap))
        s = (1.0 - 2.0 / (e + 1.0)) * cap_mul
    if MASKED:
        mask = tok_ok[None, :]
        if CAUSAL:
            mask = mask & (tok[None, :] <= pos[:, None])
            if HAS_WINDOW:
                mask = mask & (tok[None, :] > pos[:, None] - window)
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_HDN:
        v = _load_v_hdn(v_ptr, page, slot, tok_ok, v_head, stride_vb, stride_vd, offs_d, BS, TILE_N, MASKED)
    elif MASKED:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd, mask=tok_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd)
    if E4M3_ASM:
        v = _e4m3_to_fp16(v)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
    return acc, l_i, m_new


@triton.jit
def _tile_pages(table_row, tile, n_tokens, offs_n, BS: tl.constexpr, TILE_N: tl.constexpr):
    """Page ids of KV tile ``tile`` of a block table row: a scalar when the tile lies inside
    one page (``TILE_N <= BS``), else [TILE_N] (one per token). Entries of tokens ``>=
    n_tokens`` are not read (0), so a tile past the end of the row reads nothing."""
    start = tile * TILE_N
    if TILE_N <= BS:
        page = tl.load(table_row + start // BS, mask=start < n_tokens, other=0)
    else:
        tok = start + offs_n
        page = tl.load(table_row + tok // BS, mask=tok < n_tokens, other=0)
    return page


@triton.jit
def _nth_split_tile(i, t_lo, n_anchor, c_lo, a_row, c_row, A, L):
    """Tile ``i`` of a split walked as one sequence (anchor tiles ``t_lo ..`` first, then
    context tiles ``c_lo ..``): ``(in_anchor, table row, tile index in that row, token count of
    that row)``."""
    in_anchor = i < n_anchor
    return (in_anchor, tl.where(in_anchor, a_row, c_row), tl.where(in_anchor, t_lo + i, c_lo + i - n_anchor),
            tl.where(in_anchor, A, L))


@triton.jit
def _attend_split_one_loop(
    acc, l_i, m_i, q, k_ptr, v_ptr, a_row, c_row, t_lo, a_hi, c_lo, c_hi, A, L, pos, window,
    k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap,
    offs_n, offs_d,
    BS: tl.constexpr, TILE_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    E4M3_ASM: tl.constexpr, V_HDN: tl.constexpr,
):
    """The pipelined walk of one split (decode, ``kernel_config(pipelined=True)``): anchor tiles
    ``[t_lo, a_hi)`` then context tiles ``[c_lo, c_hi)`` in ONE loop, so that Triton's software
    pipeliner multi-buffers the K/V gather (``num_stages - 1`` tiles of K and V in flight
    through cp.async). Two things make that happen, checked on the compiled sm_90 code:

    * one loop instead of the default path's four (anchors, masked head, unmasked middle,
      masked tail): every tile is masked by runtime predicates;
    * the page ids of tile ``i + 1`` are loaded in iteration ``i`` and carried to the next
      iteration. With the page ids loaded in the same iteration as the K/V tile, the pipeliner
      counts the gather as an indirect load and gives it ``(num_stages - 1) // 2`` stages of
      lead in a single buffer; carried, the K/V loads get ``num_stages - 1`` stages and as many
      buffers.

    Anchor tiles are masked as context tiles of a row that sees every token (position and
    window pushed out of reach), so one mask expression serves both. The arithmetic of every
    tile is that of :func:`_attend_tile` in the same order, so with the same tile shapes the
    result equals the default path's bit for bit. acc: [BLOCK_M, D] fp32; l_i, m_i: [BLOCK_M];
    pos: [BLOCK_M]."""
    n_anchor = tl.maximum(a_hi - t_lo, 0)
    n_iter = n_anchor + tl.maximum(c_hi - c_lo, 0)
    sees_all = tl.full(pos.shape, 1 << 30, tl.int32)  # position of a row that sees every anchor token
    in_anchor, row, tile, n_tok = _nth_split_tile(0, t_lo, n_anchor, c_lo, a_row, c_row, A, L)
    pages = _tile_pages(row, tile, n_tok, offs_n, BS, TILE_N)
    for i in range(0, n_iter):
        # tile i + 1 located and its page ids loaded here, all carried into the next iteration
        next_in_anchor, next_row, next_tile, next_n_tok = _nth_split_tile(
            i + 1, t_lo, n_anchor, c_lo, a_row, c_row, A, L)
        next_pages = _tile_pages(next_row, next_tile, next_n_tok, offs_n, BS, TILE_N)
        row_pos = tl.where(in_anchor, sees_all, pos)
        row_window = tl.where(in_anchor, (1 << 31) - 1, window)  # row_pos - row_window < 0
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_ptr, v_ptr, row, tile, n_tok, row_pos, row_window, k_head, v_head,
            stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap, offs_n, offs_d,
            BS, TILE_N, True, True, HAS_WINDOW, HAS_SOFTCAP, E4M3_ASM, V_HDN, pages, True)
        in_anchor, row, tile, n_tok, pages = next_in_anchor, next_row, next_tile, next_n_tok, next_pages
    return acc, l_i, m_i


@triton.jit
def _split_plan(A, L, grouped, tiles_per_split, anchor_splits_wanted, TILE_N: tl.constexpr):
    """Split layout of one sequence (the one owner of the rule: the attention and combine
    kernels both call it). A sequence's KV tiles are its ``cdiv(A, TILE_N)`` anchor tiles then
    its ``cdiv(L, TILE_N)`` context tiles.

    * ungrouped: the combined tile range is cut every ``tiles_per_split`` tiles;
    * grouped (see :func:`_anchor_group_tile`): the anchor tiles alone are cut by the
      shared-prefix rule (:func:`_shared_split_tiles` with ``anchor_splits_wanted``: the group
      programs read a shared anchor for many rows at once, as the shared-prefix kernel does, and
      need its parallelism; 1 in prefill mode, where the group tiles alone fill the GPU: one
      anchor split) into splits ``0 .. anchor_splits - 1``, written by the group programs, then
      the context tiles alone are cut every ``tiles_per_split`` tiles (the following splits,
      written by the sequence's own programs).

    Returns ``(anchor_splits, n_splits, own_first_tile)``: ``anchor_splits`` is 0 for an
    ungrouped sequence; own split ``s >= anchor_splits`` covers tiles from ``own_first_tile +
    (s - anchor_splits) * tiles_per_split`` (combined coordinates)."""
    n_a = _cdiv(A, TILE_N)
    anchor_splits = tl.where(grouped, _cdiv(n_a, _shared_split_tiles(n_a, anchor_splits_wanted)), 0)
    own_first_tile = tl.where(grouped, n_a, 0)
    n_splits = anchor_splits + _cdiv(n_a - own_first_tile + _cdiv(L, TILE_N), tiles_per_split)
    return anchor_splits, n_splits, own_first_tile


@triton.jit
def _normalize(acc, l_i, m_i, vs):
    """Final output rows and log2-unit log-sum-exp of one online softmax; rows that saw no token
    (an empty split, a padding row) give out 0 and lse -inf."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * (vs / l_safe)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
    return out, lse2


@triton.jit
def _anchor_group_tile(
    q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr, qsl_ptr, anchor_table_ptr, anchor_lens_ptr,
    groups_ptr, group_tok_ptr, group_tile_ptr, gtile, kvh, split, num_seqs, num_groups, group_width,
    search_steps, anchor_splits_wanted, max_splits, num_q_heads, qk_scale, cap_mul, softcap, vs,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_at,
    stride_g, stride_gt,
    GROUP: tl.constexpr, GP: tl.constexpr, GROUP_BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BS: tl.constexpr, TILE_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP16: tl.constexpr,
    E4M3_ASM: tl.constexpr, V_HDN: tl.constexpr,
):
    """Anchor split ``split`` of group tile ``gtile``, read once for every row of the tile.

    A group row ``g`` of ``anchor_groups [G, group_width]`` lists sequences that share one anchor
    (same anchor pages, same length). Its query tokens, member after member in the row's order
    (``group_tok [G, group_width + 1]``: the offset of each member's first token in that order),
    are cut into tiles of ``GROUP_BLOCK_M // GP`` tokens (``group_tile [G + 1]``: the first tile
    of each group), and a tile's rows are (token) x (the ``GP`` padded query heads of KV head
    ``kvh``): decode tokens of many sequences or chunked-prefill tokens of one or several. Every
    row sees every anchor token (anchors precede the context), so the rows need no causal mask
    and each anchor KV tile of the split is gathered once (through the first member's anchor
    table) and applied to all rows with ``tl.dot`` (queries batched across sequences, as in
    Hydragen). Each row writes its partial at split index ``split`` of its own token, which the
    combine kernel merges with the sequence's context splits. Rows past the group's tokens and
    padded heads are computed on zeros and never stored. Every row's arithmetic is its own
    (``tl.dot`` and the online softmax are row-wise), so with fixed tile shapes a token's bits do
    not depend on its group or on its row in the tile."""
    tokens_per_tile: tl.constexpr = GROUP_BLOCK_M // GP
    # Group of this tile: the largest g with group_tile[g] <= gtile (groups without tokens own
    # no tiles); tiles past the last group's find no tokens below.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_groups - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        key = tl.load(group_tile_ptr + mid)
        lo = tl.where(key <= gtile, mid, lo)
        hi = tl.where(key <= gtile, hi, mid - 1)
    g = lo.to(tl.int64)
    tok_row_g = group_tok_ptr + g * stride_gt
    f0 = (gtile - tl.load(group_tile_ptr + g)) * tokens_per_tile
    n_tok = tl.load(tok_row_g + group_width)
    leader = tl.load(groups_ptr + g * stride_g)
    A = tl.load(anchor_lens_ptr + tl.maximum(leader, 0))
    n_a = _cdiv(A, TILE_N)
    anchor_split_tiles = _shared_split_tiles(n_a, anchor_splits_wanted)  # as in _split_plan
    t_lo = split * anchor_split_tiles
    if (f0 < n_tok) & (leader >= 0) & (t_lo < n_a):
        offs_m = tl.arange(0, GROUP_BLOCK_M)
        offs_n = tl.arange(0, TILE_N)
        offs_d = tl.arange(0, HEAD_DIM)
        f = f0 + offs_m // GP  # [GROUP_BLOCK_M] token index in the group's order
        row_head = offs_m % GP
        # Member slot of each row: the largest m with group_tok[g, m] <= f (``search_steps`` =
        # bits of group_width - 1 halvings of [0, group_width - 1]).
        m_lo = tl.zeros([GROUP_BLOCK_M], dtype=tl.int32)
        m_hi = tl.zeros([GROUP_BLOCK_M], dtype=tl.int32) + group_width - 1
        for _ in range(0, search_steps):
            m_mid = (m_lo + m_hi + 1) // 2
            starts = tl.load(tok_row_g + m_mid)
            m_lo = tl.where(starts <= f, m_mid, m_lo)
            m_hi = tl.where(starts <= f, m_hi, m_mid - 1)
        member = tl.load(groups_ptr + g * stride_g + m_lo)
        row_ok = (f < n_tok) & (member >= 0) & (member < num_seqs) & (row_head < GROUP)
        b = tl.where(row_ok, member, 0)
        tok_row = (tl.load(qsl_ptr + b) + f - tl.load(tok_row_g + m_lo)).to(tl.int64)
        head = kvh * GROUP + row_head
        q = tl.load(q_ptr + tok_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        if DOT_FP16:
            q = q.to(tl.float16)  # as in the sequence programs (exactness: see there)
        acc = tl.zeros([GROUP_BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([GROUP_BLOCK_M], dtype=tl.float32)
        m_i = tl.full([GROUP_BLOCK_M], -1.0e30, dtype=tl.float32)
        k_head = kvh.to(tl.int64) * stride_kh
        v_head = kvh.to(tl.int64) * stride_vh
        a_row = anchor_table_ptr + leader.to(tl.int64) * stride_at
        t_hi = tl.minimum(t_lo + anchor_split_tiles, n_a)
        t_full = tl.maximum(t_lo, tl.minimum(t_hi, A // TILE_N))  # tiles wholly inside the anchor
        for t in range(t_lo, t_full):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_ptr, v_ptr, a_row, t, A, offs_m, 0, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap, offs_n, offs_d,
                BS, TILE_N, False, False, False, HAS_SOFTCAP, E4M3_ASM, V_HDN)
        for t in range(t_full, t_hi):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_ptr, v_ptr, a_row, t, A, offs_m, 0, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap, offs_n, offs_d,
                BS, TILE_N, True, False, False, HAS_SOFTCAP, E4M3_ASM, V_HDN)
        out, lse2 = _normalize(acc, l_i, m_i, vs)
        part = (tok_row * num_q_heads + head) * max_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse2, mask=row_ok)


@triton.jit
def _paged_anchor_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    block_table_ptr, seq_lens_ptr, qsl_ptr, anchor_table_ptr, anchor_lens_ptr,
    groups_ptr, group_tok_ptr, group_tile_ptr, seq_grouped_ptr,
    k_scale_ptr, v_scale_ptr, k_scale_val, v_scale_val, sm_scale, softcap, window,
    num_seqs, num_seq_tiles, num_groups, group_width, search_steps, tiles_per_split,
    anchor_splits_wanted, max_splits, num_q_heads,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_bt, stride_at, stride_g, stride_gt,
    GROUP: tl.constexpr, GP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP_BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, TILE_N: tl.constexpr,
    HAS_ANCHORS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, KS_MODE: tl.constexpr, VS_MODE: tl.constexpr, DOT_FP16: tl.constexpr,
    E4M3_ASM: tl.constexpr, V_HDN: tl.constexpr, PIPELINED: tl.constexpr,
):
    """q: [T, Hq, D]; k/v: [num_blocks, BS, Hkv, D]; out: [T, Hq, D]; lse: [T, Hq] fp32;
    part_out: [T, Hq, max_splits, D] fp32; part_lse: [T, Hq, max_splits] fp32 (log2 units).
    With ``HAS_GROUPS``: groups: [G, group_width] int32 (``anchor_groups``); group_tok:
    [G, group_width + 1] int32 and group_tile: [G + 1] int32 (the groups' token and tile layout,
    :func:`_group_layout`); seq_grouped: [B] int32, 1 for a sequence listed in a group; programs
    ``num_seq_tiles ..`` along axis 0 are the anchor-group tiles (:func:`_anchor_group_tile`).
    K/V scale modes: 0 = scalar argument, 1 = one-element tensor, 2 = per-KV-head tensor."""
    tile_idx = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ks = _kv_scale(k_scale_val, k_scale_ptr, kvh, KS_MODE)
    vs = _kv_scale(v_scale_val, v_scale_ptr, kvh, VS_MODE)
    if HAS_SOFTCAP:
        qk_scale = sm_scale * ks
        cap_mul = softcap * 1.4426950408889634
    else:
        qk_scale = sm_scale * ks * 1.4426950408889634
        cap_mul = 1.0
    if HAS_GROUPS:
        if tile_idx >= num_seq_tiles:
            _anchor_group_tile(
                q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr, qsl_ptr, anchor_table_ptr,
                anchor_lens_ptr, groups_ptr, group_tok_ptr, group_tile_ptr, tile_idx - num_seq_tiles,
                kvh, split, num_seqs, num_groups, group_width, search_steps, anchor_splits_wanted,
                max_splits, num_q_heads, qk_scale, cap_mul, softcap, vs,
                stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
                stride_at, stride_g, stride_gt, GROUP, GP, GROUP_BLOCK_M, HEAD_DIM, BS, TILE_N, HAS_SOFTCAP, DOT_FP16,
                E4M3_ASM, V_HDN)
            return

    # Sequence of this query tile: largest b with query_start_loc[b] // BLOCK_Q + b <= tile_idx.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        key = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(key <= tile_idx, mid, lo)
        hi = tl.where(key <= tile_idx, hi, mid - 1)
    b = lo
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q0 = (tile_idx - (q_start // BLOCK_Q + b)) * BLOCK_Q
    if q0 >= q_len:
        return
    L = tl.load(seq_lens_ptr + b)
    if HAS_ANCHORS:
        A = tl.load(anchor_lens_ptr + b)
    else:
        A = 0
    n_a = _cdiv(A, TILE_N)
    n_tiles = n_a + _cdiv(L, TILE_N)
    if HAS_GROUPS:
        # A grouped sequence's anchor splits come from the group programs.
        grouped = tl.load(seq_grouped_ptr + b) != 0
        anchor_splits, n_splits, own_first_tile = _split_plan(A, L, grouped, tiles_per_split,
                                                              anchor_splits_wanted, TILE_N)
        if (split >= n_splits) | (split < anchor_splits):
            return
        t_lo = own_first_tile + (split - anchor_splits) * tiles_per_split
    else:
        n_splits = _cdiv(n_tiles, tiles_per_split)
        if split >= n_splits:
            return
        t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_tok = offs_m // GP
    row_head = offs_m % GP
    qj = q0 + row_tok
    row_ok = (row_tok < BLOCK_Q) & (qj < q_len) & (row_head < GROUP)
    head = kvh * GROUP + row_head
    tok_row = (q_start + qj).to(tl.int64)
    q = tl.load(q_ptr + tok_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP16:
        # fp8 KV: e4m3 -> fp16 is one hardware conversion (e4m3 -> bf16 is not), and every e4m3
        # value is exact in fp16; bf16 q is exact in fp16 too within |q| <= 65504 (checked by the
        # wrapper when validate=True). The dots then run in fp16 with fp32 accumulation.
        q = q.to(tl.float16)
    pos = L - q_len + qj
    p_lo = L - q_len + q0
    p_hi = L - q_len + tl.minimum(q0 + BLOCK_Q, q_len) - 1

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Finite start: a fully masked tile then gives alpha = 1, p = 0 (never inf - inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    k_head = kvh.to(tl.int64) * stride_kh
    v_head = kvh.to(tl.int64) * stride_vh

    if PIPELINED:
        a_row = anchor_table_ptr + b.to(tl.int64) * stride_at
        c_row = block_table_ptr + b.to(tl.int64) * stride_bt
        if HAS_ANCHORS:
            a_hi = tl.minimum(t_hi, n_a)
        else:
            a_hi = t_lo
        # The context tiles the rows can see, clipped as in the default path below (kept apart:
        # hoisting the shared lines out of the branch changes the default path's compiled code).
        c_lo = tl.maximum(t_lo - n_a, 0)
        c_hi = tl.minimum(t_hi - n_a, _cdiv(p_hi + 1, TILE_N))
        if HAS_WINDOW:
            c_lo = tl.maximum(c_lo, tl.maximum(p_lo - window + 1, 0) // TILE_N)
        acc, l_i, m_i = _attend_split_one_loop(
            acc, l_i, m_i, q, k_ptr, v_ptr, a_row, c_row, t_lo, a_hi, c_lo, c_hi, A, L, pos, window,
            k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap,
            offs_n, offs_d, BS, TILE_N, HAS_WINDOW, HAS_SOFTCAP, E4M3_ASM, V_HDN)
    else:
        if HAS_ANCHORS:
            a_row = anchor_table_ptr + b.to(tl.int64) * stride_at
            for t in range(t_lo, tl.minimum(t_hi, n_a)):
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_ptr, v_ptr, a_row, t, A, pos, window, k_head, v_head,
                    stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap, offs_n, offs_d,
                    BS, TILE_N, True, False, False, HAS_SOFTCAP, E4M3_ASM, V_HDN)
        # Context tiles of this split, clipped to what the tile's rows can see.
        c_lo = tl.maximum(t_lo - n_a, 0)
        c_hi = tl.minimum(t_hi - n_a, _cdiv(p_hi + 1, TILE_N))
        if HAS_WINDOW:
            c_lo = tl.maximum(c_lo, tl.maximum(p_lo - window + 1, 0) // TILE_N)
            full_lo = _cdiv(tl.maximum(p_hi - window + 1, 0), TILE_N)
        else:
            full_lo = 0
        full_hi = (p_lo + 1) // TILE_N  # tiles ending at or before the first row's position
        mid_lo = tl.maximum(c_lo, tl.minimum(full_lo, c_hi))
        mid_hi = tl.maximum(mid_lo, tl.minimum(full_hi, c_hi))
        c_row = block_table_ptr + b.to(tl.int64) * stride_bt
        for t in range(c_lo, mid_lo):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_ptr, v_ptr, c_row, t, L, pos, window, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap, offs_n, offs_d,
                BS, TILE_N, True, True, HAS_WINDOW, HAS_SOFTCAP, E4M3_ASM, V_HDN)
        for t in range(mid_lo, mid_hi):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_ptr, v_ptr, c_row, t, L, pos, window, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap, offs_n, offs_d,
                BS, TILE_N, False, False, False, HAS_SOFTCAP, E4M3_ASM, V_HDN)
        for t in range(mid_hi, c_hi):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_ptr, v_ptr, c_row, t, L, pos, window, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, stride_vd, qk_scale, cap_mul, softcap, offs_n, offs_d,
                BS, TILE_N, True, True, HAS_WINDOW, HAS_SOFTCAP, E4M3_ASM, V_HDN)

    out, lse2 = _normalize(acc, l_i, m_i, vs)
    row_hd = tok_row * num_q_heads + head
    if n_splits == 1:
        tl.store(out_ptr + tok_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + row_hd, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        part = row_hd * max_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse2, mask=row_ok)


@triton.jit
def merge_split_partials(part_out_ptr, part_lse_ptr, base, n_splits, HEAD_DIM: tl.constexpr):
    """One row's ``n_splits`` partials at ``base`` (partial ``s``: out [HEAD_DIM] fp32 at
    ``part_out_ptr + (base + s) * HEAD_DIM``, lse in log2 units at ``part_lse_ptr + base + s``)
    merged in split order in fp32: the largest lse first, then the weighted sum. Returns (out
    [HEAD_DIM] fp32, lse in log2 units). At least one partial lse must be finite."""
    m = tl.full([], float("-inf"), tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(part_lse_ptr + base + s))
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    w_sum = tl.zeros([], dtype=tl.float32)
    for s in range(0, n_splits):
        w = tl.math.exp2(tl.load(part_lse_ptr + base + s) - m)
        acc += w * tl.load(part_out_ptr + (base + s) * HEAD_DIM + offs_d)
        w_sum += w
    return acc / w_sum, m + tl.math.log2(w_sum)


@triton.jit
def _combine_kernel(
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, qsl_ptr, anchor_lens_ptr,
    seq_grouped_ptr, num_seqs, tiles_per_split, anchor_splits_wanted, max_splits, num_q_heads, stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr, TILE_N: tl.constexpr, HAS_ANCHORS: tl.constexpr, HAS_GROUPS: tl.constexpr,
):
    """Merge the split partials of one (token, query head), splits in index order, in fp32.
    Tokens of sequences with a single split were written by the attention kernel: skipped."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs - 1
    while lo < hi:  # largest b with query_start_loc[b] <= t
        mid = (lo + hi + 1) // 2
        key = tl.load(qsl_ptr + mid)
        lo = tl.where(key <= t, mid, lo)
        hi = tl.where(key <= t, hi, mid - 1)
    L = tl.load(seq_lens_ptr + lo)
    if HAS_ANCHORS:
        A = tl.load(anchor_lens_ptr + lo)
    else:
        A = 0
    if HAS_GROUPS:
        grouped = tl.load(seq_grouped_ptr + lo) != 0
        n_splits = _split_plan(A, L, grouped, tiles_per_split, anchor_splits_wanted, TILE_N)[1]
    else:
        n_splits = _cdiv(_cdiv(A, TILE_N) + _cdiv(L, TILE_N), tiles_per_split)
    if n_splits == 1:
        return
    base = (t.to(tl.int64) * num_q_heads + h) * max_splits
    out, lse2 = merge_split_partials(part_out_ptr, part_lse_ptr, base, n_splits, HEAD_DIM)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + tl.arange(0, HEAD_DIM),
             out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + t.to(tl.int64) * num_q_heads + h, lse2 * 0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Heuristics


# kernel_config's register cap for decode without anchors (see there)
NO_ANCHOR_DECODE_MAXNREG = 128


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def kernel_config(head_dim: int, block_size: int, group: int, mode: str, kv_dtype: torch.dtype,
                  anchors: bool = True, **overrides) -> dict:
    """Tile sizes and launch options of one call (a fixed heuristic, no autotuning, so the
    reduction order never changes between runs).

    decode: one token per tile, the GQA group's heads as rows (padded to 16 for ``tl.dot``),
    KV tiles of 64 tokens (128 for fp8, which moves half the bytes per token; 32 at D=256),
    4 warps, 2 pipeline stages. prefill: 128 rows (64 at D=256) = ``128 / group`` tokens x
    group heads, KV tiles of 128 (32 at D=256), 8 warps, 3 stages (2 at D=256). Chosen by timing
    variants on the H200 at the E1 shapes.
    ``group_block_m``: rows of an anchor-group tile (launches with ``anchor_groups`` only). In
    decode 64 = ``64 / group_pad`` sequences x their padded heads (16 sequences at GQA 4), so an
    anchor KV tile is read once per 16 sequences instead of once per ``block_m / group_pad``; it
    compiles for sm_90 at D=128 with bf16 and fp8 KV without spills at the decode ``num_warps``.
    In prefill the query tiles' ``block_m`` (the group tile is then a query tile whose rows
    come from several sequences' chunks: at most the prefill kernel's registers).
    ``pipelined`` (bool, decode launches only; prefill launches ignore it): the decode walk of
    :func:`_attend_split_one_loop`, whose K/V gather Triton multi-buffers. Its tiles are sized
    for 4 programs per SM on the H200 (<= 128 registers and <= 56 KB of shared memory at 4
    warps, as compiled for sm_90): ``tile_n = 4096 // head_dim`` tokens (32 at D=128: a 16 KB
    K+V tile in bf16), ``num_stages`` 4 (a ring of 3 K/V tiles) with 2-byte KV, 6 (5 tiles of
    half the bytes) with fp8.
    ``maxnreg``: a register cap, set for one launch only: decode without anchors (``anchors``
    False), 2-byte KV, ``head_dim`` <= 128 (at 256 the cap spills), the default walk. Compiled
    for sm_90 at D=128 that specialization takes 146 registers (3 programs per SM at 4 warps)
    where the launch with anchors takes 122 (4 per SM), and E1 timed it 6-9% slower than with 64
    anchors; capped at 128 it compiles without spills and fits 4 per SM (with tile overrides it
    may spill: E2 reports spills). None (the compiler's choice) everywhere else.
    Overrides: ``tile_n``, ``block_m``, ``group_block_m``, ``num_warps``, ``num_stages`` (for
    tuning and tests; 0 keeps the heuristic), ``pipelined``.
    """
    if mode not in ("decode", "prefill"):
        raise ValueError(f"mode must be 'decode' or 'prefill', got {mode!r}")
    unknown = set(overrides) - {"tile_n", "block_m", "group_block_m", "num_warps", "num_stages", "pipelined"}
    if unknown:
        raise ValueError(f"unknown kernel config overrides {sorted(unknown)}")
    pipelined = overrides.pop("pipelined", False)
    if not isinstance(pipelined, bool):
        raise ValueError(f"pipelined must be a bool, got {pipelined!r}")
    pipelined = pipelined and mode == "decode"
    gp = _next_pow2(group)
    fp8 = kv_dtype == torch.float8_e4m3fn
    if pipelined:
        block_m = max(16, gp)
        tile_n = 4096 // head_dim
        num_warps, num_stages = 4, (6 if fp8 else 4)
    elif mode == "decode":
        block_m = max(16, gp)
        tile_n = 32 if head_dim > 128 else (128 if fp8 else 64)
        num_warps, num_stages = 4, 2
    else:
        block_m = max(64 if head_dim > 128 else 128, gp)
        tile_n = 32 if head_dim > 128 else 128
        num_warps, num_stages = 8, (2 if head_dim > 128 else 3)
    group_block_m = max(64, gp) if mode == "decode" else block_m
    cfg = {"tile_n": tile_n, "block_m": block_m, "group_block_m": group_block_m, "num_warps": num_warps,
           "num_stages": num_stages}
    cfg.update({k: v for k, v in overrides.items() if v})
    for key in ("block_m", "group_block_m"):
        rows = cfg[key]
        if not isinstance(rows, int) or rows < max(16, gp) or rows & (rows - 1):
            raise ValueError(f"{key} must be a power of two >= max(16, group rows {gp}), got {rows!r}")
    if cfg["tile_n"] < 16 or cfg["tile_n"] & (cfg["tile_n"] - 1):
        raise ValueError(f"tile_n must be a power of two >= 16, got {cfg['tile_n']}")
    cfg["pipelined"] = pipelined
    cfg["maxnreg"] = (NO_ANCHOR_DECODE_MAXNREG if mode == "decode" and not anchors and not pipelined
                      and kv_dtype.itemsize == 2 and head_dim <= 128 else None)
    cfg["group_pad"] = gp
    cfg["block_q"] = 1 if mode == "decode" else cfg["block_m"] // gp
    return cfg


# ----------------------------------------------------------------------------------------------
# Launch


def _dot_fp16(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Run the dots in fp16 when the cache is fp8 (see the kernel): fast conversion, exact values."""
    return kv_dtype == torch.float8_e4m3fn


def _e4m3_asm(kv_dtype: torch.dtype, device: torch.device) -> bool:
    """Convert fp8 V tiles with inline PTX (see ``_e4m3_to_fp16``): compiled kernels on GPUs
    with the e4m3 conversion instruction (sm_89 and later) only."""
    if kv_dtype != torch.float8_e4m3fn or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# The V stride equal to 1 in each page layout, which a launch specializes (a constexpr 1).
_UNIT_V_STRIDE = {"nhd": "stride_vd", "hdn": "stride_vs"}


def _scale_arg(scale):
    """k_scale / v_scale as (tensor or None, float): a tensor is read by the kernel (one element
    or one per KV head), a Python number is passed by value."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(-1).contiguous(), 1.0
    return None, 1.0 if scale is None else float(scale)


def _group_layout(anchor_groups: torch.Tensor, query_start_loc: torch.Tensor, num_seqs: int,
                  tokens_per_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token and tile layout of the anchor groups (device ops only, no host synchronization):
    a group's query tokens are its members' tokens in row order, cut into tiles of
    ``tokens_per_tile``. Padding and, with ``validate=False``, out-of-range entries list nothing.
    Returns ``group_tok [G, W + 1]`` int32 (offset of member ``m``'s first token in its group's
    order; column ``W``: the group's token count), ``group_tile [G + 1]`` int32 (first tile of
    each group; entry ``G``: the tile count) and ``seq_grouped [B]`` int32 (1 for every sequence
    listed in a group)."""
    G, W = anchor_groups.shape
    idx = anchor_groups.long()
    listed = (idx >= 0) & (idx < num_seqs)
    flags = torch.zeros(num_seqs + 1, dtype=torch.int32, device=anchor_groups.device)
    # index_fill_ takes the 1 as a kernel argument; `flags[idx] = 1` makes it a host tensor and
    # copies it to the GPU with a sync, which a CUDA-graph capture refuses (E1's grouped rows fell
    # back to eager timing until this; tests/test_attention_gpu.py captures the launch)
    flags.index_fill_(0, torch.where(listed, idx, num_seqs).flatten(), 1)
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    counts = torch.where(listed, q_lens[idx.clamp(0, max(num_seqs - 1, 0))], 0)  # [G, W]
    group_tok = torch.zeros(G, W + 1, dtype=torch.int64, device=anchor_groups.device)
    group_tok[:, 1:] = counts.cumsum(1)
    group_tile = torch.zeros(G + 1, dtype=torch.int64, device=anchor_groups.device)
    group_tile[1:] = ((group_tok[:, W] + tokens_per_tile - 1) // tokens_per_tile).cumsum(0)
    return group_tok.to(torch.int32), group_tile.to(torch.int32), flags[:num_seqs]


def _launch(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
            anchor_lens, k_scale_t, v_scale_t, softmax_scale, k_scale_f, v_scale_f, sliding_window,
            logit_softcap, kv_split_tokens, tile_n, block_m, num_warps, num_stages, anchor_groups=None,
            group_block_m=0, pipelined=False):
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    B, max_blocks = block_table.shape
    group = Hq // Hkv
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    if T == 0 or B == 0:
        return out, lse
    mode = "decode" if T == B else "prefill"
    cfg = kernel_config(D, BS, group, mode, k_cache.dtype, tile_n=tile_n, block_m=block_m,
                        anchors=anchor_block_table is not None, group_block_m=group_block_m,
                        num_warps=num_warps, num_stages=num_stages, pipelined=pipelined)
    TN = cfg["tile_n"]
    has_anchors = anchor_block_table is not None
    has_groups = anchor_groups is not None
    if mode == "decode":
        tiles_per_split = kv_split_tokens // TN
        anchor_splits_wanted = shared_splits_wanted(Hkv)
        # Shape-only bound on the splits of any sequence (table capacities, no host sync).
        cap_tiles = -(-max_blocks * BS // TN)
        if has_groups:  # anchors and context cut separately (see _split_plan)
            cap_a = -(-anchor_block_table.shape[1] * BS // TN)
            # the shared-prefix rule makes at most `wanted` splits of at least MIN_SPLIT_TILES tiles
            max_a = min(anchor_splits_wanted, -(-cap_a // MIN_SPLIT_TILES))
            max_splits = max(1, max_a + -(-cap_tiles // tiles_per_split))
        else:
            if has_anchors:
                cap_tiles += -(-anchor_block_table.shape[1] * BS // TN)
            max_splits = max(1, -(-cap_tiles // tiles_per_split))
    else:
        # One split per query tile; a grouped sequence has two: its anchor (group tiles) and
        # its context (its own tiles).
        tiles_per_split, max_splits = _NO_SPLIT, 2 if has_groups else 1
        anchor_splits_wanted = 1
    if max_splits > 1:
        part_out = torch.empty(T, Hq, max_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T, Hq, max_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = lse  # never written: every sequence has one split
    ks_mode = 0 if k_scale_t is None else (2 if k_scale_t.numel() > 1 else 1)
    vs_mode = 0 if v_scale_t is None else (2 if v_scale_t.numel() > 1 else 1)
    atab = anchor_block_table if has_anchors else block_table
    alen = anchor_lens if has_anchors else seq_lens
    n_tiles = T // cfg["block_q"] + B
    if has_groups:
        G, group_width = anchor_groups.shape
        tokens_per_tile = cfg["group_block_m"] // cfg["group_pad"]
        group_tok, group_tile, seq_grouped = _group_layout(anchor_groups, query_start_loc, B, tokens_per_tile)
        # Shape-only bound: a sequence is in at most one group, so the groups hold at most T
        # tokens, and each group's last tile may be partial. An empty table (no group rows or no
        # columns) groups nothing and has no leader entry to read: no group programs.
        group_tiles = -(-T // tokens_per_tile) + G if anchor_groups.numel() else 0
        groups, stride_g, stride_gt = anchor_groups, anchor_groups.stride(0), group_tok.stride(0)
    else:
        G = group_width = group_tiles = stride_g = stride_gt = 0
        groups = group_tok = group_tile = seq_grouped = seq_lens  # never read
    grid = (n_tiles + group_tiles, Hkv, max_splits)
    _paged_anchor_attn_kernel[grid](
        q, k_cache, v_cache, out, lse, part_out, part_lse,
        block_table, seq_lens, query_start_loc, atab, alen, groups, group_tok, group_tile, seq_grouped,
        k_scale_t if k_scale_t is not None else lse, v_scale_t if v_scale_t is not None else lse,
        k_scale_f, v_scale_f, softmax_scale, logit_softcap if logit_softcap else 1.0,
        sliding_window if sliding_window else 0,
        B, n_tiles, G, group_width, max(group_width - 1, 0).bit_length(), tiles_per_split, anchor_splits_wanted,
        max_splits, Hq,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), block_table.stride(0), atab.stride(0), stride_g, stride_gt,
        GROUP=group, GP=cfg["group_pad"], BLOCK_Q=cfg["block_q"], BLOCK_M=cfg["block_m"],
        GROUP_BLOCK_M=cfg["group_block_m"], HEAD_DIM=D, BS=BS, TILE_N=TN, HAS_ANCHORS=has_anchors,
        HAS_GROUPS=has_groups,
        HAS_WINDOW=bool(sliding_window), HAS_SOFTCAP=bool(logit_softcap),
        KS_MODE=ks_mode, VS_MODE=vs_mode, DOT_FP16=_dot_fp16(q.dtype, k_cache.dtype),
        E4M3_ASM=_e4m3_asm(k_cache.dtype, q.device), V_HDN=layout_of(v_cache) == "hdn", PIPELINED=cfg["pipelined"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"],
    )
    if max_splits > 1:
        _combine_kernel[(T, Hq)](
            out, lse, part_out, part_lse, seq_lens, query_start_loc, alen, seq_grouped,
            B, tiles_per_split, anchor_splits_wanted, max_splits, Hq, out.stride(0), out.stride(1),
            HEAD_DIM=D, TILE_N=TN, HAS_ANCHORS=has_anchors, HAS_GROUPS=has_groups, num_warps=1,
        )
    return out, lse


@torch.library.custom_op("fieldprint::paged_anchor_attention", mutates_args=())
def _paged_anchor_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, anchor_block_table: torch.Tensor | None,
    anchor_lens: torch.Tensor | None, k_scale_t: torch.Tensor | None, v_scale_t: torch.Tensor | None,
    softmax_scale: float, k_scale_f: float, v_scale_f: float, sliding_window: int,
    logit_softcap: float, kv_split_tokens: int, tile_n: int, block_m: int, num_warps: int,
    num_stages: int, anchor_groups: torch.Tensor | None = None, group_block_m: int = 0,
    pipelined: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch as a torch custom op (opaque to torch.compile, capturable in CUDA graphs).
    Arguments are already checked; 0 means "none" / "heuristic" for the int and float knobs."""
    return _launch(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
                   anchor_lens, k_scale_t, v_scale_t, softmax_scale, k_scale_f, v_scale_f,
                   sliding_window, logit_softcap, kv_split_tokens, tile_n, block_m, num_warps,
                   num_stages, anchor_groups, group_block_m, pipelined)


@_paged_anchor_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table, anchor_lens,
      k_scale_t, v_scale_t, softmax_scale, k_scale_f, v_scale_f, sliding_window, logit_softcap,
      kv_split_tokens, tile_n, block_m, num_warps, num_stages, anchor_groups=None, group_block_m=0,
      pipelined=False):
    T, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((T, Hq), dtype=torch.float32)


def _check_kernel_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                         anchor_block_table, anchor_lens, kv_split_tokens) -> AttentionShapes:
    """What the kernel needs beyond the shared checks: q/KV dtype pairing, unit stride along the
    last dimension, supported head dims, page sizes and split lengths."""
    if k_cache.dtype != torch.float8_e4m3fn and k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} must equal q dtype {q.dtype} (or be float8_e4m3fn)")
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": block_table,
             "seq_lens": seq_lens, "query_start_loc": query_start_loc,
             "anchor_block_table": anchor_block_table, "anchor_lens": anchor_lens}
    for name, x in named.items():
        if name != "v_cache" and x is not None and x.numel() > 0 and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")
    if v_cache.numel() > 0 and layout_of(v_cache) is None:
        raise ValueError(f"v_cache must be contiguous in its last dimension (page layout 'nhd') or in its "
                         f"token dimension 1 (page layout 'hdn'), got strides {v_cache.stride()}")
    D, BS = q.shape[2], k_cache.shape[1]
    if D not in (64, 128, 256):
        raise ValueError(f"head dim must be 64, 128 or 256, got {D}")
    if BS < 16 or BS > 128 or BS & (BS - 1):
        raise ValueError(f"k_cache block size must be a power of two in [16, 128], got {BS}")
    if not isinstance(kv_split_tokens, int) or kv_split_tokens <= 0 or kv_split_tokens & (kv_split_tokens - 1):
        raise ValueError(f"kv_split_tokens must be a positive power of two, got {kv_split_tokens!r}")


def _check_anchor_groups(anchor_groups, shapes: AttentionShapes, anchor_block_table, device) -> None:
    """Metadata of ``anchor_groups`` (no host synchronization)."""
    if not isinstance(anchor_groups, torch.Tensor):
        raise TypeError(f"anchor_groups must be a torch.Tensor or None, got {type(anchor_groups).__name__}")
    if anchor_groups.dim() != 2 or anchor_groups.dtype != torch.int32:
        raise ValueError(f"anchor_groups must be a 2-D int32 tensor [groups, max sequences per group], "
                         f"got shape {tuple(anchor_groups.shape)} dtype {anchor_groups.dtype}")
    if anchor_groups.device != device:
        raise ValueError(f"anchor_groups is on {anchor_groups.device} but q is on {device}")
    if anchor_block_table is None:
        raise ValueError("anchor_groups needs anchor_block_table and anchor_lens (groups share anchors)")
    if anchor_groups.numel() and anchor_groups.stride(-1) != 1:
        raise ValueError(f"anchor_groups must be contiguous in its last dimension, got strides "
                         f"{anchor_groups.stride()}")


def _check_anchor_group_values(anchor_groups, shapes: AttentionShapes, anchor_block_table, anchor_lens) -> None:
    """What ``anchor_groups`` promises (host reads, ``validate=True`` only): entries in
    [-1, B), padding -1 only after a row's members, no sequence listed twice, and every member
    with its group's first member's anchor length and anchor pages."""
    g = anchor_groups.long()
    if g.numel() == 0:
        return
    bad = (g < -1) | (g >= shapes.B)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"anchor_groups[{i}, {j}] = {int(g[i, j])} is not a sequence index in [0, {shapes.B}) or -1")
    gap = (g[:, 1:] >= 0) & (g[:, :-1] < 0)
    if bool(gap.any()):
        i, j = (int(x) for x in gap.nonzero()[0])
        raise ValueError(f"anchor_groups[{i}, {j + 1}] follows padding (-1): list a group's sequences first")
    members = g[g >= 0]
    counts = torch.bincount(members, minlength=shapes.B)
    if bool((counts > 1).any()):
        b = int((counts > 1).nonzero()[0])
        raise ValueError(f"anchor_groups lists sequence {b} {int(counts[b])} times (a sequence belongs to one group)")
    leader = g[:, :1].clamp(min=0).expand_as(g)
    live = g >= 0
    member = g.clamp(min=0)
    alens = anchor_lens.long()
    diff_len = live & (alens[member] != alens[leader])
    if bool(diff_len.any()):
        i, j = (int(x) for x in diff_len.nonzero()[0])
        raise ValueError(f"anchor_groups[{i}]: sequence {int(g[i, j])} has anchor_lens {int(alens[g[i, j]])} "
                         f"but the group's first sequence {int(g[i, 0])} has {int(alens[g[i, 0]])}")
    pages = (alens[g[:, 0].clamp(min=0)] + shapes.block_size - 1) // shapes.block_size  # [G]
    cols = torch.arange(anchor_block_table.shape[1], device=g.device)
    used = cols[None, :] < pages[:, None]  # [G, max_anchor_blocks]
    atab = anchor_block_table.long()
    diff_page = live[:, :, None] & used[:, None, :] & (atab[member] != atab[leader])  # [G, W, cols]
    if bool(diff_page.any()):
        i, j, c = (int(x) for x in diff_page.nonzero()[0])
        raise ValueError(f"anchor_groups[{i}]: sequence {int(g[i, j])} has anchor page {int(atab[g[i, j], c])} at "
                         f"anchor_block_table column {c} but the group's first sequence {int(g[i, 0])} has "
                         f"{int(atab[g[i, 0], c])} (a group shares one anchor)")


def paged_anchor_attention(
    q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
    anchor_block_table=None, anchor_lens=None, *, softmax_scale=None, k_scale=None, v_scale=None,
    return_lse=False, sliding_window=None, logit_softcap=None, validate=True,
    kv_split_tokens=KV_SPLIT_TOKENS, config=None, anchor_groups=None,
):
    """Fused paged attention over ``[anchor tokens; context tokens]`` (docs/DESIGN.md, "Kernel arguments"), same
    semantics and arguments as :func:`fieldprint.attention.reference_attention`.

    q: [T, Hq, D] fp16/bf16; k_cache, v_cache: [num_blocks, block_size, Hkv, D] of q's dtype or
    float8_e4m3fn (with k_scale / v_scale: float, 1-element or [Hkv] tensor); block_table:
    [B, max_blocks] int32; seq_lens: [B] int32; query_start_loc: [B+1] int32;
    anchor_block_table: [B, max_anchor_blocks] int32; anchor_lens: [B] int32.
    ``sliding_window`` limits the context (anchors always stay visible); ``logit_softcap``
    applies ``c * tanh(s / c)`` to the scaled scores. ``validate=False`` skips the checks that
    read index tensors (no host synchronization, for CUDA-graph capture); shape/dtype/stride
    checks always run. ``kv_split_tokens``: split-KV length in decode mode (a fixed token count,
    never derived from the batch). ``config``: optional overrides of :func:`kernel_config`.

    ``anchor_groups`` (optional): int32 ``[G, W]``, each row the indices of up to ``W``
    sequences that share one anchor (identical ``anchor_lens`` and anchor pages), then -1
    padding (a row of -1 is an empty group). In the same launch each group's anchor pages are
    read once per tile of ``group_block_m // group_pad`` of the group's query tokens (16 at GQA 4
    by default, see :func:`kernel_config`: 16 decode sequences, or chunked-prefill tokens of one
    or several sequences) and applied to all their query rows as one matrix product (read-once
    anchors); the grouped sequences' own programs walk only their context, and the split combine
    merges both (in prefill mode too, where it then holds two fp32 partials per query row).
    Sequences in no group take the ungrouped path. Checked when ``validate`` (host reads); with
    ``validate=False`` a group that breaks these rules gives undefined results. A grouped
    sequence's output bits do not depend on which or how many other sequences share its group
    or its tile, provided the tile shapes (``group_block_m``, ``block_m``, ``tile_n``,
    ``num_warps``) and ``kv_split_tokens`` stay fixed (they never depend on the group sizes) and
    the batch stays in the same mode (decode or prefill, see above); they may differ in the last
    bits from the same sequence ungrouped (different splits).
    Returns out [T, Hq, D] in q's dtype, and lse [T, Hq] float32 (natural log) if ``return_lse``.
    """
    shapes = check_shapes(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                          anchor_block_table, anchor_lens, softmax_scale=softmax_scale,
                          k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
                          logit_softcap=logit_softcap, q_dtypes=(torch.float16, torch.bfloat16),
                          kv_dtypes=(torch.float16, torch.bfloat16, torch.float8_e4m3fn))
    _check_kernel_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                         anchor_block_table, anchor_lens, kv_split_tokens)
    if anchor_groups is not None:
        _check_anchor_groups(anchor_groups, shapes, anchor_block_table, q.device)
    if validate:
        check_values(shapes, block_table, seq_lens, query_start_loc, anchor_block_table, anchor_lens,
                     k_scale=k_scale, v_scale=v_scale)
        if anchor_groups is not None:
            _check_anchor_group_values(anchor_groups, shapes, anchor_block_table, anchor_lens)
        if _dot_fp16(q.dtype, k_cache.dtype) and q.dtype == torch.bfloat16 and q.numel():
            if float(q.abs().amax()) > 65504.0:
                raise ValueError("q: with a float8_e4m3fn KV cache the dots run in fp16, so |q| must "
                                 "be <= 65504 (scale q down, or use a bf16 cache)")
    cfg = dict(config or {})
    decode_tile = kernel_config(shapes.D, shapes.block_size, shapes.group, "decode", k_cache.dtype, **cfg)["tile_n"]
    kernel_config(shapes.D, shapes.block_size, shapes.group, "prefill", k_cache.dtype, **cfg)
    if kv_split_tokens % decode_tile:
        raise ValueError(f"kv_split_tokens ({kv_split_tokens}) must be a multiple of the KV tile ({decode_tile})")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"paged_anchor_attention runs a Triton kernel and needs CUDA tensors (q is on {q.device}); "
            "on a CPU use fieldprint.attention.reference_attention (or set TRITON_INTERPRET=1 for tests)")
    ks_t, ks_f = _scale_arg(k_scale)
    vs_t, vs_f = _scale_arg(v_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(shapes.D)
    out, lse = _paged_anchor_attention_op(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table, anchor_lens,
        ks_t, vs_t, scale, ks_f, vs_f, int(sliding_window or 0), float(logit_softcap or 0.0),
        int(kv_split_tokens), int(cfg.get("tile_n", 0)), int(cfg.get("block_m", 0)),
        int(cfg.get("num_warps", 0)), int(cfg.get("num_stages", 0)), anchor_groups,
        int(cfg.get("group_block_m", 0)), cfg.get("pipelined", False))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Compile specs for the SRAM experiment (E2)


class CompileSpec(NamedTuple):
    """One kernel launch as ``triton.compile`` arguments:
    ``triton.compile(ASTSource(fn, signature, constexprs, spec.attrs), target=..., options=options)``.
    ``attrs`` marks pointers and the strides the wrapper passes as divisible by 16, as a real
    launch on contiguous tensors would specialize them."""

    fn: object
    signature: dict
    constexprs: dict
    options: dict

    @property
    def attrs(self) -> dict:
        names = self.fn.arg_names
        unaligned = ("stride_bt", "stride_at", "stride_g", "stride_gt")  # table widths: any int
        aligned = [n for n, t in self.signature.items()
                   if t.startswith("*") or (n.startswith("stride_") and n not in unaligned)]
        return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv"}


def sm90_compile_specs(head_dim: int, block_size: int, kv_dtype: torch.dtype, group: int, mode: str,
                       q_dtype: torch.dtype = torch.bfloat16, anchors: bool = True,
                       sliding_window: bool = False, logit_softcap: bool = False,
                       scale_mode: int = 0, anchor_groups: bool = False, v_layout: str = "nhd",
                       **overrides) -> list[CompileSpec]:
    """The kernels ``paged_anchor_attention`` launches for these shapes (decode, and prefill with
    ``anchor_groups``: attention + split combine; prefill: attention), with the same constexprs
    and options. Nothing in them depends on the number of anchors, the context length or the
    group sizes: those are runtime loop bounds. ``anchor_groups``: the variant launched with
    ``anchor_groups``. ``v_layout``: the V pool's page layout (:data:`V_LAYOUTS`), which a launch
    specializes through the stride equal to 1 (D's in ``"nhd"``, the tokens' in ``"hdn"``)."""
    if anchor_groups and not anchors:
        raise ValueError("anchor_groups needs anchors=True")
    if not isinstance(_paged_anchor_attn_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("sm90_compile_specs needs compiled kernels: unset TRITON_INTERPRET (the "
                           "interpreter replaces @triton.jit functions) and run it in a fresh process")
    cfg = kernel_config(head_dim, block_size, group, mode, kv_dtype, anchors=anchors, **overrides)
    qt, kt = _TRITON_DTYPES[q_dtype], _TRITON_DTYPES[kv_dtype]
    ptr = {"q_ptr": qt, "k_ptr": kt, "v_ptr": kt, "out_ptr": qt, "lse_ptr": "fp32",
           "part_out_ptr": "fp32", "part_lse_ptr": "fp32", "block_table_ptr": "i32",
           "seq_lens_ptr": "i32", "qsl_ptr": "i32", "anchor_table_ptr": "i32", "anchor_lens_ptr": "i32",
           "groups_ptr": "i32", "group_tok_ptr": "i32", "group_tile_ptr": "i32", "seq_grouped_ptr": "i32",
           "k_scale_ptr": "fp32", "v_scale_ptr": "fp32"}
    floats = ("k_scale_val", "v_scale_val", "sm_scale", "softcap")
    constexprs = {"GROUP": group, "GP": cfg["group_pad"], "BLOCK_Q": cfg["block_q"],
                  "BLOCK_M": cfg["block_m"], "GROUP_BLOCK_M": cfg["group_block_m"],
                  "HEAD_DIM": head_dim, "BS": block_size,
                  "TILE_N": cfg["tile_n"], "HAS_ANCHORS": anchors, "HAS_GROUPS": anchor_groups,
                  "HAS_WINDOW": sliding_window,
                  "HAS_SOFTCAP": logit_softcap, "KS_MODE": scale_mode, "VS_MODE": scale_mode,
                  "DOT_FP16": _dot_fp16(q_dtype, kv_dtype),
                  "E4M3_ASM": kv_dtype == torch.float8_e4m3fn, "V_HDN": check_layout("v_layout", v_layout) == "hdn",
                  "PIPELINED": cfg["pipelined"],
                  _UNIT_V_STRIDE[v_layout]: 1}
    fn = _paged_anchor_attn_kernel
    sig = {}
    for name in fn.arg_names:
        if name in ptr:
            sig[name] = "*" + ptr[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg["maxnreg"] is not None:
        options["maxnreg"] = cfg["maxnreg"]
    specs = [CompileSpec(fn, sig, constexprs, options)]
    if mode == "decode" or anchor_groups:
        cfn = _combine_kernel
        cconst = {"HEAD_DIM": head_dim, "TILE_N": cfg["tile_n"], "HAS_ANCHORS": anchors,
                  "HAS_GROUPS": anchor_groups}
        csig = {n: ("*" + qt if n == "out_ptr" else "*fp32" if n in ("lse_ptr", "part_out_ptr", "part_lse_ptr")
                    else "*i32" if n.endswith("_ptr") else "constexpr" if n in cconst else "i32")
                for n in cfn.arg_names}
        specs.append(CompileSpec(cfn, csig, cconst, {"num_warps": 1, "num_stages": 1}))
    return specs
