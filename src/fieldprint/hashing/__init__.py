"""BLAKE3 on the GPU (Triton) with the `blake3` package as reference.

    digest = blake3(data, key=None, backend="auto")        # data: [L] uint8 -> [32] uint8
    digests = blake3_many(rows, key=None, backend="auto")  # rows: [N, L] uint8 -> [N, 32] uint8

backend: "auto" (CUDA tensor -> Triton kernels, CPU tensor -> the blake3 package), "triton"
(always the project's kernels; a CPU tensor only under TRITON_INTERPRET=1), "reference" (the
blake3 package). All backends agree bit for bit with the blake3 package for every length and
in keyed mode (key: 32 bytes, as `bytes` or a [32] uint8 tensor).

Device path: one launch of `chunk_kernel` (one 1024-byte chunk per lane, all rows at once),
then `parent_kernel` (two tree levels per launch) while more than one node per row is left. Rows whose
length is not a multiple of 4 bytes are first copied into a zero-padded word buffer.
"""

import os

import blake3 as _b3
import torch
import triton

from . import _kernels as K

__all__ = ["blake3", "blake3_many"]

BACKENDS = ("auto", "triton", "reference")
CHUNK_BLOCK = 128  # chunks per program (one per lane, 4 warps)
PARENT_BLOCK = 128  # parent nodes per program


def _key_bytes(key) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, bytes | bytearray):
        kb = bytes(key)
    elif isinstance(key, torch.Tensor):
        if key.dtype != torch.uint8:
            raise TypeError(f"key must be a uint8 tensor or bytes, got dtype {key.dtype}")
        if key.dim() != 1:
            raise ValueError(f"key must be a 1-D tensor of 32 bytes, got shape {tuple(key.shape)}")
        kb = bytes(key.detach().cpu().tolist())
    else:
        raise TypeError(f"key must be None, bytes or a uint8 tensor, got {type(key).__name__}")
    if len(kb) != 32:
        raise ValueError(f"key must be exactly 32 bytes, got {len(kb)}")
    return kb


def _check_rows(rows, name: str, ndim: int) -> None:
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype torch.uint8, got {rows.dtype}")
    if rows.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(rows.shape)}")
    if not rows.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _resolve(backend: str, device: torch.device, name: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs {name} on a CUDA device, or TRITON_INTERPRET=1 set before "
            "triton is imported to run the kernels on the CPU; use backend='reference' otherwise")
    return backend


def _reference_many(rows: torch.Tensor, key: bytes | None) -> torch.Tensor:
    host = rows.detach().cpu().numpy()
    out = torch.empty((rows.shape[0], 32), dtype=torch.uint8)
    for i in range(rows.shape[0]):
        h = _b3.blake3(host[i].tobytes(), key=key) if key else _b3.blake3(host[i].tobytes())
        out[i] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    return out.to(rows.device)


def _words(rows: torch.Tensor) -> torch.Tensor:
    """[N, L] uint8 -> [N, ceil(L/4)] int32 little-endian words (a view when possible)."""
    n, length = rows.shape
    if length % 4 == 0 and length > 0 and rows.data_ptr() % 4 == 0:
        return rows.view(torch.int32)
    w = (length + 3) // 4
    buf = torch.zeros((n, max(w, 1) * 4), dtype=torch.uint8, device=rows.device)
    buf[:, :length] = rows
    return buf.view(torch.int32)


def _key_args(key: bytes | None) -> tuple[list[int], int]:
    words = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
             0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]
    if key is not None:
        words = [int.from_bytes(key[4 * i:4 * i + 4], "little") for i in range(8)]
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # kernels bitcast back
    return signed, (K.KEYED_HASH if key is not None else 0)


def _triton_many(rows: torch.Tensor, key: bytes | None) -> torch.Tensor:
    n, length = rows.shape
    if n == 0:
        return torch.empty((0, 32), dtype=torch.uint8, device=rows.device)
    words = _words(rows)
    w = (length + 3) // 4
    c = max(1, -(-length // K.CHUNK_LEN))
    kw, kf = _key_args(key)
    nodes = torch.empty((n * c, 8), dtype=torch.int32, device=rows.device)
    grid = (triton.cdiv(n * c, CHUNK_BLOCK),)
    n_blocks = min(16, max(1, -(-length // 64)))
    K.chunk_kernel[grid](words, nodes, n * c, c, length, w, n_blocks, *kw, kf,
                         BLOCK=CHUNK_BLOCK, ALIGNED=w % 16 == 0,
                         num_warps=CHUNK_BLOCK // 32)
    return reduce_parents(nodes, n, c, kw, kf)


def reduce_parents(nodes: torch.Tensor, n: int, chunks: int, kw, kf) -> torch.Tensor:
    """BLAKE3's tree above the chunks: nodes [n * chunks, 8] int32 chaining values (row-major
    per row) -> [n, 32] uint8 digests, two tree levels per launch. kw, kf: ``_key_args``."""
    m = chunks
    while m > 1:
        mo = (m + 3) // 4
        nxt = torch.empty((n * mo, 8), dtype=torch.int32, device=nodes.device)
        grid = (triton.cdiv(n * mo, PARENT_BLOCK),)
        K.parent_kernel[grid](nodes, nxt, n * mo, m, mo, *kw, kf,
                              BLOCK=PARENT_BLOCK, num_warps=PARENT_BLOCK // 32)
        nodes, m = nxt, mo
    return nodes.view(torch.uint8).view(n, 32)


def blake3_many(rows: torch.Tensor, key=None, backend: str = "auto") -> torch.Tensor:
    """BLAKE3 digests of N equal-length rows in one pass.

    rows: [N, L] uint8, contiguous (L may be 0). key: None, or 32 bytes (bytes or [32] uint8
    tensor) for keyed mode. Returns [N, 32] uint8 on the device of rows.
    """
    _check_rows(rows, "rows", 2)
    kb = _key_bytes(key)
    if _resolve(backend, rows.device, "rows") == "reference":
        return _reference_many(rows, kb)
    return _triton_many(rows, kb)


def blake3(data: torch.Tensor, key=None, backend: str = "auto") -> torch.Tensor:
    """BLAKE3 digest of one byte string. data: [L] uint8, contiguous. Returns [32] uint8."""
    _check_rows(data, "data", 1)
    kb = _key_bytes(key)
    rows = data.view(1, -1)
    if _resolve(backend, data.device, "data") == "reference":
        return _reference_many(rows, kb)[0]
    return _triton_many(rows, kb)[0]
