"""E4 recomputation study: schedules recompute the same logical pages, and the page comparison
counts bit-identical pages, digest matches and the perturbation over the two-grid bound."""

import dataclasses

import pytest
import torch

from fieldprint.experiments.e4_recompute import (
    E4RecomputeConfig,
    Texts,
    compare,
    pages,
    run_schedule,
    scenario_schedule,
)
from fieldprint.model import ModelConfig, Transformer

CFG = ModelConfig(n_layer=2, d_model=128, n_head=2, n_kv_head=1, context=128, vocab_size=64)  # D = 64


def _texts() -> Texts:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (n,), generator=g) for n in (17, 5, 20)]
    return Texts(torch.randint(0, 64, (19,), generator=g), prompts, [p[:0] for p in prompts])


@pytest.fixture(scope="module")
def prover():
    pytest.importorskip("fieldprint.attention.kernel")
    torch.manual_seed(1)
    # default mode: on one CPU thread torch's GEMMs do not depend on the batch either (the
    # batch-invariant kernels are tested in test_batch_invariant.py; on a GPU, below)
    model = Transformer(CFG).bfloat16().eval()
    texts = _texts()
    cfg = E4RecomputeConfig(out_dir="unused", chunk=12)
    kv = run_schedule(model, texts, scenario_schedule("same_stack", cfg, 3), 16, generate=3)
    return model, texts, cfg, kv


def test_prover_pages_and_greedy_tokens(prover):
    model, texts, _, kv = prover
    assert [d.numel() for d in texts.decoded] == [3, 3, 3]
    assert kv.anchor.shape == (2, 2, 19, 1, 64) and [x.shape[2] for x in kv.seqs] == [20, 8, 23]
    # anchor: 2 pages (the second zero-padded); own complete pages: 1 + 0 + 1
    assert pages(kv, 16).shape == (2, 2, 4, 16 * 64)
    assert torch.isfinite(pages(kv, 16)).all()


@pytest.mark.parametrize("scenario", ["same_stack", "batch_order", "chunk", "prefix_hit"])
def test_scenarios_that_keep_the_kernel_mode_reproduce_every_page(prover, scenario):
    """Other batch composition and order, other prefill chunks (>= 2 tokens: the kernel's prefill
    mode), reused anchor pages: every page bit-identical."""
    model, texts, cfg, kv = prover
    again = run_schedule(model, texts, scenario_schedule(scenario, cfg, 3), 16, anchor_kv=kv.anchor)
    assert torch.equal(pages(again, 16), pages(kv, 16))


def test_reference_backend_differs_but_within_bounds(prover):
    model, texts, cfg, kv = prover
    ref = run_schedule(model, texts, scenario_schedule("reference", cfg, 3), 16)
    a, b = pages(kv, 16), pages(ref, 16)
    assert not torch.equal(a, b)
    row = compare(a[1, 0], b[1, 0], "e4m3", "two_grid")
    assert row["pages"] == 4 and row["bitwise"] < 4 and 0 < row["max_over_bound"]
    # the digest matches exactly when no element moved past the bound in any page... at least
    # the pages whose values are bit-identical match
    assert row["matched"] >= row["bitwise"]


def test_compare_counts_digest_matches_and_bound():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 256, generator=g).bfloat16().float()
    same = compare(x, x.clone(), "e4m3", "two_grid")
    assert same == {"pages": 6, "bitwise": 6, "matched": 6, "max_over_bound": 0.0}
    # a perturbation far past the bound in page 4 only: that page's digest differs
    y = x.clone()
    y[4, 7] += 1.0
    moved = compare(x, y, "e4m3", "two_grid")
    assert moved["bitwise"] == 5 and moved["matched"] == 5 and moved["max_over_bound"] > 1
    # raw bf16 codes: any change of a value is a mismatch
    z = x.clone()
    z[2, 0] = torch.nextafter(z[2, 0].bfloat16(), torch.tensor(9.0).bfloat16()).float()
    assert compare(x, z, "bf16", "rne")["matched"] == 5


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        E4RecomputeConfig(out_dir=str(tmp_path), formats=["e4m3:stochastic"])
    with pytest.raises(ValueError, match="scenarios"):
        E4RecomputeConfig(out_dir=str(tmp_path), scenarios=["other"])
    with pytest.raises(ValueError, match="block_size"):
        dataclasses.replace(E4RecomputeConfig(out_dir=str(tmp_path)), block_size=8)


@pytest.mark.gpu
def test_gpu_batch_invariant_mode_reproduces_pages_across_batches():
    torch.manual_seed(3)
    cfg_model = ModelConfig(n_layer=4, d_model=576, n_head=9, n_kv_head=3, context=256, vocab_size=64,
                            ffn_hidden=1536)
    model = Transformer(cfg_model).cuda().bfloat16().eval().set_batch_invariant()
    texts = _texts()
    cfg = E4RecomputeConfig(out_dir="unused", chunk=12)
    kv = run_schedule(model, texts, scenario_schedule("same_stack", cfg, 3), 16, generate=4)
    for scenario in ("same_stack", "batch_order", "chunk", "prefix_hit"):
        again = run_schedule(model, texts, scenario_schedule(scenario, cfg, 3), 16, anchor_kv=kv.anchor)
        assert torch.equal(pages(again, 16), pages(kv, 16)), scenario
