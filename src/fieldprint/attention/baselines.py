"""Every E1 baseline on the same inputs as :func:`paged_anchor_attention` (docs/DESIGN.md,
"Kernel arguments").

Each baseline is a plain function with the kernel's arguments that returns ``out [T, Hq, D]``,
and an entry ``name -> (setup, run)`` in :data:`REGISTRY`: ``setup(case)`` does the work an
engine does once per batch (build a contiguous copy, a merged block table, a plan) and returns a
state; ``run(state)`` is exactly what E1 times.

* ``fused``: the project's kernel, one online softmax over ``[anchors; context]``.
* ``fused_groups``: the same kernel given the sequences that share anchor pages as
  ``anchor_groups`` (shared-prefix shapes, decode and chunked prefill): each anchor tile is read
  once per tile of grouped query rows.
* ``fused_pipelined``: the kernel's opt-in pipelined decode walk.
* ``fused_hdn``: the kernel on a V pool in the ``"hdn"`` page layout (tokens contiguous).
* ``cudnn_sdpa``, ``flash_sdpa``: PyTorch SDPA on contiguous ``[B, Hkv, A+L, D]`` K/V gathered
  once in ``setup`` (no paging at all: the upper reference). Uniform batches only.
* ``gather_sdpa``: gather pages + concatenate anchors + SDPA, all inside the timed region, as an
  engine without a paged kernel would do.
* ``naive``, ``two_softmax``: the materialized forms of :mod:`fieldprint.attention.reference`.
* ``cascade``: a two-level cascade (FlashInfer's MultiLevelCascadeAttentionWrapper, Hydragen):
  the query tokens of all sequences sharing an anchor prefix attend to it in one
  :func:`~fieldprint.attention.prefix.shared_prefix_attention` call (each anchor tile read once
  per tile of query rows, not once per sequence), every sequence's own keys in one call of the
  paged kernel, both with LSE, merged exactly in fp32.
* ``prefix_blocks``: the kernel with the anchor block ids prepended to every block table and
  ``seq_lens += A`` (what prefix caching does; block-aligned anchors only).
* ``flex``: FlexAttention over the paged pool with a mask_mod that reads the block tables.
* ``flashinfer_decode``: FlashInfer's paged decode, anchor pages prepended (:mod:`.flashinfer_baselines`).
* ``flashinfer_cascade``: FlashInfer's two-level cascade, shared anchor pages as level 0 (same module).

Causal alignment: query j of sequence b sits at ``p = L - q_len + j`` and sees anchors plus
context ``0..p``; in the concatenated key order ``[A; L]`` that is the *lower-right* causal mask
of a ``q_len x (A + L)`` score matrix. Decode (``q_len = 1``) needs no mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fieldprint.attention import flashinfer_baselines as fib
from fieldprint.attention.inputs import FP8_DTYPES, check_shapes, check_values
from fieldprint.attention.paged_inputs import PagedCase
from fieldprint.attention.reference import naive_attention, two_softmax_attention


def _kernel():
    from fieldprint.attention.kernel import paged_anchor_attention

    return paged_anchor_attention


def _prefix_kernel():
    from fieldprint.attention.prefix import shared_prefix_attention

    return shared_prefix_attention


def _as_case(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table,
             anchor_lens) -> PagedCase:
    return PagedCase(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                     anchor_block_table, anchor_lens)


@dataclass
class Scales:
    """The keyword arguments every baseline shares."""

    softmax_scale: float | None = None
    k_scale: Any = None
    v_scale: Any = None

    def kwargs(self) -> dict:
        return {"softmax_scale": self.softmax_scale, "k_scale": self.k_scale, "v_scale": self.v_scale}


# ------------------------------------------------------------------------- uniform batch shapes


@dataclass(frozen=True)
class Uniform:
    """A batch in which every sequence has the same query count, context and anchor length."""

    B: int
    q_len: int
    L: int
    A: int


def uniform_shape(case: PagedCase, who: str) -> Uniform:
    """Sizes of a uniform batch; a ragged one is a ValueError (contiguous SDPA pads nothing)."""
    qsl = case.query_start_loc.tolist()
    q_lens = {qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)}
    lens = set(case.seq_lens.tolist())
    alens = set(case.anchor_lens.tolist()) if case.anchor_lens is not None else {0}
    for name, values in (("query_start_loc", q_lens), ("seq_lens", lens), ("anchor_lens", alens)):
        if len(values) != 1:
            raise ValueError(f"{who} needs a uniform batch: {name} gives lengths {sorted(values)}")
    return Uniform(len(qsl) - 1, q_lens.pop(), lens.pop(), alens.pop())


def _gather_batch(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """First ``length`` tokens of every table row: cache [N, bs, Hkv, D] -> [B, Hkv, length, D]."""
    n = -(-length // cache.shape[1])
    return cache[table[:, :n].long()].flatten(1, 2)[:, :length].transpose(1, 2)


def _dequant(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """x: [B, Hkv, S, D] in the cache dtype -> ``dtype``, times a scalar or [Hkv] scale."""
    x = x.to(dtype)
    if scale is None:
        return x
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1)
    return (x.float() * s.view(1, -1, 1, 1)).to(dtype) if s.numel() > 1 else (x.float() * s).to(dtype)


def concat_kv(case: PagedCase, shape: Uniform, k_scale=None, v_scale=None,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered contiguous ``[B, Hkv, A + L, D]`` K and V (anchors first), in ``dtype``
    (default: q's dtype), fp8 scales applied."""
    dtype = dtype or case.q.dtype
    out = []
    for cache, scale in ((case.k_cache, k_scale), (case.v_cache, v_scale)):
        x = _gather_batch(cache, case.block_table, shape.L)
        if shape.A:
            x = torch.cat([_gather_batch(cache, case.anchor_block_table, shape.A), x], 2)
        out.append(_dequant(x, scale, dtype))
    return out[0], out[1]


# ------------------------------------------------------------------------------------ SDPA


BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "math": "MATH", "auto": None}


def _sdpa(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str,
          gqa: bool) -> torch.Tensor:
    """SDPA with the lower-right causal mask of module docstring.

    q4: [B, Hq, q_len, D]; k, v: [B, Hkv, S, D] (Hkv == Hq unless ``gqa``) -> [B, Hq, q_len, D].
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    q_len, S = q4.shape[2], k.shape[2]
    mask, causal = None, False
    if q_len == S:
        causal = True
    elif q_len > 1:
        if backend == "cudnn":
            # PyTorch routes lower-right causal masks to flash / mem-efficient / math only.
            raise NotImplementedError("cuDNN SDPA has no lower-right causal mask in PyTorch "
                                      f"(q_len={q_len} < keys={S})")
        mask = causal_lower_right(q_len, S)
    name = BACKENDS[backend]
    if name is None:
        return F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=gqa)
    with sdpa_kernel([getattr(SDPBackend, name)]):
        return F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=gqa)


@dataclass
class ContiguousState:
    """Inputs of a contiguous SDPA call, prepared outside the timed region."""

    q4: torch.Tensor  # [B, Hq, q_len, D]
    k: torch.Tensor  # [B, Hkv or Hq, A + L, D]
    v: torch.Tensor
    scale: float
    backend: str
    gqa: bool
    note: str = ""


def _contiguous_setup(backend: str) -> Callable[[PagedCase, Scales], ContiguousState]:
    def setup(case: PagedCase, scales: Scales) -> ContiguousState:
        if case.k_cache.dtype in FP8_DTYPES:
            raise TypeError(f"{backend} SDPA takes no float8 KV cache (got {case.k_cache.dtype})")
        if backend == "flash" and case.q.device.type == "cuda":
            _check_flash_lower_right(case)
        shape = uniform_shape(case, f"{backend}_sdpa")
        k, v = concat_kv(case, shape, scales.k_scale, scales.v_scale)
        q4 = case.q.view(shape.B, shape.q_len, *case.q.shape[1:]).transpose(1, 2).contiguous()
        scale = scales.softmax_scale or 1.0 / math.sqrt(case.q.shape[-1])
        state = ContiguousState(q4, k.contiguous(), v.contiguous(), scale, backend, gqa=True,
                                note="native GQA")
        try:
            _run_contiguous(state)
        except RuntimeError as err:  # the backend may refuse GQA: give it one K/V per query head
            group = case.q.shape[1] // k.shape[1]
            state.k = k.repeat_interleave(group, 1).contiguous()
            state.v = v.repeat_interleave(group, 1).contiguous()
            state.gqa, state.note = False, f"K/V heads expanded x{group} ({str(err)[:60]})"
            _run_contiguous(state)
        return state

    return setup


def _check_flash_lower_right(case: PagedCase) -> None:
    """The lower-right causal path of PyTorch silently falls back to another kernel when flash
    cannot run; time flash only when it really runs."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    qsl = case.query_start_loc
    if int(qsl[1] - qsl[0]) <= 1:
        return
    q = case.q[:1].unsqueeze(0).transpose(1, 2)
    kv = q[:, : case.k_cache.shape[2]]
    if not can_use_flash_attention(SDPAParams(q, kv, kv, None, 0.0, False, True), True):
        raise RuntimeError("flash attention cannot run these shapes/dtypes on this GPU")


def _run_contiguous(state: ContiguousState) -> torch.Tensor:
    out = _sdpa(state.q4, state.k, state.v, state.scale, state.backend, state.gqa)
    return out.transpose(1, 2).flatten(0, 1)  # [B, q_len, Hq, D] -> [T, Hq, D]


def _contiguous_fn(backend: str):
    def fn(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table=None,
           anchor_lens=None, *, softmax_scale=None, k_scale=None, v_scale=None):
        case = _as_case(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                        anchor_block_table, anchor_lens)
        return _run_contiguous(_contiguous_setup(backend)(case, Scales(softmax_scale, k_scale, v_scale)))

    fn.__name__ = f"{backend}_sdpa"
    fn.__doc__ = (f"{backend} SDPA over contiguous K/V gathered from the pages (the gather is "
                  "setup, not timed). Uniform batches; out [T, Hq, D].")
    return fn


cudnn_sdpa = _contiguous_fn("cudnn")
flash_sdpa = _contiguous_fn("flash")


@dataclass
class GatherState:
    case: PagedCase
    scales: Scales
    shape: Uniform | None  # None: ragged batch, one SDPA per sequence
    backend: str


def _gather_setup(case: PagedCase, scales: Scales) -> GatherState:
    if case.k_cache.dtype in FP8_DTYPES:
        raise TypeError(f"gather_sdpa feeds SDPA, which takes no float8 KV cache (got {case.k_cache.dtype})")
    try:
        shape = uniform_shape(case, "gather_sdpa")
    except ValueError:
        shape = None
    return GatherState(case, scales, shape, "auto" if case.q.is_cuda else "math")


def _gather_run(state: GatherState) -> torch.Tensor:
    c, s = state.case, state.scales
    scale = s.softmax_scale or 1.0 / math.sqrt(c.q.shape[-1])
    if state.shape is not None:
        sh = state.shape
        k, v = concat_kv(c, sh, s.k_scale, s.v_scale)
        q4 = c.q.view(sh.B, sh.q_len, *c.q.shape[1:]).transpose(1, 2)
        return _sdpa(q4, k, v, scale, state.backend, True).transpose(1, 2).flatten(0, 1)
    out = torch.empty_like(c.q)
    qsl, lens = c.query_start_loc.tolist(), c.seq_lens.tolist()
    alens = c.anchor_lens.tolist() if c.anchor_lens is not None else [0] * len(lens)
    for b in range(len(lens)):
        if qsl[b + 1] == qsl[b]:
            continue
        row = _as_case(c.q[qsl[b]:qsl[b + 1]], c.k_cache, c.v_cache, c.block_table[b:b + 1],
                       c.seq_lens[b:b + 1], None, None if alens[b] == 0 else c.anchor_block_table[b:b + 1], None)
        k, v = concat_kv(row, Uniform(1, qsl[b + 1] - qsl[b], lens[b], alens[b]), s.k_scale, s.v_scale)
        q4 = row.q.unsqueeze(0).transpose(1, 2)
        out[qsl[b]:qsl[b + 1]] = _sdpa(q4, k, v, scale, state.backend, True)[0].transpose(0, 1)
    return out


def gather_sdpa(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                anchor_block_table=None, anchor_lens=None, *, softmax_scale=None, k_scale=None,
                v_scale=None):
    """Gather pages + concatenate anchors + SDPA (batched when uniform, else per sequence; the
    math backend on a CPU). out [T, Hq, D]."""
    case = _as_case(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                    anchor_block_table, anchor_lens)
    return _gather_run(_gather_setup(case, Scales(softmax_scale, k_scale, v_scale)))


# ---------------------------------------------------------------------------------- cascade


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> torch.Tensor:
    """Exact merge of two partial softmax attentions over disjoint key sets, in fp32.

    out_a, out_b: [T, Hq, D]; lse_a, lse_b: [T, Hq] (natural log, ``-inf`` = no keys) -> out
    [T, Hq, D] in out_a's dtype. On CUDA one Triton kernel (FlashInfer's merge_state); elsewhere
    the same arithmetic in PyTorch (float64 for float64 inputs).
    """
    if out_a.is_cuda:
        return merge_states_triton(out_a, lse_a, out_b, lse_b)
    f = torch.float64 if out_a.dtype == torch.float64 else torch.float32  # fp32 at least
    lse = torch.logaddexp(lse_a.to(f), lse_b.to(f))
    wa = torch.exp(lse_a.to(f) - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b.to(f) - lse).nan_to_num(0.0)[..., None]
    return (wa * out_a.to(f) + wb * out_b.to(f)).to(out_a.dtype)


@triton.jit
def _merge_kernel(out_a, lse_a, out_b, lse_b, out, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, head) row: out = (e^(la-m) oa + e^(lb-m) ob) / (e^(la-m) + e^(lb-m)).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    keep = offs < D
    la = tl.load(lse_a + row)
    lb = tl.load(lse_b + row)
    m = tl.maximum(la, lb)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    xa = tl.load(out_a + row * D + offs, mask=keep, other=0.0).to(tl.float32)
    xb = tl.load(out_b + row * D + offs, mask=keep, other=0.0).to(tl.float32)
    y = (wa * xa + wb * xb) / (wa + wb)
    tl.store(out + row * D + offs, y.to(out.dtype.element_ty), mask=keep)


def merge_states_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                        lse_b: torch.Tensor) -> torch.Tensor:
    """:func:`merge_states` as one Triton launch (at least one of the two LSEs finite per row).

    out_a, out_b: [T, Hq, D] contiguous; lse_a, lse_b: [T, Hq] float32."""
    T, Hq, D = out_a.shape
    out = torch.empty_like(out_a)
    if T * Hq:
        _merge_kernel[(T * Hq,)](out_a.contiguous(), lse_a.float().contiguous(), out_b.contiguous(),
                                 lse_b.float().contiguous(), out, D, triton.next_power_of_2(D))
    return out


@dataclass
class PrefixGroup:
    """Sequences sharing one anchor prefix (identical anchor pages and length): their query
    tokens attend to it in one :func:`shared_prefix_attention` call."""

    tokens: slice | torch.Tensor  # the group's query tokens: a slice when contiguous, else [Tg] int64
    table: torch.Tensor  # [ceil(A / block_size)] int32: the shared anchor pages
    length: int  # A, anchor tokens


@dataclass
class CascadeState:
    """Level 1: one shared-prefix call per group; level 2: one paged call over every sequence's
    own keys (context, plus the anchors of a sequence that shares them with no other)."""

    case: PagedCase
    scales: Scales
    groups: list[PrefixGroup]
    own_call: PagedCase  # the paged call over each sequence's unshared keys
    attention: Callable = field(default=None, repr=False)
    prefix_attention: Callable = field(default=None, repr=False)


def shared_anchor_sequences(case: PagedCase) -> list[list[int]]:
    """Sequences (batch indices, ascending) in groups of >= 2 that have query tokens and
    identical anchor pages and anchor length, in order of first appearance (host reads)."""
    if case.anchor_lens is None:
        return []
    bs = case.k_cache.shape[1]
    qsl = case.query_start_loc.tolist()
    members: dict[tuple, list[int]] = {}
    for b, a in enumerate(case.anchor_lens.tolist()):
        if a and qsl[b + 1] > qsl[b]:
            members.setdefault((a, *case.anchor_block_table[b, :-(-a // bs)].tolist()), []).append(b)
    return [seqs for seqs in members.values() if len(seqs) >= 2]


def _prefix_groups(case: PagedCase) -> tuple[list[PrefixGroup], torch.Tensor | None]:
    """Groups of >= 2 sequences with identical anchor pages and length, in order of first
    appearance, and each sequence's anchor length left for the paged call (None: no anchors).

    A sequence whose anchors no other sequence shares keeps them in the paged call: a prefix
    that one sequence reads is read once there already, and a separate call would add a
    launch and a merge for nothing."""
    if case.anchor_lens is None:
        return [], None
    qsl = case.query_start_loc.tolist()
    alens = case.anchor_lens.tolist()
    bs = case.k_cache.shape[1]
    groups, own_alens = [], list(alens)
    for seqs in shared_anchor_sequences(case):
        a = alens[seqs[0]]
        pages = case.anchor_block_table[seqs[0], :-(-a // bs)].tolist()
        tok = [t for b in seqs for t in range(qsl[b], qsl[b + 1])]
        contiguous = tok == list(range(tok[0], tok[-1] + 1))
        index = slice(tok[0], tok[-1] + 1) if contiguous else torch.tensor(tok, device=case.q.device)
        table = torch.tensor(pages, dtype=torch.int32, device=case.q.device)
        groups.append(PrefixGroup(index, table, a))
        for b in seqs:
            own_alens[b] = 0
    if not any(own_alens):
        return groups, None
    return groups, torch.tensor(own_alens, dtype=torch.int32, device=case.q.device)


def cascade_setup(case: PagedCase, scales: Scales, attention: Callable | None = None,
                  prefix_attention: Callable | None = None) -> CascadeState:
    """Plan the calls (FlashInfer's "plan"): group the sequences by their anchor prefix.
    ``attention``: the paged kernel (default :func:`paged_anchor_attention`); ``prefix_attention``:
    the shared-prefix kernel (default :func:`shared_prefix_attention`); tests pass references.

    Batch invariance: a token's bits do not depend on the other sequences while its sequence
    stays in a group of >= 2 (else its anchors move to the paged call: another rounding) and the
    paged call keeps its mode (decode when every sequence has one query token, see the kernel)."""
    shapes = check_shapes(*case.args(), **scales.kwargs())
    check_values(shapes, case.block_table, case.seq_lens, case.query_start_loc,
                 case.anchor_block_table, case.anchor_lens)
    groups, own_alens = _prefix_groups(case)
    own = PagedCase(case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                    case.query_start_loc, None if own_alens is None else case.anchor_block_table,
                    own_alens)
    return CascadeState(case, scales, groups, own, attention or _kernel(),
                        prefix_attention or _prefix_kernel())


def cascade_run(state: CascadeState, validate: bool = False) -> torch.Tensor:
    """The timed part: the paged call, one shared-prefix call per group, the merge. out [T, Hq, D]."""
    c, kw = state.case, dict(state.scales.kwargs())
    if not validate:
        kw["validate"] = False
    out_own, lse_own = state.attention(*state.own_call.args(), return_lse=True, **kw)
    if not state.groups:
        return out_own
    g0 = state.groups[0]
    if len(state.groups) == 1 and isinstance(g0.tokens, slice) and g0.tokens == slice(0, c.q.shape[0]):
        out_p, lse_p = state.prefix_attention(c.q, c.k_cache, c.v_cache, g0.table, g0.length, **kw)
    else:
        # Tokens outside every group: weight 0 in the merge, so their out must be finite (0 * NaN).
        out_p = torch.zeros_like(c.q)
        lse_p = torch.full(c.q.shape[:2], float("-inf"), dtype=torch.float32, device=c.q.device)
        for g in state.groups:
            out_p[g.tokens], lse_p[g.tokens] = state.prefix_attention(
                c.q[g.tokens], c.k_cache, c.v_cache, g.table, g.length, **kw)
    return merge_states(out_p, lse_p, out_own, lse_own)


def cascade(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, anchor_block_table=None,
            anchor_lens=None, *, softmax_scale=None, k_scale=None, v_scale=None):
    """Shared anchors read once per group (one shared-prefix call each), each sequence's own keys
    in one paged call, merged exactly in fp32 through the LSEs. out [T, Hq, D]."""
    case = _as_case(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                    anchor_block_table, anchor_lens)
    return cascade_run(cascade_setup(case, Scales(softmax_scale, k_scale, v_scale)))


# ---------------------------------------------------------------------------- prefix blocks


def prefix_block_case(case: PagedCase) -> PagedCase:
    """The anchor block ids prepended to every block table, ``seq_lens += A``, no anchors.

    Query j of sequence b moves from position ``p`` to ``A + p`` and context token t to ``A + t``,
    so ``t <= p`` is unchanged and every anchor (positions ``0..A-1 <= A + p``) stays visible: the
    causal mask needs no other correction. Needs every ``anchor_lens[b]`` to be a multiple of the
    block size (a partial anchor block would leave a hole in the merged table): else ValueError.
    """
    if case.anchor_lens is None:
        return case
    bs = case.k_cache.shape[1]
    alens = case.anchor_lens.tolist()
    if any(a % bs for a in alens):
        raise ValueError(f"prefix_blocks needs anchor_lens that are multiples of the block size "
                         f"{bs}, got {alens}")
    n_anchor = [a // bs for a in alens]
    width = max(n_anchor) + case.block_table.shape[1]
    table = torch.zeros(len(alens), width, dtype=torch.int32, device=case.block_table.device)
    for b, n in enumerate(n_anchor):
        table[b, :n] = case.anchor_block_table[b, :n]
        table[b, n:n + case.block_table.shape[1]] = case.block_table[b]
    return PagedCase(case.q, case.k_cache, case.v_cache, table, case.seq_lens + case.anchor_lens,
                     case.query_start_loc, None, None)


def prefix_blocks(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                  anchor_block_table=None, anchor_lens=None, *, softmax_scale=None, k_scale=None,
                  v_scale=None, attention: Callable | None = None):
    """The paged kernel (or ``attention``) over :func:`prefix_block_case`. out [T, Hq, D]."""
    case = prefix_block_case(_as_case(q, k_cache, v_cache, block_table, seq_lens,
                                      query_start_loc, anchor_block_table, anchor_lens))
    return (attention or _kernel())(*case.args(), softmax_scale=softmax_scale, k_scale=k_scale,
                                    v_scale=v_scale)


# -------------------------------------------------------------------------------------- flex


@dataclass
class FlexState:
    q4: torch.Tensor  # [B, Hq, q_len, D]: one batch entry per sequence
    k: torch.Tensor  # [1, Hkv, num_blocks * block_size, D]: the pool, one key axis for every sequence
    v: torch.Tensor
    block_mask: Any
    scale: float
    fn: Callable
    note: str = ""


def flex_setup(case: PagedCase, scales: Scales) -> FlexState:
    """FlexAttention over the physical pool: keys are pool slots (one KV batch entry, broadcast
    to every sequence), the mask_mod maps a slot back to (block, offset), looks the block up in
    an inverse block table and applies the anchor / causal rule. The block mask has one batch
    entry per sequence and page granularity (KV block = one page), so each sequence's program
    visits only the pages it owns. Needs CUDA (compiled), an unquantized cache, sequences of
    equal query length (decode; a single prefill chunk) and finite values in the unwritten
    slots of owned pages (a masked score gives p = 0, and 0 * NaN is NaN).
    """
    if not case.q.is_cuda:
        raise RuntimeError("FlexAttention is compiled for CUDA here; the CPU path is not timed")
    if case.k_cache.dtype in FP8_DTYPES:
        raise TypeError("FlexAttention takes no float8 KV cache")
    for name, sc in (("k_scale", scales.k_scale), ("v_scale", scales.v_scale)):
        if sc not in (None, 1.0):
            raise ValueError(f"flex baseline takes no {name}")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = case.q.device
    N, bs, Hkv, D = case.k_cache.shape
    T, Hq, _ = case.q.shape
    q_lens = case.query_start_loc[1:] - case.query_start_loc[:-1]
    B = q_lens.shape[0]
    q_len = T // B
    if T % B or bool((q_lens != q_len).any()):
        raise ValueError("flex baseline needs sequences of equal query length")
    # owner[blk] = sequence owning a context block, its logical index; anchor blocks likewise.
    ctx_owner = torch.full((N,), -1, dtype=torch.long, device=dev)
    ctx_index = torch.zeros(N, dtype=torch.long, device=dev)
    for b in range(B):
        n = -(-int(case.seq_lens[b]) // bs)
        ids = case.block_table[b, :n].long()
        ctx_owner[ids] = b
        ctx_index[ids] = torch.arange(n, device=dev)
    anchor_of = torch.zeros(B, N, dtype=torch.bool, device=dev)  # anchors may be shared
    anchor_index = torch.zeros(B, N, dtype=torch.long, device=dev)
    if case.anchor_lens is not None:
        for b in range(B):
            n = -(-int(case.anchor_lens[b]) // bs)
            ids = case.anchor_block_table[b, :n].long()
            anchor_of[b, ids] = True
            anchor_index[b, ids] = torch.arange(n, device=dev)
    alens = case.anchor_lens.long() if case.anchor_lens is not None else torch.zeros(B, dtype=torch.long, device=dev)
    first_pos = case.seq_lens.long() - q_len  # position of each sequence's first new token

    def mask_mod(b, h, q_idx, kv_idx):
        blk, off = kv_idx // bs, kv_idx % bs
        ctx_tok = ctx_index[blk] * bs + off
        in_ctx = (ctx_owner[blk] == b) & (ctx_tok <= first_pos[b] + q_idx)
        in_anchor = anchor_of[b, blk] & (anchor_index[b, blk] * bs + off < alens[b])
        return in_ctx | in_anchor

    # Flex decoding needs the query block to be a multiple of its row tile (>= 16 rows).
    q_block = 128 if q_len >= 128 else 16
    block_mask = create_block_mask(mask_mod, B, None, q_len, N * bs, device=dev, BLOCK_SIZE=(q_block, bs))
    k = case.k_cache.flatten(0, 1).transpose(0, 1).unsqueeze(0).contiguous()
    v = case.v_cache.flatten(0, 1).transpose(0, 1).unsqueeze(0).contiguous()
    q4 = case.q.view(B, q_len, Hq, D).transpose(1, 2).contiguous()
    fn = torch.compile(flex_attention, dynamic=False)
    scale = scales.softmax_scale or 1.0 / math.sqrt(D)
    state = FlexState(q4, k, v, block_mask, scale, fn, note=f"pool broadcast to {B} sequences, KV block {bs}")
    flex_run(state)
    return state


def flex_run(state: FlexState) -> torch.Tensor:
    out = state.fn(state.q4, state.k, state.v, block_mask=state.block_mask, scale=state.scale,
                   enable_gqa=True)
    return out.transpose(1, 2).flatten(0, 1)  # [T, Hq, D]


# ---------------------------------------------------------------------------------- registry


def _fused_setup(case: PagedCase, scales: Scales):
    shapes = check_shapes(*case.args(), **scales.kwargs())
    check_values(shapes, case.block_table, case.seq_lens, case.query_start_loc,
                 case.anchor_block_table, case.anchor_lens)
    return case, scales, _kernel()


def _fused_run(state) -> torch.Tensor:
    case, scales, kernel = state
    return kernel(*case.args(), **scales.kwargs(), validate=False)


def _pipelined_run(state) -> torch.Tensor:
    """The fused kernel's opt-in pipelined decode walk (``config={"pipelined": True}``)."""
    case, scales, kernel = state
    return kernel(*case.args(), **scales.kwargs(), config={"pipelined": True}, validate=False)


def _hdn_setup(case: PagedCase, scales: Scales):
    """The fused kernel on the V pool stored in the ``"hdn"`` page layout (a page's tokens
    contiguous, `fieldprint.page_layout`): the same logical pool, copied once."""
    v = case.v_cache.movedim(1, -1).contiguous().movedim(-1, 1)  # storage [N, Hkv, D, S]
    return _fused_setup(replace(case, v_cache=v), scales)


def _groups_setup(case: PagedCase, scales: Scales):
    """The fused kernel with read-once anchor groups: the sequences that share anchor pages
    (`shared_anchor_sequences`) as its ``anchor_groups`` table [G, W] (-1 padded)."""
    case, scales, kernel = _fused_setup(case, scales)
    groups = shared_anchor_sequences(case)
    width = max((len(g) for g in groups), default=1)
    table = torch.tensor([g + [-1] * (width - len(g)) for g in groups], dtype=torch.int32).reshape(-1, width)
    return case, scales, kernel, table.to(case.q.device)


def _groups_run(state) -> torch.Tensor:
    case, scales, kernel, table = state
    return kernel(*case.args(), **scales.kwargs(), anchor_groups=table, validate=False)


def _prefix_setup(case: PagedCase, scales: Scales):
    return _fused_setup(prefix_block_case(case), scales)


def _unfused(fn):
    def setup(case: PagedCase, scales: Scales):
        return case, scales

    def run(state) -> torch.Tensor:
        case, scales = state
        return fn(*case.args(), **scales.kwargs())

    return setup, run


Setup = Callable[[PagedCase, Scales], Any]
Run = Callable[[Any], torch.Tensor]

REGISTRY: dict[str, tuple[Setup, Run]] = {
    "fused": (_fused_setup, _fused_run),
    "fused_groups": (_groups_setup, _groups_run),
    "fused_pipelined": (_fused_setup, _pipelined_run),
    "fused_hdn": (_hdn_setup, _fused_run),
    "cudnn_sdpa": (_contiguous_setup("cudnn"), _run_contiguous),
    "flash_sdpa": (_contiguous_setup("flash"), _run_contiguous),
    "gather_sdpa": (_gather_setup, _gather_run),
    "naive": _unfused(naive_attention),
    "two_softmax": _unfused(two_softmax_attention),
    "cascade": (cascade_setup, cascade_run),
    "prefix_blocks": (_prefix_setup, _fused_run),
    "flex": (flex_setup, flex_run),
    "flashinfer_decode": (fib.flashinfer_decode_setup, fib.flashinfer_decode_run),
    "flashinfer_cascade": (fib.flashinfer_cascade_setup, fib.flashinfer_cascade_run),
}
"""name -> (setup(case, scales) -> state, run(state) -> out [T, Hq, D]); E1 times ``run``."""

# Baselines that read the paged cache through the project's kernel (need Triton on a CPU).
USES_KERNEL = frozenset({"fused", "fused_groups", "fused_pipelined", "fused_hdn", "cascade", "prefix_blocks"})
