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

**Dropout (PEFT's two-term formula).** Y = X W^T + bias + (c - 1) D W^T + c s (S B^T + lora_bias), D = drop(X):
the S and dA passes regenerate the mask as for LoRA, and the two base products of each GEMM come from one pass
over the A and B tiles into two fp32 accumulators (the GEMM's DORA_DROPOUT; its docstring has the algebra):

    forward   acc = X W^T + L, dropped = keep*X W^T + (1-p) L    Y = acc + (c - 1) Z + bias, Z = dropped/(1-p) (+ s lb)
    dX        acc = dY W, dropped = ((c - 1) dY) W + dS A         dX = acc + drop'(dropped)

so no dropped copy of X, no M x N G or (G - dY), and W and the activations are read once per GEMM (PEFT: two
base GEMMs each way, plus dropout's M x K output). The MMA work is still doubled: the two products are
different. The forward masks each 16-bit A tile a pair of elements per 32-bit word (``_kept_tile``): compiled for
sm_90 at 128x128x64 / 8 warps its K step issues 314 instructions per thread around 8 HGMMA (element by element:
461), ~630 issue cycles per SM against ~1000 cycles of tensor-core work at the H200's bf16 peak: room for the
mask under the asynchronous MMAs, not yet measured on a GPU. Z is saved for the magnitude gradient (it cannot
be recovered from Y). Token counts below ``cublas_below_m`` run ``dora_torch`` (two cuBLAS GEMMs each way): the
kernel's main loop is what fuses the pair, and a handful of rows gains nothing from it.

**dX: the scale on the A operand, not a host-built G.** G = c * dY made on the host is one more M x N read and
write of dY's dtype (M = 8192, N = 4096, bf16: 128 MiB of traffic, ~7% of the dX GEMM's time on an H200 at
its roofline) plus an M x N temporary; scaling each loaded dY tile costs no bytes, only BLOCK_M x BLOCK_K fp32
multiplies per K step next to a BLOCK_M x BLOCK_N x BLOCK_K MMA.

**What is saved for the magnitude gradient** is ``dora_torch``'s choice (its module docstring): Y without a base
bias, Z (written by the forward GEMM's epilogue, STORE_Z) with one; the dY pass reduces sum_rows(dY * saved) and
``dora_torch.magnitude_grad_from_dots`` finishes dm (/ n or / m, the m_j = 0 columns recomputed).

**Routed to ``dora_torch``** (same math and dropout mask): dropout with M < ``cublas_below_m`` (above), and what
``lora_triton`` itself routes to torch (rank above ``MAX_RANK``, IEEE fp32 with TF32 off). The row norm is
``dora_torch.dora_row_norm`` (an N x r skinny product and an r x r Gram: no kernel of its own needed).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from . import dora_torch, lora_triton
from .dora_torch import column_scale, dora_row_norm, dropout_keep_mask, dropped_input
from .interface import DoraGrads, GradRequest, LoraOptions, weight_nk

__all__ = ["column_scale", "dora_backward", "dora_forward", "dora_row_norm", "dropout_keep_mask", "dropped_input"]


def _uses_torch_kernels(x: Tensor, options: LoraOptions, rank: int, cublas_below_m: int) -> bool:
    """Calls the Triton DoRA path does not take (module docstring)."""
    if x.shape[0] == 0 or lora_triton.uses_torch_backend(x, rank):
        return True
    return options.has_dropout and x.shape[0] < cublas_below_m


def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    magnitude: Tensor, norm: Tensor, *, options: LoraOptions, save_z: bool, cublas_below_m: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, S, Z)`` for 2-D ``x``: the S pass and one fused GEMM (Z only with ``save_z`` and a base bias or dropout).

    ``cublas_below_m``: as in ``lora_triton.lora_forward`` (token counts below it run the base GEMM on cuBLAS).
    """
    cublas_below_m = lora_triton.resolve_cublas_below_m(cublas_below_m)
    if _uses_torch_kernels(x, options, lora_a.shape[0], cublas_below_m):
        return dora_torch.dora_forward(x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm,
                                       options=options, save_z=save_z)
    w_nk = weight_nk(weight, options.weight_is_kn)
    n = w_nk.shape[0]
    dropout = lora_triton.KernelDropout.of(options)
    s = lora_triton.launch_x_pass(x, lora_a, dropout, for_da=False)
    # with dropout Z cannot be recovered from Y (which also holds X W^T): kept whenever dm is needed
    keep_z = save_z and (bias is not None or dropout.enabled)
    z = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype) if keep_z else None
    y = lora_triton.launch_gemm(
        a=x, b=w_nk, b_strides=(w_nk.stride(1), w_nk.stride(0)), out_features=n, bias=bias,
        lowrank_s=s, lowrank_l=lora_b, l_strides=(lora_b.stride(1), lora_b.stride(0)), lora_scale=options.scaling,
        lora_bias=lora_bias, dropout=dropout, cublas_below_m=cublas_below_m,
        cublas_base=lambda: F.linear(x, w_nk), col_scale=column_scale(magnitude, norm), z_out=z,
        dora_dropout=dropout.enabled,
    )
    return y, s, z


def dora_backward(
    dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor, z_saved: Tensor | None, *,
    options: LoraOptions, need: GradRequest, need_magnitude: bool, cublas_below_m: int | None = None,
) -> DoraGrads:
    """The gradients for 2-D ``dy``; None where not requested. ``s``: what ``dora_forward`` returned."""
    cublas_below_m = lora_triton.resolve_cublas_below_m(cublas_below_m)
    if _uses_torch_kernels(x, options, lora_a.shape[0], cublas_below_m):
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
    dropout = lora_triton.KernelDropout.of(options)
    d_magnitude = None
    if need_magnitude:
        d_magnitude = dora_torch.magnitude_grad_from_dots(
            sums.dots, sums.dy_colsum, from_z=z_saved is not None, dy=dy, x=x, weight_rows=w_nk, bias=bias,
            lora_b=lora_b, lora_bias=lora_bias, magnitude=magnitude, norm=norm, s=s.to(lora_a.dtype),
            scaling=options.scaling)
    dx = None
    if need.dx:  # dropout: dX = dY W + drop'((c - 1) dY W + dS A), both products from one pass (DORA_DROPOUT)
        dx = lora_triton.launch_gemm(
            a=dy, b=w_nk, b_strides=(w_nk.stride(0), w_nk.stride(1)), out_features=w_nk.shape[1], bias=None,
            lowrank_s=sums.ds, lowrank_l=lora_a, l_strides=(lora_a.stride(0), lora_a.stride(1)), lora_scale=1.0,
            lora_bias=None, dropout=dropout, cublas_below_m=cublas_below_m,
            cublas_base=lambda: (dy * scale.to(dy.dtype)) @ w_nk, a_scale=scale - 1.0 if dropout.enabled else scale,
            dora_dropout=dropout.enabled,
        )
    d_lora_a = d_lora_b = None
    if need.dlora:
        d_lora_a = lora_triton.launch_x_pass(x, sums.ds, dropout, for_da=True).to(lora_a.dtype)
        d_lora_b = sums.db.to(lora_b.dtype)
    return DoraGrads(
        dx=dx,
        d_lora_a=d_lora_a,
        d_lora_b=d_lora_b,
        d_bias=sums.dy_colsum.to(dy.dtype) if need.dbias else None,
        d_lora_bias=(sums.colsum * options.scaling).to(lora_b.dtype) if need.dlora_bias else None,
        d_magnitude=d_magnitude,
    )
