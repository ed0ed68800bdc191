"""The opt-in pipelined decode walk (``config={"pipelined": True}``, one loop per split with the
page ids of the next tile carried ahead, see ``kernel._attend_split_one_loop``).

Interpreter: against the float64 reference (ragged lengths, anchors not page-aligned, scrambled
block tables with NaN in unowned slots, several splits, every float buffer the kernel allocates
poisoned with NaN) and bit for bit against the default decode path at the same tile shapes (the
per-tile arithmetic is the same, in the same order; only the loop structure and the masks of
tiles the default path runs unmasked differ, and an all-true mask changes no value). Prefill
launches ignore the flag. sm_90 compile (fresh process, no GPU): the K/V tiles are
multi-buffered (shared memory grows by one K+V tile per extra stage, cp.async waits leave
tiles in flight) within 4 programs per SM (<= 128 registers, <= 56 KB of shared memory).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_attention_kernel import BF16, FP8, FP16, TOL, make_case, poisoned_empty, reference, run_compiled  # noqa: F401 (an autouse fixture)

from fieldprint.attention import paged_anchor_attention
from fieldprint.attention.kernel import kernel_config

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def check_pipelined(case, config, **kw):
    """Pipelined call vs float64 reference and, bitwise, vs the default path with ``config``."""
    ref_kw = {k: v for k, v in kw.items() if k not in ("kv_split_tokens", "anchor_groups")}
    out, lse = paged_anchor_attention(**case, return_lse=True, config={**config, "pipelined": True}, **kw)
    ref, ref_lse = reference(case, **ref_kw)
    assert not out.isnan().any() and not lse.isnan().any()
    tol = TOL[case["q"].dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-3, rtol=1e-4)
    plain, plain_lse = paged_anchor_attention(**case, return_lse=True, config=config, **kw)
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
    return out, lse


@pytest.mark.parametrize("Hq,Hkv,bs,tile_n,lens,a_lens", [
    # one page per tile (scalar page ids): 16-token tiles on 16- and 32-token pages
    (8, 2, 16, 16, [70, 5, 33, 90, 1], [20, 0, 31, 1, 17]),
    (4, 1, 32, 16, [45, 64, 9], [37, 0, 64]),
    # two pages per tile (vector page ids)
    (4, 2, 16, 32, [70, 96, 3, 50], [9, 33, 0, 64]),
])
def test_pipelined_matches_reference_and_default(Hq, Hkv, bs, tile_n, lens, a_lens):
    # 64-token splits: up to 3 splits per sequence, anchors ending mid-split and mid-tile.
    case = make_case(sum(lens) + bs, [1] * len(lens), lens, a_lens, Hq=Hq, Hkv=Hkv, bs=bs,
                     shared_anchors=False, extra_cols=2)
    check_pipelined(case, {"tile_n": tile_n}, kv_split_tokens=64)


def test_pipelined_without_anchors_and_one_split():
    case = make_case(41, [1, 1, 1], [40, 7, 63], [0, 0, 0], Hq=4, Hkv=2)
    no_anchor = dict(case, anchor_block_table=None, anchor_lens=None)
    check_pipelined(no_anchor, {"tile_n": 16})


@pytest.mark.parametrize("kw", [
    {"sliding_window": 5},  # narrower than a tile: context tiles skipped, anchors kept
    {"sliding_window": 40, "logit_softcap": 3.0},
])
def test_pipelined_window_and_softcap(kw):
    case = make_case(22, [1, 1, 1], [90, 40, 3], [5, 20, 0], Hq=4, Hkv=2)
    check_pipelined(case, {"tile_n": 16}, kv_split_tokens=32, **kw)


def test_pipelined_fp8_kv():
    case = make_case(31, [1, 1, 1], [60, 17, 33], [20, 0, 40], Hq=4, Hkv=2, q_dtype=FP16, kv_dtype=FP8)
    check_pipelined(case, {"tile_n": 16}, k_scale=torch.tensor([0.05, 0.2]), v_scale=torch.tensor([1.5, 0.3]),
                    kv_split_tokens=32)


def test_pipelined_with_anchor_groups():
    """Grouped sequences' own programs walk only their context in the pipelined loop; the group
    tiles and the combine are those of the default path."""
    case = make_case(52, [1] * 5, [40, 5, 34, 20, 17], [37, 37, 37, 9, 9], Hq=4, Hkv=1)
    groups = torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32)
    check_pipelined(case, {"tile_n": 16}, kv_split_tokens=32, anchor_groups=groups)


def test_prefill_ignores_pipelined():
    case = make_case(61, [5, 1, 3], [60, 17, 9], [20, 3, 0], Hq=4, Hkv=2)
    a = paged_anchor_attention(**case, config={"tile_n": 16, "pipelined": True})
    b = paged_anchor_attention(**case, config={"tile_n": 16})
    assert torch.equal(a, b)
    assert not kernel_config(128, 16, 4, "prefill", BF16, pipelined=True)["pipelined"]


def test_pipelined_config_and_errors():
    cfg = kernel_config(128, 16, 4, "decode", BF16, pipelined=True)
    assert (cfg["pipelined"], cfg["tile_n"], cfg["num_stages"], cfg["num_warps"]) == (True, 32, 4, 4)
    assert kernel_config(128, 16, 4, "decode", FP8, pipelined=True)["num_stages"] == 6
    assert kernel_config(64, 16, 4, "decode", BF16, pipelined=True, tile_n=16)["tile_n"] == 16
    assert not kernel_config(128, 16, 4, "decode", BF16)["pipelined"]
    with pytest.raises(ValueError, match="pipelined must be a bool"):
        kernel_config(128, 16, 4, "decode", BF16, pipelined=1)
    case = make_case(3, [1], [5], [3])
    with pytest.raises(ValueError, match="pipelined must be a bool"):
        paged_anchor_attention(**case, config={"pipelined": "yes"})


def test_pipelined_sm90_multibuffers_within_four_programs_per_sm():
    """Compiled for sm_90 (fresh process: no interpreter), D=128, 16-token pages, GQA 4. One
    extra stage adds exactly one K+V tile of shared memory (a real ring of buffers, unlike the
    default path, whose shared memory does not grow), the loop's cp.async waits leave tiles in
    flight, and registers and shared memory allow 4 programs per SM."""
    code = (
        "import re, torch, triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from fieldprint.attention.kernel import sm90_compile_specs\n"
        "from fieldprint.sram import compile_resources\n"
        "for kv in (torch.bfloat16, torch.float8_e4m3fn):\n"
        "    base = sm90_compile_specs(128, 16, kv, 4, 'decode', pipelined=True)[0]\n"
        "    stages = base.options['num_stages']\n"
        "    for s in (stages - 1, stages):\n"
        "        spec = sm90_compile_specs(128, 16, kv, 4, 'decode', pipelined=True, num_stages=s)[0]\n"
        "        k = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs),\n"
        "                           target=GPUTarget('cuda', 90, 32), options=spec.options)\n"
        "        waits = [int(w) for w in re.findall(r'cp\\.async\\.wait_group\\s+(\\d+)', k.asm['ptx'])]\n"
        "        line = [str(kv), s, spec.constexprs['TILE_N'], k.metadata.shared, max(waits, default=-1)]\n"
        "        if s == stages:\n"
        "            res = compile_resources(*spec, attrs=spec.attrs)\n"
        "            line += [res['registers'], res['spill_stores']]\n"
        "        print(*line)\n"
    )
    stdout = run_compiled(code)
    rows = [line.split() for line in stdout.strip().split("\n")]
    assert len(rows) == 4, stdout
    for fewer, full in (rows[0:2], rows[2:4]):
        kv_bytes = 1 if "float8" in full[0] else 2
        tile_bytes = 2 * int(full[2]) * 128 * kv_bytes  # one K tile and one V tile
        assert int(full[3]) - int(fewer[3]) == tile_bytes, (fewer, full)
        assert int(fewer[4]) > 0 and int(full[4]) > int(fewer[4]), (fewer, full)  # tiles left in flight
        assert int(full[3]) <= 56 * 1024 and int(full[5]) <= 128 and int(full[6]) == 0, full
