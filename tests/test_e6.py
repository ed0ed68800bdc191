"""E6 on the project's model and cache: every mode decodes the same tokens, commits cover the
decoded pages, tampering with stored leaves is detected (tiny shapes, CPU)."""

import pytest

from fieldprint.commit import COMMIT_MODES, MODES
from fieldprint.experiments.e6_commit import E6Config, run


def test_e6_runs_on_the_model_and_detects_tampering(tmp_path):
    cfg = E6Config(out_dir=str(tmp_path), intervals=[1, 4], batches=[2], context=12, anchors=5, layers=2,
                   hidden=32, heads_q=4, heads_kv=2, mlp=64, block_size=4, steps=8, warmup=1,
                   tamper_trials=10)
    rows = run(cfg)
    timing = {(r["mode"], r["interval"]): r for r in rows if r["kind"] == "timing"}
    want = {(m, 1) for m in MODES if m not in COMMIT_MODES} | {(m, i) for m in COMMIT_MODES for i in (1, 4)}
    assert set(timing) == want
    assert timing[("none", 1)]["overhead"] == 0.0
    # 8 steps of 2 staggered sequences (12 and 11 tokens, pages of 4) seal 4 pages: interval 4
    # commits twice, interval 1 commits at the steps where a page sealed
    assert timing[("commit_sync", 4)]["commits"] == 2
    assert all(r["ms_per_step"] > 0 for r in timing.values())
    tamper = [r for r in rows if r["kind"] == "tamper"]
    assert {r["target"] for r in tamper} == {"context", "anchor"}
    assert sum(r["flips"] for r in tamper) == 10
    assert all(r["detected"] == r["flips"] and r["localized"] == r["flips"] for r in tamper)
    assert all(r["false_positive"] == 0 for r in tamper)


@pytest.mark.parametrize("kw, match", [
    (dict(hidden=30), "multiple of heads_q"),
    (dict(attention="kernel", hidden=32), "head_dim"),
    (dict(vocab=0), "vocab"),
])
def test_e6_bad_config(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        E6Config(out_dir=str(tmp_path), **kw)
