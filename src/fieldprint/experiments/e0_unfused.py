"""E0: what the unfused forms of anchor attention cost as the context grows (runs on a CPU).

For each context length: the HBM bytes the naive (materialized) and "v2.5" two-softmax forms
write for scores and probabilities, against the fused form, which keeps them in SRAM and writes
only split-KV partials; and the time of each form on this machine, with PyTorch's fused SDPA
on the same gathered K/V as the single-pass reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fieldprint.attention.paged_inputs import make_case
from fieldprint.attention.reference import (
    gather_pages,
    naive_attention,
    two_softmax_attention,
    unfused_intermediate_bytes,
)
from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, resolve_device
from fieldprint.timing import bench

SPLIT_TOKENS = 4096  # the fused kernel's fixed split-KV length: partials are (D + 2) floats per split


@dataclass
class E0Config(ExperimentConfig):
    contexts: list[int] = field(default_factory=lambda: [256, 512, 1024])
    anchors: int = 64
    batch: int = 1
    q_len: int = 16
    heads_q: int = 8
    heads_kv: int = 2
    head_dim: int = 64
    block_size: int = 16
    rep_ms: float = 200.0

    def validate(self) -> None:
        super().validate()
        check(len(self.contexts) > 0 and all(c > 0 for c in self.contexts), "contexts must be positive")
        check(self.anchors >= 0, "anchors must be >= 0")
        check(self.batch > 0 and self.q_len > 0, "batch and q_len must be positive")
        check(all(c >= self.q_len for c in self.contexts), "every context must be >= q_len")
        check(self.heads_kv > 0 and self.heads_q % self.heads_kv == 0, "heads_q must be a multiple of heads_kv")
        check(self.block_size > 0 and self.head_dim > 0, "block_size and head_dim must be positive")
        check(self.rep_ms > 0, "rep_ms must be positive")


def fused_intermediate_bytes(cfg: E0Config, context: int) -> int:
    """Split-KV partials of the fused kernel: per query row and split, D outputs + max + sum."""
    splits = math.ceil((cfg.anchors + context) / SPLIT_TOKENS)
    return 0 if splits == 1 else cfg.batch * cfg.heads_q * cfg.q_len * splits * (cfg.head_dim + 2) * 4


def _sdpa(case, cfg: E0Config):
    """The same attention through PyTorch's fused SDPA: gather the pages (as the unfused forms
    do), then one fused pass. Only for batch 1 (no padding)."""
    L = cfg.anchors + int(case.seq_lens[0])
    # Query j sees anchors and context up to position L - q_len + j: a bottom-right causal mask.
    mask = torch.ones(cfg.q_len, L, dtype=torch.bool, device=case.q.device).tril(L - cfg.q_len)
    q = case.q.transpose(0, 1)[None]

    def gathered(cache):
        x = torch.cat([gather_pages(cache, case.anchor_block_table[0], cfg.anchors),
                       gather_pages(cache, case.block_table[0], int(case.seq_lens[0]))])
        return x.transpose(0, 1)[None]

    return lambda: F.scaled_dot_product_attention(
        q, gathered(case.k_cache), gathered(case.v_cache), attn_mask=mask, enable_gqa=True)


def run(cfg: E0Config) -> list[dict]:
    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for context in cfg.contexts:
        case = make_case([context] * cfg.batch, [cfg.q_len] * cfg.batch, [cfg.anchors] * cfg.batch,
                         heads_q=cfg.heads_q, heads_kv=cfg.heads_kv, head_dim=cfg.head_dim,
                         block_size=cfg.block_size, device=device, poison=0.0, generator=gen)
        forms = {
            "naive": lambda c=case: naive_attention(*c.args()),
            "two_softmax": lambda c=case: two_softmax_attention(*c.args()),
        }
        if cfg.batch == 1:
            forms["sdpa_fused"] = _sdpa(case, cfg)
        for form, fn in forms.items():
            if form == "sdpa_fused":
                inter = fused_intermediate_bytes(cfg, context)
            else:
                inter = unfused_intermediate_bytes(form, cfg.batch, cfg.heads_q, cfg.q_len, cfg.anchors, context)
            rows.append({
                "form": form, "context": context, "anchors": cfg.anchors, "batch": cfg.batch,
                "q_len": cfg.q_len, "heads_q": cfg.heads_q, "head_dim": cfg.head_dim,
                "intermediate_bytes": inter, "ms": round(bench(fn, device, rep_ms=cfg.rep_ms), 4),
                "device": device,
            })
    return rows


if __name__ == "__main__":
    hydra_main("e0_unfused", E0Config, run)
