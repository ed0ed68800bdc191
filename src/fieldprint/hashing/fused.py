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

Two launches plus the BLAKE3 parent levels:

1. `_page_scale_kernel` (one program per page): the page's max magnitude, hence its scale
   exponent k and the NaN/Inf flag. This is a separate read of the pages: the scale of a page
   depends on all of its elements, and a chunk lane cannot wait for the other chunks of its page.
2. `_fused_kernel`: one lane per (page, chunk of its leaf); all lanes of a program hash the same
   chunk index of BLOCK consecutive pages, so which part of the leaf a 64-byte block holds
   (header, codes, scale/helper/padding) is the same for every lane and is decided by scalar
   branches, without divergence. Each lane builds its message words in registers: a code block
   quantizes its 64 elements 16 at a time (`quant_kernels.quant_code`) and packs them 4 to a
   little-endian word;
   the scale word is ``(k + 127) << 23``; a helper word recomputes the helper bits of its 32
   elements (`pack` order of `quant.canonical_bytes`); header words come from the page id and
   scalar arguments. Codes and helper bytes are stored as side outputs; the leaf itself is
   never written to memory. Chunk chaining values then go through the hashing module's
   `reduce_parents`, as in `blake3_many`.

Two_grid pages therefore read their elements twice inside the fused kernel (codes, then helper
words); the second read usually hits L2.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fieldprint.formats import FORMAT_IDS, FORMATS, ROUNDING_IDS, format_constants
from fieldprint.hashing import _kernels as K
from fieldprint.hashing import _key_args, _key_bytes, reduce_parents
from fieldprint.merkle import HEADER_BYTES, KIND_IDS, LAYOUT_VERSION, LEAF_KEY, MAGIC
from fieldprint.quant import check_seed, seed_keys
from fieldprint.quant_kernels import counter_bits, quant_code

__all__ = ["FUSED_FORMATS", "quantize_hash_pages"]

FUSED_FORMATS = tuple(name for name, f in FORMATS.items() if f.width == 1)  # the fp8 and int8 codes
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALAR_ARGS = ["layer", "hw5", "seed_lo", "seed_hi", "has_seed", "key0", "key1",
                "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "key_flags"]


@triton.jit
def _page_scale_kernel(x_ptr, k_ptr, scale_ptr, flag_ptr, E,
                       MF: tl.constexpr, EF: tl.constexpr, BLOCK: tl.constexpr):
    """Per page p of x [P, E]: k[p] = the smallest k in [-126, 127] with amax <= fmax * 2**k
    (0 for an all-zero page), scale[p] = 2**k (float32), flag = 1 if any NaN/Inf.

    fmax = MF * 2**EF with MF a 24-bit significand, so the test is integer arithmetic on the bit
    pattern of amax (the rule of `fieldprint.quant`, which uses frexp): a normal amax = ma *
    2**(ef - 150) gives k = ef - 150 - EF + (ma > MF); a subnormal amax always clamps to -126.
    """
    page = tl.program_id(0)
    base = x_ptr + page.to(tl.int64) * E
    acc = tl.zeros([BLOCK], tl.int32)
    start = 0
    while start < E:
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < E, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        start += BLOCK
    a = tl.max(acc, axis=0)
    if a >= 0x7F800000:
        tl.atomic_max(flag_ptr, 1)
    ef = a >> 23
    k = ef - 150 - EF + (((a & 0x7FFFFF) | 0x800000) > MF).to(tl.int32)
    k = tl.where(ef == 0, -126, k)
    k = tl.where(a == 0, 0, k)
    k = tl.minimum(tl.maximum(k, -126), 127)
    tl.store(k_ptr + page, k)
    tl.store(scale_ptr + page, ((k + 127) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _codes_of(xrow, elem, mask, k, key0, key1,
              MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
              SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr):
    """Codes and helper bits (int32, elem's shape) of elements ``elem`` ([BLOCK, n] int32
    positions inside the page) of each lane's page row ``xrow`` ([BLOCK] pointers)."""
    x = tl.load(xrow[:, None] + elem, mask=mask, other=0.0).to(tl.float32)
    if ROUNDING == 2:
        r = counter_bits(elem.to(tl.int64), key0, key1)
    else:
        r = 0
    return quant_code(x, k[:, None], r, 0, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)


@triton.jit
def _word(wi, xrow, crow, hrow, page_lo, page_hi, k, valid, E, code_end, helper_end, H,
          layer, hw5, seed_lo, seed_hi, has_seed, key0, key1,
          MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
          SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr,
          BLOCK: tl.constexpr):
    """Leaf word ``wi`` (a scalar: the same for every lane) of each lane's page, as [BLOCK]
    uint32; stores the codes / helper bytes it covers. The slow path: header, a code block
    cut by the end of the codes, scale, helper and padding words."""
    w = tl.zeros([BLOCK], tl.int32)
    if wi < 16:
        # header (merkle layout v1); words 13..15 are zero
        hv = tl.where(wi == 0, 0x564B5046, 0)  # b"FPKV"
        hv = tl.where(wi == 1, 1 | (64 << 16), hv)  # layout version 1, 64 header bytes
        hv = tl.where(wi == 4, layer, hv)
        hv = tl.where(wi == 5, hw5, hv)  # kind, format, rounding, code width
        hv = tl.where((wi == 6) | (wi == 7), E, hv)  # elements, code bytes
        hv = tl.where(wi == 8, 1, hv)  # one scale
        hv = tl.where(wi == 9, H, hv)
        hv = tl.where(wi == 10, seed_lo, hv)
        hv = tl.where(wi == 11, seed_hi, hv)
        hv = tl.where(wi == 12, has_seed, hv)
        w = w + hv + tl.where(wi == 2, page_lo, 0) + tl.where(wi == 3, page_hi, 0)
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
def _fused_kernel(x_ptr, kexp_ptr, ids_ptr, codes_ptr, helper_ptr, out_ptr,
                  P, E, C, n_leaf_blocks, code_end, helper_end, H,
                  layer, hw5, seed_lo, seed_hi, has_seed, key0, key1,
                  k0, k1, k2, k3, k4, k5, k6, k7, key_flags,
                  MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
                  SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Chaining values out [P, C, 8] int32 of chunk ``program_id(1)`` of BLOCK pages' leaves.

    x: [P, E] pages; kexp: [P] int32 scale exponents; ids: [P] int64 page ids; codes: [P, E]
    uint8 and helper: [P, H] uint8 side outputs. The leaf has n_leaf_blocks 64-byte blocks:
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
                w = _word(wb + j, xrow, crow, hrow, page_lo, page_hi, k, valid, E, code_end, helper_end, H,
                          layer, hw5, seed_lo, seed_hi, has_seed, key0, key1,
                          MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, BLOCK)
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


def _check_ids(page_ids, n_pages: int, device: torch.device) -> torch.Tensor:
    if isinstance(page_ids, torch.Tensor):
        if page_ids.dtype.is_floating_point or page_ids.dtype in (torch.bool, torch.uint8):
            raise TypeError(f"page_ids must be an integer tensor, got {page_ids.dtype}")
        ids = page_ids.to(device=device, dtype=torch.int64).reshape(-1)
    else:
        try:
            ids = torch.tensor(list(page_ids), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise TypeError(f"page_ids must be a sequence of ints or an integer tensor: {e}") from None
        ids = ids.to(device)
    if ids.numel() != n_pages:
        raise ValueError(f"page_ids must have {n_pages} entries (one per page), got {ids.numel()}")
    if bool((ids < 0).any()):
        raise ValueError("page_ids must be non-negative")
    return ids.contiguous()


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
    if two_grid and e % 8:
        raise ValueError(f"two_grid pages need a multiple of 8 elements per page, got {e}")
    if kind not in KIND_IDS:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < 2**32:
        raise ValueError(f"layer must be an int in [0, 2**32), got {layer!r}")
    kb = _key_bytes(key)
    dev = pages.device
    ids = _check_ids(page_ids, n_pages, dev)

    f = FORMATS[fmt]
    fm, fe = math.frexp(f.fmax)
    kexp = torch.empty(n_pages, dtype=torch.int32, device=dev)
    scales = torch.empty(n_pages, dtype=torch.float32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    _page_scale_kernel[(n_pages,)](pages, kexp, scales, flag, e, MF=int(fm * 2**24), EF=fe - 24,
                                   BLOCK=1024, num_warps=4)

    h_bytes = e // 8 if two_grid else 0
    leaf_len = HEADER_BYTES + e + 4 + h_bytes
    leaf_len += -leaf_len % 64
    n_chunks = -(-leaf_len // K.CHUNK_LEN)
    code_end = HEADER_BYTES // 4 + e // 4
    helper_end = code_end + 1 + -(-h_bytes // 4)
    codes = torch.empty((n_pages, e), dtype=torch.uint8, device=dev)
    helper = torch.empty((n_pages, h_bytes), dtype=torch.uint8, device=dev) if two_grid else None
    nodes = torch.empty((n_pages * n_chunks, 8), dtype=torch.int32, device=dev)
    kw, kf = _key_args(kb)
    keys = seed_keys(seed) if seed is not None else (0, 0)
    s = seed or 0
    hw5 = KIND_IDS[kind] | FORMAT_IDS[fmt] << 8 | ROUNDING_IDS[rounding] << 16 | 1 << 24
    assert MAGIC == b"FPKV" and LAYOUT_VERSION == 1  # the header words the kernel writes
    block = min(64, max(16, triton.next_power_of_2(n_pages)))
    grid = (triton.cdiv(n_pages, block), n_chunks)
    _fused_kernel[grid](
        pages, kexp, ids, codes, helper if helper is not None else codes, nodes,
        n_pages, e, n_chunks, leaf_len // 64, code_end, helper_end, h_bytes,
        _s32(layer), hw5, _s32(s), _s32(s >> 32), int(seed is not None), *keys, *kw, kf,
        **format_constants(fmt), ROUNDING=ROUNDING_IDS[rounding], BLOCK=block,
        num_warps=max(1, block // 32))
    digests = reduce_parents(nodes, n_pages, n_chunks, kw, kf)
    if int(flag.item()):
        raise ValueError("pages contains NaN or Inf")
    return codes, scales, helper, digests
