"""Triton kernels and device functions for deterministic quantization (`fieldprint.quant`).

Every code is computed with integer arithmetic on the float32 bit pattern of the input, never
with a float cast or a float multiply, so the result cannot depend on the device, on flush-to-zero
modes or on the torch release (see the module docstring of `fieldprint.quant` for the exact
definition of each format and rounding mode; `fieldprint.quant._codes_torch` is the torch twin
of `quant_code` and must stay line for line equivalent).

Reusable pieces for other kernels (the fused quantize-and-hash kernel):

* ``quant_code(x, k, r, hb_in, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, VERIFY)``:
  one block of float32 values -> (int32 codes, int32 helper bits). The format constants come from
  ``fieldprint.formats.format_constants(fmt)``, ``ROUNDING`` from ``fieldprint.formats.ROUNDING_IDS``.
* ``to_float32(x)``: fp16/bf16/fp32 block -> float32, exactly (bf16 subnormals included).
* ``counter_bits(idx, key0, key1)``: the 32 random bits of element ``idx`` (int64 flat index)
  for stochastic rounding; ``fieldprint.quant.seed_keys(seed)`` gives ``(key0, key1)``.
* ``pack_helper_bits(hb, BLOCK)``: ``BLOCK`` helper bits -> ``BLOCK // 8`` bytes (little-endian
  bit order: element ``8 j + i`` is bit ``i`` of byte ``j``).

This module imports triton at import time, and so does `fieldprint.quant`: set
``TRITON_INTERPRET=1`` before importing either to run the Triton path on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldprint.formats import ROUNDING_IDS, format_constants


@triton.jit
def _mix32(x):
    """32-bit xorshift-multiply mixer; ``x``: uint32 block (multiplies wrap mod 2**32)."""
    x ^= x >> 16
    x = x * 0x7FEB352D
    x ^= x >> 15
    x = x * 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def counter_bits(idx, key0, key1):
    """Random bits of elements ``idx`` (int64 flat row-major indices) -> uint32 block.

    ``r = mix(mix(lo32(idx) ^ key0) ^ hi32(idx) ^ key1)``: a pure function of (seed, index), so
    the bits are the same on every device and under every tiling.
    """
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = ((idx >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    return _mix32(_mix32(lo ^ k0) ^ hi ^ k1)


@triton.jit
def to_float32(x):
    """A block of fp16/bf16/fp32 values as float32, exactly. bf16 is widened by moving its bits
    (a bf16 subnormal is a float32 subnormal), so no float conversion touches it: the Triton
    interpreter's bf16 -> float32 conversion garbles subnormals."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _floor_log2(v):
    """floor(log2(v)) of an int32 block v in [1, 2**24) (0 for v = 0): a binary search over the
    bit positions, integer arithmetic only."""
    p = v * 0
    for s in tl.static_range(4, -1, -1):
        big = v >= (1 << (1 << s))
        v = tl.where(big, v >> (1 << s), v)
        p += big.to(tl.int32) << s
    return p


@triton.jit
def quant_code(
    x,
    k,
    r,
    hb_in,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    CMAX: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    TWOS: tl.constexpr,
    ROUNDING: tl.constexpr,
    VERIFY: tl.constexpr,
):
    """Codes of ``x / 2**k`` on one format's grid.

    x: float32 block (finite; callers check).  k: int32 scale exponent, scalar or block.
    r: uint32 random bits (`counter_bits`; only read when ROUNDING == 2, pass 0 otherwise).
    hb_in: int32 helper bits (only read when ROUNDING == 3 and VERIFY, pass 0 otherwise).
    Returns (code, hb): int32 raw code bits (fp8/int8: 0..255, bf16/fp16: 0..65535) and the
    int32 helper bit of each element (0 unless ROUNDING == 3). All arithmetic is 32-bit.

    With |x / 2**k| = M * 2**(Ek - 23) (M the 24-bit significand, its leading one at bit 23 also
    for float32 subnormals, Ek its unbiased exponent minus k), the cell of |x| on the grid is the
    truncated magnitude code ``c = ((max(Ek, EMIN) - EMIN) << MBITS) + (M >> sh)`` (0 for x = 0)
    with ``sh = 23 - MBITS + max(EMIN - Ek, 0)``, and ``rem / 2**sh`` (rem = the bits shifted out)
    is the exact position of |x| inside the cell [v(c), v(c+1)). Saturation: codes are clamped to CMAX (two_grid: a
    saturated value takes grid A). ``fieldprint.quant._codes_torch`` is the torch twin.
    """
    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    neg = (u < 0) & (a != 0)
    ef = a >> 23
    # a float32 subnormal a * 2**-149 (ef == 0) is normalized: its leading one moves up to bit
    # 23, as in a normal significand, so that a scale 2**k with k <= -121 (which takes it into
    # the target's normal range) sees its true exponent; zero has no leading one at all
    lz = 23 - _floor_log2(a)
    m24 = tl.where(ef == 0, a << lz, (a & 0x7FFFFF) | 0x800000)
    ek = tl.where(ef == 0, 1 - lz, ef) - 127 - k
    d = EMIN - ek
    base = tl.where(a == 0, 0, tl.maximum(-d, 0) << MBITS)
    sh_full = tl.minimum((23 - MBITS) + tl.maximum(d, 0), 56)
    # 32-bit arithmetic: from sh = 30 on every 24-bit significand gives q = 0 and rem = m24,
    # below half and quarter, so clamping the shift to 30 changes no rne/trunc/two_grid code
    sh = tl.minimum(sh_full, 30)
    hb = tl.zeros(sh.shape, tl.int32)
    # clamping to CMAX after rounding equals clamping |y| to fmax before (monotone, fmax on grid)
    if ROUNDING == 0:
        # RNE by adding half - 1 plus the lowest kept bit; a carry moves into the next binade
        n = tl.minimum(base + ((m24 + (1 << (sh - 1)) - 1 + ((m24 >> sh) & 1)) >> sh), CMAX)
    elif ROUNDING == 1:
        n = tl.minimum(base + (m24 >> sh), CMAX)
    elif ROUNDING == 2:
        # round up iff r < ceil(rem * 2**(32 - sh_full)), a uint32 threshold; probability
        # rem / 2**sh_full exactly when sh_full <= 32, otherwise at most 2**-32 above it
        rem = m24 & ((1 << sh) - 1)
        s_up = tl.maximum(32 - sh_full, 0).to(tl.uint32)
        s_dn = tl.maximum(sh_full - 32, 0)
        thr = tl.where(
            sh_full <= 32,
            rem.to(tl.uint32) << s_up,
            ((rem + (1 << s_dn) - 1) >> s_dn).to(tl.uint32),
        )
        n = tl.minimum(base + (m24 >> sh) + (r < thr).to(tl.int32), CMAX)
    else:
        q = m24 >> sh
        rem = m24 & ((1 << sh) - 1)
        c = base + q
        if VERIFY:
            hb = hb_in.to(tl.int32)
        else:
            quarter = 1 << (sh - 2)
            # a saturated value (c >= CMAX) counts as t = 0: grid A
            hb = ((rem >= quarter) & (rem < 3 * quarter) & (c < CMAX)).to(tl.int32)
        half = 1 << (sh - 1)
        up = ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        n = tl.where(hb != 0, tl.minimum(c, CMAX - 1), tl.minimum(c + up, CMAX))
    if TWOS:
        code = tl.where(neg, tl.where(hb != 0, -(n + 1), -n), n) & 0xFF
    else:
        s = (neg & ((n > 0) | (hb != 0))).to(tl.int32)
        code = n | (s << SIGN_SHIFT)
    return code, hb


@triton.jit
def pack_helper_bits(hb, BLOCK: tl.constexpr):
    """[BLOCK] int32 bits -> [BLOCK // 8] int32 bytes, element 8 j + i at bit i of byte j."""
    bits = tl.reshape(hb, [BLOCK // 8, 8])
    return tl.sum(bits << tl.arange(0, 8)[None, :], axis=1)


@triton.jit(do_not_specialize=["key0", "key1"])
def _quantize_kernel(
    x_ptr,
    k_ptr,
    helper_in_ptr,
    codes_ptr,
    helper_out_ptr,
    flag_ptr,
    n,
    row_len,
    key0,
    key1,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    CMAX: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    TWOS: tl.constexpr,
    ROUNDING: tl.constexpr,
    VERIFY: tl.constexpr,
    PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pass: x [n] (fp32/fp16/bf16) -> codes [n], helper bytes [ceil(n/8)], non-finite flag."""
    # 64-bit block start, 32-bit offsets inside the block: cheap masks for any n
    start = tl.program_id(0).to(tl.int64) * BLOCK
    loc = tl.arange(0, BLOCK)
    mask = loc < tl.minimum(n - start, BLOCK).to(tl.int32)
    x = to_float32(tl.load(x_ptr + start + loc, mask=mask, other=0.0))
    # masked lanes read +0.0; NaN/Inf are the magnitudes >= 0x7F800000
    if tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=0) >= 0x7F800000:
        tl.atomic_max(flag_ptr, 1)
    if PER_ROW:
        k = tl.load(k_ptr + (start + loc) // row_len, mask=mask, other=0)
    else:
        k = tl.load(k_ptr)
    if ROUNDING == 2:
        r = counter_bits(start + loc, key0, key1)
    else:
        r = 0
    hb_in = 0
    if ROUNDING == 3:
        if VERIFY:
            byte = tl.load(helper_in_ptr + start // 8 + (loc >> 3), mask=mask, other=0)
            hb_in = (byte.to(tl.int32) >> (loc & 7)) & 1
    code, hb = quant_code(x, k, r, hb_in, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, VERIFY)
    tl.store(codes_ptr + start + loc, code.to(codes_ptr.dtype.element_ty), mask=mask)
    if ROUNDING == 3:
        if not VERIFY:
            packed = pack_helper_bits(tl.where(mask, hb, 0), BLOCK)
            bloc = tl.arange(0, BLOCK // 8)
            nbytes = (tl.minimum(n - start, BLOCK).to(tl.int32) + 7) // 8
            tl.store(helper_out_ptr + start // 8 + bloc, packed.to(tl.uint8), mask=bloc < nbytes)


def launch_quantize(
    x: torch.Tensor,
    k: torch.Tensor,
    fmt: str,
    rounding: str,
    key0: int,
    key1: int,
    helper_in: torch.Tensor | None,
    codes: torch.Tensor,
    helper_out: torch.Tensor | None,
) -> torch.Tensor:
    """Run `_quantize_kernel`; all tensors already validated by `fieldprint.quant.quantize`.

    x: [n] contiguous fp32/fp16/bf16.  k: int32, [1] (per tensor) or [n // row_len] (per row).
    codes: [n] uint8/int16 output.  helper_out: [ceil(n/8)] uint8 (prover two_grid) or None.
    Returns the int32 [1] non-finite flag (1 when x held NaN/Inf); reading it syncs.
    """
    n = x.numel()
    block = 1024
    per_row = k.numel() > 1
    row_len = n // k.numel() if per_row else max(n, 1)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    dummy = torch.zeros(1, dtype=torch.uint8, device=x.device)
    grid = (triton.cdiv(n, block),)
    _quantize_kernel[grid](
        x,
        k,
        helper_in if helper_in is not None else dummy,
        codes,
        helper_out if helper_out is not None else dummy,
        flag,
        n,
        row_len,
        key0,
        key1,
        **format_constants(fmt),
        ROUNDING=ROUNDING_IDS[rounding],
        VERIFY=helper_in is not None,
        PER_ROW=per_row,
        BLOCK=block,
        num_warps=4,
    )
    return flag


@triton.jit
def quant_code_fast(x, k, MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr, SIGN_SHIFT: tl.constexpr,
                    TWOS: tl.constexpr, ROUNDING: tl.constexpr, HW: tl.constexpr):
    """TEMPORARY (lead's placeholder until the fast path lands): the integer path."""
    return quant_code(x, k, 0, 0, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)
