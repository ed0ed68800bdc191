"""From cache pages to page leaves: what a commit hashes (`fieldprint.commit`).

One leaf per page, layer and K/V half, in leaf order (page, then layer, then K before V), in the
layout of `fieldprint.leaf` (version 1). Each half of a page is quantized on its own with its own
power-of-two scale (`fieldprint.leaf.page_scales`); the padding slots of an anchor's last page
are zeroed first. The page id (`page_id`) names the logical page (anchor or context, owner, page
index, valid tokens), so two caches with the same contents commit to the same leaves whatever
physical pool pages they use. A leaf's codes run in the storage order of its pool's page layout
(`half_layouts`: K "nhd", V the cache's ``v_layout``), which its header names: the same K/V
values give the same K leaves in either layout, and V leaves that differ by that header byte and
the order of their codes.

    refs = leaf_refs(pages, num_layers)                         # what each leaf commits to (lazy)
    header = leaf_headers(cache, spec, pages)                   # [N, 64] uint8 (host)
    rows, finite = page_leaf_rows(cache, spec, header, blocks, tokens, backend)   # on the device
    blocks = live_blocks(cache, pages)                          # where each page lives now
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fieldprint.cache import PagedKVCache, PageRef
from fieldprint.formats import get_format, pow2
from fieldprint.leaf import HEADER_BYTES, LeafSpec, header_rows, leaf_bytes, page_scales
from fieldprint.page_layout import page_elements
from fieldprint.quant import code_bytes, quantize
from fieldprint.quant_kernels import launch_quantize

__all__ = [
    "PAGE_KINDS",
    "LeafRef",
    "LeafRefs",
    "check_pages",
    "gather_pages",
    "half_layouts",
    "leaf_headers",
    "leaf_refs",
    "live_blocks",
    "page_id",
    "page_leaf_rows",
    "quantize_pages",
]

PAGE_KINDS = ("context", "anchor")
KV = ("k", "v")
# bit fields of a page id: anchor flag << 62 | owner << 40 | page index << 16 | valid tokens
_OWNER_BITS, _INDEX_BITS, _TOKEN_BITS = 22, 24, 16


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
    if not (0 <= page.owner < 2**_OWNER_BITS and 0 <= page.index < 2**_INDEX_BITS
            and 0 <= page.tokens < 2**_TOKEN_BITS):
        raise ValueError(f"page {page} does not fit the 64-bit page id of the leaf header "
                         f"(owner < 2**{_OWNER_BITS}, index < 2**{_INDEX_BITS}, tokens < 2**{_TOKEN_BITS})")
    return ((page.kind == "anchor") << 62 | page.owner << (_INDEX_BITS + _TOKEN_BITS)
            | page.index << _TOKEN_BITS | page.tokens)


def check_pages(pages: list[PageRef], cache: PagedKVCache) -> None:
    """Raise a ValueError naming the first page that no leaf can be made of: an unknown kind, a
    pool page outside the cache, a token count outside [1, block_size], or ids that overflow
    the leaf header's page id (`page_id`)."""
    for p in pages:
        if p.kind not in PAGE_KINDS:
            raise ValueError(f"page {p}: kind must be one of {PAGE_KINDS}")
        if not (isinstance(p.block, int) and 0 <= p.block < cache.num_blocks):
            raise ValueError(f"page {p}: block outside the pool [0, {cache.num_blocks})")
        if not (isinstance(p.tokens, int) and 1 <= p.tokens <= cache.block_size):
            raise ValueError(f"page {p}: tokens must be in [1, block_size={cache.block_size}]")
        page_id(p)


class LeafRefs(Sequence):
    """The leaves of ``pages`` in leaf order, each `LeafRef` made when it is read: a commit keeps
    its P page refs rather than P * 2 * num_layers leaf objects (building those was most of a
    commit's host time: about 7 ms for 256 pages of 8 layers). Indexing as a list's (negative
    indices, slices giving lists); ``extend`` and ``truncate`` work in whole pages."""

    def __init__(self, pages: Sequence[PageRef], num_layers: int) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.pages, self.num_layers = list(pages), num_layers

    @property
    def per_page(self) -> int:
        """Leaves per page."""
        return len(KV) * self.num_layers

    def __len__(self) -> int:
        return len(self.pages) * self.per_page

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"leaf index {i} out of range for {n} leaves")
        page, rest = divmod(i % n, self.per_page)
        layer, kind = divmod(rest, len(KV))
        return LeafRef(self.pages[page], layer, KV[kind])

    def __eq__(self, other) -> bool:
        if isinstance(other, LeafRefs):
            return self.num_layers == other.num_layers and self.pages == other.pages
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    __hash__ = None  # mutable, like a list

    def extend(self, other: LeafRefs) -> None:
        """Append the leaves of ``other`` (the same number of layers)."""
        if not isinstance(other, LeafRefs) or other.num_layers != self.num_layers:
            raise ValueError(f"other must be LeafRefs of {self.num_layers} layers")
        self.pages += other.pages

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` leaves (a multiple of the leaves per page)."""
        if n % self.per_page or not 0 <= n <= len(self):
            raise ValueError(f"n must be a multiple of {self.per_page} in [0, {len(self)}], got {n}")
        del self.pages[n // self.per_page:]


def leaf_refs(pages: list[PageRef], num_layers: int) -> LeafRefs:
    """The leaves of ``pages``, in leaf order."""
    return LeafRefs(pages, num_layers)


def half_layouts(cache: PagedKVCache) -> dict[str, str]:
    """The page layout (`fieldprint.page_layout`) of each half's pool, in leaf order: K "nhd"
    (the cache stores K no other way), V the cache's ``v_layout``."""
    return {"k": "nhd", "v": cache.v_layout}


def leaf_headers(cache: PagedKVCache, spec: LeafSpec, pages: list[PageRef]) -> torch.Tensor:
    """[P * L * 2, 64] uint8 host headers of the leaves of ``pages`` of ``cache`` (L layers), in
    leaf order: ``spec`` with the page layout of each half's pool (`half_layouts`)."""
    ids = [page_id(p) for p in pages for _ in range(cache.num_layers)]
    layers = list(range(cache.num_layers)) * len(pages)
    layouts = half_layouts(cache)
    halves = [header_rows(replace(spec, page_layout=layouts[kind]), ids, layers, [kind] * len(ids)) for kind in KV]
    return torch.stack(halves, dim=1).reshape(-1, HEADER_BYTES)  # [P * L, 2, 64]: K before V


def quantize_pages(x: torch.Tensor, fmt: str, rounding: str, backend: str = "auto"):
    """Quantize pages ``x [P, ...]`` independently, each with its own power-of-two scale
    (`fieldprint.leaf.page_scales`), without a host sync.

    Returns ``codes [P, C]`` uint8 (`fieldprint.quant.code_bytes`), ``helper [P, H]`` uint8 (H = 0
    unless two_grid), ``scale [P, 1]`` float32 and ``finite [P]`` bool (the page holds no
    NaN/Inf; its codes are then meaningless), all on x's device. backend: ``"auto"`` (CUDA ->
    Triton, CPU -> torch), ``"torch"``, ``"triton"`` (a CPU tensor only under TRITON_INTERPRET=1).
    The Triton path launches the quantization kernel of ``fieldprint.quant_kernels`` directly:
    ``quantize`` reads its finite flag and validates a given scale on the host, and either would
    stall the decode stream behind an async commit. Both paths produce the codes of
    ``quantize(page, fmt, rounding, scale=2**k)``.
    """
    P = x.shape[0]
    flat = x.reshape(P, -1)
    if flat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        flat = flat.float()
    k, finite = page_scales(flat, fmt)
    f = get_format(fmt)
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        n = flat.numel()
        codes = torch.empty(n, dtype=f.code_dtype, device=x.device)
        helper = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device) if rounding == "two_grid" else None
        launch_quantize(flat.contiguous().reshape(-1), k, fmt, rounding, 0, 0, None, codes, helper)
    else:
        # the torch path refuses NaN/Inf at once: quantize finite stand-ins, `finite` says which
        ok = finite.reshape(P, *([1] * (flat.dim() - 1)))
        qt = quantize(torch.where(ok, flat, 0), fmt, rounding, scale=pow2(k).reshape(P, 1) if f.scaled else None,
                      backend="torch")
        codes, helper = qt.codes, qt.helper
    helper = (helper.reshape(P, -1) if helper is not None
              else torch.zeros((P, 0), dtype=torch.uint8, device=x.device))
    return code_bytes(codes.reshape(P, -1)), helper, pow2(k).reshape(P, 1), finite


def gather_pages(cache: PagedKVCache, blocks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A copy of the pool pages ``blocks [P]`` (int64, ``tokens [P]`` valid tokens each, the
    slots after them zeroed) as ``[P * L * 2, S * Hkv * D]``, one row per leaf in leaf order,
    each row the page's elements in the storage order of its pool's layout (`half_layouts`)."""
    c = cache
    P, L = blocks.shape[0], c.num_layers
    valid = torch.arange(c.block_size, device=blocks.device)[None, :] < tokens[:, None]  # [P, S]
    layouts, halves = half_layouts(c), []
    for pool, kind in zip((c.k, c.v), KV, strict=True):
        x = pool[:, blocks].masked_fill(~valid[None, :, :, None, None], 0)  # [L, P, S, Hkv, D]
        halves.append(page_elements(x.flatten(0, 1), layouts[kind]).reshape(L, P, -1))
    # [L, P, 2, E] -> [P, L, 2, E], the order of the leaves
    return torch.stack(halves, dim=2).transpose(0, 1).reshape(P * L * 2, -1)


def live_blocks(cache: PagedKVCache, pages: list[PageRef]) -> list[int | None]:
    """The pool page that holds each logical page now, looked up through the cache's current
    block tables (what the attention kernel reads), or None where the cache no longer holds
    it (sequence freed, truncated before it, or anchor gone)."""
    out = []
    for p in pages:
        if p.kind == "anchor":
            owner = cache.anchors.get(p.owner)
            length = None if owner is None else owner.length
        else:
            owner = cache.sequences.get(p.owner)
            length = None if owner is None else owner.length
        ok = owner is not None and p.index < len(owner.blocks) and p.index * cache.block_size + p.tokens <= length
        out.append(owner.blocks[p.index] if ok else None)
    return out


def page_leaf_rows(cache: PagedKVCache, spec: LeafSpec, header: torch.Tensor, blocks: torch.Tensor,
                   tokens: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf rows ``[P * L * 2, spec.length]`` uint8 of the pool pages ``blocks [P]`` (int64, with
    ``tokens [P]`` valid tokens each), read from the live cache, in leaf order, and ``finite
    [P * L * 2]`` bool (see `quantize_pages`); header: their `leaf_headers`. All on the cache's
    device. Byte for byte `fieldprint.merkle.page_leaf_bytes` of each half-page on its own, in
    its pool's page layout (`half_layouts`)."""
    x = gather_pages(cache, blocks, tokens)
    codes, helper, scale, finite = quantize_pages(x, spec.fmt, spec.rounding, backend)
    return leaf_bytes(spec, header, codes, scale, helper), finite
