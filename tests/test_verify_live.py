"""Committer.verify_live: commitments bind the live cache. Honest caches pass; tampered live pages
(context and anchor), NaN, a remapped block table and a freed sequence are detected and localized;
changes below the two_grid tolerance are by construction not."""

import pytest
import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit import Committer

L, S, HKV, D = 2, 4, 2, 8


def _loop(fmt: str, rounding: str, seed: int = 30, dtype=torch.float32,
          v_layout: str = "nhd") -> tuple[PagedKVCache, list[int], Committer]:
    """An anchor of 6 tokens shared by two sequences, decoded 13 steps with a commit every 4
    (``v_layout``: the V pool's page layout)."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(L, 32, S, HKV, D, dtype=dtype, v_layout=v_layout)
    anchor = cache.add_anchor(torch.randn(L, 6, HKV, D, generator=gen), torch.randn(L, 6, HKV, D, generator=gen))
    seqs = [cache.add_sequence(anchor=anchor) for _ in range(2)]
    c = Committer(cache, mode="commit_sync", interval=4, fmt=fmt, rounding=rounding)
    for _ in range(13):
        slots = cache.extend(seqs, [1, 1])
        for layer in range(L):
            cache.write(layer, slots, torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, D, generator=gen))
        c.step(slots)
    return cache, seqs, c


def _leaf(c: Committer, kind: str, layer: int, half: str) -> int:
    return next(i for i, leaf in enumerate(c.leaves) if leaf.page.kind == kind and leaf.layer == layer
                and leaf.kind == half)


@pytest.mark.parametrize("fmt,rounding,dtype", [("e4m3", "two_grid", torch.float32), ("bf16", "rne", torch.bfloat16),
                                                ("int8", "trunc", torch.float32)])
def test_honest_caches_pass_for_every_root(fmt, rounding, dtype):
    cache, seqs, c = _loop(fmt, rounding, dtype=dtype)
    assert len(c.roots()) == 3
    for n, r in c.roots():
        res = c.verify_live(root=r)
        assert res.ok and res.tampered == [] and res.num_leaves == n and res.recomputed_root == r


@pytest.mark.parametrize("v_layout", ["nhd", "hdn"])
@pytest.mark.parametrize("kind", ["context", "anchor"])
def test_tampered_live_pages_are_detected_and_localized(kind, v_layout):
    cache, seqs, c = _loop("e4m3", "two_grid", v_layout=v_layout)
    i = _leaf(c, kind, 1, "v")
    page = c.leaves[i].page
    old = cache.v[1, page.block, 1, 0, 3].item()
    cache.v[1, page.block, 1, 0, 3] = old * 3 + 1.0  # far beyond the tolerance
    res = c.verify_live()
    assert not res.ok and res.recomputed_root != res.root
    assert res.tampered == [i] and res.tampered_pages == [c.leaves[i]]
    assert c.verify().ok  # the committer's own copy is untouched: only verify_live sees this
    cache.v[1, page.block, 1, 0, 3] = old
    assert c.verify_live().ok


@pytest.mark.parametrize("fmt,rounding", [("e4m3", "two_grid"), ("int8", "rne")])
def test_hdn_v_pool_no_false_alarm_and_every_v_element_localized(fmt, rounding):
    """An "hdn" V pool: every root verifies on the honest cache; a change of any valid element of
    a V page (token, head, dim in turn) is found in that page's leaf alone; a write into the slots
    past the valid tokens of the anchor's last page (2 of 4 tokens; the leaf zeroes them, in
    storage order) is none."""
    cache, seqs, c = _loop(fmt, rounding, v_layout="hdn")
    assert cache.v.stride(-3) == 1  # the page's tokens are contiguous
    for n, r in c.roots():
        res = c.verify_live(root=r)
        assert res.ok and res.num_leaves == n and res.recomputed_root == r
    i = _leaf(c, "context", 0, "v")
    block = c.leaves[i].page.block
    for t, h, d in ((0, 0, 0), (3, 1, 7), (2, 0, 5), (1, 1, 2)):
        old = cache.v[0, block, t, h, d].item()
        cache.v[0, block, t, h, d] = old * 3 + 1.0
        res = c.verify_live()
        assert not res.ok and res.tampered == [i], (t, h, d)
        cache.v[0, block, t, h, d] = old
    last = next(j for j, leaf in enumerate(c.leaves) if leaf.page.kind == "anchor" and leaf.page.tokens == 2)
    cache.v[:, c.leaves[last].page.block, 2:] = 1e4
    assert c.verify_live().ok


def test_changes_below_the_two_grid_tolerance_are_not_detected():
    cache, seqs, c = _loop("e4m3", "two_grid")
    x = cache.k[0, cache.sequences[seqs[0]].blocks[0]]
    x.copy_(torch.nextafter(x, torch.full_like(x, float("inf"))))  # one float32 ulp up, every element
    assert c.verify_live().ok


def test_nan_remapped_block_and_freed_sequence_are_mismatches():
    cache, seqs, c = _loop("e4m3", "rne")
    first = [i for i, leaf in enumerate(c.leaves) if leaf.page.kind == "context" and leaf.page.owner == seqs[1]
             and leaf.page.index == 0]
    blocks = cache.sequences[seqs[1]].blocks
    old = cache.k[0, blocks[0], 0, 0, 0].item()
    cache.k[0, blocks[0], 0, 0, 0] = float("nan")
    assert c.verify_live().tampered == [first[0]]  # layer 0, K
    cache.k[0, blocks[0], 0, 0, 0] = old
    assert c.verify_live().ok
    # the block table now points page 0 of the sequence at another pool page (the kernel reads it)
    blocks[0], blocks[1] = blocks[1], blocks[0]
    res = c.verify_live()
    pages = {(c.leaves[i].page.owner, c.leaves[i].page.index) for i in res.tampered}
    assert pages == {(seqs[1], 0), (seqs[1], 1)}
    blocks[0], blocks[1] = blocks[1], blocks[0]
    assert c.verify_live().ok
    cache.free_sequence(seqs[0])  # its committed pages are no longer in the live cache
    res = c.verify_live()
    assert res.tampered == [i for i, leaf in enumerate(c.leaves)
                            if leaf.page.kind == "context" and leaf.page.owner == seqs[0]]
    assert len(res.tampered) == 3 * L * 2  # its 3 sealed pages, all layers, K and V
