"""reference_attention (and the unfused forms) against a direct float64 formula."""

import math

import pytest
import torch

from fieldprint.attention.paged_inputs import make_case
from fieldprint.attention.reference import naive_attention, reference_attention, two_softmax_attention


def direct(case, window=None, softcap=None):
    """Token by token: out[t, h] = sum_j softmax_j(s_j) v_j over the keys query t may see."""
    q, kc, vc = case.q.double(), case.k_cache.double(), case.v_cache.double()
    T, Hq, D = q.shape
    bs, Hkv = kc.shape[1], kc.shape[2]
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    lse = torch.zeros(T, Hq, dtype=torch.float64)
    qsl = case.query_start_loc.tolist()
    for b in range(len(qsl) - 1):
        L = int(case.seq_lens[b])
        A = int(case.anchor_lens[b]) if case.anchor_lens is not None else 0
        keys = [(case.anchor_block_table[b, i // bs], i % bs) for i in range(A)]
        n_anchor = len(keys)
        keys += [(case.block_table[b, i // bs], i % bs) for i in range(L)]
        for t in range(qsl[b], qsl[b + 1]):
            p = L - (qsl[b + 1] - qsl[b]) + (t - qsl[b])
            for h in range(Hq):
                kv = h // (Hq // Hkv)
                scores, values = [], []
                for idx, (blk, off) in enumerate(keys):
                    pos = idx - n_anchor
                    if pos > p or (window is not None and pos >= 0 and pos <= p - window):
                        continue
                    s = float(q[t, h] @ kc[int(blk), off, kv]) / math.sqrt(D)
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    scores.append(s)
                    values.append(vc[int(blk), off, kv])
                m = max(scores)
                w = torch.tensor([math.exp(s - m) for s in scores], dtype=torch.float64)
                out[t, h] = (w[:, None] * torch.stack(values)).sum(0) / w.sum()
                lse[t, h] = m + math.log(float(w.sum()))
    return out, lse


CASES = [
    # seq_lens, q_lens, anchor_lens, Hq, Hkv, block_size
    ([7], [1], None, 4, 4, 4),  # decode, no anchors, MHA
    ([9, 3, 17], [1, 1, 1], [0, 5, 9], 8, 2, 4),  # decode batch, GQA 4, ragged anchors (0 allowed)
    ([12, 5], [4, 5], [6, 6], 6, 1, 4),  # chunked prefill (whole sequence for b=1), MQA
    ([33, 20], [3, 8], [13, 0], 4, 2, 8),  # several anchor blocks, not block-aligned
]


@pytest.mark.parametrize("seq_lens,q_lens,anchor_lens,Hq,Hkv,bs", CASES)
def test_reference_matches_direct_formula(seq_lens, q_lens, anchor_lens, Hq, Hkv, bs):
    g = torch.Generator().manual_seed(sum(seq_lens) * 31 + Hq)
    case = make_case(seq_lens, q_lens, anchor_lens, heads_q=Hq, heads_kv=Hkv, head_dim=8,
                     block_size=bs, dtype=torch.float64, generator=g)
    out, lse = reference_attention(*case.args(), return_lse=True)
    want, want_lse = direct(case)
    assert not out.isnan().any()  # NaN poison in unowned slots never leaks
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)  # lse is float32


@pytest.mark.parametrize("form", [naive_attention, two_softmax_attention])
@pytest.mark.parametrize("seq_lens,q_lens,anchor_lens,Hq,Hkv,bs", CASES)
def test_unfused_forms_equal_reference(form, seq_lens, q_lens, anchor_lens, Hq, Hkv, bs):
    """With NaN in every slot no sequence owns (the pool of a poisoned cache: E5 evaluates the
    naive form over one), the materialized forms still equal the reference."""
    g = torch.Generator().manual_seed(7 + len(seq_lens))
    case = make_case(seq_lens, q_lens, anchor_lens, heads_q=Hq, heads_kv=Hkv, head_dim=8,
                     block_size=bs, dtype=torch.float64, generator=g)
    assert case.k_cache.isnan().any() and case.v_cache.isnan().any()
    torch.testing.assert_close(form(*case.args()), reference_attention(*case.args()), rtol=1e-10, atol=1e-10)


def test_window_and_softcap():
    g = torch.Generator().manual_seed(3)
    case = make_case([14, 9], [3, 2], [5, 2], heads_q=4, heads_kv=2, head_dim=8, block_size=4,
                     dtype=torch.float64, generator=g)
    out = reference_attention(*case.args(), sliding_window=4, logit_softcap=2.5)
    want, _ = direct(case, window=4, softcap=2.5)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_shared_anchor_blocks_and_fp8_scales():
    """Sequences share pinned anchor blocks; an fp8 cache is multiplied by per-head scales."""
    g = torch.Generator().manual_seed(11)
    case = make_case([6, 6], [1, 1], [8, 8], heads_q=4, heads_kv=2, head_dim=8, block_size=4,
                     poison=0.0, generator=g)
    assert torch.equal(case.anchor_block_table[0, :2], case.anchor_block_table[1, :2])
    k8, v8 = case.k_cache.to(torch.float8_e4m3fn), case.v_cache.to(torch.float8_e4m3fn)
    ks, vs = torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25])
    out = reference_attention(case.q.double(), k8, v8, *case.args()[3:], k_scale=ks, v_scale=vs)
    kd = k8.double() * ks.double()[None, None, :, None]
    vd = v8.double() * vs.double()[None, None, :, None]
    want = reference_attention(case.q.double(), kd, vd, *case.args()[3:])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_make_case_unused_table_entries_and_dtypes():
    g = torch.Generator().manual_seed(5)
    case = make_case([20, 3], [1, 1], [5, 0], heads_q=4, heads_kv=2, head_dim=8, block_size=4,
                     dtype=torch.bfloat16, kv_dtype=torch.float8_e4m3fn, unused_ids="out_of_pool",
                     extra_cols=2, generator=g)
    pool = case.k_cache.shape[0]
    assert case.q.dtype == torch.bfloat16 and case.k_cache.dtype == torch.float8_e4m3fn
    assert case.block_table.shape == (2, 5 + 2) and case.anchor_block_table.shape == (2, 2 + 1 + 2)
    assert (case.block_table[0, 5:] >= pool).all() and (case.block_table[1, 1:] >= pool).all()
    assert (case.block_table[0, :5] < pool).all() and (case.anchor_block_table[0, :2] < pool).all()
    ref = reference_attention(*case.args())  # never reads an unused entry
    assert ref.isfinite().all()
    with pytest.raises(ValueError, match="unused_ids"):
        make_case([4], [1], None, heads_q=2, heads_kv=1, head_dim=8, block_size=4, unused_ids="zero")
