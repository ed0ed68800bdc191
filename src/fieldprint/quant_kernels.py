"""Triton kernels and device functions for deterministic quantization (`fieldprint.quant`).

The specification kernel, `quant_code`, computes every code with integer arithmetic on the float32
bit pattern of the input, never with a float cast or a float multiply, so the result cannot depend
on the device, on flush-to-zero modes or on the torch release (see the module docstring of
`fieldprint.quant` for the exact definition of each format and rounding mode;
`fieldprint.quant._codes_torch` is the torch twin of `quant_code` and must stay line for line
equivalent). `quant_code_fast` gives the same bits with the hardware fp8 conversions of sm_89+
GPUs where it can (e4m3/e5m2, rne/trunc/two_grid) and is `quant_code` everywhere else;
tests/test_quant_fast.py proves the two equal over every finite bf16 value and every scale exponent.

Reusable pieces for other kernels (the fused quantize-and-hash kernel):

* ``quant_code(x, k, r, hb_in, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, VERIFY)``:
  one block of float32 values -> (int32 codes, int32 helper bits). The format constants come from
  ``fieldprint.formats.format_constants(fmt)``, ``ROUNDING`` from ``fieldprint.formats.ROUNDING_IDS``.
* ``quant_code_fast(x, k, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW)``: the prover's
  ``quant_code`` (no random bits, no helper input) with the hardware conversion when ``HW``
  (`hardware_fp8(device)` says whether a device has it).
* ``to_float32(x)``: fp16/bf16/fp32 block -> float32, exactly (bf16 subnormals included).
* ``counter_bits(idx, key0, key1)``: the 32 random bits of element ``idx`` (int64 flat index)
  for stochastic rounding; ``fieldprint.quant.seed_keys(seed)`` gives ``(key0, key1)``.
* ``pack_helper_bits(hb, BLOCK)``: ``BLOCK`` helper bits -> ``BLOCK // 8`` bytes (little-endian
  bit order: element ``8 j + i`` is bit ``i`` of byte ``j``).

This module imports triton at import time, and so does `fieldprint.quant`: set
``TRITON_INTERPRET=1`` before importing either to run the Triton path on a CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fieldprint.formats import FORMATS, ROUNDING_IDS, format_constants


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


# The fp8 formats that sm_89+ GPUs convert in hardware (PTX cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32
# and back, exactly, cvt.rn.f16x2.{e4m3x2,e5m2x2}), by format-table name: Triton dtype, largest
# value, and the key of their grid constants (quant_code's constexpr arguments, in order). Plain
# tables, as the constexpr functions below may read globals but call no host function.
_CONSTANT_NAMES = ("MBITS", "EMIN", "CMAX", "SIGN_SHIFT", "TWOS")
_HW_FP8_DTYPES = {"e4m3": tl.float8e4nv, "e5m2": tl.float8e5}
_HW_FP8_FMAX = {name: FORMATS[name].fmax for name in _HW_FP8_DTYPES}
_HW_FP8_BY_CONSTANTS = {
    tuple(format_constants(name)[c] for c in _CONSTANT_NAMES): name for name in _HW_FP8_DTYPES
}


def hardware_fp8(device: torch.device) -> bool:
    """Whether compiled kernels on ``device`` may take `quant_code_fast`'s hardware path: an NVIDIA
    GPU of compute capability 8.9 or newer (the fp8 conversion instructions), not interpreted."""
    return (
        device.type == "cuda"
        and torch.version.hip is None
        and os.environ.get("TRITON_INTERPRET") != "1"
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


@triton.constexpr_function
def _hw_fp8_name(HW, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS):
    """The name of the format with these grid constants when ``HW`` and the hardware converts it,
    else ''."""
    key = (MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS)
    return _HW_FP8_BY_CONSTANTS[key] if HW and key in _HW_FP8_BY_CONSTANTS else ""


@triton.constexpr_function
def _fp8_dtype(name):
    return _HW_FP8_DTYPES[name]


@triton.constexpr_function
def _fp8_fmax(name):
    return _HW_FP8_FMAX[name]


@triton.jit
def _quant_code_fp8(x, k, FP8: tl.constexpr, FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                    ROUNDING: tl.constexpr):
    """`quant_code_fast`'s hardware path: fp8 dtype FP8 (largest value FMAX, grid constants MBITS,
    EMIN), ROUNDING 0 (rne), 1 (trunc) or 3 (two_grid). Returns (code, hb) as `quant_code`.

    Scaling. y = x * 2**-k, one multiply by 2**-k built from its bits (2**-127 is the float32
    subnormal 0x00400000; PTX mul.f32 without .ftz keeps subnormal operands and results; y feeds no
    addition, so it is never contracted into an FMA). A float32
    product of a 24-bit significand and a power of two is exact unless it overflows (|x 2**-k| >=
    2**128: y = +-inf) or its exact value is below 2**-126 (it may round; rounding is monotone and
    2**-126 is a float32, so the rounded |y| <= 2**-126 too). Everything below computes the spec's
    code of the float32 y at scale 1, and the spec gives the true y the same code: an overflowed y
    saturates in both (|y| >= 2**128 > fmax), and an underflowed y and the true one are both at most
    2**-126, far below a quarter of the smallest spacing (2**-11 for e4m3, 2**-18 for e5m2), where
    the code is 0 with helper bit 0 and no sign bit.

    rne. The hardware conversion rounds to nearest, ties to even (the even code: the code's low bit
    is the mantissa's), and .satfinite turns every |y| above the largest finite value, +-inf
    included, into +-fmax: the spec's min(RNE(|y|), CMAX) with y's sign. -0 (a negative y that
    rounds to 0) folds to +0.

    trunc and two_grid work on ya = min(|y|, fmax) (clamping first changes no code: rounding is
    monotone and fmax is on the grid; a saturated two_grid value has t = 0). n = RNE(ya), v = v(n)
    its value (decoded exactly from the code's bits), d = ya - v, exact (Sterbenz: v = 0, or ya is within half a
    spacing of v and every spacing next to a nonzero v is at most v, so v/2 <= ya <= 2v). The cell
    c of ya is n when d >= 0 and n - 1 when d < 0 (ya = v(c) + t s_c): trunc is n - (d < 0).
    two_grid: a cell never straddles a power of two, so s_c is the spacing of ya's own binade,
    2**(floor(log2 ya) - MBITS), or 2**(EMIN - MBITS) below 2**EMIN, and q = s_c / 4 is built from
    ya's exponent bits. d >= 0 means t = d / s_c <= 1/2 (RNE went down), so h = 1 iff d >= q;
    d < 0 means t = 1 + d / s_c >= 1/2, so h = 1 iff d < -q, and then c = n - 1. The top cell needs
    no test: n = CMAX with d >= 0 means ya = fmax, d = 0 < q. The sign bit (neg and (n > 0 or h))
    is set iff y <= -s_0 / 4 (two_grid: cell 0 has h = 1 from t = 1/4 on) or y <= -s_0 (trunc).
    """
    s = tl.where(k < 127, (127 - k) << 23, 0x400000).to(tl.float32, bitcast=True)
    y = x * s
    if ROUNDING == 0:
        b = y.to(FP8).to(tl.uint8, bitcast=True).to(tl.int32)
        code = tl.where(b == 0x80, 0, b)
        hb = tl.zeros_like(code)
    else:
        ya = tl.minimum(tl.abs(y), FMAX)
        n8 = ya.to(FP8)
        n = n8.to(tl.uint8, bitcast=True).to(tl.int32)
        # v(n) from the code's bits, not Triton's fp8 -> f32 conversion: with that conversion the
        # H200 test gave trunc codes one too low for some elements of a bf16-loaded block (as if
        # v belonged to another element), while the rne codes of the same packing were exact
        e = n >> MBITS
        m = n & ((1 << MBITS) - 1)
        v = tl.where(e == 0, m.to(tl.float32) * (2.0 ** (EMIN - MBITS)),
                     (((e + EMIN - 1 + 127) << 23) | (m << (23 - MBITS))).to(tl.float32, bitcast=True))
        d = ya - v
        if ROUNDING == 1:
            mag = n - (d < 0).to(tl.int32)
            hb = tl.zeros_like(mag)
            sign = y <= -(2.0 ** (EMIN - MBITS))
        else:
            # q = 2**(E - MBITS - 2) for ya in binade E >= EMIN; the maximum gives the subnormal
            # cells' quarter spacing below (positive float32 bit patterns order as integers)
            qbits = tl.maximum((ya.to(tl.int32, bitcast=True) & 0x7F800000) - ((MBITS + 2) << 23),
                               (127 + EMIN - MBITS - 2) << 23)
            q = qbits.to(tl.float32, bitcast=True)
            down = d < -q
            hb = ((d >= q) | down).to(tl.int32)
            mag = n - down.to(tl.int32)
            sign = y <= -(2.0 ** (EMIN - MBITS - 2))
        code = mag | (sign.to(tl.int32) << 7)
    return code, hb


@triton.jit
def quant_code_fast(
    x,
    k,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    CMAX: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    TWOS: tl.constexpr,
    ROUNDING: tl.constexpr,
    HW: tl.constexpr,
):
    """(code, hb) int32 blocks: the same as ``quant_code(x, k, 0, 0, ..., ROUNDING, VERIFY=False)``
    bit for bit. x: float32 block (finite). k: int32 scale exponent in [-126, 127], scalar or a
    block that broadcasts against x. ROUNDING: 0 (rne), 1 (trunc) or 3 (two_grid); stochastic
    rounding needs `quant_code`'s random bits.

    With HW (compiled for a GPU where `hardware_fp8` holds) and an e4m3/e5m2 format, the codes come
    from the hardware fp8 conversion and a few float operations (`_quant_code_fp8` has the proof);
    otherwise, and always in the Triton interpreter, this is `quant_code`.
    """
    tl.static_assert(ROUNDING != 2, "quant_code_fast: stochastic rounding needs random bits, use quant_code")
    FP8_NAME: tl.constexpr = _hw_fp8_name(HW, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS)
    if FP8_NAME == "":
        code, hb = quant_code(x, k, 0, 0, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)
    else:
        code, hb = _quant_code_fp8(x, k, _fp8_dtype(FP8_NAME), _fp8_fmax(FP8_NAME), MBITS, EMIN, ROUNDING)
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
    HW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pass: x [n] (fp32/fp16/bf16) -> codes [n], helper bytes [ceil(n/8)], non-finite flag.
    HW: the prover's rne/trunc/two_grid codes take `quant_code_fast`'s hardware path."""
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
    if ROUNDING == 2 or VERIFY:
        code, hb = quant_code(x, k, r, hb_in, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, VERIFY)
    else:
        code, hb = quant_code_fast(x, k, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, HW)
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
        HW=hardware_fp8(x.device),
        BLOCK=block,
        num_warps=4,
    )
    return flag

