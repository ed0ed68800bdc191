"""E1 baselines against the float64 reference: materialized forms, gather+SDPA, the cascade LSE
merge, prefix blocks; contiguous SDPA setup on the CPU math backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fieldprint.attention import baselines as bl
from fieldprint.attention import reference_attention
from fieldprint.attention.paged_inputs import make_case

HQ, HKV, D, BS = 4, 2, 16, 4
HAVE_KERNEL = importlib.util.find_spec("fieldprint.attention.kernel") is not None


def _ref(*args, validate=True, **kwargs):
    """reference_attention with the kernel's ``validate`` keyword (ignored)."""
    return reference_attention(*args, **kwargs)


def _case(seed, seq_lens, q_lens, anchor_lens, shared=True, poison=float("nan")):
    g = torch.Generator().manual_seed(seed)
    return make_case(seq_lens, q_lens, anchor_lens, heads_q=HQ, heads_kv=HKV, head_dim=D,
                     block_size=BS, dtype=torch.float64, shared_anchors=shared, poison=poison,
                     generator=g)


def _close(out, want):
    assert out.shape == want.shape and out.dtype == want.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


RAGGED = [  # (seq_lens, q_lens, anchor_lens): decode, prefill chunks, anchors 0 / partial blocks
    ([9, 1, 17], [1, 1, 1], [5, 0, 8]),
    ([13, 6, 22], [4, 6, 3], [8, 3, 0]),
    ([7, 12], [7, 2], None),
]


@pytest.mark.parametrize("fn", [bl.naive_attention, bl.two_softmax_attention, bl.gather_sdpa])
@pytest.mark.parametrize("i", range(len(RAGGED)))
def test_unfused_and_gather_match_reference(fn, i):
    # The padded unfused forms read padding slots; those hold finite poison (a NaN there would
    # turn 0 * NaN into NaN in their dense P @ V).
    case = _case(10 + i, *RAGGED[i], poison=1e3)
    _close(fn(*case.args()), reference_attention(*case.args()))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("q_len", [1, 3])
def test_contiguous_sdpa_uniform_batch_math_backend(shared, q_len):
    """The contiguous path (gathered once, lower-right causal) with the math backend standing in
    for cuDNN / flash, which need a GPU."""
    case = _case(3, [11, 11, 11], [q_len] * 3, [8, 8, 8], shared=shared)
    shape = bl.uniform_shape(case, "test")
    k, v = bl.concat_kv(case, shape)
    assert k.shape == (3, HKV, 19, D)
    q4 = case.q.view(shape.B, q_len, HQ, D).transpose(1, 2)
    state = bl.ContiguousState(q4, k, v, D ** -0.5, "math", gqa=True)
    _close(bl._run_contiguous(state), reference_attention(*case.args()))


def test_contiguous_rejects_ragged_and_fp8():
    case = _case(4, [5, 6], [1, 1], [4, 4])
    with pytest.raises(ValueError, match="seq_lens"):
        bl.cudnn_sdpa(*case.args())
    fp8 = _case(4, [5, 5], [1, 1], [4, 4])
    fp8.k_cache, fp8.v_cache = fp8.k_cache.to(torch.float8_e4m3fn), fp8.v_cache.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8"):
        bl.flash_sdpa(*fp8.args())


def test_merge_states_is_exact_and_handles_empty_side():
    g = torch.Generator().manual_seed(5)
    T, H = 6, 3
    scores = torch.randn(T, H, 11, generator=g, dtype=torch.float64)
    v = torch.randn(T, H, 11, D, generator=g, dtype=torch.float64)
    split = 4

    def part(s, vv):
        return (torch.softmax(s, -1)[..., None] * vv).sum(-2), torch.logsumexp(s, -1)

    want, _ = part(scores, v)
    oa, la = part(scores[..., :split], v[..., :split, :])
    ob, lb = part(scores[..., split:], v[..., split:, :])
    _close(bl.merge_states(oa, la, ob, lb), want)
    empty = torch.full_like(la, float("-inf"))
    _close(bl.merge_states(torch.zeros_like(oa), empty, ob, lb), ob)


@pytest.mark.interpreted
def test_merge_states_triton_interpreted():
    g = torch.Generator().manual_seed(6)
    oa, ob = torch.randn(2, 5, 3, 24, generator=g)
    la, lb = torch.randn(2, 5, 3, generator=g) * 4
    la[0, 1] = float("-inf")
    out = bl.merge_states_triton(oa, la, ob, lb)
    torch.testing.assert_close(out, bl.merge_states(oa, la, ob, lb), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("i", range(len(RAGGED)))
def test_cascade_with_reference_lse_matches(i):
    case = _case(20 + i, *RAGGED[i])
    state = bl.cascade_setup(case, bl.Scales(), attention=_ref)
    out = bl.cascade_run(state)
    assert torch.isfinite(out).all()
    # The reference returns its LSE in float32, which bounds the merged result's accuracy.
    torch.testing.assert_close(out, reference_attention(*case.args()), rtol=1e-6, atol=1e-6)


def test_prefix_blocks_matches_reference_and_needs_aligned_anchors():
    case = _case(30, [13, 6, 22], [4, 6, 3], [8, 4, 0], shared=False)
    merged = bl.prefix_block_case(case)
    assert merged.anchor_lens is None and merged.seq_lens.tolist() == [21, 10, 22]
    _close(bl.prefix_blocks(*case.args(), attention=reference_attention),
           reference_attention(*case.args()))
    bad = _case(31, [9, 9], [1, 1], [5, 8])
    with pytest.raises(ValueError, match="multiples of the block size"):
        bl.prefix_block_case(bad)


@pytest.mark.skipif(not HAVE_KERNEL, reason="fieldprint.attention.kernel not written yet")
@pytest.mark.interpreted
@pytest.mark.parametrize("name", ["fused", "cascade", "prefix_blocks"])
@pytest.mark.parametrize("q_lens", [[1, 1], [3, 1]], ids=["decode", "prefill"])
def test_kernel_baselines_interpreted(name, q_lens):
    """The kernel-based baselines (Triton interpreter, tiny shapes) against the reference."""
    g = torch.Generator().manual_seed(40 + len(name) + sum(q_lens))
    case = make_case([21, 6], q_lens, [16, 0] if name == "prefix_blocks" else [5, 0], heads_q=4,
                     heads_kv=2, head_dim=64, block_size=16, dtype=torch.bfloat16,
                     shared_anchors=False, generator=g)
    setup, run = bl.REGISTRY[name]
    out = run(setup(case, bl.Scales()))
    want = reference_attention(case.q.double(), *(x.double() for x in case.args()[1:3]),
                               *case.args()[3:])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
