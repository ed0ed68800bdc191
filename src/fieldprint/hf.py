"""Hugging Face transformers as a client of the kernel: the ``fieldprint`` attention backend.

``import fieldprint.hf`` registers :func:`fieldprint_attention` under the name ``fieldprint`` in
transformers' ``AttentionInterface`` (and :func:`fieldprint_mask` in its
``AttentionMaskInterface``), so that
``AutoModelForCausalLM.from_pretrained(..., attn_implementation="fieldprint")`` runs every
attention call, the prefill and each decode step, through
:func:`fieldprint.attention.paged_anchor_attention` (on CUDA, or on a CPU under
``TRITON_INTERPRET=1``).

How a call is served. transformers keeps its own KV cache and hands the attention function the
whole K/V each batch row can see, ``key``/``value`` ``[B, Hkv, S, D]`` (rotated), the new queries
``query`` ``[B, Hq, Q, D]`` and a boolean mask ``[B, 1, Q, S]``. :func:`row_layout` reads off the
mask which key columns each row uses (its *visible* columns: L_b of them) and how many of its
queries are real (q_len_b = min(Q, L_b)), and checks that the mask is exactly the one the kernel
computes: query j of row b at position p = L_b - Q + j sees the visible columns whose rank among
them is <= p (and > p - sliding_window). :func:`lay_out_pages` writes each row's visible K/V into
:data:`BLOCK_SIZE`-token pages of a pool in a scrambled page order, and the kernel runs once for
the batch with ``seq_lens`` = L and ``query_start_loc`` over the real queries. This is an
adapter, not a serving cache: the pages are rebuilt from transformers' cache at every call.

What it accepts (anything else is a ValueError / TypeError naming the argument, never a silent
approximation):

* causal masks, with or without left padding (``tokenizer.padding_side = "left"``, what
  ``generate`` needs for decoder-only models). A padding query (one that sees no key) gets output
  0; eager gives it a uniform average over all keys; no real token attends to it, and its logits
  mean nothing in any backend.
* masks the kernel cannot express (right padding, packed sequences, bidirectional attention, a
  float bias other than 0 / -inf) fail the exact mask check.
* ``sliding_window`` and ``softcap`` (as Mistral- and Gemma-style modules pass them) go to the
  kernel's ``sliding_window`` and ``logit_softcap``; ``scaling`` to ``softmax_scale``.
* rejected: dropout > 0, attention sinks (``s_aux``), packed-sequence arguments, gradients (the
  kernel is forward-only), dtypes other than bf16/fp16 (the kernel's).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fieldprint.attention import paged_anchor_attention

NAME = "fieldprint"
BLOCK_SIZE = 16  # tokens per page of the pool a call lays its K/V into
_PAGE_ORDER_SEED = 20240601  # fixed: the scrambled page order is the same on every run
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Overrides of the kernel's tile heuristic (the keys of fieldprint.attention.kernel.kernel_config:
# tile_n, block_m, num_warps, num_stages); empty keeps the kernel's own choice. Triton's CPU
# interpreter runs a few large tiles much faster than many small ones, which the CPU tests use.
kernel_config: dict[str, int] = {}


def fieldprint_mask(*args, **kwargs) -> torch.Tensor:
    """transformers' SDPA boolean mask ``[B, 1, Q, S]``, always materialized: its ``None``
    shortcut means "causal" aligned differently for different caches, so it is never taken."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _allowed(attention_mask: torch.Tensor | None, B: int, Q: int, S: int, device) -> torch.Tensor:
    """The mask as booleans [B, Q, S] (True = the query sees the key)."""
    if attention_mask is None:
        # Unambiguous only when every key is new (prefill: causal) or there is one query (it sees all)
        if Q not in (1, S):
            raise ValueError(f"attention_mask is None with {Q} queries over {S} keys: which keys each query "
                             "sees is ambiguous; pass a mask")
        return torch.ones(Q, S, dtype=torch.bool, device=device).tril(S - Q).expand(B, Q, S)
    m = attention_mask
    if m.dim() != 4 or m.shape[0] != B or m.shape[2] != Q or m.shape[3] != S:
        raise ValueError(f"attention_mask must have shape [{B}, 1 or heads, {Q}, {S}], got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        allowed = m == 0
        if not (allowed | (m == float("-inf")) | (m == torch.finfo(m.dtype).min)).all():
            raise ValueError("attention_mask: an additive bias other than 0 / -inf cannot be expressed by the kernel")
        m = allowed
    if m.shape[1] != 1 and not (m == m[:, :1]).all():
        raise ValueError("attention_mask differs between heads, which the kernel cannot express")
    return m[:, 0]


def row_layout(allowed: torch.Tensor, sliding_window: int | None = None):
    """Per-row geometry of a mask the kernel can compute exactly, or ValueError.

    allowed: [B, Q, S] bool. Returns ``visible`` [B, S] (the columns any query sees), ``seq_lens``
    [B] (L_b, visible columns per row) and ``real`` [B, Q] (the queries with a position: the last
    min(Q, L_b) of the row).
    """
    B, Q, S = allowed.shape
    visible = allowed.any(1)
    seq_lens = visible.sum(1)
    rank = visible.cumsum(1) - 1  # [B, S]: column's index among the row's visible columns
    pos = seq_lens[:, None] - Q + torch.arange(Q, device=allowed.device)  # [B, Q]: query positions
    real = pos >= 0
    sees = visible[:, None, :] & real[:, :, None] & (rank[:, None, :] <= pos[:, :, None])
    if sliding_window is not None:
        sees &= rank[:, None, :] > pos[:, :, None] - sliding_window
    if not torch.equal(sees, allowed):
        b, j, s = (int(i) for i in (sees != allowed).nonzero()[0])
        rule = "causal" if sliding_window is None else f"causal within a sliding window of {sliding_window}"
        raise ValueError(
            f"attention_mask: row {b}, query {j}, key {s} is {'' if allowed[b, j, s] else 'not '}visible, but the "
            f"kernel would make it the opposite (each row's visible keys in order, its queries the last ones, "
            f"{rule}): right padding, packed sequences, bidirectional attention or a window the module did not "
            "pass as sliding_window cannot be expressed")
    return visible, seq_lens, real


def lay_out_pages(keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, seq_lens: torch.Tensor):
    """Each row's visible K/V in ``BLOCK_SIZE``-token pages, pages in a scrambled order.

    keys, values: [B, S, Hkv, D]; visible: [B, S] bool; seq_lens: [B] (visible per row).
    Returns k_pool, v_pool [num_pages, BLOCK_SIZE, Hkv, D] and block_table [B, max_pages] int32.
    """
    B, S, Hkv, D = keys.shape
    device = keys.device
    pages = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE  # [B]
    first_page = torch.cumsum(pages, 0) - pages  # [B]: the row's first logical page
    num_pages = max(int(pages.sum()), 1)
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(_PAGE_ORDER_SEED)).to(device)
    max_pages = max(int(pages.max()), 1)
    logical = first_page[:, None] + torch.arange(max_pages, device=device)  # [B, max_pages]
    in_row = torch.arange(max_pages, device=device) < pages[:, None]
    block_table = torch.where(in_row, order[logical.clamp(max=num_pages - 1)], 0).to(torch.int32)
    row, col = visible.nonzero(as_tuple=True)  # row-major: each row's columns in order
    t = (visible.cumsum(1) - 1)[row, col]  # index of the token within its row
    slot = order[first_page[row] + t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE
    k_pool = keys.new_zeros(num_pages * BLOCK_SIZE, Hkv, D)
    v_pool = values.new_zeros(num_pages * BLOCK_SIZE, Hkv, D)
    k_pool[slot] = keys[row, col]
    v_pool[slot] = values[row, col]
    return k_pool.view(num_pages, BLOCK_SIZE, Hkv, D), v_pool.view(num_pages, BLOCK_SIZE, Hkv, D), block_table


def fieldprint_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, served by ``paged_anchor_attention``.

    query: [B, Hq, Q, D]; key, value: [B, Hkv, S, D]; attention_mask: [B, 1, Q, S] bool (or
    additive 0 / -inf) or None. Returns attn_output [B, Q, Hq, D] in query's dtype and no weights.
    """
    if dropout:
        raise ValueError(f"dropout={dropout}: the fieldprint kernel has no attention dropout (use 0, or eval mode)")
    if kwargs.get("s_aux") is not None:
        raise ValueError("s_aux: attention sinks are not supported by the fieldprint kernel")
    if any(kwargs.get(k) is not None for k in _PACKED_KWARGS):
        raise ValueError(f"{'/'.join(_PACKED_KWARGS)}: packed sequences are not supported; pass a batch with a mask")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        raise ValueError("query/key/value require grad: the fieldprint kernel is forward-only "
                         "(run under torch.no_grad() or torch.inference_mode())")
    if query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query/key/value are {query.dtype}/{key.dtype}/{value.dtype}: the fieldprint kernel runs "
                        "in bfloat16 or float16 (load the model with dtype=torch.bfloat16)")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{type(module).__name__} is not causal: the fieldprint kernel computes causal attention")
    B, Hq, Q, D = query.shape
    S = key.shape[2]
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    allowed = _allowed(attention_mask, B, Q, S, query.device)
    visible, seq_lens, real = row_layout(allowed, window)
    k_pool, v_pool, block_table = lay_out_pages(key.transpose(1, 2), value.transpose(1, 2), visible, seq_lens)
    q_lens = real.sum(1)
    query_start_loc = torch.zeros(B + 1, dtype=torch.int32, device=query.device)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    q = query.transpose(1, 2)[real]  # [T, Hq, D]: the real queries, row by row
    out = paged_anchor_attention(
        q.contiguous(), k_pool, v_pool, block_table, seq_lens.to(torch.int32), query_start_loc,
        softmax_scale=scaling, sliding_window=window, logit_softcap=softcap, config=kernel_config or None)
    attn_output = query.new_zeros(B, Q, Hq, D)
    attn_output[real] = out
    return attn_output, None


AttentionInterface.register(NAME, fieldprint_attention)
AttentionMaskInterface.register(NAME, fieldprint_mask)
