"""Native DoRA kernels (contract ``interface.DoraBackend``): ``dora_torch``'s BLAS formulation, with three native
ops on the CPU where torch needs several passes or many small ops:

- ``dora_dy``: G = c * dY and the magnitude gradient's sum_rows(dY * Y) (or dY * Z) from one read of dY (torch:
  ``dY * c`` and ``(dY * Y).sum(0)``, two reads of dY and an M x N product written and read back);
- ``dora_row_norm``: the row norm's guarded expansion (``dora_torch.dora_row_norm``'s math) as one op: W_j . U_j
  and ||U_j||^2 (U = BA rebuilt in registers, never stored) from one streaming pass over W, then the guard and the
  sqrt, where torch issues ~20 ops (three BLAS products, each a pass or more over W or its products, and Python
  dispatches of several microseconds each, per layer and step);
- ``keep_mask``: the dropout mask (bit-identical to ``dropout_mask``'s) in one vectorised pass, where torch's
  definition takes about ten elementwise passes over M x K integers (~9x faster at 512 x 512).

Without dropout, DoRA's backward is LoRA's on G (dX = G W + dS A with dS = s G B, dB = s G^T S, dA = dS^T X,
d lora_bias = s sum_rows(G)) plus d bias = sum_rows(dY) and dm: on the CPU it runs as ``dora_dy`` followed by
``lora_native.lora_backward`` on G (its native ``lora_dy`` / ``lora_dx_da`` ops): 17 dispatches per layer where
the torch formulation issues 24. Everything else is BLAS either way (the dense GEMMs, the skinny low-rank
products), so it stays ``dora_torch``'s; CUDA tensors and mixed dtypes take torch's path (DoRA on the GPU is
``dora_triton``'s).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from . import dora_torch, lora_native
from .dora_torch import column_scale, dropout_keep_mask, dropped_input
from .interface import DoraGrads, GradRequest, LoraOptions, weight_nk

__all__ = [
    "column_scale", "dora_backward", "dora_forward", "dora_row_norm", "dropout_keep_mask", "dropped_input", "scale_dy",
]


def scale_dy(dy: Tensor, scale: Tensor, saved: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``dora_torch.scale_dy``'s (G = c * dY, sum_rows(dY * saved)) from one ``dora_dy`` pass on the CPU."""
    if dy.device.type == "cpu" and (saved is None or (saved.device == dy.device and saved.dtype == dy.dtype)):
        return lora_native.dora_dy(dy, scale, saved)
    return dora_torch.scale_dy(dy, scale, saved)


def dora_row_norm(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *, scaling: float, weight_is_kn: bool,
) -> Tensor:
    """n_j = ||W_j + s (B A)_j + s lora_bias_j|| (fp32 [N], detached): the native op on the CPU (||W||^2 cached by
    ``dora_torch``), ``dora_torch``'s expansion elsewhere; both guard cancelling rows the same way."""
    operands = (weight, lora_a, lora_b) if lora_bias is None else (weight, lora_a, lora_b, lora_bias)
    if any(t.device.type != "cpu" for t in operands):
        return dora_torch.dora_row_norm(weight, lora_a, lora_b, lora_bias, scaling=scaling, weight_is_kn=weight_is_kn)
    w_squared = dora_torch.weight_row_norms_squared(weight, weight_is_kn)
    with torch.no_grad():
        return lora_native.dora_row_norm(weight, w_squared, lora_a, lora_b, lora_bias, scaling=scaling,
                                         guard=dora_torch.CANCELLATION_GUARD, weight_is_kn=weight_is_kn)


def _keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    if torch.device(device).type == "cpu":
        return lora_native.dropout_keep_mask(seed, shape, dropout_p, device)
    return dropout_keep_mask(seed, shape, dropout_p, device)


#: ``dora_torch.dora_forward`` with the one-pass dropout mask.
dora_forward = functools.partial(dora_torch.dora_forward, keep_mask=_keep_mask)

#: ``dora_torch.dora_backward`` with the one-pass G / magnitude-gradient reduction and dropout mask.
_torch_formulation_backward = functools.partial(dora_torch.dora_backward, scale_dy=scale_dy, keep_mask=_keep_mask)


def dora_backward(
    dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor, z_saved: Tensor | None, *,
    options: LoraOptions, need: GradRequest, need_magnitude: bool,
) -> DoraGrads:
    """The gradients for 2-D ``dy`` (``dora_torch.dora_backward``'s contract). Without dropout on the CPU: G and dm's
    sums from one ``dora_dy`` pass, then LoRA's native backward on G (module docstring)."""
    saved = z_saved if z_saved is not None else y
    if options.has_dropout or dy.device.type != "cpu" or (need_magnitude and saved is None):
        return _torch_formulation_backward(dy, x, y, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm, s,
                                           z_saved, options=options, need=need, need_magnitude=need_magnitude)
    g, dots = scale_dy(dy, column_scale(magnitude, norm), saved if need_magnitude else None)
    lora = lora_native.lora_backward(g, x, weight, lora_a, lora_b, s, options=options,
                                     need=dataclasses.replace(need, dbias=False))
    d_bias = dy.sum(0) if need.dbias else None
    d_magnitude = None
    if need_magnitude:
        d_magnitude = dora_torch.magnitude_grad(dots, dy, x, weight_nk(weight, options.weight_is_kn), bias, lora_b,
                                                lora_bias, magnitude, norm, s, z_saved is not None, options.scaling)
    return DoraGrads(lora.dx, lora.d_lora_a, lora.d_lora_b, d_bias, lora.d_lora_bias, d_magnitude)
