"""E5 (part 2): what storing the KV cache in a low-precision format costs in accuracy.

Two measurements, one CSV (column ``kind``):

* ``lm``: validation bits per byte of the model trained by ``e5_train`` (``checkpoint``) on the
  held-out plays, run through the serving path (:func:`fieldprint.model.score_paged`): the anchor
  prologue (the first ``anchor_bytes`` bytes of ``valid_path``) is prefilled once into pinned
  blocks shared by every sequence; ``eval_windows`` windows of ``window`` bytes, evenly spaced over
  the rest of the validation text, are scored by chunked prefill through scrambled block tables
  and ``reference_attention`` (``attention: reference``) or its batched twin ``naive_attention``
  (``attention: naive``, fast on a GPU), in float32 arithmetic on a float32 cache. Every K/V the
  cache holds is stored in the row's format: quantized with :func:`fieldprint.quant.quantize` and
  dequantized back (simulated storage: the pool is float32 and holds exactly the values a cache
  in that format would decode to, so the rows differ by the storage format alone). The
  ``reference`` row keeps float32 K/V. ``anchors_quantized`` says whether the anchor K/V is
  stored in the format too or kept in float32.
* ``lm`` rows with ``attention = kernel`` (formats ``kernel_formats``): the same evaluation through
  the fused Triton kernel, which takes bf16 q and a bf16 cache. Only formats whose values bf16
  holds exactly are allowed (bf16, e4m3, e5m2, int8 with power-of-two scales, two-grid midpoints
  included), so these rows differ from their float32 twins only by the kernel's own arithmetic
  (and, in rows with ``anchors_quantized = False``, by the anchors' rounding to bf16).
* ``attention``: the relative error ``||o - o_ref|| / ||o_ref||`` (Frobenius) of attention
  outputs at Llama-like shapes on synthetic data (q, v standard normal, k standard normal times
  log-normal per-channel scales, an outlier pattern real keys show), computed in float64 through
  ``reference_attention`` with K/V (anchors included, or not) stored in the format, against the
  same computation on the unrounded K/V. It isolates the storage error from any kernel's own
  arithmetic.

Scales (``kv_scale``, fp8 and int8): ``page`` (the commit protocol of :mod:`fieldprint.commit`):
one power-of-two scale per page of ``block_size`` tokens x KV heads x head dim, K and V apart;
``row``: one per (token, KV head) row of ``head_dim`` values. Either is a function of the page or
row alone, never of what else was in the batch (:func:`row_scale`). Pages are written whole:
``page`` needs the anchor, the window and the chunk to be multiples of ``block_size``, so every
write covers whole pages of one sequence. Stochastic rounding draws its bits from a counter-based generator; the seed of
each write is derived from the row's seed and a per-run write counter. Rows with random rounding
repeat for every seed in ``seeds``; deterministic roundings run once (seed = ``seed``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, resolve_device
from fieldprint.experiments.e5_train import read_bytes
from fieldprint.formats import FORMAT_IDS, ROUNDINGS, get_format, pow2, scale_exponent
from fieldprint.model import ATTENTION_BACKENDS, load_checkpoint, score_paged
from fieldprint.quant import dequantize, quantize

FORMATS = tuple(FORMAT_IDS)
RANDOM_ROUNDINGS = ("stochastic",)
KV_SCALES = ("page", "row")
KERNEL_FORMATS = ("bf16", "e4m3", "e5m2", "int8")  # values a bf16 cache holds exactly


@dataclass
class E5AccuracyConfig(ExperimentConfig):
    checkpoint: str = "results/smoke/e5_train/model.pt"
    valid_path: str = "data/corpus/valid.txt"
    # language-model evaluation
    anchor_bytes: int = 32  # the anchor prologue: the first anchor_bytes bytes of valid_path
    window: int = 96  # bytes predicted per window (anchor_bytes + window <= model context)
    eval_windows: int = 16
    batch: int = 8  # windows per serving call
    chunk: int = 32  # new tokens per window per call (chunked prefill)
    block_size: int = 16
    attention: str = "reference"
    kv_scale: str = "page"  # power-of-two scale per page (the commit protocol) or per row
    formats: list[str] = field(default_factory=lambda: [
        "bf16:rne", "fp16:rne", "e4m3:rne", "e4m3:trunc", "e4m3:stochastic", "e4m3:two_grid",
        "e5m2:rne", "e5m2:trunc", "e5m2:stochastic", "int8:rne", "int8:two_grid"])
    anchors_quantized: list[bool] = field(default_factory=lambda: [True, False])
    kernel_formats: list[str] = field(default_factory=list)  # also run through the kernel
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # synthetic attention error
    attn_batch: int = 4
    attn_context: int = 256
    attn_anchors: int = 64
    attn_queries: int = 4  # query tokens per sequence (the last ones of its context)
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    threads: int = 0  # CPU threads for torch (0: torch's default)

    def validate(self) -> None:
        super().validate()
        for name in ("window", "eval_windows", "batch", "chunk", "block_size", "attn_batch",
                     "attn_context", "attn_queries", "heads_q", "heads_kv", "head_dim"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
        check(self.anchor_bytes >= 0, f"anchor_bytes must be >= 0, got {self.anchor_bytes}")
        check(self.attn_anchors >= 0, f"attn_anchors must be >= 0, got {self.attn_anchors}")
        check(self.attn_queries <= self.attn_context,
              f"attn_queries ({self.attn_queries}) must be <= attn_context ({self.attn_context})")
        check(self.heads_q % self.heads_kv == 0,
              f"heads_q ({self.heads_q}) must be a multiple of heads_kv ({self.heads_kv})")
        check(self.attention in ATTENTION_BACKENDS,
              f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        check(self.kv_scale in KV_SCALES, f"kv_scale must be one of {KV_SCALES}, got {self.kv_scale!r}")
        if self.kv_scale == "page":
            for name in ("anchor_bytes", "window", "chunk"):
                check(getattr(self, name) % self.block_size == 0,
                      f"kv_scale='page' writes whole pages: {name} ({getattr(self, name)}) must be a "
                      f"multiple of block_size ({self.block_size})")
        check(len(self.formats) > 0, "formats must not be empty")
        for item in self.formats:
            parse_format(item)
        check(len(set(self.formats)) == len(self.formats), f"formats has duplicates: {self.formats}")
        for item in self.kernel_formats:
            check(parse_format(item)[0] in KERNEL_FORMATS,
                  f"kernel_formats entry {item!r}: the kernel's bf16 cache holds only {KERNEL_FORMATS} exactly")
        check(self.attention != "kernel",
              "attention='kernel' cannot hold the float32 reference; use 'naive' or 'reference' "
              "and list the formats to run through the kernel in kernel_formats")
        check(len(self.anchors_quantized) > 0, "anchors_quantized must not be empty")
        check(all(isinstance(a, bool) for a in self.anchors_quantized),
              f"anchors_quantized must hold booleans, got {self.anchors_quantized}")
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
              f"seeds must be non-empty and distinct, got {self.seeds}")
        check(self.threads >= 0, f"threads must be >= 0, got {self.threads}")


def parse_format(item: str) -> tuple[str, str]:
    """'e4m3:rne' -> ('e4m3', 'rne'); anything else is a ValueError naming the entry."""
    fmt, sep, rounding = str(item).partition(":")
    if not sep or fmt not in FORMATS or rounding not in ROUNDINGS:
        raise ValueError(f"formats entry {item!r} must be 'fmt:rounding' with fmt in {FORMATS} "
                         f"and rounding in {ROUNDINGS}")
    return fmt, rounding


def row_scale(x: torch.Tensor, fmt: str) -> torch.Tensor | None:
    """Per-row power-of-two scale for fp8/int8: x: [..., D] -> [..., 1] float32, the smallest
    ``2**k`` with ``amax(|row|) <= fmax * 2**k`` (`fieldprint.formats.scale_exponent`, the rule
    ``quantize`` applies per tensor); None for bf16/fp16, which store unscaled."""
    if not get_format(fmt).scaled:
        return None
    return pow2(scale_exponent(x.detach().abs().amax(-1, keepdim=True), fmt))


def round_trip(x: torch.Tensor, fmt: str, rounding: str, seed: int,
               page_tokens: int | None = None) -> torch.Tensor:
    """x: [T, H, D] -> the float32 values a cache in (fmt, rounding) holds for x, with one scale
    per (token, head) row, or per page of ``page_tokens`` consecutive tokens (T a multiple)."""
    if page_tokens is not None:
        if x.shape[0] % page_tokens:
            raise ValueError(f"{x.shape[0]} tokens are not whole pages of {page_tokens}")
        groups = x.reshape(x.shape[0] // page_tokens, -1)  # [pages, page_tokens * H * D]
    else:
        groups = x
    qt = quantize(groups.float(), fmt, rounding, scale=row_scale(groups, fmt),
                  seed=seed if rounding in RANDOM_ROUNDINGS else None)
    return dequantize(qt).to(torch.float32).reshape(x.shape)


def kv_store(fmt: str, rounding: str, seed: int, page_tokens: int | None = None):
    """A ``store`` for :func:`score_paged`: each write gets its own derived seed. With
    ``page_tokens``, every write must hold whole pages, sequence after sequence."""
    writes = 0

    def store(x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        nonlocal writes
        writes += 1
        return round_trip(x, fmt, rounding, seed * 1_000_003 + writes, page_tokens)

    return store


def lm_windows(cfg: E5AccuracyConfig, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor prologue [A] and the evaluated windows [N, window + 1] (int64 bytes)."""
    if cfg.anchor_bytes + cfg.window > context:
        raise ValueError(f"anchor_bytes ({cfg.anchor_bytes}) + window ({cfg.window}) exceed the "
                         f"model context ({context})")
    text = read_bytes(cfg.valid_path, "valid_path").long()
    anchor, rest = text[:cfg.anchor_bytes], text[cfg.anchor_bytes:]
    length = cfg.window + 1
    if rest.numel() < length:
        raise ValueError(f"valid_path has {text.numel()} bytes, too few for the anchor and one window")
    starts = torch.linspace(0, rest.numel() - length, cfg.eval_windows).long()
    return anchor, rest[starts[:, None] + torch.arange(length)]


def _runs(cfg: E5AccuracyConfig, formats: list[str]):
    """(fmt, rounding, anchors_quantized, seed) of every non-reference row."""
    for item in formats:
        fmt, rounding = parse_format(item)
        for aq in cfg.anchors_quantized:
            for seed in (cfg.seeds if rounding in RANDOM_ROUNDINGS else [cfg.seed]):
                yield fmt, rounding, aq, seed


def _bits(fmt: str, rounding: str) -> int:
    return get_format(fmt).bits + (rounding == "two_grid")  # the helper bit is stored too


def lm_rows(cfg: E5AccuracyConfig, device: str) -> list[dict]:
    model, trained = load_checkpoint(cfg.checkpoint, device)
    digest = hashlib.sha256(Path(cfg.checkpoint).read_bytes()).hexdigest()
    about = {"checkpoint_sha256": digest[:16],  # ties these rows to one checkpoint
             "params": sum(p.numel() for p in model.parameters()),
             "train_steps": trained["final"].get("step", ""),
             "train_val_bpb": trained["final"].get("val_bpb", "")}
    anchor, windows = lm_windows(cfg, model.cfg.context)
    n_bytes = windows[:, 1:].numel()

    def score(store=None, anchor_store=None, attention=cfg.attention) -> float:
        nats = score_paged(model, anchor, windows, batch=cfg.batch, chunk=cfg.chunk,
                           block_size=cfg.block_size, store=store, anchor_store=anchor_store,
                           attention=attention, seed=cfg.seed,
                           cache_dtype=torch.bfloat16 if attention == "kernel" else torch.float32)
        return float(nats.sum())

    def row(fmt, rounding, aq, seed, attention, nats) -> dict:
        bits = 32 if fmt == "reference" else _bits(fmt, rounding)
        return {"kind": "lm", "fmt": fmt, "rounding": rounding, "anchors_quantized": aq,
                "seed": seed, "attention": attention, "kv_scale": cfg.kv_scale, "bits": bits,
                "n_bytes": n_bytes,
                "nats": nats, "bpb": nats / n_bytes / math.log(2), "rel_err": "", **about}

    rows = [row("reference", "none", False, cfg.seed, cfg.attention, score())]
    for formats, attention in ((cfg.formats, cfg.attention), (cfg.kernel_formats, "kernel")):
        for fmt, rounding, aq, seed in _runs(cfg, formats):
            store = kv_store(fmt, rounding, seed, cfg.block_size if cfg.kv_scale == "page" else None)
            nats = score(store, store if aq else None, attention)
            rows.append(row(fmt, rounding, aq, seed, attention, nats))
    return rows


def synthetic_attention_inputs(cfg: E5AccuracyConfig, device: str) -> dict:
    """Float64 paged inputs of ``reference_attention`` at cfg's shapes: every sequence has its
    own context blocks and shares the anchor blocks. Returns the arguments and the anchor
    slots (so that the anchors can be stored apart)."""
    g = torch.Generator().manual_seed(cfg.seed)
    bs, B, L, A = 16, cfg.attn_batch, cfg.attn_context, cfg.attn_anchors
    ctx_blocks, anchor_blocks = -(-L // bs), -(-A // bs)
    num_blocks = anchor_blocks + B * ctx_blocks
    shape = (num_blocks, bs, cfg.heads_kv, cfg.head_dim)
    channel = torch.exp(0.5 * torch.randn(cfg.heads_kv, cfg.head_dim, generator=g, dtype=torch.float64))
    k = torch.randn(shape, generator=g, dtype=torch.float64) * channel
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    ids = torch.randperm(num_blocks, generator=g)
    anchor_ids, ctx_ids = ids[:anchor_blocks], ids[anchor_blocks:].view(B, ctx_blocks)
    i32 = dict(dtype=torch.int32, device=device)
    T = B * cfg.attn_queries
    return {
        "q": torch.randn(T, cfg.heads_q, cfg.head_dim, generator=g, dtype=torch.float64).to(device),
        "k_cache": k.to(device), "v_cache": v.to(device),
        "block_table": ctx_ids.to(**i32),
        "seq_lens": torch.full((B,), L, **i32),
        "query_start_loc": torch.arange(0, T + 1, cfg.attn_queries, **i32),
        "anchor_block_table": anchor_ids.expand(B, -1).contiguous().to(**i32) if A else None,
        "anchor_lens": torch.full((B,), A, **i32) if A else None,
        "anchor_ids": anchor_ids.to(device),
    }


def attention_rows(cfg: E5AccuracyConfig, device: str) -> list[dict]:
    from fieldprint.attention import reference_attention

    args = synthetic_attention_inputs(cfg, device)
    anchor_ids = args.pop("anchor_ids")
    ref = reference_attention(**args)
    is_anchor = torch.zeros(args["k_cache"].shape[0], dtype=torch.bool, device=device)
    is_anchor[anchor_ids] = True
    rows = []
    for fmt, rounding, aq, seed in _runs(cfg, cfg.formats):
        stored = {}
        for i, name in enumerate(("k_cache", "v_cache")):
            x = args[name]
            flat = x.flatten(0, 1)  # [blocks * block_size, Hkv, D]
            pages = x.shape[1] if cfg.kv_scale == "page" else None
            y = round_trip(flat, fmt, rounding, seed * 1_000_003 + i, pages).view(x.shape).to(x.dtype)
            stored[name] = y if aq else torch.where(is_anchor[:, None, None, None], x, y)
        out = reference_attention(**{**args, **stored})
        rel = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
        rows.append({"kind": "attention", "fmt": fmt, "rounding": rounding,
                     "anchors_quantized": aq, "seed": seed, "attention": "reference",
                     "kv_scale": cfg.kv_scale,
                     "bits": _bits(fmt, rounding),
                     "n_bytes": "", "nats": "", "bpb": "", "rel_err": rel})
    return rows


def run(cfg: E5AccuracyConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    check(Path(cfg.checkpoint).is_file(), f"checkpoint={cfg.checkpoint!r} is not a file (run e5_train)")
    return lm_rows(cfg, device) + attention_rows(cfg, device)


if __name__ == "__main__":
    hydra_main("e5_accuracy", E5AccuracyConfig, run)
