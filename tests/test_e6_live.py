"""E6 (live): bit flips, anchor swaps and block-table remaps in the live cache after a commit,
against verify_live (tiny cache, CPU)."""

import random

import pytest
import torch

from fieldprint.commit import Committer
from fieldprint.experiments.e6_live import E6LiveConfig, _flip_trial, bit_part, build_cache, run


def _cfg(tmp_path, **kw) -> E6LiveConfig:
    # spread 0: every element within a few standard deviations of the page's largest, so a sign
    # or exponent flip always moves a floating-point code
    base = dict(out_dir=str(tmp_path), formats=["e4m3:two_grid", "int8:rne", "bf16:rne"], layers=1, heads_kv=2,
                head_dim=8, block_size=8, anchor_tokens=12, sequences=2, context=16, spread=0.0, trials=3,
                device="cpu")
    return E6LiveConfig(**{**base, **kw})


def test_rows_detect_what_the_formats_can_see(tmp_path):
    rows = run(_cfg(tmp_path))
    flips = {(r["fmt"], r["target"], r["bit"]): r for r in rows if r["kind"] == "flip"}
    assert len(flips) == 3 * 2 * 16 and all(r["trials"] == 3 for r in flips.values())
    for (fmt, _, bit), r in flips.items():
        assert r["part"] == bit_part(bit) and r["localized"] == r["detected"]  # detected means localized
        if fmt in ("e4m3", "bf16") and r["part"] in ("sign", "exponent"):
            assert r["detected"] == 3, r
        if fmt == "bf16":  # lossless: every bit is bound
            assert r["detected"] == 3, r
        if fmt == "e4m3" and bit in (0, 1):  # at most 2**-6 of the element: below a quarter of E4M3's spacing
            assert r["detected"] == 0, r
    for kind, target, trials in (("swap", "anchor", 3), ("remap", "context", 3)):
        moved = [r for r in rows if r["kind"] == kind]
        assert len(moved) == 3
        assert all(r["target"] == target and r["trials"] == trials == r["detected"] == r["localized"]
                   for r in moved)
    honest = [r for r in rows if r["kind"] == "honest"]
    assert len(honest) == 3 and all(r["trials"] == 1 + 2 * 16 and r["detected"] == 0 for r in honest)


def test_a_flip_trial_restores_the_live_page(tmp_path):
    cfg = _cfg(tmp_path)
    cache, anchor, seqs = build_cache(cfg, "cpu")
    c = Committer(cache, mode="commit_sync", interval=1, fmt="bf16", rounding="rne")
    c.commit([p for s in seqs for p in cache.complete_pages(s)])
    k, v = cache.k.clone(), cache.v.clone()
    rng = random.Random(0)
    for leaf in range(len(c.leaves)):
        assert _flip_trial(cache, c, leaf, 15, rng) == (True, True)
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and c.verify_live().ok


@pytest.mark.parametrize("kw, match", [
    (dict(formats=["e4m3:stochastic"]), "formats"),
    (dict(formats=["e4m3:rne", "e4m3:rne"]), "repeat"),
    (dict(sequences=1), "sequences"),
    (dict(context=4), "context"),
    (dict(trials=0), "trials"),
])
def test_bad_config(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)
