"""The FlashInfer baselines without FlashInfer: their plan arguments (indptr / indices /
last_page_len per level) run through a float64 emulation of FlashInfer's paged semantics must
give the reference attention (ragged lengths, scrambled pools, NaN in every unowned slot, shared
and private anchors, partial anchor pages); setup without flashinfer is a clear RuntimeError."""

from __future__ import annotations

import sys

import pytest
import torch

from fieldprint.attention import baselines as bl
from fieldprint.attention import flashinfer_baselines as fib
from fieldprint.attention import reference_attention
from fieldprint.attention.paged_inputs import make_case
from fieldprint.experiments import e1_throughput as e1

HQ, HKV, D, BS = 4, 2, 16, 4


def _case(seed, seq_lens, anchor_lens, shared=True):
    g = torch.Generator().manual_seed(seed)
    return make_case(seq_lens, [1] * len(seq_lens), anchor_lens, heads_q=HQ, heads_kv=HKV, head_dim=D,
                     block_size=BS, dtype=torch.float64, shared_anchors=shared, generator=g)


def emulate(q, k_cache, v_cache, levels: list[fib.PagedLevel], scale: float) -> torch.Tensor:
    """What FlashInfer's wrappers compute from these plan arguments, in float64: per level, each
    request's query tokens attend (no mask: decode) to its pages' first tokens, the last page
    holding ``kv_last_page_len`` of them; the levels merged through their LSEs (the cascade's
    merge_state_in_place). A token no request of a level covers keeps NaN there (FlashInfer
    would merge an unwritten output)."""
    T, Hq, _ = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = lse = None
    for lv in levels:
        qo, kp, idx, last = (x.tolist() for x in (lv.qo_indptr, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len))
        assert qo[0] == 0 and qo[-1] == T and qo == sorted(qo), "requests must partition the tokens"
        o = torch.full(q.shape, float("nan"), dtype=torch.float64)
        s_ = torch.full((T, Hq), float("nan"), dtype=torch.float64)
        for r in range(len(last)):
            pages = idx[kp[r]:kp[r + 1]]
            assert pages and 1 <= last[r] <= bs, "FlashInfer's contract: pages, last one 1..page_size full"
            n = (len(pages) - 1) * bs + last[r]
            k = k_cache[pages].flatten(0, 1)[:n].repeat_interleave(Hq // Hkv, 1)  # [n, Hq, D]
            v = v_cache[pages].flatten(0, 1)[:n].repeat_interleave(Hq // Hkv, 1)
            scores = torch.einsum("thd,nhd->thn", q[qo[r]:qo[r + 1]], k) * scale
            s_[qo[r]:qo[r + 1]] = torch.logsumexp(scores, -1)
            o[qo[r]:qo[r + 1]] = torch.einsum("thn,nhd->thd", scores.softmax(-1), v)
        out, lse = (o, s_) if out is None else (bl.merge_states(out, lse, o, s_), torch.logaddexp(lse, s_))
    return out


def _check_levels(case, levels):
    out = emulate(case.q, case.k_cache, case.v_cache, levels, D ** -0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_attention(*case.args()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("anchor_lens", [None, [8, 0, 4, 12], [4, 4, 4, 4]])
@pytest.mark.parametrize("shared", [True, False])
def test_decode_level_matches_reference(anchor_lens, shared):
    case = _case(1, [9, 1, 16, 23], anchor_lens, shared)
    level = fib.decode_level(case)
    assert level.requests == 4 and level.qo_indptr.tolist() == [0, 1, 2, 3, 4]
    _check_levels(case, [level])


def test_decode_level_refuses_partial_anchor_pages_and_prefill():
    with pytest.raises(ValueError, match="multiples of the block size 4"):
        fib.decode_level(_case(2, [9, 5], [6, 4]))
    g = torch.Generator().manual_seed(0)
    prefill = make_case([9, 5], [2, 1], None, heads_q=HQ, heads_kv=HKV, head_dim=D, block_size=BS,
                        dtype=torch.float64, generator=g)
    for fn in (fib.decode_level, fib.cascade_levels):
        with pytest.raises(ValueError, match="decode only"):
            fn(prefill)


CASCADE = [  # (seq_lens, anchor_lens, shared pool, levels, level-0 requests, level-0 pages)
    ([9, 1, 16, 23, 5], [6, 6, 6, 3, 3], True, 2, 2, [2, 1]),  # two groups, partial anchor pages
    ([9, 1, 16], [6, 3, 6], True, 2, 3, [2, 1, 2]),  # the 6-token group split into two runs
    ([9, 1, 16], [4, 8, 4], False, 1, 0, []),  # private, aligned: kept with the context
    ([9, 1, 16], [5, 8, 3], False, 2, 3, [2, 2, 1]),  # private, one unaligned: all in level 0
    ([9, 1, 16], None, True, 1, 0, []),
    ([7, 12, 3, 4], [8, 8, 8, 8], True, 2, 1, [2]),  # one group of all: the prefix read once
]


@pytest.mark.parametrize("i", range(len(CASCADE)))
def test_cascade_levels_match_reference(i):
    lens, alens, shared, n_levels, n_top, top_pages = CASCADE[i]
    case = _case(10 + i, lens, alens, shared)
    levels = fib.cascade_levels(case)
    assert len(levels) == n_levels
    if n_levels == 2:
        top = levels[0]
        assert top.requests == n_top
        assert (top.kv_indptr[1:] - top.kv_indptr[:-1]).tolist() == top_pages
    own = levels[-1]  # level 1: one request per sequence, no anchor of level 0 read again
    assert own.qo_indptr.tolist() == list(range(len(lens) + 1))
    a = alens or [0] * len(lens)
    keep = [x if n_levels == 1 else 0 for x in a]
    want = [-(-(n + k) // BS) for n, k in zip(lens, keep, strict=True)]
    assert (own.kv_indptr[1:] - own.kv_indptr[:-1]).tolist() == want
    _check_levels(case, levels)


def test_cascade_levels_need_anchors_everywhere_when_level0_exists():
    with pytest.raises(ValueError, match=r"sequences \[2\] have no anchors"):
        fib.cascade_levels(_case(3, [9, 1, 16], [6, 6, 0]))


@pytest.mark.parametrize("A,group", [(16, 2), (24, 4), (32, 1), (24, 1)])
def test_levels_of_e1_problems(A, group):
    """E1's own inputs (runs of ``group`` consecutive sequences share anchor pages; block size
    16; bf16 values in float64)."""
    cfg = e1.E1Config()
    case, _ = e1.make_problem(4, 1, 37, A, cfg, torch.bfloat16, "cpu", seed=A, group=group)
    case = bl.PagedCase(case.q.double(), case.k_cache.double(), case.v_cache.double(), *case.args()[3:])
    levels = fib.cascade_levels(case)
    aligned = A % cfg.block_size == 0
    assert len(levels) == (1 if group == 1 and aligned else 2)
    if len(levels) == 2:  # one level-0 request per anchor set
        assert levels[0].requests == 4 // group
    checks = [levels] + ([[fib.decode_level(case)]] if aligned else [])
    for lv in checks:
        out = emulate(case.q, case.k_cache, case.v_cache, lv, cfg.head_dim ** -0.5)
        torch.testing.assert_close(out, reference_attention(*case.args()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["flashinfer_decode", "flashinfer_cascade"])
def test_setup_without_flashinfer_is_a_clear_runtime_error(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    setup, _ = bl.REGISTRY[name]
    with pytest.raises(RuntimeError, match="flashinfer is not importable"):
        setup(_case(4, [9, 5], [4, 4]), bl.Scales())


def test_e1_skip_reasons():
    cfg = e1.E1Config()
    for name in ("flashinfer_decode", "flashinfer_cascade"):
        assert name in e1.IMPLS and name in e1.GRAPHABLE
        assert e1._skip_reason(name, "decode", 16, "bf16", "cpu", 2, 1, 40, cfg) == "needs CUDA"
        assert "decode only" in e1._skip_reason(name, "prefill", 16, "bf16", "cuda", 1, 48, 48, cfg)
        assert e1._skip_reason(name, "shared_decode", 16, "bf16", "cuda", 4, 1, 40, cfg) == ""
    assert e1._skip_reason("flashinfer_decode", "decode", 5, "bf16", "cuda", 2, 1, 40, cfg)
    assert e1._skip_reason("flashinfer_cascade", "decode", 5, "bf16", "cuda", 2, 1, 40, cfg) == ""
