"""Fused quantize-and-hash of KV pages: pages in, codes + helper bits + leaf digests out.

    codes, scales, helper, digests = quantize_hash_pages(
        pages, "e4m3", "two_grid", page_ids=ids, layer=3, kind="k")

Bit for bit the same as quantizing each page on its own and hashing its leaf:
``qt = fieldprint.quant.quantize(pages[i:i+1], fmt, rounding, seed=seed)`` (per-tensor scale of
that page, stochastic counters indexed by the element's position *inside the page*), then
``fieldprint.merkle.hash_pages(qt, page_ids=[page_ids[i]], layer=layer, kind=kind)`` (leaf layout
version 1: 64-byte header, codes, one float32 scale, helper bits, zero padding to 64 bytes).
Formats: the 1-byte ones (e4m3, e5m2, int8); bf16/fp16 codes are not fused (use
``quantize`` + ``hash_pages``).

Steps: the page scales, one launch, then the BLAKE3 parent levels.

1. `fieldprint.leaf.page_scales`: each page's largest magnitude (one read of the pages, in
   torch), hence its scale exponent k (the one page-scale rule) and whether it is finite. A
   separate read: the scale of a page depends on all of its elements, and a chunk lane cannot
   wait for the other chunks of its page.
2. `_fused_kernel`: one lane per (page, chunk of its leaf); all lanes of a program hash the same
   chunk index of BLOCK consecutive pages, so which part of the leaf a 64-byte block holds
   (header, codes, scale/helper/padding) is the same for every lane and is decided by scalar
   branches, without divergence. Each lane builds its message words in registers: a code block
   quantizes its 64 elements 16 at a time (`quant_kernels.quant_code`) and packs them 4 to a
   little-endian word; the scale word is ``(k + 127) << 23`` (`fieldprint.formats.pow2`); a
   helper word recomputes the helper bits of its 32 elements (`pack` order of
   `quant.canonical_bytes`); the header words are `fieldprint.leaf`'s header of the batch with
   the lane's page id written into words 2 and 3 (checked against the leaf module once per
   configuration, `_header_words`). The field offsets come from `fieldprint.leaf.LeafSpec`.
   Codes and helper bytes are stored as side outputs; the leaf itself is never written to
   memory. Chunk chaining values then go through the hashing module's `reduce_parents`, as in
   `blake3_many`.

Two_grid pages therefore read their elements twice inside the fused kernel (codes, then helper
words); the second read usually hits L2.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fieldprint.formats import FORMATS, ROUNDING_IDS, format_constants, pow2
from fieldprint.hashing import _kernels as K
from fieldprint.hashing import _key_args, _key_bytes, reduce_parents
from fieldprint.leaf import LeafSpec, check_page_ids, header_offset, page_scales
from fieldprint.merkle import LEAF_KEY
from fieldprint.quant import check_seed, seed_keys
from fieldprint.quant_kernels import counter_bits, quant_code, to_float32

__all__ = ["FUSED_FORMATS", "quantize_hash_pages"]

FUSED_FORMATS = tuple(name for name, f in FORMATS.items() if f.width == 1)  # the fp8 and int8 codes
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALAR_ARGS = ["key0", "key1", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "key_flags"]
_PAGE_ID_WORD = header_offset("page_id")[0] // 4  # the kernel writes each page's id into words 2, 3


@triton.jit
def _codes_of(xrow, elem, mask, k, key0, key1,
              MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
              SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr):
    """Codes and helper bits (int32, elem's shape) of elements ``elem`` ([BLOCK, n] int32
    positions inside the page) of each lane's page row ``xrow`` ([BLOCK] pointers)."""
    x = to_float32(tl.load(xrow[:, None] + elem, mask=mask, other=0.0))
    if ROUNDING == 2:
        r = counter_bits(elem.to(tl.int64), key0, key1)
    else:
        r = 0
    return quant_code(x, k[:, None], r, 0, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)


@triton.jit
def _word(wi, xrow, crow, hrow, hdr_ptr, page_lo, page_hi, k, valid, E, code_end, helper_end, H, key0, key1,
          MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
          SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr,
          PAGE_ID_WORD: tl.constexpr, BLOCK: tl.constexpr):
    """Leaf word ``wi`` (a scalar: the same for every lane) of each lane's page, as [BLOCK]
    uint32; stores the codes / helper bytes it covers. The slow path: header, a code block
    cut by the end of the codes, scale, helper and padding words."""
    w = tl.zeros([BLOCK], tl.int32)
    if wi < 16:
        # header: the leaf module's words for this batch, with each lane's page id in its two words
        hv = tl.load(hdr_ptr + wi)
        w = w + hv + tl.where(wi == PAGE_ID_WORD, page_lo, 0) + tl.where(wi == PAGE_ID_WORD + 1, page_hi, 0)
    elif wi < code_end:
        elem = (wi - 16) * 4 + tl.arange(0, 4)[None, :]
        mask = valid[:, None] & (elem < E)
        code, _ = _codes_of(xrow, elem, mask, k, key0, key1,
                            MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING)
        tl.store(crow[:, None] + elem, code.to(tl.uint8), mask=mask)
        w = tl.sum(code << (8 * tl.arange(0, 4))[None, :], axis=1)
    elif wi == code_end:
        w = (k + 127) << 23  # the float32 bits of the scale 2**k
    elif wi < helper_end:
        if ROUNDING == 3:
            hw = wi - code_end - 1
            elem = hw * 32 + tl.arange(0, 32)[None, :]
            mask = valid[:, None] & (elem < E)
            _, hb = _codes_of(xrow, elem, mask, k, key0, key1,
                              MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING)
            # distinct bits: the sum is their OR (bit 31 wraps to the sign, exactly)
            w = tl.sum(tl.where(mask, hb, 0) << tl.arange(0, 32)[None, :], axis=1)
            byte = hw * 4 + tl.arange(0, 4)[None, :]
            tl.store(hrow[:, None] + byte, ((w[:, None] >> (8 * tl.arange(0, 4))[None, :]) & 0xFF).to(tl.uint8),
                     mask=valid[:, None] & (byte < H))
    return w.to(tl.uint32, bitcast=True)


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


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _fused_kernel(x_ptr, kexp_ptr, ids_ptr, hdr_ptr, codes_ptr, helper_ptr, out_ptr,
                  P, E, C, n_leaf_blocks, code_end, helper_end, H, key0, key1,
                  k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
                  MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
                  SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr,
                  PAGE_ID_WORD: tl.constexpr, BLOCK: tl.constexpr):
    """Chaining values out [P, C, 8] int32 of chunk ``program_id(1)`` of BLOCK pages' leaves.

    x: [P, E] pages; kexp: [P] int32 scale exponents; ids: [P] int64 page ids; hdr: [16] int32
    header words shared by the pages (page id words zero); codes: [P, E] uint8 and helper:
    [P, H] uint8 side outputs. The leaf has n_leaf_blocks 64-byte blocks:
    block 0 the header, words [16, code_end) the codes, word code_end the scale, words
    (code_end, helper_end) the helper bits, zeros after. C == 1: the chunk is the root and
    its output is the digest.
    """
    ci = tl.program_id(1)
    page = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = page < P
    page64 = page.to(tl.int64)
    xrow = x_ptr + page64 * E
    crow = codes_ptr + page64 * E
    hrow = helper_ptr + page64 * H
    k = tl.load(kexp_ptr + page, mask=valid, other=0)
    pid64 = tl.load(ids_ptr + page, mask=valid, other=0)
    page_lo = (pid64 & 0xFFFFFFFF).to(tl.int32)
    page_hi = (pid64 >> 32).to(tl.int32)
    n_blocks = tl.minimum(n_leaf_blocks - ci * 16, 16)
    t_lo = (page * 0 + ci).to(tl.uint32)
    t_hi = t_lo * 0
    kf = key_flags.to(tl.uint32, bitcast=True)
    h0 = t_hi + k0.to(tl.uint32, bitcast=True)
    h1 = t_hi + k1.to(tl.uint32, bitcast=True)
    h2 = t_hi + k2.to(tl.uint32, bitcast=True)
    h3 = t_hi + k3.to(tl.uint32, bitcast=True)
    h4 = t_hi + k4.to(tl.uint32, bitcast=True)
    h5 = t_hi + k5.to(tl.uint32, bitcast=True)
    h6 = t_hi + k6.to(tl.uint32, bitcast=True)
    h7 = t_hi + k7.to(tl.uint32, bitcast=True)
    b = 0
    while b < n_blocks:
        gb = ci * 16 + b  # block index inside the leaf, the same for every lane
        wb = gb * 16
        cols = tl.arange(0, 16)[None, :]
        tile = tl.zeros([BLOCK, 16], tl.int32)  # the block's 16 message words
        if (gb >= 1) & (wb + 16 <= code_end):
            # fast path, 16 codes (4 words) at a time: a whole block of codes per lane
            q = 0
            while q < 4:
                elem = (gb - 1) * 64 + q * 16 + tl.arange(0, 16)[None, :]
                mask = valid[:, None] & (elem < E)
                code, _ = _codes_of(xrow, elem, mask, k, key0, key1,
                                    MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING)
                tl.store(crow[:, None] + elem, code.to(tl.uint8), mask=mask)
                w4 = tl.sum(tl.reshape(code, [BLOCK, 4, 4]) << (8 * tl.arange(0, 4))[None, None, :], axis=2)
                at = (q * 4 + tl.arange(0, 4))[None, :, None] == cols[:, None, :]  # [1, 4, 16]
                tile += tl.sum(tl.where(at, w4[:, :, None], 0), axis=1)
                q += 1
        else:
            j = 0
            while j < 16:
                w = _word(wb + j, xrow, crow, hrow, hdr_ptr, page_lo, page_hi, k, valid, E, code_end, helper_end,
                          H, key0, key1, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, PAGE_ID_WORD, BLOCK)
                tile = tl.where(cols == j, w.to(tl.int32, bitcast=True)[:, None], tile)
                j += 1
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
    o = out_ptr + (page64 * C + ci) * 8
    K.store_cv(o, h0, h1, h2, h3, h4, h5, h6, h7, valid)


def _s32(v: int) -> int:
    """A 32-bit word as the signed int the kernels bitcast back."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _check_pages(pages) -> tuple[int, int]:
    if not isinstance(pages, torch.Tensor):
        raise TypeError(f"pages must be a torch.Tensor, got {type(pages).__name__}")
    if pages.dtype not in _INPUT_DTYPES:
        raise TypeError(f"pages must be float16/bfloat16/float32, got {pages.dtype}")
    if pages.dim() < 2 or pages.shape[0] < 1 or pages[0].numel() < 1:
        raise ValueError(f"pages must be [P >= 1, ...] with elements in each page, got shape {tuple(pages.shape)}")
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
    return n_pages, e


@functools.lru_cache(maxsize=512)
def _header_words(spec: LeafSpec, layer: int, kind: str, device: torch.device) -> torch.Tensor:
    """The [16] int32 header words `_fused_kernel` writes for (spec, layer, kind), page id words
    zero, on ``device``: the leaf module's header. Checked once per config that the kernel's
    overlay of a page id (words `_PAGE_ID_WORD`, +1) gives `fieldprint.leaf`'s header of that
    page id: the kernel holds no other knowledge of the header."""
    words = _le_words(spec.header(0, layer, kind))
    probe = 0x8123456789ABCDEF  # both id words nonzero, the high one with its top bit set
    written = list(words)
    written[_PAGE_ID_WORD] += _s32(probe)
    written[_PAGE_ID_WORD + 1] += _s32(probe >> 32)
    if words[_PAGE_ID_WORD:_PAGE_ID_WORD + 2] != [0, 0] or written != _le_words(spec.header(probe, layer, kind)):
        raise RuntimeError("the fused kernel's page-id words disagree with fieldprint.leaf's header layout")
    return torch.tensor(words, dtype=torch.int32).to(device)


def _le_words(data: bytes) -> list[int]:
    """Little-endian 32-bit words of ``data`` as the signed ints the kernel bitcasts back."""
    return [_s32(int.from_bytes(data[i:i + 4], "little")) for i in range(0, len(data), 4)]


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
    else None, digests [P, 32] uint8), all on pages' device: page i equals
    ``quantize(pages[i:i+1], fmt, rounding, seed=seed)`` (codes, scale, helper) and
    ``merkle.hash_pages`` of it with page id ``page_ids[i]``, bit for bit. Reads one flag back
    (a sync) to raise ValueError when pages hold NaN/Inf.
    """
    n_pages, e = _check_pages(pages)
    if fmt not in FUSED_FORMATS:
        raise ValueError(
            f"fmt must be one of {list(FUSED_FORMATS)} for the fused path, got {fmt!r} "
            "(bf16/fp16 codes: use fieldprint.quant.quantize + merkle.hash_pages)")
    if not isinstance(rounding, str) or rounding not in ROUNDING_IDS:
        raise ValueError(f"rounding must be one of {list(ROUNDING_IDS)}, got {rounding!r}")
    check_seed(rounding, seed)
    two_grid = rounding == "two_grid"
    spec = LeafSpec(fmt, rounding, elems=e, seed=seed)
    hdr = _header_words(spec, layer, kind, pages.device)  # checks layer and kind too
    kb = _key_bytes(key)
    dev = pages.device
    ids = torch.tensor(check_page_ids(page_ids, n_pages), dtype=torch.int64).to(dev)

    kexp, finite = page_scales(pages, fmt)
    # word offsets of the leaf's fields: the kernel assumes header, codes, one scale word,
    # helper, padding in this order
    at = spec.offsets()
    code_end = (at["codes"][0] + at["codes"][1]) // 4
    helper_end = code_end + 1 + -(-spec.helper_bytes // 4)
    if at["codes"][0] != 64 or at["scale"] != (4 * code_end, 4) or at["helper"][0] != 4 * code_end + 4:
        raise RuntimeError(f"the fused kernel cannot write the leaf layout {spec.fields()}")
    n_chunks = -(-spec.length // K.CHUNK_LEN)
    codes = torch.empty((n_pages, e), dtype=torch.uint8, device=dev)
    helper = torch.empty((n_pages, spec.helper_bytes), dtype=torch.uint8, device=dev) if two_grid else None
    nodes = torch.empty((n_pages * n_chunks, 8), dtype=torch.int32, device=dev)
    kw, kf = _key_args(kb)
    keys = seed_keys(seed) if seed is not None else (0, 0)
    block = min(64, max(16, triton.next_power_of_2(n_pages)))
    grid = (triton.cdiv(n_pages, block), n_chunks)
    _fused_kernel[grid](
        pages, kexp, ids, hdr, codes, helper if helper is not None else codes, nodes,
        n_pages, e, n_chunks, spec.length // 64, code_end, helper_end, spec.helper_bytes, *keys, *kw, kf,
        **format_constants(fmt), ROUNDING=ROUNDING_IDS[rounding], PAGE_ID_WORD=_PAGE_ID_WORD, BLOCK=block,
        num_warps=max(1, block // 32))
    digests = reduce_parents(nodes, n_pages, n_chunks, kw, kf)
    if not bool(finite.all()):
        raise ValueError("pages contains NaN or Inf")
    return codes, pow2(kexp), helper, digests
