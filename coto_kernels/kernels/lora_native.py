"""Native backend of the gated LoRA linear layer: BLAS for the dense GEMMs, compiled ops (csrc/) for the rest.

The dense products go through torch (MKL/oneDNN on the CPU, cuBLAS on the GPU): ``Y = F.linear(X, W, bias)``
and ``dX = dY W``, with the low-rank terms added in place (``addmm_`` into Y, the native op into dX). The
skinny, dropout-fused parts are the ``torch.ops.coto_kernels_native`` ops built from ``csrc/`` (math in
``coto_kernels.kernels.interface``; keep mask from ``csrc/coto_mask.h``, bit-identical to ``dropout_mask``):

- ``lora_down(x, a, seed, p)``: S = drop(X) A^T in fp32, the mask generated inside the loop (no M x K tensor);
- ``lora_dy(dy, b, s, scaling, need_db, need_colsum)``: dS = s dY B, dB = s dY^T S and the column sums of dY
  (one pass over dY on CUDA and for half precision on the CPU; fp32 on the CPU is two BLAS calls);
- ``lora_dx_da(dx, x, ds, a, seed, p, need_da)``: dX += drop'(dS A) in place and dA = dS^T drop(X), the mask
  generated once per row block for both (fp32 without dropout on the CPU: two BLAS calls, nothing to fuse);
- ``dora_dy(dy, c, saved)``: DoRA's G = c * dY and sum_rows(dY * saved) (its magnitude gradient) from one read of
  dY (CPU only);
- ``dora_row_norm(weight, w_squared, a, b, lora_bias, scaling, guard, weight_is_kn)``: DoRA's row norm by the
  guarded expansion, one op (CPU only);
- ``keep_mask(x, seed, p)``: the mask itself, one vectorised pass (tests, and DoRA's dropout path);
- ``lora_down_group`` / ``lora_dx_da_group``: ``lora_down`` / ``lora_dx_da`` for a group of layers that read the
  same X (``lora_group``), each member with its own seed: one pass over X's row blocks for all of them (CPU only).

On the CPU the arithmetic of these ops is BLAS on cache-sized row blocks (``csrc/lora_ops.cpp``).

The CPU kernels live in ``coto_kernels._native``; the CUDA kernels in ``coto_kernels._native_cuda``, built only
where torch has CUDA and nvcc is found. Importing this module raises ImportError (with the reason the build
recorded) when the CPU library is not built, so ``backend_status()`` can say why.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
from pathlib import Path

import torch
from torch import Tensor

from .interface import GradRequest, LoraGrads, LoraOptions, gated_off_runs_frozen_base, weight_nk
from .lora_torch import blas_lora_forward

__all__ = [
    "CUDA_STATUS", "NATIVE_CUDA_ENV", "dora_dy", "dora_row_norm", "dropout_keep_mask", "lora_backward",
    "lora_down_group", "lora_dx_da_group", "lora_forward",
]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_BUILD_HINT = ("build it with `make setup`, `pip install --no-build-isolation -e .` or "
               "`python setup.py build_ext --inplace`")


def _library(stem: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE_DIR / f"{stem}{suffix}"
        if path.exists():
            return path
    return None


def _why_not_built(stem: str) -> str:
    """The reason setup.py recorded for not building ``stem``, or a hint to build it."""
    recorded = _PACKAGE_DIR / f"{stem}_build_error.txt"
    if recorded.exists():
        return recorded.read_text().strip()
    return f"coto_kernels.{stem} is not built; {_BUILD_HINT}"


def _load(stem: str) -> str | None:
    """Load the op library ``stem`` into torch; None on success, else why it is unavailable."""
    path = _library(stem)
    if path is None:
        return _why_not_built(stem)
    try:
        torch.ops.load_library(str(path))
    except OSError as error:  # built against another torch, or missing CUDA libraries
        return f"{path.name} does not load ({error}); rebuild it: {_BUILD_HINT}"
    return None


_cpu_problem = _load("_native")
if _cpu_problem is not None:
    raise ImportError(_cpu_problem)

#: Set to 0 to leave the CUDA kernels unloaded (the CPU ops and the Triton backend are unaffected).
NATIVE_CUDA_ENV = "COTO_KERNELS_NATIVE_CUDA"

#: None when the CUDA kernels are built and loaded, else why not (the CPU ops work either way).
CUDA_STATUS: str | None = (f"disabled by {NATIVE_CUDA_ENV}=0" if os.environ.get(NATIVE_CUDA_ENV) == "0"
                           else _load("_native_cuda"))

_ops = torch.ops.coto_kernels_native


@torch.library.register_fake("coto_kernels_native::keep_mask")
def _keep_mask_fake(x: Tensor, seed: int, dropout_p: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.bool)


@torch.library.register_fake("coto_kernels_native::lora_down")
def _lora_down_fake(x: Tensor, lora_a: Tensor, seed: int, dropout_p: float) -> Tensor:
    return x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32)


@torch.library.register_fake("coto_kernels_native::lora_dy")
def _lora_dy_fake(dy: Tensor, lora_b: Tensor, s: Tensor, scaling: float, need_db: bool, need_colsum: bool):
    m, n, r = dy.shape[0], dy.shape[1], lora_b.shape[1]
    fp32 = dict(dtype=torch.float32)
    return (dy.new_empty(m, r, **fp32), dy.new_empty((n, r) if need_db else (0,), **fp32),
            dy.new_empty((n,) if need_colsum else (0,), **fp32))


@torch.library.register_fake("coto_kernels_native::lora_dx_da")
def _lora_dx_da_fake(dx: Tensor | None, x: Tensor, ds: Tensor, lora_a: Tensor, seed: int, dropout_p: float,
                     need_da: bool) -> Tensor:
    return x.new_empty(tuple(lora_a.shape) if need_da else (0,), dtype=torch.float32)


@torch.library.register_fake("coto_kernels_native::lora_down_group")
def _lora_down_group_fake(x: Tensor, lora_a: Tensor, ranks: list[int], seeds: list[int], dropout_p: float) -> Tensor:
    return x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32)


@torch.library.register_fake("coto_kernels_native::lora_dx_da_group")
def _lora_dx_da_group_fake(dx: Tensor | None, x: Tensor, ds: Tensor, lora_a: Tensor, ranks: list[int],
                           seeds: list[int], dropout_p: float, need_da: bool) -> Tensor:
    return x.new_empty(tuple(lora_a.shape) if need_da else (0,), dtype=torch.float32)


@torch.library.register_fake("coto_kernels_native::dora_dy")
def _dora_dy_fake(dy: Tensor, col_scale: Tensor, saved: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(dy), dy.new_empty(dy.shape[1] if saved is not None else 0, dtype=torch.float32)


@torch.library.register_fake("coto_kernels_native::dora_row_norm")
def _dora_row_norm_fake(weight: Tensor, w_squared: Tensor, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
                        scaling: float, guard: float, weight_is_kn: bool) -> Tensor:
    return w_squared.new_empty(lora_b.shape[0], dtype=torch.float32)


def dora_row_norm(weight: Tensor, w_squared: Tensor, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *,
                  scaling: float, guard: float, weight_is_kn: bool) -> Tensor:
    """||W_j + s (B'A')_j|| (fp32 [N]) for CPU tensors from the cached ||W_j||^2 (``w_squared``): the expansion with
    rows below ``guard`` recomputed in fp64 (math: ``dora_torch``'s docstring)."""
    return _ops.dora_row_norm(weight, w_squared, lora_a, lora_b, lora_bias, float(scaling), float(guard),
                              weight_is_kn)


def dora_dy(dy: Tensor, col_scale: Tensor, saved: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(G = c * dY, sum_rows(dY * saved) in fp32 or None) for CPU tensors, ``saved`` of dY's shape and dtype."""
    g, dots = _ops.dora_dy(dy, col_scale, saved)
    return g, dots if saved is not None else None


def lora_down_group(x: Tensor, lora_a: Tensor, ranks: list[int], seeds: list[int], dropout_p: float) -> Tensor:
    """S = [drop_1(X) A_1^T | ... | drop_n(X) A_n^T] (fp32) for CPU tensors, ``lora_a`` the members' A stacked."""
    return _ops.lora_down_group(x, lora_a, ranks, seeds, dropout_p)


def lora_dx_da_group(dx: Tensor | None, x: Tensor, ds: Tensor, lora_a: Tensor, ranks: list[int], seeds: list[int],
                     dropout_p: float, need_da: bool) -> Tensor | None:
    """dX += sum_i drop'_i(dS_i A_i) in place; dA = the members' dS_i^T drop_i(X) stacked (fp32), or None."""
    da = _ops.lora_dx_da_group(dx, x, ds, lora_a, ranks, seeds, dropout_p, need_da)
    return da if need_da else None


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    """The keep mask the native kernels regenerate for ``seed`` (bool ``shape``), from ``csrc/coto_mask.h``."""
    return _ops.keep_mask(torch.empty(shape, dtype=torch.uint8, device=device), seed, dropout_p)


@gated_off_runs_frozen_base
def lora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor | None, *,
    options: LoraOptions, need: GradRequest,
) -> LoraGrads:
    """dX by BLAS plus the native ``lora_dy`` / ``lora_dx_da`` ops; None where not requested."""
    dx = dy @ weight_nk(weight, options.weight_is_kn) if need.dx else None
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    need_colsum = need.dbias or need.dlora_bias
    ds, db, colsum = _ops.lora_dy(dy, lora_b, s, options.scaling, need.dlora, need_colsum)
    d_lora_a = d_lora_b = None
    if need.dlora or dx is not None:
        da = _ops.lora_dx_da(dx, x, ds, lora_a, options.seed, options.dropout_p, need.dlora)
        if need.dlora:
            d_lora_a, d_lora_b = da.to(lora_a.dtype), db.to(lora_b.dtype)
    d_bias = colsum.to(dy.dtype) if need.dbias else None
    d_lora_bias = colsum.mul(options.scaling).to(lora_b.dtype) if need.dlora_bias else None
    return LoraGrads(dx, d_lora_a, d_lora_b, d_bias, d_lora_bias)


def _down(x: Tensor, lora_a: Tensor, options: LoraOptions) -> Tensor:
    """S by the native ``lora_down`` op, the dropout mask generated in its loop."""
    return _ops.lora_down(x, lora_a, options.seed, options.dropout_p).to(lora_a.dtype)


#: ``(Y, S)``: Y by BLAS, S by the native ``lora_down`` op.
lora_forward = functools.partial(blas_lora_forward, down=_down)
