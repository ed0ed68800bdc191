"""The hardware-assisted quantizer (`quant_kernels.quant_code_fast`) against the specification
(`quant_kernels.quant_code` on the GPU, `quant._codes_torch` on the CPU), exhaustively: every
finite bf16 value times every scale exponent k in [-126, 127], for e4m3 and e5m2 with rne, trunc
and two_grid.

The CPU tests prove the algorithm (its float steps written in torch) and that the hardware path
compiles to the fp8 conversion instructions; the GPU tests prove the hardware (the compiled path
on the device against the integer path on the same device, and `quantize` on CUDA against the
torch specification).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from fieldprint.formats import FORMATS, ROUNDING_IDS, SCALE_EXP_MAX, SCALE_EXP_MIN, format_constants
from fieldprint.quant import _codes_torch, quantize
from fieldprint.quant_kernels import hardware_fp8, quant_code, quant_code_fast

FAST_FORMATS = ("e4m3", "e5m2")
FAST_ROUNDINGS = ("rne", "trunc", "two_grid")
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
ALL_K = torch.arange(SCALE_EXP_MIN, SCALE_EXP_MAX + 1, dtype=torch.int32)  # 254 exponents

_BITS = torch.arange(2**16, dtype=torch.int32).to(torch.int16)
ALL_BF16 = _BITS.view(torch.bfloat16)[torch.isfinite(_BITS.view(torch.bfloat16))]  # 65280 values


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16 -> float32 by moving the bits (exact for subnormals on every torch build)."""
    return (x.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _fast_twin(x32: torch.Tensor, k: torch.Tensor, fmt: str, rounding: str):
    """`quant_code_fast`'s hardware algorithm in torch. x32: float32 [..., n]; k: int32
    broadcastable against x32. Returns (codes, helper bits), int64 of the broadcast shape.

    Each step is the kernel's: the one multiply by 2**-k built from its bits (float32, subnormal
    2**-127 included; torch on the CPU keeps subnormals), the RNE conversion to fp8 and back, the
    exact difference d and the quarter spacing q from the exponent bits. torch's float8 casts round
    to nearest even but do not saturate on every release (torch 2.11 makes e4m3 NaN above 464), so
    the hardware's .satfinite conversion is written as a clamp to [-fmax, fmax] first: rounding is
    monotone and +-fmax lie on the grid, so every |y| > fmax rounds to fmax either way, and a value
    within range is untouched.
    """
    f = FORMATS[fmt]
    fp8 = TORCH_FP8[fmt]
    s = torch.where(k < 127, (127 - k) << 23, 0x400000).to(torch.int32).view(torch.float32)
    y = x32 * s
    if rounding == "rne":
        b = y.clamp(-f.fmax, f.fmax).to(fp8).view(torch.uint8).to(torch.int64)
        code = torch.where(b == 0x80, 0, b)
        return code, torch.zeros_like(code)
    ya = y.abs().clamp(max=f.fmax)
    n8 = ya.to(fp8)
    n = n8.view(torch.uint8).to(torch.int64)
    d = ya - n8.to(torch.float32)
    if rounding == "trunc":
        mag = n - (d < 0).to(torch.int64)
        hb = torch.zeros_like(mag)
        sign = y <= -(2.0 ** (f.emin - f.mbits))
    else:
        qbits = torch.maximum((ya.view(torch.int32) & 0x7F800000) - ((f.mbits + 2) << 23),
                              torch.tensor((127 + f.emin - f.mbits - 2) << 23, dtype=torch.int32))
        q = qbits.view(torch.float32)
        down = d < -q
        hb = ((d >= q) | down).to(torch.int64)
        mag = n - down.to(torch.int64)
        sign = y <= -(2.0 ** (f.emin - f.mbits - 2))
    return mag | (sign.to(torch.int64) << 7), hb


def _twin_mismatches(x32: torch.Tensor, k: torch.Tensor, fmt: str, rounding: str, seen: dict) -> str:
    """Compare the twin with the spec on the pairs of x32 (float32) and k (int32), broadcast
    against each other; add the cases met to ``seen``. Returns '' or the first mismatch."""
    f = FORMATS[fmt]
    xb, kb = (t.reshape(-1) for t in torch.broadcast_tensors(x32, k))
    code, hb = (t.reshape(-1) for t in _fast_twin(x32, k, fmt, rounding))
    want_code, want_hb = _codes_torch(xb, kb, f, rounding, (0, 0), None)
    bad = torch.nonzero((code != want_code) | (hb != want_hb)).flatten()
    if bad.numel():
        i = int(bad[0])
        bits = int(xb[i].view(torch.int32)) & 0xFFFFFFFF
        return (f"{bad.numel()} mismatches; first: x bits 0x{bits:08x} ({float(xb[i])!r}), k={int(kb[i])}: "
                f"code {int(code[i])} helper {int(hb[i])}, spec {int(want_code[i])} helper {int(want_hb[i])}")
    y = xb * torch.where(kb < 127, (127 - kb) << 23, 0x400000).view(torch.float32)
    # the spec's RNE codes (the rne case proves the twin's)
    rne = code if rounding == "rne" else _fast_twin(xb, kb, fmt, "rne")[0]
    seen["y = inf"] += int(torch.isinf(y).sum())
    seen["y underflowed"] += int(((y != 0) & (y.abs() < 2.0**-126)).sum())
    seen["saturated"] += int((y.abs() > f.fmax).sum())
    seen["-0 folded"] += int(((code == 0) & (xb < 0)).sum())
    seen["trunc below RNE"] += int((code != rne).sum()) if rounding == "trunc" else 0
    seen["h = 1, RNE down"] += int(((hb == 1) & (code == rne)).sum())
    seen["h = 1, RNE up"] += int(((hb == 1) & (code != rne)).sum())
    seen["h = 1 in cell 0, negative"] += int(((hb == 1) & (code == 0x80)).sum())
    return ""


def _float32_neighbours(x32: torch.Tensor) -> torch.Tensor:
    """The finite float32 values one unit in the last place below and above each of x32 (bit
    pattern -1 and +1): the sides of every tie and quarter point that bf16 values hit exactly."""
    bits = x32.view(torch.int32)
    out = torch.cat([bits - 1, bits + 1]).view(torch.float32)
    return out[torch.isfinite(out)]


# every 8th exponent, and the ones where float32 subnormals reach the e4m3 / e5m2 normal range
# (-121 / -113) and where products underflow most (126, 127)
SOME_K = torch.cat([ALL_K[::8], torch.tensor([-121, -113, 126, 127], dtype=torch.int32)]).unique()


@pytest.mark.parametrize("rounding", FAST_ROUNDINGS)
@pytest.mark.parametrize("fmt", FAST_FORMATS)
def test_fast_algorithm_equals_spec(fmt, rounding):
    """The float algorithm of the hardware path (the torch twin) gives the specification's codes
    and helper bits for
    * every finite bf16 value at every k in [-126, 127] (16.6M pairs: the proof for bf16 input),
    * the float32 neighbours (one ulp below and above) of every finite bf16 value at the 36 k of
      SOME_K (4.7M pairs: both sides of every tie and quarter point),
    * 2**20 random finite float32 values, each at a random k that takes it near the format's range;
    and the sweep reaches every case of the algorithm (counted, so that it cannot pass vacuously).
    Full k for the float32 neighbours would take 2x the bf16 sweep's time; the GPU test has it."""
    x32 = _as_float32(ALL_BF16)
    seen = dict.fromkeys(["y = inf", "y underflowed", "saturated", "-0 folded", "trunc below RNE",
                          "h = 1, RNE down", "h = 1, RNE up", "h = 1 in cell 0, negative"], 0)
    for ks in ALL_K.split(32):
        assert not (bad := _twin_mismatches(x32[None, :], ks[:, None], fmt, rounding, seen)), bad
    nb = _float32_neighbours(x32)
    for ks in SOME_K.split(16):
        assert not (bad := _twin_mismatches(nb[None, :], ks[:, None], fmt, rounding, seen)), bad
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31, (2**20,), generator=g, dtype=torch.int64).to(torch.int32)
    xr = bits.view(torch.float32)[torch.isfinite(bits.view(torch.float32))]
    f = FORMATS[fmt]
    target = torch.randint(f.emin - f.mbits - 4, int(math.log2(f.fmax)) + 3, xr.shape, generator=g)
    kr = (torch.frexp(xr).exponent - 1 - target).clamp(SCALE_EXP_MIN, SCALE_EXP_MAX).to(torch.int32)
    assert not (bad := _twin_mismatches(xr, kr, fmt, rounding, seen)), bad
    cases = list(seen)[:4] + {"rne": [], "trunc": list(seen)[4:5], "two_grid": list(seen)[5:]}[rounding]
    assert [c for c in cases if seen[c] == 0] == [], seen


def test_hardware_fp8_only_on_compiled_sm89_gpus(monkeypatch):
    """The hardware path is taken by compiled kernels on sm_89+ NVIDIA GPUs only."""
    cuda = torch.device("cuda", 0)
    assert not hardware_fp8(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not hardware_fp8(cuda)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.version, "hip", None)
    for cap, want in (((9, 0), True), ((8, 9), True), ((8, 6), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, cap=cap: cap)
        assert hardware_fp8(cuda) is want


def test_prover_kernel_compiles_to_the_fp8_conversion_for_sm90():
    """`_quantize_kernel` with HW compiles for sm_90 on a CPU (fresh process, no interpreter) and
    converts with cvt.rn.satfinite (trunc/two_grid decode the code's value from its bits, never with
    cvt.rn.f16x2); without HW, or for stochastic rounding, it keeps the integer path (no fp8
    conversion at all)."""
    code = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from fieldprint.formats import ROUNDING_IDS, format_constants\n"
        "from fieldprint.quant_kernels import _quantize_kernel as fn\n"
        "ptr = {'x_ptr': '*bf16', 'k_ptr': '*i32', 'helper_in_ptr': '*u8', 'codes_ptr': '*u8',\n"
        "       'helper_out_ptr': '*u8', 'flag_ptr': '*i32', 'n': 'i32', 'row_len': 'i32', 'key0': 'i32',\n"
        "       'key1': 'i32'}\n"
        "for fmt, rounding, hw in [('e4m3', 'two_grid', 1), ('e5m2', 'rne', 1), ('e4m3', 'rne', 0),\n"
        "                          ('e5m2', 'stochastic', 1)]:\n"
        "    consts = dict(format_constants(fmt), ROUNDING=ROUNDING_IDS[rounding], VERIFY=False,\n"
        "                  PER_ROW=False, HW=hw, BLOCK=1024)\n"
        "    sig = {a: ptr.get(a, 'constexpr') for a in fn.arg_names}\n"
        "    cx = {(fn.arg_names.index(c),): v for c, v in consts.items()}\n"
        "    ptx = triton.compile(ASTSource(fn, sig, cx), target=GPUTarget('cuda', 90, 32),\n"
        "                         options={'num_warps': 4}).asm['ptx']\n"
        "    print(fmt, rounding, hw, ptx.count('cvt.rn.satfinite.' + fmt + 'x2.f32'),\n"
        "          ptx.count('cvt.rn.f16x2.' + fmt + 'x2'), ptx.count('.ftz'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # 1024 elements over 128 threads: 8 per thread, 4 conversion instructions of 2 each
    assert res.stdout.split("\n")[:4] == [
        "e4m3 two_grid 1 4 0 0",
        "e5m2 rne 1 4 0 0",
        "e4m3 rne 0 0 0 0",
        "e5m2 stochastic 1 0 0 0",
    ], res.stdout


@triton.jit
def _fast_codes_kernel(x_ptr, out_ptr, MBITS: tl.constexpr, EMIN: tl.constexpr, CMAX: tl.constexpr,
                       SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr):
    """8 float32 values at k = 0 -> code + helper bit of each, by `quant_code_fast` without HW."""
    x = tl.load(x_ptr + tl.arange(0, 8))
    code, hb = quant_code_fast(x, 0, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)
    tl.store(out_ptr + tl.arange(0, 8), code + hb)


@pytest.mark.interpreted
def test_fast_path_refuses_stochastic_rounding():
    x = torch.linspace(-3, 3, 8)
    out = torch.zeros(8, dtype=torch.int32)
    _fast_codes_kernel[(1,)](x, out, **format_constants("e4m3"), ROUNDING=ROUNDING_IDS["rne"])
    assert torch.equal(out.long(), quantize(x, "e4m3", scale=1.0, backend="torch").codes.long())
    with pytest.raises(Exception, match="stochastic rounding needs random bits"):
        _fast_codes_kernel[(1,)](x, out, **format_constants("e4m3"), ROUNDING=ROUNDING_IDS["stochastic"])


# --- on the GPU: the hardware -------------------------------------------------------------------


@triton.jit
def _compare_kernel(x_ptr, n, K_LO, count_ptr, first_ptr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                    CMAX: tl.constexpr, SIGN_SHIFT: tl.constexpr, TWOS: tl.constexpr, ROUNDING: tl.constexpr,
                    K_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (i, j) quantizes block i of x [n] (float32) at k = K_LO + j with both
    `quant_code_fast(HW=True)` and `quant_code`, adds the number of differing elements to
    count_ptr and keeps the smallest flat index (j * n + element) of a difference in first_ptr."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    k = K_LO + tl.program_id(1)
    if K_BLOCK:  # k as a block, as per-row scales and the fused kernel pass it
        k = k + tl.zeros([BLOCK], tl.int32)
    code, hb = quant_code_fast(x, k, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, True)
    want, want_hb = quant_code(x, k, 0, 0, MBITS, EMIN, CMAX, SIGN_SHIFT, TWOS, ROUNDING, False)
    bad = mask & ((code != want) | (hb != want_hb))
    nbad = tl.sum(bad.to(tl.int32), axis=0)
    if nbad > 0:
        tl.atomic_add(count_ptr, nbad)
        tl.atomic_min(first_ptr, tl.min(tl.where(bad, tl.program_id(1) * n + offs, 2**31 - 1), axis=0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k_block", [False, True])
@pytest.mark.parametrize("rounding", FAST_ROUNDINGS)
@pytest.mark.parametrize("fmt", FAST_FORMATS)
def test_cuda_fast_path_equals_integer_path_every_bf16_every_k(fmt, rounding, k_block):
    """On the device: the hardware path and the integer path agree on every finite bf16 value and
    its two float32 neighbours (one ulp below and above) at every k (50M pairs), and the compiled
    kernel really uses the hardware conversion."""
    bf16 = _as_float32(ALL_BF16)
    x = torch.cat([bf16, _float32_neighbours(bf16)]).cuda()
    n = x.numel()
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    first = torch.full((1,), 2**31 - 1, dtype=torch.int32, device="cuda")
    block = 1024
    compiled = _compare_kernel[(triton.cdiv(n, block), ALL_K.numel())](
        x, n, SCALE_EXP_MIN, count, first, **format_constants(fmt), ROUNDING=ROUNDING_IDS[rounding],
        K_BLOCK=k_block, BLOCK=block, num_warps=4)
    assert f"cvt.rn.satfinite.{fmt}x2.f32" in compiled.asm["ptx"]
    nbad = int(count.item())
    if nbad:
        idx = int(first.item())
        xv, k = x[idx % n : idx % n + 1], SCALE_EXP_MIN + idx // n
        got = quantize(xv, fmt, rounding, scale=2.0**k)
        want = quantize(xv.cpu(), fmt, rounding, scale=2.0**k, backend="torch")
        bits = int(xv.view(torch.int32)) & 0xFFFFFFFF
        pytest.fail(f"{nbad} mismatches; first: x bits 0x{bits:08x} ({float(xv)!r}), k={k}: "
                    f"quantize on CUDA {got.codes.tolist()} helper {got.helper}, "
                    f"spec {want.codes.tolist()} helper {want.helper}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rounding", FAST_ROUNDINGS)
@pytest.mark.parametrize("fmt", FAST_FORMATS)
def test_cuda_quantize_every_bf16_every_k_equals_torch_spec(fmt, rounding):
    """`quantize` on CUDA (`launch_quantize`, hardware path, one k per row) gives the torch
    specification's codes and helper bytes for every finite bf16 value at every k."""
    assert hardware_fp8(torch.device("cuda"))  # else this would test the integer path again
    x = ALL_BF16.cuda().repeat(ALL_K.numel(), 1)
    scale = torch.exp2(ALL_K.double()).float()[:, None].cuda()
    got = quantize(x, fmt, rounding, scale=scale)
    want = quantize(x, fmt, rounding, scale=scale, backend="torch")
    bad = torch.nonzero(got.codes != want.codes)
    assert bad.numel() == 0, (len(bad), ALL_K[bad[0, 0]].item(), float(x[tuple(bad[0])]),
                              got.codes[tuple(bad[0])].item(), want.codes[tuple(bad[0])].item())
    if rounding == "two_grid":
        assert torch.equal(got.helper, want.helper)
