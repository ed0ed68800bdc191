"""Deterministic quantization: torch-cast equality, saturation, canonical bytes, rounding modes,
the two-grid guarantee under adversarial perturbations, and Triton (interpreter) == torch."""

import math
import os

import pytest
import torch

from fieldprint.quant import (
    FORMATS,
    QTensor,
    code_spacing,
    counter_bits_torch,
    dequantize,
    quantize,
    seed_keys,
)

TORCH_DTYPES = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
ROUNDINGS = ["rne", "trunc", "stochastic", "two_grid"]
# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU Triton runs need TRITON_INTERPRET=1"
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grid(fmt: str) -> torch.Tensor:
    """All finite non-negative values of a float format (float64), or a dense sample for 16-bit."""
    f = FORMATS[fmt]
    codes = torch.arange(f.cmax + 1, dtype=torch.int64)
    if f.cmax > 255:
        codes = torch.cat([codes[:3000], codes[3000::7], codes[-3000:]]).unique()
    q = QTensor(
        codes.to(torch.int16) if f.code_dtype == torch.int16 else codes.to(torch.uint8),
        torch.tensor(1.0),
        None,
        fmt,
        "rne",
        codes.shape,
    )
    return dequantize(q).double()


def _log_uniform(n: int, lo_exp: float, fmax: float, g: torch.Generator) -> torch.Tensor:
    e = torch.rand(n, generator=g, dtype=torch.float64) * (math.log2(fmax) - lo_exp) + lo_exp
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (torch.exp2(e) * sign).clamp(-fmax, fmax).float()


def _torch_bits(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """torch's cast, as raw bits with -0 folded to +0 (our codes are canonical)."""
    y = x.to(TORCH_DTYPES[fmt])
    if y.element_size() == 1:
        b = y.view(torch.uint8)
        return torch.where(b == 0x80, torch.zeros_like(b), b)
    b = y.view(torch.int16)
    return torch.where(b == -0x8000, torch.zeros_like(b), b)


# --- RNE == torch's cast --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(TORCH_DTYPES))
def test_rne_equals_torch_cast(fmt):
    g = _gen(1)
    f = FORMATS[fmt]
    grid = _grid(fmt)
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints: the tie cases of RNE
    near_ties = torch.cat(
        [torch.nextafter(ties.float(), torch.tensor(0.0)), torch.nextafter(ties.float(), torch.tensor(math.inf))]
    ).double()
    lowest = f.emin - f.mbits - 3  # below half the smallest subnormal
    rand = _log_uniform(20000, lowest, f.fmax, g).double()
    mags = torch.cat([grid, ties, near_ties, rand.abs()]).clamp(max=f.fmax)
    x = torch.cat([mags, -mags]).float()
    assert torch.all(torch.isfinite(x.to(TORCH_DTYPES[fmt]).float()))  # all in range
    qt = quantize(x, fmt, "rne", scale=1.0)
    assert torch.equal(qt.codes, _torch_bits(x, fmt))
    assert torch.equal(dequantize(qt), x.to(TORCH_DTYPES[fmt]).float() + 0.0)


def test_rne_exact_ties_go_to_even():
    # e4m3: 1 + 1/16 lies between 1 (0x38) and 1.125 (0x39): even -> 0x38; 1.1875 -> 0x3A
    x = torch.tensor([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, -1.0625])
    assert quantize(x, "e4m3", scale=1.0).codes.tolist() == [0x38, 0x3A, 0x00, 0x02, 0xB8]


def test_float64_and_half_inputs_quantize_their_float32_value():
    g = _gen(2)
    x = torch.randn(513, generator=g, dtype=torch.float64) * 10
    for fmt in FORMATS:
        ref = quantize(x.float(), fmt)
        assert torch.equal(quantize(x, fmt).codes, ref.codes)
        xb = x.to(torch.bfloat16)
        assert torch.equal(quantize(xb, fmt).codes, quantize(xb.float(), fmt).codes)


# --- saturation, canonical bytes -------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_saturation_clamps_to_the_largest_finite_value(rounding):
    kw = {"seed": 3} if rounding == "stochastic" else {}
    big = {
        "e4m3": [448.5, 460.0, 464.0, 500.0, 1e6, 3e38],
        "e5m2": [57344.0, 61440.0, 1e6, 3e38],
        "int8": [127.0, 127.4, 128.0, 200.0, 1e30],
        "bf16": [3.39e38, 3.4e38, 3.4028235e38],
        "fp16": [65504.0, 65520.0, 70000.0, 1e30],
    }
    for fmt, vals in big.items():
        f = FORMATS[fmt]
        x = torch.tensor(vals + [-v for v in vals])
        qt = quantize(x, fmt, rounding, scale=1.0, **kw)
        y = dequantize(qt)
        assert torch.all(torch.isfinite(y))
        assert torch.equal(y, torch.sign(x) * f.fmax), (fmt, y)


def test_e4m3_saturation_codes_and_torch_2_11_hazard():
    x = torch.tensor([460.0, 500.0, 1e6, -1e6])
    assert quantize(x, "e4m3", scale=1.0).codes.tolist() == [0x7E, 0x7E, 0x7E, 0xFE]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_negative_zero_folds_to_positive_zero(fmt):
    tiny = 2.0**-149  # the smallest float32: rounds to 0 in every format (except stochastically)
    for rounding in ROUNDINGS:
        kw = {"seed": 0} if rounding == "stochastic" else {}
        x = torch.tensor([0.0, -0.0] + ([] if kw else [-tiny, tiny, -tiny]))
        qt = quantize(x, fmt, rounding, scale=1.0, **kw)
        data = qt.canonical_bytes()
        width = 1 if qt.codes.dtype == torch.uint8 else 2
        assert data[: len(x) * width].tolist() == [0] * (len(x) * width), (fmt, rounding, data)
        assert torch.equal(data, quantize(x.abs(), fmt, rounding, scale=1.0, **kw).canonical_bytes())


def test_canonical_bytes_layout_little_endian():
    x = torch.tensor([1.0, -2.0, 65504.0])
    bf = quantize(x, "bf16").canonical_bytes()
    assert bf.tolist() == [0x80, 0x3F, 0x00, 0xC0, 0x80, 0x47]  # 0x3F80, 0xC000, 0x4780 (rne)
    fp = quantize(x, "fp16").canonical_bytes()
    assert fp.tolist() == [0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B]
    i8 = quantize(torch.tensor([1.0, -1.0, -127.0]), "int8", scale=1.0)
    assert i8.canonical_bytes().tolist() == [0x01, 0xFF, 0x81]
    tg = quantize(torch.linspace(-3, 3, 11), "e4m3", "two_grid")
    assert torch.equal(tg.canonical_bytes(), torch.cat([tg.codes.reshape(-1), tg.helper]))
    assert tg.helper.numel() == 2 and int(tg.helper[-1]) >> 3 == 0  # 11 bits, padding zero


# --- trunc, stochastic ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_trunc_never_increases_magnitude(fmt):
    f = FORMATS[fmt]
    x = _log_uniform(4000, f.emin - f.mbits - 2, f.fmax, _gen(4))
    qt = quantize(x, fmt, "trunc", scale=1.0)
    y = dequantize(qt).double()
    xd = x.double()
    assert torch.all(y.abs() <= xd.abs())
    assert torch.all((y == 0) | (torch.sign(y) == torch.sign(xd)))
    assert torch.all(xd.abs() - y.abs() < code_spacing(x, fmt, 1.0))


def test_stochastic_reproducible_and_seed_dependent():
    x = torch.randn(64, 33, generator=_gen(5))
    a = quantize(x, "e4m3", "stochastic", seed=7)
    b = quantize(x, "e4m3", "stochastic", seed=7)
    c = quantize(x, "e4m3", "stochastic", seed=8)
    d = quantize(x, "e4m3", "stochastic", seed=7 + 2**32)  # the high word of the seed counts
    assert torch.equal(a.codes, b.codes)
    assert (a.codes != c.codes).float().mean() > 0.2
    assert (a.codes != d.codes).float().mean() > 0.2
    # bits depend only on (seed, flat index): any reshape or prefix gives the same codes
    assert torch.equal(
        quantize(x.reshape(-1, 11), "e4m3", "stochastic", seed=7, scale=a.scale).codes.reshape(-1), a.codes.reshape(-1)
    )
    assert torch.equal(quantize(x[:10], "e4m3", "stochastic", seed=7, scale=a.scale).codes, a.codes[:10])


def test_counter_bits_match_plain_python_reference():
    def mix(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    k0, k1 = seed_keys(123456789123)
    idx = [0, 1, 2, 2**31 + 5, 2**32 + 9, 2**40 + 3]
    got = counter_bits_torch(torch.tensor(idx), k0, k1).tolist()
    want = [mix(mix((i & 0xFFFFFFFF) ^ k0) ^ (i >> 32) ^ k1) for i in idx]
    assert got == want
    r = counter_bits_torch(torch.arange(100000), k0, k1).double() / 2**32
    assert abs(r.mean().item() - 0.5) < 0.005 and abs((r < 0.25).double().mean().item() - 0.25) < 0.01


@pytest.mark.parametrize("fmt", ["e4m3", "int8", "bf16"])
def test_stochastic_is_unbiased(fmt):
    f = FORMATS[fmt]
    g = _gen(6)
    x0 = _log_uniform(48, f.emin - f.mbits - 1, f.fmax / 2, g)
    reps = 3000
    x = x0.repeat(reps, 1)  # each row a fresh set of counters: independent draws
    y = dequantize(quantize(x, fmt, "stochastic", seed=11, scale=1.0)).double()
    mean = y.mean(dim=0)
    s = code_spacing(x0, fmt, 1.0)
    lower = dequantize(quantize(x0, fmt, "trunc", scale=1.0)).double().abs()
    p = ((x0.double().abs() - lower) / s).clamp(0, 1)
    sigma = s * torch.sqrt(p * (1 - p) / reps)
    assert torch.all((mean - x0.double()).abs() <= 6 * sigma + 1e-12 * s)
    # and every draw is one of the two neighbours
    assert torch.all((y.abs() - lower).abs() <= s * (1 + 1e-12))


# --- two-grid -------------------------------------------------------------------------------


def _edge_cases(fmt: str, scale: float) -> torch.Tensor:
    """Binade edges, zero, saturation and quarter points, in x units."""
    f = FORMATS[fmt]
    grid = _grid(fmt)
    if fmt in ("bf16", "fp16"):
        grid = torch.cat([grid[:200], grid[-200:], grid[::97]])
    s = grid[1:] - grid[:-1]
    base = grid[:-1]
    f32max = torch.finfo(torch.float32).max
    pts = [
        grid,
        base + s / 4,
        base + 3 * s / 4,
        base + s / 2,
        base + s / 4 - s / 64,
        base + 3 * s / 4 + s / 64,
        torch.tensor([f.fmax * 1.5, f.fmax * 1e3, f32max, 0.0]),
    ]
    pows = torch.exp2(torch.arange(f.emin - f.mbits - 2, math.log2(f.fmax) + 1).double())
    pts += [pows, pows * (1 - 2.0**-20), pows * (1 + 2.0**-20)]
    mags = torch.cat(pts) * scale
    return torch.cat([mags, -mags]).clamp(-f32max, f32max).float()


def _perturbed(x: torch.Tensor, bound: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """x + frac * bound in float32, stepped one ulp back toward x where rounding reached the bound
    (large saturated values) and clamped to the float32 range."""
    f32max = torch.finfo(torch.float32).max
    xp = (x.double() + frac * bound).clamp(-f32max, f32max).float()
    over = (xp.double() - x.double()).abs() >= bound
    xp = torch.where(over, torch.nextafter(xp, x), xp)
    assert torch.all((xp.double() - x.double()).abs() < bound)
    return xp


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_two_grid_verifier_agrees_under_adversarial_perturbation(fmt):
    f = FORMATS[fmt]
    scale = 2.0**-5 if f.scaled else 1.0
    g = _gen(7)
    rand = _log_uniform(3000, f.emin - f.mbits - 2, f.fmax, g) * scale
    x = torch.cat([_edge_cases(fmt, scale), rand])
    qt = quantize(x, fmt, "two_grid", scale=scale)
    bound = code_spacing(x, fmt, scale) / 4
    flips_rne = 0
    for frac in (0.99, -0.99, None):
        fr = (
            torch.full_like(bound, frac)
            if frac is not None
            else (torch.rand(bound.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.99
        )
        xp = _perturbed(x, bound, fr)
        v = quantize(xp, fmt, "two_grid", helper=qt.helper, scale=qt.scale)
        assert torch.equal(v.codes, qt.codes), (fmt, frac)
        assert torch.equal(v.canonical_bytes(), qt.canonical_bytes())
        flips_rne += int((quantize(xp, fmt, scale=scale).codes != quantize(x, fmt, scale=scale).codes).sum())
    assert flips_rne > 0  # the same perturbations do flip plain RNE codes


def test_two_grid_per_row_scale_and_computed_scale():
    g = _gen(8)
    x = torch.randn(6, 40, generator=g) * torch.exp2(torch.arange(6.0) * 7 - 20)[:, None]
    for scale in (None, torch.exp2(torch.arange(6.0) * 7 - 28)[:, None]):
        qt = quantize(x, "e4m3", "two_grid", scale=scale)
        bound = code_spacing(x, "e4m3", qt.scale) / 4
        for sgn in (1, -1):
            xp = _perturbed(x, bound, torch.full_like(bound, 0.99 * sgn))
            assert torch.equal(quantize(xp, "e4m3", "two_grid", helper=qt.helper, scale=qt.scale).codes, qt.codes)


def test_two_grid_bound_is_tight():
    # t = 1/4 of the cell [1, 1.125): grid B (trunc) chosen; a shift of just over s/4 breaks it
    x = torch.tensor([1.0 + 0.125 / 4])
    qt = quantize(x, "e4m3", "two_grid", scale=1.0)
    assert qt.helper.tolist() == [1]
    xp = x - 0.125 / 4 * 1.01
    assert not torch.equal(quantize(xp, "e4m3", "two_grid", helper=qt.helper, scale=1.0).codes, qt.codes)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequantize_error_bounds(fmt):
    f = FORMATS[fmt]
    x = _log_uniform(5000, f.emin - f.mbits - 2, f.fmax, _gen(9))
    xd = x.double()
    s = code_spacing(x, fmt, 1.0)
    limits = {"rne": 0.5, "trunc": 1.0, "stochastic": 1.0, "two_grid": 0.25}
    for rounding, lim in limits.items():
        kw = {"seed": 1} if rounding == "stochastic" else {}
        err = (dequantize(quantize(x, fmt, rounding, scale=1.0, **kw)).double() - xd).abs()
        assert torch.all(err <= lim * s), (rounding, (err / s).max())
    if fmt != "int8":  # relative RNE error in the normal range
        normal = xd.abs() >= 2.0**f.emin
        err = (dequantize(quantize(x, fmt, scale=1.0)).double() - xd).abs()
        assert torch.all(err[normal] <= xd.abs()[normal] * 2.0 ** -(f.mbits + 1))


# --- scale ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
def test_computed_scale_is_the_smallest_fitting_power_of_two(fmt):
    f = FORMATS[fmt]
    g = _gen(10)
    for amax_exp in (-40.0, -3.0, 0.0, 9.0, 30.0):
        x = torch.randn(300, generator=g) * 2.0**amax_exp
        qt = quantize(x, fmt)
        s = qt.scale.item()
        mant, _ = math.frexp(s)
        assert mant == 0.5 and qt.scale.dim() == 0
        amax = x.abs().max().item()
        assert amax <= f.fmax * s and amax > f.fmax * s / 2
    assert quantize(torch.zeros(5), fmt).scale.item() == 1.0


def test_int8_power_of_two_scale_is_exact():
    g = _gen(11)
    n = torch.randint(-127, 128, (1000,), generator=g)
    for k in (-20, -3, 0, 5, 60):
        x = (n.double() * 2.0**k).float()
        qt = quantize(x, "int8", scale=2.0**k)
        assert torch.equal(qt.codes.to(torch.int8).to(torch.int64), n)  # two's complement byte
        assert torch.equal(dequantize(qt), x)
    x = torch.randn(1000, generator=g) * 3
    qt = quantize(x, "int8")
    assert torch.equal(dequantize(qt), dequantize(quantize(x, "int8", scale=qt.scale)))
    assert torch.all((dequantize(qt) / qt.scale) == torch.round(x / qt.scale))


# --- Triton (interpreter) == torch ------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_triton_path_equals_torch_path(fmt):
    from fieldprint.quant_kernels import launch_quantize

    f = FORMATS[fmt]
    g = _gen(12)
    x = torch.randn(3, 347, generator=g) * torch.exp2(torch.randint(-30, 20, (3, 347), generator=g))
    x[0, :6] = torch.tensor([0.0, -0.0, f.fmax, 1e30, -1e30, 1e-42])
    row_scale = torch.tensor([[2.0**-3], [1.0], [2.0**40]]) if f.scaled else None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xs = x.to(dtype) if dtype == torch.float32 else (x.clamp(-6e4, 6e4)).to(dtype)
        for rounding in ROUNDINGS:
            kw = {"seed": 2**63 + 17} if rounding == "stochastic" else {}
            for scale in (None, row_scale):
                a = quantize(xs, fmt, rounding, scale=scale, backend="torch", **kw)
                b = quantize(xs, fmt, rounding, scale=scale, backend="triton", **kw)
                assert torch.equal(a.codes, b.codes), (dtype, rounding, scale)
                assert torch.equal(a.scale, b.scale)
                assert torch.equal(a.canonical_bytes(), b.canonical_bytes())
                if rounding == "two_grid":
                    v = quantize(xs, fmt, rounding, scale=a.scale, helper=a.helper, backend="triton")
                    assert torch.equal(v.codes, a.codes)
    # every output element is written: poison the buffers, launch directly
    xs = x.reshape(-1)[:1029].contiguous()
    k = torch.tensor([-2 if f.scaled else 0], dtype=torch.int32)
    codes = torch.full((1029,), 0x55, dtype=f.code_dtype)
    helper = torch.full((129,), 0xAA, dtype=torch.uint8)
    launch_quantize(xs, k, fmt, "two_grid", 0, 0, None, codes, helper)
    ref = quantize(xs, fmt, "two_grid", scale=0.25 if f.scaled else 1.0, backend="torch")
    assert torch.equal(codes, ref.codes) and torch.equal(helper, ref.helper)


@interpreted
def test_triton_path_rejects_non_finite():
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.ones(37)
        x[20] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            quantize(x, "e4m3", scale=1.0, backend="triton")


def test_empty_input():
    for fmt in FORMATS:
        qt = quantize(torch.empty(0, 4), fmt, "two_grid", backend="triton")
        assert qt.codes.shape == (0, 4) and qt.helper.numel() == 0
        assert dequantize(qt).shape == (0, 4)


# --- bad input ------------------------------------------------------------------------------

_X = torch.ones(4, 10)
_H = quantize(_X, "e4m3", "two_grid").helper


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (([1.0, 2.0],), {}, TypeError, "x must"),
        ((torch.ones(3, dtype=torch.int32),), {}, TypeError, "x must"),
        ((torch.ones(3, dtype=torch.float8_e4m3fn),), {}, TypeError, "x must"),
        ((_X, "e3m4"), {}, ValueError, "fmt must"),
        ((_X, "e4m3", "nearest"), {}, ValueError, "rounding must"),
        ((_X, "e4m3", "stochastic"), {}, ValueError, "seed is required"),
        ((_X, "e4m3", "rne"), {"seed": 1}, ValueError, "seed only applies"),
        ((_X, "e4m3", "stochastic"), {"seed": -1}, ValueError, "seed must"),
        ((_X, "e4m3", "stochastic"), {"seed": 2**64}, ValueError, "seed must"),
        ((_X, "e4m3", "stochastic"), {"seed": 1.5}, TypeError, "seed must"),
        ((_X, "e4m3", "rne"), {"helper": _H, "scale": 1.0}, ValueError, "helper only"),
        ((_X, "e4m3", "two_grid"), {"helper": _H}, ValueError, "scale=qt.scale"),
        ((_X, "e4m3", "two_grid"), {"helper": _H[:-1], "scale": 1.0}, ValueError, "helper must"),
        ((_X, "e4m3", "two_grid"), {"helper": _H.to(torch.int32), "scale": 1.0}, TypeError, "helper must"),
        (
            (torch.ones(13), "e4m3", "two_grid"),
            {"helper": torch.full((2,), 0xFF, dtype=torch.uint8), "scale": 1.0},
            ValueError,
            "helper has nonzero",
        ),
        ((_X, "e4m3"), {"scale": torch.ones(4)}, ValueError, "scale must have"),
        ((_X, "e4m3"), {"scale": torch.ones(3, 1)}, ValueError, "scale must have"),
        ((_X, "e4m3"), {"scale": 0.3}, ValueError, "scale must hold"),
        ((_X, "e4m3"), {"scale": -2.0}, ValueError, "scale must hold"),
        ((_X, "e4m3"), {"scale": math.nan}, ValueError, "scale must hold"),
        ((_X, "e4m3"), {"scale": 0.0}, ValueError, "scale must hold"),
        ((_X, "e4m3"), {"scale": torch.ones(1, dtype=torch.int32)}, TypeError, "scale must"),
        ((_X, "e4m3"), {"scale": "1"}, TypeError, "scale must"),
        ((_X, "bf16"), {"scale": 2.0}, ValueError, "scale must be 1"),
        ((_X, "e4m3"), {"backend": "cuda"}, ValueError, "backend must"),
        ((torch.tensor([1.0, math.nan]),), {}, ValueError, "x contains NaN or Inf"),
        ((torch.tensor([1.0, -math.inf]), "bf16"), {}, ValueError, "x contains NaN or Inf"),
        ((torch.tensor([1.0, math.inf]), "int8"), {"scale": 1.0}, ValueError, "x contains NaN"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize(*args, **kwargs)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        quantize(torch.ones(3), backend="triton")


def test_bad_dequantize_and_spacing_input():
    with pytest.raises(TypeError, match="qt must"):
        dequantize(torch.ones(3))
    with pytest.raises(ValueError, match="fmt must"):
        code_spacing(torch.ones(3), "e4m4")
    with pytest.raises(TypeError, match="x must"):
        code_spacing(torch.ones(3, dtype=torch.int64), "e4m3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cuda_kernel_equals_cpu_path(fmt):
    f = FORMATS[fmt]
    g = _gen(13)
    x = torch.randn(1000, 4099, generator=g) * torch.exp2(torch.randint(-30, 20, (1000, 4099), generator=g))
    x[0, :8] = torch.tensor([0.0, -0.0, f.fmax, 460.0, 500.0, 1e30, -1e30, 1e-42])
    xc = x.cuda()
    for rounding in ROUNDINGS:
        kw = {"seed": 99} if rounding == "stochastic" else {}
        a = quantize(x, fmt, rounding, **kw)
        b = quantize(xc, fmt, rounding, **kw)
        assert torch.equal(a.canonical_bytes(), b.canonical_bytes().cpu()), rounding
        assert torch.equal(dequantize(a), dequantize(b).cpu())
        if rounding == "two_grid":
            v = quantize(xc, fmt, rounding, helper=b.helper, scale=b.scale)
            assert torch.equal(v.codes, b.codes)
    if fmt in TORCH_DTYPES:  # RNE equals the device's own cast on in-range values
        xin = x.clamp(-f.fmax, f.fmax).cuda()
        assert torch.equal(quantize(xin, fmt, scale=1.0).codes.cpu(), _torch_bits(xin, fmt).cpu())
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        quantize(torch.tensor([1.0, math.nan], device="cuda"), fmt)


# --- every finite bf16 value at the extreme scales, against a float64 reference of the spec ----

_ALL_BF16 = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
_ALL_BF16 = _ALL_BF16[torch.isfinite(_ALL_BF16)]  # 65280 values: zeros, subnormals, normals
# k = -126 (the smallest scale), the first k that takes float32 subnormals into the e4m3 / e5m2
# normal range (-121 / -113), and the largest scale
EXTREME_K = (-126, -121, -113, 127)
REF_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
              "fp16": torch.float16}


def _grid_values(fmt: str) -> torch.Tensor:
    """The non-negative grid v(0) < ... < v(cmax) of fmt (float64), read from torch's own float
    formats (int8: the integers 0..127): independent of the quantizer's constants."""
    f = FORMATS[fmt]
    c = torch.arange(f.cmax + 1)
    if fmt == "int8":
        return c.double()
    bits = c.to(torch.uint8) if f.width == 1 else c.to(torch.int16)
    return bits.view(REF_DTYPES[fmt]).double()


def _reference_codes(x: torch.Tensor, fmt: str, rounding: str, k: int, seed: int | None):
    """The spec of fieldprint.quant written in float64: y = x / 2**k, |y| clamped to fmax, its
    cell [v(c), v(c+1)) and position t, the rounding rule, then sign and code bits. Returns
    (codes int64, helper bits int64)."""
    f = FORMATS[fmt]
    grid = _grid_values(fmt)
    y = x.double() * 2.0**-k  # exact: a bf16 value times a power of two
    mag = y.abs().clamp(max=grid[-1])
    c = torch.searchsorted(grid, mag, right=True) - 1  # v(c) <= |y| < v(c + 1)
    top = c == f.cmax
    lo = grid[c]
    spacing = torch.where(top, grid[-1] - grid[-2], grid[(c + 1).clamp(max=f.cmax)] - lo)
    t = (mag - lo) / spacing  # exact: spacing is a power of two
    up_rne = (t > 0.5) | ((t == 0.5) & (c % 2 == 1))
    hb = torch.zeros_like(c)
    if rounding == "rne":
        n = c + up_rne
    elif rounding == "trunc":
        n = c
    elif rounding == "stochastic":
        r = counter_bits_torch(torch.arange(x.numel()), *seed_keys(seed))
        n = c + (r < torch.ceil(t * 2.0**32).long())
    else:
        hb = ((t >= 0.25) & (t < 0.75) & ~top).long()
        n = torch.where(hb == 1, c, c + up_rne)
    n = n.clamp(max=f.cmax)
    neg = y < 0
    if f.twos:
        code = torch.where(neg, torch.where(hb == 1, -(n + 1), -n), n) & 0xFF
    else:
        code = n | ((neg & ((n > 0) | (hb == 1))).long() << f.sign_shift)
    return code, hb


def _codes_of(qt) -> torch.Tensor:
    return qt.codes.reshape(-1).to(torch.int64) & (0xFF if qt.codes.dtype == torch.uint8 else 0xFFFF)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_bf16_value_at_the_extreme_scales_matches_the_float64_spec(fmt):
    """Zero gets code 0 and bf16 subnormals (float32 subnormals) their true codes at every
    extreme k, for every rounding, on the torch path; zero at every k of the range."""
    f = FORMATS[fmt]
    for k in EXTREME_K if f.scaled else (0,):
        for rounding in ROUNDINGS:
            seed = 2**40 + 3 if rounding == "stochastic" else None
            qt = quantize(_ALL_BF16, fmt, rounding, seed=seed, scale=2.0**k, backend="torch")
            code, hb = _reference_codes(_ALL_BF16, fmt, rounding, k, seed)
            got = _codes_of(qt)
            bad = torch.nonzero(got != code).flatten()
            assert bad.numel() == 0, (k, rounding, _ALL_BF16[bad[:4]].tolist(), got[bad[:4]].tolist())
            if rounding == "two_grid":
                assert torch.equal(quantize(_ALL_BF16, fmt, rounding, scale=2.0**k).helper,
                                   qt.helper)
                assert torch.equal(torch.tensor([int(b) for b in qt.helper.tolist() for b in
                                                 format(b, "08b")[::-1]])[:hb.numel()], hb)
    if f.scaled:  # zero and the float32 subnormal extremes at every scale of the range
        ks = torch.arange(-126, 128)
        x = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-126 - 2.0**-149), 2.0**-133]).repeat(ks.numel(), 1)
        scale = torch.exp2(ks.double()).float()[:, None]
        got = _codes_of(quantize(x, fmt, "rne", scale=scale, backend="torch")).reshape(x.shape)
        for i, k in enumerate(ks.tolist()):
            assert got[i].tolist() == _reference_codes(x[i], fmt, "rne", k, None)[0].tolist(), k
        assert got[:, :2].eq(0).all()


@interpreted
@pytest.mark.parametrize("fmt,k", [("e4m3", -126), ("e4m3", -121), ("e5m2", -113), ("int8", -126)])
def test_every_bf16_value_at_an_extreme_scale_triton_equals_torch(fmt, k):
    """The Triton twin (interpreter) on the same sweep gives the torch path's bits (which the
    test above holds to the float64 spec)."""
    roundings = ROUNDINGS if (fmt, k) == ("e4m3", -126) else ["rne", "two_grid"]
    for rounding in roundings:
        seed = 2**40 + 3 if rounding == "stochastic" else None
        a = quantize(_ALL_BF16, fmt, rounding, seed=seed, scale=2.0**k, backend="torch")
        b = quantize(_ALL_BF16, fmt, rounding, seed=seed, scale=2.0**k, backend="triton")
        assert torch.equal(a.codes, b.codes), rounding
        assert (a.helper is None) == (b.helper is None)
        if a.helper is not None:
            assert torch.equal(a.helper, b.helper)
        assert torch.equal(_codes_of(b), _reference_codes(_ALL_BF16, fmt, rounding, k, seed)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cuda_kernel_every_bf16_value_at_the_extreme_scales(fmt):
    """The compiled kernel on the sweep of every finite bf16 value gives the float64 spec's codes."""
    x = _ALL_BF16.cuda()
    for k in EXTREME_K if FORMATS[fmt].scaled else (0,):
        for rounding in ROUNDINGS:
            seed = 2**40 + 3 if rounding == "stochastic" else None
            qt = quantize(x, fmt, rounding, seed=seed, scale=2.0**k)
            want = _reference_codes(_ALL_BF16, fmt, rounding, k, seed)[0]
            assert torch.equal(_codes_of(qt).cpu(), want), (k, rounding)
            if rounding == "two_grid":
                assert torch.equal(qt.helper.cpu(), quantize(_ALL_BF16, fmt, rounding, scale=2.0**k).helper)
