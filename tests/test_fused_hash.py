"""Fused quantize-and-hash (fieldprint.hashing.fused) against quantize + merkle.hash_pages, page by page."""

import os

import pytest
import torch

from fieldprint.merkle import hash_pages

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU")

SEED = 0x0123456789ABCDEF  # uses both 32-bit halves of the seed


def _fused(*args, **kw):
    from fieldprint.hashing.fused import quantize_hash_pages

    return quantize_hash_pages(*args, **kw)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pages(shape, dtype, gen, fmt):
    """Random pages with a spread of magnitudes, -0.0, zero pages and values at saturation."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-6, 7, shape, generator=gen).double())
    x = x.to(dtype)
    flat = x.view(shape[0], -1)
    flat[0, :3] = -0.0
    if shape[0] > 2:
        flat[1].fill_(-0.0)  # an all-(-0) page: scale exponent 0
        # page 2: amax exactly at fmax, plus values just below it and at tiny magnitudes
        fmax = {"e4m3": 448.0, "e5m2": 57344.0, "int8": 127.0}[fmt]
        flat[2, 0] = -fmax
        flat[2, 1] = flat[2, 0] * 0.99
        flat[2, 2] = flat[2, 0] * 2.0**-20
    return x


def _reference(x, fmt, rounding, seed, ids, layer, kind):
    from fieldprint.quant import quantize

    out = []
    for i in range(x.shape[0]):
        qt = quantize(x[i:i + 1].cpu(), fmt, rounding, seed=seed, backend="torch")
        d = hash_pages(qt, page_ids=[ids[i]], layer=layer, kind=kind, backend="reference")
        out.append((qt.codes.reshape(-1), qt.scale.reshape(()), qt.helper, d[0]))
    return out


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
@pytest.mark.parametrize("rounding", ["rne", "trunc", "stochastic", "two_grid"])
def test_matches_quantize_then_hash_pages(fmt, rounding):
    gen = torch.Generator().manual_seed(hash((fmt, rounding)) % 2**31)
    dtype = {"rne": torch.bfloat16, "trunc": torch.float16, "stochastic": torch.float32,
             "two_grid": torch.bfloat16}[rounding]
    x = _pages((5, 4, 2, 16), dtype, gen, fmt)  # 128 elements: a one-chunk leaf, root in the chunk
    ids = [0, 7, 2**40 + 3, 2**63 - 1, 12]
    seed = SEED if rounding == "stochastic" else None
    codes, scales, helper, dig = _fused(x.to(_device()), fmt, rounding, page_ids=ids, layer=2**32 - 1,
                                        kind="v", seed=seed)
    assert codes.shape == (5, 128) and codes.dtype == torch.uint8
    assert scales.shape == (5,) and scales.dtype == torch.float32
    assert dig.shape == (5, 32) and dig.dtype == torch.uint8
    assert (helper is None) == (rounding != "two_grid")
    for i, (c, s, h, d) in enumerate(_reference(x, fmt, rounding, seed, ids, 2**32 - 1, "v")):
        assert torch.equal(codes[i].cpu(), c), i
        assert scales[i].item() == s.item(), i
        if h is not None:
            assert torch.equal(helper[i].cpu(), h), i
        assert torch.equal(dig[i].cpu(), d), i
    assert scales[1].item() == 1.0  # the all-(-0) page


@pytest.mark.parametrize("shape,fmt,rounding", [
    ((3, 1, 1, 4), "e4m3", "rne"),        # 4 elements: codes end inside a block (slow word path)
    ((2, 3, 1, 8), "int8", "two_grid"),   # 24 elements: a partial helper word
    ((2, 16, 1, 64), "e5m2", "two_grid"),  # 1024 elements: a 2-chunk leaf (parent kernel)
    ((1, 8, 2, 128), "e4m3", "stochastic"),  # 2048 elements: 3 chunks, an odd node carried up
])
def test_ragged_and_multi_chunk_pages(shape, fmt, rounding):
    gen = torch.Generator().manual_seed(sum(shape))
    x = _pages(shape, torch.bfloat16, gen, fmt)
    ids = list(range(100, 100 + shape[0]))
    seed = 5 if rounding == "stochastic" else None
    codes, scales, helper, dig = _fused(x.to(_device()), fmt, rounding, page_ids=torch.tensor(ids),
                                        layer=0, kind="k", seed=seed)
    for i, (c, s, h, d) in enumerate(_reference(x, fmt, rounding, seed, ids, 0, "k")):
        assert torch.equal(codes[i].cpu(), c)
        assert scales[i].item() == s.item()
        if h is not None:
            assert torch.equal(helper[i].cpu(), h)
        assert torch.equal(dig[i].cpu(), d)


def test_subnormal_and_zero_pages():
    """Pages of bf16 subnormals take the smallest scale 2**-126, which maps them to normal e4m3 codes; zeros
    stay code 0 (the quantizer once gave both wrong codes from k <= -121 on)."""
    bits = torch.arange(1, 257, dtype=torch.int32).to(torch.int16)  # bf16 subnormals, then the smallest normals
    x = bits.view(torch.bfloat16).reshape(2, 8, 1, 16).clone()
    x[1, :4] = 0.0  # zeros among subnormals
    ids = [5, 6]
    codes, scales, helper, dig = _fused(x.to(_device()), "e4m3", "two_grid", page_ids=ids, layer=1, kind="k")
    assert scales.tolist() == [2.0**-126] * 2
    assert (codes[1, :64] == 0).all() and (codes[0] != 0).sum() > 100
    for i, (c, _, h, d) in enumerate(_reference(x, "e4m3", "two_grid", None, ids, 1, "k")):
        assert torch.equal(codes[i].cpu(), c) and torch.equal(helper[i].cpu(), h) and torch.equal(dig[i].cpu(), d)


def test_key_none_and_page_header_fields_change_the_digest():
    import blake3 as ref

    from fieldprint.merkle import page_leaf_bytes
    from fieldprint.quant import quantize

    gen = torch.Generator().manual_seed(3)
    x = torch.randn((2, 4, 2, 16), generator=gen).to(_device())
    _, _, _, plain = _fused(x, "e4m3", "rne", page_ids=[1, 2], layer=1, kind="k", key=None)
    leaf = page_leaf_bytes(quantize(x[1:2].cpu(), "e4m3", "rne"), page_ids=[2], layer=1, kind="k")
    assert bytes(plain[1].cpu().tolist()) == ref.blake3(bytes(leaf[0].tolist())).digest()
    base = _fused(x, "e4m3", "rne", page_ids=[1, 2], layer=1, kind="k")[3]
    for kw in (dict(page_ids=[1, 3], layer=1, kind="k"), dict(page_ids=[1, 2], layer=2, kind="k"),
               dict(page_ids=[1, 2], layer=1, kind="v")):
        other = _fused(x, "e4m3", "rne", **kw)[3]
        assert torch.equal(other[0], base[0]) == (kw["page_ids"][0] == 1 and kw["layer"] == 1
                                                  and kw["kind"] == "k")
        assert not torch.equal(other[1], base[1])


def _ok_pages():
    return torch.randn((2, 4, 2, 16)).to(_device())


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: _fused(x.double(), page_ids=[0, 1], layer=0, kind="k"), TypeError, "pages"),
    (lambda x: _fused(x.tolist(), page_ids=[0, 1], layer=0, kind="k"), TypeError, "pages"),
    (lambda x: _fused(x.transpose(2, 3), page_ids=[0, 1], layer=0, kind="k"), ValueError, "pages.*contiguous"),
    (lambda x: _fused(x[0, 0, 0], page_ids=[0], layer=0, kind="k"), ValueError, "pages"),
    (lambda x: _fused(x[:, :1, :1, :3].contiguous(), page_ids=[0, 1], layer=0, kind="k"), ValueError, "multiple of 4"),
    (lambda x: _fused(x[:, :1, :1, :4].contiguous(), "e4m3", "two_grid", page_ids=[0, 1], layer=0, kind="k"),
     ValueError, "multiple of 8"),
    (lambda x: _fused(x, "bf16", page_ids=[0, 1], layer=0, kind="k"), ValueError, "fmt"),
    (lambda x: _fused(x, "e4m3", "nearest", page_ids=[0, 1], layer=0, kind="k"), ValueError, "rounding"),
    (lambda x: _fused(x, "e4m3", "stochastic", page_ids=[0, 1], layer=0, kind="k"), ValueError, "seed"),
    (lambda x: _fused(x, "e4m3", "rne", page_ids=[0, 1], layer=0, kind="k", seed=1), ValueError, "seed"),
    (lambda x: _fused(x, "e4m3", "stochastic", page_ids=[0, 1], layer=0, kind="k", seed=2**64), ValueError, "seed"),
    (lambda x: _fused(x, page_ids=[0], layer=0, kind="k"), ValueError, "page_ids"),
    (lambda x: _fused(x, page_ids=[0, -1], layer=0, kind="k"), ValueError, "page_ids"),
    (lambda x: _fused(x, page_ids=torch.zeros(2), layer=0, kind="k"), TypeError, "page_ids"),
    (lambda x: _fused(x, page_ids=[0.0, 1.5], layer=0, kind="k"), TypeError, "page_ids"),
    (lambda x: _fused(x, page_ids=[0, 1], layer=-1, kind="k"), ValueError, "layer"),
    (lambda x: _fused(x, page_ids=[0, 1], layer=0, kind="q"), ValueError, "kind"),
    (lambda x: _fused(x, page_ids=[0, 1], layer=0, kind="k", key=b"short"), ValueError, "key"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_ok_pages())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pages_are_rejected(bad):
    x = _ok_pages()
    x[1, 2, 1, 5] = bad
    with pytest.raises(ValueError, match="pages contains NaN or Inf"):
        _fused(x, "int8", "two_grid", page_ids=[0, 1], layer=0, kind="k")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="pages must be on a CUDA device"):
        _fused(torch.randn((2, 4, 2, 16)), page_ids=[0, 1], layer=0, kind="k")


def test_header_words_are_the_leaf_modules_and_checked(monkeypatch):
    """The kernel's header words are fieldprint.leaf's header (page id words zero, filled per
    lane); a kernel that wrote the page id elsewhere is refused at launch."""
    from fieldprint.hashing import fused
    from fieldprint.leaf import LeafSpec

    spec = LeafSpec("int8", "stochastic", elems=32, seed=SEED)
    words = fused.header_words(spec, [9, 2], ["v", "k"])
    assert words.dtype == torch.int32 and words.shape == (2, 16)
    for row, (layer, kind) in zip(words.tolist(), [(9, "v"), (2, "k")], strict=True):
        assert b"".join((w & 0xFFFFFFFF).to_bytes(4, "little") for w in row) == spec.header(0, layer, kind)
    monkeypatch.setattr(fused, "_PAGE_ID_WORD", 4)
    with pytest.raises(RuntimeError, match="page-id words"):
        fused.header_words(spec, [9], ["v"])


def _launch_case(fmt, rounding, *, layers, kinds, tokens_per_page, tok_elems, n_blocks, max_pages, blocks,
                 tokens, base, capacity, seed=None, gen_seed=0, v_layout="nhd"):
    """One `launch_leaves` on random pools (sentinel-filled outputs), checked leaf by leaf against
    quantize + page_leaf_bytes + BLAKE3 (the blake3 package) of the page with its slots past the
    valid tokens zeroed. ``v_layout`` "hdn": the V pool is stored token-minor, [layers, n_blocks,
    tok_elems, tokens_per_page] (one head of tok_elems dims), and its leaves' codes run in that
    order. Returns (plan, n_programs, leaves) for the caller's own assertions."""
    import blake3 as ref

    from fieldprint.hashing.fused import LeafPlan, launch_leaves, program_split
    from fieldprint.leaf import LeafSpec
    from fieldprint.merkle import LEAF_KEY, page_leaf_bytes
    from fieldprint.page_layout import page_elements
    from fieldprint.quant import quantize

    gen = torch.Generator().manual_seed(gen_seed)
    elems = tokens_per_page * tok_elems
    spec = LeafSpec(fmt, rounding, elems=elems, seed=seed)
    layer_ids = tuple(range(7, 7 + layers))
    plan = LeafPlan(spec, layers=layers, kinds=kinds, max_pages=max_pages, tokens_per_page=tokens_per_page,
                    layer_ids=layer_ids, v_layout=v_layout)
    # logical pools [layers, n_blocks, tokens_per_page, tok_elems]; the kernel reads their storage
    pools = [_pages((layers * n_blocks, tokens_per_page, tok_elems), torch.bfloat16, gen, fmt)
             .reshape(layers, n_blocks, tokens_per_page, tok_elems).to(_device()) for _ in range(kinds)]
    layouts = ["nhd", v_layout][:kinds]
    storage = [p if layout == "nhd" else p.transpose(2, 3).contiguous()
               for p, layout in zip(pools, layouts, strict=True)]
    ids = [2**40 + 11 * i for i in range(len(blocks))]
    desc = torch.zeros((max_pages, 3), dtype=torch.int64)
    desc[:len(blocks)] = torch.tensor([blocks, tokens, ids], dtype=torch.int64).T
    bufs = plan.buffers(_device(), capacity)
    bufs.rows.fill_(0x5A)  # sentinels: every byte of a built row is written, nothing else is
    bufs.digests.fill_(0xA5)
    bufs.finite.fill_(7)
    launch_leaves(plan, bufs, storage[0], storage[1] if kinds == 2 else None, desc.to(_device()),
                  torch.tensor([len(blocks)], dtype=torch.int32).to(_device()),
                  torch.tensor([base], dtype=torch.int64).to(_device()), seed)
    rows, digests, finite = bufs.rows.cpu(), bufs.digests.cpu(), bufs.finite.cpu()
    n_leaves = len(blocks) * layers * kinds
    built = 0
    for j in range(plan.max_leaves):
        if j >= n_leaves or base + j >= capacity:
            assert (digests[j] == 0xA5).all() and finite[j] == 7, j  # no leaf: nothing written
            continue
        p, lk = divmod(j, layers * kinds)
        layer, kind = divmod(lk, kinds)
        page = pools[kind][layer, blocks[p]].cpu().clone()
        page[tokens[p]:] = 0.0
        codes_order = page_elements(page[None, :, None, :], layouts[kind])  # [1, E] as stored
        qt = quantize(codes_order, fmt, rounding, seed=seed, backend="torch")
        leaf = page_leaf_bytes(qt, page_ids=[ids[p]], layer=layer_ids[layer], kind="kv"[kind],
                               page_layout=layouts[kind])[0]
        assert torch.equal(rows[base + j], leaf), j
        assert bytes(digests[j].tolist()) == ref.blake3(bytes(leaf.tolist()), key=LEAF_KEY).digest(), j
        assert finite[j] == 1, j
        built += 1
    outside = [r for r in range(capacity) if not base <= r < base + n_leaves]
    assert (rows[outside] == 0x5A).all()  # rows of no leaf of this launch are untouched
    g = program_split(plan)[0]
    return plan, -(-n_leaves // g), built


@pytest.mark.parametrize("fmt,rounding,seed", [("e5m2", "trunc", None), ("int8", "stochastic", SEED),
                                               ("e4m3", "two_grid", None)])
def test_launch_many_one_chunk_leaves_straddle_programs(fmt, rounding, seed):
    """1-chunk leaves (G = 128 per program): 24 of 30 described pages, K and V of 3 layers = 144
    leaves over two programs, the second straddling the page count; ragged valid tokens; base 5
    with capacity 146 clips the last 3 leaves."""
    tokens = [(3 * i) % 5 for i in range(24)]  # 0..4 of 4 token slots (4 = past the page: all valid)
    blocks = [(7 * i) % 31 for i in range(24)]
    plan, programs, built = _launch_case(fmt, rounding, layers=3, kinds=2, tokens_per_page=4, tok_elems=16,
                                         n_blocks=31, max_pages=30, blocks=blocks, tokens=tokens, base=5,
                                         capacity=146, seed=seed, gen_seed=1)
    assert plan.chunks == 1 and programs == 2 and built == 141


@pytest.mark.parametrize("fmt,rounding,tok_elems,chunks", [
    ("e4m3", "rne", 512, 3),        # 2048 elements: 2 full chunks + 2 blocks, one phase-1 tile
    ("e5m2", "two_grid", 1024, 5),  # 4096 elements + 512 helper bytes: 4 full chunks + 9 blocks
])
def test_launch_odd_chunk_counts_k_only(fmt, rounding, tok_elems, chunks):
    """K-only leaves of 2 layers, odd chunk counts (a lone node carried up the tree), a program
    with fewer leaves than its G (the chunk lanes of the missing leaves idle), ragged valid tokens,
    base + capacity clipping of the last leaf."""
    plan, programs, built = _launch_case(fmt, rounding, layers=2, kinds=1, tokens_per_page=4, tok_elems=tok_elems,
                                         n_blocks=4, max_pages=4, blocks=[2, 0, 3], tokens=[4, 1, 3],
                                         base=1, capacity=6, gen_seed=2)
    assert plan.chunks == chunks and programs == 1 and built == 5


@pytest.mark.parametrize("rounding,chunks,programs", [("rne", 17, 1), ("two_grid", 19, 2)])
def test_launch_16k_pages_two_tile_passes(rounding, chunks, programs):
    """16K-element pages (the committer's size): pages larger than one phase-1 tile are read
    twice, tile by tile; 17 chunks a leaf (rne: 8 leaves a program) or 19 (two_grid: 7 a program,
    so the 8 leaves take two programs, the second with one leaf); K and V, ragged tokens within a
    program."""
    plan, programs_run, built = _launch_case("e4m3", rounding, layers=1, kinds=2, tokens_per_page=16,
                                             tok_elems=1024, n_blocks=5, max_pages=5, blocks=[4, 0, 3, 1],
                                             tokens=[16, 9, 0, 1], base=0, capacity=8, gen_seed=3)
    assert plan.chunks == chunks and programs_run == programs and built == 8


@pytest.mark.parametrize("rounding,tok_elems,programs", [("two_grid", 16, 1), ("rne", 320, 1)])
def test_launch_hdn_v_pool(rounding, tok_elems, programs):
    """An "hdn" V pool (its pages token-minor): V leaves whose codes run in storage order and
    name "hdn", the slots past ragged valid tokens (0 to all of 16) zeroed in that order; K leaves
    as ever. 256-element pages (one phase-1 tile) and 5120-element pages (read in two tiles of
    4096: the token mask at a tile offset, the second tile past the page's end)."""
    tokens = [16, 5, 0, 1, 15, 9]
    plan, programs_run, built = _launch_case("e4m3", rounding, layers=1, kinds=2, tokens_per_page=16,
                                             tok_elems=tok_elems, n_blocks=7, max_pages=6, blocks=[6, 0, 3, 1, 2, 5],
                                             tokens=tokens, base=0, capacity=12, gen_seed=4, v_layout="hdn")
    assert programs_run == programs and built == 12


def test_leaf_plan_and_launch_refuse_mismatched_layouts():
    from fieldprint.hashing.fused import LeafPlan, launch_leaves
    from fieldprint.leaf import LeafSpec

    spec = LeafSpec("e4m3", "rne", elems=64)
    with pytest.raises(ValueError, match="v_layout must be one of"):
        LeafPlan(spec, layers=1, kinds=2, max_pages=1, tokens_per_page=4, v_layout="HDN")
    with pytest.raises(ValueError, match="v_layout applies to a plan of K and V"):
        LeafPlan(spec, layers=1, kinds=1, max_pages=1, tokens_per_page=4, v_layout="hdn")
    with pytest.raises(ValueError, match="spec.page_layout must be 'nhd'"):
        LeafPlan(LeafSpec("e4m3", "rne", elems=64, page_layout="hdn"), layers=1, kinds=1, max_pages=1,
                 tokens_per_page=4)
    plan = LeafPlan(spec, layers=1, kinds=2, max_pages=1, tokens_per_page=4, v_layout="hdn")
    assert [row[49] for row in plan.headers().view(torch.uint8).reshape(2, 64).tolist()] == [0, 1]
    k = torch.zeros((1, 3, 4, 2, 8))
    v = torch.zeros((1, 3, 2, 8, 4)).movedim(-1, -3)  # the logical view of an hdn pool, not its storage
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="v_pool must be contiguous: the pool's storage"):
        launch_leaves(plan, plan.buffers("cpu", 2), k, v, torch.zeros((1, 3), dtype=torch.int64), one, one * 0)


def test_launch_refuses_a_chaining_buffer_of_another_shape():
    from fieldprint.hashing.fused import LeafPlan, launch_leaves
    from fieldprint.leaf import LeafSpec

    plan = LeafPlan(LeafSpec("e4m3", "rne", elems=2048), layers=1, kinds=1, max_pages=2, tokens_per_page=1)
    bufs = plan.buffers("cpu", capacity=2)
    bufs.chaining = torch.empty((2, plan.chunks, 8), dtype=torch.int32)  # one node a chunk: no room for the tree
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="bufs.chaining must be"):
        launch_leaves(plan, bufs, torch.zeros((1, 3, 2048)), None, torch.zeros((2, 3), dtype=torch.int64), one,
                      one * 0)
