"""Commit-boundary verification of a paged KV cache.

Every ``interval`` decode steps the pages sealed since the last commit (and, at the first commit,
the pinned anchor pages) are quantized deterministically (:func:`fieldprint.quant.quantize`),
serialized as *page leaves*, hashed on the GPU (:func:`fieldprint.hashing.blake3_many`) and
appended to a Merkle tree (RFC 6962 shape, :mod:`fieldprint.merkle`) whose root commits to every
page committed so far. Only the 32-byte root (and, with ``fetch_leaves``, the 32-byte leaf
digests of the new pages) crosses PCIe, into pinned host memory with ``non_blocking=True``.

    committer = Committer(cache, mode="commit_async", interval=16, fmt="e4m3", rounding="two_grid")
    for step in ...:
        slots = cache.extend(seqs, [1] * B)
        ... per layer: cache.write(layer, slots, k, v); attention ...
        committer.step(slots)          # a commit every `interval` calls (per-step modes: every call)
    committer.root()                   # bytes(32): the latest committed root (waits if pending)
    committer.verify()                 # re-hash the stored pages, check root, localize tampering

Modes (:data:`MODES`):

* ``none``: nothing (the baseline).
* ``per_step_copy_cpu``: every step copies the step's new K/V (all layers, raw cache dtype) to
  the host and hashes it with the CPU ``blake3`` package (all threads): the "PCIe death sentence".
* ``per_step_gpu``: every step quantizes and hashes the new K/V on the GPU and fetches the
  digests synchronously.
* ``commit_sync``: at each boundary, the commit runs on the current stream and the root is
  fetched before ``step`` returns.
* ``commit_async``: at each boundary, the commit runs on a side CUDA stream; the root is fetched
  lazily (``root()``), so decode never waits for hashing. On a CPU this is ``commit_sync``.

Stream ordering (``commit_async``): ``step`` records an event on the current (decode) stream
after the step's KV writes; the side stream waits on it, gathers the sealed pages out of the pool
(a copy, so later writes cannot race the hash), and does all the commit work on tensors it
allocated itself. It records a *done* event after the copies to pinned memory; ``root()``
synchronizes on it. A sealed page is never written again while its sequence lives; before
freeing or truncating sequences (which lets pages be reused), call :meth:`Committer.fence` so
the decode stream waits for the gather. The stored leaf rows are read by :meth:`verify` on the
decode stream after a full synchronization, and ``record_stream`` marks each one used there.

Page leaves: one per page, layer and K/V half, in the layout of ``fieldprint.merkle``
(``page_leaf_bytes``, version 1): a 64-byte header (magic, page id, layer, kind, format,
rounding, sizes), the codes, the page's power-of-two scale (float32), the two_grid helper bits,
zero padding to a multiple of 64 bytes. Each page is quantized on its own, with the per-tensor
scale rule of ``fieldprint.quant``; the K and V halves of a page get separate scales. The page id
(:func:`page_id`) encodes anchor/context, owner, page index and valid tokens, so a leaf names
a logical page and two caches with the same contents commit to the same root whatever physical
pages they use. Padding slots of an anchor's last page are zeroed before quantization.

The leaf digest is ``blake3_many(rows, key=merkle.LEAF_KEY)``; the rows themselves are kept on the
device as the committed copy of the quantized pages (:attr:`Committer.store`), which
:meth:`Committer.verify` re-hashes. Flip any bit of a stored row (codes, helper, scale, header or
padding) and the recomputed root differs; comparing the recomputed leaves with the host's copy
of the committed leaf digests and checking each Merkle proof against the committed root names
the page. The rows are built on the device in one pass (headers prepared on the host and copied
from pinned memory): ``page_leaf_bytes`` itself builds its headers with a pageable copy, which
would make the host wait for the side stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import blake3 as _b3
import torch

from fieldprint import merkle
from fieldprint.cache import PagedKVCache, PageRef
from fieldprint.formats import FORMATS, ROUNDING_IDS, pow2
from fieldprint.hashing import blake3_many
from fieldprint.leaf import LeafSpec, header_rows, leaf_bytes, page_scales
from fieldprint.merkle import MerkleTree, verify_proof
from fieldprint.quant import code_bytes, quantize
from fieldprint.quant_kernels import launch_quantize

MODES = ("none", "per_step_copy_cpu", "per_step_gpu", "commit_sync", "commit_async")
COMMIT_MODES = ("commit_sync", "commit_async")
ROUNDINGS = tuple(r for r in ROUNDING_IDS if r != "stochastic")  # stochastic would need a seed per page
_ROOT_RING = 8  # pinned root buffers in flight


@dataclass(frozen=True)
class LeafRef:
    """What leaf ``i`` of the tree commits to: the ``kind`` ("k" or "v") half of page ``page``
    in layer ``layer``."""

    page: PageRef
    layer: int
    kind: str


def page_id(page: PageRef) -> int:
    """The 64-bit page id of a leaf header: ``anchor << 62 | owner << 40 | index << 16 | tokens``
    (owner: sequence or anchor id < 2**22; index: page of that owner < 2**24; tokens: valid
    tokens < 2**16). It binds a leaf to its logical place, not to a physical pool page."""
    if not (0 <= page.owner < 2**22 and 0 <= page.index < 2**24 and 0 <= page.tokens < 2**16):
        raise ValueError(f"page {page} does not fit the 64-bit page id (owner < 2**22, index < 2**24)")
    return (page.kind == "anchor") << 62 | page.owner << 40 | page.index << 16 | page.tokens


@dataclass(frozen=True)
class VerifyResult:
    """``ok``: the stored pages hash to the committed root. ``tampered``: the leaves whose Merkle
    proof fails against the committed root, with what they hold."""

    ok: bool
    root: bytes
    recomputed_root: bytes
    num_leaves: int
    tampered: list[int]
    tampered_pages: list[LeafRef]


class Committer:
    """Commits the pages of ``cache`` every ``interval`` steps (see the module doc).

    mode: one of :data:`MODES`; fmt, rounding: the quantization of the pages
    (``fieldprint.quant``); fetch_leaves: also copy the leaf digests to the host (needed by
    :meth:`verify`); hash_backend / quant_backend: ``"auto"`` (CUDA -> Triton, CPU -> reference)
    or ``"triton"``; stream: the side stream of ``commit_async`` (default: a new one).
    """

    def __init__(
        self, cache: PagedKVCache, mode: str = "commit_async", interval: int = 16, fmt: str = "e4m3",
        rounding: str = "two_grid", fetch_leaves: bool = True, hash_backend: str = "auto",
        quant_backend: str = "auto", stream: torch.cuda.Stream | None = None,
    ) -> None:
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int, got {interval!r}")
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS} (stochastic would need a seed per page), "
                             f"got {rounding!r}")
        if quant_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"quant_backend must be 'auto', 'torch' or 'triton', got {quant_backend!r}")
        if (cache.num_kv_heads * cache.head_dim) % 8:
            raise ValueError("num_kv_heads * head_dim of the cache must be a multiple of 8 (whole helper bytes "
                             f"per token), got {cache.num_kv_heads} * {cache.head_dim}")
        self.cache, self.mode, self.interval = cache, mode, interval
        self._spec = LeafSpec(fmt, rounding, elems=cache.block_size * cache.num_kv_heads * cache.head_dim)
        self.fmt, self.rounding = fmt, rounding
        self.fetch_leaves, self.hash_backend, self.quant_backend = fetch_leaves, hash_backend, quant_backend
        self.device = cache.device
        cuda = self.device.type == "cuda"
        if stream is not None and not (cuda and mode == "commit_async"):
            raise ValueError("stream applies only to mode='commit_async' on a CUDA cache")
        # One side stream per committer unless given: pass the same stream to successive
        # committers so that the caching allocator can reuse their freed memory.
        self._side = (stream or torch.cuda.Stream(self.device)) if cuda and mode == "commit_async" else None
        self.steps = 0
        self.commits = 0
        self.leaves: list[LeafRef] = []
        self.store: list[torch.Tensor] = []  # leaf rows [n_i, row_bytes] uint8, one per commit
        self.step_digests: list[bytes] = []  # per-step modes: one digest per step (host)
        self._tree = _DeviceTree(self.device, hash_backend)
        self._anchors_done: set[int] = set()
        self._roots: list[tuple[int, bytes]] = []  # (leaves covered, root) fetched to the host
        self._pending: list[tuple[torch.cuda.Event | None, int, int]] = []  # (done, ring slot, leaves)
        self._root_host = torch.zeros((_ROOT_RING, 32), dtype=torch.uint8, pin_memory=cuda)
        self._leaf_host = torch.zeros((0, 32), dtype=torch.uint8)
        self._last_done: torch.cuda.Event | None = None
        self._nonfinite: torch.Tensor | None = None  # device int32 [1]: NaN/Inf seen by the kernel
        self._trusted: tuple[int, object] | None = None  # (leaves, MerkleTree of the host digests)

    # ------------------------------------------------------------------ the decode-loop hook

    def step(self, slots: torch.Tensor) -> None:
        """Call once per decode step after the step's KV writes; ``slots [T]`` are the new tokens'
        slots (from ``PagedKVCache.extend``)."""
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.dim() != 1:
            raise TypeError("slots must be the 1-D int64 tensor PagedKVCache.extend returned")
        if slots.device != self.device:
            raise ValueError(f"slots is on {slots.device} but the cache is on {self.device}")
        self.steps += 1
        if self.mode == "per_step_copy_cpu":
            self._per_step_cpu(slots)
        elif self.mode == "per_step_gpu":
            self._per_step_gpu(slots)
        elif self.mode in COMMIT_MODES and self.steps % self.interval == 0:
            self.commit()

    def commit(self, pages: list[PageRef] | None = None) -> None:
        """Commit new anchors and ``pages`` (default: the pages sealed since the last commit) now."""
        if self.mode not in COMMIT_MODES:
            raise ValueError(f"commit() needs mode in {COMMIT_MODES}, this committer is {self.mode!r}")
        if pages is not None and not all(isinstance(p, PageRef) for p in pages):
            raise TypeError("pages must be a list of PageRef (from PagedKVCache.complete_pages)")
        anchor_pages = []
        for a in sorted(self.cache.anchors):
            if a not in self._anchors_done:
                anchor_pages += self.cache.anchor_pages(a)
                self._anchors_done.add(a)
        pages = anchor_pages + (self.cache.take_sealed() if pages is None else list(pages))
        if not pages:
            return
        L = self.cache.num_layers
        self.leaves += [LeafRef(p, layer, kind) for p in pages for layer in range(L) for kind in ("k", "v")]
        ids = [page_id(p) for p in pages for _ in range(2 * L)]
        header = header_rows(self._spec, ids, [layer for _ in pages for layer in range(L) for _ in "kv"],
                             ["k", "v"] * (len(pages) * L))
        blocks = torch.tensor([p.block for p in pages], dtype=torch.int64)
        tokens = torch.tensor([p.tokens for p in pages], dtype=torch.int64)
        if self.device.type == "cuda":
            header, blocks, tokens = header.pin_memory(), blocks.pin_memory(), tokens.pin_memory()
        slot = self.commits % _ROOT_RING
        self._reuse_slot()
        stream_ctx = contextlib.nullcontext()
        if self._side is not None:
            written = torch.cuda.Event()
            written.record()
            self._side.wait_event(written)
            stream_ctx = torch.cuda.stream(self._side)
        with stream_ctx:
            dev = self.device
            rows = self._leaf_rows(header.to(dev, non_blocking=True), blocks.to(dev, non_blocking=True),
                                   tokens.to(dev, non_blocking=True))
            digests = _hash(rows, "leaf", self.hash_backend)
            root = self._tree.append(digests)
            self._root_host[slot].copy_(root, non_blocking=True)
            first = len(self.leaves) - digests.shape[0]
            if self.fetch_leaves:
                self._grow_leaf_host(len(self.leaves))
                self._leaf_host[first:len(self.leaves)].copy_(digests, non_blocking=True)
            done = None
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
        self.store.append(rows)
        self._pending.append((done, slot, len(self.leaves)))
        self._last_done = done
        self.commits += 1
        if self._side is None:
            self._harvest(wait=True)  # commit_sync (and every CPU run): the root is on the host now

    def root(self) -> bytes:
        """The latest committed root (32 bytes); waits for a commit still in flight."""
        self._harvest(wait=True)
        if not self._roots:
            raise ValueError("nothing committed yet: call commit() (or step() past a boundary) first")
        return self._roots[-1][1]

    def roots(self) -> list[tuple[int, bytes]]:
        """Every committed root as ``(leaves covered, root)``, oldest first."""
        self._harvest(wait=True)
        return list(self._roots)

    def fence(self) -> None:
        """Make the current stream wait for the commits in flight (before freeing pages)."""
        if self._last_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_done)

    # ------------------------------------------------------------------ verification

    def verify(self, root: bytes | None = None) -> VerifyResult:
        """Re-hash every stored page leaf and check it against the committed ``root`` (default:
        the latest); localize mismatches with Merkle proofs over the host's leaf digests."""
        trusted_root = self.root() if root is None else root
        if not isinstance(trusted_root, bytes | bytearray) or len(trusted_root) != 32:
            raise ValueError(f"root must be 32 bytes, got {trusted_root!r}")
        if not self.fetch_leaves:
            raise ValueError("verify() needs the leaf digests on the host: use fetch_leaves=True")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        n = len(self.leaves)
        trusted = self._leaf_host[:n]
        if self._trusted is None or self._trusted[0] != n:  # host tree of the committed digests
            self._trusted = (n, MerkleTree(trusted.clone()))
        tree = self._trusted[1]
        if _as_bytes(tree.root) != bytes(trusted_root):
            raise ValueError("the host's leaf digests do not hash to the committed root")
        if self.device.type == "cuda":
            for rows in self.store:
                rows.record_stream(torch.cuda.current_stream(self.device))
        fresh_dev = torch.cat([_hash(rows, "leaf", self.hash_backend) for rows in self.store])
        recomputed = _as_bytes(MerkleTree(fresh_dev, backend=self.hash_backend).root)
        fresh = fresh_dev.cpu()
        tampered = []
        for i in torch.nonzero((fresh != trusted).any(dim=1)).flatten().tolist():
            proof = tree.proof(i)
            if not verify_proof(bytes(trusted_root), _as_bytes(fresh[i]), i, n, proof):
                tampered.append(i)
        return VerifyResult(
            ok=recomputed == bytes(trusted_root) and not tampered, root=bytes(trusted_root),
            recomputed_root=recomputed, num_leaves=n, tampered=tampered,
            tampered_pages=[self.leaves[i] for i in tampered],
        )

    def row_fields(self, leaf: int) -> dict[str, torch.Tensor]:
        """Views into the stored row of leaf ``leaf`` (uint8): header, codes, scale (float32),
        helper (empty unless two_grid), padding (zeros up to a multiple of 64 bytes)."""
        if not isinstance(leaf, int) or not 0 <= leaf < len(self.leaves):
            raise ValueError(f"leaf must be an int in [0, {len(self.leaves)}), got {leaf!r}")
        for rows in self.store:
            if leaf < rows.shape[0]:
                row = rows[leaf]
                break
            leaf -= rows.shape[0]
        out, at = {}, 0
        for name, size in self._spec.fields():
            out[name] = row[at:at + size]
            at += size
        return out

    # ------------------------------------------------------------------ internals

    def _leaf_rows(self, header: torch.Tensor, blocks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[P*L*2, row_bytes] uint8 leaf rows of pages ``blocks [P]`` (``tokens [P]`` valid each),
        in the order page, layer, K then V; byte for byte ``fieldprint.merkle.page_leaf_bytes``."""
        c = self.cache
        P, L = blocks.shape[0], c.num_layers
        # Gather a copy: [L, P, S, Hkv, D] twice -> [P, L, 2, S, Hkv, D], the order of the leaves.
        x = torch.stack([c.k[:, blocks], c.v[:, blocks]], dim=2).transpose(0, 1)
        valid = torch.arange(c.block_size, device=blocks.device)[None, :] < tokens[:, None]  # [P, S]
        x = x.masked_fill(~valid[:, None, None, :, None, None], 0).reshape(P * L * 2, -1)
        codes, helper, scale, flag = _quantize_pages(x, self.fmt, self.rounding, self.quant_backend)
        self._note_flag(flag)
        return leaf_bytes(self._spec, header, codes, scale, helper)

    def _per_step_cpu(self, slots: torch.Tensor) -> None:
        c = self.cache
        shape = (c.num_layers, c.num_blocks * c.block_size, c.num_kv_heads, c.head_dim)
        k = c.k.view(shape)[:, slots].cpu()  # blocking device-to-host copy of the new K/V
        v = c.v.view(shape)[:, slots].cpu()
        h = _b3.blake3(max_threads=_b3.blake3.AUTO)
        h.update(_host_bytes(k))
        h.update(_host_bytes(v))
        self.step_digests.append(h.digest())

    def _per_step_gpu(self, slots: torch.Tensor) -> None:
        c = self.cache
        shape = (c.num_layers, c.num_blocks * c.block_size, c.num_kv_heads, c.head_dim)
        rows = []
        for pool in (c.k, c.v):
            x = pool.view(shape)[:, slots]  # [L, T, Hkv, D]
            codes, helper, scale, flag = _quantize_pages(x, self.fmt, self.rounding, self.quant_backend)
            self._note_flag(flag)
            rows.append(torch.cat([codes, scale.view(torch.uint8), helper], dim=1))
        digests = _hash(torch.cat(rows, dim=1).contiguous(), "leaf", self.hash_backend)
        self.step_digests.append(bytes(digests.cpu().flatten().tolist()))  # synchronous fetch
        self._check_flags()

    def _note_flag(self, flag: torch.Tensor | None) -> None:
        if flag is not None:
            self._nonfinite = flag if self._nonfinite is None else self._nonfinite + flag

    def _check_flags(self) -> None:
        """Raise if a quantized page held NaN/Inf (read after the commit's work is done)."""
        if self._nonfinite is not None and int(self._nonfinite.item()):
            raise ValueError("the KV cache holds NaN or Inf in a committed page: nothing to commit")

    def _grow_leaf_host(self, n: int) -> None:
        if n <= self._leaf_host.shape[0]:
            return
        self._harvest(wait=True)  # no copy into the old buffer may be in flight
        cap = max(2 * n, 64)  # doubling: a host wait only when the count of leaves doubles
        new = torch.zeros((cap, 32), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        new[: self._leaf_host.shape[0]] = self._leaf_host
        self._leaf_host = new

    def _reuse_slot(self) -> None:
        while len(self._pending) >= _ROOT_RING:
            self._harvest_one()

    def _harvest(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][0] is None or self._pending[0][0].query()):
            self._harvest_one()
        if not self._pending:
            self._check_flags()

    def _harvest_one(self) -> None:
        done, slot, n = self._pending.pop(0)
        if done is not None:
            done.synchronize()
        self._roots.append((n, bytes(self._root_host[slot].tolist())))


class _DeviceTree:
    """RFC 6962 Merkle tree kept level by level on the device, extended in place.

    Level 0 holds the leaf digests; node ``i`` of level ``h+1`` hashes nodes ``2i, 2i+1`` of
    level ``h`` (keyed with NODE_KEY), or is node ``2i`` itself when that has no right sibling.
    Bottom-up promotion of a lone last node gives exactly RFC 6962's split at the largest power of
    two below ``n``. Appending leaves recomputes only the nodes to the right of the first new one.
    """

    def __init__(self, device: torch.device, backend: str) -> None:
        self.device, self.backend = device, backend
        self.levels: list[torch.Tensor] = []

    def append(self, digests: torch.Tensor) -> torch.Tensor:
        """Add ``digests [m, 32]`` as leaves; returns the root ``[32]`` uint8 on the device."""
        if not self.levels:
            self.levels = [digests[:0]]
        first = self.levels[0].shape[0]
        self.levels[0] = torch.cat([self.levels[0], digests])
        h = 0
        while self.levels[h].shape[0] > 1:
            cur = self.levels[h]
            n = cur.shape[0]
            start = first // 2
            pairs = (n - 2 * start) // 2
            new = _hash(cur[2 * start: 2 * start + 2 * pairs].reshape(pairs, 64), "node", self.backend)
            if n % 2:
                new = torch.cat([new, cur[-1:]])
            if h + 1 == len(self.levels):
                self.levels.append(new)
            else:
                self.levels[h + 1] = torch.cat([self.levels[h + 1][:start], new])
            first, h = start, h + 1
        del self.levels[h + 1:]
        return self.levels[h][0]


def _quantize_pages(x: torch.Tensor, fmt: str, rounding: str, backend: str = "auto"):
    """Quantize pages ``x [P, ...]`` independently, each with its own power-of-two scale.

    Returns uint8 rows ``codes [P, C]``, ``helper [P, H]`` (H = 0 unless two_grid),
    ``scale [P, 1]`` (the float32 ``2**k`` of `fieldprint.leaf.page_scales`) and, on the Triton
    path, the device int32 [1] non-finite flag (None on the torch path, where NaN/Inf raise at
    once). backend: ``"auto"`` (CUDA -> Triton, CPU -> torch), ``"torch"``, ``"triton"`` (a CPU tensor only under
    TRITON_INTERPRET=1). The Triton path launches the quantization kernel of
    ``fieldprint.quant_kernels`` directly: ``quantize`` reads its finite flag and validates a
    given scale on the host, and either would stall the decode stream behind an async commit.
    Both paths produce the codes of ``quantize(page, fmt, rounding, scale=2**k)``.
    """
    P = x.shape[0]
    flat = x.reshape(P, -1)
    if flat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        flat = flat.float()
    k, _ = page_scales(flat, fmt)
    flag = None
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        n = flat.numel()
        codes = torch.empty(n, dtype=FORMATS[fmt].code_dtype, device=x.device)
        helper = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device) if rounding == "two_grid" else None
        flag = launch_quantize(flat.contiguous().reshape(-1), k, fmt, rounding, 0, 0, None, codes, helper)
    else:
        scale = pow2(k).reshape(P, 1) if FORMATS[fmt].scaled else None
        qt = quantize(flat, fmt, rounding, scale=scale, backend="torch")
        codes, helper = qt.codes, qt.helper
    codes = code_bytes(codes.reshape(P, -1))
    helper = (helper.reshape(P, -1) if helper is not None
              else torch.zeros((P, 0), dtype=torch.uint8, device=x.device))
    return codes, helper, pow2(k).reshape(P, 1), flag


def _hash(rows: torch.Tensor, kind: str, backend: str) -> torch.Tensor:
    """BLAKE3 of each row, keyed for ``kind`` ("leaf" or "node") as in :mod:`fieldprint.merkle`."""
    return blake3_many(rows, key=merkle.LEAF_KEY if kind == "leaf" else merkle.NODE_KEY, backend=backend)


def _host_bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def _as_bytes(x) -> bytes:
    if isinstance(x, torch.Tensor):
        return bytes(x.cpu().flatten().tolist())
    return bytes(x)
