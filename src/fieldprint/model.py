"""A small byte-level decoder-only transformer, with a plain path and a paged-cache path.

The model: 256-symbol byte vocabulary, pre-norm blocks (RMSNorm), rotary positions, grouped-query
attention (``n_head`` query heads share ``n_kv_head`` K/V heads), a SwiGLU MLP, and an output layer
tied to the embedding. Two ways to run the same weights:

* ``Transformer.forward(idx)``: the plain training path, ``[B, T]`` bytes -> ``[B, T, 256]``
  logits, causal attention through ``scaled_dot_product_attention``.
* ``Transformer.forward_paged(...)``: the serving path. Each layer writes the new tokens' K/V
  (rotated) into a :class:`PagedKV` pool and attends over the pinned anchor blocks and the
  sequence's own blocks through one of three backends with the same paged arguments:
  ``kernel`` (:func:`fieldprint.attention.paged_anchor_attention`, the fused Triton kernel; bf16
  or fp16 q and cache), ``reference`` (``reference_attention``: plain PyTorch, one sequence at a
  time, float32/float64) or ``naive`` (``naive_attention``: the same function batched and padded,
  float32, fast on a GPU).

:func:`score_paged` drives the serving path the way the accuracy study uses it: the anchor
prologue is prefilled once into pinned blocks shared by every sequence, then batches of windows
are scored by chunked prefill (several query tokens per sequence per call) through scrambled block
tables. A ``store`` function decides what the cache holds: the identity keeps float32 K/V, a
quantize-then-dequantize keeps exactly the values a cache in that format would hold (simulated
storage: the pool stays float32, its values are the format's).

Positions: anchor token ``i`` sits at rotary position ``i``, context token ``j`` at
``anchor_len + j``, so the plain path on ``concat(anchor, window)`` is the same computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # bytes
ATTENTION_BACKENDS = ("kernel", "reference", "naive")

# store(x, layer, which) -> the values the cache keeps for x: [T, Hkv, D]; which is "k" or "v"
Store = Callable[[torch.Tensor, int, str], torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    context: int = 128  # longest sequence trained on (anchors included at evaluation)
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "context"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dim d_model/n_head = {self.d_model // self.n_head} must be even (rotary)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_hidden(self) -> int:
        # SwiGLU at about 8/3 d (parameter count of a 4d GELU MLP), rounded up to 64
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * rms).to(x.dtype) * self.weight.to(x.dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x: [..., T, H, D] by angle positions[t] * base^(-2i/D).
    positions: [T] (or broadcastable to x's leading dims + T)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., T, D/2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos = angles.cos().to(dtype)[..., None, :]  # [..., T, 1, D/2]
    sin = angles.sin().to(dtype)[..., None, :]
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.wq = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, d, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x: [..., T, d] -> rotated q [..., T, Hq, D], rotated k and v [..., T, Hkv, D]."""
        c = self.cfg
        q = self.wq(x).unflatten(-1, (c.n_head, c.head_dim))
        k = self.wk(x).unflatten(-1, (c.n_kv_head, c.head_dim))
        v = self.wv(x).unflatten(-1, (c.n_kv_head, c.head_dim))
        return rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] -> [B, T, d], causal."""
        t = x.shape[1]
        q, k, v = self.qkv(x, torch.arange(t, device=x.device))
        group = self.cfg.n_head // self.cfg.n_kv_head
        # K/V heads repeated for the query heads of their group (keeps SDPA on its fused backends)
        k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, dropout_p=self.cfg.dropout if self.training else 0.0,
        )
        return self.wo(out.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)
        # GPT-2 style: residual projections scaled down with depth
        for block in self.blocks:
            for w in (block.attn.wo.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) @ self.embed.weight.t()  # tied output layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: [B, T] int64 bytes, T <= context -> logits [B, T, 256]."""
        _check_tokens(idx, "idx", 2)
        if idx.shape[1] > self.cfg.context:
            raise ValueError(f"idx has {idx.shape[1]} tokens, more than context={self.cfg.context}")
        h = self.drop(self.embed(idx))
        for b in self.blocks:
            h = h + b.drop(b.attn(b.attn_norm(h)))
            h = h + b.drop(b.mlp(b.mlp_norm(h)))
        return self.logits(h)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats per byte; idx, targets: [B, T]."""
        return F.cross_entropy(self.forward(idx).flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def forward_paged(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKV,
        slots: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        anchor_block_table: torch.Tensor | None = None,
        anchor_lens: torch.Tensor | None = None,
        *,
        store: Store | None = None,
        attention: str = "reference",
    ) -> torch.Tensor:
        """One serving step over packed new tokens of B sequences -> logits [T, 256].

        tokens, positions: [T] int64 (rotary position of each new token); slots: [T] int64 flat
        cache slot (block_id * block_size + offset) where each token's K/V is written; the paged
        arguments are those of ``paged_anchor_attention`` (seq_lens counts the new tokens).
        store(x, layer, "k"|"v") gives what the cache keeps (default: x itself).
        """
        _check_tokens(tokens, "tokens", 1)
        if positions.shape != tokens.shape or slots.shape != tokens.shape:
            raise ValueError(f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} "
                             f"must have the shape of tokens {tuple(tokens.shape)}")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        attend = _attention_fn(attention)
        h = self.embed(tokens)
        for layer, b in enumerate(self.blocks):
            q, k, v = b.attn.qkv(b.attn_norm(h), positions)
            if store is not None:
                k, v = store(k, layer, "k"), store(v, layer, "v")
            cache.write(layer, slots, k, v)
            out = attend(
                q.to(cache.dtype), cache.k[layer], cache.v[layer], block_table, seq_lens,
                query_start_loc, anchor_block_table, anchor_lens,
            )
            h = h + b.attn.wo(out.to(h.dtype).flatten(-2))
            h = h + b.mlp(b.mlp_norm(h))
        return self.logits(h)


def _check_tokens(x: torch.Tensor, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of bytes, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= VOCAB):
        raise ValueError(f"{name} must hold bytes in [0, {VOCAB})")


def _attention_fn(backend: str):
    # import the kernel (and triton) only when it is asked for
    if backend == "kernel":
        from fieldprint.attention import paged_anchor_attention

        return paged_anchor_attention
    if backend == "naive":
        from fieldprint.attention.reference import naive_attention

        return naive_attention
    from fieldprint.attention import reference_attention

    return reference_attention


class PagedKV:
    """K/V pools of every layer, [num_blocks, block_size, Hkv, D] each, and a block allocator.

    Blocks are handed out in a seeded random order, so block tables are scrambled as in a real
    serving system. Pinned blocks (the anchors) are never returned by :meth:`release`.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        shape = (num_blocks, block_size, cfg.n_kv_head, cfg.head_dim)
        # NaN-poisoned: a read of a slot never written shows up in the loss
        self.k = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self._gen = torch.Generator().manual_seed(seed)
        self._free = torch.randperm(num_blocks, generator=self._gen).tolist()
        self._pinned: set[int] = set()

    def allocate(self, n: int, *, pin: bool = False) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"cache has {len(self._free)} free blocks, {n} requested")
        got, self._free = self._free[:n], self._free[n:]
        if pin:
            self._pinned.update(got)
        return got

    def release(self, blocks: list[int]) -> None:
        """Return unpinned blocks to the free list, in a fresh random order."""
        back = [b for b in blocks if b not in self._pinned]
        for layer in range(len(self.k)):  # re-poison so stale K/V can never be read silently
            self.k[layer][back] = float("nan")
            self.v[layer][back] = float("nan")
        pool = self._free + back
        self._free = [pool[i] for i in torch.randperm(len(pool), generator=self._gen).tolist()]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] written at flat slots [T] of layer's pools."""
        self.k[layer].view(-1, *self.k[layer].shape[2:])[slots] = k.to(self.dtype)
        self.v[layer].view(-1, *self.v[layer].shape[2:])[slots] = v.to(self.dtype)


def _slots(blocks: list[int], start: int, stop: int, block_size: int) -> list[int]:
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]


@torch.no_grad()
def score_paged(
    model: Transformer,
    anchor: torch.Tensor,
    windows: torch.Tensor,
    *,
    batch: int = 8,
    chunk: int = 32,
    block_size: int = 16,
    store: Store | None = None,
    anchor_store: Store | None = None,
    attention: str = "reference",
    cache_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.Tensor:
    """Summed next-byte loss (nats) of each window through the paged-cache path.

    anchor: [A] int64 bytes, prefilled once into pinned blocks shared by every window.
    windows: [N, L + 1] int64: window n's bytes 0..L-1 are the input, 1..L the targets.
    Windows go ``batch`` at a time; each call feeds ``chunk`` new tokens of every window.
    store / anchor_store: what the cache keeps for context / anchor K/V (None: float32 as is).
    Returns [N] float64.
    """
    _check_tokens(anchor, "anchor", 1)
    _check_tokens(windows, "windows", 2)
    n, length = windows.shape[0], windows.shape[1] - 1
    a = anchor.numel()
    if length < 1:
        raise ValueError(f"windows must hold at least 2 bytes each, got shape {tuple(windows.shape)}")
    if a + length > model.cfg.context:
        raise ValueError(f"anchor ({a}) + window ({length}) bytes exceed the model context "
                         f"({model.cfg.context})")
    if min(batch, chunk, block_size) < 1:
        raise ValueError(f"batch ({batch}), chunk ({chunk}), block_size ({block_size}) must be >= 1")
    device = model.embed.weight.device
    anchor_blocks_n = -(-a // block_size)
    ctx_blocks_n = -(-length // block_size)
    cache = PagedKV(model.cfg, anchor_blocks_n + batch * ctx_blocks_n, block_size,
                    dtype=cache_dtype, device=device, seed=seed)
    i32 = dict(dtype=torch.int32, device=device)
    i64 = dict(dtype=torch.int64, device=device)

    # the anchor prologue: one sequence without anchors of its own, written into pinned blocks
    anchor_blocks = cache.allocate(anchor_blocks_n, pin=True)
    if a:
        model.forward_paged(
            anchor.to(device), torch.arange(a, **i64), cache,
            torch.tensor(_slots(anchor_blocks, 0, a, block_size), **i64),
            torch.tensor([anchor_blocks], **i32), torch.tensor([a], **i32),
            torch.tensor([0, a], **i32), store=anchor_store, attention=attention,
        )

    nats = torch.zeros(n, dtype=torch.float64)
    for first in range(0, n, batch):
        rows = windows[first:first + batch].to(device)
        nb = rows.shape[0]
        tables = [cache.allocate(ctx_blocks_n) for _ in range(nb)]
        block_table = torch.tensor(tables, **i32)
        anchor_table = torch.tensor([anchor_blocks] * nb, **i32) if a else None
        anchor_lens = torch.full((nb,), a, **i32) if a else None
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            q = stop - start
            logits = model.forward_paged(
                rows[:, start:stop].reshape(-1),
                (a + torch.arange(start, stop, **i64)).repeat(nb),
                cache,
                torch.tensor([s for t in tables for s in _slots(t, start, stop, block_size)], **i64),
                block_table,
                torch.full((nb,), stop, **i32),
                torch.arange(0, nb * q + 1, q, **i32),
                anchor_table,
                anchor_lens,
                store=store,
                attention=attention,
            )
            ce = F.cross_entropy(logits.double(), rows[:, start + 1:stop + 1].reshape(-1),
                                 reduction="none")
            nats[first:first + nb] += ce.view(nb, q).sum(1).cpu()
        cache.release([b for t in tables for b in t])
    return nats


@torch.no_grad()
def score_plain(model: Transformer, anchor: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """The same quantity as :func:`score_paged` through the plain path: [N] float64 nats."""
    n = windows.shape[0]
    idx = torch.cat([anchor.expand(n, -1), windows[:, :-1]], dim=1).to(model.embed.weight.device)
    logits = model.forward(idx)[:, anchor.numel():]
    ce = F.cross_entropy(logits.double().flatten(0, 1), windows[:, 1:].flatten().to(idx.device),
                         reduction="none")
    return ce.view(n, -1).sum(1).cpu()


def load_checkpoint(path: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    """The model saved by ``fieldprint.experiments.e5_train`` (in eval mode, weights in dtype)
    and the checkpoint's training summary."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {str(path)!r} does not exist (run e5_train first)") from None
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict({k: v.to(dtype) for k, v in ckpt["state_dict"].items()})
    return model.to(device=device, dtype=dtype).eval(), ckpt["train"]
