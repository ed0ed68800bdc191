"""`fieldprint.commit_pages.LeafRefs`: the lazy leaf list of a commit, against the eager one."""

import pytest

from fieldprint.cache import PageRef
from fieldprint.commit_pages import KV, LeafRef, LeafRefs, leaf_refs

L = 3


def _pages(n, start=0):
    return [PageRef("anchor" if i % 4 == 0 else "context", i % 5, i, 100 + i, 1 + i % 16)
            for i in range(start, start + n)]


def _eager(pages, num_layers=L):
    return [LeafRef(p, layer, kind) for p in pages for layer in range(num_layers) for kind in KV]


def test_every_index_and_slice_is_the_eager_lists():
    pages = _pages(5)
    refs, eager = leaf_refs(pages, L), _eager(pages)
    assert len(refs) == len(eager) == 5 * L * 2
    assert list(refs) == eager and refs == eager
    for i in range(-len(eager), len(eager)):
        assert refs[i] == eager[i], i
    for sl in (slice(None), slice(7, None), slice(None, -3), slice(0, None, 2 * L), slice(4, 25, 3),
               slice(None, None, -1), slice(100, 200)):
        assert refs[sl] == eager[sl], sl
    for bad in (len(eager), -len(eager) - 1):
        with pytest.raises(IndexError):
            refs[bad]
    with pytest.raises(TypeError):
        refs[1.0]


def test_extend_and_truncate_work_in_whole_pages():
    refs = LeafRefs(_pages(2), L)
    refs.extend(leaf_refs(_pages(3, start=2), L))
    assert refs == _eager(_pages(5)) and refs == LeafRefs(_pages(5), L)
    refs.truncate(2 * L * 2)
    assert refs == _eager(_pages(2))
    refs.truncate(0)
    assert len(refs) == 0 and list(refs) == []
    with pytest.raises(ValueError, match="multiple of 6"):
        LeafRefs(_pages(2), L).truncate(5)
    with pytest.raises(ValueError, match="in \\[0, 12\\]"):
        LeafRefs(_pages(2), L).truncate(18)
    with pytest.raises(ValueError, match="3 layers"):
        LeafRefs(_pages(1), L).extend(LeafRefs(_pages(1), 2))
    with pytest.raises(ValueError, match="num_layers"):
        LeafRefs(_pages(1), 0)
    assert LeafRefs(_pages(1), L) != LeafRefs(_pages(1), 2) and LeafRefs(_pages(1), L) != "leaves"
