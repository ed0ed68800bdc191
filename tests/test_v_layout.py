"""The ``"hdn"`` V page layout (``fieldprint.page_layout``: a page's tokens contiguous) in the
attention kernel and the paged cache, through the Triton interpreter.

The kernel reads a V pool of either layout by its strides, tile for tile in the same order, so
its output must equal the default layout's bit for bit, whatever the walk (default, pipelined,
anchor groups), the mode and the KV dtype; unwritten slots hold NaN (``paged_inputs`` poisons
them), which the hdn path loads with the rest of a masked tile's pages and must zero.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from test_anchor_groups import GROUPS, LENS, grouped_case
from test_anchor_groups import check as check_groups
from test_attention_kernel import BF16, FP8, FP16, check, make_case, poisoned_empty  # noqa: F401 (an autouse fixture)

from fieldprint.attention import paged_anchor_attention
from fieldprint.cache import PagedKVCache
from fieldprint.page_layout import PAGE_LAYOUTS, empty_pool, layout_of, page_elements

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def as_hdn(case: dict) -> dict:
    """The same call with its V pool stored in the "hdn" layout (same logical values)."""
    v = case["v_cache"]
    hdn = v.movedim(1, -1).contiguous().movedim(-1, 1)  # storage [N, Hkv, D, S]
    assert layout_of(hdn) == "hdn" and torch.equal(hdn.float().nan_to_num(7.0), v.float().nan_to_num(7.0))
    return dict(case, v_cache=hdn)


def same_bits(case: dict, **kw) -> torch.Tensor:
    """Checks the call against the float64 reference, then the hdn call against it bit for bit."""
    out, lse = check(case, **kw)
    out_h, lse_h = paged_anchor_attention(**as_hdn(case), return_lse=True, **kw)
    assert torch.equal(out_h, out) and torch.equal(lse_h, lse)
    return out


@pytest.mark.parametrize("q_lens,lens,a_lens,bs,config", [
    ([1, 1, 1], [60, 17, 33], [20, 0, 40], 16, {"tile_n": 16}),  # decode, tile = page
    ([1, 1, 1], [60, 17, 33], [20, 0, 40], 16, {"tile_n": 64}),  # decode, four pages per tile
    ([1, 1], [70, 9], [3, 50], 32, {"tile_n": 16}),  # decode, half a page per tile
    ([5, 1, 3], [60, 17, 33], [20, 3, 0], 16, None),  # prefill, default tiles
])
@pytest.mark.parametrize("kv_dtype", [None, FP8])
def test_hdn_equals_nhd_bitwise(q_lens, lens, a_lens, bs, config, kv_dtype):
    case = make_case(71 + len(lens), q_lens, lens, a_lens, Hq=4, Hkv=2, bs=bs, kv_dtype=kv_dtype)
    scales = {"k_scale": 0.5, "v_scale": torch.tensor([0.7, 1.5])} if kv_dtype == FP8 else {}
    same_bits(case, kv_split_tokens=128 if config is None else 64, config=config, **scales)


def test_hdn_pipelined_window_softcap_fp16():
    case = make_case(81, [1, 1, 1], [90, 40, 3], [5, 20, 0], Hq=4, Hkv=2, q_dtype=FP16)
    same_bits(case, kv_split_tokens=64, config={"pipelined": True}, sliding_window=30, logit_softcap=2.0)


@pytest.mark.parametrize("kv_dtype", [None, FP8])
def test_hdn_anchor_groups(kv_dtype):
    case, groups = grouped_case(91, LENS, GROUPS, [37, 20, 9, 11, 0, 150, 30, 50, 8, 2], kv_dtype=kv_dtype)
    kw = {"kv_split_tokens": 32, "config": {"tile_n": 16}}
    out = check_groups(case, groups, **kw)[0]
    assert torch.equal(paged_anchor_attention(**as_hdn(case), anchor_groups=groups, **kw), out)


def test_v_cache_of_no_supported_layout_is_refused():
    case = make_case(5, [1], [20], [3])
    v = case["v_cache"]
    odd = v.movedim(2, -1).contiguous().movedim(-1, 2)  # heads contiguous: neither layout
    with pytest.raises(ValueError, match="v_cache must be contiguous in its last dimension"):
        paged_anchor_attention(**dict(case, v_cache=odd))


# ------------------------------------------------------------------ layout helpers and the cache


def test_empty_pool_and_page_elements():
    pool = empty_pool((2, 3, 4, 2, 8), "hdn", 0.0, torch.float32, torch.device("cpu"))
    assert pool.shape == (2, 3, 4, 2, 8) and layout_of(pool) == "hdn" and layout_of(pool[1]) == "hdn"
    assert layout_of(empty_pool((3, 4, 2, 8), "nhd", 0.0, torch.float32, torch.device("cpu"))) == "nhd"
    pages = torch.arange(2 * 4 * 2 * 8, dtype=torch.float32).reshape(2, 4, 2, 8)  # [P, S, H, D]
    assert torch.equal(page_elements(pages, "nhd"), pages.reshape(2, -1))
    hdn = page_elements(pages, "hdn")
    assert torch.equal(hdn[1, :4], pages[1, :, 0, 0])  # a page's first run: token 0..3 of (h 0, d 0)
    assert PAGE_LAYOUTS == {"nhd": 0, "hdn": 1}
    with pytest.raises(ValueError, match="layout must be one of"):
        page_elements(pages, "nhd ")


def test_cache_hdn_holds_what_nhd_holds():
    """Every way into the pool (add_anchor, write_anchor, extend + write, append, a freed and
    re-poisoned page) leaves the hdn cache's logical view equal to the default cache's."""
    def fill(cache: PagedKVCache) -> PagedKVCache:
        g = torch.Generator().manual_seed(3)
        kv = lambda *s: torch.randn(*s, 2, 8, generator=g)  # noqa: E731
        a = cache.add_anchor(kv(2, 21), kv(2, 21))
        r = cache.reserve_anchor(5)
        for layer in range(2):
            cache.write_anchor(layer, r, kv(5), kv(5))
        s0, s1 = cache.add_sequence(anchor=a), cache.add_sequence()
        cache.append(s0, kv(2, 19), kv(2, 19))
        slots = cache.extend([s0, s1], [1, 3])
        for layer in range(2):
            cache.write(layer, slots, kv(4), kv(4))
        cache.free_sequence(s1)
        return cache

    kw = {"num_layers": 2, "num_blocks": 12, "block_size": 8, "num_kv_heads": 2, "head_dim": 8,
          "dtype": torch.float32, "seed": 1, "poison": True}
    plain, hdn = fill(PagedKVCache(**kw)), fill(PagedKVCache(**kw, v_layout="hdn"))
    assert layout_of(hdn.v) == "hdn" and layout_of(hdn.v_cache(1)) == "hdn" and hdn.v_layout == "hdn"
    assert torch.equal(hdn.v.nan_to_num(7.0), plain.v.nan_to_num(7.0))
    assert torch.equal(hdn.k.nan_to_num(7.0), plain.k.nan_to_num(7.0))
    assert hdn.v.isnan().any()  # the freed sequence's page is poisoned again
    with pytest.raises(ValueError, match="v_layout must be one of"):
        PagedKVCache(**kw, v_layout="HDN")


def test_cache_hdn_feeds_the_kernel():
    """A decode step read from an hdn cache equals the same step from the default cache."""
    outs = []
    for layout in PAGE_LAYOUTS:
        cache = PagedKVCache(1, 16, 16, 2, 64, dtype=BF16, seed=4, poison=True, v_layout=layout)
        g = torch.Generator().manual_seed(9)
        a = cache.add_anchor(torch.randn(1, 20, 2, 64, generator=g), torch.randn(1, 20, 2, 64, generator=g))
        seqs = [cache.add_sequence(anchor=a), cache.add_sequence()]
        for s, n in zip(seqs, (37, 11), strict=True):
            cache.append(s, torch.randn(1, n, 2, 64, generator=g), torch.randn(1, n, 2, 64, generator=g))
        q = torch.randn(2, 4, 64, generator=g).to(BF16)
        args = dataclasses.asdict(cache.kernel_args(seqs))
        outs.append(paged_anchor_attention(q, cache.k_cache(0), cache.v_cache(0), **args))
    assert torch.equal(outs[0], outs[1])
