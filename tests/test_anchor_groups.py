"""Read-once anchor groups (``paged_anchor_attention(..., anchor_groups=...)``) in the Triton
interpreter, in decode and in chunked-prefill batches: against the float64 reference and the
ungrouped kernel at the default group tiles (decode: 64 rows, 16 query tokens at GQA 4, 8 at
GQA 8; prefill: 128 rows), with groups narrower and wider than one tile and sequences whose
tokens span tiles; bitwise
independence of a sequence's output from its group and its row and tile in it; argument errors
(``group_block_m`` included), and the groups a PagedKVCache builds.

Every float buffer the kernel allocates is filled with NaN first (``poisoned_empty``), so a
partial that no program writes (an anchor split a group tile skipped) shows up as NaN.
"""

from __future__ import annotations

import dataclasses
import os
import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from test_attention_kernel import BF16, FP8, FP16, TOL, poisoned_empty, reference, run_compiled  # noqa: F401 (an autouse fixture)

from fieldprint.attention import paged_anchor_attention, paged_inputs, reference_attention
from fieldprint.attention.kernel import _shared_split_tiles, kernel_config, shared_split_tiles, shared_splits_wanted
from fieldprint.cache import PagedKVCache

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
# 16-token KV tiles and 32-token splits: anchors of up to 3 splits at these tiny lengths.
SMALL = {"kv_split_tokens": 32, "config": {"tile_n": 16}}


def grouped_case(seed, lens, groups, anchor_lens, *, q_lens=None, Hq=4, Hkv=1, D=64, bs=16,
                 kv_dtype=None, q_dtype=BF16):
    """A decode batch whose sequences in each of ``groups`` share one anchor: every sequence gets
    its own anchor pages (scrambled pool, NaN in unowned slots), then each group's members take
    the first member's anchor row and length. Returns (call kwargs, anchor_groups [G, W])."""
    q_lens = q_lens or [1] * len(lens)
    case = paged_inputs.make_case(
        lens, q_lens, anchor_lens, heads_q=Hq, heads_kv=Hkv, head_dim=D, block_size=bs, dtype=q_dtype,
        kv_dtype=kv_dtype, shared_anchors=False, spare_blocks=2, unused_ids="out_of_pool",
        generator=torch.Generator().manual_seed(seed))
    kw = {f.name: getattr(case, f.name) for f in dataclasses.fields(case)}
    for members in groups:
        for m in members[1:]:
            kw["anchor_block_table"][m] = kw["anchor_block_table"][members[0]]
            kw["anchor_lens"][m] = kw["anchor_lens"][members[0]]
    width = max(len(g) for g in groups)
    table = torch.tensor([g + [-1] * (width - len(g)) for g in groups], dtype=torch.int32)
    return kw, table


def check(case, groups, **kw):
    """Grouped call vs float64 reference and vs the ungrouped kernel; returns (out, lse)."""
    ref_kw = {k: v for k, v in kw.items() if k not in ("kv_split_tokens", "config")}
    out, lse = paged_anchor_attention(**case, anchor_groups=groups, return_lse=True, **kw)
    ref, ref_lse = reference(case, **ref_kw)
    assert not out.isnan().any() and not lse.isnan().any()
    tol = TOL[case["q"].dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-3, rtol=1e-4)
    plain, plain_lse = paged_anchor_attention(**case, return_lse=True, **kw)
    torch.testing.assert_close(out.float(), plain.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, plain_lse, atol=1e-3, rtol=1e-4)
    return out, lse


# Ten decode sequences, GROUP 4: a group of five (sequence 5's 150 anchor tokens, not
# page-aligned: 10 KV tiles of 16, cut by the shared-prefix rule into anchor splits of 8 and 2
# tiles; narrower than one 64-row group tile), a group of two with a 9-token anchor (shorter than a
# page), an empty group row, and ungrouped sequences with (1, 7) and without (4) anchors.
LENS = [40, 5, 34, 1, 20, 17, 45, 12, 30, 3]
ANCHORS = [37, 20, 9, 11, 0, 150, 30, 50, 8, 2]
GROUPS = [[5, 0, 3, 8, 9], [2, 6], []]


def test_groups_match_reference_and_ungrouped():
    case, groups = grouped_case(1, LENS, GROUPS, ANCHORS, Hq=8, Hkv=2)
    out = check(case, groups, **SMALL)[0]
    assert torch.equal(out, paged_anchor_attention(**case, anchor_groups=groups, validate=False, **SMALL))


@triton.jit
def _split_rule_kernel(n_ptr, out_ptr, wanted, N: tl.constexpr):
    """out[i] = the kernel's tiles per anchor split for n[i] anchor tiles."""
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, _shared_split_tiles(tl.load(n_ptr + offs), wanted))


def test_anchor_split_rule_on_the_device_matches_the_host():
    """The group tiles' anchor splits follow the shared-prefix rule: the kernel's twin of
    ``shared_split_tiles`` gives the same tiles per split for every anchor length and KV head
    count tried, and the rule's split count stays within ``shared_splits_wanted``."""
    n_tiles = torch.tensor([0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 511, 512, 1000, 2048, 4097], dtype=torch.int32)
    for hkv in (1, 2, 4, 8, 32, 264, 300):
        out = torch.empty_like(n_tiles)
        _split_rule_kernel[(1,)](n_tiles, out, shared_splits_wanted(hkv), N=n_tiles.numel())
        want = [shared_split_tiles(int(n), hkv) for n in n_tiles]
        assert out.tolist() == want, hkv
        assert all(-(-int(n) // t) <= shared_splits_wanted(hkv) for n, t in zip(n_tiles, want, strict=True))


def test_groups_default_split_length_and_fp16():
    case, groups = grouped_case(2, LENS, GROUPS, ANCHORS, q_dtype=FP16)
    check(case, groups, config={"tile_n": 16})  # one anchor split + one context split each


def test_groups_window_and_softcap():
    """A window limits the context only: a grouped sequence keeps every anchor token."""
    case, groups = grouped_case(3, LENS, GROUPS, ANCHORS)
    check(case, groups, sliding_window=6, logit_softcap=2.0, **SMALL)


def test_group_wider_than_one_default_tile():
    """At GQA 8 a 64-row group tile holds 8 sequences: a group of 10 spans two tiles (8 + 2);
    its anchor (45 tokens) ends inside a page and inside a KV tile; a group of two and an
    ungrouped sequence share the launch."""
    lens = [3, 9, 1, 14, 6, 2, 11, 5, 8, 1, 4, 13, 7]
    anchors = [45] * 10 + [21, 30, 21]
    groups = [[9, 0, 3, 1, 8, 5, 6, 2, 4, 7], [10, 12]]
    case, table = grouped_case(14, lens, groups, anchors, Hq=8, Hkv=1)
    check(case, table, **SMALL)


def test_groups_fp8_kv():
    case, groups = grouped_case(4, LENS, GROUPS, ANCHORS, Hq=8, Hkv=2, kv_dtype=FP8)
    check(case, groups, k_scale=torch.tensor([0.05, 0.2]), v_scale=torch.tensor([1.5, 0.3]), **SMALL)


def test_group_tiles_read_the_first_members_anchor():
    """The group tiles, not the sequences' own programs, attend to a grouped sequence's anchor:
    with validate=False and a member whose own anchor pages differ from the group's first
    member's, its result is attention over the first member's anchor pages."""
    case, groups = grouped_case(5, [30, 20, 25], [[0, 1]], [35, 35, 35])
    case["anchor_block_table"][1] = case["anchor_block_table"][2]  # sequence 2's own anchor pages
    out = paged_anchor_attention(**case, anchor_groups=groups, validate=False, **SMALL)
    as_leader = dict(case, anchor_block_table=case["anchor_block_table"].clone())
    as_leader["anchor_block_table"][1] = case["anchor_block_table"][0]
    ref = reference(as_leader)[0]
    torch.testing.assert_close(out.double()[1], ref[1], atol=2e-2, rtol=2e-2)
    assert not torch.allclose(out.double()[1], reference(case)[0][1], atol=5e-2)


def test_decode_mode_groups_with_other_query_counts():
    """Decode mode (T == B) with a grouped sequence of 0 and one of 2 query tokens: the group
    tiles take the two tokens of one and nothing of the other."""
    case, groups = grouped_case(6, [40, 5, 70, 12], [[0, 1, 2, 3]], [37, 0, 0, 0], q_lens=[2, 0, 1, 1])
    check(case, groups, **SMALL)


# A chunked-prefill batch (T != B), GQA 4: 32 query tokens per 128-row group tile. Group one
# holds 5 + 20 + 1 + 9 + 0 = 35 tokens (two tiles; sequence 1's 9 tokens, from group token 26,
# span both; sequence 7's chunk is empty), group two 3 + 16 tokens; sequences 2 and 6 are
# ungrouped (6 without anchors).
P_LENS = [12, 30, 3, 16, 44, 9, 25, 7, 16]
P_QLENS = [5, 9, 2, 3, 20, 1, 25, 0, 16]
P_ANCHORS = [37, 21, 11, 21, 20, 23, 0, 50, 8]
P_GROUPS = [[0, 4, 5, 1, 7], [3, 8]]


@pytest.mark.parametrize("q_dtype,kv_dtype", [(BF16, None), (FP16, None), (BF16, FP8)])
def test_prefill_groups_match_reference_and_ungrouped(q_dtype, kv_dtype):
    case, groups = grouped_case(21, P_LENS, P_GROUPS, P_ANCHORS, q_lens=P_QLENS, q_dtype=q_dtype,
                                kv_dtype=kv_dtype)
    scales = {"k_scale": 0.2, "v_scale": 1.5} if kv_dtype else {}
    check(case, groups, config={"tile_n": 16}, **scales)


def test_prefill_groups_window_softcap_and_wide_gqa():
    """GQA 8 (16 tokens per group tile: sequence 4's 20 tokens from group token 5 span two),
    a window shorter than the chunks (anchors stay visible) and a softcap."""
    case, groups = grouped_case(22, P_LENS, P_GROUPS, P_ANCHORS, q_lens=P_QLENS, Hq=16, Hkv=2)
    check(case, groups, sliding_window=5, logit_softcap=3.0, config={"tile_n": 16})


def test_prefill_output_bits_do_not_depend_on_the_group(rowwise_interpreter_dot):
    """Chunked prefill: sequence X's 11 query tokens give the same output and lse bits alone in
    its group, after members that put its tokens across a tile boundary, and in a batch of a
    different size (fixed tile shapes; every layout is a prefill batch)."""
    lens, q_lens = [30, 9, 20, 14, 17, 40], [6, 9, 2, 11, 13, 4]
    n = len(lens)
    case, _ = grouped_case(23, lens, [list(range(n))], [29] * n, q_lens=q_lens)
    X = 3
    layouts = [  # (batch rows, groups as batch positions, X's position in the batch)
        ([X, 5], [[0]], 0),
        (list(range(n)), [[4, 1, 2, X]], X),  # X's tokens from group token 24: tiles 0 and 1
        (list(range(n)), [[0, X], [4, 1, 2]], X),  # from token 6, inside tile 0
        ([2, 0, X], [[1, 2, 0]], 2),
    ]
    results = []
    for rows, g, pos in layouts:
        sub = _subset(case, rows) if rows != list(range(n)) else case
        width = max(len(m) for m in g) + 1
        out, lse = paged_anchor_attention(**sub, anchor_groups=torch.tensor(
            [m + [-1] * (width - len(m)) for m in g], dtype=torch.int32), return_lse=True,
            config={"tile_n": 16})
        qsl = sub["query_start_loc"]
        results.append((out[qsl[pos]:qsl[pos + 1]], lse[qsl[pos]:qsl[pos + 1]]))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    qsl = case["query_start_loc"]
    ref = reference(case)[0][qsl[X]:qsl[X + 1]]
    torch.testing.assert_close(results[0][0].double(), ref, atol=2e-2, rtol=2e-2)


def test_no_group_rows_is_bitwise_the_ungrouped_path():
    case, _ = grouped_case(7, [20, 5, 34], [[0]], [37, 0, 9])
    empty = torch.full((2, 3), -1, dtype=torch.int32)
    for groups in (empty, empty[:0]):
        a = paged_anchor_attention(**case, anchor_groups=groups, return_lse=True, **SMALL)
        b = paged_anchor_attention(**case, return_lse=True, **SMALL)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _subset(case, rows):
    """The sub-batch of sequences ``rows`` (their query tokens in that order), tables widened by
    3 columns."""
    pad = torch.full((len(rows), 3), 10 ** 6, dtype=torch.int32)
    qsl = case["query_start_loc"].tolist()
    q = torch.cat([case["q"][qsl[r]:qsl[r + 1]] for r in rows])
    q_lens = torch.tensor([0] + [qsl[r + 1] - qsl[r] for r in rows])
    return dict(case, q=q, query_start_loc=q_lens.cumsum(0).to(torch.int32),
                block_table=torch.cat([case["block_table"][rows], pad], 1), seq_lens=case["seq_lens"][rows],
                anchor_block_table=torch.cat([case["anchor_block_table"][rows], pad], 1),
                anchor_lens=case["anchor_lens"][rows])


@pytest.fixture
def rowwise_interpreter_dot(monkeypatch):
    """The interpreter's ``tl.dot`` is ``np.matmul``, whose BLAS runs different micro-kernels for
    different row positions (row 6 of a 16-row product can differ in the last bit from the same
    row placed at row 0): a property of the CPU emulation, not of the kernel (a GPU mma computes
    every row of a fixed-shape tile with the same instructions). Replaced here by ``einsum``,
    whose per-element summation order is the same for every row, so that the bitwise test checks
    the kernel's own row independence (masks, online softmax, split layout)."""
    from triton.runtime import interpreter

    rowwise = types.ModuleType("numpy_rowwise_matmul")
    rowwise.__getattr__ = lambda name: getattr(np, name)
    rowwise.matmul = lambda a, b, dtype=None: np.einsum("ik,kj->ij", a, b, dtype=dtype)
    monkeypatch.setattr(interpreter, "np", rowwise)


def test_rowwise_dot_is_row_invariant():
    """The fixture's product gives a row the same bits at every row position."""
    g = np.random.default_rng(0)
    a, b = g.standard_normal((16, 64), dtype=np.float32), g.standard_normal((64, 16), dtype=np.float32)
    want = np.einsum("ik,kj->ij", a, b)[0]
    for row in range(16):
        moved = g.standard_normal((16, 64), dtype=np.float32)
        moved[row] = a[0]
        assert np.array_equal(np.einsum("ik,kj->ij", moved, b)[row], want), row


def test_output_bits_do_not_depend_on_the_group(rowwise_interpreter_dot):
    """Sequence X's output and lse bits are the same when its group holds 1, 3, 8 or 10
    sequences, at different slots and tiles (GQA 8: a 64-row group tile holds 8 sequences, so
    slot 9 is the second tile's slot 1), in batches of different sizes and table widths (fixed tile
    shapes and split length)."""
    lens = [30, 7, 40, 3, 37, 1, 21, 9, 5, 12]
    n = len(lens)
    case, _ = grouped_case(8, lens, [list(range(n))], [150] * n, Hq=8, Hkv=1)  # 10 tiles: 2 anchor splits
    X = 4
    layouts = [  # (batch rows, groups as batch positions, X's position in the batch)
        ([X], [[0]], 0),
        ([1, X, 8], [[2, 0, 1]], 1),  # X at slot 2
        (list(range(n)), [[0, 1, 2, 3, 5, 6, X, 7]], X),  # slot 6
        (list(range(n)), [[0, 1, 2, 3, 5, 6, 7, 8, 9, X]], X),  # slot 9
        ([9, 3, X, 0, 2], [[0, 1], [4, 2, 3]], 2),
    ]
    results = []
    for rows, g, pos in layouts:
        sub = _subset(case, rows) if rows != list(range(n)) else case
        width = max(len(m) for m in g) + 2
        out, lse = paged_anchor_attention(**sub, anchor_groups=torch.tensor(
            [m + [-1] * (width - len(m)) for m in g], dtype=torch.int32), return_lse=True, **SMALL)
        results.append((out[pos], lse[pos]))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    ref = reference(case)[0][X]
    torch.testing.assert_close(results[0][0].double(), ref, atol=2e-2, rtol=2e-2)


def _bad_groups():
    def rows(*r):
        return torch.tensor(r, dtype=torch.int32)

    return [
        (rows([0, 1], [1, -1]), ValueError, "lists sequence 1 2 times"),
        (rows([0, 0]), ValueError, "lists sequence 0 2 times"),
        (rows([0, 3]), ValueError, r"anchor_groups\[0, 1\] = 3 is not a sequence index"),
        (rows([0, -2]), ValueError, r"anchor_groups\[0, 1\] = -2 is not a sequence index"),
        (rows([-1, 0]), ValueError, r"anchor_groups\[0, 1\] follows padding"),
        (rows([0, 2]), ValueError, "has anchor_lens 9 but the group's first sequence 0 has 37"),
        (torch.tensor([[0, 1]]), ValueError, "2-D int32"),
        (rows(0, 1), ValueError, "2-D int32"),
        ([[0, 1]], TypeError, "anchor_groups must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("bad,error,match", _bad_groups())
def test_bad_groups(bad, error, match):
    case, _ = grouped_case(10, [10, 12, 14], [[0, 1]], [37, 0, 9])
    with pytest.raises(error, match=match):
        paged_anchor_attention(**case, anchor_groups=bad)


def test_group_with_other_anchor_pages_is_refused():
    case, groups = grouped_case(11, [10, 12], [[0, 1]], [37, 37])
    case["anchor_block_table"][1, 2] = case["block_table"][0, 0]  # third anchor page differs
    with pytest.raises(ValueError, match="has anchor page .* at anchor_block_table column 2"):
        paged_anchor_attention(**case, anchor_groups=groups)
    # a column past the group's pages may differ
    case["anchor_block_table"][1, 2] = case["anchor_block_table"][0, 2]
    case["anchor_block_table"][1, 3] = 12345
    paged_anchor_attention(**case, anchor_groups=groups)


@pytest.mark.parametrize("rows", [24, 8, -64, 32.0, "64"])
def test_bad_group_block_m(rows):
    case, groups = grouped_case(15, [10, 12], [[0, 1]], [5, 5])
    with pytest.raises(ValueError, match=r"group_block_m must be a power of two >= max\(16, group rows 4\)"):
        paged_anchor_attention(**case, anchor_groups=groups, config={"group_block_m": rows})


def test_group_block_m_covers_the_padded_gqa_group():
    """Default: 64 rows in decode, the query tiles' rows in prefill, or the padded GQA group
    when that is larger (one sequence per tile);
    an override smaller than the padded group is refused."""
    assert kernel_config(128, 16, 4, "decode", BF16)["group_block_m"] == 64
    assert kernel_config(128, 16, 4, "decode", BF16, group_block_m=32)["group_block_m"] == 32
    assert kernel_config(64, 16, 96, "decode", FP8)["group_block_m"] == 128
    assert kernel_config(128, 16, 4, "prefill", BF16)["group_block_m"] == 128
    assert kernel_config(256, 16, 4, "prefill", BF16)["group_block_m"] == 64
    with pytest.raises(ValueError, match=r"group_block_m must .* group rows 32\), got 16"):
        kernel_config(64, 16, 32, "decode", BF16, group_block_m=16)


def test_groups_need_anchors():
    case, groups = grouped_case(12, [10, 12], [[0, 1]], [5, 5])
    with pytest.raises(ValueError, match="anchor_groups needs anchor_block_table"):
        paged_anchor_attention(**dict(case, anchor_block_table=None, anchor_lens=None), anchor_groups=groups)


def test_cache_anchor_groups():
    """PagedKVCache.anchor_groups: batch positions of the sequences sharing each anchor."""
    torch.manual_seed(0)
    Hkv, D, bs = 2, 64, 16
    cache = PagedKVCache(1, 64, bs, Hkv, D, dtype=BF16, seed=3, poison=True)
    anchors = [cache.add_anchor(torch.randn(1, n, Hkv, D), torch.randn(1, n, Hkv, D)) for n in (21, 9)]
    seqs = []
    for anchor, n in ((anchors[0], 30), (None, 12), (anchors[1], 17), (anchors[0], 5), (anchors[0], 40),
                      (anchors[1], 8), (anchors[1], 3)):
        s = cache.add_sequence(anchor)
        cache.append(s, torch.randn(1, n, Hkv, D), torch.randn(1, n, Hkv, D))
        seqs.append(s)
    batch = [seqs[i] for i in (4, 1, 0, 2, 3, 5)]  # seqs[6] is not in this batch
    groups = cache.anchor_groups(batch)
    assert groups.dtype == torch.int32 and groups.tolist() == [[0, 2, 4], [3, 5, -1]]
    assert cache.anchor_groups(batch[:3]).tolist() == [[0, 2]]  # one sequence alone is no group
    assert cache.anchor_groups([seqs[1]]).shape == (0, 1)
    args = dataclasses.asdict(cache.kernel_args(batch))
    q = torch.randn(len(batch), 4 * Hkv, D).to(BF16)
    kv = {"k_cache": cache.k_cache(0), "v_cache": cache.v_cache(0)}
    out = paged_anchor_attention(q, **kv, **args, anchor_groups=groups, **SMALL)
    ref = reference_attention(q.double(), cache.k_cache(0).double(), cache.v_cache(0).double(), **args)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_custom_op_accepts_groups():
    case, groups = grouped_case(13, [20, 7, 9], [[0, 2]], [21, 0, 4])
    op = torch.ops.fieldprint.paged_anchor_attention.default
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_table"], case["seq_lens"],
            case["query_start_loc"], case["anchor_block_table"], case["anchor_lens"], None, None,
            0.125, 1.0, 1.0, 0, 0.0, 32, 16, 0, 0, 0, groups)
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_groups_variant_compiles_for_sm90():
    """The launches with anchor_groups (attention at the default group tiles, 64 rows in
    decode and 128 in prefill, and the split combine) build for sm_90 without spills at head
    dim 128 with fp8 KV, in decode (the variant with the most registers: 255 of 255; bf16: 233)
    and in prefill (254; the bf16 prefill kernel spills a few bytes with and without groups: E2
    reports it) (fresh process: no interpreter)."""
    code = (
        "import torch\n"
        "from fieldprint.attention.kernel import sm90_compile_specs\n"
        "from fieldprint.sram import compile_resources\n"
        "for mode in ('decode', 'prefill'):\n"
        "    for s in sm90_compile_specs(128, 16, torch.float8_e4m3fn, 4, mode, anchor_groups=True):\n"
        "        r = compile_resources(*s, attrs=s.attrs)\n"
        "        print(mode, s.fn.__name__, s.constexprs.get('GROUP_BLOCK_M', '-'), r['spill_stores'],\n"
        "              r['spill_loads'])\n"
    )
    stdout = run_compiled(code)
    rows = [line.split() for line in stdout.strip().split("\n")]
    want = [[mode, fn, tile_rows] for mode, m in (("decode", "64"), ("prefill", "128"))
            for fn, tile_rows in (("_paged_anchor_attn_kernel", m), ("_combine_kernel", "-"))]
    assert [r[:3] for r in rows] == want, rows
    assert all(r[3:] == ["0", "0"] for r in rows), rows


def test_groups_compile_spec_needs_anchors():
    from fieldprint.attention.kernel import sm90_compile_specs

    with pytest.raises(ValueError, match="anchor_groups needs anchors=True"):
        sm90_compile_specs(64, 16, BF16, 4, "decode", anchors=False, anchor_groups=True)
