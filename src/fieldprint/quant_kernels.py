"""Triton kernels and device functions for deterministic quantization (`fieldprint.quant`).

Every code is computed with integer arithmetic on the float32 bit pattern of the input, never
with a float cast or a float multiply, so the result cannot depend on the device, on flush-to-zero
modes or on the torch release (see the module docstring of `fieldprint.quant` for the exact
definition of each format and rounding mode; `fieldprint.quant._codes_torch` is the torch twin
of `quant_code` and must stay line for line equivalent).

Reusable pieces for other kernels (the fused quantize-and-hash kernel):

* ``quant_code(x, k, r, hb_in, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, VERIFY)``:
  one block of float32 values -> (int64 codes, int32 helper bits). The format constants come from
  ``fieldprint.quant.format_constants(fmt)``, ``ROUNDING`` from ``fieldprint.quant.ROUNDING_IDS``.
* ``e4m3_rne_code(x, k)``, ``e5m2_rne_code(x, k)``, ``int8_rne_code(x, k)``, ``bf16_rne_code(x)``,
  ``fp16_rne_code(x)``: round-to-nearest-even shortcuts of ``quant_code``.
* ``counter_bits(idx, key0, key1)``: the 32 random bits of element ``idx`` (int64 flat index)
  for stochastic rounding; ``fieldprint.quant.seed_keys(seed)`` gives ``(key0, key1)``.
* ``pack_helper_bits(hb, BLOCK)``: ``BLOCK`` helper bits -> ``BLOCK // 8`` bytes (little-endian
  bit order: element ``8 j + i`` is bit ``i`` of byte ``j``).

This module imports triton at import time; `fieldprint.quant` imports it lazily, so set
``TRITON_INTERPRET=1`` before the first quantization on a CPU through the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldprint.quant import ROUNDING_IDS, format_constants


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
    Returns (code, hb): int64 raw code bits (fp8/int8: 0..255, bf16/fp16: 0..65535) and the
    int32 helper bit of each element (0 unless ROUNDING == 3).

    With |x / 2**k| = M * 2**(Ek - 23) (M the 24-bit significand, Ek its unbiased exponent minus
    k), the cell of |x| on the grid is the truncated magnitude code
    ``c = ((max(Ek, EMIN) - EMIN) << MBITS) + (M >> sh)`` with ``sh = 23 - MBITS +
    max(EMIN - Ek, 0)``, and ``rem / 2**sh`` (rem = the bits shifted out) is the exact position of
    |x| inside the cell [v(c), v(c+1)). Saturation clamps c to CMAX with rem = 0.
    """
    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    neg = (u < 0) & (a != 0)
    ef = a >> 23
    frac = a & 0x7FFFFF
    e_unb = tl.where(ef == 0, -126, ef - 127)
    m24 = tl.where(ef == 0, frac, frac | 0x800000).to(tl.int64)
    ek = e_unb - k
    sh = (23 - MBITS) + tl.maximum(EMIN - ek, 0)
    # a shift of 56 already sends every 24-bit significand to q = 0, so clamping keeps it exact
    sh = tl.minimum(sh, 56).to(tl.int64)
    q = m24 >> sh
    rem = m24 & ((tl.full(sh.shape, 1, tl.int64) << sh) - 1)
    c = ((tl.maximum(ek, EMIN) - EMIN).to(tl.int64) << MBITS) + q
    sat = c >= CMAX
    c = tl.where(sat, CMAX, c)
    rem = tl.where(sat, 0, rem)
    half = tl.full(sh.shape, 1, tl.int64) << (sh - 1)
    up_rne = ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int64)
    hb = tl.zeros(sh.shape, tl.int32)
    if ROUNDING == 0:
        n = c + up_rne
    elif ROUNDING == 1:
        n = c
    elif ROUNDING == 2:
        # round up with probability ceil(rem * 2**(32 - sh)) / 2**32 (= rem / 2**sh when sh <= 32)
        s_up = tl.maximum(32 - sh, 0)
        s_dn = tl.maximum(sh - 32, 0)
        one = tl.full(sh.shape, 1, tl.int64)
        thr = tl.where(sh <= 32, rem << s_up, (rem + (one << s_dn) - 1) >> s_dn)
        n = c + (r.to(tl.int64) < thr).to(tl.int64)
    else:
        if VERIFY:
            hb = hb_in.to(tl.int32)
        else:
            quarter = tl.full(sh.shape, 1, tl.int64) << (sh - 2)
            hb = ((rem >= quarter) & (rem < 3 * quarter)).to(tl.int32)
        n = tl.where(hb != 0, tl.minimum(c, CMAX - 1), c + up_rne)
    if TWOS:
        code = tl.where(neg, tl.where(hb != 0, -(n + 1), -n), n) & 0xFF
    else:
        s = (neg & ((n > 0) | (hb != 0))).to(tl.int64)
        code = n | (s << SIGN_SHIFT)
    return code, hb


@triton.jit
def e4m3_rne_code(x, k):
    """OCP E4M3 (fn, saturating) RNE codes of ``x / 2**k``; x: float32 block -> int64 bytes."""
    code, _ = quant_code(x, k, 0, 0, 3, -6, 0x7E, 7, 0, 0, False)
    return code


@triton.jit
def e5m2_rne_code(x, k):
    """OCP E5M2 (saturating) RNE codes of ``x / 2**k``; x: float32 block -> int64 bytes."""
    code, _ = quant_code(x, k, 0, 0, 2, -14, 0x7B, 7, 0, 0, False)
    return code


@triton.jit
def int8_rne_code(x, k):
    """int8 RNE codes (two's complement byte, range +-127) of ``x / 2**k`` -> int64 bytes."""
    code, _ = quant_code(x, k, 0, 0, 7, 7, 127, 7, 1, 0, False)
    return code


@triton.jit
def bf16_rne_code(x):
    """bfloat16 RNE bit patterns (saturating) of float32 block ``x`` -> int64 in 0..65535."""
    code, _ = quant_code(x, 0, 0, 0, 7, -126, 0x7F7F, 15, 0, 0, False)
    return code


@triton.jit
def fp16_rne_code(x):
    """float16 RNE bit patterns (saturating) of float32 block ``x`` -> int64 in 0..65535."""
    code, _ = quant_code(x, 0, 0, 0, 10, -14, 0x7BFF, 15, 0, 0, False)
    return code


@triton.jit
def pack_helper_bits(hb, BLOCK: tl.constexpr):
    """[BLOCK] int32 bits -> [BLOCK // 8] int32 bytes, element 8 j + i at bit i of byte j."""
    bits = tl.reshape(hb, [BLOCK // 8, 8])
    return tl.sum(bits << tl.arange(0, 8)[None, :], axis=1)


@triton.jit
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
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = ((x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000) & mask
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.atomic_max(flag_ptr, 1)
    if PER_ROW:
        k = tl.load(k_ptr + offs // row_len, mask=mask, other=0)
    else:
        k = tl.load(k_ptr)
    if ROUNDING == 2:
        r = counter_bits(offs, key0, key1)
    else:
        r = 0
    hb_in = 0
    if ROUNDING == 3:
        if VERIFY:
            byte = tl.load(helper_in_ptr + (offs >> 3), mask=mask, other=0).to(tl.int32)
            hb_in = (byte >> (offs & 7).to(tl.int32)) & 1
    code, hb = quant_code(x, k, r, hb_in, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, VERIFY)
    tl.store(codes_ptr + offs, code.to(codes_ptr.dtype.element_ty), mask=mask)
    if ROUNDING == 3:
        if not VERIFY:
            packed = pack_helper_bits(tl.where(mask, hb, 0), BLOCK)
            boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
            tl.store(helper_out_ptr + boffs, packed.to(tl.uint8), mask=boffs < (n + 7) // 8)


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
