"""Fused quantize-and-hash of KV pages: pool pages in, leaf rows and leaf digests out, one launch.

    # the committer's form: pages read straight from the cache's pools, fixed shapes, no allocation
    plan = LeafPlan(spec, layers=L, kinds=2, max_pages=P)
    bufs = plan.buffers(device, capacity=N)
    launch_leaves(plan, bufs, k_pool, v_pool, desc, n_pages, base)  # pools: storage [L, NB, E]

    # one call per batch of pages (E3, tests): pages [P, ...] -> codes, scales, helper, digests
    codes, scales, helper, digests = quantize_hash_pages(pages, "e4m3", "two_grid", page_ids=ids, layer=3, kind="k")

A *leaf* is one page (``[block_size, Hkv, D]`` of one layer's K or V pool) in the layout of
`fieldprint.leaf` (version 1: header, codes, one float32 power-of-two scale, helper bits, zero
padding). Bit for bit the same as quantizing each leaf's page on its own (`fieldprint.quant`,
scale rule of `fieldprint.formats`, the slots past the page's valid tokens zeroed) and hashing
its leaf bytes with BLAKE3 keyed by ``merkle.LEAF_KEY``. Formats: the 1-byte codes (e4m3, e5m2,
int8); bf16/fp16 codes are not fused.

The kernel reads each pool as its storage ``[L, NB, E]``: a page is E contiguous elements, and
its codes run in that order. K pages are ``"nhd"`` (`fieldprint.page_layout`: a token's
elements contiguous, the valid ones the first ``tokens * Hkv * D``); a V pool may be ``"hdn"``
(`LeafPlan.v_layout`: ``[Hkv, D, block_size]``, element e is of token ``e % block_size``), which
the V leaves' headers name and the kernel's valid-token mask follows.

`_leaf_kernel`: a program of 128 lanes (4 warps) builds G consecutive leaves (`program_split`:
as many as have their full 1 KiB chunks fill the 128 lanes once; 8 for 16K-element e4m3 rne
leaves of 17 chunks), in three phases separated by block barriers:

1. Quantize. The G pages are visited PG at a time as coalesced [PG, TILE] tiles (each lane
   loading consecutive elements, 16-byte loads of bf16). A page that fits one tile is read once:
   its largest magnitude (`scale_exponent_bits`; NaN/Inf clear the finite flag) and its codes
   (`fieldprint.quant_kernels.quant_code_fast`, the hardware fp8 path on sm_89+ for every
   rounding but stochastic) come from the same registers. A larger page (16K elements: 4 tiles of 4096) is
   read twice, tile by tile, the amax pass then the codes pass (its tiles would not fit a lane's
   registers); the second read is of the page just read (32 KiB of bf16 apart), meant to hit L1
   or L2 so that the pool is read from memory once (not measured on a GPU yet). Every byte of the leaf rows is written
   to global memory: header (page id written into the leaf module's header words), codes, scale,
   helper bytes, zero padding.
2. Hash the chunks: one lane per chunk of the G leaves, 16 compressions each (the leaves' short
   last chunks in a round of their own), reading the row words just written through L2; chaining
   values to a scratch buffer.
3. Reduce each leaf's chunk tree, a level at a time, one lane per parent node (pairing bottom-up,
   a lone last node carried up: BLAKE3's left-complete tree); the root compression writes the
   digest.

Everything the launch varies with lives in device memory (the page descriptors, the number of
pages, the store row of the first leaf), so a CUDA graph can replay it for every commit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from fieldprint.formats import FORMATS, ROUNDING_IDS, format_constants, scale_rule_constants
from fieldprint.hashing import _kernels as K
from fieldprint.hashing import _key_args, _key_bytes
from fieldprint.leaf import KIND_IDS, LeafSpec, check_page_ids, header_offset
from fieldprint.merkle import LEAF_KEY
from fieldprint.page_layout import check_layout
from fieldprint.quant import check_seed, seed_keys
from fieldprint.quant_kernels import counter_bits, hardware_fp8, quant_code, quant_code_fast, to_float32

__all__ = ["FUSED_FORMATS", "LeafBuffers", "LeafPlan", "launch_leaves", "quantize_hash_pages"]

FUSED_FORMATS = tuple(name for name, f in FORMATS.items() if f.width == 1)  # the fp8 and int8 codes
POOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DESC_FIELDS = 3  # a page descriptor: pool page, valid tokens, page id (int64 each)
# C and NODES stay unspecialized: a constant C == 1 crashed Triton 3.6's coalesce pass for sm_90
_SCALAR_ARGS = ["C", "NODES", "key0", "key1", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "key_flags"]
_PAGE_ID_WORD = header_offset("page_id")[0] // 4  # the kernel writes each leaf's page id into words 2, 3
_LANES = 128  # lanes of a program (4 warps): phase 2's chunk lanes, phase 3's parent-node lanes
# Elements of one phase-1 tile [PG, TILE]: 32 a lane (four 16-byte loads of bf16 in flight a lane)
_TILE_ELEMS = 4096


@triton.jit
def scale_exponent_bits(a, SIG: tl.constexpr, EXP: tl.constexpr, SCALED: tl.constexpr):
    """The scale exponent (int32) of groups whose largest magnitudes have the float32 bit patterns
    ``a`` (int32, sign cleared): the Triton twin of `fieldprint.formats.scale_exponent`, with
    ``SIG, EXP = scale_rule_constants(fmt)``. 0 for the unscaled formats."""
    if SCALED:
        ef = a >> 23
        k = ef - (150 + EXP) + (((a & 0x7FFFFF) | 0x800000) > SIG).to(tl.int32)
        k = tl.where(ef == 0, -126, k)  # a subnormal amax fits below the smallest scale
        k = tl.where(a == 0, 0, k)
        return tl.minimum(tl.maximum(k, -126), 127)
    else:
        return a * 0


@triton.jit
def _codes(x, elem, k, key0, key1, MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
           SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr, HW: tl.constexpr):
    """Codes and helper bits (int32, x's shape) of float32 values ``x`` at page positions ``elem``.
    Stochastic rounding takes the integer path with its counter bits; the others `quant_code_fast`
    (hardware fp8 path where ``HW``). two_grid once took the integer path here because the hardware
    path's helper bits of a [BLOCK, 32] block were wrong on an H200; that run predates the fix
    that decodes v(n) from the code's bits instead of Triton's fp8 -> f32 conversion (the same
    run's trunc codes, which also read v(n), were wrong the same way). With the fix the hardware
    path passes tests/test_fused_hash.py on the H200, and E3 timed two_grid leaves at 0.44x
    hashing alone against 0.25x on the integer path."""
    if ROUNDING == 2:
        return quant_code(x, k, counter_bits(elem.to(tl.int64), key0, key1), 0,
                          MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)
    else:
        return quant_code_fast(x, k, MBITS=MBITS, EMIN=EMIN, CMAX=CMAX, SIGN_SHIFT=SIGN_SHIFT, TWOS=TWOS,
                               ROUNDING=ROUNDING, HW=HW)


@triton.jit
def _page_tile(src, tokens, hdn, ok, t0, E, TOK_ELEMS, TILE: tl.constexpr, V_HDN: tl.constexpr, TPP: tl.constexpr):
    """Elements [t0, t0 + TILE) of each of the PG pages at ``src`` ([PG] pointers) as [PG, TILE]
    float32, zeros past E and in the slots past a page's ``tokens`` ([PG] int32) valid tokens of
    its TPP: an "nhd" page's elements from ``tokens * TOK_ELEMS`` on; with ``V_HDN``, an "hdn"
    page's (``hdn`` [PG] bool; token-minor) those whose ``element % TPP >= tokens``."""
    elem = t0 + tl.arange(0, TILE)[None, :]
    valid = elem < (tokens * TOK_ELEMS)[:, None]
    if V_HDN:
        valid = tl.where(hdn[:, None], elem % TPP < tokens[:, None], valid)
    mask = ok[:, None] & valid & (elem < E)
    return to_float32(tl.load(src[:, None] + elem, mask=mask, other=0.0))


@triton.jit
def _magnitude_bits(x):
    """|x| as float32 bit patterns (int32): NaN/Inf are those >= 0x7F800000."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _write_codes(x, t0, k, row_b, ok, E, helper_at, key0, key1,
                 MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr, SIGN_SHIFT: tl.constexpr,
                 TWOS: tl.constexpr, ROUNDING: tl.constexpr, HW: tl.constexpr, TILE: tl.constexpr):
    """Quantize tile ``x`` ([PG, TILE] float32, elements [t0, t0 + TILE) of PG pages with scale
    exponents ``k`` [PG]) into the leaf rows at ``row_b`` ([PG] byte pointers): code bytes at 64 +
    element, two_grid's helper bytes at ``helper_at`` + element // 8 (t0 is a multiple of TILE,
    itself a multiple of 8 for two_grid)."""
    elem = t0 + tl.arange(0, TILE)[None, :]
    code, hb = _codes(x, elem, k[:, None], key0, key1, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW)
    tl.store(row_b[:, None] + 64 + elem, code.to(tl.uint8), mask=ok[:, None] & (elem < E))
    if ROUNDING == 3:
        PG: tl.constexpr = x.shape[0]
        # element 8 j + i is bit i of helper byte j; a lane's 8 consecutive elements make one byte
        byte = tl.sum(tl.reshape(hb, [PG, TILE // 8, 8]) << tl.arange(0, 8)[None, None, :], axis=2)
        at = t0 // 8 + tl.arange(0, TILE // 8)[None, :]
        tl.store(row_b[:, None] + helper_at + at, byte.to(tl.uint8), mask=ok[:, None] & (at < E // 8))


@triton.jit
def _key_cv(t, k0, k1, k2, k3, k4, k5, k6, k7):
    """The key words as a lane-shaped chaining value (``t``: any uint32 [LANES] vector)."""
    z = t ^ t
    return (z + k0.to(tl.uint32, bitcast=True), z + k1.to(tl.uint32, bitcast=True),
            z + k2.to(tl.uint32, bitcast=True), z + k3.to(tl.uint32, bitcast=True),
            z + k4.to(tl.uint32, bitcast=True), z + k5.to(tl.uint32, bitcast=True),
            z + k6.to(tl.uint32, bitcast=True), z + k7.to(tl.uint32, bitcast=True))


@triton.jit
def _load4_cg(ptr, ok):
    """Words ``ptr .. ptr + 3`` ([N] int32 pointers) as four [N] uint32 vectors (0 where not ok),
    one 16-byte load per lane, read at L2 (``.cg``): see phase 2 of `_leaf_kernel`."""
    N: tl.constexpr = ptr.shape[0]
    q = tl.load(ptr[:, None] + tl.arange(0, 4)[None, :], mask=ok[:, None], other=0, cache_modifier=".cg")
    a, b = K._split(q.to(tl.uint32, bitcast=True), N, 2)  # words 0, 2 and 1, 3
    w0, w2 = K._split(a, N, 1)
    w1, w3 = K._split(b, N, 1)
    return w0, w1, w2, w3


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _leaf_kernel(
    k_ptr,  # [L, NB, E] K pool (fp16/bf16/fp32)
    v_ptr,  # [L, NB, E] V pool storage, same dtype, "hdn" pages if V_HDN (KINDS == 1: unused, pass k_ptr)
    desc_ptr,  # [max_pages, 3] int64: pool page, valid tokens, page id
    n_pages_ptr,  # [1] int32: pages described (leaves = pages * L * KINDS)
    base_ptr,  # [1] int32/int64: store row of this launch's first leaf
    hdr_ptr,  # [L * KINDS, 16] int32: header words per (layer, kind), page id words zero
    rows_ptr,  # [capacity, ROW_WORDS] int32: leaf rows out, leaf j at row base + j
    row_bytes_ptr,  # the same rows as [capacity, 4 * ROW_WORDS] uint8
    cv_ptr,  # [max_leaves, NODES, 8] int32: scratch, the chaining values of each leaf's chunk tree
    digest_ptr,  # [max_leaves, 8] int32: leaf digests out
    finite_ptr,  # [max_leaves] int8 out: 1 if the leaf's page held no NaN/Inf
    L, NB, E, TOK_ELEMS, C, NODES, ROW_WORDS, code_end, pad_at, capacity,
    key0, key1, k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
    KINDS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
    SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr, HW: tl.constexpr,
    SIG: tl.constexpr, EXP: tl.constexpr, SCALED: tl.constexpr, PAGE_ID_WORD: tl.constexpr,
    V_HDN: tl.constexpr, TPP: tl.constexpr,  # TPP a constant: a power-of-two page size makes V_HDN's `%` a mask
    G: tl.constexpr, PG: tl.constexpr, TILE: tl.constexpr, ONE_TILE: tl.constexpr, LANES: tl.constexpr,
):
    """Leaves of the described pages, in leaf order (page, then layer, then K before V): leaf
    rows, digests and finite flags; program p builds leaves [p G, p G + G). Leaf j reads page
    ``desc[j // (L * KINDS)]`` of the pool of its kind in its layer, a page of TPP token slots of
    TOK_ELEMS elements; the elements of the slots past ``tokens`` count as zeros (in the order of
    an "hdn" page for the V leaves when V_HDN, `_page_tile`). A leaf row is ROW_WORDS words
    (ROW_WORDS / 16 64-byte blocks, C chunks): words [0, 16) the header, bytes [64, 64 + E) the
    codes, word code_end the scale, bytes [4 code_end + 4, pad_at) the helper bits, zeros after.
    Leaves past the page count or whose row base + j is at or past ``capacity`` are skipped (no
    row, digest or flag)."""
    n_leaves = tl.load(n_pages_ptr) * (L * KINDS)
    base = tl.load(base_ptr)
    first = tl.program_id(0) * G
    if first < n_leaves:
        row_bytes = ROW_WORDS * 4
        helper_at = code_end * 4 + 4

        # Phase 1: quantize, PG leaves at a time as [PG, TILE] tiles (coalesced, each lane loading
        # consecutive elements), writing every byte of their rows. A page in one tile (ONE_TILE) is
        # read once and kept in registers from its largest magnitude to its codes; a larger page is
        # read twice, a tile at a time (the amax, then the codes): its tiles do not fit a lane's
        # registers; the second read is of the page just read, meant to hit L1 or L2.
        for gi in range(0, (G + PG - 1) // PG):
            if first + gi * PG < n_leaves:
                leaf = first + gi * PG + tl.arange(0, PG)
                ok = (leaf < first + G) & (leaf < n_leaves) & (base + leaf < capacity)
                leaf = tl.where(ok, leaf, 0)
                page = leaf // (L * KINDS)
                lk = leaf - page * (L * KINDS)  # header row: layer * KINDS + kind
                layer = lk // KINDS
                d = desc_ptr + page * 3
                block = tl.load(d, mask=ok, other=0)
                tokens = tl.load(d + 1, mask=ok, other=0).to(tl.int32)
                pid64 = tl.load(d + 2, mask=ok, other=0)
                src_off = (layer.to(tl.int64) * NB + block) * E
                is_v = lk - layer * KINDS == 1  # kind 1 is V (only with KINDS == 2)
                if KINDS == 1:
                    src = k_ptr + src_off
                else:
                    src = tl.where(is_v, v_ptr + src_off, k_ptr + src_off)
                row = (base + leaf).to(tl.int64)
                row_w = rows_ptr + row * ROW_WORDS
                row_b = row_bytes_ptr + row * row_bytes
                if ONE_TILE:
                    x = _page_tile(src, tokens, is_v, ok, 0, E, TOK_ELEMS, TILE, V_HDN, TPP)
                    amax = tl.max(_magnitude_bits(x), axis=1)
                    k = scale_exponent_bits(amax, SIG, EXP, SCALED)
                    _write_codes(x, 0, k, row_b, ok, E, helper_at, key0, key1,
                                 MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW, TILE)
                else:
                    am = tl.zeros([PG, TILE], tl.int32)
                    ti = 0
                    while ti * TILE < E:
                        x = _page_tile(src, tokens, is_v, ok, ti * TILE, E, TOK_ELEMS, TILE, V_HDN, TPP)
                        am = tl.maximum(am, _magnitude_bits(x))
                        ti += 1
                    amax = tl.max(am, axis=1)
                    k = scale_exponent_bits(amax, SIG, EXP, SCALED)
                    ti = 0
                    while ti * TILE < E:
                        x = _page_tile(src, tokens, is_v, ok, ti * TILE, E, TOK_ELEMS, TILE, V_HDN, TPP)
                        _write_codes(x, ti * TILE, k, row_b, ok, E, helper_at, key0, key1,
                                     MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW, TILE)
                        ti += 1
                tl.store(finite_ptr + leaf, (amax < 0x7F800000).to(tl.int8), mask=ok)
                # the header of the leaf module with the page id written in, the scale 2**k as
                # float32 bits (`fieldprint.formats.pow2`), the zero padding
                cols = tl.arange(0, 16)[None, :]
                hw = tl.load(hdr_ptr + lk[:, None] * 16 + cols, mask=ok[:, None], other=0)
                hw += (tl.where(cols == PAGE_ID_WORD, (pid64 & 0xFFFFFFFF).to(tl.int32)[:, None], 0)
                       + tl.where(cols == PAGE_ID_WORD + 1, (pid64 >> 32).to(tl.int32)[:, None], 0))
                tl.store(row_w[:, None] + cols, hw, mask=ok[:, None])
                tl.store(row_w + code_end, (k + 127) << 23, mask=ok)
                pad = pad_at + tl.arange(0, 64)[None, :]
                tl.store(row_b[:, None] + pad, tl.zeros([PG, 64], tl.uint8), mask=ok[:, None] & (pad < row_bytes))
        # bar.sync orders this CTA's global writes before its reads after the barrier (CUDA: writes
        # before __syncthreads are visible to the block's threads after it); the reads of phase 2
        # also go around L1 (.cg), which holds no line of these rows and gets none.
        tl.debug_barrier()

        # Phase 2: one lane per chunk of the program's leaves, as `_kernels.chunk_kernel`: the
        # leaves' full chunks (16 blocks) first, leaf-major, then their last, short chunks (T
        # blocks), so a round of LANES chunks runs 16 compressions, or T when it holds only short
        # chunks. Chaining values go to the scratch nodes (a one-chunk leaf: its root, the digest).
        kf = key_flags.to(tl.uint32, bitcast=True)
        n_here = tl.minimum(n_leaves - first, G)
        n_blocks = ROW_WORDS // 16
        F = n_blocks // 16  # full chunks per leaf
        T = n_blocks - F * 16  # blocks of a short last chunk (0: none)
        n_full = n_here * F
        n_chunks = n_full + tl.where(T > 0, n_here, 0)
        r = 0
        while r < n_chunks:
            flat = r + tl.arange(0, LANES)
            short = flat >= n_full
            per = tl.maximum(F, 1)
            local = tl.where(short, flat - n_full, flat // per)
            ci = tl.where(short, F, flat - (flat // per) * per)  # the chunk counter
            last = tl.where(short, T - 1, 15)  # the chunk's final block
            leaf = first + local
            ok = (flat < n_chunks) & (base + leaf < capacity)
            leaf = tl.where(ok, leaf, 0).to(tl.int64)
            words = rows_ptr + (base + leaf) * ROW_WORDS + ci * 256
            t_lo = ci.to(tl.uint32)
            t_hi = t_lo * 0
            h0, h1, h2, h3, h4, h5, h6, h7 = _key_cv(t_lo, k0, k1, k2, k3, k4, k5, k6, k7)
            b = 0
            while b < tl.where(r < n_full, 16, T):
                live = ok & (b <= last)
                w = words + b * 16
                m0, m1, m2, m3 = _load4_cg(w, live)
                m4, m5, m6, m7 = _load4_cg(w + 4, live)
                m8, m9, m10, m11 = _load4_cg(w + 8, live)
                m12, m13, m14, m15 = _load4_cg(w + 12, live)
                at_end = b == last
                flags = (kf | tl.where(b == 0, K.CHUNK_START, 0) | tl.where(at_end, K.CHUNK_END, 0)
                         | tl.where(at_end & (C == 1), K.ROOT, 0)).to(tl.uint32)
                n0, n1, n2, n3, n4, n5, n6, n7 = K._compress(
                    h0, h1, h2, h3, h4, h5, h6, h7,
                    m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
                    t_lo, t_hi, t_hi + 64, flags)
                h0 = tl.where(live, n0, h0)
                h1 = tl.where(live, n1, h1)
                h2 = tl.where(live, n2, h2)
                h3 = tl.where(live, n3, h3)
                h4 = tl.where(live, n4, h4)
                h5 = tl.where(live, n5, h5)
                h6 = tl.where(live, n6, h6)
                h7 = tl.where(live, n7, h7)
                b += 1
            out = tl.where(C == 1, digest_ptr + leaf * 8, cv_ptr + (leaf * NODES + ci) * 8)
            K.store_cv(out, h0, h1, h2, h3, h4, h5, h6, h7, ok)
            r += LANES
        tl.debug_barrier()  # the chaining values, as the rows above (the node reads below use L1)

        # Phase 3: each leaf's chunk tree, a level at a time, one lane per parent node: nodes 2i
        # and 2i + 1 of a level of m merge into node i of the next, a lone last node moves up
        # unchanged (pairing bottom-up with that carry is BLAKE3's left-complete tree); the
        # compression that leaves one node carries ROOT and writes the digest. A leaf's levels lie
        # one after another in its NODES scratch nodes, so no level overwrites one still read.
        k0u = k0.to(tl.uint32, bitcast=True)
        k1u = k1.to(tl.uint32, bitcast=True)
        k2u = k2.to(tl.uint32, bitcast=True)
        k3u = k3.to(tl.uint32, bitcast=True)
        k4u = k4.to(tl.uint32, bitcast=True)
        k5u = k5.to(tl.uint32, bitcast=True)
        k6u = k6.to(tl.uint32, bitcast=True)
        k7u = k7.to(tl.uint32, bitcast=True)
        m = C
        at = 0  # the level's first node
        while m > 1:
            mo = (m + 1) // 2
            flags = (kf | K.PARENT | tl.where(mo == 1, K.ROOT, 0)).to(tl.uint32)
            n_par = n_here * mo
            r = 0
            while r < n_par:
                flat = r + tl.arange(0, LANES)
                local = flat // mo
                i = flat - local * mo
                leaf = first + local
                ok = (flat < n_par) & (base + leaf < capacity)
                leaf = tl.where(ok, leaf, 0).to(tl.int64)
                pair = ok & (2 * i + 1 < m)
                nodes = cv_ptr + leaf * NODES * 8
                l0, l1, l2, l3, l4, l5, l6, l7 = K._node_words(nodes, (at + 2 * i).to(tl.int64), ok)
                r0, r1, r2, r3, r4, r5, r6, r7 = K._node_words(nodes, (at + 2 * i + 1).to(tl.int64), pair)
                p0, p1, p2, p3, p4, p5, p6, p7 = K._merge(
                    k0u, k1u, k2u, k3u, k4u, k5u, k6u, k7u, flags, pair,
                    l0, l1, l2, l3, l4, l5, l6, l7, r0, r1, r2, r3, r4, r5, r6, r7)
                out = tl.where(mo == 1, digest_ptr + leaf * 8, nodes + (at + m + i).to(tl.int64) * 8)
                K.store_cv(out, p0, p1, p2, p3, p4, p5, p6, p7, ok)
                r += LANES
            tl.debug_barrier()
            at += m
            m = mo


def tree_nodes(chunks: int) -> int:
    """Scratch chaining values a leaf of ``chunks`` chunks needs in `_leaf_kernel`: every level
    of its chunk tree below the root, one after another (at least 1, for the buffer's shape)."""
    n, m = 0, chunks
    while m > 1:
        n += m
        m = (m + 1) // 2
    return max(n, 1)


def program_split(plan: LeafPlan) -> tuple[int, int, int]:
    """(G, PG, TILE) of `_leaf_kernel` for ``plan``: G leaves per program, as many as have their
    full chunks fill at most one round of chunk lanes (17-chunk leaves: 8 fill 128 lanes; 19-chunk
    two_grid leaves of 16K elements: 7 fill 126); phase-1 tiles of PG leaves by TILE elements (powers
    of two, PG * TILE <= `_TILE_ELEMS`)."""
    full = max(plan.spec.length // K.CHUNK_LEN, 1)
    g = max(_LANES // full, 1)
    tile = min(_TILE_ELEMS, triton.next_power_of_2(plan.spec.elems))
    return g, min(triton.next_power_of_2(g), _TILE_ELEMS // tile), tile


def _s32(v: int) -> int:
    """A 32-bit word as the signed int the kernels bitcast back."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _le_words(data: bytes) -> list[int]:
    """Little-endian 32-bit words of ``data`` as the signed ints the kernel bitcasts back."""
    return [_s32(int.from_bytes(data[i:i + 4], "little")) for i in range(0, len(data), 4)]


def header_words(spec: LeafSpec, layers: list[int], kinds: list[str]) -> torch.Tensor:
    """[len(layers), 16] int32 (host): `fieldprint.leaf`'s header of each (layer, kind) with the
    page id words zero, the table `_leaf_kernel` reads. Checked once that the kernel's overlay of
    a page id (words `_PAGE_ID_WORD`, +1) gives the leaf module's header of that page id: the
    kernel holds no other knowledge of the header."""
    rows = []
    probe = 0x8123456789ABCDEF  # both id words nonzero, the high one with its top bit set
    for layer, kind in zip(layers, kinds, strict=True):
        words = _le_words(spec.header(0, layer, kind))
        written = list(words)
        written[_PAGE_ID_WORD] += _s32(probe)
        written[_PAGE_ID_WORD + 1] += _s32(probe >> 32)
        if (words[_PAGE_ID_WORD:_PAGE_ID_WORD + 2] != [0, 0]
                or written != _le_words(spec.header(probe, layer, kind))):
            raise RuntimeError("the fused kernel's page-id words disagree with fieldprint.leaf's header layout")
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 16)


@dataclass(frozen=True)
class LeafPlan:
    """The fixed shapes of one fused launch: leaves of ``spec`` for up to ``max_pages`` pages,
    each page giving ``layers * kinds`` leaves (kinds 2: K then V; 1: K only), with the header
    layer of leaf ``(layer, kind)`` being ``layer_ids[layer]`` (default: the layer index).
    ``spec`` is in the "nhd" page layout, the kernel's order of K pages (and of a K-only plan's);
    ``v_layout`` is the V pool's (kinds 2), which the V leaves' headers name and their
    valid-token mask follows (`fieldprint.page_layout`)."""

    spec: LeafSpec
    layers: int
    kinds: int
    max_pages: int
    tokens_per_page: int  # a page's token slots (rows of TOK_ELEMS elements)
    key: bytes | None = LEAF_KEY
    layer_ids: tuple[int, ...] | None = None
    kind_ids: tuple[str, ...] = ("k", "v")
    v_layout: str = "nhd"

    def __post_init__(self) -> None:
        if self.spec.page_layout != "nhd":
            raise ValueError(f"spec.page_layout must be 'nhd' (the kernel reads K pages in that order; a V pool's "
                             f"layout is v_layout), got {self.spec.page_layout!r}")
        check_layout("v_layout", self.v_layout)
        if self.kinds == 1 and self.v_layout != "nhd":
            raise ValueError(f"v_layout applies to a plan of K and V leaves (kinds=2), got {self.v_layout!r} "
                             "for a K-only plan")
        if self.spec.fmt not in FUSED_FORMATS:
            raise ValueError(f"fmt must be one of {list(FUSED_FORMATS)} for the fused path, got {self.spec.fmt!r} "
                             "(bf16/fp16 codes: use fieldprint.quant.quantize + merkle.hash_pages)")
        if self.spec.scales != 1:
            raise ValueError("the fused path writes one scale per leaf (spec.scales == 1)")
        if self.spec.elems % 4:
            raise ValueError(f"the fused path needs a multiple of 4 elements per page, got {self.spec.elems}")
        if self.kinds not in (1, 2):
            raise ValueError(f"kinds must be 1 (K only) or 2 (K and V), got {self.kinds}")
        for name in ("layers", "max_pages", "tokens_per_page"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.spec.elems % self.tokens_per_page:
            raise ValueError(f"tokens_per_page {self.tokens_per_page} must divide the page's "
                             f"{self.spec.elems} elements")
        if self.layer_ids is not None and len(self.layer_ids) != self.layers:
            raise ValueError(f"layer_ids must have {self.layers} entries, got {len(self.layer_ids)}")
        _key_bytes(self.key)

    @property
    def leaves_per_page(self) -> int:
        return self.layers * self.kinds

    @property
    def max_leaves(self) -> int:
        return self.max_pages * self.leaves_per_page

    @property
    def chunks(self) -> int:
        """BLAKE3 chunks per leaf."""
        return -(-self.spec.length // K.CHUNK_LEN)

    def headers(self) -> torch.Tensor:
        """[layers * kinds, 16] int32 header words (host), row ``layer * kinds + kind``; the V
        rows in ``v_layout``."""
        ids = list(self.layer_ids or range(self.layers))
        specs = (self.spec, replace(self.spec, page_layout=self.v_layout))
        rows = [header_words(specs[k], ids, [self.kind_ids[k]] * self.layers) for k in range(self.kinds)]
        return torch.stack(rows, dim=1).reshape(-1, 16)  # [layers, kinds, 16]

    def buffers(self, device: torch.device | str, capacity: int) -> LeafBuffers:
        """The launch's device buffers, for a store of ``capacity`` leaf rows."""
        dev = torch.device(device)
        return LeafBuffers(
            headers=self.headers().to(dev),
            rows=torch.zeros((capacity, self.spec.length), dtype=torch.uint8, device=dev),
            chaining=torch.empty((self.max_leaves, tree_nodes(self.chunks), 8), dtype=torch.int32, device=dev),
            digests=torch.zeros((self.max_leaves, 32), dtype=torch.uint8, device=dev),
            finite=torch.zeros(self.max_leaves, dtype=torch.int8, device=dev),
        )


@dataclass
class LeafBuffers:
    """Device buffers of `launch_leaves` (`LeafPlan.buffers`)."""

    headers: torch.Tensor  # [layers * kinds, 16] int32
    rows: torch.Tensor  # [capacity, spec.length] uint8: the leaf rows (the committed copy)
    chaining: torch.Tensor  # [max_leaves, tree_nodes(chunks), 8] int32 scratch: each leaf's chunk tree
    digests: torch.Tensor  # [max_leaves, 32] uint8: the launch's leaf digests, leaf order
    finite: torch.Tensor  # [max_leaves] int8: the launch's finite flags


def _check_pool(name: str, pool: torch.Tensor, plan: LeafPlan) -> None:
    """``pool``: the storage of a pool, [layers, num_blocks, ...] contiguous with ``spec.elems``
    elements per page (of any shape: an "hdn" V pool's is [layers, num_blocks, Hkv, D, S])."""
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dtype not in POOL_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32, got {pool.dtype}")
    if pool.dim() < 2 or pool.shape[0] != plan.layers or pool[0, 0].numel() != plan.spec.elems:
        raise ValueError(f"{name} must be [layers={plan.layers}, num_blocks, ...] with {plan.spec.elems} elements "
                         f"per page, got shape {tuple(pool.shape)}")
    if not pool.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the pool's storage, each page's elements in the order of its "
                         "page layout (an 'hdn' pool's logical view [L, N, S, Hkv, D] is not: pass its storage "
                         "[L, N, Hkv, D, S])")
    if pool.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} must be on a CUDA device, or TRITON_INTERPRET=1 must be set before triton is "
                         "imported to run the kernels on the CPU; use quantize + merkle.hash_pages otherwise")


def launch_leaves(plan: LeafPlan, bufs: LeafBuffers, k_pool: torch.Tensor, v_pool: torch.Tensor | None,
                  desc: torch.Tensor, n_pages: torch.Tensor, base: torch.Tensor, seed: int | None = None) -> None:
    """One launch of `_leaf_kernel`: no allocation, no host sync (capturable in a CUDA graph).

    Arguments:
        k_pool: [layers, num_blocks, ...] fp16/bf16/fp32, contiguous, ``spec.elems`` elements per
            page ("nhd" pages: row-major [S, Hkv, D], their valid tokens' elements first).
        v_pool: the same, with the same dtype, layers and num_blocks, its pages in ``plan.v_layout``
            (kinds 2: an "hdn" pool's storage [layers, num_blocks, Hkv, D, S]), or None (kinds 1).
        desc: [max_pages, 3] int64: pool page, valid tokens, page id of each described page.
        n_pages: [1] int32: pages described (only those leaves are built).
        base: [1] int32 or int64: the store row of the first leaf (rows past ``capacity`` are not written).
        seed: the stochastic rounding seed (required by, and only by, ``stochastic``).
    Writes ``bufs.rows[base + j]``, ``bufs.digests[j]`` and ``bufs.finite[j]`` of every leaf j.
    """
    _check_pool("k_pool", k_pool, plan)
    if plan.kinds == 2:
        _check_pool("v_pool", v_pool, plan)
        if v_pool.shape[:2] != k_pool.shape[:2] or v_pool.dtype != k_pool.dtype or v_pool.device != k_pool.device:
            raise ValueError("v_pool must have k_pool's layers, num_blocks, dtype and device")
    elif v_pool is not None:
        raise ValueError("v_pool must be None for a K-only plan (kinds=1)")
    for name, t, dtypes, shape in (("desc", desc, (torch.int64,), (plan.max_pages, DESC_FIELDS)),
                                   ("n_pages", n_pages, (torch.int32,), (1,)),
                                   ("base", base, (torch.int32, torch.int64), (1,))):
        if (not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != shape
                or t.device != k_pool.device):
            raise ValueError(f"{name} must be a {'/'.join(map(str, dtypes))} tensor of shape {list(shape)} "
                             f"on {k_pool.device}")
    if tuple(bufs.chaining.shape) != (plan.max_leaves, tree_nodes(plan.chunks), 8):
        raise ValueError(f"bufs.chaining must be [max_leaves, tree_nodes(chunks), 8] = "
                         f"{[plan.max_leaves, tree_nodes(plan.chunks), 8]} (LeafPlan.buffers), "
                         f"got {list(bufs.chaining.shape)}")
    check_seed(plan.spec.rounding, seed)
    spec = plan.spec
    at = spec.offsets()
    code_end = (at["codes"][0] + at["codes"][1]) // 4
    if at["codes"][0] != 64 or at["scale"] != (4 * code_end, 4) or at["helper"][0] != 4 * code_end + 4:
        raise RuntimeError(f"the fused kernel cannot write the leaf layout {spec.fields()}")
    kw, kf = _key_args(_key_bytes(plan.key))
    keys = seed_keys(seed) if seed is not None else (0, 0)
    sig, exp = scale_rule_constants(spec.fmt)
    g, pg, tile = program_split(plan)
    _leaf_kernel[(triton.cdiv(plan.max_leaves, g),)](
        k_ptr=k_pool, v_ptr=v_pool if v_pool is not None else k_pool, desc_ptr=desc, n_pages_ptr=n_pages,
        base_ptr=base, hdr_ptr=bufs.headers, rows_ptr=bufs.rows.view(torch.int32), row_bytes_ptr=bufs.rows,
        cv_ptr=bufs.chaining, digest_ptr=bufs.digests.view(torch.int32), finite_ptr=bufs.finite,
        L=plan.layers, NB=k_pool.shape[1], E=spec.elems, TOK_ELEMS=spec.elems // plan.tokens_per_page,
        C=plan.chunks, NODES=bufs.chaining.shape[1], ROW_WORDS=spec.length // 4, code_end=code_end,
        pad_at=at["helper"][0] + spec.helper_bytes, capacity=bufs.rows.shape[0], key0=keys[0], key1=keys[1],
        k0=kw[0], k1=kw[1], k2=kw[2], k3=kw[3], k4=kw[4], k5=kw[5], k6=kw[6], k7=kw[7], key_flags=kf,
        KINDS=plan.kinds, **format_constants(spec.fmt), ROUNDING=ROUNDING_IDS[spec.rounding],
        HW=hardware_fp8(k_pool.device), SIG=sig, EXP=exp, SCALED=FORMATS[spec.fmt].scaled,
        PAGE_ID_WORD=_PAGE_ID_WORD, V_HDN=plan.v_layout == "hdn", TPP=plan.tokens_per_page, G=g, PG=pg, TILE=tile,
        ONE_TILE=spec.elems <= tile, LANES=_LANES, num_warps=_LANES // 32)


def quantize_hash_pages(pages: torch.Tensor, fmt: str = "e4m3", rounding: str = "rne", *,
                        page_ids, layer: int, kind: str, key=LEAF_KEY, seed: int | None = None):
    """Quantize P pages, each with its own power-of-two scale, and hash their leaves, fused.

    pages: [P, ...] (e.g. [P, block_size, Hkv, D]) float16/bfloat16/float32, contiguous, finite,
    E elements per page (a multiple of 4; of 8 for two_grid), on CUDA (or the CPU under
    TRITON_INTERPRET=1). fmt: one of ``FUSED_FORMATS``; rounding: one of
    ``fieldprint.quant.ROUNDINGS``; seed: int in [0, 2**64), required by (and only by)
    ``stochastic``; page_ids: [P] ints (tensor or sequence), layer: int in [0, 2**32),
    kind: "k" or "v" (header fields of the leaf); key: 32 bytes (default ``merkle.LEAF_KEY``)
    or None for unkeyed BLAKE3.

    Returns (codes [P, E] uint8, scales [P] float32, helper [P, E // 8] uint8 for two_grid
    else None, digests [P, 32] uint8), all on pages' device (codes and helper are views into the
    leaf rows): page i equals ``quantize(pages[i:i+1], fmt, rounding, seed=seed)`` (codes,
    scale, helper) and ``merkle.hash_pages`` of it with page id ``page_ids[i]``, bit for bit.
    Reads one flag back (a sync) to raise ValueError when pages hold NaN/Inf.
    """
    if not isinstance(pages, torch.Tensor):
        raise TypeError(f"pages must be a torch.Tensor, got {type(pages).__name__}")
    if pages.dim() < 2 or pages.shape[0] < 1 or pages[0].numel() < 1:
        raise ValueError(f"pages must be [P >= 1, ...] with elements in each page, got shape {tuple(pages.shape)}")
    if pages.dtype not in POOL_DTYPES:
        raise TypeError(f"pages must be float16/bfloat16/float32, got {pages.dtype}")
    if not pages.is_contiguous():
        raise ValueError("pages must be contiguous (call .contiguous() first)")
    if pages.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "pages must be on a CUDA device, or TRITON_INTERPRET=1 must be set before triton is "
            "imported to run the kernels on the CPU; use quantize + merkle.hash_pages otherwise")
    n_pages, e = pages.shape[0], pages[0].numel()
    if e % 4:
        raise ValueError(f"pages must hold a multiple of 4 elements per page, got {e}")
    if e >= 2**30:
        raise ValueError(f"pages must hold fewer than 2**30 elements per page, got {e}")
    if not isinstance(rounding, str) or rounding not in ROUNDING_IDS:
        raise ValueError(f"rounding must be one of {list(ROUNDING_IDS)}, got {rounding!r}")
    if not isinstance(kind, str) or kind not in KIND_IDS:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    check_seed(rounding, seed)
    spec = LeafSpec(fmt, rounding, elems=e, seed=seed) if fmt in FORMATS else None
    if spec is None or fmt not in FUSED_FORMATS:
        raise ValueError(
            f"fmt must be one of {list(FUSED_FORMATS)} for the fused path, got {fmt!r} "
            "(bf16/fp16 codes: use fieldprint.quant.quantize + merkle.hash_pages)")
    plan = LeafPlan(spec, layers=1, kinds=1, max_pages=n_pages, tokens_per_page=1, key=_key_bytes(key),
                    layer_ids=(layer,), kind_ids=(kind,))
    dev = pages.device
    ids = check_page_ids(page_ids, n_pages)
    desc = torch.tensor([[i, 1, p] for i, p in enumerate(ids)], dtype=torch.int64).to(dev)
    bufs = plan.buffers(dev, capacity=n_pages)
    count = torch.tensor([n_pages], dtype=torch.int32).to(dev)
    launch_leaves(plan, bufs, pages.reshape(1, n_pages, e), None, desc, count, torch.zeros_like(count), seed)
    if not bool(bufs.finite.all()):
        raise ValueError("pages contains NaN or Inf")
    at = spec.offsets()
    codes = bufs.rows[:, 64:64 + e]
    helper = bufs.rows[:, at["helper"][0]:at["helper"][0] + spec.helper_bytes] if spec.helper_bytes else None
    scales = bufs.rows[:, at["scale"][0]:at["scale"][0] + 4].contiguous().view(torch.float32).reshape(-1)
    return codes, scales, helper, bufs.digests
