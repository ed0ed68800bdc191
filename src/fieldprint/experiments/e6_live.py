"""E6 (live): does a commitment bind the live cache? Tampering with the pages the kernel reads,
after a commit, against :meth:`fieldprint.commit.Committer.verify_live`.

A bf16 :class:`PagedKVCache` holds one pinned anchor of ``anchor_tokens`` tokens shared by
``sequences`` sequences of ``context`` tokens each. K/V are random with a realistic spread:
``randn`` times a per-(layer, K/V, head) scale and a per-channel scale, both log-uniform over
``2**±spread`` (heads and outlier channels of a trained model differ by orders of magnitude).
For every ``fmt:rounding`` in ``formats`` a ``commit_sync`` committer commits every complete
page (the anchor's pages and the sequences' sealed pages); then:

* ``flip``: per target (``anchor`` or ``context`` leaves) and bf16 bit position (15: sign,
  14..7: exponent, 6..0: mantissa), ``trials`` trials each flip that bit of one random valid
  element of one random leaf of the target in ``cache.k`` / ``cache.v``, run ``verify_live``
  and restore the bit. ``detected``: the result is not ok; ``localized``: the reported tampered
  leaves are exactly the flipped one. A flip below the format's tolerance (a low mantissa bit
  of a small element) is by construction not detected: the commitment binds the quantized page.
* ``swap``: per trial, the entry of one anchor page (in turn) in the cache's anchor table is
  pointed at a random sequence's page; ``remap``: per trial, one block-table entry of a random
  sequence (and the kernel's int32 mirror of it) is pointed at another sequence's page. ``localized``: the
  reported leaves are exactly the remapped page's (every layer, K and V).
* ``honest``: ``verify_live`` on the untouched cache after the commit and after every bit
  position's trials (the bits restored); the row's ``trials`` counts these checks and ``detected``
  the false alarms.

The hash and quantization run on the Committer's ``auto`` backends (CUDA: Triton; CPU: the
``blake3`` package and torch), so a CPU run needs no Triton interpreter. The outcome depends on
the values only, not on the hardware.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit import ROUNDINGS, Committer
from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, resolve_device
from fieldprint.formats import FORMATS

BF16_BITS = 16
SIGN_BIT, EXPONENT_BITS = 15, range(7, 15)  # bf16: 1 sign, 8 exponent, 7 mantissa bits
TARGETS = ("anchor", "context")


def bit_part(bit: int) -> str:
    """'sign', 'exponent' or 'mantissa': the field of bf16 bit ``bit`` (0 = lowest mantissa bit)."""
    return "sign" if bit == SIGN_BIT else "exponent" if bit in EXPONENT_BITS else "mantissa"


@dataclass
class E6LiveConfig(ExperimentConfig):
    formats: list[str] = field(default_factory=lambda: ["e4m3:rne", "e4m3:two_grid", "e5m2:two_grid",
                                                        "int8:rne", "bf16:rne"])
    layers: int = 2
    heads_kv: int = 2
    head_dim: int = 32
    block_size: int = 16
    anchor_tokens: int = 24  # the last anchor page is partial (anchors pin whole pages)
    sequences: int = 2
    context: int = 32
    spread: float = 3.0  # per-head and per-channel scales are 2**U(-spread, spread)
    trials: int = 8  # per (target, format, bit), and swaps and remaps per format

    def validate(self) -> None:
        super().validate()
        check(len(self.formats) > 0, "formats must list at least one fmt:rounding")
        for item in self.formats:
            fmt, _, rounding = item.partition(":")
            check(fmt in FORMATS and rounding in ROUNDINGS,
                  f"formats: {item!r} must be fmt:rounding with fmt in {list(FORMATS)} and rounding in {ROUNDINGS}")
        check(len(set(self.formats)) == len(self.formats), "formats must not repeat an entry")
        for name in ("layers", "heads_kv", "head_dim", "block_size", "anchor_tokens", "trials"):
            check(getattr(self, name) > 0, f"{name} must be positive")
        check(self.sequences >= 2, "sequences must be >= 2 (a remap points a page at another sequence's)")
        check(self.context >= self.block_size, "context must be at least one page (block_size)")
        check((self.heads_kv * self.head_dim) % 8 == 0, "heads_kv * head_dim must be a multiple of 8")
        check(self.spread >= 0, "spread must be >= 0")


def build_cache(cfg: E6LiveConfig, device: str) -> tuple[PagedKVCache, int, list[int]]:
    """The bf16 cache of the module doc: (cache, anchor id, sequence ids)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    L, H, D = cfg.layers, cfg.heads_kv, cfg.head_dim

    def values(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[L, tokens, H, D]`` with the per-head and per-channel spread."""
        out = []
        for _ in ("k", "v"):
            head = 2 ** ((torch.rand(L, 1, H, 1, generator=gen) * 2 - 1) * cfg.spread)
            channel = 2 ** ((torch.rand(L, 1, 1, D, generator=gen) * 2 - 1) * cfg.spread)
            out.append(torch.randn(L, tokens, H, D, generator=gen) * head * channel)
        return out[0], out[1]

    pages = -(-cfg.anchor_tokens // cfg.block_size) + cfg.sequences * (-(-cfg.context // cfg.block_size))
    cache = PagedKVCache(L, pages + 1, cfg.block_size, H, D, dtype=torch.bfloat16, device=device)
    k, v = values(cfg.anchor_tokens)
    anchor = cache.add_anchor(k.to(device), v.to(device))
    seqs = [cache.add_sequence(anchor=anchor) for _ in range(cfg.sequences)]
    for s in seqs:
        slots = cache.extend([s], [cfg.context])
        k, v = values(cfg.context)
        for layer in range(L):
            cache.write(layer, slots, k[layer].to(device), v[layer].to(device))
    return cache, anchor, seqs


def run(cfg: E6LiveConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    cache, anchor, seqs = build_cache(cfg, device)
    rng = random.Random(cfg.seed)
    rows = []
    for item in cfg.formats:
        fmt, _, rounding = item.partition(":")
        committer = Committer(cache, mode="commit_sync", interval=1, fmt=fmt, rounding=rounding)
        committer.commit([p for s in seqs for p in cache.complete_pages(s)])
        base = {"fmt": fmt, "rounding": rounding, "leaves": len(committer.leaves), "device": device}
        honest = [committer.verify_live()]
        for target in TARGETS:
            leaves = [i for i, leaf in enumerate(committer.leaves) if leaf.page.kind == target]
            for bit in range(BF16_BITS):
                detected = localized = 0
                for _ in range(cfg.trials):
                    d, loc = _flip_trial(cache, committer, rng.choice(leaves), bit, rng)
                    detected += d
                    localized += loc
                honest.append(committer.verify_live())
                rows.append({**base, "kind": "flip", "target": target, "bit": bit, "part": bit_part(bit),
                             "trials": cfg.trials, "detected": detected, "localized": localized})
        rows.append({**base, "kind": "swap", "target": "anchor",
                     **_swap_anchor(cache, committer, anchor, seqs, cfg.trials, rng)})
        rows.append({**base, "kind": "remap", "target": "context",
                     **_remap(cache, committer, seqs, cfg.trials, rng)})
        rows.append({**base, "kind": "honest", "target": "all", "trials": len(honest),
                     "detected": sum(not r.ok for r in honest), "localized": ""})
    return rows


def _flip_trial(cache: PagedKVCache, committer: Committer, leaf: int, bit: int,
                rng: random.Random) -> tuple[bool, bool]:
    """Flip ``bit`` of one random valid element of leaf ``leaf``'s live page, verify, restore:
    (detected, localized)."""
    ref = committer.leaves[leaf]
    pool = cache.k if ref.kind == "k" else cache.v  # [L, blocks, block_size, H, D]
    block = _live_block(cache, ref.page)
    t, h, d = rng.randrange(ref.page.tokens), rng.randrange(cache.num_kv_heads), rng.randrange(cache.head_dim)
    word = pool[ref.layer, block, t, h].view(torch.int16)  # [D], a view of the live page
    old = int(word[d])
    # a sign-extended int16: flipping bit 15 flips every higher bit of the Python int too
    word[d] = old ^ (-(1 << SIGN_BIT) if bit == SIGN_BIT else 1 << bit)
    try:
        res = committer.verify_live()
    finally:
        word[d] = old
    return not res.ok, res.tampered == [leaf]


def _live_block(cache: PagedKVCache, page) -> int:
    owner = cache.anchors[page.owner] if page.kind == "anchor" else cache.sequences[page.owner]
    return owner.blocks[page.index]


def _page_leaves(committer: Committer, kind: str, owner: int, index: int) -> list[int]:
    return [i for i, leaf in enumerate(committer.leaves)
            if (leaf.page.kind, leaf.page.owner, leaf.page.index) == (kind, owner, index)]


def _swap_anchor(cache: PagedKVCache, committer: Committer, anchor: int, seqs: list[int], trials: int,
                 rng: random.Random) -> dict:
    """Point an anchor page's table entry (each page in turn) at a random sequence's page, verify,
    restore; ``trials`` times."""
    blocks = cache.anchors[anchor].blocks
    detected = localized = 0
    for trial in range(trials):
        index = trial % len(blocks)
        seq = cache.sequences[rng.choice(seqs)]
        old, blocks[index] = blocks[index], rng.choice(seq.blocks)
        try:
            res = committer.verify_live()
        finally:
            blocks[index] = old
        detected += not res.ok
        localized += res.tampered == _page_leaves(committer, "anchor", anchor, index)
    return {"trials": trials, "detected": detected, "localized": localized}


def _remap(cache: PagedKVCache, committer: Committer, seqs: list[int], trials: int, rng: random.Random) -> dict:
    """Point one committed block-table entry of a random sequence (and its int32 mirror, which
    the kernel reads) at a page of another sequence, verify, restore; ``trials`` times."""
    detected = localized = 0
    for _ in range(trials):
        victim, other = rng.sample(seqs, 2)
        seq = cache.sequences[victim]
        index = rng.choice(sorted(_committed_pages(committer, victim)))
        old, new = seq.blocks[index], rng.choice(cache.sequences[other].blocks)
        seq.blocks[index] = new
        seq.table[index] = new
        try:
            res = committer.verify_live()
        finally:
            seq.blocks[index] = old
            seq.table[index] = old
        detected += not res.ok
        localized += res.tampered == _page_leaves(committer, "context", victim, index)
    return {"trials": trials, "detected": detected, "localized": localized}


def _committed_pages(committer: Committer, seq: int) -> set[int]:
    return {leaf.page.index for leaf in committer.leaves if leaf.page.kind == "context" and leaf.page.owner == seq}


if __name__ == "__main__":
    hydra_main("e6_live", E6LiveConfig, run)
