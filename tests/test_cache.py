"""Paged KV cache: allocator, anchors, appends across page boundaries, kernel arguments."""

from __future__ import annotations

import random

import pytest
import torch

from fieldprint.cache import BlockAllocator, CacheFullError, PagedKVCache

L, HKV, D = 2, 2, 8


def _kv(gen: torch.Generator, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64),
            torch.randn(*shape, generator=gen, dtype=torch.float64))


def _gather(pool: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens 0..n-1 that a block-table row points at: pool [N, S, Hkv, D] -> [n, Hkv, D]."""
    S = pool.shape[1]
    t = torch.arange(n)
    return pool[table_row.long()[t // S], t % S]


def test_allocator_never_double_allocates_and_keeps_pins():
    rng = random.Random(0)
    alloc = BlockAllocator(32)
    pinned = alloc.allocate(3)
    alloc.pin(pinned)
    held: list[int] = []
    for _ in range(300):
        if held and rng.random() < 0.45:
            k = rng.randrange(1, len(held) + 1)
            rng.shuffle(held)
            alloc.free(held[:k])
            del held[:k]
        else:
            n = rng.randrange(0, 5)
            if n > alloc.num_free:
                with pytest.raises(CacheFullError):
                    alloc.allocate(n)
                continue
            got = alloc.allocate(n)
            assert not set(got) & set(held) and not set(got) & set(pinned)
            held += got
        assert alloc.num_free + len(held) + len(pinned) == 32
        assert len(set(held)) == len(held)
    for b in pinned:
        assert alloc.is_pinned(b) and alloc.refcount(b) == 1
        with pytest.raises(ValueError, match="pinned"):
            alloc.free([b])


def test_allocator_refcounts_and_bad_frees():
    alloc = BlockAllocator(4)
    (b,) = alloc.allocate(1)
    alloc.incref([b])
    alloc.free([b])
    assert alloc.num_free == 3 and alloc.refcount(b) == 1
    alloc.free([b])
    assert alloc.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        alloc.free([b])
    with pytest.raises(ValueError, match="block id"):
        alloc.free([4])
    with pytest.raises(ValueError, match="free"):
        alloc.incref([b])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


def test_block_table_survives_growth_past_its_capacity():
    """A sequence extended a token at a time past 16, 32 and 64 pages (the host table mirror's
    capacity doublings): every step's kernel_args row lists all of its pages, in order. Growing
    the mirror once dropped the pages it held (zeros), so attention read page 0 in their place
    (E5's chunked evaluation past 256 tokens)."""
    cache = PagedKVCache(L, 100, 1, HKV, D, dtype=torch.float64, seed=5)
    s = cache.add_sequence()
    other = cache.add_sequence()
    for step in range(70):
        cache.extend([s, other] if step % 3 == 0 else [s], [1, 1] if step % 3 == 0 else [1])
        row = cache.kernel_args([s, other]).block_table[0]
        blocks = cache.sequences[s].blocks
        assert row[:len(blocks)].tolist() == blocks, f"step {step}"
    assert len(cache.sequences[s].blocks) == 70 and len(set(cache.sequences[s].blocks)) == 70


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_appends_across_pages_match_dense_reference(block_size):
    gen = torch.Generator().manual_seed(block_size)
    cache = PagedKVCache(L, 64, block_size, HKV, D, dtype=torch.float64)
    ak, av = _kv(gen, L, 5, HKV, D)
    anchor = cache.add_anchor(ak, av)
    seqs = [cache.add_sequence(anchor=anchor), cache.add_sequence(), cache.add_sequence(anchor=anchor)]
    dense = {s: ([], []) for s in seqs}
    rng = random.Random(block_size)
    for _ in range(6):  # ragged prefill-like appends
        s = rng.choice(seqs)
        n = rng.randrange(0, 7)
        k, v = _kv(gen, L, n, HKV, D)
        cache.append(s, k, v)
        dense[s][0].append(k)
        dense[s][1].append(v)
    for _ in range(5):  # batched decode steps: allocate once, write per layer
        slots = cache.extend(seqs, [1] * len(seqs))
        k, v = _kv(gen, L, len(seqs), HKV, D)
        for layer in range(L):
            cache.write(layer, slots, k[layer], v[layer])
        for i, s in enumerate(seqs):
            dense[s][0].append(k[:, i:i + 1])
            dense[s][1].append(v[:, i:i + 1])
    # Other sequences come and go: their pages must not clobber the live ones or the anchor.
    tmp = cache.add_sequence(anchor=anchor)
    cache.append(tmp, *_kv(gen, L, 7, HKV, D))
    cache.free_sequence(tmp)

    args = cache.kernel_args(seqs)
    assert args.block_table.dtype == torch.int32 and args.block_table.shape[0] == len(seqs)
    assert args.query_start_loc.tolist() == list(range(len(seqs) + 1))
    assert args.anchor_lens.tolist() == [5, 0, 5]
    for b, s in enumerate(seqs):
        k_ref = torch.cat(dense[s][0], dim=1)
        v_ref = torch.cat(dense[s][1], dim=1)
        n = int(args.seq_lens[b])
        assert n == k_ref.shape[1] == cache.seq_len(s)
        for layer in range(L):
            assert torch.equal(_gather(cache.k_cache(layer), args.block_table[b], n), k_ref[layer])
            assert torch.equal(_gather(cache.v_cache(layer), args.block_table[b], n), v_ref[layer])
            na = int(args.anchor_lens[b])
            assert torch.equal(_gather(cache.k_cache(layer), args.anchor_block_table[b], na), ak[layer, :na])
            assert torch.equal(_gather(cache.v_cache(layer), args.anchor_block_table[b], na), av[layer, :na])
        # Anchor pages are shared, pinned, and never in a sequence's own table.
        assert not set(cache.sequences[s].blocks) & set(cache.anchors[anchor].blocks)
    assert cache.anchors[anchor].refcount == 2
    for blk in cache.anchors[anchor].blocks:
        assert cache.allocator.is_pinned(blk)


def test_kernel_args_prefill_query_lens_and_reference_attention():
    from fieldprint.attention import reference_attention

    gen = torch.Generator().manual_seed(7)
    cache = PagedKVCache(1, 16, 4, HKV, D, dtype=torch.float64)
    anchor = cache.add_anchor(*_kv(gen, 1, 6, HKV, D))
    a, b = cache.add_sequence(anchor=anchor), cache.add_sequence()
    cache.append(a, *_kv(gen, 1, 9, HKV, D))
    cache.append(b, *_kv(gen, 1, 3, HKV, D))
    args = cache.kernel_args([a, b], query_lens=[2, 3])
    assert args.query_start_loc.tolist() == [0, 2, 5]
    q = torch.randn(5, 2 * HKV, D, generator=gen, dtype=torch.float64)
    out = reference_attention(q, cache.k_cache(0), cache.v_cache(0), args.block_table, args.seq_lens,
                              args.query_start_loc, args.anchor_block_table, args.anchor_lens)
    # Dense check of sequence a's last query token: it sees all 6 anchors and all 9 tokens.
    ka = torch.cat([_gather(cache.k_cache(0), args.anchor_block_table[0], 6),
                    _gather(cache.k_cache(0), args.block_table[0], 9)])
    va = torch.cat([_gather(cache.v_cache(0), args.anchor_block_table[0], 6),
                    _gather(cache.v_cache(0), args.block_table[0], 9)])
    kq = ka.repeat_interleave(2, dim=1)
    vq = va.repeat_interleave(2, dim=1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q[1], kq) / D**0.5, dim=-1)
    torch.testing.assert_close(out[1], torch.einsum("hn,nhd->hd", p, vq))


def test_sealed_pages_and_truncate():
    gen = torch.Generator().manual_seed(3)
    cache = PagedKVCache(1, 16, 4, HKV, D, dtype=torch.float32)
    s = cache.add_sequence()
    cache.append(s, *_kv(gen, 1, 6, HKV, D))
    sealed = cache.take_sealed()
    assert [(p.owner, p.index, p.tokens) for p in sealed] == [(s, 0, 4)]
    assert cache.take_sealed() == []
    cache.extend([s], [2])  # fills page 1 exactly
    assert [p.index for p in cache.take_sealed()] == [1]
    cache.extend([s], [5])  # seals page 2, page 3 partial
    cache.truncate(s, 8)
    assert cache.take_sealed() == [] and len(cache.sequences[s].blocks) == 2
    assert cache.allocator.num_free == 14


def test_full_pool_and_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    cache = PagedKVCache(L, 4, 4, HKV, D, dtype=torch.float32)
    s = cache.add_sequence()
    with pytest.raises(CacheFullError):
        cache.append(s, *_kv(gen, L, 17, HKV, D))
    assert cache.seq_len(s) == 0 and cache.allocator.num_free == 4  # nothing half-done
    k, v = _kv(gen, L, 2, HKV, D)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(s, k[0], v[0])
    with pytest.raises(ValueError, match="v must have shape"):
        cache.append(s, k, v[:, :, :1])
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        cache.append(s, k.tolist(), v)
    with pytest.raises(TypeError, match="floating"):
        cache.append(s, k.long(), v.long())
    with pytest.raises(ValueError, match="unknown sequence"):
        cache.append(99, k, v)
    with pytest.raises(ValueError, match="unknown anchor"):
        cache.add_sequence(anchor=3)
    with pytest.raises(ValueError, match="at least one anchor token"):
        cache.add_anchor(k[:, :0], v[:, :0])
    slots = cache.extend([s], [2])
    with pytest.raises(ValueError, match="layer"):
        cache.write(L, slots, k[0], v[0])
    with pytest.raises(TypeError, match="slots"):
        cache.write(0, slots.int(), k[0], v[0])
    with pytest.raises(ValueError, match="slots has"):
        cache.write(0, slots[:1], k[0], v[0])
    with pytest.raises(ValueError, match="repeat"):
        cache.extend([s, s], [1, 1])
    with pytest.raises(ValueError, match="query_lens"):
        cache.kernel_args([s], query_lens=[3])
    with pytest.raises(ValueError, match="seqs"):
        cache.kernel_args([])
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(1, 4, 4, HKV, D, dtype=torch.int8)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(1, 4, 0, HKV, D)


def test_write_refuses_slots_the_sequence_does_not_own():
    """Only the slots of the latest extend() are writable: stale slots of a freed or truncated
    sequence, hand-made slots (even equal ones) and anchor pages are refused, nothing written."""
    gen = torch.Generator().manual_seed(3)
    cache = PagedKVCache(L, 16, 4, HKV, D, dtype=torch.float64)
    anchor = cache.add_anchor(*_kv(gen, L, 5, HKV, D))
    a, b = cache.add_sequence(anchor=anchor), cache.add_sequence()
    stale = cache.extend([a], [6])
    cache.write(0, stale, *_kv(gen, 6, HKV, D))
    cache.free_sequence(a)
    before = cache.k.clone()
    k, v = _kv(gen, 6, HKV, D)
    with pytest.raises(ValueError, match="latest extend"):
        cache.write(0, stale, k, v)  # the freed sequence's slots
    slots = cache.extend([b], [2])
    with pytest.raises(ValueError, match="latest extend"):
        cache.write(0, slots.clone(), *_kv(gen, 2, HKV, D))
    anchor_slots = torch.tensor(cache.anchors[anchor].blocks[:1], dtype=torch.int64) * 4
    with pytest.raises(ValueError, match="write_anchor"):
        cache.write(1, anchor_slots, *_kv(gen, 1, HKV, D))
    cache.truncate(b, 1)
    with pytest.raises(ValueError, match="latest extend"):
        cache.write(0, slots, *_kv(gen, 2, HKV, D))
    assert torch.equal(cache.k, before)


def test_anchor_written_layer_by_layer_then_read_only():
    gen = torch.Generator().manual_seed(4)
    cache = PagedKVCache(L, 8, 4, HKV, D, dtype=torch.float64)
    anchor = cache.reserve_anchor(6)
    assert all(cache.allocator.is_pinned(blk) for blk in cache.anchors[anchor].blocks)
    k0, v0 = _kv(gen, 6, HKV, D)
    cache.write_anchor(0, anchor, k0, v0)
    with pytest.raises(ValueError, match=r"layers \[1\]"):
        cache.add_sequence(anchor=anchor)  # layer 1 not written yet
    with pytest.raises(ValueError, match="6"):
        cache.write_anchor(1, anchor, *_kv(gen, 5, HKV, D))
    cache.write_anchor(1, anchor, *_kv(gen, 6, HKV, D))
    seq = cache.add_sequence(anchor=anchor)
    with pytest.raises(ValueError, match="read-only"):
        cache.write_anchor(0, anchor, k0, v0)
    args = cache.anchor_prefill_args(anchor)
    assert args.seq_lens.tolist() == [6] and args.query_start_loc.tolist() == [0, 6]
    torch.testing.assert_close(_gather(cache.k_cache(0), args.block_table[0], 6), k0)
    assert cache.position(seq) == 6


@pytest.mark.parametrize("block_size", [3, 0, True, 2.0])
def test_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(L, 8, block_size, HKV, D)
