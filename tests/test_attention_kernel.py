"""The fused paged anchor attention kernel (TRITON_INTERPRET=1 on the CPU) against the float64
reference: ragged decode and chunked prefill batches, GQA, anchors shared between sequences,
scrambled block tables, NaN in every slot a sequence does not own, fp8 KV, split-KV, sliding
window, softcap; bitwise determinism and batch invariance; the custom op and sm_90 compile specs.

Every float buffer the kernel allocates (output, lse, split workspace) is filled with NaN first
(``poisoned_empty``), so an element the kernel forgets to write, or a split it merges without
having written, shows up as NaN.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from fieldprint.attention import paged_anchor_attention, paged_inputs, reference_attention

# CPU tests through the interpreter (conftest sets it without CUDA); on a GPU machine the same
# checks run at realistic shapes in tests/test_attention_gpu.py.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
TOL = {BF16: 2e-2, FP16: 5e-3}


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    empty = torch.empty

    def nan_empty(*size, **kwargs):
        x = empty(*size, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_case(seed, q_lens, lens, a_lens, *, Hq=4, Hkv=2, D=64, bs=16, q_dtype=BF16, kv_dtype=None,
              shared_anchors=True, extra_cols=0):
    """Keyword arguments of one call: a paged pool with scrambled block ids, NaN in every slot no
    sequence owns, unused table entries pointing past the pool (``paged_inputs.make_case``).
    Shared anchors: every sequence's anchors are a prefix of one pinned block list (the same
    physical blocks); otherwise each sequence has its own anchor blocks."""
    case = paged_inputs.make_case(
        lens, q_lens, a_lens, heads_q=Hq, heads_kv=Hkv, head_dim=D, block_size=bs, dtype=q_dtype,
        kv_dtype=kv_dtype, shared_anchors=shared_anchors, spare_blocks=2, unused_ids="out_of_pool",
        extra_cols=extra_cols, generator=torch.Generator().manual_seed(seed))
    return {f.name: getattr(case, f.name) for f in dataclasses.fields(case)}


def run_compiled(code: str) -> str:
    """stdout of Python ``code`` run in a fresh process without the interpreter (offline sm_90
    compiles need the real @triton.jit functions, which TRITON_INTERPRET=1 replaces at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def reference(case, **kw):
    """float64 reference on the same inputs (fp8 caches stay fp8: the reference widens them)."""
    c = dict(case)
    c["q"] = c["q"].double()
    if c["k_cache"].dtype != FP8:
        c["k_cache"], c["v_cache"] = c["k_cache"].double(), c["v_cache"].double()
    return reference_attention(**c, return_lse=True, **kw)


def check(case, tol=None, **kw):
    ref_kw = {k: v for k, v in kw.items() if k not in ("kv_split_tokens", "config")}
    out, lse = paged_anchor_attention(**case, return_lse=True, **kw)
    ref, ref_lse = reference(case, **ref_kw)
    assert out.dtype == case["q"].dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    tol = tol or TOL[case["q"].dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-3, rtol=1e-4)
    return out, lse


CASES = [
    # (Hq, Hkv, D, bs, dtype, q_lens, seq_lens, anchor_lens, config)
    (4, 4, 64, 16, BF16, [1, 1, 1], [5, 40, 17], [3, 0, 20], None),  # MHA decode
    (6, 2, 64, 32, FP16, [3, 0, 5, 1], [3, 9, 30, 64], [33, 0, 1, 64], None),  # group 3, empty seq
    (8, 2, 64, 16, BF16, [0, 2, 1], [4, 19, 50], [16, 5, 0], {"tile_n": 16}),  # decode mode, q_len 2
    (8, 1, 64, 32, BF16, [7, 4, 1], [9, 50, 10], [40, 3, 0], {"block_m": 16, "tile_n": 16}),  # MQA
    (4, 1, 128, 16, BF16, [1, 1], [150, 100], [3, 70], None),  # D = 128
    (4, 2, 64, 32, FP16, [12, 2], [12, 37], [2, 50], {"tile_n": 64}),  # two pages per tile
]


@pytest.mark.parametrize("Hq,Hkv,D,bs,dtype,q_lens,lens,a_lens,config", CASES)
def test_matches_reference(Hq, Hkv, D, bs, dtype, q_lens, lens, a_lens, config):
    case = make_case(len(lens) * 7 + Hq, q_lens, lens, a_lens, Hq=Hq, Hkv=Hkv, D=D, bs=bs, q_dtype=dtype)
    check(case, config=config)


def test_private_anchors_and_wide_tables():
    case = make_case(3, [2, 1, 3], [5, 33, 18], [17, 0, 48], shared_anchors=False, extra_cols=3)
    check(case, softmax_scale=0.3)


def test_split_kv_matches_reference():
    # 16-token tiles, 32-token splits: up to 6 splits, the last ones partly anchors / causal.
    case = make_case(11, [1, 1, 1, 1], [70, 5, 33, 90], [20, 0, 31, 1], Hq=8, Hkv=2)
    check(case, kv_split_tokens=32, config={"tile_n": 16})


@pytest.mark.parametrize("kw", [
    {"sliding_window": 5},  # narrower than a tile
    {"sliding_window": 40, "logit_softcap": 3.0},
    {"logit_softcap": 0.5},
])
def test_window_and_softcap(kw):
    case = make_case(21, [1, 4, 1, 6], [90, 40, 3, 70], [5, 20, 0, 33], Hq=4, Hkv=2)
    check(case, config={"tile_n": 16}, **kw)  # prefill mode (T != B)
    decode = make_case(22, [1, 1, 1], [90, 40, 3], [5, 20, 0], Hq=4, Hkv=2)
    check(decode, config={"tile_n": 16}, kv_split_tokens=32, **kw)


def test_window_keeps_anchors():
    """With a window of one token each query sees its own token and all anchors."""
    case = make_case(5, [3], [40], [21])
    out = check(case, sliding_window=1, config={"tile_n": 16})[0]
    no_anchor = dict(case, anchor_block_table=None, anchor_lens=None)
    alone = paged_anchor_attention(**no_anchor, sliding_window=1, config={"tile_n": 16})
    assert not torch.allclose(out.float(), alone.float(), atol=1e-2)


@pytest.mark.parametrize("q_dtype,scale_kind", [(BF16, "tensor"), (FP16, "per_head"), (BF16, "float")])
def test_fp8_kv(q_dtype, scale_kind):
    case = make_case(31, [1, 1, 1], [60, 17, 33], [20, 0, 40], Hq=4, Hkv=2, q_dtype=q_dtype, kv_dtype=FP8)
    scales = {"tensor": (torch.tensor(0.05), torch.tensor([0.7])),
              "per_head": (torch.tensor([0.05, 0.2]), torch.tensor([1.5, 0.3])),
              "float": (0.1, 2.0)}[scale_kind]
    check(case, k_scale=scales[0], v_scale=scales[1], kv_split_tokens=32, config={"tile_n": 16})


def test_fp8_kv_prefill():
    case = make_case(32, [5, 1], [60, 17], [20, 3], Hq=8, Hkv=4, kv_dtype=FP8)
    check(case, k_scale=torch.tensor([0.05, 0.1, 0.2, 0.3]), v_scale=0.5)


def _subset(case, rows, extra_cols=0):
    """The sub-batch of sequences ``rows`` (block tables widened by ``extra_cols``)."""
    qsl = case["query_start_loc"].tolist()
    q = torch.cat([case["q"][qsl[b]:qsl[b + 1]] for b in rows])
    q_lens = [qsl[b + 1] - qsl[b] for b in rows]
    pad = torch.full((len(rows), extra_cols), 10 ** 6, dtype=torch.int32)
    return dict(
        case, q=q, query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
        block_table=torch.cat([case["block_table"][rows], pad], 1), seq_lens=case["seq_lens"][rows],
        anchor_block_table=torch.cat([case["anchor_block_table"][rows], pad], 1),
        anchor_lens=case["anchor_lens"][rows])


def _rows_of(out, case, b):
    qsl = case["query_start_loc"].tolist()
    return out[qsl[b]:qsl[b + 1]]


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_deterministic_and_batch_invariant(mode):
    if mode == "decode":
        case = make_case(41, [1] * 4, [70, 5, 33, 90], [20, 0, 31, 1], Hq=8, Hkv=2)
        kw = {"kv_split_tokens": 32, "config": {"tile_n": 16}, "return_lse": True}
    else:
        case = make_case(42, [3, 5, 2], [70, 5, 33], [20, 0, 31], Hq=8, Hkv=2)
        kw = {"config": {"tile_n": 16}, "return_lse": True}
    out, lse = paged_anchor_attention(**case, **kw)
    out2, lse2 = paged_anchor_attention(**case, **kw)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for rows, extra in (([0], 0), ([3, 1] if mode == "decode" else [2, 1], 4)):
        sub = _subset(case, rows, extra)
        o, s = paged_anchor_attention(**sub, **kw)
        for i, b in enumerate(rows):
            assert torch.equal(_rows_of(o, sub, i), _rows_of(out, case, b)), (rows, b)
            assert torch.equal(_rows_of(s, sub, i), _rows_of(lse, case, b)), (rows, b)


def test_split_length_only_changes_rounding():
    case = make_case(43, [1, 1], [90, 40], [20, 3])
    a = paged_anchor_attention(**case, kv_split_tokens=32, config={"tile_n": 16})
    b = paged_anchor_attention(**case, kv_split_tokens=2048, config={"tile_n": 16})
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_validate_false_same_result():
    case = make_case(51, [1, 1], [30, 7], [4, 0])
    assert torch.equal(paged_anchor_attention(**case), paged_anchor_attention(**case, validate=False))


def test_custom_op_opcheck_and_compile():
    case = make_case(61, [1, 1], [20, 7], [4, 0])
    op = torch.ops.fieldprint.paged_anchor_attention.default
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_table"], case["seq_lens"],
            case["query_start_loc"], case["anchor_block_table"], case["anchor_lens"], None, None,
            0.125, 1.0, 1.0, 0, 0.0, 2048, 0, 0, 0, 0)
    result = torch.library.opcheck(op, args)  # schema, fake tensor, aot dispatch
    assert set(result.values()) == {"SUCCESS"}, result

    def f(c):
        return paged_anchor_attention(**c, validate=False) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(case), f(case))


def test_sm90_compile_specs_compile():
    """The E2 compile specs build for sm_90 on a CPU (fresh process: no interpreter)."""
    code = (
        "import torch, triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from fieldprint.attention.kernel import sm90_compile_specs\n"
        "specs = sm90_compile_specs(64, 16, torch.float8_e4m3fn, 4, 'decode')\n"
        "assert [s.fn.__name__ for s in specs] == ['_paged_anchor_attn_kernel', '_combine_kernel']\n"
        "for s in specs:\n"
        "    k = triton.compile(ASTSource(s.fn, s.signature, s.constexprs, s.attrs),\n"
        "                       target=GPUTarget('cuda', 90, 32), options=s.options)\n"
        "    print(s.fn.__name__, k.metadata.shared, k.metadata.num_warps)\n"
    )
    stdout = run_compiled(code)
    lines = stdout.split("\n")
    assert lines[0].startswith("_paged_anchor_attn_kernel") and int(lines[0].split()[1]) > 0


def test_register_cap_only_for_decode_without_anchors():
    """kernel_config caps registers for the one launch that needs it (decode, no anchors, 2-byte
    KV, head dim <= 128, default walk); every other launch keeps the compiler's choice."""
    from fieldprint.attention.kernel import NO_ANCHOR_DECODE_MAXNREG, kernel_config

    assert kernel_config(128, 16, 4, "decode", BF16, anchors=False)["maxnreg"] == NO_ANCHOR_DECODE_MAXNREG
    assert kernel_config(64, 16, 8, "decode", FP16, anchors=False)["maxnreg"] == NO_ANCHOR_DECODE_MAXNREG
    for kw in ({"anchors": True}, {"anchors": False, "pipelined": True}):
        assert kernel_config(128, 16, 4, "decode", BF16, **kw)["maxnreg"] is None, kw
    assert kernel_config(128, 16, 4, "decode", FP8, anchors=False)["maxnreg"] is None
    assert kernel_config(256, 16, 4, "decode", BF16, anchors=False)["maxnreg"] is None
    assert kernel_config(128, 16, 4, "prefill", BF16, anchors=False)["maxnreg"] is None


def test_decode_without_anchors_fits_four_programs_per_sm():
    """Compiled for sm_90 at D=128 with bf16 KV, the capped launch without anchors uses at most
    128 registers and does not spill: 4 programs of 4 warps fit an SM's 64K registers (uncapped it
    took 146, 3 per SM); the launch with anchors stays uncapped (fresh process: no interpreter)."""
    code = (
        "import torch\n"
        "from fieldprint.attention.kernel import sm90_compile_specs\n"
        "from fieldprint.sram import compile_resources\n"
        "for anchors in (False, True):\n"
        "    s = sm90_compile_specs(128, 16, torch.bfloat16, 4, 'decode', anchors=anchors)[0]\n"
        "    r = compile_resources(*s, attrs=s.attrs)\n"
        "    print(anchors, s.options.get('maxnreg'), r['registers'], r['num_warps'], r['spill_stores'])\n"
    )
    rows = [line.split() for line in run_compiled(code).strip().split("\n")]
    (cap, regs, warps, spills), anchored = rows[0][1:], rows[1][1:]
    assert int(cap) == 128 and int(spills) == 0, rows
    assert 4 * int(regs) * 32 * int(warps) <= 65536, rows
    assert anchored[0] == "None" and anchored[3] == "0", rows


def test_compile_specs_refuse_interpreter():
    from fieldprint.attention.kernel import sm90_compile_specs

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sm90_compile_specs(64, 16, BF16, 4, "decode")


def test_inline_e4m3_conversion_only_where_the_gpu_has_it(monkeypatch):
    """fp8 V tiles use inline PTX only in compiled kernels on sm_89+ (the interpreter and older
    GPUs take the plain cast)."""
    from fieldprint.attention import kernel

    cuda = torch.device("cuda", 0)
    assert not kernel._e4m3_asm(FP8, cuda)  # the interpreter is on in this file
    monkeypatch.delenv("TRITON_INTERPRET")
    for cap, want in (((9, 0), True), ((8, 9), True), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, cap=cap: cap)
        assert kernel._e4m3_asm(FP8, cuda) is want
    assert not kernel._e4m3_asm(BF16, cuda) and not kernel._e4m3_asm(FP8, torch.device("cpu"))
