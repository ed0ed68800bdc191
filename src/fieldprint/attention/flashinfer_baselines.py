"""FlashInfer's paged decode and its two-level cascade as E1 baselines (decode only).

* ``flashinfer_decode``: ``BatchDecodeWithPagedKVCacheWrapper`` over every sequence's anchor pages
  followed by its context pages (what prefix caching does, like ``prefix_blocks``: block-aligned
  anchors only, since only the last page of a FlashInfer request may be partial). bf16 or fp8
  KV (``k_scale`` / ``v_scale`` go to its ``run``).
* ``flashinfer_cascade``: ``MultiLevelCascadeAttentionWrapper``. Level 0 holds the anchor pages,
  one request per run of consecutive sequences that read the same anchor pages (a shared prefix
  read once per run, its last page may be partial); level 1 holds each sequence's own pages. A
  batch without shared or unaligned anchors is one level, its private anchors kept with their
  context (like ``cascade``); once there is a level 0 it holds every sequence's anchors (it must
  cover every query token). bf16 KV only (on sm_90 the levels run FlashInfer's fa3 kernel).

The index arrays (FlashInfer's ``indptr`` / ``indices`` / ``last_page_len``) are built on the
host by the pure functions :func:`decode_level` and :func:`cascade_levels` (tested on a CPU
against an emulation of FlashInfer's paged semantics); ``setup`` plans a wrapper built with
``use_cuda_graph=True`` over fixed index buffers (FlashInfer's recipe for graph capture: ``plan``
stays outside the graph, ``run`` reads only those buffers and the workspace), so ``run`` is what
E1 times and captures. flashinfer is optional: without it ``setup`` raises a RuntimeError that
says so (E1 makes it a skipped row); workflow/scripts/flashinfer_bundle.sh builds an installable
bundle with its kernels compiled ahead of time for sm_90a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fieldprint.attention.inputs import FP8_DTYPES, check_shapes, check_values
from fieldprint.attention.paged_inputs import PagedCase

if TYPE_CHECKING:
    from fieldprint.attention.baselines import Scales

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended float workspace (split-k partials)
_WORKSPACE: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class PagedLevel:
    """One FlashInfer request list over the paged pool (host int32 tensors).

    Request r's query tokens are ``qo_indptr[r]:qo_indptr[r+1]``; its keys are the pages
    ``kv_indices[kv_indptr[r]:kv_indptr[r+1]]`` in order, all full but the last, which holds
    ``kv_last_page_len[r]`` (1..page_size) tokens."""

    qo_indptr: torch.Tensor  # [R+1]
    kv_indptr: torch.Tensor  # [R+1]
    kv_indices: torch.Tensor  # [kv_indptr[-1]]
    kv_last_page_len: torch.Tensor  # [R]

    @property
    def requests(self) -> int:
        return self.kv_last_page_len.numel()


def _level(qo_indptr: list[int], pages: list[list[int]], lengths: list[int], bs: int) -> PagedLevel:
    """A PagedLevel of requests with ``pages[r]`` holding ``lengths[r]`` > 0 tokens."""
    i32 = {"dtype": torch.int32}
    kv_indptr = [0]
    for p in pages:
        kv_indptr.append(kv_indptr[-1] + len(p))
    flat = [i for p in pages for i in p]
    last = [n - (len(p) - 1) * bs for p, n in zip(pages, lengths, strict=True)]
    return PagedLevel(torch.tensor(qo_indptr, **i32), torch.tensor(kv_indptr, **i32),
                      torch.tensor(flat, **i32).reshape(-1), torch.tensor(last, **i32))


def _decode_lengths(case: PagedCase, who: str) -> tuple[list[int], list[int]]:
    """(seq_lens, anchor_lens) as lists; a ValueError unless every sequence has one query token."""
    qsl = case.query_start_loc.tolist()
    q_lens = sorted({qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)})
    if q_lens != [1]:
        raise ValueError(f"{who} is decode only: every sequence needs one query token "
                         f"(query_start_loc gives lengths {q_lens})")
    lens = case.seq_lens.tolist()
    alens = case.anchor_lens.tolist() if case.anchor_lens is not None else [0] * len(lens)
    return lens, alens


def _pages(table_row: torch.Tensor, n_tokens: int, bs: int) -> list[int]:
    return table_row[:-(-n_tokens // bs)].tolist()


def _sequence_level(case: PagedCase, lens: list[int], alens: list[int], with_anchors: list[bool]) -> PagedLevel:
    """Request b = sequence b: its anchor pages where ``with_anchors[b]``, then its context pages."""
    bs = case.k_cache.shape[1]
    pages = [(_pages(case.anchor_block_table[b], a, bs) if keep else []) + _pages(case.block_table[b], n, bs)
             for b, (n, a, keep) in enumerate(zip(lens, alens, with_anchors, strict=True))]
    lengths = [n + (a if keep else 0) for n, a, keep in zip(lens, alens, with_anchors, strict=True)]
    return _level(list(range(len(lens) + 1)), pages, lengths, bs)


def decode_level(case: PagedCase) -> PagedLevel:
    """Request b = sequence b: its anchor pages, then its context pages (``seq_lens[b] >= 1``).

    Every ``anchor_lens[b]`` must be a multiple of the block size (a partial anchor page would
    leave a hole before the context): else ValueError. Decode only (one query token each)."""
    bs = case.k_cache.shape[1]
    lens, alens = _decode_lengths(case, "flashinfer_decode")
    if any(a % bs for a in alens):
        raise ValueError(f"flashinfer_decode needs anchor_lens that are multiples of the block size "
                         f"{bs}, got {alens}")
    return _sequence_level(case, lens, alens, [a > 0 for a in alens])


def cascade_levels(case: PagedCase) -> list[PagedLevel]:
    """The levels of FlashInfer's cascade, top first: ``[level0, level1]`` or ``[level1]``.

    Level 0 (present when some sequences share anchor pages, see
    :func:`~fieldprint.attention.baselines.shared_anchor_sequences`, or some anchors are not
    block-aligned): one request per run of consecutive sequences with the same anchor pages and
    length, its keys those anchors. Level 1: request b = sequence b, its keys its context,
    preceded by its anchors when they are not in level 0. Level 0 must cover every query token
    (FlashInfer merges each level's output into every token), so a sequence without anchors in a
    batch that has a level 0 is a ValueError. Decode only (one query token each)."""
    from fieldprint.attention.baselines import shared_anchor_sequences  # baselines imports this module

    bs = case.k_cache.shape[1]
    lens, alens = _decode_lengths(case, "flashinfer_cascade")
    shared = {b for seqs in shared_anchor_sequences(case) for b in seqs}
    top = bool(shared) or any(a % bs for a in alens)
    if top and not all(alens):
        raise ValueError("flashinfer_cascade: sequences "
                         f"{[b for b, a in enumerate(alens) if not a]} have no anchors while others "
                         "need a level 0, which must cover every query token")
    # without a level 0, private block-aligned anchors stay with the context
    own = _sequence_level(case, lens, alens, [a > 0 and not top for a in alens])
    if not top:
        return [own]
    keys = [(a, *_pages(case.anchor_block_table[b], a, bs)) for b, a in enumerate(alens)]
    starts = [b for b in range(len(keys)) if b == 0 or keys[b] != keys[b - 1]]
    qo = starts + [len(keys)]
    level0 = _level(qo, [list(keys[s][1:]) for s in starts], [keys[s][0] for s in starts], bs)
    return [level0, own]


# ------------------------------------------------------------------------------- on the GPU


def _flashinfer():
    """The flashinfer module; its absence (or a broken install) is a RuntimeError saying so."""
    try:
        import flashinfer
    except (ImportError, OSError) as err:  # OSError: a bundled .so that does not load
        raise RuntimeError(f"flashinfer is not importable ({type(err).__name__}: {err}); install "
                           "the bundle of workflow/scripts/flashinfer_bundle.sh") from err
    return flashinfer


def _workspace(device: torch.device) -> torch.Tensor:
    """One zeroed float workspace per device, shared by every wrapper (they run one at a time)."""
    if device not in _WORKSPACE:
        _WORKSPACE[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _WORKSPACE[device]


def _scalar(scale, name: str) -> float | None:
    """A k_scale / v_scale as the Python float FlashInfer's ``run`` takes (None: no scale)."""
    if scale is None:
        return None
    s = torch.as_tensor(scale, dtype=torch.float32)
    if s.numel() != 1:
        raise TypeError(f"FlashInfer's run takes a scalar {name}, got {s.numel()} values (per head)")
    return float(s)


def _check(case: PagedCase, scales: Scales, who: str):
    """Validate the case; the flashinfer module (its absence is reported before anything else
    about the device, so that a CPU run says what is missing)."""
    shapes = check_shapes(*case.args(), **scales.kwargs())
    check_values(shapes, case.block_table, case.seq_lens, case.query_start_loc,
                 case.anchor_block_table, case.anchor_lens)
    fi = _flashinfer()
    if not case.q.is_cuda:
        raise RuntimeError(f"{who} needs CUDA")
    if case.q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{who}: FlashInfer takes bf16 / fp16 queries, got {case.q.dtype}")
    return fi


def _on_device(level: PagedLevel, device) -> PagedLevel:
    """The fixed buffers a graph-mode wrapper reads (plan copies the host arrays into them)."""
    return PagedLevel(*(x.to(device) for x in (level.qo_indptr, level.kv_indptr, level.kv_indices,
                                                level.kv_last_page_len)))


@dataclass
class FlashInferState:
    wrapper: Any
    q: torch.Tensor  # [B, Hq, D]
    kv: tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache) [N, bs, Hkv, D], FlashInfer's NHD
    k_scale: float | None = None
    v_scale: float | None = None
    buffers: list[PagedLevel] | None = None  # the graph-mode index buffers, kept alive
    note: str = ""


def flashinfer_decode_setup(case: PagedCase, scales: Scales) -> FlashInferState:
    """Plan ``BatchDecodeWithPagedKVCacheWrapper`` (CUDA-core decode, NHD, graph-mode buffers)."""
    fi = _check(case, scales, "flashinfer_decode")
    level = decode_level(case)
    dev = case.q.device
    buf = _on_device(level, dev)
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
        _workspace(dev), "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=buf.kv_indptr,
        paged_kv_indices_buffer=buf.kv_indices, paged_kv_last_page_len_buffer=buf.kv_last_page_len)
    _, bs, Hkv, D = case.k_cache.shape
    wrapper.plan(level.kv_indptr, level.kv_indices, level.kv_last_page_len, case.q.shape[1], Hkv, D,
                 bs, q_data_type=case.q.dtype, kv_data_type=case.k_cache.dtype,
                 sm_scale=scales.softmax_scale or 1.0 / math.sqrt(D))
    return FlashInferState(wrapper, case.q, (case.k_cache, case.v_cache),
                           _scalar(scales.k_scale, "k_scale"), _scalar(scales.v_scale, "v_scale"),
                           [buf], note=f"FlashInfer {fi.__version__} CUDA-core decode")


def flashinfer_decode_run(state: FlashInferState) -> torch.Tensor:
    return state.wrapper.run(state.q, state.kv, k_scale=state.k_scale, v_scale=state.v_scale)


def flashinfer_cascade_setup(case: PagedCase, scales: Scales) -> FlashInferState:
    """Plan ``MultiLevelCascadeAttentionWrapper`` over :func:`cascade_levels` (graph-mode buffers)."""
    fi = _check(case, scales, "flashinfer_cascade")
    if case.k_cache.dtype in FP8_DTYPES:
        # The wrapper builds its levels with backend="auto" (fa3 on sm_90: no bf16 x fp8 MMA) and
        # its run() takes no k_scale / v_scale.
        raise TypeError("flashinfer_cascade takes no float8 KV cache (its sm_90 fa3 levels need "
                        "q and KV of one dtype; its run() takes no k_scale / v_scale)")
    levels = cascade_levels(case)
    dev = case.q.device
    bufs = [_on_device(lv, dev) for lv in levels]
    wrapper = fi.MultiLevelCascadeAttentionWrapper(
        len(levels), _workspace(dev), "NHD", use_cuda_graph=True,
        qo_indptr_buf_arr=[b.qo_indptr for b in bufs], paged_kv_indptr_buf_arr=[b.kv_indptr for b in bufs],
        paged_kv_indices_buf_arr=[b.kv_indices for b in bufs],
        paged_kv_last_page_len_buf_arr=[b.kv_last_page_len for b in bufs])
    _, bs, Hkv, D = case.k_cache.shape
    wrapper.plan([lv.qo_indptr for lv in levels], [lv.kv_indptr for lv in levels],
                 [lv.kv_indices for lv in levels], [lv.kv_last_page_len for lv in levels],
                 case.q.shape[1], Hkv, D, bs, causal=False,
                 sm_scale=scales.softmax_scale or 1.0 / math.sqrt(D), q_data_type=case.q.dtype,
                 kv_data_type=case.k_cache.dtype)
    backends = sorted({getattr(w, "_backend", "?") for w in getattr(wrapper, "_batch_prefill_wrappers", [])})
    note = (f"FlashInfer {fi.__version__} cascade, {len(levels)} level(s), "
            f"{levels[0].requests if len(levels) == 2 else 0} level-0 requests, backend {'/'.join(backends)}")
    return FlashInferState(wrapper, case.q, (case.k_cache, case.v_cache), buffers=bufs, note=note)


def flashinfer_cascade_run(state: FlashInferState) -> torch.Tensor:
    return state.wrapper.run(state.q, state.kv)
