"""The committer's fused fixed-shape path (fieldprint.commit_fused) against its kernel-by-kernel
path: the same roots, leaves and rows for ragged anchors, batches split over the pinned ring,
a store that grows, rollbacks; verification and tamper localization on the fused store."""

from __future__ import annotations

import os
import random

import pytest
import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit import Committer

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = dict(hash_backend="triton", quant_backend="triton")
REFERENCE = dict(hash_backend="reference", quant_backend="torch")


def _cache(seed: int, S: int, hkv: int, d: int, lens, anchor_len: int, layers: int = 2,
           dtype=torch.bfloat16, **cache_kw) -> tuple[PagedKVCache, list[int]]:
    """Sequences of ``lens`` seeded random tokens sharing one anchor of ``anchor_len`` tokens,
    in pool pages handed out in a scrambled order; later growth by `_grow`. ``cache_kw``: more
    `PagedKVCache` arguments (v_layout, poison)."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(layers, 96, S, hkv, d, dtype=dtype, device=DEV, seed=seed, **cache_kw)

    def kv(n):
        scale = torch.exp2(torch.randint(-8, 9, (layers, n, hkv, 1), generator=gen).float())
        return [(torch.randn(layers, n, hkv, d, generator=gen) * scale).to(DEV) for _ in "kv"]

    anchor = cache.add_anchor(*kv(anchor_len))
    seqs = [cache.add_sequence(anchor=anchor) for _ in lens]
    for s, n in zip(seqs, lens, strict=True):
        cache.append(s, *kv(n))
    cache.take_sealed()
    return cache, seqs


def _grow(cache: PagedKVCache, seqs: list[int], gen: torch.Generator) -> torch.Tensor:
    slots = cache.extend(seqs, [1] * len(seqs))
    for layer in range(cache.num_layers):
        k, v = (torch.randn(len(seqs), cache.num_kv_heads, cache.head_dim, generator=gen).to(DEV) for _ in "kv")
        cache.write(layer, slots, k, v)
    return slots


def _run(backends: dict, seed: int, interval: int, steps: int, max_pages: int = 2, **kw) -> Committer:
    """A prefix commit, then ``steps`` decode steps with a commit every ``interval``."""
    cache, seqs = _cache(seed, **kw)
    c = Committer(cache, mode="commit_async", interval=interval, fmt="e4m3", rounding="two_grid",
                  max_pages=max_pages, capacity=8, **backends)
    c.commit([p for s in seqs for p in cache.complete_pages(s)])
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        c.step(_grow(cache, seqs, gen))
    c.commit()
    return c


def _commit_once(backends: dict, seed: int, **kw) -> Committer:
    """One commit of the anchor and every full page of `_cache` ``(seed, **kw)``, in one batch."""
    cache, seqs = _cache(seed, **kw)
    c = Committer(cache, mode="commit_sync", fmt="e4m3", rounding="two_grid", max_pages=8, **backends)
    c.commit([p for s in seqs for p in cache.complete_pages(s)])
    return c


def _same_commits(fused: Committer, ref: Committer) -> None:
    assert fused.fused and not ref.fused
    assert fused.roots() == ref.roots() and len(fused.roots()) >= 2
    assert fused.leaves == ref.leaves
    for a, b in zip(fused.store, ref.store, strict=True):
        assert torch.equal(a.cpu(), b.cpu())


def test_fused_path_commits_what_the_reference_path_commits(monkeypatch):
    """A prefix commit of 4 pages in batches of 1 over a ring of 2 slots (a commit with more
    batches than slots), a store of 8 rows that grows twice, a ragged anchor (3 of 4 tokens),
    a commit after 3 decode steps: every root, leaf and stored row as the reference path; then
    verification and tamper localization on the fused store."""
    monkeypatch.setattr("fieldprint.commit._ROOT_RING", 2)
    kw = dict(S=4, hkv=2, d=8, lens=(9, 6), anchor_len=3)
    fused = _run(FUSED, 3, interval=3, steps=3, max_pages=1, **kw)
    _same_commits(fused, _run(REFERENCE, 3, interval=3, steps=3, max_pages=1, **kw))
    assert fused._fused.capacity > 8 and fused._fused.ring == 2  # it grew
    assert fused.verify().ok and fused.verify_live().ok and fused.verify(root=fused.roots()[0][1]).ok
    rng = random.Random(5)
    for trial, name in enumerate(("header", "codes", "scale", "helper", "padding")):
        leaf = rng.randrange(len(fused.leaves))
        buf = fused.row_fields(leaf)[name]
        byte, bit = rng.randrange(buf.numel()), 1 << rng.randrange(8)
        buf[byte] ^= bit
        res = fused.verify()
        assert not res.ok and res.tampered == [leaf], (trial, name)
        buf[byte] ^= bit
    last = fused.leaves[-2]  # the K half of the last page's last layer
    fused.cache.k[last.layer, last.page.block] += 1.0
    assert fused.verify_live().tampered == [len(fused.leaves) - 2]


def test_fused_leaves_of_two_chunks():
    """Leaves of 2 BLAKE3 chunks (896 elements: 1076 bytes), a ragged anchor: the chunk tree
    inside the kernel."""
    kw = dict(S=4, hkv=1, d=224, lens=(5, 3), anchor_len=3)
    _same_commits(_run(FUSED, 4, interval=3, steps=3, **kw), _run(REFERENCE, 4, interval=3, steps=3, **kw))


def test_fused_path_on_an_hdn_v_pool():
    """A V pool in the "hdn" layout, unwritten slots poisoned with NaN, one commit of a ragged
    anchor page (3 of 4 tokens) and two context pages: the fused kernel reads the V pages in
    storage order and zeroes the anchor's last slot in that order (a slot of the wrong order would
    read a NaN, or drop a valid value), giving the reference path's root, leaves and rows; its V
    leaves name "hdn", its K leaves are the nhd cache's. verify_live localizes a changed V
    element (and only it: no false alarm on the other leaves)."""
    kw = dict(S=4, hkv=2, d=8, lens=(6, 7), anchor_len=3, layers=1, poison=True)
    fused, ref, nhd = (_commit_once(backends, 6, **layout, **kw) for backends, layout in (
        (FUSED, {"v_layout": "hdn"}), (REFERENCE, {"v_layout": "hdn"}), (REFERENCE, {})))
    assert fused.fused and fused.roots() == ref.roots() and fused.leaves == ref.leaves == nhd.leaves
    rows = torch.cat(fused.store).cpu()
    assert torch.equal(rows, torch.cat(ref.store).cpu())
    nhd_rows = torch.cat(nhd.store).cpu()
    kinds = [leaf.kind for leaf in fused.leaves]
    assert fused.leaves[0].page.tokens == 3 and len(kinds) == 6  # the ragged anchor page first
    for i, kind in enumerate(kinds):
        assert rows[i, 49] == (kind == "v") and torch.equal(rows[i], nhd_rows[i]) == (kind == "k"), i
    i = len(kinds) - 1  # the last context page's V leaf
    fused.cache.v[0, fused.leaves[i].page.block, 2, 1, 5] += 1.0
    res = fused.verify_live()
    assert not res.ok and res.tampered == [i]


def test_nan_page_in_a_later_batch_rolls_the_whole_commit_back():
    """A NaN in the second batch of a commit: nothing lands (leaves, rows, device tree); once the
    page is fixed the next commit gives the roots the reference path gives without the NaN."""
    kw = dict(S=4, hkv=2, d=8, lens=(9, 6), anchor_len=3)
    roots = {}
    for backends in (FUSED, REFERENCE):
        cache, seqs = _cache(9, **kw)
        c = Committer(cache, mode="commit_sync", fmt="e4m3", rounding="rne", max_pages=2, **backends)
        pages = [p for s in seqs for p in cache.complete_pages(s)]
        c.commit(pages[:1])
        if backends is FUSED:
            before = (list(c.leaves), c.roots(), c._fused.leaves)
            bad = pages[-1]
            good = cache.v[1, bad.block].clone()
            cache.v[1, bad.block, 1, 0, 2] = float("nan")
            with pytest.raises(ValueError, match=f"NaN or Inf in the V half of context page {bad.index} "):
                c.commit(pages[1:])
            assert (list(c.leaves), c.roots(), c._fused.leaves) == before
            assert c._fused.frontier.num_leaves == before[2]
            cache.v[1, bad.block] = good
        c.commit(pages[1:])
        assert c.verify().ok
        roots[backends is FUSED] = c.roots()
    assert roots[True] == roots[False] and len(roots[True]) == 2


def test_fp8_pool_and_two_byte_formats_take_the_reference_path():
    cache = PagedKVCache(1, 4, 4, 2, 8, dtype=torch.float8_e4m3fn, device=DEV)
    assert not Committer(cache, mode="commit_sync", **FUSED).fused
    cache = PagedKVCache(1, 4, 4, 2, 8, dtype=torch.bfloat16, device=DEV)
    assert not Committer(cache, mode="commit_sync", fmt="bf16", rounding="rne", **FUSED).fused
    assert Committer(cache, mode="commit_sync", fmt="int8", rounding="trunc", **FUSED).fused
    with pytest.raises(ValueError, match="max_pages"):
        Committer(cache, max_pages=0)
    with pytest.raises(ValueError, match="capacity"):
        Committer(cache, capacity=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graph_replayed_commits_equal_the_reference_path():
    """On CUDA: commits replayed from CUDA graphs on a side stream, decode writes racing them,
    batches wrapping the ring, the store growing (graphs captured again), 16 KB-element pages of
    17 chunks: the roots of the reference path, and verification passes."""
    kw = dict(S=16, hkv=8, d=128, lens=(300, 170, 260), anchor_len=37)
    _same_commits(_run(FUSED, 11, interval=4, steps=40, max_pages=3, **kw),
                  _run(REFERENCE, 11, interval=4, steps=40, max_pages=3, **kw))
