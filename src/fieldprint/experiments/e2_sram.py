"""E2: on-chip footprint of the fused kernel, compiled for sm_90 on any machine (no GPU).

Three kinds of rows:

* ``variant``: every launch of :func:`sm90_compile_specs` (decode: attention + split combine;
  prefill: attention) over head dim, KV dtype, mode, block size, group and tile overrides, and
  the launch with read-once anchor groups (``varied`` ``anchor_groups=1``) and the one reading a
  V pool in the "hdn" page layout (``v_hdn=1``), with shared memory,
  registers, spills (:func:`fieldprint.sram.compile_resources`) next to the analytic model
  (:func:`model_bytes`): the Q tile plus the K and V tiles of each pipeline buffer. The
  accumulator (Q rows x ``D`` fp32) and the softmax state live in registers; ``acc_regs`` is its
  share per thread.
* ``flat``: one spec, launched for several (anchors, context) pairs. The spec has no anchors or
  context argument at all (they are runtime loop bounds), so the binary is the same by
  construction; the rows show it (same hash, same resources) together with what does change: the
  grid (splits of the fixed ``KV_SPLIT_TOKENS``) and the KV tiles each program walks. (The one
  compile-time switch is ``HAS_ANCHORS``: a call without an anchor table at all gets its own,
  smaller specialization; the rows use the anchored one throughout, anchors = 0 included.)
* ``hbm``: bytes of scores and probabilities the unfused forms (naive, v2.5 two-softmax) write,
  vs context, for one prefill sequence (``q_len = context``) and a decode batch, against the
  H200's 141 GB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fieldprint.experiments.common import ExperimentConfig, check, hydra_main
from fieldprint.results import e2_sweep_variant, e2_varied

H200_HBM_BYTES = 141e9
KV_DTYPES = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}
FLAG_KNOBS = {"anchor_groups", "v_hdn"}  # on/off launch variants (value 1), not kernel_config knobs


@dataclass
class E2Config(ExperimentConfig):
    head_dims: list[int] = field(default_factory=lambda: [64])
    kv_dtypes: list[str] = field(default_factory=lambda: ["bf16"])
    modes: list[str] = field(default_factory=lambda: ["decode", "prefill"])
    block_size: int = 16
    group: int = 4
    heads_q: int = 32
    # Extra variants at head_dim 128: [mode, knob, value] or [mode, knob, value, kv dtype] (bf16
    # unless given) with knob in block_size, group, tile_n, block_m, num_stages, num_warps,
    # anchor_groups (value 1: the launch with read-once anchor groups, whose one program holds
    # both the group tiles' path and the plain one) or v_hdn (value 1: a V pool in the "hdn"
    # page layout, tokens contiguous).
    sweeps: list[Any] = field(default_factory=list)
    flat_pairs: list[list[int]] = field(default_factory=lambda: [[0, 1024], [64, 4096], [1024, 32768]])
    flat_head_dim: int = 64
    hbm_contexts: list[int] = field(default_factory=lambda: [1024 * 2 ** i for i in range(11)])
    hbm_decode_batch: int = 64

    def validate(self) -> None:
        super().validate()
        check(set(self.head_dims) <= {64, 128, 256} and self.head_dims, "head_dims: 64, 128, 256")
        check(set(self.kv_dtypes) <= set(KV_DTYPES) and self.kv_dtypes, f"kv_dtypes in {sorted(KV_DTYPES)}")
        check(set(self.modes) <= {"decode", "prefill"} and self.modes, "modes: decode / prefill")
        check(self.block_size in (16, 32, 64, 128), "block_size must be 16, 32, 64 or 128")
        check(self.group > 0 and self.heads_q % self.group == 0, "group must divide heads_q")
        knobs = {"block_size", "group", "tile_n", "block_m", "num_stages", "num_warps"} | FLAG_KNOBS
        check(all(len(s) in (3, 4) and s[0] in ("decode", "prefill") and s[1] in knobs and int(s[2]) > 0
                  and (s[1] not in FLAG_KNOBS or int(s[2]) == 1) and (len(s) == 3 or s[3] in KV_DTYPES)
                  for s in self.sweeps),
              f"sweeps must be [mode, knob in {sorted(knobs)}, value] or [mode, knob, value, kv dtype in "
              f"{sorted(KV_DTYPES)}] ({' and '.join(sorted(FLAG_KNOBS))}: value 1)")
        check(all(len(p) == 2 and p[0] >= 0 and p[1] > 0 for p in self.flat_pairs),
              "flat_pairs must be [anchors >= 0, context > 0] pairs")
        check(self.flat_head_dim in (64, 128, 256), "flat_head_dim: 64, 128 or 256")
        check(all(c > 0 for c in self.hbm_contexts) and self.hbm_decode_batch > 0,
              "hbm_contexts and hbm_decode_batch must be positive")


def q_rows(cfg: dict, anchor_groups: bool) -> int:
    """Query rows of the largest tile one program holds: ``block_m``, or with anchor groups the
    group tile's ``group_block_m`` when it is larger (the same program runs both paths)."""
    return max(cfg["block_m"], cfg["group_block_m"]) if anchor_groups else cfg["block_m"]


def model_bytes(cfg: dict, head_dim: int, kv_bytes: int, q_bytes: int = 2, anchor_groups: bool = False) -> int:
    """Analytic shared memory of one attention program: the Q tile (:func:`q_rows`), plus the K
    and V tiles that Triton's software pipeline keeps in flight (``num_stages - 1`` buffers of
    each, at least one). Nothing in it depends on the number of anchors or the context length."""
    buffers = max(1, cfg["num_stages"] - 1)
    return q_rows(cfg, anchor_groups) * head_dim * q_bytes + buffers * 2 * cfg["tile_n"] * head_dim * kv_bytes


def _variants(cfg: E2Config):
    for mode in cfg.modes:
        for D in cfg.head_dims:
            for kv in cfg.kv_dtypes:
                yield mode, D, kv, cfg.block_size, cfg.group, {}
    for sweep in cfg.sweeps:
        mode, kv, bs, group, over = e2_sweep_variant(sweep, cfg.block_size, cfg.group)
        yield mode, 128, kv, bs, group, over


def _compile_rows(cfg: E2Config) -> list[dict]:
    import torch

    from fieldprint.attention.kernel import kernel_config, sm90_compile_specs
    from fieldprint.sram import compile_resources

    rows = []
    for mode, D, kv, bs, group, over in _variants(cfg):
        kv_dtype = getattr(torch, KV_DTYPES[kv])
        groups = bool(over.get("anchor_groups"))
        v_layout = "hdn" if over.get("v_hdn") else "nhd"
        launch = {k: v for k, v in over.items() if k not in FLAG_KNOBS}
        kc = kernel_config(D, bs, group, mode, kv_dtype, **launch)
        kvb = torch.empty(0, dtype=kv_dtype).element_size()
        specs = sm90_compile_specs(D, bs, kv_dtype, group, mode, anchor_groups=groups, v_layout=v_layout, **launch)
        for i, spec in enumerate(specs):
            res = compile_resources(*spec, attrs=spec.attrs)
            attn = i == 0
            threads = 32 * res["num_warps"]
            row = {"kind": "variant", "mode": mode, "kernel": "attention" if attn else "combine",
                   "head_dim": D, "kv_dtype": kv, "block_size": bs, "group": group,
                   "varied": e2_varied(over) or "",
                   "tile_n": kc["tile_n"], "block_m": kc["block_m"], "num_warps": res["num_warps"],
                   "num_stages": spec.options["num_stages"],
                   **{k: res[k] for k in ("shared_bytes", "registers", "spill_stores", "spill_loads",
                                          "local_bytes", "stack_bytes", "hash")},
                   "model_bytes": model_bytes(kc, D, kvb, anchor_groups=groups) if attn else "",
                   "acc_regs": q_rows(kc, groups) * D // threads if attn else ""}
            if attn:
                row["model_ratio"] = f"{res['shared_bytes'] / row['model_bytes']:.4f}"
            rows.append(row)
    return rows


def _flat_rows(cfg: E2Config) -> list[dict]:
    """Same spec for every (anchors, context): binary, resources; the launch shape mirrors
    ``kernel._launch`` for a decode batch of one sequence whose tables are exactly full."""
    import torch

    from fieldprint.attention.kernel import KV_SPLIT_TOKENS, kernel_config, sm90_compile_specs
    from fieldprint.sram import compile_resources

    D, bs, group = cfg.flat_head_dim, cfg.block_size, cfg.group
    Hkv = cfg.heads_q // group
    kc = kernel_config(D, bs, group, "decode", torch.bfloat16)
    tn = kc["tile_n"]
    rows = []
    for A, L in cfg.flat_pairs:
        spec = sm90_compile_specs(D, bs, torch.bfloat16, group, "decode", anchors=True)[0]
        res = compile_resources(*spec, attrs=spec.attrs)
        tiles = -(-(-(-A // bs) * bs) // tn) + -(-(-(-L // bs) * bs) // tn)
        per_split = KV_SPLIT_TOKENS // tn
        splits = max(1, -(-tiles // per_split))
        rows.append({"kind": "flat", "mode": "decode", "kernel": "attention", "head_dim": D,
                     "kv_dtype": "bf16", "block_size": bs, "group": group, "anchors": A,
                     "context": L, "grid": f"1x{Hkv}x{splits}", "kv_tiles": tiles,
                     "tiles_per_program": min(tiles, per_split),
                     **{k: res[k] for k in ("shared_bytes", "registers", "spill_stores",
                                            "spill_loads", "local_bytes", "hash")}})
    return rows


def _hbm_rows(cfg: E2Config) -> list[dict]:
    from fieldprint.attention.reference import unfused_intermediate_bytes

    rows = []
    for form in ("naive", "two_softmax"):
        for L in cfg.hbm_contexts:
            for mode, B, q_len in (("prefill", 1, L), ("decode", cfg.hbm_decode_batch, 1)):
                b = unfused_intermediate_bytes(form, B, cfg.heads_q, q_len, 64, L)
                rows.append({"kind": "hbm", "mode": mode, "form": form, "batch": B, "q_len": q_len,
                             "anchors": 64, "context": L, "hbm_bytes": b,
                             "exceeds_h200": int(b > H200_HBM_BYTES)})
    return rows


def run(cfg: E2Config) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("E2 compiles real sm_90 kernels: run it without TRITON_INTERPRET=1")
    return _compile_rows(cfg) + _flat_rows(cfg) + _hbm_rows(cfg)


if __name__ == "__main__":
    hydra_main("e2_sram", E2Config, run)
