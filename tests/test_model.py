"""The byte-level model: plain and paged-cache paths agree, training learns, bad input is an error."""

import dataclasses

import pytest
import torch

from fieldprint.model import (
    SMOLLM2_135M,
    ModelConfig,
    Transformer,
    forward_sequences,
    load_checkpoint,
    prefill_anchor,
    rotary,
    score_paged,
    score_plain,
)

TINY = ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, context=48)


def tiny_model(seed: int, dtype=torch.float64, cfg: ModelConfig = TINY) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).to(dtype).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):  # random gains, so that both paths must apply them alike
            p.data = 1 + 0.3 * torch.randn_like(p)
        else:  # weights far larger than at initialization: peaked attention, logits far from uniform
            p.data *= 8
    return model


@pytest.mark.parametrize("anchor_len", [0, 1, 13])
def test_paged_path_equals_plain_path(anchor_len):
    """Ragged everywhere: anchors not block-aligned, chunks not dividing the window, a last batch
    shorter than the others, scrambled block ids; float64 so any indexing slip shows."""
    model = tiny_model(anchor_len)
    g = torch.Generator().manual_seed(100 + anchor_len)
    anchor = torch.randint(0, 256, (anchor_len,), generator=g)
    windows = torch.randint(0, 256, (5, 31), generator=g)
    plain = score_plain(model, anchor, windows)
    paged = score_paged(model, anchor, windows, batch=2, chunk=7, block_size=4,
                        cache_dtype=torch.float64)
    assert plain.shape == paged.shape == (5,)
    torch.testing.assert_close(paged, plain, rtol=1e-10, atol=1e-9)


def test_paged_path_equals_plain_path_past_sixteen_pages_per_sequence():
    """Windows of 40 pages of 1 token fed in chunks of 5: each sequence's block table grows past
    the capacities of its host mirror (16, 32) between calls (a growth once lost the pages before
    it, which windows of at most 8 pages never showed)."""
    cfg = dataclasses.replace(TINY, context=64)
    model = tiny_model(7, cfg=cfg)
    g = torch.Generator().manual_seed(7)
    anchor = torch.randint(0, 256, (3,), generator=g)
    windows = torch.randint(0, 256, (3, 41), generator=g)
    plain = score_plain(model, anchor, windows)
    paged = score_paged(model, anchor, windows, batch=2, chunk=5, block_size=1,
                        cache_dtype=torch.float64)
    torch.testing.assert_close(paged, plain, rtol=1e-10, atol=1e-9)


def test_paged_path_per_position_logits_match():
    """Logits of every position, not just the summed loss: one window, one chunk per token."""
    model = tiny_model(3)
    g = torch.Generator().manual_seed(3)
    anchor = torch.randint(0, 256, (9,), generator=g)
    window = torch.randint(0, 256, (1, 12), generator=g)
    full = torch.cat([anchor, window[0, :-1]])[None]
    plain_logits = model(full)[0, anchor.numel():]
    per_token = score_paged(model, anchor, window, batch=1, chunk=1, block_size=2,
                            cache_dtype=torch.float64)
    expect = torch.nn.functional.cross_entropy(plain_logits, window[0, 1:], reduction="sum")
    torch.testing.assert_close(per_token, expect[None], rtol=1e-10, atol=1e-9)


def test_store_changes_what_the_cache_holds():
    """The store hook decides the cached values: scaling V changes the loss, the anchors' store
    is separate from the context's."""
    model = tiny_model(4)
    g = torch.Generator().manual_seed(4)
    anchor = torch.randint(0, 256, (8,), generator=g)
    windows = torch.randint(0, 256, (2, 17), generator=g)
    base = score_paged(model, anchor, windows, cache_dtype=torch.float64, block_size=4)
    calls = []

    def halve_v(x, layer, which):
        calls.append((layer, which, x.shape[0]))
        return x * 0.5 if which == "v" else x

    ctx_only = score_paged(model, anchor, windows, cache_dtype=torch.float64, block_size=4,
                           store=halve_v)
    both = score_paged(model, anchor, windows, cache_dtype=torch.float64, block_size=4,
                       store=halve_v, anchor_store=halve_v)
    assert not torch.allclose(ctx_only, base) and not torch.allclose(both, ctx_only)
    layers = {c[0] for c in calls}
    assert layers == {0, 1} and {c[1] for c in calls} == {"k", "v"}


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(5)
    model = Transformer(TINY).train()
    g = torch.Generator().manual_seed(5)
    batch = torch.randint(0, 256, (4, 33), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model.loss(batch[:, :-1], batch[:, 1:])
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model.loss(batch[:, :-1], batch[:, 1:])
    assert float(after) < float(before.detach()) - 1e-3


def test_rotary_is_a_rotation_and_relative():
    """Norms are kept, and the score of (q at i, k at j) depends only on i - j."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 1, 16, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 16, dtype=torch.float64, generator=g)
    rq = rotary(q, torch.tensor([7]), 10000.0)
    torch.testing.assert_close(rq.norm(), q.norm())
    s1 = (rotary(q, torch.tensor([7]), 1e4) * rotary(k, torch.tensor([3]), 1e4)).sum()
    s2 = (rotary(q, torch.tensor([20]), 1e4) * rotary(k, torch.tensor([16]), 1e4)).sum()
    torch.testing.assert_close(s1, s2)


def test_decode_steps_equal_plain_path():
    """Ragged prompts sharing an anchor, prefilled in one chunked call, then greedy-free decode
    steps of one token per sequence: every logit equals the plain path on the full text."""
    model = tiny_model(11)
    g = torch.Generator().manual_seed(11)
    cache = model.new_cache(num_blocks=40, block_size=4, dtype=torch.float64, seed=11, poison=True)
    anchor = torch.randint(0, 256, (6,), generator=g)
    anchor_id = prefill_anchor(model, cache, anchor)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 1, 9)]
    seqs = [cache.add_sequence(anchor=anchor_id) for _ in prompts]
    logits, _ = forward_sequences(model, cache, seqs, torch.cat(prompts), [p.numel() for p in prompts])
    texts = list(prompts)
    got = [[row] for row in logits.split([p.numel() for p in prompts])]
    for _ in range(3):
        new = torch.randint(0, 256, (len(seqs),), generator=g)
        step, slots = forward_sequences(model, cache, seqs, new, [1] * len(seqs))
        assert slots.shape == (len(seqs),)
        for i in range(len(seqs)):
            texts[i] = torch.cat([texts[i], new[i:i + 1]])
            got[i].append(step[i:i + 1])
    for text, parts in zip(texts, got, strict=True):
        plain = model(torch.cat([anchor, text])[None])[0, anchor.numel():]
        torch.testing.assert_close(torch.cat(parts), plain, rtol=1e-10, atol=1e-9)


def test_scrambled_poisoned_cache_is_released():
    """score_paged's cache: scrambled page order, NaN in every page not written, pages of
    finished windows freed and poisoned again (a stale read would turn the loss NaN)."""
    model = tiny_model(12)
    cache = model.new_cache(num_blocks=16, block_size=4, dtype=torch.float64, seed=1, poison=True)
    seq = cache.add_sequence()
    forward_sequences(model, cache, [seq], torch.arange(10), [10])
    blocks = cache.sequences[seq].blocks
    assert blocks != sorted(blocks)  # scrambled block ids
    assert torch.isnan(cache.k[:, blocks[-1], 2:]).all()  # unwritten tail of the last page
    cache.free_sequence(seq)
    assert torch.isnan(cache.k[:, blocks]).all() and torch.isnan(cache.v[:, blocks]).all()


def test_smollm2_config_is_the_published_architecture():
    assert (SMOLLM2_135M.n_layer, SMOLLM2_135M.n_head, SMOLLM2_135M.n_kv_head, SMOLLM2_135M.head_dim) == (30, 9, 3, 64)
    model = Transformer(dataclasses.replace(SMOLLM2_135M, n_layer=1))
    # 134.5M parameters with 30 layers: embeddings 49152*576 + 30 blocks
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    total = model.embed.weight.numel() + 30 * per_block + model.norm.weight.numel()
    assert total == 134_515_008


def test_checkpoint_round_trip(tmp_path):
    from fieldprint.experiments.e5_train import E5TrainConfig, save_checkpoint

    cfg = E5TrainConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, context=48, save_dtype="fp32")
    model = tiny_model(7, torch.float32)
    save_checkpoint(tmp_path / "model.pt", model, cfg, {"step": 1})
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert loaded.cfg == TINY and meta["final"] == {"step": 1}
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30), "multiple of n_head"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(d_model=12, n_head=4, n_kv_head=2), "must be even"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
    (dict(rope_base=1.0), "rope_base"),
])
def test_bad_model_config(kwargs, match):
    base = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=2, context=48)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **kwargs})


def test_bad_inputs_are_clear_errors():
    model = tiny_model(8)
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="idx"):
        model(torch.full((1, 4), 256))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 49, dtype=torch.int64))
    anchor, windows = torch.zeros(20, dtype=torch.int64), torch.zeros(2, 30, dtype=torch.int64)
    with pytest.raises(ValueError, match="exceed the model context"):
        score_paged(model, anchor, windows)
    with pytest.raises(ValueError, match="chunk"):
        score_paged(model, anchor[:4], windows, chunk=0)
    with pytest.raises(ValueError, match="attention"):
        score_paged(model, anchor[:4], windows, attention="flash")
    with pytest.raises(ValueError, match="windows"):
        score_paged(model, anchor[:4], windows[:, :1])


def test_kernel_backend_matches_plain_path():
    """The fused Triton kernel (interpreted on a CPU) inside the model: bf16 q and cache, so the
    tolerance is bf16's; the reference backend with the same bf16 cache must agree closely too."""
    pytest.importorskip("fieldprint.attention.kernel")
    cfg = ModelConfig(n_layer=1, d_model=128, n_head=2, n_kv_head=1, context=48)  # D = 64
    model = tiny_model(9, torch.float32, cfg)
    g = torch.Generator().manual_seed(9)
    anchor = torch.randint(0, 256, (19,), generator=g)
    windows = torch.randint(0, 256, (2, 21), generator=g)
    plain = score_plain(model, anchor, windows)
    kernel = score_paged(model, anchor, windows, batch=2, chunk=6, block_size=16,
                         attention="kernel", cache_dtype=torch.bfloat16)
    ref = score_paged(model, anchor, windows, batch=2, chunk=6, block_size=16,
                      attention="reference", cache_dtype=torch.bfloat16)
    torch.testing.assert_close(kernel, ref, rtol=1e-3, atol=0)
    torch.testing.assert_close(kernel, plain, rtol=2e-3, atol=0)
    # the tolerance is far tighter than what the anchors change
    no_anchor = score_plain(model, anchor[:0], windows)
    assert ((no_anchor - plain).abs() / plain).min() > 0.05


@pytest.mark.gpu
def test_kernel_backend_on_gpu():
    cfg = ModelConfig(n_layer=2, d_model=256, n_head=4, n_kv_head=2, context=128)  # D = 64
    model = tiny_model(10, torch.float32, cfg).cuda()
    g = torch.Generator().manual_seed(10)
    anchor = torch.randint(0, 256, (37,), generator=g)
    windows = torch.randint(0, 256, (6, 80), generator=g)
    plain = score_plain(model, anchor, windows)
    naive = score_paged(model, anchor, windows, batch=4, chunk=32, attention="naive")
    kernel = score_paged(model, anchor, windows, batch=4, chunk=32, attention="kernel",
                         cache_dtype=torch.bfloat16)
    torch.testing.assert_close(naive, plain, rtol=1e-4, atol=0)
    torch.testing.assert_close(kernel, plain, rtol=5e-3, atol=0)
