"""Page layouts of a KV pool: the order of one page's elements in memory. The one owner of the
layout names and ids: the paged cache allocates its pools by them, the attention kernel reads V
by the strides they give, and a commit leaf records the id in its header (``fieldprint.leaf``).

    name   id  page in memory            use
    "nhd"  0   [block_size, Hkv, D]      the default, and K always: a token's heads and D contiguous
    "hdn"  1   [Hkv, D, block_size]      V only, opt-in: a page's tokens contiguous

Either way a pool is handed out as the same logical view ``[..., num_blocks, block_size, Hkv, D]``
(indexing, the kernel's shape checks and the reference path do not change); only its strides
differ. Why ``"hdn"`` exists: in the product P @ V the tokens are the reduction axis, and with
``"nhd"`` an fp8 V tile has its bytes contiguous along D, the wrong axis for the tensor cores'
operand loads, so the kernel widens it to fp16 in registers first (docs/DESIGN.md, "fp8 KV").
"""

from __future__ import annotations

import torch

PAGE_LAYOUTS = {"nhd": 0, "hdn": 1}
"""Layout name -> id (the byte ``page_layout`` of a leaf header)."""


def check_layout(name: str, layout) -> str:
    """``layout`` if it names a page layout, else a ValueError naming the argument ``name``."""
    if not isinstance(layout, str) or layout not in PAGE_LAYOUTS:
        raise ValueError(f"{name} must be one of {list(PAGE_LAYOUTS)}, got {layout!r}")
    return layout


def empty_pool(shape: tuple[int, ...], layout: str, fill: float, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A pool filled with ``fill``, as the logical view ``shape = (..., N, S, Hkv, D)`` of storage
    in ``layout`` (``"hdn"``: ``(..., N, Hkv, D, S)`` underneath)."""
    check_layout("layout", layout)
    if layout == "nhd":
        return torch.full(shape, fill, dtype=dtype, device=device)
    *lead, n, s, h, d = shape
    return torch.full((*lead, n, h, d, s), fill, dtype=dtype, device=device).movedim(-1, -3)


def layout_of(pool: torch.Tensor) -> str | None:
    """The page layout of a logical view ``[..., N, S, Hkv, D]`` from its strides: ``"nhd"`` when
    D is contiguous, ``"hdn"`` when a page's tokens are (checked in that order), else None."""
    if pool.stride(-1) == 1:
        return "nhd"
    if pool.stride(-3) == 1:
        return "hdn"
    return None


def page_elements(pages: torch.Tensor, layout: str) -> torch.Tensor:
    """Logical pages ``[P, S, Hkv, D]`` -> ``[P, S * Hkv * D]``, each row the page's elements in
    the order ``layout`` stores them (what a leaf of that layout commits to)."""
    check_layout("layout", layout)
    if layout == "hdn":
        pages = pages.movedim(-3, -1)  # [P, Hkv, D, S]
    return pages.reshape(pages.shape[0], -1)
