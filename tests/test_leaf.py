"""Page leaves (fieldprint.leaf): the layout is pinned by digests computed before the leaf module
existed (and before the page layout byte), so leaves and committed roots stay byte-identical; the
header table, the field table and input checks."""

import dataclasses
import struct

import blake3
import pytest
import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit import Committer
from fieldprint.leaf import HEADER, HEADER_BYTES, LeafSpec, check_page_ids, header_offset, header_rows
from fieldprint.merkle import LEAF_KEY, hash_pages, page_leaf_bytes
from fieldprint.page_layout import PAGE_LAYOUTS
from fieldprint.quant import quantize


def _det(n: int, salt: int = 0) -> torch.Tensor:
    """n float32 values from integer arithmetic alone (no random generator): same on every host."""
    i = torch.arange(n, dtype=torch.int64)
    return ((((i * 37 + salt) % 101) - 50).double() / 7 * torch.exp2(((i * 5 + salt) % 9 - 4).double())).float()


# BLAKE3 of the four concatenated leaves, and the keyed digest of leaf 2, of the commit before
# fieldprint.leaf (967b467^)
PINNED_LEAVES = {
    ("e4m3", "two_grid", None): ("df84e3b412aa957942cc2652af826fd1927bab8fc9d094d35ada689340699410",
                                 "b2d142fc7a42d2ee7403f0b442a37a351936256d9689fb0c01f97b3eb434579f"),
    ("bf16", "stochastic", 5): ("46bbe35e7a077ef0bf92e743e3f474d62684d5fd631bd2f2ec1e6796d9068c94",
                                "84dcca45f87ecdc11b774552fea26f1838526b882ec0338895e40fad3913b4e8"),
    ("int8", "rne", None): ("d094fee2a47cd7e9d4fc40a453aa61496df24cdc846362c19425ea52b09666b8",
                            "8492d7269d2058e0b09f47f3d7b74413a55b85e8ec5589902d03c74c314c49d5"),
    ("e5m2", "trunc", None): ("bc90a043105fedf3c43f4b0677afcc91156761164783f460c246c3ae3111fb2c",
                              "fe10f5521e65426e9d7fb5c0b8ee297c520c2ae9725ada7abff357b13f0c631e"),
    ("fp16", "rne", None): ("3011c36531fdd93492fe98c5774efeacafcec66d9f83828939adfed3314f3e53",
                            "30960a60c346a719e800099981f351d323674e7c3e85ec99596374667e0c9925"),
}
# Committer roots over a fixed cache (anchor of 6 tokens, one sequence of 9), same commit
PINNED_ROOTS = {
    ("e4m3", "two_grid"): "c01145803d228988790a1b9d0095bf4453389c4b0d0e78092e9647916105ee9a",
    ("bf16", "rne"): "edbae116e257d98a743934f8afc823cd9ed258754ad769dfc271c03cbfa251c0",
    ("int8", "two_grid"): "c16bc5d0cba54665d47cfc5a96453e22d5ed58fc9b44e11834d2eefd3fa49ec5",
}


@pytest.mark.parametrize("fmt,rounding,seed", list(PINNED_LEAVES))
def test_leaf_bytes_are_pinned(fmt, rounding, seed):
    qt = quantize(_det(4 * 4 * 2 * 8).reshape(4, 4, 2, 8), fmt, rounding, seed=seed)
    ids = [10, 11, 2**40, 3]
    leaf = page_leaf_bytes(qt, page_ids=ids, layer=7, kind="v")
    whole, digest2 = PINNED_LEAVES[(fmt, rounding, seed)]
    assert blake3.blake3(leaf.numpy().tobytes()).hexdigest() == whole
    assert hash_pages(qt, page_ids=ids, layer=7, kind="v")[2].numpy().tobytes().hex() == digest2
    assert blake3.blake3(leaf[2].numpy().tobytes(), key=LEAF_KEY).hexdigest() == digest2


@pytest.mark.parametrize("fmt,rounding", list(PINNED_ROOTS))
def test_committed_roots_are_pinned(fmt, rounding):
    L, S, H, D = 2, 4, 2, 8
    cache = PagedKVCache(L, 16, S, H, D, dtype=torch.float32)
    a = cache.add_anchor(_det(L * 6 * H * D, 1).reshape(L, 6, H, D), _det(L * 6 * H * D, 2).reshape(L, 6, H, D))
    s = cache.add_sequence(anchor=a)
    cache.append(s, _det(L * 9 * H * D, 3).reshape(L, 9, H, D), _det(L * 9 * H * D, 4).reshape(L, 9, H, D))
    c = Committer(cache, mode="commit_sync", fmt=fmt, rounding=rounding)
    c.commit()
    assert len(c.leaves) == 16
    assert c.root().hex() == PINNED_ROOTS[(fmt, rounding)]


def test_header_table_is_the_documented_layout():
    assert HEADER.size == HEADER_BYTES == 64
    want = {"magic": (0, 4), "version": (4, 2), "header_bytes": (6, 2), "page_id": (8, 8), "layer": (16, 4),
            "kind": (20, 1), "format": (21, 1), "rounding": (22, 1), "width": (23, 1), "elems": (24, 4),
            "code_bytes": (28, 4), "scales": (32, 4), "helper_bytes": (36, 4), "seed": (40, 8),
            "has_seed": (48, 1), "page_layout": (49, 1), "zero": (50, 14)}
    assert {name: header_offset(name) for name in want} == want
    spec = LeafSpec("bf16", "stochastic", elems=24, scales=3, seed=2**64 - 1)
    row = spec.header(2**63 + 5, 2**32 - 1, "v")
    assert struct.unpack_from("<4sHHQIBBBBIIIIQBB", row) == (
        b"FPKV", 1, 64, 2**63 + 5, 2**32 - 1, 1, 4, 2, 2, 24, 48, 3, 0, 2**64 - 1, 1, 0)
    assert row[49:] == bytes(15)  # "nhd" (id 0): the header of the leaves before the layout byte
    hdn = dataclasses.replace(spec, page_layout="hdn").header(2**63 + 5, 2**32 - 1, "v")
    assert hdn[49] == PAGE_LAYOUTS["hdn"] == 1 and hdn[:49] == row[:49] and hdn[50:] == bytes(14)
    assert spec.fields() == [("header", 64), ("codes", 48), ("scale", 12), ("helper", 0), ("padding", 4)]
    assert spec.length == 128 and spec.offsets()["scale"] == (112, 12)
    tg = LeafSpec("e4m3", "two_grid", elems=64)
    assert tg.fields() == [("header", 64), ("codes", 64), ("scale", 4), ("helper", 8), ("padding", 52)]
    rows = header_rows(tg, [1, 2], [0, 3], ["k", "v"])
    assert rows.shape == (2, 64) and bytes(rows[1].tolist()) == tg.header(2, 3, "v")
    with pytest.raises(ValueError, match="name must be"):
        header_offset("owner")


@pytest.mark.parametrize("kwargs,match", [
    (dict(fmt="e3m4", rounding="rne", elems=8), "fmt"),
    (dict(fmt="e4m3", rounding="nearest", elems=8), "rounding"),
    (dict(fmt="e4m3", rounding="rne", elems=0), "elems"),
    (dict(fmt="e4m3", rounding="rne", elems=8.0), "elems"),
    (dict(fmt="e4m3", rounding="two_grid", elems=12), "multiple of 8"),
    (dict(fmt="e4m3", rounding="rne", elems=12, scales=5), "scales"),
    (dict(fmt="e4m3", rounding="stochastic", elems=8, seed=2**64), "seed"),
    (dict(fmt="e4m3", rounding="rne", elems=8, page_layout="HND"), "page_layout"),
    (dict(fmt="e4m3", rounding="rne", elems=8, page_layout=1), "page_layout"),
])
def test_leaf_spec_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeafSpec(**kwargs)


def test_page_ids_must_be_ints():
    assert check_page_ids(torch.tensor([3, 4], dtype=torch.int32), 2) == [3, 4]
    for bad in ([0.0, 1.0], [1, 2.5], torch.tensor([0.0, 1.0]), torch.tensor([True, False]), [True, 0]):
        with pytest.raises(TypeError, match="page_ids"):
            check_page_ids(bad, 2)
    with pytest.raises(ValueError, match="non-negative"):
        check_page_ids([0, -1], 2)
    with pytest.raises(ValueError, match="2 entries"):
        check_page_ids([0], 2)
    qt = quantize(_det(64).reshape(2, 32), "e4m3")
    with pytest.raises(TypeError, match="page_ids"):
        page_leaf_bytes(qt, page_ids=[0.0, 1.9], layer=0, kind="k")  # once truncated to [0, 1]
    spec = LeafSpec("e4m3", "rne", elems=8)
    for field, args in (("layer", (0, -1, "k")), ("page_id", (2**64, 0, "k")), ("kind", (0, 0, "q"))):
        with pytest.raises(ValueError, match=field):
            spec.header(*args)


def test_page_layout_names_the_layout_in_byte_49_only():
    """The same codes as an "hdn" leaf: byte 49 is the layout's id, every other byte as the "nhd"
    leaf's (the caller orders the codes; the leaf names the order)."""
    qt = quantize(_det(4 * 4 * 2 * 8).reshape(4, 4, 2, 8), "e4m3", "two_grid")
    nhd = page_leaf_bytes(qt, page_ids=[1, 2, 3, 4], layer=7, kind="v")
    hdn = page_leaf_bytes(qt, page_ids=[1, 2, 3, 4], layer=7, kind="v", page_layout="hdn")
    assert (nhd[:, 49] == 0).all() and (hdn[:, 49] == PAGE_LAYOUTS["hdn"]).all()
    assert torch.nonzero(nhd != hdn)[:, 1].unique().tolist() == [49]
    with pytest.raises(ValueError, match="page_layout"):
        page_leaf_bytes(qt, page_ids=[1, 2, 3, 4], layer=7, kind="v", page_layout="nchw")
