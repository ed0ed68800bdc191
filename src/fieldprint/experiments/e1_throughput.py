"""E1: decode and chunked-prefill throughput of the fused paged anchor kernel and every baseline.

For each configuration (mode, batch B, context L, anchors A, KV dtype) the run draws fresh random
inputs (normal, never zeros) in a pool whose block ids are a random permutation (scrambled block
tables; each sequence owns its context blocks, and its anchor blocks unless they are shared: see
below), then for each implementation of
:data:`fieldprint.attention.baselines.REGISTRY`:

1. ``setup`` outside the timed region (a failure or an unsupported combination becomes a row
   with ``ms`` empty and the reason in ``skipped``; the materialized forms are skipped before
   they run when their memory estimate exceeds ``unfused_limit_gb``);
2. one call checked against ``reference_attention`` (fp32) on a slice (the last
   ``check_tokens`` query tokens of the first ``check_seqs`` sequences): ``rel_err`` =
   max |out - ref| / max |ref|; and against the fused output on every token: ``rel_err_fused``;
3. once every implementation of the configuration is set up and checked, ``reps`` interleaved
   rounds: each round times every implementation in turn for about ``rep_ms`` (CUDA graph replay
   where capture works, else eager: ``timing``, with the capture's error in ``note``) and keeps
   its median, so that a drift of the machine (clocks, temperature) reaches all alike. ``ms`` is
   the median of the rounds' medians, ``ms_q1`` / ``ms_q3`` their first and third quartiles
   (absent from files written before they were recorded).

Shared-prefix regime (``shared_shapes``, mode ``shared_decode``): decode steps of B sequences in
groups of ``group`` that share one anchor prefix (the same anchor pages: a system prompt shared by
a batch, or a GRPO group of samples of one prompt), each with its own context. Its chunked-prefill
form (``shared_prefill_shapes``, mode ``shared_prefill``): each of the B sequences brings
``q_len`` new tokens at once (speculative-decoding verification, a prompt chunk), lower-right
causal over its own context, the shared anchors visible to all. In the other shapes every
sequence owns its anchor pages (``share_group`` = 1).

Prefill: one sequence, the whole prompt as one chunk (``prefill_chunk = 0``: ``q_len = L``, keys
``A + L``, lower-right causal), so its TFLOP/s compare directly with causal flash SDPA; a
positive ``prefill_chunk`` times the last chunk of that size instead.

FlashInfer (``flashinfer_decode``, ``flashinfer_cascade``: decode shapes, CUDA) is optional: where
it is not importable their rows are skipped with that reason (workflow/scripts/flashinfer_bundle.sh
builds an offline bundle of it).

Bandwidth counts the bytes an ideal kernel moves once, in two ways: ``bytes`` / ``tbps`` are
logical (K and V of every sequence's anchor and context tokens in the stored dtype, plus q and
out: a shared anchor page counted once per sequence that reads it); ``unique_bytes`` /
``unique_tbps`` count each stored anchor page once (equal to the logical ones without sharing).
TFLOP/s counts ``4 * Hq * D`` per visible key per query token (QK^T and PV). The contiguous SDPA
baselines are charged the same bytes even when a backend needs its K/V heads expanded (``note``).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, resolve_device
from fieldprint.timing import bench_quartiles, quartiles

IMPLS = ("fused", "fused_groups", "fused_pipelined", "fused_hdn", "cudnn_sdpa", "flash_sdpa", "gather_sdpa", "naive",
         "two_softmax", "cascade", "flashinfer_decode", "flashinfer_cascade", "prefix_blocks", "flex")
KV_DTYPES = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}
# The FlashInfer wrappers are planned in graph mode (fixed index buffers; run() reads nothing else).
GRAPHABLE = {"fused", "fused_groups", "fused_pipelined", "fused_hdn", "cascade", "prefix_blocks", "cudnn_sdpa",
             "flash_sdpa", "gather_sdpa", "flashinfer_decode", "flashinfer_cascade"}
PREFILL_MODES = ("prefill", "shared_prefill")  # several query tokens per sequence
FP8_SCALE = 0.5  # k_scale = v_scale for fp8 caches (values stored as x / 0.5)


@dataclass
class E1Config(ExperimentConfig):
    decode_shapes: list[list[int]] = field(default_factory=lambda: [[2, 40]])  # [B, L] pairs
    anchors: list[int] = field(default_factory=lambda: [0, 16])
    kv_dtypes: list[str] = field(default_factory=lambda: ["bf16"])
    prefill_contexts: list[int] = field(default_factory=lambda: [48])
    prefill_anchors: list[int] = field(default_factory=lambda: [16])
    prefill_chunk: int = 0  # 0: the whole prompt is one chunk
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 64
    block_size: int = 16
    impls: list[str] = field(default_factory=lambda: list(IMPLS))
    # [B, L, A, group]: B decode sequences of L own tokens in B / group groups, each group sharing
    # A anchor tokens (the shared-prefix regime; none by default)
    shared_shapes: list[list[int]] = field(default_factory=list)
    # [B, q_len, L, A, group]: the same with q_len new tokens per sequence (L includes them)
    shared_prefill_shapes: list[list[int]] = field(default_factory=list)
    flex_anchors: list[int] = field(default_factory=lambda: [16])  # flex compiles per shape: few
    flex_modes: list[str] = field(default_factory=lambda: ["decode"])
    unfused_limit_gb: float = 60.0
    cuda_graphs: bool = True
    check_seqs: int = 2
    check_tokens: int = 4
    reps: int = 5  # interleaved rounds over the implementations of a configuration
    warmup_ms: float = 10.0  # per implementation and round
    rep_ms: float = 8.0  # timed per implementation and round

    def validate(self) -> None:
        super().validate()
        check(all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in self.decode_shapes),
              f"decode_shapes must be [B, L] pairs of positive ints, got {self.decode_shapes}")
        check(all(a >= 0 for a in self.anchors + self.prefill_anchors), "anchors must be >= 0")
        check(all(len(s) == 4 and all(isinstance(x, int) and x > 0 for x in s) and s[3] >= 2
                  and s[0] % s[3] == 0 for s in self.shared_shapes),
              "shared_shapes must be [B, L, A, group] of positive ints with group >= 2 sequences "
              f"sharing each anchor prefix and B a multiple of group, got {self.shared_shapes}")
        check(all(len(s) == 5 and all(isinstance(x, int) and x > 0 for x in s) and s[4] >= 2
                  and s[0] % s[4] == 0 and s[1] <= s[2] for s in self.shared_prefill_shapes),
              "shared_prefill_shapes must be [B, q_len, L, A, group] of positive ints with q_len <= L, "
              f"group >= 2 and B a multiple of group, got {self.shared_prefill_shapes}")
        check(set(self.kv_dtypes) <= set(KV_DTYPES), f"kv_dtypes must be in {sorted(KV_DTYPES)}")
        check(all(c > 0 for c in self.prefill_contexts), "prefill_contexts must be positive")
        check(self.prefill_chunk >= 0, "prefill_chunk must be >= 0 (0 = whole prompt)")
        check(all(c >= self.prefill_chunk for c in self.prefill_contexts),
              "prefill_chunk must not exceed a prefill context")
        check(self.heads_q > 0 and self.heads_kv > 0 and self.heads_q % self.heads_kv == 0,
              "heads_q must be a positive multiple of heads_kv")
        check(self.head_dim in (64, 128, 256), "head_dim must be 64, 128 or 256 (the kernel's)")
        check(self.block_size in (16, 32, 64, 128), "block_size must be 16, 32, 64 or 128")
        check(set(self.impls) <= set(IMPLS) and "fused" in self.impls,
              f"impls must include 'fused' and be drawn from {IMPLS}")
        check(set(self.flex_modes) <= {"decode", "prefill"}, "flex_modes: decode / prefill")
        check(self.unfused_limit_gb > 0 and self.check_seqs > 0 and self.check_tokens > 0,
              "unfused_limit_gb, check_seqs, check_tokens must be positive")
        check(self.warmup_ms > 0 and self.rep_ms > 0, "warmup_ms and rep_ms must be positive")
        check(isinstance(self.reps, int) and self.reps >= 1, f"reps must be an int >= 1, got {self.reps}")


# ----------------------------------------------------------------------------------- inputs


def make_problem(B: int, q_len: int, L: int, A: int, cfg: E1Config, kv_dtype, device: str, seed: int,
                 group: int = 1):
    """Random paged inputs of a uniform batch: PagedCase and Scales. Pool blocks in random
    order; each sequence owns ceil(L/bs) context blocks, and each run of ``group`` consecutive
    sequences shares one set of ceil(A/bs) anchor blocks (``group = 1``: private anchors)."""
    import torch

    from fieldprint.attention.baselines import Scales
    from fieldprint.attention.paged_inputs import PagedCase

    bs, Hkv, D = cfg.block_size, cfg.heads_kv, cfg.head_dim
    n_ctx, n_anc, n_sets = -(-L // bs), -(-A // bs), B // group
    N = B * n_ctx + n_sets * n_anc + 1
    cpu = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=cpu).to(torch.int32)
    gen = torch.Generator(device=device).manual_seed(seed)
    store = torch.bfloat16 if kv_dtype == torch.bfloat16 else torch.float32

    def pool():
        x = torch.randn(N, bs, Hkv, D, generator=gen, device=device, dtype=store)
        return x if kv_dtype == torch.bfloat16 else (x / FP8_SCALE).to(kv_dtype)

    k, v = pool(), pool()
    q = torch.randn(B * q_len, cfg.heads_q, D, generator=gen, device=device, dtype=torch.bfloat16)
    table = perm[:B * n_ctx].view(B, n_ctx).to(device)
    anchor_sets = perm[B * n_ctx:B * n_ctx + n_sets * n_anc].view(n_sets, n_anc)
    atable = anchor_sets.repeat_interleave(group, 0).to(device) if A else None
    i32 = {"dtype": torch.int32, "device": device}
    case = PagedCase(q, k, v, table, torch.full((B,), L, **i32), torch.arange(B + 1, **i32) * q_len,
                     atable, torch.full((B,), A, **i32) if A else None)
    fp8 = kv_dtype != torch.bfloat16
    return case, Scales(None, FP8_SCALE if fp8 else None, FP8_SCALE if fp8 else None)


def reference_slice(case, scales, n_seqs: int, n_tokens: int):
    """(token indices, reference output there): the last ``n_tokens`` query tokens of the first
    ``n_seqs`` sequences, computed by ``reference_attention`` in fp32."""
    import torch

    from fieldprint.attention import reference_attention
    from fieldprint.attention.paged_inputs import PagedCase

    qsl = case.query_start_loc.tolist()
    rows, outs = [], []
    for b in range(min(n_seqs, len(qsl) - 1)):
        lo = max(qsl[b], qsl[b + 1] - n_tokens)
        idx = list(range(lo, qsl[b + 1]))
        i32 = {"dtype": torch.int32, "device": case.q.device}
        sub = PagedCase(case.q[lo:qsl[b + 1]], case.k_cache, case.v_cache, case.block_table[b:b + 1],
                        case.seq_lens[b:b + 1], torch.tensor([0, len(idx)], **i32),
                        None if case.anchor_lens is None else case.anchor_block_table[b:b + 1],
                        None if case.anchor_lens is None else case.anchor_lens[b:b + 1])
        outs.append(reference_attention(*sub.args(), **scales.kwargs()).float())
        rows += idx
    return torch.tensor(rows, device=case.q.device), torch.cat(outs)


def rel_err(out, want) -> float:
    return float((out.float() - want.float()).abs().max() / want.float().abs().max())


# ---------------------------------------------------------------------------------- timing


def _timer(fn, device: str, graph: bool):
    """What to time for ``fn``, how, and why not as a graph: the replay of a CUDA graph of it when
    ``graph`` and capture works (the bound ``replay`` keeps the graph alive), else ``fn`` itself,
    eager, with the capture's error (empty when no capture was tried)."""
    import torch

    if device == "cuda" and graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            torch.cuda.synchronize()
            return g.replay, "graph", ""
        except Exception as err:  # noqa: BLE001 - capture is an optimization: fall back to eager
            torch.cuda.synchronize()
            return fn, "eager", f"graph capture failed: {type(err).__name__}: {_first_line(err, 120)}"
    return fn, "eager", ""


def _interleaved(timed: list[tuple[dict, object]], device: str, cfg: E1Config) -> list[tuple[dict, list[float]]]:
    """``cfg.reps`` rounds over the (row, callable) pairs of one configuration, each round timing
    every callable in turn: (row, the rounds' median ms) per pair. A callable that raises is
    dropped from the later rounds and its row gets the error in ``skipped``."""
    import torch

    rounds = [(row, fn, []) for row, fn in timed]
    for _ in range(cfg.reps):
        for row, fn, ms in rounds:
            if row["skipped"]:
                continue
            try:
                ms.append(bench_quartiles(fn, device, cfg.warmup_ms, cfg.rep_ms)[1])
            except RuntimeError as err:
                row["skipped"] = f"{type(err).__name__} while timed: {_first_line(err, 140)}"
                if device == "cuda":
                    torch.cuda.synchronize()
    return [(row, ms) for row, _, ms in rounds if not row["skipped"]]


def _first_line(err: Exception, limit: int) -> str:
    """The first line of an error's message, at most ``limit`` characters (a CSV cell)."""
    return (str(err).splitlines() or [""])[0][:limit]


def unfused_gb(form: str, B: int, q_len: int, A: int, L: int, cfg: E1Config) -> float:
    """Peak memory estimate of the materialized forms: scores + probabilities
    (:func:`unfused_intermediate_bytes`) plus their fp32 gathered K and V, expanded to the query
    heads, with one temporary copy each."""
    from fieldprint.attention.reference import unfused_intermediate_bytes

    inter = unfused_intermediate_bytes(form, B, cfg.heads_q, q_len, A, L)
    kv = 4 * B * cfg.heads_q * (A + L) * cfg.head_dim * 4
    return (inter + kv) / 1e9


# ---------------------------------------------------------------------------------- the run


def _skip_reason(name: str, mode: str, A: int, kv: str, device: str, B: int, q_len: int, L: int,
                 cfg: E1Config) -> str:
    if name in ("cudnn_sdpa", "flash_sdpa", "flex", "flashinfer_decode", "flashinfer_cascade") and device != "cuda":
        return "needs CUDA"
    if name in ("flashinfer_decode", "flashinfer_cascade") and mode in PREFILL_MODES:
        return "FlashInfer baselines: decode only"
    if name in ("cudnn_sdpa", "flash_sdpa", "gather_sdpa", "flex") and kv == "fp8":
        return "SDPA / FlexAttention take no float8 KV"
    if name == "flex" and (A not in cfg.flex_anchors or mode not in cfg.flex_modes):
        return "not run at this shape (compiles per shape; see flex_anchors, flex_modes)"
    if name in ("naive", "two_softmax"):
        gb = unfused_gb(name, B, q_len, A, L, cfg)
        if gb > cfg.unfused_limit_gb:
            return f"materialized intermediates need ~{gb:.0f} GB > limit {cfg.unfused_limit_gb:g} GB"
    if name in ("prefix_blocks", "flashinfer_decode") and A % cfg.block_size:
        return "anchors not block-aligned"
    if name == "fused_groups" and not mode.startswith("shared_"):
        return "anchor groups: shared-prefix shapes only"
    if name == "fused_pipelined" and mode in PREFILL_MODES:
        return "pipelined walk: decode only"
    if name == "fused_hdn" and mode != "decode":
        return "hdn V layout: context-dominated decode only"
    return ""


def _configs(cfg: E1Config):
    """(mode, B, q_len, L, A, kv_dtype, sequences per anchor set) of every measured shape."""
    for kv in cfg.kv_dtypes:
        for B, L in cfg.decode_shapes:
            for A in cfg.anchors:
                yield "decode", B, 1, L, A, kv, 1
    for L in cfg.prefill_contexts:
        for A in cfg.prefill_anchors:
            yield "prefill", 1, cfg.prefill_chunk or L, L, A, "bf16", 1
    for kv in cfg.kv_dtypes:
        for B, L, A, group in cfg.shared_shapes:
            yield "shared_decode", B, 1, L, A, kv, group
    for kv in cfg.kv_dtypes:
        for B, q_len, L, A, group in cfg.shared_prefill_shapes:
            yield "shared_prefill", B, q_len, L, A, kv, group


def run(cfg: E1Config) -> list[dict]:
    device = resolve_device(cfg.device)
    if device == "cpu":  # the fused kernel runs on a CPU only interpreted, set before import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from fieldprint.attention.baselines import REGISTRY

    rows: list[dict] = []
    for n, (mode, B, q_len, L, A, kv, group) in enumerate(_configs(cfg)):
        kv_dtype = getattr(torch, KV_DTYPES[kv])
        case, scales = make_problem(B, q_len, L, A, cfg, kv_dtype, device, cfg.seed + n, group)
        idx, ref = reference_slice(case, scales, cfg.check_seqs, cfg.check_tokens)
        elem = case.k_cache.element_size()
        T = B * q_len
        token_bytes = 2 * cfg.heads_kv * cfg.head_dim * elem  # K and V of one token
        io_bytes = 2 * T * cfg.heads_q * cfg.head_dim * case.q.element_size()
        logical = B * (A + L) * token_bytes + io_bytes
        unique = (B * L + B // group * A) * token_bytes + io_bytes
        visible = B * sum(A + L - q_len + j + 1 for j in range(q_len))
        flops = 4 * cfg.heads_q * cfg.head_dim * visible
        base = {"mode": mode, "batch": B, "q_len": q_len, "context": L, "anchors": A,
                "kv_dtype": kv, "heads_q": cfg.heads_q, "heads_kv": cfg.heads_kv,
                "head_dim": cfg.head_dim, "block_size": cfg.block_size, "share_group": group,
                "bytes": logical, "unique_bytes": unique, "flops": flops}
        fused_out = None
        config_rows, timed, states = [], [], []
        for name in cfg.impls:
            row = dict(base, impl=name, ms="", ms_q1="", ms_q3="", tbps="", unique_tbps="", tflops="",
                       tokens_per_s="", rel_err="", rel_err_fused="", timing="", note="", skipped="")
            reason = _skip_reason(name, mode, A, kv, device, B, q_len, L, cfg)
            try:
                if reason:
                    raise _Skip(reason)
                setup, fn_run = REGISTRY[name]
                state = setup(case, scales)
                out = fn_run(state)
                if device == "cuda":
                    torch.cuda.synchronize()
                row["rel_err"] = f"{rel_err(out[idx], ref):.3e}"
                if name == "fused":
                    fused_out = out
                elif fused_out is not None:
                    row["rel_err_fused"] = f"{rel_err(out, fused_out):.3e}"
                del out
                fn, how, why = _timer(lambda f=fn_run, st=state: f(st), device,
                                      cfg.cuda_graphs and name in GRAPHABLE)
                row.update(timing=how, note="; ".join(x for x in (getattr(state, "note", ""), why) if x))
                timed.append((row, fn))
                states.append(state)
            except _Skip as why:
                row["skipped"] = str(why)
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
                row["skipped"] = f"{type(err).__name__}: {_first_line(err, 160)}"
                if device == "cuda":
                    torch.cuda.synchronize()
            config_rows.append(row)
        for row, round_ms in _interleaved(timed, device, cfg):
            q1, ms, q3 = quartiles(round_ms)
            row.update(ms=f"{ms:.5f}", ms_q1=f"{q1:.5f}", ms_q3=f"{q3:.5f}",
                       tbps=f"{logical / ms / 1e9:.4g}", unique_tbps=f"{unique / ms / 1e9:.4g}",
                       tflops=f"{flops / ms / 1e9:.4g}", tokens_per_s=f"{T / ms * 1e3:.1f}")
        state = None
        del timed, states
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        _ratios(config_rows)
        rows += config_rows
        del case, fused_out
    return rows


class _Skip(Exception):
    """An implementation that does not run at this configuration, by design."""


def _ratios(rows: list[dict]) -> None:
    """time(reference) / time(impl) for the contiguous cuDNN, flash and gather+SDPA rows."""
    ms = {r["impl"]: float(r["ms"]) for r in rows if r["ms"] != ""}
    for r in rows:
        for ref, col in (("cudnn_sdpa", "ratio_to_cudnn"), ("flash_sdpa", "ratio_to_flash"),
                         ("gather_sdpa", "ratio_to_gather")):
            r[col] = f"{ms[ref] / float(r['ms']):.4f}" if r["ms"] != "" and ref in ms else ""


if __name__ == "__main__":
    hydra_main("e1_throughput", E1Config, run)
