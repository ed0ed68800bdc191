"""Fixed-shape decode steps (GraphDecoder): the same tokens, logits and cache contents as the
dynamic serving path, with padded buckets that never touch a sequence's pages."""

import pytest
import torch

from fieldprint.decode import GraphDecoder
from fieldprint.model import ModelConfig, Transformer, forward_sequences, prefill_anchor

CFG = ModelConfig(n_layer=2, d_model=128, n_head=2, n_kv_head=1, context=96, vocab_size=64)  # D = 64


def _setup(model, seed: int):
    """A cache with a 19-token anchor shared by three ragged prompts (prefilled)."""
    g = torch.Generator().manual_seed(seed)
    dev = model.embed.weight.device
    cache = model.new_cache(num_blocks=24, block_size=16, dtype=torch.bfloat16, seed=seed)
    cache.scratch_slot()  # taken first in every cache, so that both paths allocate the same pages
    anchor = prefill_anchor(model, cache, torch.randint(0, 64, (19,), generator=g).to(dev), attention="kernel")
    prompts = [torch.randint(0, 64, (n,), generator=g).to(dev) for n in (15, 1, 33)]
    seqs = [cache.add_sequence(anchor=anchor) for _ in prompts]
    logits, _ = forward_sequences(model, cache, seqs, torch.cat(prompts), [p.numel() for p in prompts],
                                  attention="kernel")
    ends = torch.tensor([p.numel() for p in prompts], device=dev).cumsum(0) - 1
    return cache, seqs, logits[ends].argmax(-1)


def test_static_steps_equal_dynamic_steps():
    pytest.importorskip("fieldprint.attention.kernel")
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    dyn_cache, seqs, tokens = _setup(model, 1)
    fix_cache, seqs2, tokens2 = _setup(model, 1)
    assert torch.equal(tokens, tokens2)
    decoder = GraphDecoder(model, fix_cache, max_batch=4, max_blocks=4, max_anchor_blocks=2)
    scratch = fix_cache.scratch_slot() // 16
    for step in range(3):  # B = 3 runs in bucket 4: one padded row; the second step opens a page
        want, want_slots = forward_sequences(model, dyn_cache, seqs, tokens, [1] * 3, attention="kernel")
        got, got_slots = decoder.step(seqs2, tokens2)
        assert torch.equal(got_slots, want_slots), step
        assert torch.equal(got, want.argmax(-1)), step
        tokens, tokens2 = want.argmax(-1), got.clone()
    # cut every sequence back by more than a page (the decoder's rows must see the pages it
    # lost), then decode again, now with one sequence fewer (padding in a bucket that ran full)
    for c in (dyn_cache, fix_cache):
        for s in (seqs if c is dyn_cache else seqs2):
            c.truncate(s, c.seq_len(s) - 17 if c.seq_len(s) > 17 else 1)
    for step in range(2):
        want, want_slots = forward_sequences(model, dyn_cache, seqs[:2], tokens[:2], [1] * 2, attention="kernel")
        got, got_slots = decoder.step(seqs2[:2], tokens2[:2])
        assert torch.equal(got_slots, want_slots) and torch.equal(got, want.argmax(-1)), step
        tokens, tokens2 = torch.cat([want.argmax(-1), tokens[2:]]), torch.cat([got, tokens2[2:]])
    for s in seqs:  # every page the sequences own holds the same K/V (the kernel is batch invariant)
        blocks = dyn_cache.sequences[s].blocks
        assert blocks == fix_cache.sequences[s].blocks
        torch.testing.assert_close(fix_cache.k[:, blocks].float(), dyn_cache.k[:, blocks].float(), rtol=0, atol=2e-2)
    # the padded row wrote only into the scratch page, which no sequence owns
    owned = {b for s in seqs for b in fix_cache.sequences[s].blocks}
    assert scratch not in owned and fix_cache.allocator.is_pinned(scratch)


def test_bad_steps_change_nothing():
    torch.manual_seed(1)
    model = Transformer(CFG).eval()
    cache = model.new_cache(num_blocks=8, block_size=16, dtype=torch.bfloat16)
    seq = cache.add_sequence()
    forward_sequences(model, cache, [seq], torch.zeros(32, dtype=torch.int64), [32], attention="reference")
    decoder = GraphDecoder(model, cache, max_batch=2, max_blocks=2)
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="max_blocks"):
        decoder.step([seq], one)  # token 33 would need a third page
    with pytest.raises(ValueError, match="1..2 sequences"):
        decoder.step([seq, seq, seq], torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        decoder.step([seq], torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown sequence"):
        decoder.step([99], one)
    assert cache.seq_len(seq) == 32 and len(cache.sequences[seq].blocks) == 2
    with pytest.raises(ValueError, match="graphs=True"):
        GraphDecoder(model, cache, max_batch=2, max_blocks=2, graphs=True)
    with pytest.raises(ValueError, match="buckets"):
        GraphDecoder(model, cache, max_batch=4, max_blocks=2, buckets=[4, 2])


@pytest.mark.gpu
def test_graph_replay_equals_eager_on_gpu():
    torch.manual_seed(2)
    model = Transformer(CFG).cuda().to(torch.bfloat16).eval()
    caches = []
    for graphs in (False, True):
        cache, seqs, tokens = _setup(model, 3)
        decoder = GraphDecoder(model, cache, max_batch=4, max_blocks=4, max_anchor_blocks=2, graphs=graphs)
        out = []
        for _ in range(20):  # crosses page boundaries; bucket 4 replayed many times
            tokens, _ = decoder.step(seqs, tokens)
            tokens = tokens.clone()
            out.append(tokens)
        caches.append((cache, torch.stack(out)))
    (eager, t_eager), (graph, t_graph) = caches
    assert torch.equal(t_eager, t_graph)
    assert torch.equal(eager.k, graph.k) and torch.equal(eager.v, graph.v)
