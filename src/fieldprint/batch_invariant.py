"""Batch-invariant linear layers and RMSNorm: Triton kernels whose reduction order is fixed.

A library GEMM picks its kernel (tile shape, split-K) from the problem size, so the bits of one
token's projection can change with the number of tokens in the batch; a reduction kernel picks its
strategy from the tensor shape, with the same effect for RMSNorm. The model's K/V pages then depend
on what else was in the batch, and so do their digests. These kernels fix every choice that shapes
a row's arithmetic:

* :func:`linear` ``x [M, K] @ weight[N, K]^T``: one program per ``[BLOCK_M, BLOCK_N]`` output tile,
  the K axis walked in ``BLOCK_K`` steps in order, fp32 accumulation, no split-K. The tile sizes are
  constants, never derived from M, so an output element's sum is the same sequence of
  ``tl.dot`` steps whatever the batch (the same argument as the attention kernel's fixed split
  length; docs/DESIGN.md, "Batch invariance").
* :func:`rms_norm`: the sum of squares of a row in one program, the whole row in one block.

They run on CUDA tensors (``tl.dot`` on the tensor cores: each output element of a tile is
accumulated the same way whatever its row), or on CPU tensors under ``TRITON_INTERPRET=1`` (tests;
the dot is then a broadcast product summed over k, see the kernel). Models switch to them with
:meth:`fieldprint.model.Transformer.set_batch_invariant`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed tiles: the same on every call (see the module doc).
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    out_ptr,  # [M, N]
    M, N, K: tl.constexpr,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    TENSOR_CORES: tl.constexpr,
):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
        if not TENSOR_CORES:
            # the interpreter's tl.dot is a BLAS call whose per-element order depends on the
            # row's place in the tile; a broadcast product summed over k has one order for all
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:  # float32 operands: exact fp32 products, not TF32
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _rms_kernel(
    x_ptr,  # [M, D]
    rms_ptr,  # [M] float32
    D, stride_xm, eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(rms_ptr + row, 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps))


def _check(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be a tensor of one of {_DTYPES}, got {getattr(x, 'dtype', type(x))}")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with a fixed reduction order (see the module doc).

    Arguments:
        x: [..., K] float32 / float16 / bfloat16
        weight: [N, K], x's dtype
    Returns [..., N] in x's dtype.
    """
    _check(x, "x")
    _check(weight, "weight")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] of x's dtype {x.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    # The interpreter rounds float32 -> bfloat16 toward zero; the GPU rounds to nearest even. On a
    # CPU the kernel stores float32 and torch rounds, so both round the same way.
    out = torch.empty((M, N), dtype=x.dtype if x.is_cuda else torch.float32, device=x.device)
    if M:
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        _linear_kernel[grid](
            x_ptr=x2, w_ptr=weight, out_ptr=out, M=M, N=N, K=K,
            stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_wn=weight.stride(0),
            stride_wk=weight.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=x.dtype == torch.float32,
            TENSOR_CORES=x.is_cuda,
        )
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of every row; the row's sum of squares in one program per row (see the module doc),
    the rest elementwise (normalized in float32, rounded to x's dtype, scaled in x's dtype, as
    :class:`fieldprint.model.RMSNorm` does).

    Arguments:
        x: [..., D] float32 / float16 / bfloat16
        weight: [D]
    Returns [..., D] in x's dtype.
    """
    _check(x, "x")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape [{x.shape[-1]}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    rms = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _rms_kernel[(x2.shape[0],)](x_ptr=x2, rms_ptr=rms, D=x2.shape[1], stride_xm=x2.stride(0), eps=float(eps),
                                    BLOCK_D=triton.next_power_of_2(x2.shape[1]))
    out = (x2.float() * rms[:, None]).to(x.dtype) * weight.to(x.dtype)
    return out.reshape(x.shape)
