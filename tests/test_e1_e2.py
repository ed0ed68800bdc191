"""E1 / E2 configs, a tiny E1 run on the CPU, and the claims judged from rows."""

from __future__ import annotations

import re

import pytest
import torch
from test_attention_kernel import run_compiled

from fieldprint.attention.kernel import kernel_config
from fieldprint.experiments import e1_throughput as e1
from fieldprint.experiments import e2_sram as e2
from fieldprint.experiments.common import REPO_ROOT, compose
from fieldprint.report import e1_throughput as r1
from fieldprint.report import e2_sram as r2
from fieldprint.results import load_results
from fieldprint.timing import quartiles


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
    for bad in ([[4, 3, 20, 32, 1]], [[4, 30, 20, 32, 2]], [[4, 20, 32, 2]], [[4, 0, 20, 32, 2]]):
        with pytest.raises(ValueError, match="shared_prefill_shapes"):
            e1.E1Config(shared_prefill_shapes=bad)
    with pytest.raises(ValueError, match="sweeps"):
        e2.E2Config(sweeps=[["decode", "colour", 3]])
    with pytest.raises(Exception, match="nonsense"):
        compose("e1_throughput", e1.E1Config, ["+nonsense=1"])


def test_e1_rounds_interleave_the_implementations_and_drop_one_that_fails():
    calls = []

    def timed(name, fail_after=None):
        def fn():
            calls.append(name)
            if fail_after is not None and calls.count(name) > fail_after:
                raise RuntimeError("CUDA out of memory\nmore")
        return fn

    rows = [{"impl": n, "skipped": ""} for n in ("a", "b", "c")]
    cfg = e1.E1Config(reps=3, warmup_ms=1e-3, rep_ms=1e-3)
    fns = [timed("a"), timed("b", fail_after=4), timed("c")]
    out = e1._interleaved(list(zip(rows, fns, strict=True)), "cpu", cfg)
    # one median per round, in the order a b c a b c ...: b ran its 4 calls of round 1 (the CPU
    # bench's warm call and its least 3), failed in round 2 and was left out of round 3
    assert [r["impl"] for r, _ in out] == ["a", "c"] and all(len(ms) == 3 for _, ms in out)
    runs = [n for k, n in enumerate(calls) if k == 0 or calls[k - 1] != n]
    assert runs == ["a", "b", "c", "a", "b", "c", "a", "c"]
    assert rows[1]["skipped"] == "RuntimeError while timed: CUDA out of memory"
    assert quartiles([3.0, 1.0, 2.0, 5.0, 4.0]) == (2.0, 3.0, 4.0)
    assert quartiles([2.5]) == (2.5, 2.5, 2.5)
    with pytest.raises(ValueError, match="reps"):
        e1.E1Config(reps=0)


@pytest.mark.interpreted
def test_e1_tiny_run_on_cpu():
    cfg = e1.E1Config(decode_shapes=[[2, 20]], anchors=[16], prefill_contexts=[], prefill_anchors=[],
                      impls=["fused", "naive", "gather_sdpa", "cudnn_sdpa", "fused_hdn"], warmup_ms=1, rep_ms=1,
                      reps=2, device="cpu", seed=3)
    rows = e1.run(cfg)
    by = {r["impl"]: r for r in rows}
    assert by["cudnn_sdpa"]["skipped"] == "needs CUDA" and by["cudnn_sdpa"]["ms"] == ""
    for name in ("fused", "naive", "gather_sdpa"):
        assert by[name]["skipped"] == "", by[name]["skipped"]
        assert float(by[name]["ms"]) > 0 and float(by[name]["rel_err"]) < 2e-2
        # the quartiles of the repetitions bracket the median
        assert 0 < float(by[name]["ms_q1"]) <= float(by[name]["ms"]) <= float(by[name]["ms_q3"])
    assert by["cudnn_sdpa"]["ms_q1"] == by["cudnn_sdpa"]["ms_q3"] == ""
    assert float(by["naive"]["rel_err_fused"]) < 2e-2
    assert by["fused_hdn"]["skipped"] == "" and float(by["fused_hdn"]["rel_err_fused"]) == 0  # same bits
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


def test_e1_shared_prefill_run_on_cpu():
    """The chunked-prefill form of the shared-prefix regime: two groups of two sequences share
    32 anchors, each brings 3 new tokens; the grouped kernel agrees with the plain one and with
    the cascade, and the decode-only variants say so."""
    cfg = e1.E1Config(decode_shapes=[], prefill_contexts=[], prefill_anchors=[],
                      shared_prefill_shapes=[[4, 3, 20, 32, 2]],
                      impls=["fused", "fused_groups", "cascade", "prefix_blocks", "fused_pipelined"],
                      warmup_ms=1, rep_ms=1, device="cpu", seed=5)
    rows = e1.run(cfg)
    by = {r["impl"]: r for r in rows}
    assert len(rows) == 5 and all(r["mode"] == "shared_prefill" and r["q_len"] == 3 and r["share_group"] == 2
                                  for r in rows)
    for impl in ("fused_groups", "cascade", "prefix_blocks"):
        assert 0 <= float(by[impl]["rel_err_fused"]) < 2e-2, impl
        assert float(by[impl]["rel_err"]) < 2e-2, impl
    assert by["fused_pipelined"]["skipped"] == "pipelined walk: decode only"
    token = 2 * 2 * 64 * 2  # K and V, 2 KV heads, D = 64, bf16
    io = 2 * 12 * 4 * 64 * 2  # q and out of 12 tokens, 4 query heads
    assert by["fused"]["bytes"] - by["fused"]["unique_bytes"] == 2 * 32 * token  # each anchor set read by 2
    assert by["fused"]["unique_bytes"] == (4 * 20 + 2 * 32) * token + io


def test_unfused_skip_reason_uses_memory_estimate():
    cfg = e1.E1Config(unfused_limit_gb=1.0, heads_q=32, heads_kv=8, head_dim=128)
    assert "GB" in e1._skip_reason("naive", "prefill", 64, "bf16", "cuda", 1, 32768, 32768, cfg)
    assert e1._skip_reason("naive", "decode", 64, "bf16", "cuda", 1, 1, 128, cfg) == ""
    assert e1._skip_reason("prefix_blocks", "decode", 5, "bf16", "cuda", 1, 1, 128, cfg)
    assert e1._skip_reason("fused_groups", "decode", 64, "bf16", "cuda", 64, 1, 4096, cfg)
    assert e1._skip_reason("fused_groups", "shared_decode", 64, "bf16", "cuda", 64, 1, 4096, cfg) == ""
    assert e1._skip_reason("fused_groups", "shared_prefill", 64, "bf16", "cuda", 64, 8, 4096, cfg) == ""
    assert e1._skip_reason("fused_pipelined", "shared_prefill", 64, "bf16", "cuda", 64, 8, 4096, cfg)
    assert e1._skip_reason("fused_hdn", "decode", 64, "fp8", "cuda", 64, 1, 4096, cfg) == ""
    assert e1._skip_reason("fused_hdn", "shared_decode", 64, "fp8", "cuda", 64, 1, 4096, cfg)


def test_e1_hdn_layout_macros_and_claims():
    """The "hdn" V layout: its speed over the default layout per shape and KV dtype, the fp8
    target judged on the faster layout at each batched shape, and whether hdn wins everywhere."""
    shapes = [(64, 4096), (16, 32768), (4, 131072)]
    rows = []
    for (B, L), hdn_ms in zip(shapes, (0.5, 0.6, 0.4), strict=True):
        rows += [_row("fused", 1.0, B, L), _row("fused", 0.55, B, L, kv="fp8"),
                 _row("fused_hdn", hdn_ms, B, L, kv="fp8"), _row("fused_hdn", 1.25, B, L)]
    m = r1.macros(rows, GPU)
    assert (m["e1.hdn_fp8_b64l4k"], m["e1.hdn_fp8_b16l32k"], m["e1.hdn_bf16_b64l4k"]) == ("1.10", "0.92", "0.80")
    assert m["e1.hdn_fp8_range"] == "0.92--1.38" and m["e1.hdn_bf16_range"] == "0.80"
    assert m["e1.hdn_fp8_b1l128k"] == "n/a"
    assert (m["e1.hdn_fp8_faster_at"], m["e1.hdn_bf16_faster_at"]) == ("2 of 3", "0 of 3")
    got = {c.id: c for c in r1.claims(rows, GPU)}
    assert not got["e1.hdn_fp8_faster"].supported  # 0.92x at B=16
    assert got["e1.kernel_target.fp8"].evidence == "2.00, 1.82, 2.50"  # the faster layout at each shape
    assert got["e1.kernel_target.fp8"].supported
    rows[6]["ms"] = 0.5  # hdn now faster at B=16 too
    assert {c.id: c for c in r1.claims(rows, GPU)}["e1.hdn_fp8_faster"].supported


def _row(impl, ms, B=64, L=4096, A=64, kv="bf16", mode="decode", err=1e-3):
    return {"impl": impl, "mode": mode, "batch": B, "context": L, "anchors": A,
            "kv_dtype": kv, "ms": ms, "tbps": 1 / ms, "tflops": 1 / ms, "bytes": 1000,
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
           "model_ratio": 1.0, "registers": 128, "num_warps": 4, "spill_stores": 0, "spill_loads": 0,
           "block_size": 16, "group": 4}
    manifest = {"config": {"block_size": 16, "group": 4}}
    flat = [{"kind": "flat", "anchors": a, "context": c, "hash": "h", "shared_bytes": 36864,
             "registers": 128, "grid": f"1x8x{c}"} for a, c in ((0, 1024), (64, 4096))]
    got = {c.id: c.supported for c in r2.claims([var, *flat, *hbm], manifest)}
    assert got == {"e2.flat": True, "e2.model10": True, "e2.no_spills": True, "e2.unfused_exceeds": True}
    flat[1]["hash"] = "other"
    assert not {c.id: c.supported for c in r2.claims([var, *flat, *hbm], manifest)}["e2.flat"]
    assert "\\\\" in r2.macros([var, *flat, *hbm], manifest)["e2.table"]


@pytest.mark.parametrize("registers, warps, shared, programs", [
    (122, 4, 39936, 4),  # the default decode launch at D=128 (bf16)
    (233, 4, 82944, 2),  # the same with read-once anchor groups
    (162, 4, 39936, 3),  # registers alone limit it (162 * 32 rounds up to 5376 per warp)
    (32, 1, 0, 32),  # the SM's program limit
    (24, 16, 0, 4),  # its warp limit (registers would allow 5)
])
def test_programs_per_sm(registers, warps, shared, programs):
    assert r2.programs_per_sm(registers, warps, shared) == programs


def _e2_variant(varied, registers, shared, mode="decode"):
    return {"kind": "variant", "kernel": "attention", "mode": mode, "head_dim": 128, "kv_dtype": "bf16",
            "varied": varied, "block_m": 16, "tile_n": 64, "shared_bytes": shared, "model_bytes": 49152,
            "model_ratio": shared / 49152, "registers": registers, "num_warps": 4, "spill_stores": 0,
            "spill_loads": 0, "block_size": 16, "group": 4}


def test_e2_groups_macros_and_label():
    manifest = {"config": {"block_size": 16, "group": 4}}
    rows = [_e2_variant(None, 122, 39936), _e2_variant("anchor_groups=1", 233, 82944),
            _e2_variant("anchor_groups=1", 254, 90000, mode="prefill")]
    m = r2.macros(rows, manifest)
    got = {name: tuple(m[f"e2.{name}_decode_{k}"] for k in ("regs", "smem_kib", "programs"))
           for name in ("plain", "groups")}
    assert got == {"plain": ("122", "39.0", "4"), "groups": ("233", "81.0", "2")}
    assert r2.variant_label(rows[1], manifest["config"]) == "read-once groups"
    assert "read-once groups" in m["e2.table"]
    assert r2.macros(rows[:1], manifest)["e2.groups_decode_regs"] == "n/a"


def test_e2_hdn_macros_and_sweep():
    manifest = {"config": {"block_size": 16, "group": 4}}
    rows = [dict(_e2_variant(None, 162, 74752), kv_dtype="fp8"),
            dict(_e2_variant("v_hdn=1", 168, 74752), kv_dtype="fp8")]
    m = r2.macros(rows, manifest)
    got = [m[f"e2.{n}_fp8_decode_{k}"] for n in ("plain", "hdn") for k in ("regs", "programs")]
    assert got == ["162", "3", "168", "3"]
    assert r2.variant_label(rows[1], manifest["config"]) == "token-contiguous V"
    e2.E2Config(sweeps=[["decode", "v_hdn", 1, "fp8"]]).validate()
    for bad in (["decode", "v_hdn", 2], ["decode", "v_hdn", 1, "fp4"]):
        with pytest.raises(ValueError, match="sweeps must be"):
            e2.E2Config(sweeps=[bad]).validate()
    assert [v[2:] for v in e2._variants(e2.E2Config(modes=["decode"], sweeps=[["decode", "v_hdn", 1, "fp8"]]))][-1] \
        == ("fp8", 16, 4, {"v_hdn": 1})


def test_e2_anchor_groups_sweep():
    """The sweep knob compiles the launch with read-once groups (fresh process: no interpreter);
    its Q tile is the group tile's, and only the value 1 is accepted."""
    with pytest.raises(ValueError, match="anchor_groups and v_hdn: value 1"):
        e2.E2Config(sweeps=[["decode", "anchor_groups", 2]]).validate()
    kc = kernel_config(128, 16, 4, "decode", torch.bfloat16)
    assert (e2.q_rows(kc, False), e2.q_rows(kc, True)) == (16, 64)
    assert e2.model_bytes(kc, 128, 2, anchor_groups=True) - e2.model_bytes(kc, 128, 2) == (64 - 16) * 128 * 2
    stdout = run_compiled(
        "from fieldprint.experiments import e2_sram as e2\n"
        "cfg = e2.E2Config(head_dims=[128], modes=['decode'], sweeps=[['decode', 'anchor_groups', 1]])\n"
        "for r in e2._compile_rows(cfg):\n"
        "    print(r['kernel'], r['varied'] or '-', r['registers'], r['acc_regs'])\n")
    rows = [line.split() for line in stdout.strip().split("\n")]
    assert [r[:2] for r in rows] == [["attention", "-"], ["combine", "-"], ["attention", "anchor_groups=1"],
                                     ["combine", "anchor_groups=1"]], rows
    assert int(rows[2][2]) > int(rows[0][2]) and (rows[0][3], rows[2][3]) == ("16", "64"), rows


# ------------------------------------------------------------- shared-prefix regime (issue 12)

DOMINATED = (32, 2048, 8192, 32)  # A >= L
CONTEXT_HEAVY = (4, 4096, 1024, 2)  # A < L: shared, but not judged by the anchor-dominated targets
GPU = {"gpu": "NVIDIA H200", "date": "2026-12-01"}


def _shared(impl, ms, shape=DOMINATED, kv="bf16", unique_over_logical=0.25, q_len=1):
    B, L, A, group = shape
    tbps = None if ms is None else 1 / ms
    return {"impl": impl, "mode": "shared_decode" if q_len == 1 else "shared_prefill", "batch": B, "q_len": q_len,
            "context": L, "anchors": A, "share_group": group,
            "kv_dtype": kv, "ms": ms, "tbps": tbps, "unique_tbps": None if ms is None else tbps * unique_over_logical,
            "tflops": tbps, "rel_err": None if ms is None else 1e-3,
            "skipped": "anchors not block-aligned" if ms is None else None}


def _shared_rows(fused=1.0, groups=0.5, cascade=0.6, prefix=2.0):
    rows = [_shared("fused", fused), _shared("fused_groups", groups), _shared("cascade", cascade),
            _shared("prefix_blocks", prefix)]
    # a context-dominated shared shape where the fused kernel loses: outside the targets
    return rows + [_shared("fused", 1.0, CONTEXT_HEAVY), _shared("cascade", 0.1, CONTEXT_HEAVY)]


def test_shared_prefill_macros():
    """The chunked-prefill shared shapes: the faster fused variant and its ratios per shape,
    apart from the decode ones (which these rows do not change)."""
    shape = (64, 1024, 4096, 64)
    rows = [_shared(i, ms, shape, q_len=8) for i, ms in (("fused", 2.0), ("fused_groups", 0.8), ("cascade", 1.0),
                                                          ("prefix_blocks", None))]
    m = r1.macros(rows + _shared_rows(), {"gpu": "H200", "date": "2026-12-01"})
    k = "e1.shared_prefill.b64-l1k-a4k-g64-q8"
    assert m["e1.shared_prefill.shapes"] == "1" and m[f"{k}.best"] == "read-once anchor groups"
    assert (m[f"{k}.vs_fused"], m[f"{k}.vs_cascade"], m[f"{k}.vs_prefix"]) == ("2.50", "1.25", "n/a")
    decode_only = r1.macros(_shared_rows(), {"gpu": "H200", "date": "2026-12-01"})
    # e1.groups_graph counts the grouped rows of every mode
    assert m == decode_only | {key: v for key, v in m.items()
                               if key.startswith("e1.shared_prefill.") or key in ("e1.rows_skipped", "e1.groups_graph")}


def test_shared_key_and_anchor_dominated():
    assert r1.shared_key(*DOMINATED) == "b32-l2k-a8k-g32" and r1.shared_key(256, 128, 1024, 256) == "b256-l128-a1k-g256"
    assert r1.anchor_dominated(2048, 8192) and r1.anchor_dominated(1024, 1024) and not r1.anchor_dominated(4096, 1024)


def test_shared_targets_met_with_the_faster_fused_variant():
    rows = _shared_rows()  # fused_groups 0.5 ms: 1.2x the cascade (0.6 ms), 4x prefix blocks (2.0 ms)
    m = r1.macros(rows, GPU)
    k = "e1.shared.b32-l2k-a8k-g32"
    assert m[f"{k}.best"] == "read-once anchor groups"
    assert m[f"{k}.vs_cascade"] == "1.20" and m[f"{k}.vs_prefix"] == "4.00"
    assert m[f"{k}.bf16.fused_groups.tbps"] == "2.00" and m[f"{k}.bf16.fused_groups.unique_tbps"] == "0.50"
    assert m[f"{k}.bf16.cascade.unique_tbps"] == f"{0.25 / 0.6:.2f}"
    assert m["e1.shared.shapes"] == "2" and m["e1.shared.dominated"] == "1"
    assert m["e1.shared.vs_cascade"] == "1.20" and m["e1.shared.vs_cascade_tested"] == "1"
    assert m["e1.verdict.shared_vs_cascade"] == m["e1.verdict.shared_vs_prefix"] == "met"
    # the context-dominated shape (cascade 10x faster) has its macros but is not judged
    assert m["e1.shared.b4-l4k-a1k-g2.vs_cascade"] == "0.10"
    got = {c.id: c for c in r1.claims(rows, GPU)}
    for cid in ("e1.shared_vs_cascade", "e1.shared_vs_prefix_blocks"):
        assert got[cid].supported is True and got[cid].evidence.startswith("target met")
    assert "fused_groups" in got["e1.shared_vs_cascade"].evidence


def test_shared_targets_missed():
    rows = _shared_rows(fused=1.0, groups=0.5, cascade=0.4, prefix=1.0)  # 0.8x the cascade, 2x prefix blocks
    other = (64, 512, 4096, 64)  # a second anchor-dominated shape, where the cascade is beaten
    rows += [_shared("fused", 1.0, other), _shared("cascade", 1.3, other)]
    m = r1.macros(rows, GPU)
    assert m["e1.shared.vs_cascade"] == "0.80--1.30" and m["e1.shared.vs_cascade_tested"] == "2"
    assert m["e1.shared.vs_prefix"] == "2.00" and m["e1.shared.vs_prefix_tested"] == "1"
    assert m["e1.verdict.shared_vs_cascade"] == m["e1.verdict.shared_vs_prefix"] == "missed"
    got = {c.id: c for c in r1.claims(rows, GPU)}
    assert got["e1.shared_vs_cascade"].supported is False and "missed" in got["e1.shared_vs_cascade"].evidence
    assert got["e1.shared_vs_prefix_blocks"].supported is False


def test_flashinfer_cascade_target_judged_where_it_ran():
    rows = _shared_rows()  # fused_groups 0.5 ms
    m = r1.macros(rows, GPU)  # FlashInfer not installed: its target is not tested, the others judged
    assert m["e1.shared.b32-l2k-a8k-g32.vs_flashinfer"] == "n/a" and m["e1.shared.vs_flashinfer_tested"] == "0"
    assert m["e1.verdict.shared_vs_flashinfer"] == "not tested" and m["e1.verdict.shared_vs_cascade"] == "met"
    rows.append(_shared("flashinfer_cascade", 0.4))  # 0.8x: FlashInfer's cascade is faster
    m = r1.macros(rows, GPU)
    assert m["e1.shared.b32-l2k-a8k-g32.vs_flashinfer"] == "0.80" and m["e1.shared.vs_flashinfer"] == "0.80"
    assert m["e1.target.shared_vs_flashinfer"] == "1" and m["e1.verdict.shared_vs_flashinfer"] == "missed"
    got = {c.id: c for c in r1.claims(rows, GPU)}
    assert got["e1.shared_vs_flashinfer_cascade"].supported is False
    assert got["e1.shared_vs_cascade"].supported is True


def test_shared_prefix_blocks_skipped_is_not_tested():
    rows = _shared_rows(prefix=None)  # anchors not block-aligned: prefix blocks did not run
    m = r1.macros(rows, GPU)
    k = "e1.shared.b32-l2k-a8k-g32"
    assert m[f"{k}.bf16.prefix_blocks.unique_tbps"] == m[f"{k}.vs_prefix"] == "n/a"
    assert m["e1.verdict.shared_vs_prefix"] == "not tested" and m["e1.shared.vs_prefix_tested"] == "0"
    assert m["e1.verdict.shared_vs_cascade"] == "met"
    got = {c.id: c for c in r1.claims(rows, GPU)}
    assert got["e1.shared_vs_prefix_blocks"].supported is False
    assert got["e1.shared_vs_prefix_blocks"].evidence == "target not tested: b32-l2k-a8k-g32: not tested"


def test_shared_targets_not_tested_without_shared_rows():
    rows = [_row("fused", 1.0), _row("cudnn_sdpa", 1.0)]
    m = r1.macros(rows, GPU)
    assert m["e1.shared.shapes"] == "0" and m["e1.shared.vs_cascade"] == "n/a"
    assert m["e1.verdict.shared_vs_cascade"] == m["e1.verdict.shared_vs_prefix"] == "not tested"
    assert m["e1.anchor_cost_b64l4k"] == "n/a" and m["e1.verdict.anchor_cost"] == "not tested"
    got = {c.id: c for c in r1.claims(rows, GPU)}
    assert not got["e1.shared_vs_cascade"].supported and "not tested" in got["e1.shared_vs_cascade"].evidence
    assert not got["e1.anchor_cost_b64_l4096"].supported


@pytest.mark.parametrize("ms_groups, want", [(1.02, "met"), (1.10, "missed"), (None, "missed")])
def test_anchor_cost_target_with_anchors_shared_by_the_batch(ms_groups, want):
    """time(1024 anchors shared by all 64 sequences, faster fused variant) / time(0 anchors); the
    decode rows' private anchors (here 1.2x the time) are reported beside it, not judged."""
    shape = (64, 4096, 1024, 64)
    rows = [dict(_row("fused", 1.0, A=0), bytes=100), dict(_row("fused", 1.2, A=1024), bytes=125),
            _shared("fused", 1.3, shape), _shared("fused_groups", ms_groups, shape),
            _shared("fused", 0.5, (32, 4096, 1024, 32))]  # another batch: not the target's shape
    m = r1.macros(rows, GPU)
    assert m["e1.verdict.anchor_cost"] == want
    assert m["e1.anchor_cost_private_b64l4k"] == "1.200" and m["e1.anchor_bytes_private_b64l4k"] == "1.250"
    # without fused_groups (None: it did not run) the fused kernel's 1.3x is the best: missed, not untested
    assert m["e1.anchor_cost_b64l4k"] == f"{ms_groups or 1.3:.3f}"
    assert m["e1.anchor_cost_best"] == ("read-once anchor groups" if ms_groups else "the plain kernel")
    claim = {c.id: c for c in r1.claims(rows, GPU)}["e1.anchor_cost_b64_l4096"]
    assert claim.supported is (want == "met") and claim.evidence.startswith(f"target {want}")
    assert "1.200x the time for 1.250x the bytes" in claim.evidence


def test_anchor_cost_not_tested_without_the_shared_row():
    rows = [_row("fused", 1.0, A=0), _row("fused", 1.0, A=1024)]  # private anchors only: not the target's setting
    m = r1.macros(rows, GPU)
    assert m["e1.verdict.anchor_cost"] == "not tested" and m["e1.anchor_cost_b64l4k"] == "n/a"


def _paper_keys() -> set[str]:
    """Every \\fp{e1.*} key the paper's sources use."""
    found = set()
    for tex in (REPO_ROOT / "paper").rglob("*.tex"):
        if "generated" not in tex.parts and "build" not in tex.parts:
            found |= set(re.findall(r"\\fp\{(e1\.[^}]*)\}", tex.read_text()))
    return found


def test_paper_e1_keys_defined_for_the_reference_and_with_shared_rows():
    keys = _paper_keys()
    assert {"e1.verdict.shared_vs_cascade", "e1.anchor_cost_b64l4k"} <= keys  # the paper quotes the targets
    ref = load_results("e1_throughput", REPO_ROOT / "data" / "reference" / "h200" / "e1_throughput.csv")
    assert keys - set(r1.macros(ref.rows, ref.manifest)) == set()
    assert keys - set(r1.macros(ref.rows + _shared_rows(), ref.manifest)) == set()


def test_e1_issue12_kernel_targets_are_judged_beside_the_brief_claims():
    """0.95x cuDNN passes the brief's 0.9 and misses issue 12's 0.97; fp8 needs every batched shape."""
    rows = [_row("fused", 1 / 0.95), _row("cudnn_sdpa", 1.0),
            _row("fused", 1.0, B=16, L=32768), _row("cudnn_sdpa", 0.96, B=16, L=32768),
            _row("fused", 0.5, kv="fp8"), _row("fused", 0.5, B=16, L=32768, kv="fp8"),
            _row("fused", 1.0, B=1, L=8192, mode="prefill"), _row("flash_sdpa", 0.95, B=1, L=8192, mode="prefill")]
    got = {c.id: c for c in r1.claims(rows, {})}
    assert got["e1.cudnn_ratio_b64_l4096"].supported is True
    assert got["e1.kernel_target.cudnn_b64_l4096"].supported is False
    assert got["e1.kernel_target.cudnn_b16_l32768"].supported is False  # 0.96x
    assert got["e1.kernel_target.cudnn_b4_l131072"].evidence == "not measured"
    fp8 = got["e1.kernel_target.fp8"]  # 2.11x and 2.0x, but B=4 is not measured
    assert fp8.supported is False and fp8.evidence == "2.11, 2.00"
    assert got["e1.kernel_target.prefill_8k"].supported is True  # 0.95x
    assert got["e1.kernel_target.prefill_32k"].supported is False  # not measured
    rows.append(_row("fused", 0.25, B=4, L=131072, kv="fp8"))
    rows.append(_row("fused", 0.5, B=4, L=131072))
    assert {c.id: c for c in r1.claims(rows, {})}["e1.kernel_target.fp8"].supported is True


def test_groups_macros_count_graph_rows_and_compare_on_anchor_dominated_shapes():
    ref = load_results("e1_throughput", REPO_ROOT / "data" / "reference" / "h200" / "e1_throughput.csv")
    rows = [dict(r) for r in ref.rows]
    grouped = [r for r in rows if r["impl"] == "fused_groups" and r["ms"] is not None]
    assert grouped
    for r in grouped:
        r["timing"] = "graph"
    grouped[0]["timing"] = "eager"
    assert r1.macros(rows, ref.manifest)["e1.groups_graph"] == f"{len(grouped) - 1} of {len(grouped)}"
    # 0.5 ms grouped against 1.0 ms plain and 0.4 ms cascade on the one dominated shape; the
    # context-heavy shape (no target there) does not enter the span
    rows = [_shared(i, ms, DOMINATED) for i, ms in (("fused", 1.0), ("fused_groups", 0.5), ("cascade", 0.4))]
    rows += [_shared("fused", 1.0, CONTEXT_HEAVY), _shared("fused_groups", 4.0, CONTEXT_HEAVY)]
    m = r1.macros(rows, {"gpu": "H200", "date": "2026-12-01"})
    assert (m["e1.shared.groups_vs_fused"], m["e1.shared.groups_vs_cascade"]) == ("2.00", "0.80")
