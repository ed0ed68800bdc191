"""E1 / E2 configs, a tiny E1 run on the CPU, and the claims judged from rows."""

from __future__ import annotations

import pytest

from fieldprint.experiments import e1_throughput as e1
from fieldprint.experiments import e2_sram as e2
from fieldprint.experiments.common import compose
from fieldprint.report import e1_throughput as r1
from fieldprint.report import e2_sram as r2


@pytest.mark.parametrize("scale", ["smoke", "paper"])
def test_configs_compose(scale):
    c1 = compose("e1_throughput", e1.E1Config, [f"scale={scale}"])
    c2 = compose("e2_sram", e2.E2Config, [f"scale={scale}"])
    assert c1.scale == c2.scale == scale
    if scale == "paper":
        assert [64, 4096] in c1.decode_shapes and c1.heads_q == 32 and c1.kv_dtypes == ["bf16", "fp8"]
        assert c2.head_dims == [64, 128, 256]


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="impls"):
        e1.E1Config(impls=["naive"])
    with pytest.raises(ValueError, match="decode_shapes"):
        e1.E1Config(decode_shapes=[[0, 16]])
    for bad in ([[4, 20, 32, 1]], [[5, 20, 32, 2]], [[4, 20, 32]], [[4, 20, 0, 2]]):
        with pytest.raises(ValueError, match="shared_shapes"):
            e1.E1Config(shared_shapes=bad)
    with pytest.raises(ValueError, match="sweeps"):
        e2.E2Config(sweeps=[["decode", "colour", 3]])
    with pytest.raises(Exception, match="nonsense"):
        compose("e1_throughput", e1.E1Config, ["+nonsense=1"])


@pytest.mark.interpreted
def test_e1_tiny_run_on_cpu():
    cfg = e1.E1Config(decode_shapes=[[2, 20]], anchors=[16], prefill_contexts=[], prefill_anchors=[],
                      impls=["fused", "naive", "gather_sdpa", "cudnn_sdpa"], warmup_ms=1, rep_ms=1,
                      device="cpu", seed=3)
    rows = e1.run(cfg)
    by = {r["impl"]: r for r in rows}
    assert by["cudnn_sdpa"]["skipped"] == "needs CUDA" and by["cudnn_sdpa"]["ms"] == ""
    for name in ("fused", "naive", "gather_sdpa"):
        assert by[name]["skipped"] == "", by[name]["skipped"]
        assert float(by[name]["ms"]) > 0 and float(by[name]["rel_err"]) < 2e-2
    assert float(by["naive"]["rel_err_fused"]) < 2e-2
    assert by["fused"]["bytes"] == 2 * 2 * 36 * 2 * 64 * 2 + 2 * 2 * 4 * 64 * 2


def test_shared_problem_shares_anchor_pages_within_groups():
    import torch

    cfg = e1.E1Config()
    case, _ = e1.make_problem(6, 1, 20, 40, cfg, torch.bfloat16, "cpu", seed=1, group=3)
    rows = [tuple(r) for r in case.anchor_block_table.tolist()]
    assert rows[0] == rows[1] == rows[2] != rows[3] == rows[4] == rows[5]
    ids = case.block_table.flatten().tolist() + list(rows[0] + rows[3])
    assert len(set(ids)) == len(ids) == case.k_cache.shape[0] - 1  # no page owned twice; one spare
    assert case.anchor_lens.tolist() == [40] * 6


def test_e1_shared_prefix_run_on_cpu():
    """The shared-prefix regime: two groups of two sequences share 24 anchors (not block-aligned);
    logical bytes count the anchors per sequence, unique bytes once per group."""
    cfg = e1.E1Config(decode_shapes=[], prefill_contexts=[], prefill_anchors=[],
                      shared_shapes=[[4, 20, 24, 2]], impls=["fused", "fused_groups", "cascade", "prefix_blocks"],
                      warmup_ms=1, rep_ms=1, device="cpu", seed=4)
    rows = e1.run(cfg)
    by = {r["impl"]: r for r in rows}
    assert len(rows) == 4 and all(r["mode"] == "shared_decode" and r["share_group"] == 2 for r in rows)
    token = 2 * 2 * 64 * 2  # K and V, 2 KV heads, D = 64, bf16
    io = 2 * 4 * 4 * 64 * 2
    assert by["fused"]["bytes"] == 4 * (24 + 20) * token + io
    assert by["fused"]["unique_bytes"] == (4 * 20 + 2 * 24) * token + io
    for name in ("fused", "fused_groups", "cascade"):
        r = by[name]
        assert r["skipped"] == "" and float(r["rel_err"]) < 2e-2, r
        ratio = float(r["unique_tbps"]) / float(r["tbps"])
        assert abs(ratio - r["unique_bytes"] / r["bytes"]) < 1e-3
    # the cascade took its read-once path (another rounding than the fused kernel), not a copy of it
    assert 0 < float(by["cascade"]["rel_err_fused"]) < 2e-2
    assert by["prefix_blocks"]["skipped"] == "anchors not block-aligned"


def test_unfused_skip_reason_uses_memory_estimate():
    cfg = e1.E1Config(unfused_limit_gb=1.0, heads_q=32, heads_kv=8, head_dim=128)
    assert "GB" in e1._skip_reason("naive", "prefill", 64, "bf16", "cuda", 1, 32768, 32768, cfg)
    assert e1._skip_reason("naive", "decode", 64, "bf16", "cuda", 1, 1, 128, cfg) == ""
    assert e1._skip_reason("prefix_blocks", "decode", 5, "bf16", "cuda", 1, 1, 128, cfg)
    assert e1._skip_reason("fused_groups", "decode", 64, "bf16", "cuda", 64, 1, 4096, cfg)
    assert e1._skip_reason("fused_groups", "shared_decode", 64, "bf16", "cuda", 64, 1, 4096, cfg) == ""


def _row(impl, ms, B=64, L=4096, A=64, kv="bf16", mode="decode", err=1e-3):
    return {"impl": impl, "mode": mode, "batch": B, "context": L, "anchors": A,
            "kv_dtype": kv, "ms": ms, "tbps": 1 / ms, "tflops": 1 / ms,
            "rel_err": err, "skipped": None}


@pytest.mark.parametrize("fused_ms, verdict", [(1.05, True), (1.5, False)])
def test_e1_claims_follow_the_rows(fused_ms, verdict):
    rows = [_row("fused", fused_ms), _row("cudnn_sdpa", 1.0), _row("gather_sdpa", 20.0), _row("flex", 3.0)]
    got = {c.id: c for c in r1.claims(rows, {})}
    assert got["e1.cudnn_ratio_b64_l4096"].supported is verdict
    assert got["e1.cudnn_ratio_b16_l32768"].supported is False  # not measured is not supported
    assert got["e1.gather_10x"].supported is True
    m = r1.macros(rows, {"gpu": "NVIDIA H200", "date": "2026-11-29"})
    assert m["e1.ratio_cudnn_b64l4k"] == f"{1 / fused_ms:.2f}" and m["e1.fused_tbps_b16l32k"] == "n/a"
    assert m["e1.ratio_flex_b64l4k"] == f"{3.0 / fused_ms:.1f}" and m["e1.ratio_flex_b1l128k"] == "n/a"


def test_e2_claims_and_hbm_rows():
    cfg = e2.E2Config(hbm_contexts=[16384, 32768], heads_q=32)
    hbm = e2._hbm_rows(cfg)
    first = [r for r in hbm if r["form"] == "naive" and r["mode"] == "prefill" and r["exceeds_h200"] == 1]
    assert [r["context"] for r in first] == [32768]  # 2 * 32 * 32768^2 * 4 B = 275 GB > 141 GB
    var = {"kind": "variant", "kernel": "attention", "mode": "decode", "head_dim": 128, "kv_dtype": "bf16",
           "varied": None, "block_m": 16, "tile_n": 64, "shared_bytes": 36864, "model_bytes": 36864,
           "model_ratio": 1.0, "registers": 128, "spill_stores": 0, "spill_loads": 0,
           "block_size": 16, "group": 4}
    manifest = {"config": {"block_size": 16, "group": 4}}
    flat = [{"kind": "flat", "anchors": a, "context": c, "hash": "h", "shared_bytes": 36864,
             "registers": 128, "grid": f"1x8x{c}"} for a, c in ((0, 1024), (64, 4096))]
    got = {c.id: c.supported for c in r2.claims([var, *flat, *hbm], manifest)}
    assert got == {"e2.flat": True, "e2.model10": True, "e2.no_spills": True, "e2.unfused_exceeds": True}
    flat[1]["hash"] = "other"
    assert not {c.id: c.supported for c in r2.claims([var, *flat, *hbm], manifest)}["e2.flat"]
    assert "\\\\" in r2.macros([var, *flat, *hbm], manifest)["e2.table"]
