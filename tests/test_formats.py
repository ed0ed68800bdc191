"""The format table and the power-of-two scale rule (fieldprint.formats) against independent
references: torch's own float formats, and a float64 search for the smallest fitting scale."""

import ast
import math
from pathlib import Path

import pytest
import torch

from fieldprint.formats import (
    FORMAT_IDS,
    FORMATS,
    ROUNDING_IDS,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
    format_constants,
    get_format,
    pow2,
    scale_exponent,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "fieldprint"


def test_fmax_and_widths_match_torch_formats():
    torch_dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
                    "fp16": torch.float16}
    for name, dtype in torch_dtypes.items():
        f = FORMATS[name]
        assert f.fmax == torch.finfo(dtype).max, name
        assert f.width == dtype.itemsize and f.bits == torch.finfo(dtype).bits
        assert 2.0**-f.mbits == torch.finfo(dtype).eps
        assert 2.0**f.emin == torch.finfo(dtype).smallest_normal
    assert FORMATS["int8"].fmax == 127.0 and FORMATS["int8"].width == 1
    assert sorted(FORMAT_IDS.values()) == [1, 2, 3, 4, 5]  # leaf header ids: distinct, never 0
    assert sorted(ROUNDING_IDS.values()) == [0, 1, 2, 3]
    assert format_constants("e5m2") == dict(MBITS=2, EMIN=-14, CMAX=0x7B, SIGN_SHIFT=7, TWOS=0)
    with pytest.raises(ValueError, match="fmt must be one of"):
        get_format("e3m4")
    with pytest.raises(ValueError, match="kv_fmt must be one of"):
        get_format(None, "kv_fmt")


def _smallest_k(amax: float, fmax: float) -> int:
    """The rule written out: smallest k in [-126, 127] with amax <= fmax * 2**k (exact in float64)."""
    if amax == 0:
        return 0
    for k in range(SCALE_EXP_MIN, SCALE_EXP_MAX + 1):
        if amax <= fmax * 2.0**k:
            return k
    return SCALE_EXP_MAX


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
def test_scale_exponent_is_the_smallest_fitting_power_of_two(fmt):
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(1)
    rand = torch.exp2(torch.rand(3000, generator=gen, dtype=torch.float64) * 290 - 160).float()
    at = torch.tensor([f.fmax * 2.0**k for k in (-126, -100, -3, 0, 1, 100)], dtype=torch.float64).float()
    edges = torch.cat([at, torch.nextafter(at, torch.tensor(0.0)), torch.nextafter(at, torch.tensor(math.inf))])
    special = torch.tensor([0.0, 2.0**-149, 2.0**-127, 2.0**-126, torch.finfo(torch.float32).max])
    amax = torch.cat([rand, edges, special])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = amax.to(dtype).clamp(max=torch.finfo(dtype).max)
        got = scale_exponent(a, fmt)
        assert got.dtype == torch.int32 and got.shape == a.shape
        want = [_smallest_k(v, f.fmax) for v in a.double().tolist()]
        assert got.tolist() == want, dtype
    assert scale_exponent(amax[:15].reshape(3, 5), fmt).shape == (3, 5)


def test_scale_exponent_of_unscaled_formats_is_zero_and_pow2_is_exact():
    assert scale_exponent(torch.tensor([3e38, 1e-30]), "bf16").tolist() == [0, 0]
    k = torch.arange(SCALE_EXP_MIN, SCALE_EXP_MAX + 1, dtype=torch.int32)
    assert pow2(k).dtype == torch.float32
    assert pow2(k).double().tolist() == [2.0**i for i in k.tolist()]


def test_verification_modules_import_at_the_top():
    """No function-level imports (they hid an import circle quant <-> quant_kernels)."""
    modules = ["formats.py", "leaf.py", "quant.py", "quant_kernels.py", "merkle.py", "hashing/__init__.py",
               "hashing/fused.py"] + [p.name for p in SRC.glob("commit*.py")]
    for name in modules:
        tree = ast.parse((SRC / name).read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                inner = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
                assert not inner, f"{name}:{fn.name} imports inside a function (line {inner[0].lineno})"
