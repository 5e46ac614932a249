"""Native DoRA kernels (contract ``interface.DoraBackend``): ``dora_torch``'s BLAS formulation, with the magnitude
gradient's column reduction sum_rows(dY * Y) (or dY * Z) by the native ``column_dots`` op on the CPU.

torch computes that reduction as ``(dY * Y).sum(0)``: an M x N product written and read back, then reduced. The
native op reads dY and Y once each (2.4-3.2x faster at M = 512, N = 512 / 1376 on 2 threads). Everything else
is BLAS either way (the dense GEMMs, the skinny low-rank products), so it stays ``dora_torch``'s; CUDA tensors
and mixed dtypes take torch's reduction (the op has no CUDA kernel: DoRA on the GPU is ``dora_triton``'s).
"""

from __future__ import annotations

import functools

from torch import Tensor

from . import dora_torch, lora_native
from .dora_torch import column_scale, dora_forward, dora_row_norm, dropout_keep_mask, dropped_input

__all__ = ["column_scale", "dora_backward", "dora_forward", "dora_row_norm", "dropout_keep_mask", "dropped_input"]


def _column_dots(a: Tensor, b: Tensor) -> Tensor:
    if a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype:
        return lora_native.column_dots(a, b)
    return dora_torch.column_dots(a, b)


#: ``dora_torch.dora_backward`` with the one-pass column reduction.
dora_backward = functools.partial(dora_torch.dora_backward, dots=_column_dots)
