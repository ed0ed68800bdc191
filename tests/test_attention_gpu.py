"""The fused kernel on a CUDA GPU at realistic shapes (Hq=32, Hkv=8, D=128, pages of 16): long
split-KV decode, fp8 KV, a 1K-token prefill chunk mixed with decode tokens, D=256 with window and
softcap, bitwise determinism and batch invariance, CUDA-graph capture with ``validate=False``,
torch.compile; the "hdn" V page layout; read-once anchor groups and the shared-prefix kernel
with splits. Skipped without CUDA (run on the H200: ``pytest -m gpu tests/test_attention_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch
from test_attention_kernel import make_case, reference
from test_prefix_attention import attention_in, make_prefix

from fieldprint.attention import paged_anchor_attention
from fieldprint.attention.prefix import shared_prefix_attention

pytestmark = pytest.mark.gpu
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def cuda(case):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def check(case, tol=2e-2, **kw):
    out, lse = paged_anchor_attention(**case, return_lse=True, **kw)
    ref, ref_lse = reference(case, **{k: v for k, v in kw.items() if k != "config"})
    assert out.isfinite().all() and lse.isfinite().all()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-3, rtol=1e-4)
    return out, lse


def test_decode_long_contexts_split_kv():
    case = cuda(make_case(1, [1] * 4, [40_000, 4_096, 2_049, 17], [64, 64, 0, 100], Hq=32, Hkv=8, D=128))
    check(case)


def test_decode_fp8_per_head_scales():
    case = cuda(make_case(2, [1] * 6, [9_000, 300, 5_000, 1, 2_048, 700], [64] * 6, Hq=32, Hkv=8, D=128,
                          kv_dtype=FP8))
    ks = torch.linspace(0.02, 0.1, 8, device="cuda")
    check(case, k_scale=ks, v_scale=torch.tensor(0.5, device="cuda"))


def test_prefill_chunk_mixed_with_decode():
    case = cuda(make_case(3, [1024, 1, 1, 300], [3_000, 5_000, 80, 300], [64, 64, 0, 17], Hq=32, Hkv=8, D=128))
    check(case)


def test_head_dim_256_pages_128_window_softcap():
    case = cuda(make_case(4, [1, 1, 64], [6_000, 200, 900], [64, 130, 0], Hq=16, Hkv=2, D=256, bs=128))
    check(case, sliding_window=512, logit_softcap=30.0)
    decode = cuda(make_case(5, [1, 1], [6_000, 200], [64, 130], Hq=16, Hkv=2, D=256, bs=128))
    check(decode, sliding_window=512, logit_softcap=30.0)


def test_decode_without_anchors_register_capped():
    """The launch without anchors (no anchor tables) compiles under kernel_config's register cap
    (bf16) or without it (fp8); both against float64, long contexts with splits."""
    for seed, kv_dtype in ((9, BF16), (10, FP8)):
        case = cuda(make_case(seed, [1] * 5, [33_000, 4_096, 2_049, 17, 700], None, Hq=32, Hkv=8, D=128,
                              kv_dtype=kv_dtype))
        assert case["anchor_block_table"] is None
        check(case)


@pytest.mark.parametrize("kv_dtype", [BF16, FP8])
def test_pipelined_decode_walk(kv_dtype):
    """The opt-in pipelined walk (multi-buffered gather) against float64 and bitwise the same for a
    sequence alone as in the batch (its split boundaries depend on the sequence only)."""
    case = cuda(make_case(11, [1] * 6, [20_000, 4_096, 2_049, 31, 700, 9_000], [64, 64, 0, 100, 1000, 17],
                          Hq=32, Hkv=8, D=128, kv_dtype=kv_dtype))
    out, _ = check(case, config={"pipelined": True})
    b = 5
    one = dict(case, q=case["q"][b:b + 1], block_table=case["block_table"][b:b + 1],
               seq_lens=case["seq_lens"][b:b + 1],
               query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
               anchor_block_table=case["anchor_block_table"][b:b + 1], anchor_lens=case["anchor_lens"][b:b + 1])
    assert torch.equal(paged_anchor_attention(**one, config={"pipelined": True}), out[b:b + 1])


@pytest.mark.parametrize("kv_dtype", [BF16, FP8])
def test_bitwise_determinism_and_batch_invariance(kv_dtype):
    big = cuda(make_case(6, [1] * 32, [4_000 + 397 * i for i in range(32)], [64] * 32, Hq=32, Hkv=8, D=128,
                         kv_dtype=kv_dtype))
    out = paged_anchor_attention(**big)
    assert torch.equal(out, paged_anchor_attention(**big))
    for b in (0, 17, 31):
        one = dict(big, q=big["q"][b:b + 1], block_table=big["block_table"][b:b + 1],
                   seq_lens=big["seq_lens"][b:b + 1],
                   query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                   anchor_block_table=big["anchor_block_table"][b:b + 1], anchor_lens=big["anchor_lens"][b:b + 1])
        assert torch.equal(paged_anchor_attention(**one), out[b:b + 1]), b


@pytest.mark.parametrize("kv_dtype", [BF16, FP8])
@pytest.mark.parametrize("config", [None, {"pipelined": True}])
def test_hdn_v_layout(kv_dtype, config):
    """A V pool in the "hdn" page layout (tokens contiguous) against float64 (decode with splits,
    partial last pages, NaN in unowned slots) and against the default layout, which it should
    equal (same tiles, same order; reported, the bound is the tolerance)."""
    case = cuda(make_case(12, [1] * 6, [20_000, 4_096, 2_049, 31, 700, 9_000], [64, 64, 0, 100, 1000, 17],
                          Hq=32, Hkv=8, D=128, kv_dtype=kv_dtype))
    hdn = dict(case, v_cache=case["v_cache"].movedim(1, -1).contiguous().movedim(-1, 1))
    out, _ = check(hdn, config=config)
    plain = paged_anchor_attention(**case, config=config)
    torch.testing.assert_close(out.float(), plain.float(), atol=1e-2, rtol=1e-2)
    print(f"hdn {kv_dtype} {config}: bitwise equal to the default layout: {torch.equal(out, plain)}")


def test_cuda_graph_capture_validate_false():
    case = cuda(make_case(7, [1] * 8, [3_000 + 100 * i for i in range(8)], [64] * 8, Hq=32, Hkv=8, D=128))
    static = {k: v.clone() for k, v in case.items()}
    paged_anchor_attention(**static, validate=False)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_anchor_attention(**static, validate=False)
    static["seq_lens"].sub_(1)  # new lengths, same shapes: replay must see them
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, paged_anchor_attention(**static))


def test_torch_compile():
    case = cuda(make_case(8, [1] * 4, [5_000, 64, 700, 3_000], [64] * 4, Hq=32, Hkv=8, D=128))

    def f(c):  # elementwise after the op only: a compiled reduction may sum in another order
        return paged_anchor_attention(**c, validate=False).float() * 2.0

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(case), f(case))


def test_fp8_inline_conversion_matches_the_plain_cast(monkeypatch):
    """Compiled kernels convert fp8 V tiles with inline PTX. The plain Triton cast gives the same
    values up to fp32 accumulation order, not bit for bit: the two reach the mma through
    different operand layouts, which may order the products inside a k step differently.
    Decode with split-KV, and a prefill chunk with masked anchor tiles."""
    from fieldprint.attention import kernel

    decode = cuda(make_case(6, [1] * 3, [5_000, 77, 2_100], [64, 20, 0], Hq=32, Hkv=8, D=128, kv_dtype=FP8))
    prefill = cuda(make_case(7, [200, 1], [700, 90], [30, 64], Hq=32, Hkv=8, D=128, kv_dtype=FP8))
    fast = [check(c)[0] for c in (decode, prefill)]
    monkeypatch.setattr(kernel, "_e4m3_asm", lambda kv_dtype, device: False)
    plain = [paged_anchor_attention(**c) for c in (decode, prefill)]
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b)  # bf16 tolerances: within a rounding of each other


def test_anchor_groups_match_reference_and_do_not_depend_on_the_grouping():
    """Read-once anchor groups on the GPU: 16 sequences share 1000 anchor tokens, 4 share 37, 4
    have none; against float64, and bitwise the same when the 16 are listed as two groups of 8 in
    another order (a row's bits must not depend on its tile mates: tensor-core row independence)."""
    a_lens = [1000] * 16 + [37] * 4 + [0] * 4
    case = cuda(make_case(8, [1] * 24, [300 + 97 * i for i in range(24)], a_lens, Hq=32, Hkv=8, D=128))
    one = torch.tensor([list(range(16)), list(range(16, 20)) + [-1] * 12], dtype=torch.int32, device="cuda")
    two = torch.tensor([list(range(15, 7, -1)), list(range(8)), list(range(16, 20)) + [-1] * 4],
                       dtype=torch.int32, device="cuda")
    out, lse = paged_anchor_attention(**case, return_lse=True, anchor_groups=one)
    ref, ref_lse = reference(case)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-3, rtol=1e-4)
    assert torch.equal(out, paged_anchor_attention(**case, anchor_groups=two))


def test_prefill_anchor_groups_match_reference_and_do_not_depend_on_the_grouping():
    """Read-once anchor groups in a chunked-prefill batch on the GPU: 8 sequences with chunks of
    1-90 tokens share 1500 anchor tokens, fp8 and bf16 KV; against float64, and bitwise the same
    when the 8 are listed in two groups in another order (other tile mates, other tile rows)."""
    q_lens = [17, 1, 90, 33, 5, 64, 2, 40]
    for kv_dtype in (BF16, FP8):
        case = cuda(make_case(10, q_lens, [q + 200 * i for i, q in enumerate(q_lens)], [1500] * 8, Hq=32,
                              Hkv=8, D=128, kv_dtype=kv_dtype))
        scales = {"k_scale": 0.5, "v_scale": 0.5} if kv_dtype == FP8 else {}
        one = torch.arange(8, dtype=torch.int32, device="cuda")[None]
        two = torch.tensor([[7, 2, 5, 0], [3, 6, 1, 4]], dtype=torch.int32, device="cuda")
        out = paged_anchor_attention(**case, anchor_groups=one, **scales)
        torch.testing.assert_close(out.double(), reference(case, **scales)[0], atol=2e-2, rtol=2e-2)
        assert torch.equal(out, paged_anchor_attention(**case, anchor_groups=two, **scales))


def test_anchor_groups_capture_in_a_cuda_graph():
    """The grouped launch (its token and tile layout built on the device) replays from a CUDA
    graph and sees new lengths, in decode and in chunked prefill. E1's grouped rows of the run of
    939e0d86 fell back to eager timing because capture raised; this test names the error."""
    for q_lens in ([1] * 8, [5, 1, 9, 3, 1, 7, 2, 4]):
        case = cuda(make_case(11, q_lens, [700 + 90 * i for i in range(8)], [1024] * 8, Hq=32, Hkv=8, D=128))
        groups = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 7]], dtype=torch.int32, device="cuda")
        static = {k: v.clone() for k, v in case.items()}
        paged_anchor_attention(**static, anchor_groups=groups, validate=False)  # compile first
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_anchor_attention(**static, anchor_groups=groups, validate=False)
        static["seq_lens"].sub_(1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, paged_anchor_attention(**static, anchor_groups=groups))


def test_shared_prefix_attention_with_splits():
    """The shared-prefix kernel on the GPU (an 8K-token prefix: 16 splits by the default rule)
    against float64, and a token's bits the same alone and among 256 tokens."""
    q, k, v, table = make_prefix(9, 256, 32, 8, 128, 16, 8_000)
    q, k, v, table = q.cuda(), k.cuda(), v.cuda(), table.cuda()
    out, lse = shared_prefix_attention(q, k, v, table, 8_000)
    ref, ref_lse = attention_in(torch.float64, q.cpu(), k.cpu(), v.cpu(), table.cpu(), 8_000)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=2e-3, rtol=1e-4)
    alone, _ = shared_prefix_attention(q[5:6].contiguous(), k, v, table, 8_000)
    assert torch.equal(alone[0], out[5])
