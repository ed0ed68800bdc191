"""E4 (recomputation): do page digests survive an honest recomputation through a real model?

A *prover* serves ``batch`` sequences that share an anchor (a system prompt) on
:mod:`fieldprint.model` + :class:`fieldprint.cache.PagedKVCache`: the anchor is prefilled once
into pinned pages, the prompts (ragged lengths) are prefilled together in chunks of ``chunk``
tokens, then every sequence decodes ``decode_steps`` greedy tokens, one step for all. Its pages
are what it commits to: every anchor page and every complete page of each sequence, per layer,
K and V (the leaves of :mod:`fieldprint.commit_pages`).

A *verifier* knows the tokens and recomputes the K/V of every committed page under a scenario:

* ``same_stack``: the prover's schedule again (the control);
* ``batch_order``: one sequence at a time, last first (another batch composition and order);
* ``chunk``: the prompts in chunks of ``chunk // 2`` tokens, then the same decode steps;
* ``full_prefill``: prompt and generated tokens of each sequence in one prefill, in chunks of
  ``chunk`` (how a verifier naturally re-prefills: the generated tokens' K/V then come from the
  kernel's prefill mode instead of its decode mode);
* ``prefix_hit``: the anchor's pages reused from the prover (a prefix-cache hit), the rest as in
  ``same_stack``;
* ``cold_prefix``: no shared anchor: each sequence prefills anchor and prompt as its own context
  (a cold run without prefix caching); tokens keep their positions;
* ``reference``: the reference attention backend instead of the fused kernel (another stack);
* ``split_kv``: the kernel with another split-KV length in decode;
* ``cpu``: the verifier on the CPU (reference attention), when the prover ran on a GPU.

Every scenario runs with prover and verifier in the model's default mode and in batch-invariant
mode (``Transformer.set_batch_invariant``). For each scenario, format and rounding, layer and K/V:
``pages`` committed, ``bitwise`` pages whose recomputed values are bit-identical, ``matched`` pages
whose verifier leaf digest equals the prover's (two_grid: the verifier quantizes with the
committed scale and helper bits, as verification does; other roundings: its own quantization of its
own values), and ``max_over_bound``: the largest |x' - x| over any element of those pages, in units
of the two-grid bound (a quarter of the local code spacing under the committed scale).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from fieldprint.commit_pages import quantize_pages
from fieldprint.decode import GraphDecoder
from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, resolve_device
from fieldprint.formats import FORMATS, ROUNDINGS, get_format
from fieldprint.hashing import blake3_many
from fieldprint.leaf import LeafSpec, header_rows, leaf_bytes
from fieldprint.merkle import LEAF_KEY
from fieldprint.model import Transformer, forward_sequences, prefill_anchor
from fieldprint.quant import code_bytes, code_spacing, quantize
from fieldprint.smollm2 import load_model, load_tokenizer
from fieldprint.timing import quartiles

MODEL = "SmolLM2-135M-Instruct"
SCENARIOS = ("same_stack", "batch_order", "chunk", "full_prefill", "prefix_hit", "cold_prefix", "reference",
             "split_kv", "cpu")
MODES = ("default", "batch_invariant")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class E4RecomputeConfig(ExperimentConfig):
    gguf: str = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    layers: int = 0  # 0: every layer of SmolLM2; n: its first n layers (smoke runs)
    text_path: str = "data/corpus/valid.txt"
    anchor_tokens: int = 40
    prompt_tokens: list[int] = field(default_factory=lambda: [23, 37, 50])
    decode_steps: int = 8
    chunk: int = 32
    block_size: int = 16
    split_tokens: int = 256  # split-KV length of the split_kv scenario (the kernel's default: 512)
    dtype: str = "bfloat16"
    formats: list[str] = field(default_factory=lambda: ["e4m3:rne", "e4m3:two_grid", "e5m2:two_grid",
                                                        "int8:rne", "bf16:rne"])
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    reps: int = 5  # timed repetitions of the cost of each mode (GPU only)

    def validate(self) -> None:
        super().validate()
        check(self.layers >= 0, "layers must be >= 0 (0: all)")
        check(self.anchor_tokens > 0 and self.decode_steps > 0 and self.chunk > 1,
              "anchor_tokens and decode_steps must be > 0, chunk > 1")
        check(len(self.prompt_tokens) > 0 and all(n > 0 for n in self.prompt_tokens),
              "prompt_tokens must list positive lengths")
        check(self.block_size in (16, 32, 64, 128), "block_size must be 16, 32, 64 or 128 (the kernel's pages)")
        check(self.split_tokens > 0 and self.split_tokens & (self.split_tokens - 1) == 0,
              "split_tokens must be a power of two")
        check(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}")
        for item in self.formats:
            fmt, _, rounding = item.partition(":")
            check(fmt in FORMATS and rounding in ROUNDINGS and rounding != "stochastic",
                  f"formats entries are fmt:rounding with fmt in {FORMATS} and a deterministic rounding, "
                  f"got {item!r}")
        check(len(self.scenarios) > 0 and set(self.scenarios) <= set(SCENARIOS), f"scenarios must be in {SCENARIOS}")
        check(len(self.modes) > 0 and set(self.modes) <= set(MODES), f"modes must be in {MODES}")
        check(self.reps > 0, "reps must be > 0")


@dataclass
class Texts:
    """Token ids of one run: the anchor [A], each sequence's prompt, and its decode inputs (the
    tokens fed one per step; the first is the prover's greedy pick after the prompt)."""

    anchor: torch.Tensor
    prompts: list[torch.Tensor]
    decoded: list[torch.Tensor]


@dataclass
class Schedule:
    """How a run computes the K/V: the order and grouping of sequences, the prefill chunk, whether
    generated tokens are decoded one per step or prefilled, and the anchor's origin."""

    order: list[int]
    group: int
    chunk: int
    decode: bool = True
    anchor: str = "prefill"  # "prefill" (pinned, shared), "reuse" (the prover's pages), "none"
    attention: str = "kernel"
    kernel_options: dict | None = None


@dataclass
class KV:
    """Recomputed K/V per token: anchor [L, 2, A, Hkv, D] and one [L, 2, n_i, Hkv, D] per sequence
    (its own tokens: prompt, then decode inputs)."""

    anchor: torch.Tensor
    seqs: list[torch.Tensor]


def _token_kv(cache, blocks: list[int], n: int) -> torch.Tensor:
    """Tokens 0..n-1 stored in ``blocks``: [L, 2, n, Hkv, D]."""
    t = torch.arange(n, device=cache.device)
    page = torch.tensor(blocks, device=cache.device)[t // cache.block_size]
    off = t % cache.block_size
    return torch.stack([cache.k[:, page, off], cache.v[:, page, off]], dim=1)


def run_schedule(model: Transformer, texts: Texts, sched: Schedule, block_size: int, *,
                 generate: int = 0, anchor_kv: torch.Tensor | None = None) -> KV:
    """Run the sequences of ``texts`` through ``model`` as ``sched`` says (``anchor_kv`` [L, 2, A,
    Hkv, D]: the pages a prefix hit reuses). With ``generate=n``, ``texts.decoded`` is filled with
    n greedy picks per sequence as they are decoded: the prover's run."""
    dev = model.embed.weight.device
    steps = generate or len(texts.decoded[0])
    A, n = texts.anchor.numel(), len(texts.prompts)
    lead = texts.anchor.to(dev) if sched.anchor == "none" else texts.anchor[:0].to(dev)
    longest = lead.numel() + max(p.numel() for p in texts.prompts) + steps
    cache = model.new_cache(-(-A // block_size) + n * -(-longest // block_size), block_size, poison=True)
    opts = dict(attention=sched.attention, kernel_options=sched.kernel_options)
    anchor = None
    if sched.anchor == "prefill":
        anchor = prefill_anchor(model, cache, texts.anchor.to(dev), **opts)
    elif sched.anchor == "reuse":
        anchor = cache.add_anchor(anchor_kv[:, 0].to(dev), anchor_kv[:, 1].to(dev))
    seqs: dict[int, int] = {}
    for start in range(0, n, sched.group):
        group = sched.order[start:start + sched.group]
        seqs.update((i, cache.add_sequence(anchor=anchor)) for i in group)
        feed = {i: torch.cat([lead, texts.prompts[i].to(dev)]
                             + ([] if sched.decode else [texts.decoded[i].to(dev)])) for i in group}
        done, last = dict.fromkeys(group, 0), {}
        while any(done[i] < feed[i].numel() for i in group):  # chunked prefill, ragged
            live = [i for i in group if done[i] < feed[i].numel()]
            counts = [min(sched.chunk, feed[i].numel() - done[i]) for i in live]
            toks = torch.cat([feed[i][done[i]:done[i] + c] for i, c in zip(live, counts, strict=True)])
            logits, _ = forward_sequences(model, cache, [seqs[i] for i in live], toks, counts, **opts)
            ends = torch.tensor(counts, device=dev).cumsum(0) - 1
            for i, c, row in zip(live, counts, logits[ends], strict=True):
                done[i], last[i] = done[i] + c, row
        if not sched.decode:
            continue
        picks = torch.stack([last[i].argmax() for i in group])
        for step in range(steps):  # one token of every sequence of the group per step
            if generate:
                for i, t in zip(group, picks.cpu(), strict=True):
                    texts.decoded[i] = torch.cat([texts.decoded[i], t.reshape(1)])
            toks = torch.stack([texts.decoded[i][step] for i in group]).to(dev)
            logits, _ = forward_sequences(model, cache, [seqs[i] for i in group], toks, [1] * len(group), **opts)
            picks = logits.argmax(-1)
    if anchor is not None:
        a = cache.anchors[anchor]
        anchor_out = _token_kv(cache, a.blocks, a.length)
    else:  # every sequence recomputed the anchor as its first tokens: take the first one's
        anchor_out = _token_kv(cache, cache.sequences[seqs[0]].blocks, A)
    own = []
    for i in range(n):
        s = cache.sequences[seqs[i]]
        own.append(_token_kv(cache, s.blocks, s.length)[:, :, lead.numel():])
    return KV(anchor_out, own)


def pages(kv: KV, block_size: int) -> torch.Tensor:
    """The committed pages of a run in a fixed order, per layer and K/V: [L, 2, P, S * Hkv * D]
    float32. Anchor pages first (the last one zero-padded, as the committer pads it), then each
    sequence's complete pages; a page holds tokens [i S, (i + 1) S) of its owner."""
    def split(x: torch.Tensor, pad: bool) -> torch.Tensor:  # [L, 2, n, H, D] -> [L, 2, pages, S*H*D]
        n = x.shape[2]
        full = -(-n // block_size) if pad else n // block_size
        x = x[:, :, :full * block_size]
        if x.shape[2] < full * block_size:
            x = torch.cat([x, x.new_zeros(*x.shape[:2], full * block_size - x.shape[2], *x.shape[3:])], 2)
        return x.reshape(*x.shape[:2], full, block_size * x.shape[3] * x.shape[4])

    return torch.cat([split(kv.anchor, True)] + [split(x, False) for x in kv.seqs], dim=2).float()


def compare(prover: torch.Tensor, verifier: torch.Tensor, fmt: str, rounding: str) -> dict[str, float]:
    """Pages ``[P, E]`` of one layer and K/V, as the prover committed them and as the verifier
    recomputed them: ``pages``, ``bitwise``, ``matched`` (leaf digests equal) and
    ``max_over_bound`` (see the module doc)."""
    P, E = prover.shape
    spec = LeafSpec(fmt=fmt, rounding=rounding, elems=E)
    header = header_rows(spec, list(range(P)), [0] * P, ["k"] * P).to(prover.device)
    codes, helper, scale, _ = quantize_pages(prover, fmt, rounding)
    if rounding == "two_grid":  # the verifier's side of two_grid: committed scale and helper bits
        qt = quantize(verifier, fmt, "two_grid", helper=helper.reshape(-1), scale=scale, backend="torch")
        v_codes, v_helper, v_scale = code_bytes(qt.codes.reshape(P, -1)), helper, scale
    else:
        v_codes, v_helper, v_scale, _ = quantize_pages(verifier, fmt, rounding)
    mine = blake3_many(leaf_bytes(spec, header, codes, scale, helper), key=LEAF_KEY)
    theirs = blake3_many(leaf_bytes(spec, header, v_codes, v_scale, v_helper), key=LEAF_KEY)
    bound = code_spacing(prover, fmt, scale=scale if get_format(fmt).scaled else None) / 4
    over = ((verifier.double() - prover.double()).abs() / bound).max()
    return {"pages": P, "bitwise": int((verifier == prover).all(-1).sum()),
            "matched": int((mine == theirs).all(-1).sum()), "max_over_bound": float(over)}


def scenario_schedule(name: str, cfg: E4RecomputeConfig, n: int) -> Schedule:
    """The verifier's schedule of scenario ``name`` (see the module doc); the prover's is
    ``same_stack``."""
    base = Schedule(order=list(range(n)), group=n, chunk=cfg.chunk)
    return {
        "same_stack": base,
        "batch_order": dataclasses.replace(base, order=list(range(n))[::-1], group=1),
        "chunk": dataclasses.replace(base, chunk=cfg.chunk // 2),
        "full_prefill": dataclasses.replace(base, decode=False),
        "prefix_hit": dataclasses.replace(base, anchor="reuse"),
        "cold_prefix": dataclasses.replace(base, anchor="none"),
        "reference": dataclasses.replace(base, attention="reference"),
        "split_kv": dataclasses.replace(base, kernel_options={"kv_split_tokens": cfg.split_tokens}),
        "cpu": dataclasses.replace(base, attention="reference"),
    }[name]


def texts_of(cfg: E4RecomputeConfig, tokenizer) -> Texts:
    """The anchor and the prompts: consecutive slices of the tokenized validation text."""
    with open(cfg.text_path, encoding="utf-8") as f:
        ids = tokenizer(f.read(200_000))["input_ids"]
    need = cfg.anchor_tokens + sum(cfg.prompt_tokens)
    if len(ids) < need:
        raise ValueError(f"text_path {cfg.text_path!r} gives {len(ids)} tokens, {need} needed")
    ids = torch.tensor(ids[:need], dtype=torch.int64)
    cuts = torch.tensor([cfg.anchor_tokens, *cfg.prompt_tokens]).cumsum(0).tolist()
    prompts = [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return Texts(ids[:cfg.anchor_tokens], prompts, [ids[:0] for _ in prompts])


def run(cfg: E4RecomputeConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    model = load_model(cfg.gguf, dtype=DTYPES[cfg.dtype], device=device)
    if cfg.layers:  # the first layers of the real model: a smoke run's stand-in
        model.blocks = model.blocks[:cfg.layers]
        model.cfg = dataclasses.replace(model.cfg, n_layer=cfg.layers)
    texts0 = texts_of(cfg, load_tokenizer(cfg.gguf))
    n, bs = len(texts0.prompts), cfg.block_size
    rows: list[dict] = []
    for mode in cfg.modes:
        model.set_batch_invariant(mode == "batch_invariant")
        texts = dataclasses.replace(texts0, decoded=list(texts0.decoded))
        prover = run_schedule(model, texts, scenario_schedule("same_stack", cfg, n), bs, generate=cfg.decode_steps)
        committed = pages(prover, bs)
        for scenario in cfg.scenarios:
            verifier_device = "cpu" if scenario == "cpu" else device
            if scenario == "cpu" and (device == "cpu" or mode == "batch_invariant"):
                # a CPU prover has no other device; batch-invariant kernels on a CPU need the
                # Triton interpreter, which a GPU process cannot switch on
                continue
            vmodel = model
            if scenario == "cpu":
                vmodel = Transformer(model.cfg)
                vmodel.load_state_dict(model.state_dict())
                vmodel = vmodel.to(DTYPES[cfg.dtype]).eval()
            kv = run_schedule(vmodel, texts, scenario_schedule(scenario, cfg, n), bs, anchor_kv=prover.anchor)
            recomputed = pages(kv, bs).to(committed.device)
            for layer in range(model.cfg.n_layer):
                for k, kind in enumerate("kv"):
                    for item in cfg.formats:
                        fmt, _, rounding = item.partition(":")
                        rows.append({"measure": "recompute", "model": MODEL, "mode": mode, "scenario": scenario,
                                     "fmt": fmt, "rounding": rounding, "layer": layer, "kind": kind,
                                     **compare(committed[layer, k], recomputed[layer, k], fmt, rounding),
                                     "device": device, "verifier_device": verifier_device})
    return rows + cost_rows(cfg, model, texts0, device)


def cost_rows(cfg: E4RecomputeConfig, model: Transformer, texts: Texts, device: str) -> list[dict]:
    """What each mode costs (on a GPU; none on a CPU): one batched prefill of every prompt
    (behind the anchor) and a decode step of every sequence replayed from a CUDA graph
    (:class:`GraphDecoder`), ``reps`` repetitions with the modes interleaved after an untimed
    round (compiles, captures); median and quartiles in milliseconds."""
    if device != "cuda":
        return []
    n, bs = len(texts.prompts), cfg.block_size
    counts = [p.numel() for p in texts.prompts]
    width = -(-(max(counts) + 4 * cfg.decode_steps) // bs)
    times = {(m, what): [] for m in cfg.modes for what in ("prefill", "decode")}
    for rep in range(cfg.reps + 1):
        for mode in cfg.modes:
            model.set_batch_invariant(mode == "batch_invariant")
            cache = model.new_cache(-(-texts.anchor.numel() // bs) + n * width + 1, bs)
            anchor = prefill_anchor(model, cache, texts.anchor.cuda(), attention="kernel")
            seqs = [cache.add_sequence(anchor=anchor) for _ in range(n)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits, _ = forward_sequences(model, cache, seqs, torch.cat(texts.prompts).cuda(), counts,
                                          attention="kernel")
            torch.cuda.synchronize()
            prefill = (time.perf_counter() - t0) * 1e3
            decoder = GraphDecoder(model, cache, max_batch=n, max_blocks=width, buckets=[n],
                                   max_anchor_blocks=-(-texts.anchor.numel() // bs))
            tokens = logits[torch.tensor(counts).cumsum(0).cuda() - 1].argmax(-1)
            for _ in range(2):  # capture, then one replay
                tokens, _ = decoder.step(seqs, tokens)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(cfg.decode_steps):
                tokens, _ = decoder.step(seqs, tokens)
            torch.cuda.synchronize()
            if rep:  # the first round is untimed
                times[(mode, "prefill")].append(prefill)
                times[(mode, "decode")].append((time.perf_counter() - t0) * 1e3 / cfg.decode_steps)
    rows = []
    for (mode, what), t in times.items():
        q1, med, q3 = quartiles(t)
        rows.append({"measure": "cost", "model": MODEL, "mode": mode, "what": what, "batch": n,
                     "tokens": sum(counts) if what == "prefill" else n, "reps": cfg.reps,
                     "ms": round(med, 4), "ms_q1": round(q1, 4), "ms_q3": round(q3, 4), "device": device})
    return rows


if __name__ == "__main__":
    hydra_main("e4_recompute", E4RecomputeConfig, run)
