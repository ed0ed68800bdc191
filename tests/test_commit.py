"""Commit pipeline: device Merkle tree, stable roots, tamper detection and localization."""

from __future__ import annotations

import os
import random

import blake3
import pytest
import torch

from fieldprint.cache import PagedKVCache, PageRef
from fieldprint.commit import Committer, page_id
from fieldprint.commit_pages import quantize_pages
from fieldprint.merkle import DeviceMerkleTree, MerkleTree, hash_pages, page_leaf_bytes
from fieldprint.page_layout import PAGE_LAYOUTS, page_elements
from fieldprint.quant import quantize

# Triton on CPU caches: only under the interpreter (conftest sets it on machines without CUDA)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

L, S, HKV, D = 2, 4, 2, 8


def _filled(seed: int, lens=(9, 13), anchor_len=6, order=None, v_layout="nhd") -> tuple[PagedKVCache, list[int]]:
    """A cache with one shared anchor and sequences of ``lens`` tokens of seeded random K/V.
    ``order`` permutes which sequence is created first (so physical pages differ); ``v_layout``:
    the V pool's page layout."""
    gen = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(L, n, HKV, D, generator=gen), torch.randn(L, n, HKV, D, generator=gen)) for n in lens]
    ak, av = torch.randn(L, anchor_len, HKV, D, generator=gen), torch.randn(L, anchor_len, HKV, D, generator=gen)
    cache = PagedKVCache(L, 64, S, HKV, D, dtype=torch.float32, v_layout=v_layout)
    if order is not None:  # take some pages first so the physical block ids differ
        cache.allocator.allocate(order)
    anchor = cache.add_anchor(ak, av)
    seqs = [cache.add_sequence(anchor=anchor) for _ in lens]
    for s, (k, v) in zip(seqs, kv, strict=True):
        cache.append(s, k, v)
    cache.take_sealed()
    return cache, seqs


def _commit_all(cache: PagedKVCache, seqs: list[int], **kw) -> Committer:
    c = Committer(cache, mode="commit_sync", **kw)
    c.commit([p for s in seqs for p in cache.complete_pages(s)])
    return c


def test_device_tree_matches_merkle_tree_for_every_size_and_split():
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    for n in range(1, 23):
        leaves = torch.randint(0, 256, (n, 32), generator=gen, dtype=torch.uint8)
        tree = DeviceMerkleTree(torch.device("cpu"), "auto")
        i = 0
        while i < n:
            j = min(n, i + rng.randint(1, 5))
            grown = tree.append(leaves[i:j])
            assert bytes(grown.root.tolist()) == bytes(MerkleTree(leaves[:j]).root.tolist()), (n, j)
            assert tree.n == i and grown.n == j  # append leaves the old tree as it was
            if i:
                assert bytes(tree.root.tolist()) == bytes(MerkleTree(leaves[:i]).root.tolist())
            tree, i = grown, j
    with pytest.raises(ValueError, match="empty tree"):
        _ = DeviceMerkleTree("cpu").root
    with pytest.raises(ValueError, match="digests"):
        DeviceMerkleTree("cpu").append(torch.zeros(0, 32, dtype=torch.uint8))


def test_roots_stable_across_commits_and_physical_layout():
    cache, seqs = _filled(2)
    r1 = _commit_all(cache, seqs).root()
    r2 = _commit_all(cache, seqs).root()
    other, oseqs = _filled(2, order=7)  # same contents, different page ids
    assert [other.sequences[s].blocks for s in oseqs] != [cache.sequences[s].blocks for s in seqs]
    r3 = _commit_all(other, oseqs).root()
    assert r1 == r2 == r3 and len(r1) == 32
    changed, cseqs = _filled(3)
    assert _commit_all(changed, cseqs).root() != r1


def test_decode_loop_commits_each_sealed_page_once():
    cache, seqs = _filled(4)
    gen = torch.Generator().manual_seed(4)
    c = Committer(cache, mode="commit_async", interval=3)  # on a CPU: synchronous
    c.commit([p for s in seqs for p in cache.complete_pages(s)])
    for _ in range(12):
        slots = cache.extend(seqs, [1, 1])
        for layer in range(L):
            cache.write(layer, slots, torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, D, generator=gen))
        c.step(slots)
    c.commit()
    done = c.commits
    c.commit()  # nothing new sealed: no commit, same root
    assert c.commits == done
    keys = [(leaf.page.kind, leaf.page.owner, leaf.page.index, leaf.layer, leaf.kind) for leaf in c.leaves]
    assert len(keys) == len(set(keys))
    want = {("context", s, i, layer, h) for s in seqs for i in range(cache.seq_len(s) // S)
            for layer in range(L) for h in "kv"}
    want |= {("anchor", 0, i, layer, h) for i in range(2) for layer in range(L) for h in "kv"}
    assert set(keys) == want
    assert [n for n, _ in c.roots()] == sorted(n for n, _ in c.roots())
    res = c.verify()
    assert res.ok and res.tampered == [] and res.recomputed_root == c.root()


def test_random_single_bit_flips_are_detected_and_localized():
    cache, seqs = _filled(5)
    c = _commit_all(cache, seqs)
    rng = random.Random(5)
    anchors = [i for i, leaf in enumerate(c.leaves) if leaf.page.kind == "anchor"]
    fields = ("header", "codes", "scale", "helper", "padding")
    for trial in range(24):
        leaf = rng.choice(anchors) if trial % 3 == 0 else rng.randrange(len(c.leaves))
        name = fields[trial % len(fields)]
        buf = c.row_fields(leaf)[name]
        byte, bit = rng.randrange(buf.numel()), 1 << rng.randrange(8)
        buf[byte] ^= bit
        res = c.verify()
        assert not res.ok and res.recomputed_root != res.root
        assert res.tampered == [leaf] and res.tampered_pages == [c.leaves[leaf]], (trial, name)
        buf[byte] ^= bit
    assert c.verify().ok


@pytest.mark.parametrize("v_layout", ["nhd", "hdn"])
@pytest.mark.parametrize("fmt,rounding", [("e4m3", "two_grid"), ("bf16", "rne")])
def test_leaves_are_merkle_page_leaves(fmt, rounding, v_layout):
    """Every stored row is byte for byte fieldprint.merkle.page_leaf_bytes of the page quantized
    on its own (anchor padding zeroed) in its pool's page layout (K "nhd"), and its digest is
    hash_pages'."""
    cache, seqs = _filled(6, v_layout=v_layout)
    c = _commit_all(cache, seqs, fmt=fmt, rounding=rounding)
    rows = torch.cat(c.store)
    assert len(c.leaves) == rows.shape[0] == (2 + 2 + 3) * L * 2  # anchor 2 pages, sequences 2 + 3
    for i, leaf in enumerate(c.leaves):
        pool = cache.k_cache(leaf.layer) if leaf.kind == "k" else cache.v_cache(leaf.layer)
        layout = v_layout if leaf.kind == "v" else "nhd"
        page = pool[leaf.page.block].clone()
        page[leaf.page.tokens:] = 0
        qt = quantize(page_elements(page[None], layout), fmt, rounding)
        want = page_leaf_bytes(qt, page_ids=[page_id(leaf.page)], layer=leaf.layer, kind=leaf.kind,
                               page_layout=layout)
        assert torch.equal(rows[i], want[0]), (i, leaf)
        if i % 7 == 0:
            digest = hash_pages(qt, page_ids=[page_id(leaf.page)], layer=leaf.layer, kind=leaf.kind)
            assert torch.equal(MerkleTree(digest).root, digest[0])
    assert c.leaves[2].page.kind == "anchor" and c.leaves[2].page.tokens == S
    assert c.leaves[L * 2].page.tokens == 2  # the anchor's second page holds 2 of 6 tokens


def _unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """[n] uint8 -> [8 n] bits, bit i of byte j at 8 j + i (the helper's order)."""
    return ((b[:, None].int() >> torch.arange(8)) & 1).reshape(-1)


@pytest.mark.parametrize("fmt,rounding", [("e4m3", "two_grid"), ("int8", "rne")])
def test_hdn_v_leaves_are_the_nhd_leaves_in_storage_order(fmt, rounding):
    """The same writes into an "nhd" and an "hdn" cache (a ragged anchor page included): the K
    leaves are identical; a V leaf differs only in header byte 49 (the layout id) and in the order
    of its codes and helper bits, which permuted back from [Hkv, D, S] to [S, Hkv, D] are the nhd
    leaf's; so the roots differ."""
    cs = {layout: _commit_all(*_filled(7, v_layout=layout), fmt=fmt, rounding=rounding) for layout in PAGE_LAYOUTS}
    nhd, hdn = (torch.cat(cs[layout].store) for layout in ("nhd", "hdn"))
    assert cs["nhd"].leaves == cs["hdn"].leaves and cs["nhd"].root() != cs["hdn"].root()
    at = cs["nhd"]._store.spec.offsets()
    back = torch.arange(S * HKV * D).reshape(S, HKV, D).permute(1, 2, 0).reshape(-1).argsort()  # hdn -> nhd
    ragged = False
    for i, leaf in enumerate(cs["nhd"].leaves):
        a, b = nhd[i], hdn[i]
        if leaf.kind == "k":
            assert torch.equal(a, b), i
            continue
        ragged |= leaf.page.tokens < S
        assert a[49] == PAGE_LAYOUTS["nhd"] and b[49] == PAGE_LAYOUTS["hdn"]
        fields = {name: (a[o:o + n], b[o:o + n]) for name, (o, n) in at.items()}
        assert torch.equal(torch.cat([a[:49], a[50:64]]), torch.cat([b[:49], b[50:64]])), i
        codes_a, codes_b = fields["codes"]
        assert not torch.equal(codes_a, codes_b) and torch.equal(codes_b[back], codes_a), i
        if rounding == "two_grid":
            helper_a, helper_b = (_unpack_bits(h) for h in fields["helper"])
            assert torch.equal(helper_b[back], helper_a), i
        for name in ("scale", "padding"):
            assert torch.equal(*fields[name]), (i, name)
    assert ragged  # the anchor's second page: 2 of 4 tokens, its padding zeroed in either order


@pytest.mark.parametrize("fmt,rounding", [("e4m3", "rne"), ("int8", "two_grid"), ("bf16", "trunc")])
def test_quantize_pages_equals_quantize_page_by_page(fmt, rounding):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, S, HKV, D, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 1e3]).reshape(5, 1, 1, 1)
    codes, helper, scale, finite = quantize_pages(x, fmt, rounding)
    assert finite.all() and scale.shape == (5, 1) and scale.dtype == torch.float32
    for i in range(5):
        qt = quantize(x[i], fmt, rounding)
        assert torch.equal(codes[i], qt.canonical_bytes()[:codes.shape[1]])
        assert helper.shape[1] == (0 if qt.helper is None else qt.helper.numel())
        assert float(scale[i]) == float(qt.scale)


@interpreted
def test_triton_path_gives_the_same_root():
    """The GPU code path (Triton quantization with deferred finite check, Triton BLAKE3) on tiny
    CPU pages under TRITON_INTERPRET=1 (set by conftest without CUDA; the GPU tests below run it
    compiled)."""
    cache, seqs = _filled(12, lens=(5,), anchor_len=3)
    want = _commit_all(cache, seqs).root()
    got = _commit_all(cache, seqs, hash_backend="triton", quant_backend="triton")
    assert got.root() == want
    x = torch.randn(3, S, HKV, D, generator=torch.Generator().manual_seed(12))
    for a, b in zip(quantize_pages(x, "e4m3", "two_grid", "triton"),
                    quantize_pages(x, "e4m3", "two_grid", "torch"), strict=True):
        assert torch.equal(a, b)
    x[1, 0, 0, 0] = float("inf")
    for backend in ("triton", "torch"):
        assert quantize_pages(x, "e4m3", "two_grid", backend)[3].tolist() == [True, False, True]


def test_per_step_digests_do_not_depend_on_the_v_layout():
    """The per-step baselines hash the step's tokens in token order: the same writes give the
    same digests in an "nhd" and an "hdn" cache."""
    digests = {}
    for layout in PAGE_LAYOUTS:
        cache, seqs = _filled(13, v_layout=layout)
        gen = torch.Generator().manual_seed(13)
        cs = [Committer(cache, mode=mode) for mode in ("per_step_copy_cpu", "per_step_gpu")]
        for _ in range(2):
            slots = cache.extend(seqs, [1, 1])
            for layer in range(L):
                cache.write(layer, slots, torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, D, generator=gen))
            for c in cs:
                c.step(slots)
        digests[layout] = [c.step_digests for c in cs]
    assert digests["nhd"] == digests["hdn"]


def test_per_step_modes_hash_every_step():
    cache, seqs = _filled(9)
    for mode in ("per_step_copy_cpu", "per_step_gpu", "none"):
        c = Committer(cache, mode=mode)
        for _ in range(3):
            slots = cache.extend(seqs, [1, 1])
            c.step(slots)
        assert len(c.step_digests) == (0 if mode == "none" else 3)
        if mode == "per_step_copy_cpu":
            shape = (L, -1, HKV, D)
            want = blake3.blake3(cache.k.view(shape)[:, slots].numpy().tobytes()
                                 + cache.v.view(shape)[:, slots].numpy().tobytes()).digest()
            assert c.step_digests[-1] == want
        if mode == "per_step_gpu":
            assert len(c.step_digests[-1]) == L * 32  # one digest per layer (its K and V together)


def test_bad_inputs():
    cache, seqs = _filled(10)
    with pytest.raises(TypeError, match="cache"):
        Committer("cache")
    with pytest.raises(ValueError, match="mode"):
        Committer(cache, mode="sometimes")
    with pytest.raises(ValueError, match="interval"):
        Committer(cache, interval=0)
    with pytest.raises(ValueError, match="fmt"):
        Committer(cache, fmt="e3m4")
    with pytest.raises(ValueError, match="rounding"):
        Committer(cache, rounding="stochastic")
    with pytest.raises(ValueError, match="quant_backend"):
        Committer(cache, quant_backend="cuda")
    with pytest.raises(ValueError, match="hash_backend"):
        Committer(cache, hash_backend="gpu")  # refused at once, not at the first commit
    with pytest.raises(ValueError, match="multiple of 8"):
        Committer(PagedKVCache(1, 4, 4, 1, 3))
    with pytest.raises(ValueError, match="commit\\(\\) needs mode"):
        Committer(cache, mode="per_step_gpu").commit()
    c = Committer(cache, mode="commit_sync")
    with pytest.raises(TypeError, match="slots"):
        c.step(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="stream"):
        Committer(cache, mode="commit_sync", stream=object())
    with pytest.raises(ValueError, match="nothing committed"):
        c.root()
    with pytest.raises(TypeError, match="pages"):
        c.commit([1, 2])
    c.commit([p for s in seqs for p in cache.complete_pages(s)])
    with pytest.raises(ValueError, match="root must be 32 bytes"):
        c.verify(root=b"short")
    with pytest.raises(ValueError, match="not one of this committer's committed roots"):
        c.verify(root=bytes(32))
    with pytest.raises(ValueError, match="leaf must be"):
        c.row_fields(len(c.leaves))
    with pytest.raises(ValueError, match="fetch_leaves"):
        Committer(cache, mode="commit_sync", fetch_leaves=False).verify(root=c.root())
    cache.k[0, cache.sequences[seqs[0]].blocks[0], 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _commit_all(cache, seqs)
    with pytest.raises(ValueError, match="block_size must be below 2\\*\\*16"):
        Committer(PagedKVCache(1, 1, 2**16, 1, 8))


def _state(c: Committer) -> tuple:
    """Everything a commit changes, as plain values."""
    return (len(c.leaves), list(c.leaves), len(c.store), c.commits, c.roots(),
            [bytes(r.reshape(-1).tolist()) for r in c.store])


def _grow(cache: PagedKVCache, seqs: list[int], steps: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        slots = cache.extend(seqs, [1] * len(seqs))
        for layer in range(L):
            cache.write(layer, slots, torch.randn(len(seqs), HKV, D, generator=gen),
                        torch.randn(len(seqs), HKV, D, generator=gen))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreted)])
def test_nan_page_leaves_the_committer_as_before_and_the_flag_is_per_commit(backend):
    """A commit over a NaN page raises and changes nothing; the sealed pages it took are kept,
    so once the page is fixed the next commit lands them all: the roots then equal those of a
    committer that never saw the NaN. On the Triton path the NaN flag does not stick."""
    runs = {}
    for poison in (True, False):
        gen = torch.Generator().manual_seed(20)
        cache, seqs = _filled(20)
        c = Committer(cache, mode="commit_sync", quant_backend=backend)  # the flag is the quantizer's
        c.commit([p for s in seqs for p in cache.complete_pages(s)])
        _grow(cache, seqs, 4, gen)  # seals one page of each sequence
        sealed = cache.sequences[seqs[1]].blocks[3]
        if poison:
            before = _state(c)
            good = cache.v[1, sealed, 2, 1, 5].clone()
            cache.v[1, sealed, 2, 1, 5] = float("nan")
            with pytest.raises(ValueError, match=r"NaN or Inf in the V half of context page 3 of owner 1 .*layer 1"):
                c.commit()
            assert _state(c) == before and c.verify().ok
            cache.v[1, sealed, 2, 1, 5] = good
        c.commit()
        assert c.verify().ok
        runs[poison] = c.roots()
    assert runs[True] == runs[False] and len(runs[True]) == 2


def test_bad_pages_are_refused_before_anything_changes():
    cache, seqs = _filled(21)
    c = _commit_all(cache, seqs)
    before = _state(c)
    block = cache.sequences[seqs[0]].blocks[0]
    for page, match in ((PageRef("context", 2**22, 0, block, S), "owner < 2\\*\\*22"),  # sequence id overflow
                        (PageRef("context", 0, 2**24, block, S), "index < 2\\*\\*24"),
                        (PageRef("context", 0, 0, cache.num_blocks, S), "block outside the pool"),
                        (PageRef("context", 0, 0, block, 0), "tokens must be in"),
                        (PageRef("other", 0, 0, block, S), "kind must be")):
        with pytest.raises(ValueError, match=match):
            c.commit(cache.complete_pages(seqs[0]) + [page])
        assert _state(c) == before
    assert c.verify().ok


def test_sealed_pages_of_a_freed_sequence_are_dropped_after_a_failed_commit():
    gen = torch.Generator().manual_seed(22)
    cache, seqs = _filled(22)
    c = _commit_all(cache, seqs)
    _grow(cache, seqs, 4, gen)
    cache.k[0, cache.sequences[seqs[0]].blocks[2]] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        c.commit()
    c.fence()
    cache.free_sequence(seqs[0])
    n = len(c.leaves)
    c.commit()  # the other sequence's sealed page only
    assert [(leaf.page.owner, leaf.page.index) for leaf in c.leaves[n:]] == [(seqs[1], 3)] * (2 * L)
    assert c.verify().ok


def test_verify_any_committed_root():
    cache, seqs = _filled(23)
    gen = torch.Generator().manual_seed(23)
    c = Committer(cache, mode="commit_sync", interval=4)
    for _ in range(12):
        slots = cache.extend(seqs, [1, 1])
        for layer in range(L):
            cache.write(layer, slots, torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, D, generator=gen))
        c.step(slots)
    roots = c.roots()
    assert len(roots) == 3
    for n, r in roots:
        res = c.verify(root=r)
        assert res.ok and res.num_leaves == n and res.recomputed_root == r
    last = len(c.leaves) - 1
    c.row_fields(last)["codes"][0] ^= 4
    assert c.verify(root=roots[0][1]).ok  # the first root does not cover the last leaf
    res = c.verify(root=roots[-1][1])
    assert not res.ok and res.tampered == [last]
    with pytest.raises(ValueError, match="root must be 32 bytes"):
        c.verify(root="ab" * 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_async_equals_sync_and_cpu():
    cache, seqs = _filled(11)
    cpu_root = _commit_all(cache, seqs).root()
    gpu = PagedKVCache(L, 64, S, HKV, D, dtype=torch.float32, device="cuda")
    gpu.k.copy_(cache.k)
    gpu.v.copy_(cache.v)
    gpu.sequences, gpu.anchors, gpu.allocator = cache.sequences, cache.anchors, cache.allocator
    for mode in ("commit_sync", "commit_async"):
        c = Committer(gpu, mode=mode)
        c.commit([p for s in seqs for p in gpu.complete_pages(s)])
        assert c.root() == cpu_root
        leaf = len(c.leaves) - 1
        c.row_fields(leaf)["codes"][0] ^= 1
        assert c.verify().tampered == [leaf]
    x = torch.randn(7, S, HKV, D, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(quantize_pages(x, "e4m3", "two_grid"), quantize_pages(x.cpu(), "e4m3", "two_grid"),
                         strict=True):
        assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_loop_async_roots_equal_sync_roots():
    """Writes on the decode stream, commits on the side stream: every root equals the one the
    synchronous mode commits, and the CPU reference (bf16 cache, E4M3 two_grid)."""
    roots = {}
    for mode, device in (("commit_sync", "cpu"), ("commit_sync", "cuda"), ("commit_async", "cuda")):
        gen = torch.Generator().manual_seed(13)
        cache = PagedKVCache(L, 256, 16, HKV, 16, dtype=torch.bfloat16, device=device)
        anchor = cache.add_anchor(torch.randn(L, 20, HKV, 16, generator=gen).to(device),
                                  torch.randn(L, 20, HKV, 16, generator=gen).to(device))
        seqs = [cache.add_sequence(anchor=anchor) for _ in range(3)]
        c = Committer(cache, mode=mode, interval=5)
        for _ in range(70):
            slots = cache.extend(seqs, [1, 1, 1])
            for layer in range(L):
                cache.write(layer, slots, torch.randn(3, HKV, 16, generator=gen).to(device),
                            torch.randn(3, HKV, 16, generator=gen).to(device))
            c.step(slots)
        roots[(mode, device)] = c.roots()
        assert c.verify().ok
    assert roots[("commit_async", "cuda")] == roots[("commit_sync", "cuda")] == roots[("commit_sync", "cpu")]
    # anchors (2 pages) at step 5, then 3 sealed pages at steps 20, 35, 50, 65; 2 layers, K and V
    assert [n for n, _ in roots[("commit_sync", "cpu")]] == [8, 20, 32, 44, 56]


def _decode(c: Committer, cache: PagedKVCache, seqs: list[int], n: int, gen: torch.Generator) -> None:
    for _ in range(n):
        slots = cache.extend(seqs, [1] * len(seqs))
        for layer in range(L):
            cache.write(layer, slots, torch.randn(len(seqs), HKV, D, generator=gen).to(cache.device),
                        torch.randn(len(seqs), HKV, D, generator=gen).to(cache.device))
        c.step(slots)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_async_commit_of_a_nan_page_rolls_back():
    """commit_async finds the NaN when it reads the commit back (root()): the committer returns
    to its state before that commit; once the page is fixed, the next commit lands the pages it
    held back, and the roots equal a clean run's."""
    runs = {}
    for poison in (True, False):
        gen = torch.Generator().manual_seed(31)
        cache = PagedKVCache(L, 64, S, HKV, D, dtype=torch.bfloat16, device="cuda")
        anchor = cache.add_anchor(torch.randn(L, 6, HKV, D, generator=gen).cuda(),
                                  torch.randn(L, 6, HKV, D, generator=gen).cuda())
        seqs = [cache.add_sequence(anchor=anchor) for _ in range(2)]
        c = Committer(cache, mode="commit_async", interval=4)
        _decode(c, cache, seqs, 11, gen)  # commits at steps 4 and 8; page 2 is being written
        mid = c.roots()
        block = cache.sequences[seqs[0]].blocks[2]
        good = cache.k[0, block, 0].clone()
        if poison:
            cache.k[0, block, 0, 0, 0] = float("nan")
        _decode(c, cache, seqs, 1, gen)  # step 12: page 2 sealed and committed on the side stream
        if poison:
            with pytest.raises(ValueError, match="NaN or Inf in the K half of context page 2"):
                c.root()
            assert c.roots() == mid and len(c.leaves) == mid[-1][0] and c.verify().ok
            c.fence()
            cache.k[0, block, 0] = good
            c.commit()
        runs[poison] = (c.roots()[-1], len(c.leaves))
        assert c.verify().ok and c.verify_live().ok
    assert runs[True] == runs[False]


def test_anchor_being_prefilled_is_committed_only_once_complete():
    """A commit between reserve_anchor and the last write_anchor leaves the anchor out (its
    unwritten layers would be committed as zeros); the next commit takes it."""
    from fieldprint.cache import PagedKVCache
    from fieldprint.commit import Committer

    gen = torch.Generator().manual_seed(5)
    cache = PagedKVCache(2, 8, 4, 1, 8, dtype=torch.float32)
    anchor = cache.reserve_anchor(6)
    cache.write_anchor(0, anchor, torch.randn(6, 1, 8, generator=gen), torch.randn(6, 1, 8, generator=gen))
    committer = Committer(cache, mode="commit_sync", interval=1, fmt="e4m3", rounding="rne")
    committer.commit([])
    assert len(committer.leaves) == 0
    cache.write_anchor(1, anchor, torch.randn(6, 1, 8, generator=gen), torch.randn(6, 1, 8, generator=gen))
    committer.commit([])
    assert {leaf.page.kind for leaf in committer.leaves} == {"anchor"} and len(committer.leaves) == 2 * 2 * 2
    assert committer.verify().ok
