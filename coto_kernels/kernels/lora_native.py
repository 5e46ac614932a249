"""Native backend of the gated LoRA linear layer: BLAS for the dense GEMMs, compiled ops (csrc/) for the rest.

The dense products go through torch (MKL/oneDNN on the CPU, cuBLAS on the GPU): ``Y = F.linear(X, W, bias)``
and ``dX = dY W``, with the low-rank terms added in place (``addmm_`` into Y, the native op into dX). The
skinny, dropout-fused parts are the ``torch.ops.coto_kernels_native`` ops built from ``csrc/`` (math in
``coto_kernels.kernels.interface``; keep mask from ``csrc/coto_mask.h``, bit-identical to ``dropout_mask``):

- ``lora_down(x, a, seed, p)``: S = drop(X) A^T in fp32, the mask generated inside the loop (no M x K tensor);
- ``lora_dy(dy, b, s, scaling, need_db, need_colsum)``: dS = s dY B, dB = s dY^T S and the column sums of dY
  from one pass over dY;
- ``lora_dx_da(dx, x, ds, a, seed, p, need_da)``: dX += drop'(dS A) in place and dA = dS^T drop(X) from one
  pass over X and dX, the mask generated once for both.

The CPU kernels live in ``coto_kernels._native``; the CUDA kernels in ``coto_kernels._native_cuda``, built only
where torch has CUDA and nvcc is found. Importing this module raises ImportError (with the reason the build
recorded) when the CPU library is not built, so ``backend_status()`` can say why.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

import torch
from torch import Tensor

from .interface import GradRequest, LoraGrads, LoraOptions, weight_nk

__all__ = ["CUDA_STATUS", "dropout_keep_mask", "lora_backward", "lora_forward"]

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

#: None when the CUDA kernels are built and loaded, else why not (the CPU ops work either way).
CUDA_STATUS: str | None = _load("_native_cuda")

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


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    """The keep mask the native kernels regenerate for ``seed`` (bool ``shape``), from ``csrc/coto_mask.h``."""
    return _ops.keep_mask(torch.empty(shape, dtype=torch.uint8, device=device), seed, dropout_p)


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *,
    options: LoraOptions,
) -> tuple[Tensor, Tensor | None]:
    """``(Y, S)`` for 2-D ``x``; ``S`` (in the adapters' dtype) is None when the gate is off."""
    y = torch.nn.functional.linear(x, weight_nk(weight, options.weight_is_kn), bias)
    if not options.gate:
        return y, None
    s = _ops.lora_down(x, lora_a, options.seed, options.dropout_p).to(lora_a.dtype)
    if lora_b.dtype == y.dtype:
        y.addmm_(s, lora_b.t(), alpha=options.scaling)
        if lora_bias is not None:
            y.add_(lora_bias, alpha=options.scaling)
        return y, s
    # Adapters in another dtype (PEFT's fp32 adapters over a bf16 base): add in the adapter dtype and cast back,
    # as PEFT does, so the rounding matches it.
    delta = torch.addmm(lora_bias, s, lora_b.t()) if lora_bias is not None else s @ lora_b.t()
    return (y + delta * options.scaling).to(y.dtype), s


def lora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor | None, *,
    options: LoraOptions, need: GradRequest,
) -> LoraGrads:
    """The gradients for 2-D ``dy``; None where not requested or gated off."""
    dx = dy @ weight_nk(weight, options.weight_is_kn) if need.dx else None
    if not options.gate:
        return LoraGrads(dx, None, None, dy.sum(0) if need.dbias else None, None)
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
