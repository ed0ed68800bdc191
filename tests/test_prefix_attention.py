"""The shared-prefix attention kernel (TRITON_INTERPRET=1 on the CPU) against a float64 reference:
ragged prefix lengths (inside one page, block-aligned, 0), scrambled page tables over a pool whose
other slots hold NaN, GQA / MQA / MHA, fp8 pools with scalar, tensor and per-head scales; splits
along the prefix (ragged last split, split boundaries inside a page, a prefix shorter than one
split, the default split rule); row independence (bitwise, with and without splits); every bad
argument named.

Tolerance: twice the error of the same math run in q's dtype by PyTorch (bf16/fp16 matmuls and
softmax), both measured against float64. Every float buffer the wrapper allocates (out, lse and
the split partials) starts as NaN (``poisoned_empty``), so a row or a split the kernels skip
shows up; the fixture also records the shapes allocated, so a test sees how many splits ran.
"""

from __future__ import annotations

import os

import pytest
import torch

from fieldprint.attention.kernel import MAX_PREFIX_SPLITS, MIN_SPLIT_TILES
from fieldprint.attention.prefix import prefix_config, prefix_split_tokens, shared_prefix_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
SMALL = {"block_m": 16, "tile_n": 16}  # several row tiles and KV tiles at tiny shapes


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty fills float tensors with NaN; returns the list of the shapes allocated."""
    empty = torch.empty
    shapes = []

    def nan_empty(*size, **kwargs):
        x = empty(*size, **kwargs)
        shapes.append(tuple(x.shape))
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", nan_empty)
    return shapes


def make_prefix(seed, T, Hq, Hkv, D, bs, prefix_len, dtype=BF16, kv_dtype=None, spare=3):
    """q [T, Hq, D] and a pool whose prefix pages sit at scrambled ids; every slot outside the
    prefix (the tail of its last page, the spare pages) holds NaN. Returns (q, k, v, table)."""
    g = torch.Generator().manual_seed(seed)
    n_pages = -(-prefix_len // bs)
    N = n_pages + spare
    k = torch.full((N, bs, Hkv, D), float("nan"))
    v = torch.full_like(k, float("nan"))
    table = torch.randperm(N, generator=g)[:n_pages].to(torch.int32)
    flat_k = torch.randn(prefix_len, Hkv, D, generator=g)
    flat_v = torch.randn(prefix_len, Hkv, D, generator=g)
    for i, page in enumerate(table.tolist()):
        n = min(bs, prefix_len - i * bs)
        k[page, :n] = flat_k[i * bs:i * bs + n]
        v[page, :n] = flat_v[i * bs:i * bs + n]
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    kv_dtype = kv_dtype or dtype
    return q, k.to(kv_dtype), v.to(kv_dtype), table


def _prefix_kv(cache, table, prefix_len, scale, dtype):
    """[prefix_len, Hkv, D] gathered through the table, times the scale (scalar / [Hkv]), in dtype."""
    x = cache[table.long()].flatten(0, 1)[:prefix_len].double()
    s = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float64).reshape(-1)
    return (x * s.view(1, -1, 1)).to(dtype)


def attention_in(dtype, q, k, v, table, prefix_len, scale=None, k_scale=None, v_scale=None):
    """The kernel's math in PyTorch, every tensor and op in ``dtype`` (float64: the reference;
    bf16/fp16: the low-precision run that sets the tolerance). Returns out [T, Hq, D], lse [T, Hq]."""
    T, Hq, D = q.shape
    group = Hq // k.shape[2]
    kk = _prefix_kv(k, table, prefix_len, k_scale, dtype).repeat_interleave(group, 1)  # [P, Hq, D]
    vv = _prefix_kv(v, table, prefix_len, v_scale, dtype).repeat_interleave(group, 1)
    s = (q.to(dtype).transpose(0, 1) @ kk.permute(1, 2, 0)) * (scale or D ** -0.5)  # [Hq, T, P]
    out = (torch.softmax(s, -1) @ vv.transpose(0, 1)).transpose(0, 1)
    return out, torch.logsumexp(s.double(), -1).transpose(0, 1)


def check(q, k, v, table, prefix_len, config=SMALL, split_tokens=None, **scales):
    out, lse = shared_prefix_attention(q, k, v, table, prefix_len, config=config, split_tokens=split_tokens,
                                       **scales)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.shape == q.shape
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    kw = {"scale": scales.get("softmax_scale"), "k_scale": scales.get("k_scale"),
          "v_scale": scales.get("v_scale")}
    ref, ref_lse = attention_in(torch.float64, q, k, v, table, prefix_len, **kw)
    low, low_lse = attention_in(q.dtype, q, k, v, table, prefix_len, **kw)
    tol = 2 * float((low.double() - ref).abs().max())
    lse_tol = 2 * float((low_lse - ref_lse).abs().max())
    err, lse_err = float((out.double() - ref).abs().max()), float((lse.double() - ref_lse).abs().max())
    assert err <= tol, (err, tol)
    assert lse_err <= lse_tol, (lse_err, lse_tol)
    return out, lse


CASES = [  # (T, Hq, Hkv, D, bs, prefix_len, dtype, config)
    (5, 4, 2, 16, 16, 3, BF16, SMALL),  # prefix shorter than a page, one partial tile
    (13, 4, 2, 16, 16, 16, BF16, SMALL),  # block-aligned, tile-aligned, 26 rows: 2 row tiles
    (9, 6, 2, 16, 4, 37, FP16, SMALL),  # group 3, four pages per KV tile, ragged end
    (7, 8, 1, 32, 32, 45, BF16, SMALL),  # MQA, half a page per KV tile
    (6, 2, 2, 16, 8, 70, FP16, {"block_m": 32, "tile_n": 32}),  # MHA
    (3, 4, 2, 64, 16, 100, BF16, None),  # default tiles: one partial row tile, 64-token KV tiles
]


@pytest.mark.parametrize("T,Hq,Hkv,D,bs,prefix_len,dtype,config", CASES)
def test_matches_float64_reference(T, Hq, Hkv, D, bs, prefix_len, dtype, config):
    q, k, v, table = make_prefix(T * 31 + prefix_len, T, Hq, Hkv, D, bs, prefix_len, dtype)
    check(q, k, v, table, prefix_len, config=config or {})


SPLIT_CASES = [  # (T, Hq, Hkv, D, bs, prefix_len, split_tokens, splits): 16-token KV tiles
    (5, 4, 2, 16, 16, 64, 16, 4),  # every split one full tile, the last one too
    (6, 4, 2, 16, 16, 70, 32, 3),  # ragged last split: one tile, partial
    (4, 6, 2, 16, 32, 90, 16, 6),  # split boundaries inside a page (32-token pages)
    (3, 8, 1, 16, 4, 45, 32, 2),  # MQA, four pages per tile, last split 13 tokens
    (4, 4, 2, 16, 16, 10, 32, 1),  # prefix shorter than one split: the direct path
    (3, 4, 4, 16, 16, 300, None, 3),  # the default rule: 8 tiles (128 tokens) per split
]


@pytest.mark.parametrize("T,Hq,Hkv,D,bs,prefix_len,split_tokens,splits", SPLIT_CASES)
def test_splits_match_float64_reference(poisoned_empty, T, Hq, Hkv, D, bs, prefix_len, split_tokens, splits):
    """Split results against float64; the partial buffers [T, Hq, splits, D] and [T, Hq, splits]
    exist exactly when there are several splits (and start as NaN: a skipped split shows up)."""
    q, k, v, table = make_prefix(T * 7 + prefix_len, T, Hq, Hkv, D, bs, prefix_len)
    poisoned_empty.clear()
    check(q, k, v, table, prefix_len, split_tokens=split_tokens)
    partials = [shape for shape in poisoned_empty if shape in ((T, Hq, splits, D), (T, Hq, splits))]
    assert len(partials) == (2 if splits > 1 else 0), poisoned_empty
    assert len(poisoned_empty) == 2 + len(partials), poisoned_empty  # out and lse, nothing else


def test_one_split_is_the_direct_path():
    """A split as long as the prefix (or longer) gives the same bits as no split at all, and
    several splits give results that differ only by rounding from it."""
    q, k, v, table = make_prefix(11, 5, 4, 2, 16, 16, 75)
    whole = shared_prefix_attention(q, k, v, table, 75, config=SMALL, split_tokens=80)
    for longer in (96, 1 << 20):
        again = shared_prefix_attention(q, k, v, table, 75, config=SMALL, split_tokens=longer)
        assert torch.equal(again[0], whole[0]) and torch.equal(again[1], whole[1])
    split = shared_prefix_attention(q, k, v, table, 75, config=SMALL, split_tokens=16)
    assert float((split[0].float() - whole[0].float()).abs().max()) < 2e-2
    assert float((split[1] - whole[1]).abs().max()) < 1e-5


def test_split_rule():
    """The rule of the module docstring: 2 waves of 132 SMs per row tile, >= 8 tiles per split,
    <= 64 splits; it reads the prefix length, KV heads and KV tile only."""
    assert (MIN_SPLIT_TILES, MAX_PREFIX_SPLITS) == (8, 64)
    assert prefix_split_tokens(8192, 8, 64) == 512  # B = 32 decode of the issue: 16 splits
    assert prefix_split_tokens(65536, 8, 64) == 2048  # cdiv(264, 8) = 33 wanted: cdiv(1024 tiles, 33) = 32
    assert prefix_split_tokens(64000, 8, 64) == 31 * 64  # 1000 tiles: 33 splits, the last one ragged
    assert prefix_split_tokens(131072, 1, 64) == 2048  # MQA: capped at 64 splits
    assert prefix_split_tokens(512, 8, 64) == 512  # <= 8 tiles: one split
    assert prefix_split_tokens(0, 8, 64) == 512
    assert prefix_split_tokens(8192, 8, 32) == 256  # D = 256 (32-token tiles): 32 splits
    for prefix_len, hkv, tile in ((8192, 8, 64), (65536, 8, 64), (131072, 1, 64), (777, 2, 16)):
        assert prefix_split_tokens(prefix_len, hkv, tile) % tile == 0


def test_split_fp8_pool_per_head_scales():
    q, k, v, table = make_prefix(12, 6, 4, 2, 16, 8, 83, FP16, kv_dtype=FP8)
    check(q, k, v, table, 83, split_tokens=32, k_scale=torch.tensor([0.05, 0.3]), v_scale=torch.tensor([1.5, 0.2]))
    check(q, k, v, table, 83, split_tokens=16, k_scale=0.2, v_scale=1.5)


def test_softmax_scale_and_strided_q():
    q, k, v, table = make_prefix(2, 6, 4, 2, 16, 16, 29)
    wide = torch.cat([q, q], 1)[:, :4]  # token stride 8 heads, not 4: the kernel takes q's strides
    assert not wide.is_contiguous()
    check(wide, k, v, table, 29, softmax_scale=0.4)


@pytest.mark.parametrize("q_dtype,scale_kind", [(BF16, "float"), (FP16, "tensor"), (BF16, "per_head")])
def test_fp8_pool(q_dtype, scale_kind):
    q, k, v, table = make_prefix(3, 7, 4, 2, 16, 8, 35, q_dtype, kv_dtype=FP8)
    scales = {"float": (0.2, 1.5), "tensor": (torch.tensor(0.05), torch.tensor([0.7])),
              "per_head": (torch.tensor([0.05, 0.3]), torch.tensor([1.5, 0.2]))}[scale_kind]
    check(q, k, v, table, 35, k_scale=scales[0], v_scale=scales[1])


@pytest.mark.parametrize("empty_table,split_tokens", [(False, None), (True, None), (False, 16)])
def test_empty_prefix_gives_zero_and_minus_inf(empty_table, split_tokens):
    q, k, v, table = make_prefix(4, 5, 4, 2, 16, 16, 20)
    if empty_table:
        table = table[:0]
    out, lse = shared_prefix_attention(q, k, v, table, 0, config=SMALL, split_tokens=split_tokens)
    assert torch.equal(out, torch.zeros_like(out))
    assert bool((lse == float("-inf")).all())


def test_no_query_tokens():
    q, k, v, table = make_prefix(5, 0, 4, 2, 16, 16, 20)
    out, lse = shared_prefix_attention(q, k, v, table, 20)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


@pytest.mark.parametrize("prefix_len,split_tokens", [(41, None), (41, 16), (300, None)])
def test_rows_are_independent_bitwise(prefix_len, split_tokens):
    """A token's bits do not depend on the other tokens of the call nor on its place in a row
    tile: alone, in reverse order, with more tokens appended (T = 11, group 2: 22 rows in two
    16-row tiles; 27 tokens: four). With splits (3 of 16 tokens; the default rule's 3 of 128 at
    300 tokens, whatever the number of rows) the same holds: the split boundaries and the merge
    order come from the prefix alone."""
    q, k, v, table = make_prefix(6, 11, 4, 2, 16, 16, prefix_len)
    kw = {"config": SMALL, "split_tokens": split_tokens}
    out, lse = shared_prefix_attention(q, k, v, table, prefix_len, **kw)
    again = shared_prefix_attention(q, k, v, table, prefix_len, **kw)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
    extra = torch.randn(16, 4, 16, generator=torch.Generator().manual_seed(7)).to(BF16)
    for rows, qq in (([3], q[3:4]), (list(range(10, -1, -1)), q.flip(0)), (list(range(11)), torch.cat([q, extra]))):
        o, s = shared_prefix_attention(qq, k, v, table, prefix_len, **kw)
        assert torch.equal(o[:len(rows)], out[rows]) and torch.equal(s[:len(rows)], lse[rows]), rows


def test_config_is_fixed_per_head_dim_and_checked():
    assert prefix_config(128) == {"block_m": 64, "tile_n": 64, "num_warps": 4, "num_stages": 2}
    assert prefix_config(256)["tile_n"] == 32
    with pytest.raises(ValueError, match="block_m"):
        prefix_config(64, block_m=24)
    with pytest.raises(ValueError, match="unknown"):
        prefix_config(64, block_n=16)


def test_bad_arguments_are_named():
    q, k, v, table = make_prefix(8, 3, 4, 2, 16, 16, 20)
    bad = [
        ({"q": q.float()}, TypeError, "q must be float16"),
        ({"q": q[:, :3]}, ValueError, "multiple of k_cache heads"),
        ({"k_cache": k.half()}, TypeError, "k_cache dtype"),
        ({"v_cache": v[:, :8]}, ValueError, "v_cache"),
        ({"prefix_block_table": table.long()}, TypeError, "prefix_block_table must be int32"),
        ({"prefix_block_table": table[None]}, ValueError, "prefix_block_table must have 1 dimensions"),
        ({"prefix_len": 33}, ValueError, r"prefix_len must lie in \[0, 32\]"),
        ({"prefix_len": -1}, ValueError, "prefix_len"),
        ({"prefix_len": True}, TypeError, "prefix_len must be an int"),
        ({"prefix_len": torch.tensor(20)}, TypeError, "prefix_len must be an int"),
        ({"prefix_block_table": torch.tensor([table[0], 99], dtype=torch.int32)}, ValueError,
         r"prefix_block_table\[1\] = 99 is outside the pool"),
        ({"softmax_scale": 0.0}, ValueError, "softmax_scale"),
        ({"k_scale": torch.tensor([1.0, 2.0, 3.0])}, ValueError, "k_scale"),
        ({"v_scale": torch.tensor([1.0, float("nan")])}, ValueError, "v_scale"),
        ({"config": {"tile_n": 8}}, ValueError, "tile_n"),
        ({"split_tokens": 0}, ValueError, "split_tokens must be None or a positive multiple of the KV tile"),
        ({"split_tokens": -16}, ValueError, "split_tokens"),
        ({"split_tokens": 24}, ValueError, r"split_tokens .*\(16 tokens\), got 24"),
        ({"split_tokens": 32, "config": {"tile_n": 64}}, ValueError, r"\(64 tokens\), got 32"),
        ({"split_tokens": True}, ValueError, "split_tokens"),
        ({"split_tokens": 16.0}, ValueError, "split_tokens"),
    ]
    args = {"q": q, "k_cache": k, "v_cache": v, "prefix_block_table": table, "prefix_len": 20}
    for change, err, match in bad:
        change = {"config": SMALL, **change} if "split_tokens" in change else change
        kw = {key: change.get(key, val) for key, val in args.items()}
        extra = {key: val for key, val in change.items() if key not in args}
        with pytest.raises(err, match=match):
            shared_prefix_attention(**kw, **extra)
    fp8 = make_prefix(9, 2, 4, 2, 16, 16, 20, kv_dtype=FP8)
    with pytest.raises(ValueError, match=r"\|q\| must be <= 65504"):
        shared_prefix_attention(fp8[0] * 1e5, *fp8[1:], 20)
    d24 = torch.zeros(2, 4, 24, dtype=BF16)
    with pytest.raises(ValueError, match="head dim must be a power of two"):
        shared_prefix_attention(d24, torch.zeros(3, 16, 2, 24, dtype=BF16), torch.zeros(3, 16, 2, 24, dtype=BF16),
                                table, 20)
