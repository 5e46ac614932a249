"""Native DoRA kernels (contract ``interface.DoraBackend``): ``dora_torch``'s BLAS formulation, with two native
ops on the CPU where torch needs several passes:

- ``dora_dy``: G = c * dY and the magnitude gradient's sum_rows(dY * Y) (or dY * Z) from one read of dY (torch:
  ``dY * c`` and ``(dY * Y).sum(0)``, two reads of dY and an M x N product written and read back);
- ``keep_mask``: the dropout mask (bit-identical to ``dropout_mask``'s) in one vectorised pass, where torch's
  definition takes about ten elementwise passes over M x K integers (~9x faster at 512 x 512).

Everything else is BLAS either way (the dense GEMMs, the skinny low-rank products), so it stays ``dora_torch``'s;
CUDA tensors and mixed dtypes take torch's path (DoRA on the GPU is ``dora_triton``'s).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import dora_torch, lora_native
from .dora_torch import column_scale, dora_row_norm, dropout_keep_mask, dropped_input

__all__ = ["column_scale", "dora_backward", "dora_forward", "dora_row_norm", "dropout_keep_mask", "dropped_input"]


def _scale_dy(dy: Tensor, scale: Tensor, saved: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if dy.device.type == "cpu" and (saved is None or (saved.device == dy.device and saved.dtype == dy.dtype)):
        return lora_native.dora_dy(dy, scale, saved)
    return dora_torch.scale_dy(dy, scale, saved)


def _keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    if torch.device(device).type == "cpu":
        return lora_native.dropout_keep_mask(seed, shape, dropout_p, device)
    return dropout_keep_mask(seed, shape, dropout_p, device)


#: ``dora_torch.dora_forward`` with the one-pass dropout mask.
dora_forward = functools.partial(dora_torch.dora_forward, keep_mask=_keep_mask)

#: ``dora_torch.dora_backward`` with the one-pass G / magnitude-gradient reduction and dropout mask.
dora_backward = functools.partial(dora_torch.dora_backward, scale_dy=_scale_dy, keep_mask=_keep_mask)
