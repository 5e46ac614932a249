"""Fused Triton DoRA kernels (math: the DoRA part of ``coto_kernels.kernels.interface``; contract ``DoraBackend``).

The kernels are ``lora_triton``'s, with constexpr flags (no DoRA copies); c = m / n is the fp32 [N] column scale::

    forward   S = X A^T                      _lora_x_pass_kernel (unchanged)
              Y = bias + c * Z,  Z = X W^T + s (S B^T + lora_bias)
                                             _fused_gemm_kernel, HAS_COL_SCALE (+ STORE_Z): the scale and the bias
                                             in the epilogue, Z written only when the magnitude gradient needs it
    backward  dS, dB, colsum(G), colsum(dY), sum_rows(dY * Y or Z)
                                             _lora_ds_db_kernel, HAS_COL_SCALE + COMPUTE_DY_COLSUM + COMPUTE_DM:
                                             one read of dY (and of the saved Y or Z) for all five
              dX = G W + dS A                _fused_gemm_kernel, A_COL_SCALE: each dY tile is scaled by c along
                                             the GEMM's K as it is loaded
              dA = dS^T X                    _lora_x_pass_kernel, FOR_DA (unchanged)

**dX: the scale on the A operand, not a host-built G.** G = c * dY made on the host is one more M x N read and
write of dY's dtype (M = 8192, N = 4096, bf16: 128 MiB of traffic, ~7% of the dX GEMM's time on an H200 at
its roofline) plus an M x N temporary; scaling each loaded dY tile costs no bytes, only BLOCK_M x BLOCK_K fp32
multiplies per K step next to a BLOCK_M x BLOCK_N x BLOCK_K MMA.

**What is saved for the magnitude gradient** is ``dora_torch``'s choice (its module docstring): Y without a base
bias, Z (written by the forward GEMM's epilogue, STORE_Z) with one; the dY pass reduces sum_rows(dY * saved) and
``dora_torch.magnitude_grad_from_dots`` finishes dm (/ n or / m, the m_j = 0 columns recomputed).

**Routed to ``dora_torch``** (same math and dropout mask): dropout > 0 (the two-accumulator kernels of issue 13
are not written yet; one warning), and what ``lora_triton`` itself routes to torch (rank above ``MAX_RANK``,
IEEE fp32 with TF32 off). The row norm is ``dora_torch.dora_row_norm`` (an N x r skinny product and an r x r
Gram: no kernel of its own needed).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor
from torch.nn import functional as F

from . import dora_torch, lora_triton
from .dora_torch import column_scale, dora_row_norm, dropout_keep_mask, dropped_input
from .interface import DoraGrads, GradRequest, LoraOptions, weight_nk

__all__ = ["column_scale", "dora_backward", "dora_forward", "dora_row_norm", "dropout_keep_mask", "dropped_input"]


@functools.cache
def _warn_dropout_fallback_once() -> None:
    warnings.warn("coto_kernels: the Triton DoRA kernels do not take dropout > 0 yet; DoRA layers with dropout run "
                  "the torch DoRA kernels (same math and dropout mask)", stacklevel=4)


def _uses_torch_kernels(x: Tensor, options: LoraOptions, rank: int) -> bool:
    """Calls the Triton DoRA path does not take (module docstring); warns once for dropout."""
    if options.has_dropout:
        _warn_dropout_fallback_once()
        return True
    return x.shape[0] == 0 or lora_triton.uses_torch_backend(x, rank)


def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    magnitude: Tensor, norm: Tensor, *, options: LoraOptions, save_z: bool, cublas_below_m: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, S, Z)`` for 2-D ``x``: the S pass and one fused GEMM (Z only with ``save_z`` and a base bias).

    ``cublas_below_m``: as in ``lora_triton.lora_forward`` (token counts below it run the base GEMM on cuBLAS).
    """
    if _uses_torch_kernels(x, options, lora_a.shape[0]):
        return dora_torch.dora_forward(x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm,
                                       options=options, save_z=save_z)
    w_nk = weight_nk(weight, options.weight_is_kn)
    n = w_nk.shape[0]
    s = lora_triton.launch_x_pass(x, lora_a, lora_triton.NO_DROPOUT, for_da=False)
    z = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype) if save_z and bias is not None else None
    y = lora_triton.launch_gemm(
        a=x, b=w_nk, b_strides=(w_nk.stride(1), w_nk.stride(0)), out_features=n, bias=bias,
        lowrank_s=s, lowrank_l=lora_b, l_strides=(lora_b.stride(1), lora_b.stride(0)), lora_scale=options.scaling,
        lora_bias=lora_bias, dropout=lora_triton.NO_DROPOUT,
        cublas_below_m=lora_triton.resolve_cublas_below_m(cublas_below_m),
        cublas_base=lambda: F.linear(x, w_nk), col_scale=column_scale(magnitude, norm), z_out=z,
    )
    return y, s, z


def dora_backward(
    dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor, z_saved: Tensor | None, *,
    options: LoraOptions, need: GradRequest, need_magnitude: bool, cublas_below_m: int | None = None,
) -> DoraGrads:
    """The gradients for 2-D ``dy``; None where not requested. ``s``: what ``dora_forward`` returned."""
    if _uses_torch_kernels(x, options, lora_a.shape[0]):
        return dora_torch.dora_backward(
            dy, x, y, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm, s.to(lora_a.dtype), z_saved,
            options=options, need=need, need_magnitude=need_magnitude)
    saved = z_saved if z_saved is not None else y
    if need_magnitude and saved is None:
        raise RuntimeError("DoRA backward: the magnitude gradient needs the saved output y or the saved Z")
    w_nk = weight_nk(weight, options.weight_is_kn)
    scale = column_scale(magnitude, norm)
    from_y_with_bias = need_magnitude and z_saved is None and bias is not None
    sums = lora_triton.launch_dy_reductions(
        dy, lora_b, s, options.scaling, need, x.dtype, col_scale=scale,
        need_dy_colsum=need.dbias or from_y_with_bias, saved=saved if need_magnitude else None)
    d_magnitude = None
    if need_magnitude:
        d_magnitude = dora_torch.magnitude_grad_from_dots(
            sums.dots, sums.dy_colsum, from_z=z_saved is not None, dy=dy, x=x, weight_rows=w_nk, bias=bias,
            lora_b=lora_b, lora_bias=lora_bias, magnitude=magnitude, norm=norm, s=s.to(lora_a.dtype),
            scaling=options.scaling)
    dx = None
    if need.dx:
        dx = lora_triton.launch_gemm(
            a=dy, b=w_nk, b_strides=(w_nk.stride(0), w_nk.stride(1)), out_features=w_nk.shape[1], bias=None,
            lowrank_s=sums.ds, lowrank_l=lora_a, l_strides=(lora_a.stride(0), lora_a.stride(1)), lora_scale=1.0,
            lora_bias=None, dropout=lora_triton.NO_DROPOUT,
            cublas_below_m=lora_triton.resolve_cublas_below_m(cublas_below_m),
            cublas_base=lambda: (dy * scale.to(dy.dtype)) @ w_nk, a_scale=scale,
        )
    d_lora_a = d_lora_b = None
    if need.dlora:
        d_lora_a = lora_triton.launch_x_pass(x, sums.ds, lora_triton.NO_DROPOUT, for_da=True).to(lora_a.dtype)
        d_lora_b = sums.db.to(lora_b.dtype)
    return DoraGrads(
        dx=dx,
        d_lora_a=d_lora_a,
        d_lora_b=d_lora_b,
        d_bias=sums.dy_colsum.to(dy.dtype) if need.dbias else None,
        d_lora_bias=(sums.colsum * options.scaling).to(lora_b.dtype) if need.dlora_bias else None,
        d_magnitude=d_magnitude,
    )
