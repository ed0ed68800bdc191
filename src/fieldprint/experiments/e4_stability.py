"""E4: do page digests survive honest recomputation? (the paper's claim 4).

A K-like tensor ``K = X @ W`` ([tokens, Hkv * D], X: [tokens, d_model], W: [d_model, Hkv * D],
both bf16-valued) is computed once as the *baseline* (the prover: an fp32 GEMM, TF32 off) and once
by each *variant* (the verifier's honest recomputation), then stored as ``out_dtype`` (bfloat16:
what a KV cache holds; float32: the accumulator itself). Both are cut into pages of
``block_size x Hkv x D`` elements, quantized per format and rounding with the prover's per-page
power-of-two scale, and each page is hashed (BLAKE3 of the page's codes + helper bytes). A page
matches when the two digests are equal.

Variants (``variant`` column):
  rehash           the prover's stored page bytes, copied to the host and back, hashed again
  split_k{S}_{fwd|rev}  sum of S partial GEMMs over d_model chunks, added in order or reversed
  batch_rows{R}    each group of R rows computed as its own GEMM (requests alone vs batched)
  tf32             the same GEMM with TF32 allowed (GPU only; bf16 values are exact in TF32, so
                   only the accumulation differs)
  bf16_gemm        bf16 GEMM with a bf16 output (the usual way K is made; bfloat16 rows only)
  triton_mm        a Triton GEMM (fp32 accumulation) on the first ``triton_tokens`` rows
  cpu              the fp32 GEMM on the CPU against the GPU baseline (GPU only)
  attention        ``paged_anchor_attention`` vs ``reference_attention`` outputs (bf16 outputs,
                   bfloat16 rows only), flattened and cut into pages of the same element counts

Per row: ``match_rate`` (pages whose digests agree), ``p_flip`` (elements whose codes differ),
``theory_match = (1 - p_flip) ** page_elems`` (independent flips), ``raw_page_match`` (pages whose
unquantized ``out_dtype`` bytes agree: what hashing raw floats would give), and
``max_rel_perturbation = max |x' - x| / (s_c / 4)`` with s_c the spacing of x's grid cell at the
prover's scale (`fieldprint.quant.code_spacing`): two_grid guarantees equal codes wherever this
ratio is < 1, and ``frac_over_bound`` says how many elements exceed it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, resolve_device
from fieldprint.formats import FORMAT_IDS, ROUNDINGS, get_format, pow2, scale_exponent
from fieldprint.quant import code_bytes

FORMATS = tuple(FORMAT_IDS)
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
VARIANT_RE = re.compile(
    r"^(rehash|split_k(\d+)_(fwd|rev)|batch_rows(\d+)|tf32|bf16_gemm|triton_mm|cpu|attention)$"
)
BF16_ONLY = ("bf16_gemm", "attention")  # outputs already rounded to bf16
CUDA_ONLY = ("tf32", "cpu")
TRITON = ("triton_mm", "attention")  # CPU: only under TRITON_INTERPRET=1

ALL_CASES = [f"{f}/{r}" for f in ("e4m3", "e5m2", "int8") for r in ROUNDINGS] + ["bf16/rne",
                                                                                  "fp16/rne"]


def parse_case(case: str) -> tuple[str, str]:
    """'e4m3/two_grid' -> ('e4m3', 'two_grid'); a clear ValueError for anything else."""
    fmt, sep, rounding = case.partition("/")
    if not sep or fmt not in FORMATS or rounding not in ROUNDINGS:
        raise ValueError(f"case {case!r} must be '<fmt>/<rounding>' with fmt in {FORMATS} "
                         f"and rounding in {ROUNDINGS}")
    return fmt, rounding


@dataclass
class E4Config(ExperimentConfig):
    tokens: int = 512
    d_model: int = 256
    heads_kv: int = 8
    head_dim: int = 128
    block_sizes: list[int] = field(default_factory=lambda: [16, 64])
    out_dtypes: list[str] = field(default_factory=lambda: ["bfloat16", "float32"])
    variants: list[str] = field(default_factory=lambda: ["rehash", "split_k2_fwd", "split_k4_rev",
                                                         "batch_rows16", "bf16_gemm"])
    cases: list[str] = field(default_factory=lambda: list(ALL_CASES))
    triton_tokens: int = 64  # rows the Triton GEMM computes (0: all tokens)
    attn_seqs: int = 2  # attention variant: sequences of attn_q_len new tokens each
    attn_q_len: int = 64
    attn_context: int = 128  # context tokens per sequence (new tokens included)
    attn_anchors: int = 16
    attn_heads_q: int = 16

    def validate(self) -> None:
        super().validate()
        for name in ("tokens", "d_model", "heads_kv", "head_dim", "attn_seqs", "attn_q_len",
                     "attn_context", "attn_heads_q"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.attn_anchors >= 0, f"attn_anchors must be >= 0, got {self.attn_anchors}")
        check(self.attn_q_len <= self.attn_context,
              f"attn_q_len ({self.attn_q_len}) must be <= attn_context ({self.attn_context})")
        check(self.attn_heads_q % self.heads_kv == 0,
              f"attn_heads_q ({self.attn_heads_q}) must be a multiple of heads_kv ({self.heads_kv})")
        check(len(self.block_sizes) > 0 and all(b > 0 for b in self.block_sizes),
              f"block_sizes must be positive, got {self.block_sizes}")
        for b in self.block_sizes:
            check(self.tokens % b == 0, f"tokens ({self.tokens}) must be a multiple of every "
                                        f"block size, got block size {b}")
            check((b * self.heads_kv * self.head_dim) % 8 == 0,
                  f"page elements (block size {b} x heads_kv x head_dim) must be a multiple of 8")
        check(len(self.out_dtypes) > 0, "out_dtypes must not be empty")
        for d in self.out_dtypes:
            check(d in OUT_DTYPES, f"out_dtypes entries must be in {list(OUT_DTYPES)}, got {d!r}")
        check(len(self.variants) > 0, "variants must not be empty")
        for v in self.variants:
            m = VARIANT_RE.match(v)
            check(m is not None, f"unknown variant {v!r}; see the e4_stability module docstring")
            if m.group(2) is not None:
                s = int(m.group(2))
                check(s >= 2 and self.d_model % s == 0,
                      f"variant {v}: split count must be >= 2 and divide d_model ({self.d_model})")
            if m.group(4) is not None:
                r = int(m.group(4))
                check(r >= 1 and self.tokens % r == 0,
                      f"variant {v}: row count must divide tokens ({self.tokens})")
        check(len(self.cases) > 0, "cases must not be empty")
        for c in self.cases:
            parse_case(c)
        check(0 <= self.triton_tokens <= self.tokens,
              f"triton_tokens must be in [0, tokens], got {self.triton_tokens}")


# ---------------------------------------------------------------- pages, scales, digests


def pow2_scale(amax: torch.Tensor, fmt: str) -> torch.Tensor | None:
    """The power-of-two scales (float32, amax's shape) of groups whose largest magnitudes are
    ``amax``: `fieldprint.formats.scale_exponent`'s rule (1 for an all-zero page); None for the
    unscaled formats (bf16, fp16)."""
    if not get_format(fmt).scaled:
        return None
    return pow2(scale_exponent(amax, fmt))


def page_rows(qt, page_elems: int) -> torch.Tensor:
    """The bytes hashed per page: [P, page codes bytes (+ page_elems / 8 helper bytes)] uint8.

    Page p holds elements [p * page_elems, (p + 1) * page_elems) of the flat tensor; its row is
    `canonical_bytes` of that page alone (codes, then its helper bytes). The scale and format
    belong in the page header and are the same on both sides here (the verifier reuses the
    prover's), so they are left out.
    """
    if page_elems % 8:
        raise ValueError(f"page_elems must be a multiple of 8, got {page_elems}")
    numel = qt.codes.numel()
    if numel % page_elems:
        raise ValueError(f"the tensor's {numel} elements are not a whole number of "
                         f"pages of page_elems={page_elems}")
    rows = code_bytes(qt.codes.reshape(-1, page_elems))
    if qt.helper is None:
        return rows
    return torch.cat([rows, qt.helper.reshape(-1, page_elems // 8)], dim=1)


def theory_match(p_flip: float, n: int) -> float:
    """Probability that a page of n elements keeps every code when each flips independently
    with probability p_flip: ``(1 - p) ** n``."""
    if not 0.0 <= p_flip <= 1.0:
        raise ValueError(f"p_flip must be in [0, 1], got {p_flip}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return math.exp(n * math.log1p(-p_flip)) if p_flip < 1.0 else float(n == 0)


@dataclass
class Proof:
    """The prover's side of one (tensor, format, rounding): x flat [n], its quantization with
    one power-of-two scale per ``scale_elems`` elements, and the two_grid tolerance s_c / 4 of
    each element ([n] float64, x units)."""

    x: torch.Tensor
    qt: object
    tol: torch.Tensor
    seed: int | None


def prove(x: torch.Tensor, fmt: str, rounding: str, seed: int, scale_elems: int) -> Proof:
    """x: [n] (n a multiple of scale_elems) -> `Proof`. ``seed`` is used by stochastic only."""
    from fieldprint.quant import code_spacing, quantize

    if x.dim() != 1 or x.numel() % scale_elems:
        raise ValueError(f"x must be 1-D with a multiple of scale_elems={scale_elems} elements, "
                         f"got shape {tuple(x.shape)}")
    s = seed if rounding == "stochastic" else None
    rows = x.view(-1, scale_elems)
    qt = quantize(rows, fmt, rounding, seed=s, scale=pow2_scale(rows.abs().amax(1, True), fmt))
    tol = code_spacing(rows, fmt, scale=qt.scale).reshape(-1) / 4
    return Proof(x, qt, tol, s)


def verify(proof: Proof, x_prime: torch.Tensor, page_sizes: list[int],
           rehash: bool = False) -> list[dict]:
    """The verifier recomputes x_prime: [n] and quantizes it with the prover's scale (and helper
    bits for two_grid); ``rehash``: it hashes the prover's stored bytes again instead. One dict
    of metrics per page size (pages = whole pages of ``page_elems`` elements)."""
    from fieldprint.hashing import blake3_many
    from fieldprint.quant import quantize

    x, qt = proof.x, proof.qt
    if x_prime.shape != x.shape:
        raise ValueError(f"x_prime must have x's shape {tuple(x.shape)}, got {tuple(x_prime.shape)}")
    if rehash:
        qv = dataclasses.replace(qt, codes=qt.codes.to("cpu", copy=True).to(x.device))
    else:
        qv = quantize(x_prime.view(qt.codes.shape), qt.fmt, qt.rounding, seed=proof.seed,
                      scale=qt.scale, helper=qt.helper)
    flipped = (qt.codes != qv.codes).reshape(-1)
    ratio = (x_prime.double() - x.double()).abs() / proof.tol
    same = x == x_prime
    out = []
    for n in page_sizes:
        P = x.numel() // n
        if P == 0:
            continue
        k = P * n
        d1 = blake3_many(page_rows(_head(qt, k), n))
        d2 = blake3_many(page_rows(_head(qv, k), n))
        flips = int(flipped[:k].sum())
        p = flips / k
        r = ratio[:k]
        out.append({
            "page_elems": n, "pages": P, "elements": k, "code_flips": flips,
            "match_rate": float((d1 == d2).all(dim=1).double().mean()), "p_flip": p,
            "theory_match": theory_match(p, n),
            "raw_diff_rate": float((~same[:k]).double().mean()),
            "raw_page_match": float(same[:k].view(P, n).all(dim=1).double().mean()),
            "max_rel_perturbation": float(r.max()),
            "frac_over_bound": float((r >= 1).double().mean()),
        })
    return out


def _head(qt, k: int):
    """The first k elements of qt (k a multiple of 8): flat codes and their helper bytes."""
    helper = None if qt.helper is None else qt.helper[: k // 8]
    return dataclasses.replace(qt, codes=qt.codes.reshape(-1)[:k], helper=helper,
                               shape=torch.Size([k]))


# ---------------------------------------------------------------- the recomputations


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K: tl.constexpr, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BF16_DOT: tl.constexpr):
    """c = a @ b in float32. a: [M, K], b: [K, N] bf16; c: [M, N] float32. BF16_DOT: tensor-core
    bf16 dot (GPU); else both operands go to float32 and the dot is IEEE (the interpreter's
    path; bf16 products are exact in float32 either way)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pn * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if BF16_DOT:
            acc += tl.dot(a, b)
        else:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [M, K] bf16, b: [K, N] bf16 -> [M, N] float32 (fp32 accumulation, K-blocks in order)."""
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise TypeError(f"a and b must be bfloat16, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a: [M, K] and b: [K, N] do not fit: {tuple(a.shape)}, {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=torch.float32, device=a.device)
    big = a.is_cuda
    BM, BN, BK = (64, 64, 32) if big else (32, 64, 32)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _mm_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                     c.stride(0), c.stride(1), BM=BM, BN=BN, BK=BK, BF16_DOT=big)
    return c


@contextlib.contextmanager
def fp32_matmul_precision(mode: str):
    """``highest``: fp32 GEMMs in IEEE fp32; ``high``: TF32 allowed."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def gemm_variant(name: str, X: torch.Tensor, W: torch.Tensor, cfg: E4Config) -> torch.Tensor:
    """The verifier's K: float32 [m, N] (m = tokens, or triton_tokens for triton_mm).
    X: [tokens, d_model] bf16, W: [d_model, N] bf16."""
    Xf, Wf = X.float(), W.float()
    m = VARIANT_RE.match(name)
    with fp32_matmul_precision("highest"):
        if m.group(2) is not None:
            S, order = int(m.group(2)), m.group(3)
            c = cfg.d_model // S
            parts = [Xf[:, i * c:(i + 1) * c] @ Wf[i * c:(i + 1) * c] for i in range(S)]
            if order == "rev":
                parts.reverse()
            acc = parts[0].clone()
            for part in parts[1:]:
                acc += part
            return acc
        if m.group(4) is not None:
            R = int(m.group(4))
            return torch.cat([Xf[i:i + R] @ Wf for i in range(0, X.shape[0], R)])
        if name == "rehash":
            return Xf @ Wf
        if name == "bf16_gemm":
            return (X @ W).float()
        if name == "cpu":
            return (Xf.cpu() @ Wf.cpu()).to(X.device)
        if name == "triton_mm":
            rows = cfg.triton_tokens or X.shape[0]
            return triton_matmul(X[:rows], W)
    if name == "tf32":
        with fp32_matmul_precision("high"):
            return Xf @ Wf
    raise ValueError(f"not a GEMM variant: {name}")


def attention_pair(cfg: E4Config, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference_attention output, paged_anchor_attention output), float32 of bf16 values,
    [T, Hq, D] each, on one random chunked-prefill case with shared anchors."""
    from fieldprint.attention import paged_anchor_attention, reference_attention
    from fieldprint.attention.paged_inputs import make_case

    g = torch.Generator().manual_seed(cfg.seed + 1)
    B = cfg.attn_seqs
    case = make_case([cfg.attn_context] * B, [cfg.attn_q_len] * B, [cfg.attn_anchors] * B,
                     heads_q=cfg.attn_heads_q, heads_kv=cfg.heads_kv, head_dim=cfg.head_dim,
                     block_size=16, dtype=torch.bfloat16, device=device, poison=0.0,
                     generator=g)
    ref = reference_attention(*case.args())
    out = paged_anchor_attention(*case.args())
    return ref.float(), out.float()


# ---------------------------------------------------------------- the run


def _skip_reason(variant: str, device: str) -> str:
    if variant in CUDA_ONLY and device != "cuda":
        return "skipped: needs CUDA"
    if variant in TRITON and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "skipped: no CUDA and TRITON_INTERPRET unset"
    return ""


def run(cfg: E4Config) -> list[dict]:
    """Rows ``variant, out_dtype, fmt, rounding, page_elems, pages, match_rate, p_flip,
    theory_match, max_rel_perturbation, ...`` (see the module docstring).

    All recomputations are made first; then, per stored dtype and case, the prover quantizes
    each distinct baseline once and every variant of that baseline is verified against it.
    """
    device = resolve_device(cfg.device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    N = cfg.heads_kv * cfg.head_dim
    X = torch.randn(cfg.tokens, cfg.d_model, generator=g, device=device).bfloat16()
    W = (torch.randn(cfg.d_model, N, generator=g, device=device)
         / math.sqrt(cfg.d_model)).bfloat16()
    with fp32_matmul_precision("highest"):
        base = X.float() @ W.float()
    refs: dict[str, torch.Tensor] = {}  # baseline tag -> prover's fp32 values
    recomputed: list[tuple[str, str, torch.Tensor]] = []  # (variant, baseline tag, values)
    skipped: list[dict] = []
    for variant in cfg.variants:
        why = _skip_reason(variant, device)
        if why:
            skipped.append({"variant": variant, "device": device, "status": why})
        elif variant == "attention":
            refs["attention"], var = attention_pair(cfg, device)
            recomputed.append((variant, "attention", var))
        else:
            var = gemm_variant(variant, X, W, cfg)
            tag = f"gemm{var.shape[0]}"
            refs[tag] = base[:var.shape[0]]
            recomputed.append((variant, tag, var))
    page_sizes = [b * N for b in cfg.block_sizes]
    scale_elems = min(page_sizes)  # one scale per smallest page; larger pages group them
    rows: list[dict] = []
    for out_name in cfg.out_dtypes:
        dt = OUT_DTYPES[out_name]
        todo = [(v, t, r) for v, t, r in recomputed if out_name == "bfloat16" or v not in BF16_ONLY]
        for fmt, rounding in (parse_case(c) for c in cfg.cases):
            for tag in dict.fromkeys(t for _, t, _ in todo):
                x = refs[tag].to(dt).reshape(-1)
                usable = x.numel() // scale_elems * scale_elems
                if usable == 0:
                    continue
                proof = prove(x[:usable], fmt, rounding, cfg.seed, scale_elems)
                for variant, _, var in (item for item in todo if item[1] == tag):
                    xv = var.to(dt).reshape(-1)[:usable]
                    for metrics in verify(proof, xv, page_sizes, rehash=variant == "rehash"):
                        rows.append({"variant": variant, "out_dtype": out_name, "fmt": fmt,
                                     "rounding": rounding, **metrics, "device": device,
                                     "status": "ok"})
    return rows + skipped


if __name__ == "__main__":
    hydra_main("e4_stability", E4Config, run)
