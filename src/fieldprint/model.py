"""A decoder-only transformer of the Llama architecture, with a plain path and a paged-cache path.

One code path runs every model of the project, each described by a :class:`ModelConfig`: the
byte-level model trained by E5 (256-symbol vocabulary) and SmolLM2-135M-Instruct
(:data:`SMOLLM2_135M`; weights loaded by :mod:`fieldprint.smollm2`). The architecture:
pre-norm blocks (RMSNorm), rotary positions (rotate-half pairs ``(i, i + D/2)``), grouped-query
attention (``n_head`` query heads share ``n_kv_head`` K/V heads), a SwiGLU MLP, and an output
layer tied to the embedding. Each :class:`Block` owns its forward and its residual wiring.

Two ways to run the same weights:

* ``Transformer.forward(idx)``: the plain training path, ``[B, T]`` tokens -> ``[B, T, V]``
  logits, causal attention through ``scaled_dot_product_attention``.
* ``Transformer.forward_paged(tokens, positions, step)``: the serving path over packed new tokens
  of several sequences. A :class:`PagedStep` is attached to every attention layer for one call:
  it writes the new tokens' K/V (rotated) into a :class:`fieldprint.cache.PagedKVCache` and
  attends over the pinned anchor pages and the sequences' own pages through one of three backends
  with the same paged arguments: ``kernel`` (:func:`fieldprint.attention.paged_anchor_attention`,
  the fused Triton kernel; bf16 or fp16 q and cache), ``reference`` (``reference_attention``: plain
  PyTorch, one sequence at a time, float32/float64) or ``naive`` (``naive_attention``: the same
  function batched and padded, float32, fast on a GPU).

Serving helpers built on it: :func:`prefill_anchor` writes an anchor prologue (a system prompt)
into pinned pages shared by every sequence; :func:`forward_sequences` feeds new tokens of several
sequences (chunked prefill or a decode step); :func:`score_paged` scores text windows the way the
accuracy study does. A ``store`` function decides what the cache holds: the identity keeps the
K/V as computed, a quantize-then-dequantize keeps exactly the values a cache in that format would
hold (simulated storage: the pool keeps its dtype, its values are the format's).

Positions: anchor token ``i`` sits at rotary position ``i``, context token ``j`` of a sequence at
``anchor_len + j``, so the plain path on ``concat(anchor, window)`` is the same computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fieldprint.attention import reference_attention
from fieldprint.attention.reference import naive_attention
from fieldprint.cache import KernelArgs, PagedKVCache

ATTENTION_BACKENDS = ("kernel", "reference", "naive")

# store(x, layer, which) -> the values the cache keeps for x: [T, Hkv, D]; which is "k" or "v"
Store = Callable[[torch.Tensor, int, str], torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    context: int = 128  # longest sequence the model is run on (anchors included)
    dropout: float = 0.0
    rope_base: float = 10000.0
    vocab_size: int = 256  # the byte model's vocabulary
    ffn_hidden: int | None = None  # SwiGLU hidden width; None: about 8/3 d_model, rounded up to 64
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "context", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.ffn_hidden is not None and (not isinstance(self.ffn_hidden, int) or self.ffn_hidden < 1):
            raise ValueError(f"ffn_hidden must be a positive int or None, got {self.ffn_hidden!r}")
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
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        # SwiGLU at about 8/3 d (parameter count of a 4d GELU MLP), rounded up to 64
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, tied embeddings.
SMOLLM2_135M = ModelConfig(n_layer=30, d_model=576, n_head=9, n_kv_head=3, context=8192,
                           rope_base=100000.0, vocab_size=49152, ffn_hidden=1536, norm_eps=1e-5)


def _batch_invariant_ops():
    # imported when asked for: the module decorates Triton kernels, which must happen after
    # TRITON_INTERPRET is set (tests and CPU runs set it before they build a model)
    from fieldprint import batch_invariant

    return batch_invariant


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return _batch_invariant_ops().rms_norm(x, self.weight.to(x.dtype), self.eps)
        # normalized in float32, then scaled in x's dtype (as Llama implementations do)
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * rms).to(x.dtype) * self.weight.to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` without bias that switches to :func:`fieldprint.batch_invariant.linear`."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out, bias=False)
        self.batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return _batch_invariant_ops().linear(x, self.weight)
        return super().forward(x)


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


class PagedStep:
    """What every attention layer of one serving call shares: the cache, the kernel arguments of
    the sequences in the call, where the new tokens' K/V go, and the attention backend.

    ``write(layer, k, v)`` stores the new tokens' ``k, v: [T, Hkv, D]`` of one layer (a bound
    :meth:`PagedKVCache.write` with the step's slots, or :meth:`PagedKVCache.write_anchor`).
    ``kernel_options``: extra keyword arguments of the fused kernel (e.g. ``kv_split_tokens``).
    """

    def __init__(self, cache: PagedKVCache, args: KernelArgs,
                 write: Callable[[int, torch.Tensor, torch.Tensor], None], *,
                 backend: str = "reference", store: Store | None = None, validate: bool = True,
                 kernel_options: dict | None = None) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.cache, self.args, self.write, self.store = cache, args, write, store
        self.backend, self.validate = backend, validate
        # The value checks (token ids, the kernel's index tables) read tensors on the host (a
        # sync, and an error inside CUDA-graph capture); a decode loop whose inputs the cache and
        # the model built may turn them off.
        if kernel_options and backend != "kernel":
            raise ValueError(f"kernel_options are for attention='kernel', not {backend!r}")
        self.kwargs = {"validate": validate, **(kernel_options or {})} if backend == "kernel" else {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k, v: [T, Hkv, D] of the new tokens -> attention output [T, Hq, D]."""
        if self.store is not None:
            k, v = self.store(k, layer, "k"), self.store(v, layer, "v")
        self.write(layer, k, v)
        a, c = self.args, self.cache
        out = _attention_fn(self.backend)(
            q.to(c.dtype), c.k_cache(layer), c.v_cache(layer), a.block_table, a.seq_lens,
            a.query_start_loc, a.anchor_block_table, a.anchor_lens, **self.kwargs)
        return out.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, hd = cfg.d_model, cfg.head_dim
        self.wq = Linear(d, cfg.n_head * hd)
        self.wk = Linear(d, cfg.n_kv_head * hd)
        self.wv = Linear(d, cfg.n_kv_head * hd)
        self.wo = Linear(cfg.n_head * hd, d)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x: [..., T, d] -> rotated q [..., T, Hq, D], rotated k and v [..., T, Hkv, D]."""
        c = self.cfg
        q = self.wq(x).unflatten(-1, (c.n_head, c.head_dim))
        k = self.wk(x).unflatten(-1, (c.n_kv_head, c.head_dim))
        v = self.wv(x).unflatten(-1, (c.n_kv_head, c.head_dim))
        return rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base), v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, step: PagedStep | None = None) -> torch.Tensor:
        """Plain path: x [B, T, d] causal over itself. Paged path (``step``): x [T, d] packed new
        tokens, attending through the step's cache. Returns x's shape."""
        q, k, v = self.qkv(x, positions)
        if step is not None:
            return self.wo(step(self.layer, q, k, v).flatten(-2))
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
        self.gate = Linear(cfg.d_model, cfg.mlp_hidden)
        self.up = Linear(cfg.d_model, cfg.mlp_hidden)
        self.down = Linear(cfg.mlp_hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, step: PagedStep | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), positions, step))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.batch_invariant = False
        self.apply(self._init)
        # GPT-2 style: residual projections scaled down with depth
        for block in self.blocks:
            for w in (block.attn.wo.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def set_batch_invariant(self, on: bool = True) -> Transformer:
        """Batch-invariant mode: every linear layer, RMSNorm and the output layer run the
        fixed-reduction-order kernels of :mod:`fieldprint.batch_invariant`, so with the (batch
        invariant) paged attention kernel a token's K/V and logits do not depend on the other
        tokens of the batch. Returns the model."""
        for m in self.modules():
            if isinstance(m, (Linear, RMSNorm, Transformer)):
                m.batch_invariant = bool(on)
        return self

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return _batch_invariant_ops().linear(self.norm(h), self.embed.weight)
        return self.norm(h) @ self.embed.weight.t()  # tied output layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: [B, T] int64 tokens, T <= context -> logits [B, T, vocab_size]."""
        self.check_tokens(idx, "idx", 2)
        if idx.shape[1] > self.cfg.context:
            raise ValueError(f"idx has {idx.shape[1]} tokens, more than context={self.cfg.context}")
        h = self.drop(self.embed(idx))
        positions = torch.arange(idx.shape[1], device=idx.device)
        for block in self.blocks:
            h = block(h, positions)
        return self.logits(h)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats per token; idx, targets: [B, T]."""
        return F.cross_entropy(self.forward(idx).flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def forward_paged(self, tokens: torch.Tensor, positions: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """One serving call over packed new tokens -> logits [T, vocab_size].

        tokens, positions: [T] int64 (rotary position of each new token), in the packed order of
        the step's ``query_start_loc``; ``step`` writes their K/V and attends (see :class:`PagedStep`).
        Token ids are range-checked unless ``step.validate`` is off.
        """
        self.check_tokens(tokens, "tokens", 1, values=step.validate)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must have the shape of tokens "
                             f"{tuple(tokens.shape)}")
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, positions, step)
        return self.logits(h)

    def check_tokens(self, x: torch.Tensor, name: str, ndim: int, values: bool = True) -> None:
        """x must be an int64 tensor of ``ndim`` dims; with ``values``, of ids in [0, vocab)."""
        vocab = self.cfg.vocab_size
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor of token ids, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
        if values and x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise ValueError(f"{name} must hold token ids in [0, {vocab})")

    def new_cache(self, num_blocks: int, block_size: int, *, dtype: torch.dtype | None = None,
                  seed: int | None = None, poison: bool = False) -> PagedKVCache:
        """A :class:`PagedKVCache` shaped for this model (one pool per layer), on its device."""
        w = self.embed.weight
        return PagedKVCache(self.cfg.n_layer, num_blocks, block_size, self.cfg.n_kv_head, self.cfg.head_dim,
                            dtype=w.dtype if dtype is None else dtype, device=w.device, seed=seed,
                            poison=poison)


def _attention_fn(backend: str):
    if backend == "kernel":
        # imported when asked for: the kernel module imports triton
        from fieldprint.attention import paged_anchor_attention

        return paged_anchor_attention
    return naive_attention if backend == "naive" else reference_attention


@torch.no_grad()
def prefill_anchor(model: Transformer, cache: PagedKVCache, tokens: torch.Tensor, *,
                   attention: str = "reference", store: Store | None = None,
                   kernel_options: dict | None = None) -> int:
    """Run the anchor prologue ``tokens [A] int64`` (causal over itself, positions ``0..A-1``) and
    write its K/V into fresh pinned pages of ``cache``; returns the anchor id for
    :meth:`PagedKVCache.add_sequence`."""
    model.check_tokens(tokens, "tokens", 1)
    anchor = cache.reserve_anchor(tokens.numel())
    step = PagedStep(cache, cache.anchor_prefill_args(anchor),
                     lambda layer, k, v: cache.write_anchor(layer, anchor, k, v),
                     backend=attention, store=store, kernel_options=kernel_options)
    model.forward_paged(tokens, torch.arange(tokens.numel(), device=tokens.device), step)
    return anchor


@torch.no_grad()
def forward_sequences(model: Transformer, cache: PagedKVCache, seqs: list[int], tokens: torch.Tensor,
                      counts: list[int], *, attention: str = "reference", store: Store | None = None,
                      validate: bool = True, kernel_options: dict | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``counts[i]`` new tokens to sequence ``seqs[i]`` and run them through the model.

    tokens: [sum(counts)] int64, packed sequence by sequence (a decode step: one per sequence).
    Returns (logits [sum(counts), vocab_size], slots [sum(counts)] int64 where their K/V went).
    """
    if tokens.shape != (sum(counts),):
        raise ValueError(f"tokens must have shape [{sum(counts)}] (sum of counts), got {tuple(tokens.shape)}")
    starts = [cache.position(s) for s in seqs]
    slots = cache.extend(seqs, counts)
    positions = torch.tensor([p for s, c in zip(starts, counts, strict=True) for p in range(s, s + c)],
                             dtype=torch.int64).to(tokens.device)
    step = PagedStep(cache, cache.kernel_args(seqs, counts),
                     lambda layer, k, v: cache.write(layer, slots, k, v),
                     backend=attention, store=store, validate=validate, kernel_options=kernel_options)
    return model.forward_paged(tokens, positions, step), slots


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
    """Summed next-token loss (nats) of each window through the paged-cache path.

    anchor: [A] int64 tokens, prefilled once into pinned pages shared by every window.
    windows: [N, L + 1] int64: window n's tokens 0..L-1 are the input, 1..L the targets.
    Windows go ``batch`` at a time; each call feeds ``chunk`` new tokens of every window. Pages
    are handed out in a ``seed``-scrambled order and NaN-poisoned until written.
    store / anchor_store: what the cache keeps for context / anchor K/V (None: as computed).
    Returns [N] float64.
    """
    model.check_tokens(anchor, "anchor", 1)
    model.check_tokens(windows, "windows", 2)
    n, length = windows.shape[0], windows.shape[1] - 1
    a = anchor.numel()
    if length < 1:
        raise ValueError(f"windows must hold at least 2 tokens each, got shape {tuple(windows.shape)}")
    if a + length > model.cfg.context:
        raise ValueError(f"anchor ({a}) + window ({length}) tokens exceed the model context "
                         f"({model.cfg.context})")
    if min(batch, chunk, block_size) < 1:
        raise ValueError(f"batch ({batch}), chunk ({chunk}), block_size ({block_size}) must be >= 1")
    device = model.embed.weight.device
    blocks = -(-a // block_size) + min(batch, n) * -(-length // block_size)
    cache = model.new_cache(blocks, block_size, dtype=cache_dtype, seed=seed, poison=True)
    anchor_id = prefill_anchor(model, cache, anchor.to(device), attention=attention,
                               store=anchor_store) if a else None

    nats = torch.zeros(n, dtype=torch.float64)
    for first in range(0, n, batch):
        rows = windows[first:first + batch].to(device)
        nb = rows.shape[0]
        seqs = [cache.add_sequence(anchor=anchor_id) for _ in range(nb)]
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            logits, _ = forward_sequences(model, cache, seqs, rows[:, start:stop].reshape(-1),
                                          [stop - start] * nb, attention=attention, store=store)
            ce = F.cross_entropy(logits.double(), rows[:, start + 1:stop + 1].reshape(-1), reduction="none")
            nats[first:first + nb] += ce.view(nb, stop - start).sum(1).cpu()
        for s in seqs:
            cache.free_sequence(s)
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
