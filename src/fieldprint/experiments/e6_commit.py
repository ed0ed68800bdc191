"""E6: commit-boundary verification in a decode loop: its cost, and tamper detection.

The project's model (:class:`fieldprint.model.Transformer`, Llama architecture) with random
weights at the configured width runs batched greedy decode steps over a :class:`PagedKVCache`
with a shared pinned anchor, through :func:`fieldprint.model.forward_sequences`: the same serving
path as every other experiment (attention through the fused kernel, or ``reference_attention``
with ``attention=reference``). The weights are random: the work and the bytes moved are those of
a real model of this shape, the tokens are meaningless. The anchor and every sequence's context
are prefilled through the model (random tokens) before the timed loops.

For every batch size (``batches``), verification mode (``fieldprint.commit.MODES``) and commit
interval the loop of ``steps`` decode steps is timed from a synchronized start to a synchronized end
(the last asynchronous commit included), with the garbage collector off, repeated ``reps`` times in
interleaved order after one untimed pass of every configuration (compiles, graph captures); each
row reports the median, quartiles, min and max over the repetitions. ``overhead`` is
``ms_per_step / ms_per_step(none) - 1`` from the same run (``overhead_q1``/``_q3`` from the
quartiles). With ``graphs`` the decode steps replay CUDA graphs (:class:`GraphDecoder`), the
baseline a serving engine has; ``sync`` adds the per-step host synchronization of sampling. Per
commit: ``commit_host_ms``, the median host time of the ``Committer.step`` calls that committed,
and ``launches_per_commit``, the kernel launches of one boundary commit (profiled, untimed).
Before each timed loop the cache is cut back to the prefilled context, and in the commit modes the
prefilled pages and anchors are committed untimed, so the tree the loop extends has the size of a
real one.
The per-step modes and ``none`` do not depend on the interval: their rows carry ``interval=1``.
Sequence b starts with ``context - b % block_size`` tokens, so pages seal at different steps.

Then the tamper check: a ``commit_sync`` committer over the final cache; each trial flips one
random bit of one stored page leaf (context or anchor page; header, codes, scale, helper bits or
padding), verifies, and restores the bit. Each leaf is the K or V half of a page in one layer
(``fieldprint.merkle`` page-leaf layout). ``detected``: the recomputed root differs from the
committed one; ``localized``: the Merkle proofs fail for exactly the tampered leaf.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit import COMMIT_MODES, MODES, Committer
from fieldprint.decode import GraphDecoder
from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, progress, resolve_device
from fieldprint.model import ModelConfig, Transformer, forward_sequences, prefill_anchor
from fieldprint.timing import quartiles

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TAMPER_FIELDS = ("header", "codes", "scale", "helper", "padding")
COST_COMMITS = 6  # boundary commits per configuration behind launches_per_commit and commit_gpu_ms


@dataclass
class E6Config(ExperimentConfig):
    modes: list[str] = field(default_factory=lambda: list(MODES))
    intervals: list[int] = field(default_factory=lambda: [1, 4, 16])
    batches: list[int] = field(default_factory=lambda: [2])
    context: int = 48
    anchors: int = 8
    layers: int = 2
    hidden: int = 64
    heads_q: int = 4
    heads_kv: int = 2
    mlp: int = 128
    vocab: int = 256
    block_size: int = 4
    steps: int = 16
    warmup: int = 4
    reps: int = 1
    dtype: str = "float32"
    attention: str = "reference"
    graphs: bool = False  # decode steps replayed from CUDA graphs (fieldprint.decode.GraphDecoder)
    sync: bool = False  # copy each step's tokens to the host (the synchronization of sampling)
    fmt: str = "e4m3"
    rounding: str = "two_grid"
    tamper_trials: int = 16

    def validate(self) -> None:
        super().validate()
        check(len(self.modes) > 0 and all(m in MODES for m in self.modes), f"modes must be a subset of {MODES}")
        check("none" in self.modes, "modes must include 'none' (the baseline of the overhead)")
        check(len(self.intervals) > 0 and all(i > 0 for i in self.intervals), "intervals must be positive")
        check(all(self.steps % i == 0 for i in self.intervals), "steps must be a multiple of every interval")
        check(len(self.batches) > 0 and all(b > 0 for b in self.batches), "batches must list positive sizes")
        for name in ("context", "layers", "hidden", "heads_q", "heads_kv", "mlp", "vocab",
                     "block_size", "steps", "reps"):
            check(getattr(self, name) > 0, f"{name} must be positive")
        check(self.anchors >= 0 and self.warmup >= 0 and self.tamper_trials >= 0,
              "anchors, warmup and tamper_trials must be >= 0")
        check(self.heads_q % self.heads_kv == 0, "heads_q must be a multiple of heads_kv")
        check(self.hidden % self.heads_q == 0, "hidden must be a multiple of heads_q (head_dim = hidden / heads_q)")
        check(self.context >= self.block_size, "context must be at least one page (block_size)")
        check(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}")
        check(self.attention in ("kernel", "reference"), "attention must be 'kernel' or 'reference'")
        if self.attention == "kernel":  # what the fused kernel supports
            check(self.head_dim in (64, 128, 256),
                  "attention=kernel needs head_dim = hidden / heads_q of 64, 128 or 256")
            check(self.block_size in (16, 32, 64, 128), "attention=kernel needs block_size 16, 32, 64 or 128")
            check(self.dtype in ("bfloat16", "float16"), "attention=kernel needs dtype bfloat16 or float16")
        check(not self.graphs or (self.attention == "kernel" and self.device != "cpu"),
              "graphs=true needs attention=kernel on a CUDA device")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads_q

    def model_config(self) -> ModelConfig:
        decoded = max(self.warmup + self.steps, COST_COMMITS * max(self.intervals))  # see _run_batch
        return ModelConfig(n_layer=self.layers, d_model=self.hidden, n_head=self.heads_q, n_kv_head=self.heads_kv,
                           context=self.anchors + self.context + decoded, vocab_size=self.vocab, ffn_hidden=self.mlp)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _d2h_bytes_per_step(cfg: E6Config, batch: int, mode: str, commits: int, leaves: int) -> float:
    """Bytes each mode moves device-to-host per timed decode step (commit modes: one root per
    commit and one digest per new leaf, as counted in the run)."""
    if mode in COMMIT_MODES:
        return 32 * (commits + leaves) / cfg.steps
    kv = cfg.layers * batch * cfg.heads_kv * cfg.head_dim * 2 * torch.finfo(DTYPES[cfg.dtype]).bits // 8
    return {"none": 0.0, "per_step_copy_cpu": float(kv), "per_step_gpu": 32.0 * cfg.layers}[mode]


def _launches(fn) -> int | str:
    """CUDA kernel launches (graph launches included) that ``fn()`` issues; "" on a CPU."""
    if not torch.cuda.is_available():
        return ""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages()
               if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                            "cudaGraphLaunch"))


def run(cfg: E6Config) -> list[dict]:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the model's random weights
    model = Transformer(cfg.model_config()).to(device=device, dtype=DTYPES[cfg.dtype]).eval()
    rows: list[dict] = []
    progress("e6_commit", f"model built on {device}")
    for batch in cfg.batches:
        rows += _run_batch(cfg, model, batch, device)
    return rows


def _run_batch(cfg: E6Config, model: Transformer, batch: int, device: str) -> list[dict]:
    """Every mode and interval at one batch size, interleaved ``reps`` times; then the tamper trials."""
    gen = torch.Generator().manual_seed(cfg.seed + batch)
    S = cfg.block_size
    # room for the longest timed loop and for the boundary commits commit_costs measures
    max_len = cfg.context + max(cfg.warmup + cfg.steps, COST_COMMITS * max(cfg.intervals))
    cache = model.new_cache(batch * (-(-max_len // S)) + (-(-cfg.anchors // S)) + batch + 1, S)
    anchor = None
    if cfg.anchors:
        anchor = prefill_anchor(model, cache, torch.randint(cfg.vocab, (cfg.anchors,), generator=gen).to(device),
                                attention=cfg.attention)
    seqs = [cache.add_sequence(anchor=anchor) for _ in range(batch)]
    # Staggered lengths (context - b mod S), as in a real batch: pages of different sequences
    # seal at different steps, so short intervals commit a few pages often.
    lengths = {s: cfg.context - b % S for b, s in enumerate(seqs)}
    for s in seqs:  # the prefilled context, one sequence at a time (bounded activation memory)
        forward_sequences(model, cache, [s], torch.randint(cfg.vocab, (lengths[s],), generator=gen).to(device),
                          [lengths[s]], attention=cfg.attention)
    cache.take_sealed()
    progress("e6_commit", f"batch {batch}: context prefilled")
    tokens0 = torch.randint(cfg.vocab, (batch,), generator=gen).to(device)
    validated = False
    graph = GraphDecoder(model, cache, max_batch=batch, max_blocks=-(-max_len // S), buckets=[batch],
                         max_anchor_blocks=max(1, -(-cfg.anchors // S)), sync=cfg.sync) if cfg.graphs else None

    def decode(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy decode step of every sequence: next tokens [B] (on the device), slots [B]."""
        nonlocal validated
        if graph is not None:
            return graph.step(seqs, tokens)
        # The kernel's index checks read the tables on the host (a sync); the cache builds them,
        # so they are checked on the first step only and the loop never waits for the GPU.
        logits, slots = forward_sequences(model, cache, seqs, tokens, [1] * len(seqs),
                                          attention=cfg.attention, validate=not validated)
        validated = True
        next_tokens = logits.argmax(-1)
        if cfg.sync:
            next_tokens.cpu()
        return next_tokens, slots

    configs = [(m, 1) for m in cfg.modes if m not in COMMIT_MODES]
    configs += [(m, i) for m in cfg.modes if m in COMMIT_MODES for i in cfg.intervals]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    host_ms: dict[tuple[str, int], list[float]] = {c: [] for c in configs}  # host time of each commit
    commits: dict[tuple[str, int], int] = {}
    leaves: dict[tuple[str, int], int] = {}
    side = torch.cuda.Stream() if device == "cuda" else None  # shared: its memory pool is reused
    # every leaf a run commits (the prefix, anchors, every page the longest loop seals), so the
    # fused path's store never grows inside a timed loop
    capacity = 2 * cfg.layers * (batch * -(-max_len // S) + -(-cfg.anchors // S))

    def fresh_committer(mode: str, interval: int) -> Committer:
        """The cache cut back to the prefilled context and a committer over it; in the commit
        modes the prefix is committed (untimed), so a commit extends a tree of realistic size."""
        for s in seqs:
            cache.truncate(s, lengths[s])
        cache.take_sealed()
        committer = Committer(cache, mode=mode, interval=interval, fmt=cfg.fmt, rounding=cfg.rounding,
                              stream=side if mode == "commit_async" else None,
                              max_pages=batch * (-(-interval // S) + 1), capacity=capacity)
        if mode in COMMIT_MODES:
            committer.commit([p for s in seqs for p in cache.complete_pages(s)])
            committer.root()
        return committer

    def timed(mode: str, interval: int, steps: int = cfg.steps) -> Committer:
        committer = fresh_committer(mode, interval)
        x = tokens0
        for _ in range(cfg.warmup):
            x, slots = decode(x)
            committer.step(slots)
        if mode in COMMIT_MODES:
            committer.root()
        base_leaves, base_commits = len(committer.leaves), committer.commits
        _sync(device)
        gc.collect()
        gc.disable()  # no collector pause inside the timed loop
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                x, slots = decode(x)
                before, t1 = committer.commits, time.perf_counter()
                committer.step(slots)
                if committer.commits != before:
                    host_ms[(mode, interval)].append((time.perf_counter() - t1) * 1e3)
            if mode in COMMIT_MODES:
                committer.root()  # the last commit's root is on the host: its work is inside the time
            _sync(device)
            times[(mode, interval)].append((time.perf_counter() - t0) * 1e3 / steps)
        finally:
            gc.enable()
        commits[(mode, interval)] = committer.commits - base_commits
        leaves[(mode, interval)] = len(committer.leaves) - base_leaves
        committer.fence()
        return committer

    # one short untimed pass of every configuration first: lazy imports, allocator, kernel
    # compiles (every mode's Triton specializations), graph capture
    for mode, interval in configs:
        timed(mode, interval, steps=max(interval, cfg.warmup))
    for series in (*times.values(), *host_ms.values()):
        series.clear()
    progress("e6_commit", f"batch {batch}: every configuration warmed")
    for rep in range(cfg.reps):
        for mode, interval in configs:
            timed(mode, interval)
        progress("e6_commit", f"batch {batch}: repetition {rep + 1} of {cfg.reps} timed")
    def commit_costs(mode: str, interval: int) -> tuple[int | str, float | str, str]:
        """(kernel launches of one boundary commit, median GPU ms of the commit's work on its
        stream over ``COST_COMMITS`` boundaries, the commit path), untimed: each commit runs alone after a
        synchronization, between two events on the commit's stream."""
        committer = fresh_committer(mode, interval)
        stream = side if mode == "commit_async" else (torch.cuda.current_stream() if device == "cuda" else None)
        x, count, gpu_ms = tokens0, "", []
        for i in range(COST_COMMITS):
            for _ in range(interval):
                x, slots = decode(x)
                if committer.steps % interval != interval - 1:
                    committer.step(slots)
            if i == 0:
                count = _launches(lambda s=slots: (committer.step(s), committer.root()))
            elif stream is not None:
                _sync(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                committer.step(slots)
                end.record(stream)
                committer.root()
                _sync(device)
                gpu_ms.append(start.elapsed_time(end))
            else:
                committer.step(slots)
        committer.fence()
        return count, round(statistics.median(gpu_ms), 5) if gpu_ms else "", "fused" if committer.fused else "unfused"

    costs = {c: commit_costs(*c) for c in configs if c[0] in COMMIT_MODES}
    progress("e6_commit", f"batch {batch}: per-commit costs measured")

    base = statistics.median(times[("none", 1)])
    rows: list[dict] = []
    for mode, interval in configs:
        t = sorted(times[(mode, interval)])
        q1, ms, q3 = quartiles(t)
        h = host_ms[(mode, interval)]
        rows.append({
            "kind": "timing", "mode": mode, "interval": interval, "batch": batch,
            "context": cfg.context, "anchors": cfg.anchors, "layers": cfg.layers, "steps": cfg.steps,
            "reps": cfg.reps, "dtype": cfg.dtype, "attention": cfg.attention, "graphs": cfg.graphs,
            "sync": cfg.sync, "device": device,
            "ms_per_step": round(ms, 5), "ms_min": round(t[0], 5), "ms_q1": round(q1, 5), "ms_q3": round(q3, 5),
            "ms_max": round(t[-1], 5),
            "tokens_per_s": round(batch * 1e3 / ms, 2), "overhead": round(ms / base - 1, 5),
            "overhead_q1": round(q1 / base - 1, 5), "overhead_q3": round(q3 / base - 1, 5),
            "commits": commits[(mode, interval)],
            "commit_host_ms": round(statistics.median(h), 5) if h else "",
            "launches_per_commit": costs.get((mode, interval), ("", "", ""))[0],
            "commit_gpu_ms": costs.get((mode, interval), ("", "", ""))[1],
            "path": costs.get((mode, interval), ("", "", ""))[2],
            "d2h_bytes_per_step": round(
                _d2h_bytes_per_step(cfg, batch, mode, commits[(mode, interval)], leaves[(mode, interval)]), 2),
        })
    if batch == cfg.batches[0]:  # the tamper trials once, at the first batch size
        rows += _tamper(cfg, cache, seqs, batch, random.Random(cfg.seed))
        progress("e6_commit", f"batch {batch}: tamper trials done")
    return rows


def _tamper(cfg: E6Config, cache: PagedKVCache, seqs: list[int], batch: int, rng: random.Random) -> list[dict]:
    """Flip one random bit of a stored leaf per trial; verify; restore (see the module doc)."""
    if cfg.tamper_trials == 0:
        return []
    committer = Committer(cache, mode="commit_sync", interval=1, fmt=cfg.fmt, rounding=cfg.rounding)
    committer.commit([p for s in seqs for p in cache.complete_pages(s)])
    clean = committer.verify()
    by_target = {"context": [], "anchor": []}
    for i, leaf in enumerate(committer.leaves):
        by_target[leaf.page.kind].append(i)
    targets = [t for t in ("context", "anchor") if by_target[t]]
    results: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    for trial in range(cfg.tamper_trials):
        target = targets[trial % len(targets)]
        leaf = rng.choice(by_target[target])
        fields = {k: v for k, v in committer.row_fields(leaf).items() if k in TAMPER_FIELDS and v.numel()}
        name = rng.choice(sorted(fields))
        byte = rng.randrange(fields[name].numel())
        bit = 1 << rng.randrange(8)
        fields[name][byte] ^= bit
        res = committer.verify()
        fields[name][byte] ^= bit
        results.setdefault((target, name), []).append((not res.ok, res.tampered == [leaf]))
    after = committer.verify()
    rows = []
    for (target, name), outcomes in sorted(results.items()):
        rows.append({
            "kind": "tamper", "mode": "commit_sync", "target": target, "field": name,
            "flips": len(outcomes), "detected": sum(d for d, _ in outcomes),
            "localized": sum(loc for _, loc in outcomes), "leaves": len(committer.leaves),
            "false_positive": int(not clean.ok) + int(not after.ok),
            "batch": batch, "context": cfg.context, "layers": cfg.layers,
        })
    return rows


if __name__ == "__main__":
    hydra_main("e6_commit", E6Config, run)
