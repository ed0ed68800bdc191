"""Plain PyTorch attention over a paged KV cache with anchors: the reference and the unfused forms.

* :func:`reference_attention` is the definition (docs/DESIGN.md, "Kernel arguments"): one sequence at a time, every
  score materialized, any float dtype (float64 for tests).
* :func:`naive_attention` is the batched materialized baseline: gather pages, concatenate anchors,
  write the full ``[B, Hq, Tq, Ka + L]`` score matrix to memory, softmax, multiply.
* :func:`two_softmax_attention` is the "v2.5" form: a softmax over the anchors and a softmax over
  the context, each materialized, mixed by the ratio of their normalizers.

Semantics: query token j of sequence b sits at position ``p = seq_lens[b] - q_len[b] + j`` and
sees every anchor token of b and context tokens ``max(0, p - sliding_window + 1) .. p``.
"""

from __future__ import annotations

import math

import torch

from fieldprint.attention.inputs import AttentionShapes, check_shapes, check_values


def _check(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
           anchor_lens, **kwargs) -> AttentionShapes:
    shapes = check_shapes(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                          anchor_block_table, anchor_lens, **kwargs)
    check_values(shapes, block_table, seq_lens, query_start_loc, anchor_block_table, anchor_lens,
                 k_scale=kwargs.get("k_scale"), v_scale=kwargs.get("v_scale"))
    return shapes


def _per_head(scale, Hkv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """k_scale / v_scale as a [Hkv, 1] tensor (1.0 when None)."""
    s = torch.as_tensor(1.0 if scale is None else scale, dtype=dtype, device=device)
    return s.reshape(-1, 1).expand(Hkv, 1)


def gather_pages(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens a block-table row points at.

    cache: [num_blocks, block_size, Hkv, D]; table_row: [max_blocks] -> [length, Hkv, D]
    """
    block_size = cache.shape[1]
    n = -(-length // block_size)
    return cache[table_row[:n].long()].flatten(0, 1)[:length]


def reference_attention(
    q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
    anchor_block_table=None, anchor_lens=None, *, softmax_scale=None, k_scale=None, v_scale=None,
    return_lse=False, sliding_window=None, logit_softcap=None,
):
    """Softmax attention over ``[anchor tokens; context tokens 0..p]`` (see the module docstring).

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (fp8 caches are multiplied
    by k_scale / v_scale, a scalar or [Hkv]); block_table: [B, max_blocks] int32; seq_lens: [B];
    query_start_loc: [B+1]; anchor_block_table: [B, max_anchor_blocks]; anchor_lens: [B].
    Computes in float64 when q is float64, else float32. Returns out [T, Hq, D] in q's dtype, and
    lse [T, Hq] float32 (natural log of the softmax normalizer) when ``return_lse``.
    """
    s = _check(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
               anchor_lens, softmax_scale=softmax_scale, k_scale=k_scale, v_scale=v_scale,
               sliding_window=sliding_window, logit_softcap=logit_softcap)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(s.D)
    ks = _per_head(k_scale, s.Hkv, compute, q.device)
    vs = _per_head(v_scale, s.Hkv, compute, q.device)
    out = torch.empty(s.T, s.Hq, s.D, dtype=compute, device=q.device)
    lse = torch.empty(s.T, s.Hq, dtype=compute, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    alens = anchor_lens.tolist() if anchor_lens is not None else [0] * s.B
    for b in range(s.B):
        q_len, L, A = qsl[b + 1] - qsl[b], lens[b], alens[b]
        if q_len == 0:
            continue
        k = gather_pages(k_cache, block_table[b], L)
        v = gather_pages(v_cache, block_table[b], L)
        if A:
            k = torch.cat([gather_pages(k_cache, anchor_block_table[b], A), k])
            v = torch.cat([gather_pages(v_cache, anchor_block_table[b], A), v])
        # [Hkv, A+L, D] -> one copy per query head of the group: [Hq, A+L, D]
        k = (k.to(compute).transpose(0, 1) * ks[:, :, None]).repeat_interleave(s.group, 0)
        v = (v.to(compute).transpose(0, 1) * vs[:, :, None]).repeat_interleave(s.group, 0)
        qb = q[qsl[b]:qsl[b + 1]].to(compute).transpose(0, 1)  # [Hq, q_len, D]
        scores = scale * qb @ k.transpose(1, 2)  # [Hq, q_len, A+L]
        if logit_softcap is not None:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        pos = torch.arange(L - q_len, L, device=q.device)[:, None]  # query positions
        t = torch.arange(L, device=q.device)[None, :]  # context token positions
        visible = t <= pos
        if sliding_window is not None:
            visible &= t > pos - sliding_window
        visible = torch.cat([torch.ones(q_len, A, dtype=torch.bool, device=q.device), visible], 1)
        scores = scores.masked_fill(~visible, float("-inf"))
        lse[qsl[b]:qsl[b + 1]] = torch.logsumexp(scores, -1).transpose(0, 1)
        out[qsl[b]:qsl[b + 1]] = (torch.softmax(scores, -1) @ v).transpose(0, 1)
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def _padded_kv(cache, block_table, lens, scale, compute):
    """Gather every sequence's pages into a zero-padded [B, Hkv, max_len, D] tensor and a
    [B, max_len] validity mask. cache: [num_blocks, block_size, Hkv, D]. Slots past a sequence's
    length are zeroed, whatever the pool holds there (NaN poison, stale tokens): a masked score
    gets probability 0, but 0 * NaN in the materialized P @ V would still be NaN."""
    B = block_table.shape[0]
    block_size = cache.shape[1]
    max_len = max(int(lens.max()), 1) if B else 1
    n = -(-max_len // block_size)
    kv = cache[block_table[:, :n].long().clamp(0, cache.shape[0] - 1)]  # [B, n, bs, Hkv, D]
    kv = kv.flatten(1, 2)[:, :max_len].to(compute).transpose(1, 2)
    kv = kv * _per_head(scale, cache.shape[2], compute, cache.device)[None, :, :, None]
    valid = torch.arange(max_len, device=cache.device)[None, :] < lens[:, None]
    return kv.masked_fill(~valid[:, None, :, None], 0.0), valid


def _padded_queries(q, query_start_loc, compute):
    """q: [T, Hq, D] -> [B, Hq, max_q, D] padded, with each token's (b, j)."""
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    B = q_lens.shape[0]
    max_q = int(q_lens.max())
    b = torch.repeat_interleave(torch.arange(B, device=q.device), q_lens)
    j = torch.arange(q.shape[0], device=q.device) - query_start_loc[:-1].long()[b]
    qp = torch.zeros(B, max_q, q.shape[1], q.shape[2], dtype=compute, device=q.device)
    qp[b, j] = q.to(compute)
    return qp.transpose(1, 2), q_lens, b, j


def _scores(qp, k, group, scale):
    """qp: [B, Hq, Tq, D], k: [B, Hkv, L, D] -> [B, Hq, Tq, L] (materialized)."""
    return scale * qp @ k.repeat_interleave(group, 1).transpose(-1, -2)


def _causal_mask(q_lens, seq_lens, max_q, max_len, sliding_window):
    """[B, 1, max_q, max_len]: context token t visible from query j of sequence b."""
    pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=q_lens.device)[None, :]
    t = torch.arange(max_len, device=q_lens.device)
    visible = t[None, None, :] <= pos[:, :, None]
    if sliding_window is not None:
        visible &= t[None, None, :] > pos[:, :, None] - sliding_window
    return visible[:, None]


def _unfused_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                    anchor_block_table, anchor_lens, softmax_scale, k_scale, v_scale):
    s = _check(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
               anchor_lens, softmax_scale=softmax_scale, k_scale=k_scale, v_scale=v_scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(s.D)
    qp, q_lens, b, j = _padded_queries(q, query_start_loc, compute)
    k, valid = _padded_kv(k_cache, block_table, seq_lens.long(), k_scale, compute)
    v, _ = _padded_kv(v_cache, block_table, seq_lens.long(), v_scale, compute)
    mask = _causal_mask(q_lens, seq_lens.long(), qp.shape[2], k.shape[2], None) & valid[:, None, None]
    if anchor_block_table is None:
        anchors = None
    else:
        ka, avalid = _padded_kv(k_cache, anchor_block_table, anchor_lens.long(), k_scale, compute)
        va, _ = _padded_kv(v_cache, anchor_block_table, anchor_lens.long(), v_scale, compute)
        anchors = (ka, va, avalid[:, None, None])
    return s, scale, qp, b, j, (k, v, mask), anchors


def naive_attention(
    q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
    anchor_block_table=None, anchor_lens=None, *, softmax_scale=None, k_scale=None, v_scale=None,
):
    """Gather + concatenate + materialized softmax, batched and padded. Same arguments and
    result as :func:`reference_attention` (no window or softcap). Materializes
    ``[B, Hq, max_q, max(A) + max(L)]`` scores."""
    s, scale, qp, b, j, (k, v, mask), anchors = _unfused_inputs(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
        anchor_lens, softmax_scale, k_scale, v_scale)
    if anchors is not None:
        ka, va, amask = anchors
        k, v = torch.cat([ka, k], 2), torch.cat([va, v], 2)
        mask = torch.cat([amask.expand(-1, -1, mask.shape[2], -1), mask], -1)
    scores = _scores(qp, k, s.group, scale).masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, -1) @ v.repeat_interleave(s.group, 1)  # [B, Hq, max_q, D]
    return out.transpose(1, 2)[b, j].to(q.dtype)


def two_softmax_attention(
    q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
    anchor_block_table=None, anchor_lens=None, *, softmax_scale=None, k_scale=None, v_scale=None,
):
    """The "v2.5" form: ``out = w * softmax(S_a) V_a + (1 - w) * softmax(S_c) V_c`` with
    ``w = Z_a / (Z_a + Z_c)``; both score matrices are materialized. Equals
    :func:`reference_attention` in exact arithmetic."""
    s, scale, qp, b, j, (k, v, mask), anchors = _unfused_inputs(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
        anchor_lens, softmax_scale, k_scale, v_scale)
    sc = _scores(qp, k, s.group, scale).masked_fill(~mask, float("-inf"))
    lse_c = torch.logsumexp(sc, -1, keepdim=True)
    out = torch.softmax(sc, -1) @ v.repeat_interleave(s.group, 1)
    if anchors is not None:
        ka, va, amask = anchors
        sa = _scores(qp, ka, s.group, scale).masked_fill(~amask, float("-inf"))
        lse_a = torch.logsumexp(sa, -1, keepdim=True)
        out_a = torch.softmax(sa, -1).nan_to_num(0.0) @ va.repeat_interleave(s.group, 1)
        w = torch.sigmoid(lse_a - lse_c)  # Z_a / (Z_a + Z_c), -inf-safe when A = 0
        out = w * out_a + (1 - w) * out
    return out.transpose(1, 2)[b, j].to(q.dtype)


def unfused_intermediate_bytes(form: str, B: int, Hq: int, max_q: int, anchors: int, context: int,
                               bytes_per_score: int = 4) -> int:
    """HBM bytes the unfused forms write for scores and probabilities (read back once more):
    ``naive`` holds ``[B, Hq, max_q, A + L]`` scores and probabilities; ``two_softmax`` holds
    them separately for anchors and context plus the two partial outputs' normalizers."""
    if form == "naive":
        return 2 * B * Hq * max_q * (anchors + context) * bytes_per_score
    if form == "two_softmax":
        return 2 * B * Hq * max_q * (anchors + context) * bytes_per_score + 2 * B * Hq * max_q * bytes_per_score
    raise ValueError(f"form must be 'naive' or 'two_softmax', got {form!r}")
