"""E1 baselines against the float64 reference: materialized forms, gather+SDPA, the cascade (its
plan of anchor groups, the LSE merge, its two kernels interpreted, batch invariance within a
group), prefix blocks; contiguous SDPA setup on the CPU math backend."""

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


def _prefix_ref(q, k_cache, v_cache, table, prefix_len, *, validate=True, **kwargs):
    """Shared-prefix attention through the definition: each token a one-query sequence whose
    context is the whole prefix (a decode query at the last position sees every key). prefix_len > 0."""
    T = q.shape[0]
    i32 = {"dtype": torch.int32, "device": q.device}
    return reference_attention(q, k_cache, v_cache, table.expand(T, -1).contiguous(),
                               torch.full((T,), prefix_len, **i32), torch.arange(T + 1, **i32),
                               return_lse=True, **kwargs)


def _shared_case(seed, q_lens, seq_lens, anchor_groups, *, dtype=torch.float64, heads=(HQ, HKV),
                 head_dim=D, block_size=BS):
    """Sequences grouped by anchors: ``anchor_groups[b]`` is a group label (None: no anchors);
    sequences with one label share the same anchor pages and length. Context pages private.
    Labels are anchor lengths (ragged: not block-aligned)."""
    g = torch.Generator().manual_seed(seed)
    labels = sorted({a for a in anchor_groups if a is not None})
    case = make_case(seq_lens, q_lens, [0] * len(seq_lens), heads_q=heads[0], heads_kv=heads[1],
                     head_dim=head_dim, block_size=block_size, dtype=dtype, generator=g,
                     spare_blocks=sum(-(-a // block_size) for a in labels) + 2)
    # Fill fresh anchor pages in the spare blocks (scrambled: make_case placed them at random ids).
    owned = {case.block_table[b, i].item() for b in range(len(seq_lens))
             for i in range(-(-seq_lens[b] // block_size))}
    pool_ids = [i for i in torch.randperm(case.k_cache.shape[0], generator=g).tolist() if i not in owned]
    pages, used = {}, 0
    for a in labels:
        n = -(-a // block_size)
        pages[a] = pool_ids[used:used + n]
        used += n
        for i, blk in enumerate(pages[a]):
            m = min(block_size, a - i * block_size)
            for cache in (case.k_cache, case.v_cache):
                cache[blk, :m] = torch.randn(m, heads[1], head_dim, generator=g).to(cache.dtype)
    width = max((len(p) for p in pages.values()), default=1) + 1
    abt = torch.full((len(seq_lens), width), case.k_cache.shape[0] + 7, dtype=torch.int32)
    for b, a in enumerate(anchor_groups):
        if a is not None:
            abt[b, :len(pages[a])] = torch.tensor(pages[a], dtype=torch.int32)
    case.anchor_block_table = abt
    case.anchor_lens = torch.tensor([a or 0 for a in anchor_groups], dtype=torch.int32)
    return case


GROUPED = [  # (q_lens, seq_lens, anchor group labels = anchor lengths)
    ([1] * 6, [9, 1, 17, 5, 12, 3], [5, None, 5, 13, 13, 2]),  # decode: 2 groups, a lone anchor, none
    ([3, 1, 4, 2, 1], [13, 6, 22, 2, 7], [3, 3, None, 3, 9]),  # prefill chunks, one group of 3
    ([2, 2], [5, 9], [6, 6]),  # one group covering every token (no gather)
]


@pytest.mark.parametrize("i", range(len(GROUPED)))
def test_cascade_groups_with_references_match(i):
    """The plan (groups, what stays in the paged call) and the merge, with both levels computed
    by the float64 definition, so only the cascade's own logic is under test."""
    case = _shared_case(20 + i, *GROUPED[i])
    state = bl.cascade_setup(case, bl.Scales(), attention=_ref, prefix_attention=_prefix_ref)
    labels = GROUPED[i][2]
    shared = [a for a in set(labels) if a is not None and labels.count(a) > 1]
    assert sorted(g.length for g in state.groups) == sorted(shared)
    qsl = case.query_start_loc.tolist()
    for g in state.groups:
        tokens = torch.arange(qsl[-1])[g.tokens].tolist()
        want = [t for b, a in enumerate(labels) if a == g.length for t in range(qsl[b], qsl[b + 1])]
        assert tokens == want
        assert g.table.tolist() == case.anchor_block_table[labels.index(g.length), :-(-g.length // BS)].tolist()
    own = state.own_call.anchor_lens
    lone = [a if a is not None and a not in shared else 0 for a in labels]
    assert (own is None and not any(lone)) or own.tolist() == lone
    out = bl.cascade_run(state)
    assert torch.isfinite(out).all()
    # The references return their LSEs in float32, which bounds the merged result's accuracy.
    torch.testing.assert_close(out, reference_attention(*case.args()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("i", range(len(RAGGED)))
def test_cascade_without_shared_anchors_is_one_paged_call(i):
    """Anchors that no two sequences share (or none) stay in the paged call: no group, no merge."""
    case = _case(25 + i, *RAGGED[i], shared=False)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return _ref(*args, **kwargs)

    state = bl.cascade_setup(case, bl.Scales(), attention=spy, prefix_attention=_prefix_ref)
    assert state.groups == []
    out = bl.cascade_run(state)
    assert len(calls) == 1 and calls[0][6] is (None if RAGGED[i][2] is None else case.anchor_block_table)
    torch.testing.assert_close(out, reference_attention(*case.args()), rtol=1e-9, atol=1e-9)


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


@pytest.mark.interpreted
@pytest.mark.parametrize("i", range(len(GROUPED)))
def test_cascade_kernels_interpreted(i):
    """The cascade on its two kernels (Triton interpreter): several anchor groups, a lone
    anchor, sequences without anchors; decode and chunked prefill; bf16 and an fp8 pool."""
    for kv_dtype, scales in ((None, bl.Scales()), (torch.float8_e4m3fn, bl.Scales(None, 0.5, 2.0))):
        case = _shared_case(50 + i, *GROUPED[i], dtype=torch.bfloat16, heads=(4, 2), head_dim=64, block_size=16)
        if kv_dtype is not None:
            case.k_cache, case.v_cache = case.k_cache.to(kv_dtype), case.v_cache.to(kv_dtype)
        out = bl.cascade_run(bl.cascade_setup(case, scales))
        ref_kv = (x.double() if kv_dtype is None else x for x in case.args()[1:3])
        want = reference_attention(case.q.double(), *ref_kv, *case.args()[3:], **scales.kwargs())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.interpreted
def test_cascade_batch_invariant_within_a_group():
    """Decode: a sequence's bits do not change when other sequences join or leave its group, as
    long as it stays in a group of >= 2 (a lone sequence's anchors move to the paged call) and
    the paged call stays in decode mode."""
    labels = [5, 5, None, 5, 20, 20]
    full = _shared_case(60, [1] * 6, [9, 4, 17, 30, 12, 3], labels, dtype=torch.bfloat16,
                        heads=(4, 2), head_dim=64, block_size=16)
    out = bl.cascade(*full.args())
    for rows in ([0, 3], [3, 1, 4, 5], [1, 0, 2, 5, 4]):
        sub = bl.PagedCase(full.q[rows], full.k_cache, full.v_cache, full.block_table[rows],
                           full.seq_lens[rows], torch.arange(len(rows) + 1, dtype=torch.int32),
                           full.anchor_block_table[rows], full.anchor_lens[rows])
        assert torch.equal(bl.cascade(*sub.args()), out[rows]), rows


@pytest.mark.interpreted
def test_fused_groups_interpreted():
    """``fused_groups`` (Triton interpreter): the kernel given the shared-anchor groups of a decode
    batch (two groups, a lone anchor, a sequence without) against the float64 reference; its
    table lists exactly the sequences that share anchor pages."""
    case = _shared_case(70, *GROUPED[0], dtype=torch.bfloat16, heads=(4, 2), head_dim=64, block_size=16)
    assert bl.shared_anchor_sequences(case) == [[0, 2], [3, 4]]
    setup, run = bl.REGISTRY["fused_groups"]
    state = setup(case, bl.Scales())
    assert state[-1].tolist() == [[0, 2], [3, 4]]
    out = run(state)
    want = reference_attention(case.q.double(), *(x.double() for x in case.args()[1:3]), *case.args()[3:])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_fused_pipelined_interpreted():
    """``fused_pipelined`` (Triton interpreter): the fused kernel's opt-in pipelined decode walk
    through E1's registry, against the float64 reference and bitwise equal to ``fused`` (same tile
    order and arithmetic; the default decode tile is the pipelined one here: 4096 // 64 = 64)."""
    case = _shared_case(71, *GROUPED[0], dtype=torch.bfloat16, heads=(4, 2), head_dim=64, block_size=16)
    setup, run = bl.REGISTRY["fused_pipelined"]
    out = run(setup(case, bl.Scales()))
    want = reference_attention(case.q.double(), *(x.double() for x in case.args()[1:3]), *case.args()[3:])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    fused_setup, fused_run = bl.REGISTRY["fused"]
    assert torch.equal(out, fused_run(fused_setup(case, bl.Scales())))
