"""Deterministic quantization of KV pages before hashing.

    qt = quantize(x, fmt="e4m3", rounding="rne", *, seed=None, helper=None, scale=None)
    x_hat = dequantize(qt)                     # float32, x's shape
    data = qt.canonical_bytes()                # 1-D uint8: codes (little-endian), then helper

Formats (``FORMATS``, the table of `fieldprint.formats`). Codes are the raw bits of the target
format; saturation is explicit: |x / scale| is clamped to the largest finite value before
rounding, so nothing overflows to Inf/NaN (torch 2.11 turns float8_e4m3fn casts above 464 into
NaN; later releases saturate).

* ``e4m3``: OCP FP8 E4M3 ("fn"): bias 7, max 448 (byte 0x7E), no Inf, 0x7F/0xFF NaN never made.
* ``e5m2``: OCP FP8 E5M2, saturating: max 57344 (0x7B), the Inf/NaN bytes are never made.
* ``int8``: a two's complement byte n in [-127, 127] meaning ``n * scale``.
* ``bf16``, ``fp16``: IEEE bit patterns stored as int16 (scale is always 1).

Codes are computed by integer arithmetic on the float32 bit pattern (`quant_kernels.quant_code`
on CUDA, `_codes_torch` on the CPU: the same bits), never by a torch cast; on sm_89+ GPUs the
prover's e4m3/e5m2 rne/trunc/two_grid codes come from the hardware fp8 conversion instead
(`quant_kernels.quant_code_fast`, the same bits: tests/test_quant_fast.py). Input is first taken
to float32 (exact for fp16/bf16/fp32; float64 rounds to nearest even once, so a float64 value is
quantized as its float32 rounding). In-range RNE codes equal torch's cast bit for bit.

Scale (fp8 and int8). ``scale=None``: one per-tensor power of two ``2**k`` with the smallest k
such that ``amax(|x|) <= fmax * 2**k`` (k clamped to [-126, 127]; k = 0 for an all-zero x: the
rule of `fieldprint.formats.scale_exponent`, which pages and rows use too). A power of two
makes ``x / scale`` exact, so scaling adds no rounding of its own. A given scale is used as is
(the verifier passes the prover's ``qt.scale``): a positive power-of-two float or float32 tensor
with one element, or per row of shape ``x.shape[:-1] + (1,)``. bf16/fp16: 1.

Rounding (on the scaled magnitude; the sign is applied after, so every mode is symmetric):

* ``rne``: round to nearest, ties to the even code (IEEE).
* ``trunc``: toward zero; never increases the magnitude.
* ``stochastic``: round up with probability (distance to the lower grid point) / spacing, using
  32 counter-based random bits per element, ``r = mix(mix(lo32(i) ^ key0) ^ hi32(i) ^ key1)``,
  where i is the row-major flat index and (key0, key1) come from the 64-bit seed
  (`seed_keys`). Reproducible on every device and under every tiling; unbiased
  (E[dequantize] = x for in-range x) except that values below 2**-8 of the smallest spacing
  round up with probability ceil(p * 2**32) / 2**32, an excess below 2**-32.
* ``two_grid``: see below. Dequantization error at most a quarter of the local spacing.

Two-grid rounding. Let v(0) = 0 < v(1) < ... < v(C) = fmax be the non-negative grid values and
call [v(c), v(c+1)) the *cell* c, of spacing s_c = v(c+1) - v(c). Grid A is the code grid, rounded
to nearest (its decision boundaries are the midpoints); grid B is offset by half a spacing: its
points are the midpoints (v(c) + v(c+1)) / 2 and its decision boundaries are the grid values
v(c), i.e. rounding on B is truncation toward zero of the magnitude. The prover writes |y| = v(c)
+ t s_c with t in [0, 1) (y = x / scale) and sets the helper bit h = 1 (grid B) iff 1/4 <= t < 3/4,
h = 0 (grid A, RNE) otherwise; a saturated |y| >= fmax counts as t = 0 in the top cell, whose
spacing is that of the cell below fmax. Code and helper mean: h = 0: the usual code (value v(c'));
h = 1: sign and magnitude code c, value +-(v(c) + v(c+1)) / 2 (int8: two's complement c' with
value c' + 1/2).

Guarantee. For every finite x and every x' with |x' - x| < scale * s_c / 4, where c is the cell of
|x / scale| (the top cell when saturated), ``quantize(x', fmt, "two_grid", helper=h, scale=scale)``
gives the same code as the prover. Proof (in y = x / scale units; scaling by a power of two is
exact and monotone). Spacings within a binade are equal, double from one binade to the next and
are equal across zero, so s_{c-1} >= s_c / 2 and s_{c+1} >= s_c.
(h = 1) 1/4 <= t < 3/4, so y is at distance >= s_c/4 from v(c) and from v(c+1): |y'| stays strictly
inside (v(c), v(c+1)) and y' keeps the sign of y (|y| >= s_c / 4 > 0), so trunc gives c and the sign.
(h = 0, t < 1/4) RNE gives v(c), whose RNE cell is [v(c) - s_{c-1}/2, v(c) + s_c/2] (for c = 0
the cell below is its mirror image across zero, s_{-1} = s_0). |y| is at least s_{c-1}/2 >= s_c/4
above the lower end and (1/2 - t) s_c > s_c/4 below the upper one, so |y'| rounds to v(c) too,
ties never arising. For c = 0, y' may change sign, but -0 folds to +0: the same code.
(h = 0, t >= 3/4) RNE gives v(c+1), whose RNE cell is [v(c+1) - s_c/2, v(c+1) + s_{c+1}/2]: |y| is
(t - 1/2) s_c >= s_c/4 above the lower end and more than s_{c+1}/2 >= s_c/2 below the upper one
(for c + 1 = C everything above fmax saturates to v(C) anyway).
(saturated) |y| >= fmax, so |y'| > fmax - s_top/4, above the last midpoint fmax - s_top/2.
The bound is tight (t = 1/4 with a perturbation of s_c/4 reaches a boundary), and s_c is the
spacing of x's own cell: just below a power of two it is half the spacing above. The prover's
dequantization error is at most s_c / 4 (every element sits within a quarter spacing of its
grid point). The helper costs one bit per element: 12.5% of an FP8 page, 6.25% of a bf16 page.

Canonical bytes: codes are stored canonically (-0 folds to +0 for the h = 0 codes; h = 1 keeps its
sign, there +-half is a real value), bf16/fp16 codes as two little-endian bytes each, followed by
the helper bytes (little-endian bit order: element 8j + i is bit i of byte j; unused bits are 0).
NaN/Inf in the input is a ValueError. The scale and the format belong in the page header.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from fieldprint.formats import (
    FORMATS,
    ROUNDING_IDS,
    ROUNDINGS,
    Format,
    format_constants,
    get_format,
    pow2,
    scale_exponent,
)
from fieldprint.quant_kernels import launch_quantize

__all__ = [
    "BACKENDS",
    "FORMATS",
    "ROUNDINGS",
    "ROUNDING_IDS",
    "Format",
    "QTensor",
    "canonical_bytes",
    "check_seed",
    "code_bytes",
    "code_spacing",
    "counter_bits_torch",
    "dequantize",
    "format_constants",
    "quantize",
    "seed_keys",
]

BACKENDS = ("auto", "torch", "triton")
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_M32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """Host twin of `quant_kernels._mix32` on a Python int (a bijection of 32-bit words)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def seed_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys (key0, key1) of `counter_bits` from a seed in [0, 2**64)."""
    key0 = _mix32_int((seed & _M32) ^ 0x9E3779B9)
    key1 = _mix32_int(((seed >> 32) & _M32) ^ key0 ^ 0x85EBCA6B)
    return key0, key1


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor.

    codes: x's shape, uint8 (fp8 bytes, int8 as two's complement byte) or int16 (bf16/fp16 bits).
    scale: float32 tensor, [] (per tensor) or x.shape[:-1] + (1,) (per row); x ~ value(code) * scale.
    helper: [ceil(numel / 8)] uint8 packed helper bits (two_grid only, else None).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    helper: torch.Tensor | None
    fmt: str
    rounding: str
    shape: torch.Size
    seed: int | None = None

    def canonical_bytes(self) -> torch.Tensor:
        """1-D uint8: the codes in row-major order (2 little-endian bytes each for bf16/fp16),
        then the helper bytes (two_grid only). Same bytes on every device and host."""
        return canonical_bytes(self)


def code_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., n]`` (uint8, or int16 bf16/fp16 bit patterns) -> ``[..., n * width]`` uint8,
    16-bit codes as two little-endian bytes each, on every host."""
    if codes.dtype == torch.uint8:
        return codes
    if sys.byteorder == "little":  # the int16 memory already holds the little-endian bytes
        return codes.contiguous().view(torch.uint8)
    w = codes.to(torch.int32) & 0xFFFF
    return torch.stack([w & 0xFF, w >> 8], dim=-1).flatten(-2).to(torch.uint8)


def canonical_bytes(qt: QTensor) -> torch.Tensor:
    """Canonical hashing bytes of ``qt`` (see `QTensor.canonical_bytes`)."""
    data = code_bytes(qt.codes.reshape(-1))
    if qt.helper is not None:
        data = torch.cat([data, qt.helper.reshape(-1)])
    return data


def check_seed(rounding: str, seed) -> None:
    """``seed``: required for ``stochastic`` rounding (an int in [0, 2**64)), refused otherwise."""
    if rounding == "stochastic":
        if seed is None:
            raise ValueError("seed is required for rounding='stochastic'")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    elif seed is not None:
        raise ValueError(f"seed only applies to rounding='stochastic', not {rounding!r}")


def _check_choice(name: str, value: object, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _scale_exponent_of(scale, x: torch.Tensor, f: Format) -> torch.Tensor:
    """Validate a given scale -> int32 exponent tensor ([1] or [numel // row_len])."""
    if isinstance(scale, bool) or not isinstance(scale, int | float | torch.Tensor):
        raise TypeError(f"scale must be a float or a float32 tensor, got {type(scale).__name__}")
    s = torch.as_tensor(scale, dtype=torch.float32) if not isinstance(scale, torch.Tensor) else scale
    if not s.is_floating_point():
        raise TypeError(f"scale must be a floating tensor, got {s.dtype}")
    s = s.to(device=x.device, dtype=torch.float32)
    row_shape = tuple(x.shape[:-1]) + (1,)
    if s.numel() == 1 and s.dim() <= x.dim():
        s = s.reshape(1)
    elif x.dim() >= 1 and tuple(s.shape) == row_shape:
        s = s.reshape(-1)
    else:
        raise ValueError(
            f"scale must have one element or shape x.shape[:-1] + (1,) = {row_shape}, got {tuple(s.shape)}"
        )
    mant, e = torch.frexp(s)
    ok = torch.isfinite(s) & (s >= 2.0**-126) & (mant == 0.5)
    if not bool(ok.all()):
        raise ValueError("scale must hold positive normal powers of two (so scaling is exact)")
    if not f.scaled and bool((s != 1.0).any()):
        raise ValueError(f"scale must be 1 for fmt={f.name!r} (it carries no scale)")
    return (e - 1).to(torch.int32)


def _computed_exponent(x32: torch.Tensor, f: Format) -> torch.Tensor:
    """The per-tensor scale exponent of `fieldprint.formats.scale_exponent`, int32 [1] (no host sync)."""
    if not f.scaled or x32.numel() == 0:
        return torch.zeros(1, dtype=torch.int32, device=x32.device)
    return scale_exponent(x32.abs().amax().reshape(1), f.name)


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    """Torch twin of `quant_kernels._mix32` on int64 tensors holding 32-bit words."""

    def mul32(a: torch.Tensor, b: int) -> torch.Tensor:
        # 16-bit halves keep every product below 2**48: exact in int64
        return (a * (b & 0xFFFF) + (((a * (b >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF

    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_bits_torch(idx: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """Random 32-bit words (int64 tensor) of flat indices ``idx``; twin of `counter_bits`."""
    lo = idx & 0xFFFFFFFF
    hi = (idx >> 32) & 0xFFFFFFFF
    return _mix32_torch(_mix32_torch(lo ^ key0) ^ hi ^ key1)


def _floor_log2_torch(v: torch.Tensor) -> torch.Tensor:
    """Torch twin of `quant_kernels._floor_log2`: floor(log2(v)) of int64 v in [1, 2**24), 0 for
    v = 0, by a binary search over the bit positions."""
    p = torch.zeros_like(v)
    for s in (16, 8, 4, 2, 1):
        big = v >= (1 << s)
        v = torch.where(big, v >> s, v)
        p = p + big.to(v.dtype) * s
    return p


def _codes_torch(
    x32: torch.Tensor,
    k: torch.Tensor,
    f: Format,
    rounding: str,
    keys: tuple[int, int],
    hb_in: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `quant_kernels.quant_code`. x32: [n] float32; k: int32 [1] or [n]
    (already expanded per element). Returns (int64 codes [n], int64 helper bits [n])."""
    u = x32.view(torch.int32).to(torch.int64)
    a = u & 0x7FFFFFFF
    neg = (u < 0) & (a != 0)
    ef = a >> 23
    lz = 23 - _floor_log2_torch(a)  # float32 subnormals: shift the leading one up to bit 23
    m24 = torch.where(ef == 0, a << lz, (a & 0x7FFFFF) | 0x800000)
    ek = torch.where(ef == 0, 1 - lz, ef) - 127 - k.to(torch.int64)
    d = f.emin - ek
    base = torch.where(a == 0, 0, (-d).clamp(min=0) << f.mbits)  # zero has no leading one
    sh_full = ((23 - f.mbits) + d.clamp(min=0)).clamp(max=56)
    sh = sh_full.clamp(max=30)  # as in the kernel: exact, see quant_code
    q = m24 >> sh
    rem = m24 & ((1 << sh) - 1)
    hb = torch.zeros_like(q)
    if rounding == "rne":
        n = (base + ((m24 + (1 << (sh - 1)) - 1 + (q & 1)) >> sh)).clamp(max=f.cmax)
    elif rounding == "trunc":
        n = (base + q).clamp(max=f.cmax)
    elif rounding == "stochastic":
        idx = torch.arange(x32.numel(), dtype=torch.int64, device=x32.device)
        r = counter_bits_torch(idx, *keys)
        s_up = (32 - sh_full).clamp(min=0)
        s_dn = (sh_full - 32).clamp(min=0)
        thr = torch.where(sh_full <= 32, rem << s_up, (rem + (1 << s_dn) - 1) >> s_dn)
        n = (base + q + (r < thr).to(torch.int64)).clamp(max=f.cmax)
    else:
        c = base + q
        if hb_in is not None:
            hb = hb_in.to(torch.int64)
        else:
            quarter = 1 << (sh - 2)
            hb = ((rem >= quarter) & (rem < 3 * quarter) & (c < f.cmax)).to(torch.int64)
        half = 1 << (sh - 1)
        up = ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(torch.int64)
        n = torch.where(hb != 0, c.clamp(max=f.cmax - 1), (c + up).clamp(max=f.cmax))
    if f.twos:
        code = torch.where(neg, torch.where(hb != 0, -(n + 1), -n), n) & 0xFF
    else:
        s = (neg & ((n > 0) | (hb != 0))).to(torch.int64)
        code = n | (s << f.sign_shift)
    return code, hb


def _pack_bits(hb: torch.Tensor) -> torch.Tensor:
    """[n] 0/1 -> [ceil(n/8)] uint8, element 8j + i at bit i of byte j (unused bits 0)."""
    n = hb.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int64, device=hb.device)
    padded[:n] = hb
    weights = 1 << torch.arange(8, dtype=torch.int64, device=hb.device)
    return (padded.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(helper: torch.Tensor, n: int) -> torch.Tensor:
    """[ceil(n/8)] uint8 -> [n] int64 bits (inverse of `_pack_bits`)."""
    shifts = torch.arange(8, dtype=torch.int64, device=helper.device)
    return ((helper.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[:n]


def _check_helper(helper, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(helper, torch.Tensor):
        raise TypeError(f"helper must be a uint8 tensor, got {type(helper).__name__}")
    if helper.dtype != torch.uint8:
        raise TypeError(f"helper must be a uint8 tensor, got {helper.dtype}")
    nbytes = (n + 7) // 8
    if helper.dim() != 1 or helper.numel() != nbytes:
        raise ValueError(f"helper must be 1-D with ceil(numel/8) = {nbytes} bytes, got shape {tuple(helper.shape)}")
    if helper.device != device:
        raise ValueError(f"helper is on {helper.device}, x on {device}")
    if n % 8 and nbytes and int(helper[-1]) >> (n % 8):
        raise ValueError("helper has nonzero padding bits after the last element")
    return helper.contiguous()


def quantize(
    x: torch.Tensor,
    fmt: str = "e4m3",
    rounding: str = "rne",
    *,
    seed: int | None = None,
    helper: torch.Tensor | None = None,
    scale=None,
    backend: str = "auto",
) -> QTensor:
    """Quantize ``x`` (any shape, fp16/bf16/fp32/fp64, finite) -> `QTensor`.

    fmt: one of ``FORMATS``; rounding: one of ``ROUNDINGS``; seed: int in [0, 2**64), required by
    (and only by) ``stochastic``; helper: ``qt.helper`` of the prover (two_grid verifier mode,
    needs ``scale`` for fp8/int8); scale: see the module docstring. backend: ``"auto"`` (CUDA ->
    Triton, CPU -> torch), ``"torch"``, or ``"triton"`` (on a CPU only under TRITON_INTERPRET=1).
    The codes do not depend on the backend.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be float16/bfloat16/float32/float64, got {x.dtype}")
    f = get_format(fmt)
    _check_choice("rounding", rounding, ROUNDINGS)
    _check_choice("backend", backend, BACKENDS)
    check_seed(rounding, seed)
    n = x.numel()
    if helper is not None:
        if rounding != "two_grid":
            raise ValueError(f"helper only applies to rounding='two_grid', not {rounding!r}")
        if scale is None and f.scaled:
            raise ValueError("helper needs the prover's scale: pass scale=qt.scale")
        helper = _check_helper(helper, n, x.device)

    flat = x.detach().reshape(-1)
    if flat.dtype == torch.float64:
        flat = flat.float()
    flat = flat.contiguous()
    if scale is None:
        x32 = flat.float()
        k = _computed_exponent(x32, f)
        scale_t = pow2(k).reshape(())
    else:
        k = _scale_exponent_of(scale, x, f)
        scale_t = pow2(k)
        if k.numel() > 1:
            scale_t = scale_t.reshape(tuple(x.shape[:-1]) + (1,))
        else:
            scale_t = scale_t.reshape(())
    # an empty tensor launches nothing; the torch path handles it on any device
    use_triton = n > 0 and (backend == "triton" or (backend == "auto" and x.is_cuda))
    keys = seed_keys(seed) if seed is not None else (0, 0)
    codes = torch.empty(n, dtype=f.code_dtype, device=x.device)
    prover_two_grid = rounding == "two_grid" and helper is None
    if use_triton:
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 (set before triton is "
                "imported); use backend='torch' for the same codes"
            )
        helper_out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device) if prover_two_grid else None
        flag = launch_quantize(flat, k, fmt, rounding, *keys, helper, codes, helper_out)
        if int(flag.item()):
            raise ValueError("x contains NaN or Inf")
    else:
        x32 = flat.float()
        if n and not bool(torch.isfinite(x32).all()):
            raise ValueError("x contains NaN or Inf")
        k_el = k if k.numel() == 1 else k.repeat_interleave(n // k.numel())
        hb_in = _unpack_bits(helper, n) if helper is not None else None
        code, hb = _codes_torch(x32, k_el, f, rounding, keys, hb_in)
        if f.code_dtype == torch.int16:
            code = torch.where(code >= 0x8000, code - 0x10000, code)
        codes = code.to(f.code_dtype)
        helper_out = _pack_bits(hb) if prover_two_grid else None
    out_helper = helper if helper is not None else helper_out
    return QTensor(codes.reshape(x.shape), scale_t, out_helper, fmt, rounding, x.shape, seed)


def _values(codes: torch.Tensor, hb: torch.Tensor, f: Format) -> torch.Tensor:
    """Grid values (float64, scale 1) of int64 raw codes with helper bits hb (0/1)."""
    if f.twos:
        s = torch.where(codes >= 128, codes - 256, codes)
        return (2 * s + hb).double() * 0.5
    mag = codes & ((1 << f.sign_shift) - 1)
    sign = (codes >> f.sign_shift) & 1
    ef = mag >> f.mbits
    n = torch.where(ef == 0, mag, (mag & ((1 << f.mbits) - 1)) | (1 << f.mbits))
    g = ef.clamp(min=1) + f.emin - 1 - f.mbits  # log2 of the spacing of the cell
    v = torch.ldexp((2 * n + hb).double(), (g - 1).double())
    return torch.where(sign == 1, -v, v)


def dequantize(qt: QTensor) -> torch.Tensor:
    """Values of ``qt`` as float32 of shape ``qt.shape``: ``value(code, helper) * scale``.

    h = 0: the grid value of the code; h = 1: the midpoint of the code's cell and the next
    (int8: c + 1/2). Exact: every such value times a power of two is a float32.
    """
    if not isinstance(qt, QTensor):
        raise TypeError(f"qt must be a QTensor, got {type(qt).__name__}")
    f = FORMATS[qt.fmt]
    c = qt.codes.reshape(-1).to(torch.int64)
    if qt.codes.dtype == torch.int16:
        c = c & 0xFFFF
    n = c.numel()
    hb = _unpack_bits(qt.helper, n) if qt.helper is not None else torch.zeros_like(c)
    v = _values(c, hb, f).reshape(qt.shape)
    return (v * qt.scale.double()).float()


def code_spacing(x: torch.Tensor, fmt: str, scale=None) -> torch.Tensor:
    """Spacing s_c (in x units, float64, x's shape) of the grid cell holding each |x|.

    Saturated values get the top cell's spacing. ``scale * s_c / 4`` is the two_grid tolerance;
    ``scale=None`` uses the scale `quantize` would compute.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _INPUT_DTYPES:
        raise TypeError("x must be a float16/bfloat16/float32/float64 tensor")
    f = get_format(fmt)
    qt = quantize(x, fmt, "trunc", scale=scale, backend="torch")
    c = qt.codes.reshape(-1).to(torch.int64)
    if f.twos:
        return torch.ones(x.shape, dtype=torch.float64, device=x.device) * qt.scale.double()
    mag = (c & 0xFFFF) & ((1 << f.sign_shift) - 1)
    mag = mag.clamp(max=f.cmax - 1)  # saturated: the top cell
    ef = mag >> f.mbits
    g = ef.clamp(min=1) + f.emin - 1 - f.mbits
    s = torch.ldexp(torch.ones_like(g, dtype=torch.float64), g.double()).reshape(x.shape)
    return s * qt.scale.double()
