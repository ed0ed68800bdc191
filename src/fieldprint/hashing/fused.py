"""Fused quantize-and-hash of KV pages: pool pages in, leaf rows and leaf digests out, one launch.

    # the committer's form: pages read straight from the cache's pools, fixed shapes, no allocation
    plan = LeafPlan(spec, layers=L, kinds=2, max_pages=P)
    bufs = plan.buffers(device, capacity=N)
    launch_leaves(plan, bufs, k_pool, v_pool, desc, n_pages, base)

    # one call per batch of pages (E3, tests): pages [P, ...] -> codes, scales, helper, digests
    codes, scales, helper, digests = quantize_hash_pages(pages, "e4m3", "two_grid", page_ids=ids, layer=3, kind="k")

A *leaf* is one page (``[block_size, Hkv, D]`` of one layer's K or V pool) in the layout of
`fieldprint.leaf` (version 1: header, codes, one float32 power-of-two scale, helper bits, zero
padding). Bit for bit the same as quantizing each leaf's page on its own (`fieldprint.quant`,
scale rule of `fieldprint.formats`, the slots past the page's valid tokens zeroed) and hashing
its leaf bytes with BLAKE3 keyed by ``merkle.LEAF_KEY``. Formats: the 1-byte codes (e4m3, e5m2,
int8); bf16/fp16 codes are not fused.

`_leaf_kernel`: one lane per leaf, lanes of a program are consecutive leaves. A lane reads its
page twice: once for the page's largest magnitude (its scale exponent, `scale_exponent_bits`,
and whether it is finite), then 64-byte block by block while it quantizes
(`fieldprint.quant_kernels.quant_code_fast`), writes the block into the leaf row and compresses it.
Every lane walks the same leaf layout in step, so which field a block holds (header, codes,
scale, helper, padding) is decided by scalar branches, without divergence. Chunk chaining values
go to a scratch buffer and each lane then reduces its own chunk tree (bottom-up pairing with a
lone last node carried up: BLAKE3's left-complete tree), so the digest leaves the kernel finished.
Everything the launch varies with lives in device memory (the page descriptors, the number of
pages, the store row of the first leaf), so a CUDA graph can replay it for every commit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fieldprint.formats import FORMATS, ROUNDING_IDS, format_constants, scale_rule_constants
from fieldprint.hashing import _kernels as K
from fieldprint.hashing import _key_args, _key_bytes
from fieldprint.leaf import KIND_IDS, LeafSpec, check_page_ids, header_offset
from fieldprint.merkle import LEAF_KEY
from fieldprint.quant import check_seed, seed_keys
from fieldprint.quant_kernels import counter_bits, hardware_fp8, quant_code, quant_code_fast, to_float32

__all__ = ["FUSED_FORMATS", "LeafBuffers", "LeafPlan", "launch_leaves", "quantize_hash_pages"]

FUSED_FORMATS = tuple(name for name, f in FORMATS.items() if f.width == 1)  # the fp8 and int8 codes
POOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DESC_FIELDS = 3  # a page descriptor: pool page, valid tokens, page id (int64 each)
_SCALAR_ARGS = ["C", "key0", "key1", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "key_flags"]
_PAGE_ID_WORD = header_offset("page_id")[0] // 4  # the kernel writes each leaf's page id into words 2, 3
_BLOCK = 32  # leaves per program (one warp)
# Codes a lane quantizes at a time. 8 rather than 16: on an H200 (1 GiB of bf16 pages of 16K
# elements) the launch ran 1.34x (e4m3 rne), 1.14x (trunc) and 1.07x (two_grid) as fast, with fewer
# registers (sm_90: 123 rather than 131 for rne; no spills at either size).
CODES_PER_STEP = tl.constexpr(8)


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
    """Codes and helper bits (int32, x's shape) of float32 values ``x`` at page positions ``elem``."""
    if ROUNDING == 2:
        return quant_code(x, k, counter_bits(elem.to(tl.int64), key0, key1), 0,
                          MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)
    else:
        return quant_code_fast(x, k, MBITS=MBITS, EMIN=EMIN, CMAX=CMAX, SIGN_SHIFT=SIGN_SHIFT, TWOS=TWOS,
                               ROUNDING=ROUNDING, HW=HW)


@triton.jit
def _word(wi, src, n_valid, hdr, page_lo, page_hi, k, valid, E, code_end, helper_end, key0, key1,
          MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr, SIGN_SHIFT: tl.constexpr,
          TWOS: tl.constexpr, ROUNDING: tl.constexpr, HW: tl.constexpr, PAGE_ID_WORD: tl.constexpr,
          BLOCK: tl.constexpr):
    """Leaf word ``wi`` (a scalar: the same for every lane) of each lane's leaf as [BLOCK] int32.
    The slow path: header, a code block cut by the end of the codes, scale, helper, padding."""
    w = tl.zeros([BLOCK], tl.int32)
    if wi < 16:
        # header: the (layer, kind) words of the leaf module, with each lane's page id written in
        w = tl.load(hdr + wi, mask=valid, other=0)
        w += tl.where(wi == PAGE_ID_WORD, page_lo, 0) + tl.where(wi == PAGE_ID_WORD + 1, page_hi, 0)
    elif wi < code_end:
        elem = (wi - 16) * 4 + tl.arange(0, 4)[None, :]
        x = to_float32(tl.load(src[:, None] + elem, mask=valid[:, None] & (elem < n_valid[:, None]), other=0.0))
        code, _ = _codes(x, elem, k[:, None], key0, key1, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW)
        w = tl.sum(code << (8 * tl.arange(0, 4))[None, :], axis=1)
    elif wi == code_end:
        w = (k + 127) << 23  # the float32 bits of the scale 2**k (`fieldprint.formats.pow2`)
    elif wi < helper_end:
        if ROUNDING == 3:
            elem = (wi - code_end - 1) * 32 + tl.arange(0, 32)[None, :]
            inside = elem < E
            x = to_float32(tl.load(src[:, None] + elem, mask=valid[:, None] & (elem < n_valid[:, None]),
                                   other=0.0))
            # the integer path: the hardware path's helper bits in this [BLOCK, 32] block were
            # wrong on an H200 (Triton 3.6; its codes in the [BLOCK, 16] blocks were exact)
            _, hb = _codes(x, elem, k[:, None], key0, key1, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)
            # distinct bits: the sum is their OR (bit 31 wraps to the sign, exactly)
            w = tl.sum(tl.where(inside, hb, 0) << tl.arange(0, 32)[None, :], axis=1)
    return w


@triton.jit
def _split16(w, BLOCK: tl.constexpr):
    """[BLOCK, 16] -> its 16 columns as [BLOCK] vectors, in order."""
    e, o = tl.split(tl.reshape(w, [BLOCK, 8, 2]))  # columns 0,2,..,14 and 1,3,..,15
    ee, eo = tl.split(tl.reshape(e, [BLOCK, 4, 2]))  # 0,4,8,12 and 2,6,10,14
    oe, oo = tl.split(tl.reshape(o, [BLOCK, 4, 2]))  # 1,5,9,13 and 3,7,11,15
    a0, a4 = tl.split(tl.reshape(ee, [BLOCK, 2, 2]))  # 0,8 and 4,12
    a2, a6 = tl.split(tl.reshape(eo, [BLOCK, 2, 2]))  # 2,10 and 6,14
    a1, a5 = tl.split(tl.reshape(oe, [BLOCK, 2, 2]))  # 1,9 and 5,13
    a3, a7 = tl.split(tl.reshape(oo, [BLOCK, 2, 2]))  # 3,11 and 7,15
    w0, w8 = tl.split(a0)
    w4, w12 = tl.split(a4)
    w2, w10 = tl.split(a2)
    w6, w14 = tl.split(a6)
    w1, w9 = tl.split(a1)
    w5, w13 = tl.split(a5)
    w3, w11 = tl.split(a3)
    w7, w15 = tl.split(a7)
    return w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15


@triton.jit
def _key_cv(t, k0, k1, k2, k3, k4, k5, k6, k7):
    """The key words as a lane-shaped chaining value (``t``: any uint32 [BLOCK] vector)."""
    z = t ^ t
    return (z + k0.to(tl.uint32, bitcast=True), z + k1.to(tl.uint32, bitcast=True),
            z + k2.to(tl.uint32, bitcast=True), z + k3.to(tl.uint32, bitcast=True),
            z + k4.to(tl.uint32, bitcast=True), z + k5.to(tl.uint32, bitcast=True),
            z + k6.to(tl.uint32, bitcast=True), z + k7.to(tl.uint32, bitcast=True))


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _leaf_kernel(
    k_ptr,  # [L, NB, E] K pool (fp16/bf16/fp32)
    v_ptr,  # [L, NB, E] V pool, same shape and dtype (KINDS == 1: unused, pass k_ptr)
    desc_ptr,  # [max_pages, 3] int64: pool page, valid tokens, page id
    n_pages_ptr,  # [1] int32: pages described (leaves = pages * L * KINDS)
    base_ptr,  # [1] int32/int64: store row of this launch's first leaf
    hdr_ptr,  # [L * KINDS, 16] int32: header words per (layer, kind), page id words zero
    rows_ptr,  # [capacity, ROW_WORDS] int32: leaf rows out, leaf j at row base + j
    cv_ptr,  # [max_leaves, C, 8] int32: scratch, chunk chaining values
    digest_ptr,  # [max_leaves, 8] int32: leaf digests out
    finite_ptr,  # [max_leaves] int8 out: 1 if the leaf's page held no NaN/Inf
    L, NB, E, TOK_ELEMS, C, ROW_WORDS, n_leaf_blocks, code_end, helper_end, capacity,
    key0, key1, k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
    KINDS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
    SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr, HW: tl.constexpr,
    SIG: tl.constexpr, EXP: tl.constexpr, SCALED: tl.constexpr, PAGE_ID_WORD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Leaves of the described pages, in leaf order (page, then layer, then K before V): leaf
    rows, digests and finite flags. Leaf j reads page ``desc[j // (L * KINDS)]`` of the pool of
    its kind in its layer; elements past ``tokens * TOK_ELEMS`` count as zeros. The leaf has
    n_leaf_blocks 64-byte blocks: block 0 the header, words [16, code_end) the codes, word
    code_end the scale, words (code_end, helper_end) the helper bits, zeros after."""
    n_leaves = tl.load(n_pages_ptr) * (L * KINDS)
    base = tl.load(base_ptr)
    first = tl.program_id(0) * BLOCK
    if first < n_leaves:
        leaf = first + tl.arange(0, BLOCK)
        valid = (leaf < n_leaves) & (base + leaf < capacity)
        leaf = tl.where(valid, leaf, 0)
        page = leaf // (L * KINDS)
        lk = leaf - page * (L * KINDS)  # header row: layer * KINDS + kind
        layer = lk // KINDS
        kind = lk - layer * KINDS
        block = tl.load(desc_ptr + page * 3, mask=valid, other=0)
        n_valid = (tl.load(desc_ptr + page * 3 + 1, mask=valid, other=0) * TOK_ELEMS).to(tl.int32)
        pid64 = tl.load(desc_ptr + page * 3 + 2, mask=valid, other=0)
        page_lo = (pid64 & 0xFFFFFFFF).to(tl.int32)
        page_hi = (pid64 >> 32).to(tl.int32)
        src_off = (layer.to(tl.int64) * NB + block) * E
        src = tl.where(kind == 0, k_ptr + src_off, v_ptr + src_off)
        n_valid = tl.where(valid, n_valid, 0)

        # pass 1: the page's largest magnitude, as float32 bits (NaN/Inf: >= 0x7F800000)
        amax = tl.zeros([BLOCK], tl.int32)
        e0 = 0
        while e0 < E:
            elem = e0 + tl.arange(0, 16)[None, :]
            x = to_float32(tl.load(src[:, None] + elem, mask=elem < n_valid[:, None], other=0.0))
            amax = tl.maximum(amax, tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1))
            e0 += 16
        tl.store(finite_ptr + leaf, (amax < 0x7F800000).to(tl.int8), mask=valid)
        k = scale_exponent_bits(amax, SIG, EXP, SCALED)

        hdr = hdr_ptr + lk * 16  # [BLOCK] pointers: each lane's header row
        row = rows_ptr + (base + leaf).to(tl.int64) * ROW_WORDS
        cvs = cv_ptr + leaf.to(tl.int64) * C * 8
        kf = key_flags.to(tl.uint32, bitcast=True)
        cols = tl.arange(0, 16)[None, :]

        # pass 2: the leaf, chunk by chunk, 64-byte block by block
        ci = 0
        while ci < C:
            t_lo = (leaf * 0 + ci).to(tl.uint32)
            t_hi = t_lo * 0
            h0, h1, h2, h3, h4, h5, h6, h7 = _key_cv(t_lo, k0, k1, k2, k3, k4, k5, k6, k7)
            n_blocks = tl.minimum(n_leaf_blocks - ci * 16, 16)
            b = 0
            while b < n_blocks:
                gb = ci * 16 + b  # block index inside the leaf, the same for every lane
                wb = gb * 16
                tile = tl.zeros([BLOCK, 16], tl.int32)  # the block's 16 message words
                if (gb >= 1) & (wb + 16 <= code_end):
                    # fast path: a whole block of codes, CODES_PER_STEP codes at a time
                    q = 0
                    while q < 64 // CODES_PER_STEP:
                        elem = (gb - 1) * 64 + q * CODES_PER_STEP + tl.arange(0, CODES_PER_STEP)[None, :]
                        x = to_float32(tl.load(src[:, None] + elem, mask=elem < n_valid[:, None], other=0.0))
                        code, _ = _codes(x, elem, k[:, None], key0, key1,
                                         MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW)
                        words: tl.constexpr = CODES_PER_STEP // 4
                        w4 = tl.sum(tl.reshape(code, [BLOCK, words, 4]) << (8 * tl.arange(0, 4))[None, None, :], axis=2)
                        at = (q * words + tl.arange(0, words))[None, :, None] == cols[:, None, :]  # [1, words, 16]
                        tile += tl.sum(tl.where(at, w4[:, :, None], 0), axis=1)
                        q += 1
                else:
                    j = 0
                    while j < 16:
                        w = _word(wb + j, src, n_valid, hdr, page_lo, page_hi, k, valid, E, code_end, helper_end,
                                  key0, key1, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW, PAGE_ID_WORD, BLOCK)
                        tile = tl.where(cols == j, w[:, None], tile)
                        j += 1
                tl.store(row[:, None] + wb + cols, tile, mask=valid[:, None])
                m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = _split16(
                    tile.to(tl.uint32, bitcast=True), BLOCK)
                at_end = b == n_blocks - 1
                flags = (kf | tl.where(b == 0, K.CHUNK_START, 0) | tl.where(at_end, K.CHUNK_END, 0)
                         | tl.where(at_end & (C == 1), K.ROOT, 0)).to(tl.uint32)
                h0, h1, h2, h3, h4, h5, h6, h7 = K._compress(
                    h0, h1, h2, h3, h4, h5, h6, h7,
                    m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
                    t_lo, t_hi, t_hi + 64, t_hi + flags)
                b += 1
            K.store_cv(cvs + ci * 8, h0, h1, h2, h3, h4, h5, h6, h7, valid)
            ci += 1

        # the chunk tree, each lane its own: pair nodes bottom-up in place, a lone last node
        # moves up unchanged; the compression that leaves one node carries ROOT
        m = C
        while m > 1:
            i = 0
            while i < m // 2:
                l0, l1, l2, l3, l4, l5, l6, l7 = K._node_words(cvs, (leaf * 0 + 2 * i).to(tl.int64), valid)
                r0, r1, r2, r3, r4, r5, r6, r7 = K._node_words(cvs, (leaf * 0 + 2 * i + 1).to(tl.int64), valid)
                flags = (kf | K.PARENT | tl.where(m == 2, K.ROOT, 0)).to(tl.uint32)
                z = l0 ^ l0
                p0, p1, p2, p3, p4, p5, p6, p7 = _key_cv(z, k0, k1, k2, k3, k4, k5, k6, k7)
                p0, p1, p2, p3, p4, p5, p6, p7 = K._compress(
                    p0, p1, p2, p3, p4, p5, p6, p7,
                    l0, l1, l2, l3, l4, l5, l6, l7, r0, r1, r2, r3, r4, r5, r6, r7, z, z, z + 64, z + flags)
                K.store_cv(cvs + i * 8, p0, p1, p2, p3, p4, p5, p6, p7, valid)
                i += 1
            if m % 2 == 1:
                c0, c1, c2, c3, c4, c5, c6, c7 = K._node_words(cvs, (leaf * 0 + m - 1).to(tl.int64), valid)
                K.store_cv(cvs + (m // 2) * 8, c0, c1, c2, c3, c4, c5, c6, c7, valid)
            m = (m + 1) // 2
        d0, d1, d2, d3, d4, d5, d6, d7 = K._node_words(cvs, (leaf * 0).to(tl.int64), valid)
        K.store_cv(digest_ptr + leaf.to(tl.int64) * 8, d0, d1, d2, d3, d4, d5, d6, d7, valid)


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
    layer of leaf ``(layer, kind)`` being ``layer_ids[layer]`` (default: the layer index)."""

    spec: LeafSpec
    layers: int
    kinds: int
    max_pages: int
    tokens_per_page: int  # a page's token slots (rows of TOK_ELEMS elements)
    key: bytes | None = LEAF_KEY
    layer_ids: tuple[int, ...] | None = None
    kind_ids: tuple[str, ...] = ("k", "v")

    def __post_init__(self) -> None:
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
        """[layers * kinds, 16] int32 header words (host), row ``layer * kinds + kind``."""
        ids = self.layer_ids or tuple(range(self.layers))
        return header_words(self.spec, [ids[i] for i in range(self.layers) for _ in range(self.kinds)],
                            [self.kind_ids[k] for _ in range(self.layers) for k in range(self.kinds)])

    def buffers(self, device: torch.device | str, capacity: int) -> LeafBuffers:
        """The launch's device buffers, for a store of ``capacity`` leaf rows."""
        dev = torch.device(device)
        return LeafBuffers(
            headers=self.headers().to(dev),
            rows=torch.zeros((capacity, self.spec.length), dtype=torch.uint8, device=dev),
            chaining=torch.empty((self.max_leaves, self.chunks, 8), dtype=torch.int32, device=dev),
            digests=torch.zeros((self.max_leaves, 32), dtype=torch.uint8, device=dev),
            finite=torch.zeros(self.max_leaves, dtype=torch.int8, device=dev),
        )


@dataclass
class LeafBuffers:
    """Device buffers of `launch_leaves` (`LeafPlan.buffers`)."""

    headers: torch.Tensor  # [layers * kinds, 16] int32
    rows: torch.Tensor  # [capacity, spec.length] uint8: the leaf rows (the committed copy)
    chaining: torch.Tensor  # [max_leaves, chunks, 8] int32 scratch
    digests: torch.Tensor  # [max_leaves, 32] uint8: the launch's leaf digests, leaf order
    finite: torch.Tensor  # [max_leaves] int8: the launch's finite flags


def _check_pool(name: str, pool: torch.Tensor, plan: LeafPlan) -> None:
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dtype not in POOL_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32, got {pool.dtype}")
    if pool.dim() < 2 or pool.shape[0] != plan.layers or pool[0, 0].numel() != plan.spec.elems:
        raise ValueError(f"{name} must be [layers={plan.layers}, num_blocks, ...] with {plan.spec.elems} elements "
                         f"per page, got shape {tuple(pool.shape)}")
    if not pool.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if pool.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} must be on a CUDA device, or TRITON_INTERPRET=1 must be set before triton is "
                         "imported to run the kernels on the CPU; use quantize + merkle.hash_pages otherwise")


def launch_leaves(plan: LeafPlan, bufs: LeafBuffers, k_pool: torch.Tensor, v_pool: torch.Tensor | None,
                  desc: torch.Tensor, n_pages: torch.Tensor, base: torch.Tensor, seed: int | None = None) -> None:
    """One launch of `_leaf_kernel`: no allocation, no host sync (capturable in a CUDA graph).

    Arguments:
        k_pool: [layers, num_blocks, ...] fp16/bf16/fp32, ``spec.elems`` elements per page.
        v_pool: the same shape and dtype (kinds 2), or None (kinds 1).
        desc: [max_pages, 3] int64: pool page, valid tokens, page id of each described page.
        n_pages: [1] int32: pages described (only those leaves are built).
        base: [1] int32 or int64: the store row of the first leaf (rows past ``capacity`` are not written).
        seed: the stochastic rounding seed (required by, and only by, ``stochastic``).
    Writes ``bufs.rows[base + j]``, ``bufs.digests[j]`` and ``bufs.finite[j]`` of every leaf j.
    """
    _check_pool("k_pool", k_pool, plan)
    if plan.kinds == 2:
        _check_pool("v_pool", v_pool, plan)
        if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype or v_pool.device != k_pool.device:
            raise ValueError("v_pool must have k_pool's shape, dtype and device")
    elif v_pool is not None:
        raise ValueError("v_pool must be None for a K-only plan (kinds=1)")
    for name, t, dtypes, shape in (("desc", desc, (torch.int64,), (plan.max_pages, DESC_FIELDS)),
                                   ("n_pages", n_pages, (torch.int32,), (1,)),
                                   ("base", base, (torch.int32, torch.int64), (1,))):
        if (not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != shape
                or t.device != k_pool.device):
            raise ValueError(f"{name} must be a {'/'.join(map(str, dtypes))} tensor of shape {list(shape)} "
                             f"on {k_pool.device}")
    check_seed(plan.spec.rounding, seed)
    spec = plan.spec
    at = spec.offsets()
    code_end = (at["codes"][0] + at["codes"][1]) // 4
    helper_end = code_end + 1 + -(-spec.helper_bytes // 4)
    if at["codes"][0] != 64 or at["scale"] != (4 * code_end, 4) or at["helper"][0] != 4 * code_end + 4:
        raise RuntimeError(f"the fused kernel cannot write the leaf layout {spec.fields()}")
    kw, kf = _key_args(_key_bytes(plan.key))
    keys = seed_keys(seed) if seed is not None else (0, 0)
    sig, exp = scale_rule_constants(spec.fmt)
    _leaf_kernel[(triton.cdiv(plan.max_leaves, _BLOCK),)](
        k_ptr=k_pool, v_ptr=v_pool if v_pool is not None else k_pool, desc_ptr=desc, n_pages_ptr=n_pages,
        base_ptr=base, hdr_ptr=bufs.headers, rows_ptr=bufs.rows.view(torch.int32), cv_ptr=bufs.chaining,
        digest_ptr=bufs.digests.view(torch.int32), finite_ptr=bufs.finite,
        L=plan.layers, NB=k_pool.shape[1], E=spec.elems, TOK_ELEMS=spec.elems // plan.tokens_per_page,
        C=plan.chunks, ROW_WORDS=spec.length // 4, n_leaf_blocks=spec.length // 64, code_end=code_end,
        helper_end=helper_end, capacity=bufs.rows.shape[0], key0=keys[0], key1=keys[1],
        k0=kw[0], k1=kw[1], k2=kw[2], k3=kw[3], k4=kw[4], k5=kw[5], k6=kw[6], k7=kw[7], key_flags=kf,
        KINDS=plan.kinds, **format_constants(spec.fmt), ROUNDING=ROUNDING_IDS[spec.rounding],
        HW=hardware_fp8(k_pool.device), SIG=sig, EXP=exp, SCALED=FORMATS[spec.fmt].scaled,
        PAGE_ID_WORD=_PAGE_ID_WORD, BLOCK=_BLOCK, num_warps=_BLOCK // 32)


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
