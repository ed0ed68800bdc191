"""Batch-invariant linear and RMSNorm kernels, and the model's batch-invariant mode: right values
(float64 references), and a row's bits independent of the other rows of the batch."""

import pytest
import torch

from fieldprint.batch_invariant import linear, rms_norm
from fieldprint.model import ModelConfig, RMSNorm, Transformer, forward_sequences, prefill_anchor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float64_and_is_row_invariant(dtype):
    g = torch.Generator().manual_seed(0)
    M, K, N = 37, 150, 70  # no dimension a multiple of the 64-wide tiles
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    got = linear(x, w)
    ref = x.double() @ w.double().t()
    # fp32: twice the error of PyTorch's own matmul; bf16: the output's rounding (half a unit in
    # the last place, 2^-8 relative) plus fp32 accumulation error, element by element
    if dtype == torch.float32:
        tol = 2 * float(((x @ w.t()).double() - ref).abs().max())
    else:
        tol = 2.0**-8 * ref.abs() + 1e-5 * float(ref.abs().max())
    assert bool(((got.double() - ref).abs() <= tol).all())
    # each row alone, and the rows in another order: the same bits
    perm = torch.randperm(M, generator=g)
    assert torch.equal(linear(x[perm], w), got[perm])
    for i in (0, 5, 36):
        assert torch.equal(linear(x[i:i + 1], w), got[i:i + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_module_and_is_row_invariant(dtype):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(9, 100, generator=g)).to(dtype)
    norm = RMSNorm(100, 1e-5).requires_grad_(False)
    norm.weight.data = (1 + 0.3 * torch.randn(100, generator=g))
    want = norm(x)
    got = rms_norm(x, norm.weight.to(dtype), 1e-5)
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)) * norm.weight.double()
    err = float((got.double() - ref).abs().max())
    assert err <= 2 * max(float((want.double() - ref).abs().max()), 1e-6)
    assert torch.equal(rms_norm(x[3:4], norm.weight.to(dtype), 1e-5), got[3:4])


def test_bad_arguments():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight"):
        linear(x, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="weight"):
        linear(x, torch.zeros(3, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x"):
        linear(x.long(), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7), 1e-5)


CFG = ModelConfig(n_layer=2, d_model=128, n_head=2, n_kv_head=1, context=64, vocab_size=96)  # D = 64


def _pages_of(model, order, chunk, target_len=18):
    """Prefill a target sequence (tokens 0..target_len-1 of a fixed text) among others, in
    ``order`` and chunks of ``chunk`` tokens; returns the target's K and V [L, n, Hkv, D]."""
    g = torch.Generator().manual_seed(7)
    anchor = torch.randint(0, 96, (9,), generator=g)
    texts = {"target": torch.randint(0, 96, (target_len,), generator=g),
             "a": torch.randint(0, 96, (5,), generator=g), "b": torch.randint(0, 96, (12,), generator=g)}
    cache = model.new_cache(num_blocks=32, block_size=16, dtype=torch.bfloat16, seed=len(order) + chunk)
    dev = model.embed.weight.device
    anchor_id = prefill_anchor(model, cache, anchor.to(dev), attention="kernel")
    seqs = {name: cache.add_sequence(anchor=anchor_id) for name in order}
    done = dict.fromkeys(order, 0)
    while any(done[n] < texts[n].numel() for n in order):
        batch = [n for n in order if done[n] < texts[n].numel()]
        counts = [min(chunk, texts[n].numel() - done[n]) for n in batch]
        tokens = torch.cat([texts[n][done[n]:done[n] + c] for n, c in zip(batch, counts, strict=True)])
        forward_sequences(model, cache, [seqs[n] for n in batch], tokens.to(dev), counts, attention="kernel")
        for n, c in zip(batch, counts, strict=True):
            done[n] += c
    s = cache.sequences[seqs["target"]]
    t = torch.arange(target_len)
    page, off = torch.tensor(s.blocks)[t // 16], t % 16
    return cache.k[:, page, off], cache.v[:, page, off]


def test_model_pages_do_not_depend_on_the_batch():
    """Batch-invariant mode with the fused kernel (interpreted): the target's K/V pages are bitwise
    the same alone, with other sequences before or after it, in any order (same chunking)."""
    pytest.importorskip("fieldprint.attention.kernel")
    torch.manual_seed(3)
    model = Transformer(CFG).eval().set_batch_invariant()
    alone = _pages_of(model, ["target"], chunk=8)
    k, v = _pages_of(model, ["b", "target", "a"], chunk=8)
    assert torch.equal(k, alone[0]) and torch.equal(v, alone[1])
    # and the mode computes the same function as the default one (bf16 cache: bf16 tolerance)
    default = _pages_of(model.set_batch_invariant(False), ["target"], chunk=8)
    torch.testing.assert_close(default[0].float(), alone[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_linear_rows_and_model_pages_do_not_depend_on_the_batch():
    """On the tensor cores: a row's bits alone and among 1..1000 others; the model's pages
    (bf16, SmolLM2's widths) alone and in a batch of other sequences."""
    g = torch.Generator(device="cuda").manual_seed(4)
    w = torch.randn(1536, 576, generator=g, device="cuda").bfloat16()
    x = torch.randn(1000, 576, generator=g, device="cuda").bfloat16()
    full = linear(x, w)
    for m in (1, 7, 64, 300):
        assert torch.equal(linear(x[:m], w), full[:m]), m
    torch.testing.assert_close(full.float(), (x.float() @ w.float().t()), rtol=2e-2, atol=5e-2)
    torch.manual_seed(5)
    cfg = ModelConfig(n_layer=4, d_model=576, n_head=9, n_kv_head=3, context=256, vocab_size=512,
                      ffn_hidden=1536)
    model = Transformer(cfg).cuda().bfloat16().eval().set_batch_invariant()
    alone = _pages_of(model, ["target"], chunk=8)
    mixed = _pages_of(model, ["b", "target", "a"], chunk=8)
    assert torch.equal(alone[0], mixed[0]) and torch.equal(alone[1], mixed[1])
