"""The per-step baselines of the commit path (`fieldprint.commit` modes ``per_step_copy_cpu`` and
``per_step_gpu``): what verification costs when every decode step hashes its new K/V at once,
instead of committing sealed pages at a boundary.

* `PerStepCopyCPU`: copies the step's new K/V (all layers, raw cache dtype) to the host and
  hashes it with the CPU ``blake3`` package (all threads): the "PCIe death sentence".
* `PerStepGPU`: quantizes the step's new K/V on the device (one scale per layer and K/V half),
  hashes each layer's K and V codes together, and fetches the digests synchronously.

Both take ``slots [T]`` (the step's new tokens, from ``PagedKVCache.extend``) and return the
step's digest bytes. They hash the step's tokens in token order, ``[L, T, Hkv, D]`` per pool,
whatever the V pool's page layout: a step's tokens are no page (an ``"hdn"`` pool keeps no token's
elements together), and these digests are no page leaves, so the same writes give the same digests
in either layout.
"""

from __future__ import annotations

import blake3
import torch

from fieldprint.cache import PagedKVCache
from fieldprint.commit_pages import half_layouts, quantize_pages
from fieldprint.hashing import blake3_many
from fieldprint.merkle import LEAF_KEY

__all__ = ["PerStepCopyCPU", "PerStepGPU"]


def _new_tokens(cache: PagedKVCache, slots: torch.Tensor) -> list[torch.Tensor]:
    """The step's new tokens at the flat ``slots [T]``: ``[L, T, Hkv, D]`` of K, then of V (copies).
    An "nhd" pool is indexed as the view [L, N * S, Hkv, D]; an "hdn" pool, whose slots are no
    rows, by page and offset."""
    layouts, out = half_layouts(cache), []
    for pool, kind in ((cache.k, "k"), (cache.v, "v")):
        if layouts[kind] == "nhd":
            shape = (cache.num_layers, cache.num_blocks * cache.block_size, cache.num_kv_heads, cache.head_dim)
            out.append(pool.view(shape)[:, slots])
        else:
            out.append(pool[:, slots // cache.block_size, slots % cache.block_size])
    return out


class PerStepCopyCPU:
    """Host copy + CPU BLAKE3 of every step's new K/V; `step` returns the 32-byte digest."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache

    def step(self, slots: torch.Tensor) -> bytes:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for new in _new_tokens(self.cache, slots):
            new = new.cpu()  # blocking device-to-host copy
            h.update(new.contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()


class PerStepGPU:
    """Device quantize + BLAKE3 of every step's new K/V; `step` returns one 32-byte digest per
    layer (of its K and V codes, scales and helper bits), fetched synchronously."""

    def __init__(self, cache: PagedKVCache, fmt: str, rounding: str, quant_backend: str, hash_backend: str) -> None:
        self.cache, self.fmt, self.rounding = cache, fmt, rounding
        self.quant_backend, self.hash_backend = quant_backend, hash_backend

    def step(self, slots: torch.Tensor) -> bytes:
        rows, finite = [], []
        for x in _new_tokens(self.cache, slots):  # [L, T, Hkv, D]: one "page" per layer
            codes, helper, scale, ok = quantize_pages(x, self.fmt, self.rounding, self.quant_backend)
            rows.append(torch.cat([codes, scale.view(torch.uint8), helper], dim=1))
            finite.append(ok)
        digests = blake3_many(torch.cat(rows, dim=1).contiguous(), key=LEAF_KEY, backend=self.hash_backend)
        out = bytes(digests.cpu().flatten().tolist())  # synchronous fetch
        if not bool(torch.cat(finite).all()):
            raise ValueError("the step's new K/V holds NaN or Inf: nothing to hash")
        return out
