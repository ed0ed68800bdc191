"""The format table of quantized KV pages, and the power-of-two scale rule that follows from it.

This module is the one owner of every per-format constant: the format names and the ids a page
leaf stores (`fieldprint.leaf`), the rounding names and ids, the grid constants of the integer
quantizer (`fieldprint.quant_kernels.quant_code` and its torch twin in `fieldprint.quant`), code
widths, the largest finite value, and the range of the scale exponent. The exact meaning of each
format and rounding mode is in the docstring of `fieldprint.quant`.

    f = FORMATS["e4m3"]                     # Format(name="e4m3", id=1, mbits=3, ...)
    f.fmax, f.width, f.bits                 # 448.0, 1 code byte, 8 code bits
    format_constants("e4m3")                # the constexpr arguments of quant_code
    k = scale_exponent(amax, "e4m3")        # int32, amax's shape: the page-scale rule
    scale = pow2(k)                         # float32 2**k, exactly

Grid of a sign-magnitude format (all but int8): a magnitude code c has exponent field
``e = c >> mbits`` and mantissa ``m = c & (2**mbits - 1)`` and means ``(m + 2**mbits * (e > 0)) *
2**(max(e, 1) + emin - 1 - mbits)`` (subnormals below 2**emin); ``cmax`` is the largest finite
magnitude code, so ``fmax`` is its value. int8 is two's complement ``n`` in [-127, 127] meaning n:
it is written as the same grid with ``mbits = emin = 7`` (one binade-free uniform grid of spacing
1) and ``cmax = 127``.

Scale rule (fp8 and int8; bf16 and fp16 carry none): a group of values (a tensor, a row, a page)
is stored with the scale ``2**k``, k the smallest integer in [SCALE_EXP_MIN, SCALE_EXP_MAX] with
``amax <= fmax * 2**k`` (amax the group's largest magnitude), and k = 0 for an all-zero group.
``2**k`` is a normal float32 power of two, so dividing by it is exact. `scale_exponent` computes
k by integer arithmetic on the float32 bit pattern of amax, so it cannot depend on the device or
on flush-to-zero modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FORMATS",
    "FORMAT_IDS",
    "ROUNDINGS",
    "ROUNDING_IDS",
    "SCALE_EXP_MAX",
    "SCALE_EXP_MIN",
    "Format",
    "format_constants",
    "get_format",
    "pow2",
    "scale_exponent",
    "scale_rule_constants",
]

# rounding name -> the id in a page leaf header and the ROUNDING constexpr of quant_code
ROUNDING_IDS = {"rne": 0, "trunc": 1, "stochastic": 2, "two_grid": 3}
ROUNDINGS = tuple(ROUNDING_IDS)

# the scale 2**k is a normal float32: k in [-126, 127]
SCALE_EXP_MIN = -126
SCALE_EXP_MAX = 127


@dataclass(frozen=True)
class Format:
    """One target format (see the module docstring for the grid these constants define)."""

    name: str
    id: int  # the format byte of a page leaf header
    mbits: int  # stored mantissa bits (int8: 7, so the grid spacing is 2**(emin - mbits) = 1)
    emin: int  # smallest normal exponent; below it the grid is uniform with spacing 2**(emin-mbits)
    cmax: int  # largest finite magnitude code
    sign_shift: int  # position of the sign bit (sign-magnitude formats)
    twos: bool  # two's complement (int8) instead of sign-magnitude
    code_dtype: torch.dtype  # uint8 (fp8 bytes, int8 two's complement byte) or int16 (bf16/fp16 bits)
    scaled: bool  # fp8/int8 carry a power-of-two scale; bf16/fp16 do not

    @property
    def width(self) -> int:
        """Bytes per code."""
        return self.code_dtype.itemsize

    @property
    def bits(self) -> int:
        """Bits per code (without the two_grid helper bit)."""
        return 8 * self.width

    @property
    def fmax(self) -> float:
        """The largest finite value: the value of code ``cmax``."""
        if self.twos:
            return float(self.cmax)
        e, m = self.cmax >> self.mbits, self.cmax & ((1 << self.mbits) - 1)
        return math.ldexp(m + (1 << self.mbits) * (e > 0), max(e, 1) + self.emin - 1 - self.mbits)


FORMATS = {
    "e4m3": Format("e4m3", 1, 3, -6, 0x7E, 7, False, torch.uint8, True),  # OCP FP8 E4M3 ("fn")
    "e5m2": Format("e5m2", 2, 2, -14, 0x7B, 7, False, torch.uint8, True),  # OCP FP8 E5M2, saturating
    "int8": Format("int8", 3, 7, 7, 127, 7, True, torch.uint8, True),
    "bf16": Format("bf16", 4, 7, -126, 0x7F7F, 15, False, torch.int16, False),
    "fp16": Format("fp16", 5, 10, -14, 0x7BFF, 15, False, torch.int16, False),
}
FORMAT_IDS = {name: f.id for name, f in FORMATS.items()}


def get_format(fmt: str, name: str = "fmt") -> Format:
    """The `Format` called ``fmt``; a ValueError naming the argument ``name`` otherwise."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"{name} must be one of {list(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def format_constants(fmt: str) -> dict[str, int]:
    """The constexpr arguments of `fieldprint.quant_kernels.quant_code` for ``fmt`` (e.g. ``"e4m3"``)."""
    f = get_format(fmt)
    return dict(MBITS=f.mbits, EMIN=f.emin, CMAX=f.cmax, SIGN_SHIFT=f.sign_shift, TWOS=int(f.twos))


def scale_rule_constants(fmt: str) -> tuple[int, int]:
    """``(sig, exp)`` with ``fmax = sig * 2**exp`` and a 24-bit significand ``sig``, like every
    normal float32 amax: the constants of the scale rule's integer comparison (`scale_exponent`
    and its Triton twin `fieldprint.hashing.fused.scale_exponent_bits`)."""
    fm, fe = math.frexp(get_format(fmt).fmax)
    return int(fm * 2**24), fe - 24


def scale_exponent(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """The scale exponent k of groups whose largest magnitudes are ``amax`` (the module's rule).

    amax: float tensor of any shape (fp16/bf16/fp32 exactly; float64 is first rounded to float32,
    the precision every quantizer works in), finite (a NaN/Inf amax gives SCALE_EXP_MAX: callers
    reject non-finite input themselves). Returns int32 of amax's shape on amax's device; all
    zeros for the unscaled formats (bf16, fp16).
    """
    if not get_format(fmt).scaled:
        return torch.zeros(amax.shape, dtype=torch.int32, device=amax.device)
    sig, exp = scale_rule_constants(fmt)
    a = amax.to(torch.float32).view(torch.int32) & 0x7FFFFFFF
    ef = a >> 23
    # a normal amax is (a & 0x7FFFFF | 0x800000) * 2**(ef - 150): compare significands in one binade
    k = ef - (150 + exp) + (((a & 0x7FFFFF) | 0x800000) > sig).to(torch.int32)
    k = torch.where(ef == 0, SCALE_EXP_MIN, k)  # a subnormal amax fits below the smallest scale
    k = torch.where(a == 0, 0, k)
    return k.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX).to(torch.int32)


def pow2(k: torch.Tensor) -> torch.Tensor:
    """float32 ``2**k`` (k's shape) of int32 exponents in [SCALE_EXP_MIN, SCALE_EXP_MAX], built
    from its bit pattern (the scale word a page leaf stores), hence exact."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)
