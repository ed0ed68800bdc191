"""Page leaves, layout version 1: the bytes that one Merkle leaf commits to for one quantized KV
page, and the scale of a page. The one owner of this layout: `fieldprint.merkle` (leaves of a
`QTensor`), `fieldprint.commit` (leaves of cache pages) and the fused Triton kernel
(`fieldprint.hashing.fused`, which takes its header words from here) all build leaves with it.

    spec = LeafSpec(fmt="e4m3", rounding="two_grid", elems=E)       # E elements per page ("nhd")
    v_spec = dataclasses.replace(spec, page_layout="hdn")           # codes of pages stored [Hkv, D, S]
    spec.fields()        # [("header", 64), ("codes", E), ("scale", 4), ("helper", E // 8), ("padding", ...)]
    header = header_rows(spec, page_ids, layers, kinds)              # [N, 64] uint8, host
    rows = leaf_bytes(spec, header, codes, scales, helper)           # [N, spec.length] uint8
    k, finite = page_scales(pages, "e4m3")                           # [P] int32, [P] bool

Layout (all integers little-endian; the header is the struct `HEADER`, fields `HEADER_FIELDS`):

    offset size  field
    0      4     magic b"FPKV"
    4      2     layout version = 1 (u16)
    6      2     header bytes = 64 (u16)
    8      8     page id (u64)
    16     4     layer (u32)
    20     1     kind: 0 = K, 1 = V
    21     1     format: fieldprint.formats.FORMAT_IDS (1 e4m3, 2 e5m2, 3 int8, 4 bf16, 5 fp16)
    22     1     rounding: fieldprint.formats.ROUNDING_IDS (rne 0, trunc 1, stochastic 2, two_grid 3)
    23     1     code width in bytes (1 or 2)
    24     4     element count E of the page (u32)
    28     4     code bytes = E * width (u32)
    32     4     scale count S (u32): 1 for a per-page scale, else the page's rows
    36     4     helper bytes (u32): E / 8 for two_grid, else 0
    40     8     rounding seed (u64), 0 when none
    48     1     1 if a seed is present, else 0
    49     1     page layout: its id in fieldprint.page_layout.PAGE_LAYOUTS
    50     14    zero
    64     E*w   codes: the page's elements in the storage order its page layout names (nhd:
                 row-major [block_size, Hkv, D]; hdn: [Hkv, D, block_size];
                 `fieldprint.page_layout.page_elements`), as `fieldprint.quant.code_bytes` (16-bit
                 codes as two little-endian bytes)
    ...    4*S   scales as IEEE-754 binary32, little-endian
    ...    H     helper bits (bit i of byte j = element 8j + i of the page, in the codes' order)
    ...          zero padding to a multiple of 64 bytes (whole BLAKE3 blocks)

Every byte that decides the dequantized values is in the leaf, so a flipped bit anywhere in the
page, its scale or its helper changes the leaf digest.

The page layout byte came after version 1's first leaves: byte 49 was zero before it existed and
the id of "nhd" (the order every leaf had) is 0, so those leaves are byte-identical with it and
the version stays 1.

Page scale: a page of fp8/int8 codes is quantized with one power-of-two scale, the rule of
`fieldprint.formats.scale_exponent` applied to the page's largest magnitude (`page_scales`);
bf16/fp16 pages carry the scale 1.
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass

import torch

from fieldprint.formats import FORMAT_IDS, ROUNDING_IDS, get_format, scale_exponent
from fieldprint.page_layout import PAGE_LAYOUTS, check_layout

__all__ = [
    "HEADER",
    "HEADER_BYTES",
    "HEADER_FIELDS",
    "KIND_IDS",
    "LAYOUT_VERSION",
    "MAGIC",
    "LeafSpec",
    "check_page_ids",
    "header_offset",
    "header_rows",
    "leaf_bytes",
    "page_scales",
]

MAGIC = b"FPKV"
LAYOUT_VERSION = 1
HEADER_BYTES = 64
KIND_IDS = {"k": 0, "v": 1}

# (field, struct code) in header order: the one definition of the header
HEADER_FIELDS = (
    ("magic", "4s"), ("version", "H"), ("header_bytes", "H"), ("page_id", "Q"), ("layer", "I"),
    ("kind", "B"), ("format", "B"), ("rounding", "B"), ("width", "B"), ("elems", "I"),
    ("code_bytes", "I"), ("scales", "I"), ("helper_bytes", "I"), ("seed", "Q"), ("has_seed", "B"),
    ("page_layout", "B"), ("zero", "14x"),
)
HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_FIELDS))
assert HEADER.size == HEADER_BYTES


def header_offset(name: str) -> tuple[int, int]:
    """(byte offset, size) of header field ``name`` (one of `HEADER_FIELDS`)."""
    codes = [code for _, code in HEADER_FIELDS]
    names = [n for n, _ in HEADER_FIELDS]
    if name not in names:
        raise ValueError(f"name must be one of {names}, got {name!r}")
    i = names.index(name)
    start = struct.calcsize("<" + "".join(codes[:i]))
    return start, struct.calcsize("<" + codes[i])


def _check_int(name: str, value, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < upper:
        raise ValueError(f"{name} must be an int in [0, {upper}), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class LeafSpec:
    """What the leaves of one batch of pages share: format, rounding, elements per page, scales
    per page, stochastic seed, and the page layout (`fieldprint.page_layout`) whose storage order
    their codes follow. Validated on construction."""

    fmt: str
    rounding: str
    elems: int
    scales: int = 1
    seed: int | None = None
    page_layout: str = "nhd"

    def __post_init__(self) -> None:
        get_format(self.fmt)
        if self.rounding not in ROUNDING_IDS:
            raise ValueError(f"rounding must be one of {list(ROUNDING_IDS)}, got {self.rounding!r}")
        _check_int("elems", self.elems, 2**32 // get_format(self.fmt).width)
        if self.elems == 0:
            raise ValueError("elems must be positive: a page holds at least one element")
        _check_int("scales", self.scales, 2**30)
        if self.scales == 0 or self.elems % self.scales:
            raise ValueError(f"scales must divide the page's {self.elems} elements, got {self.scales}")
        if self.rounding == "two_grid" and self.elems % 8:
            raise ValueError(f"two_grid pages need a multiple of 8 elements per page, got {self.elems}")
        if self.seed is not None:
            _check_int("seed", self.seed, 2**64)
        check_layout("page_layout", self.page_layout)

    @property
    def width(self) -> int:
        return get_format(self.fmt).width

    @property
    def helper_bytes(self) -> int:
        return self.elems // 8 if self.rounding == "two_grid" else 0

    def fields(self) -> list[tuple[str, int]]:
        """The field table of one leaf: (name, bytes) in order, padding last."""
        body = [("header", HEADER_BYTES), ("codes", self.elems * self.width), ("scale", 4 * self.scales),
                ("helper", self.helper_bytes)]
        return body + [("padding", -sum(size for _, size in body) % 64)]

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Field name -> (byte offset, bytes) inside the leaf."""
        out, at = {}, 0
        for name, size in self.fields():
            out[name] = (at, size)
            at += size
        return out

    @property
    def length(self) -> int:
        """Bytes per leaf (a multiple of 64)."""
        return sum(size for _, size in self.fields())

    def header(self, page_id: int, layer: int, kind: str) -> bytes:
        """The 64 header bytes of the leaf of page ``page_id`` (u64) in ``layer`` (u32), ``kind``
        "k" or "v" (its page layout: the spec's)."""
        if kind not in KIND_IDS:
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        return HEADER.pack(
            MAGIC, LAYOUT_VERSION, HEADER_BYTES, _check_int("page_id", page_id, 2**64),
            _check_int("layer", layer, 2**32), KIND_IDS[kind], FORMAT_IDS[self.fmt], ROUNDING_IDS[self.rounding],
            self.width, self.elems, self.elems * self.width, self.scales, self.helper_bytes,
            0 if self.seed is None else self.seed, self.seed is not None, PAGE_LAYOUTS[self.page_layout])


def check_page_ids(page_ids, n: int) -> list[int]:
    """``page_ids``: n page ids in [0, 2**63), as an integer tensor or a sequence of ints (a float
    is refused, never truncated) -> list of ints."""
    if isinstance(page_ids, torch.Tensor):
        if page_ids.dtype.is_floating_point or page_ids.dtype.is_complex or page_ids.dtype == torch.bool:
            raise TypeError(f"page_ids must be an integer tensor or a sequence of ints, got dtype {page_ids.dtype}")
        ids = page_ids.reshape(-1).tolist()
    else:
        try:
            ids = list(page_ids)
        except TypeError:
            raise TypeError(f"page_ids must be a sequence of ints, got {type(page_ids).__name__}") from None
        bad = [p for p in ids if isinstance(p, bool) or not isinstance(p, numbers.Integral)]
        if bad:
            raise TypeError(f"page_ids must hold ints, got {bad[0]!r} ({type(bad[0]).__name__})")
        ids = [int(p) for p in ids]
    if len(ids) != n:
        raise ValueError(f"page_ids must have {n} entries (one per page), got {len(ids)}")
    if any(not 0 <= p < 2**63 for p in ids):
        raise ValueError("page_ids must be non-negative and below 2**63")
    return ids


def header_rows(spec: LeafSpec, page_ids: list[int], layers: list[int], kinds: list[str]) -> torch.Tensor:
    """[N, 64] uint8 (host) headers of N leaves: row i for page ``page_ids[i]`` in ``layers[i]``,
    kind ``kinds[i]`` (three sequences of N entries)."""
    if not len(page_ids) == len(layers) == len(kinds):
        raise ValueError(f"page_ids, layers and kinds must have one entry per leaf, got "
                         f"{len(page_ids)}, {len(layers)} and {len(kinds)}")
    out = bytearray()
    for p, layer, kind in zip(page_ids, layers, kinds, strict=True):
        out += spec.header(p, layer, kind)
    return torch.frombuffer(out, dtype=torch.uint8).reshape(-1, HEADER_BYTES) if out else \
        torch.zeros((0, HEADER_BYTES), dtype=torch.uint8)


def _float32_le_bytes(x: torch.Tensor) -> torch.Tensor:
    """[N, S] float32 -> [N, 4 * S] uint8, each value's IEEE bits little-endian (on every host)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(bits >> s) & 0xFF for s in (0, 8, 16, 24)], dim=2).reshape(x.shape[0], -1).to(torch.uint8)


def leaf_bytes(spec: LeafSpec, header: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
               helper: torch.Tensor | None) -> torch.Tensor:
    """Leaf rows ``[N, spec.length]`` uint8 of N pages, on the codes' device.

    header: [N, 64] uint8 (`header_rows`); codes: [N, code bytes] uint8 (`fieldprint.quant.code_bytes`
    of the page's codes); scales: [N, spec.scales] float32; helper: [N, spec.helper_bytes] uint8,
    or None when the rounding has none. All on one device.
    """
    n = header.shape[0]
    want = {"header": (header, HEADER_BYTES), "codes": (codes, spec.elems * spec.width),
            "scales": (scales, spec.scales)}
    if spec.helper_bytes:
        if helper is None:
            raise ValueError("helper is required for two_grid leaves")
        want["helper"] = (helper, spec.helper_bytes)
    for name, (t, cols) in want.items():
        if t.dim() != 2 or tuple(t.shape) != (n, cols):
            raise ValueError(f"{name} must have shape [{n}, {cols}], got {tuple(t.shape)}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    parts = [header, codes, _float32_le_bytes(scales)]
    if spec.helper_bytes:
        parts.append(helper)
    pad = dict(spec.fields())["padding"]
    if pad:
        parts.append(torch.zeros((n, pad), dtype=torch.uint8, device=codes.device))
    return torch.cat(parts, dim=1)


def page_scales(pages: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """pages [P, ...] (float) -> (k [P] int32, finite [P] bool), on pages' device, no host sync.

    k: each page's scale exponent, `fieldprint.formats.scale_exponent` of its largest magnitude
    (the page's scale is ``2**k``; 0 for bf16/fp16); finite: the page holds no NaN/Inf.
    """
    amax = torch.linalg.vector_norm(pages.reshape(pages.shape[0], -1), ord=math.inf, dim=1)  # one read, no temporary
    return scale_exponent(amax, fmt), torch.isfinite(amax)
