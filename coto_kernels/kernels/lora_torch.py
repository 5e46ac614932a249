"""Pure-PyTorch backend of the gated LoRA linear layer (math: ``coto_kernels.kernels.interface``).

The low-rank term is added in place into the base GEMM's output (``addmm_``), so no M x N LoRA intermediate is
created; the same holds for the ``dS A`` term of dX. The dropout mask (``dropout_mask``) is regenerated once
per forward and once per backward; the 1/(1-p) factor goes onto M x r operands, never onto an M x K tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .dropout_mask import dropout_keep_mask
from .interface import GradRequest, LoraGrads, LoraOptions, gated_off_runs_frozen_base, weight_nk

__all__ = ["dropout_keep_mask", "lora_backward", "lora_forward"]


def _masked(x: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    """keep * X in ``dtype``, *without* the 1/(1-p) factor, which callers fold into an M x r operand."""
    x = x.to(dtype)
    return x if keep is None else x * keep


def _keep(x: Tensor, options: LoraOptions) -> Tensor | None:
    return dropout_keep_mask(options.seed, tuple(x.shape), options.dropout_p, x.device) if options.has_dropout else None


def add_low_rank_(y: Tensor, s: Tensor, lora_b: Tensor, lora_bias: Tensor | None, scaling: float) -> Tensor:
    """``y + scaling * (S B^T + lora_bias)``, in place into ``y`` (no M x N temporary) when the dtypes agree.

    Adapters kept in another dtype (PEFT's fp32 adapters over a bf16 base) add in the adapter dtype and cast
    back, as PEFT does, so the rounding matches it. Shared with the native backend, whose Y is a BLAS GEMM too.
    """
    if lora_b.dtype != y.dtype:
        delta = torch.addmm(lora_bias, s, lora_b.t()) if lora_bias is not None else s @ lora_b.t()
        return (y + delta * scaling).to(y.dtype)
    y.addmm_(s, lora_b.t(), alpha=scaling)
    if lora_bias is not None:
        y.add_(lora_bias, alpha=scaling)
    return y


def blas_lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *,
    options: LoraOptions, down: Callable[[Tensor, Tensor, LoraOptions], Tensor],
) -> tuple[Tensor, Tensor | None]:
    """``(Y, S)`` with Y = X W^T + bias by BLAS, S = ``down(x, lora_a, options)`` and the low-rank term added
    in place; the forward of every backend whose dense GEMMs are BLAS (this one and the native one)."""
    y = torch.nn.functional.linear(x, weight_nk(weight, options.weight_is_kn), bias)
    if not options.gate:
        return y, None
    s = down(x, lora_a, options)
    return add_low_rank_(y, s, lora_b, lora_bias, options.scaling), s


def _down(x: Tensor, lora_a: Tensor, options: LoraOptions) -> Tensor:
    """S = drop(X) A^T in the adapters' dtype, with 1/(1-p) applied to M x r rather than to the M x K input."""
    s = _masked(x, _keep(x, options), lora_a.dtype) @ lora_a.t()
    return s.mul_(1.0 / (1.0 - options.dropout_p)) if options.has_dropout else s


#: ``(Y, S)`` for 2-D ``x``; ``S`` (in the adapters' dtype) is None when the gate is off.
lora_forward = functools.partial(blas_lora_forward, down=_down)


@gated_off_runs_frozen_base
def lora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor | None, *,
    options: LoraOptions, need: GradRequest,
) -> LoraGrads:
    """The gradients for 2-D ``dy``; None where not requested."""
    scaling = options.scaling
    dy_lora = dy.to(lora_b.dtype)
    ds = (dy_lora @ lora_b).mul_(scaling)
    dx = dy @ weight_nk(weight, options.weight_is_kn) if need.dx else None
    d_bias = dy.sum(0) if need.dbias else None
    keep = _keep(x, options)  # regenerated once, shared by dA and dX
    # drop(X) = keep * X / (1 - p): the 1/(1-p) goes onto dS (M x r), never onto an M x K tensor
    ds_dropped = ds * (1.0 / (1.0 - options.dropout_p)) if keep is not None else ds
    d_lora_a = d_lora_b = d_lora_bias = None
    if need.dlora:
        d_lora_b = (dy_lora.t() @ s).mul_(scaling)
        d_lora_a = ds_dropped.t() @ _masked(x, keep, lora_a.dtype)
    if need.dlora_bias:
        d_lora_bias = dy_lora.sum(0).mul_(scaling)
    if dx is not None:
        same_dtype = ds.dtype == dx.dtype
        if keep is None and same_dtype:
            dx.addmm_(ds, lora_a)
        elif same_dtype:
            dx.addcmul_(ds_dropped @ lora_a, keep)
        else:
            dx = (dx + _masked(ds_dropped @ lora_a, keep, ds.dtype)).to(x.dtype)
    return LoraGrads(dx, d_lora_a, d_lora_b, d_bias, d_lora_bias)
