"""Native DoRA kernels (contract ``interface.DoraBackend``): ``dora_torch``'s BLAS formulation, with G = c * dY and
the magnitude gradient's sum_rows(dY * Y) (or dY * Z) from one read of dY by the native ``dora_dy`` op on the CPU.

torch forms those as ``dY * c`` and ``(dY * Y).sum(0)``: two reads of dY and an M x N product written and read
back. Everything else is BLAS either way (the dense GEMMs, the skinny low-rank products), so it stays
``dora_torch``'s; CUDA tensors and mixed dtypes take torch's path (the op has no CUDA kernel: DoRA on the GPU is
``dora_triton``'s).
"""

from __future__ import annotations

import functools

from torch import Tensor

from . import dora_torch, lora_native
from .dora_torch import column_scale, dora_forward, dora_row_norm, dropout_keep_mask, dropped_input

__all__ = ["column_scale", "dora_backward", "dora_forward", "dora_row_norm", "dropout_keep_mask", "dropped_input"]


def _scale_dy(dy: Tensor, scale: Tensor, saved: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if dy.device.type == "cpu" and (saved is None or (saved.device == dy.device and saved.dtype == dy.dtype)):
        return lora_native.dora_dy(dy, scale, saved)
    return dora_torch.scale_dy(dy, scale, saved)


#: ``dora_torch.dora_backward`` with the one-pass G and magnitude-gradient reduction.
dora_backward = functools.partial(dora_torch.dora_backward, scale_dy=_scale_dy)
