"""Pure-PyTorch backend of the gated LoRA linear layer: runs everywhere, same contract as ``lora_triton``.

Notation: X [M, K], frozen W [N, K] (or [K, N] for GPT-2 ``Conv1D``), A [r, K], B [N, r], s = scaling,
g = gate, drop(X) = X * keep / (1 - p) with ``keep`` regenerated from ``seed`` (never stored) by a
counter-based hash (``dropout_keep_mask``).

Forward::

    S = drop(X) A^T                               (M x r, saved for backward)
    Y = X W^T + bias + g * s * (S B^T + lora_bias)

Backward::

    dS = s * dY B        dB = s * dY^T S        dA = dS^T drop(X)
    dX = dY W + g * drop'(dS A)                 d_lora_bias = s * sum_rows(dY)

The low-rank term is added in place into the base GEMM's output (``addmm_``), so no M x N LoRA intermediate
is created; the same holds for the ``dS A`` term of dX. With g = 0 only the base GEMMs run.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _weight_nk(weight: Tensor, weight_is_kn: bool) -> Tensor:
    """The base weight as [N, K]; a transposed view (no copy) for Conv1D's [K, N] layout."""
    return weight.t() if weight_is_kn else weight


# Counter-based mask: keep[i] = mix(i * golden ^ k1 + k0) >= threshold, i the flat element index, mix = MurmurHash3's
# fmix32 without its last xor-shift (the threshold reads the high bits, which the last multiply has already
# mixed). A pure function of (seed, i) in 11 vectorised int32 passes: ~4x cheaper on the CPU than torch's
# bernoulli_ (which costs more than the layer's GEMM at LoRA shapes), and it is regenerated in every backward.
_GOLDEN = -1640531535  # 0x9E3779B1 as int32
_FMIX = (-2048144789, -1028477387)  # MurmurHash3 fmix32 multipliers 0x85EBCA6B, 0xC2B2AE35 as int32


def _logical_shift_xor_(h: Tensor, shift: int) -> Tensor:
    """h ^= h >>> shift on int32 (torch's >> is arithmetic; the mask drops the sign extension)."""
    return h.bitwise_xor_((h >> shift).bitwise_and_((1 << (32 - shift)) - 1))


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


@functools.lru_cache(maxsize=32)
def _golden_counters(numel: int, device: torch.device) -> Tensor:
    """i * golden for i < numel, shared by every mask of that size (saves two of the ~10 passes)."""
    return torch.arange(numel, dtype=torch.int32, device=device).mul_(_GOLDEN)


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str) -> Tensor:
    """The keep-mask (bool, ``shape``) this backend uses for ``seed``: regenerated, never stored.

    Each element is kept with probability 1 - p (p resolved to 2**-32), independently of its neighbours and of
    other seeds' masks.
    """
    key0, key1 = _int32(seed * 0x9E3779B97F4A7C15 >> 16), _int32(seed * 0xBF58476D1CE4E5B9 >> 24)
    numel = shape[0] * shape[1]
    h = _golden_counters(numel, torch.device(device)).bitwise_xor(key1).add_(key0)
    _logical_shift_xor_(h, 16).mul_(_FMIX[0])
    _logical_shift_xor_(h, 13).mul_(_FMIX[1])
    threshold = round(dropout_p * 2**32) - 2**31  # h is uniform over [-2**31, 2**31)
    return (h >= threshold).view(shape)


def _masked(x: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    """keep * X in ``dtype``, *without* the 1/(1-p) factor, which callers fold into an M x r operand."""
    x = x.to(dtype)
    return x if keep is None else x * keep


def _keep(x: Tensor, dropout_p: float, seed: int) -> Tensor | None:
    return dropout_keep_mask(seed, tuple(x.shape), dropout_p, x.device) if dropout_p > 0.0 else None


def lora_forward(
    x: Tensor,
    weight: Tensor,
    weight_is_kn: bool,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    lora_bias: Tensor | None,
    scaling: float,
    gate: bool,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor | None]:
    """Return ``(Y, S)`` for 2-D ``x``; ``S`` is None when the gate is off."""
    y = torch.nn.functional.linear(x, _weight_nk(weight, weight_is_kn), bias)
    if not gate:
        return y, None
    s = _masked(x, _keep(x, dropout_p, seed), lora_a.dtype) @ lora_a.t()
    if dropout_p > 0.0:
        s.mul_(1.0 / (1.0 - dropout_p))  # on M x r rather than on the M x K input
    if lora_b.dtype == y.dtype:
        y.addmm_(s, lora_b.t(), alpha=scaling)
        if lora_bias is not None:
            y.add_(lora_bias, alpha=scaling)
    else:
        # Adapters kept in another dtype (PEFT's fp32 adapters over a bf16 base): add in the adapter dtype and
        # cast back, as PEFT does, so the rounding matches it.
        delta = torch.addmm(lora_bias, s, lora_b.t()) if lora_bias is not None else s @ lora_b.t()
        y = (y + delta * scaling).to(y.dtype)
    return y, s


def lora_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    weight_is_kn: bool,
    lora_a: Tensor,
    lora_b: Tensor,
    s: Tensor | None,
    scaling: float,
    gate: bool,
    dropout_p: float,
    seed: int,
    need_dx: bool,
    need_dlora: bool,
    need_dbias: bool,
    need_dlora_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Return ``(dX, dA, dB, d_bias, d_lora_bias)`` for 2-D ``dy``; None where not needed or gated off."""
    dx = dy @ _weight_nk(weight, weight_is_kn) if need_dx else None
    d_bias = dy.sum(0) if need_dbias else None
    if not gate:
        return dx, None, None, d_bias, None
    dy_lora = dy.to(lora_b.dtype)
    ds = (dy_lora @ lora_b).mul_(scaling)
    keep = _keep(x, dropout_p, seed)  # regenerated once, shared by dA and dX
    # drop(X) = keep * X / (1 - p): the 1/(1-p) goes onto dS (M x r), never onto an M x K tensor
    ds_dropped = ds * (1.0 / (1.0 - dropout_p)) if keep is not None else ds
    d_lora_a = d_lora_b = d_lora_bias = None
    if need_dlora:
        d_lora_b = (dy_lora.t() @ s).mul_(scaling)
        d_lora_a = ds_dropped.t() @ _masked(x, keep, lora_a.dtype)
    if need_dlora_bias:
        d_lora_bias = dy_lora.sum(0).mul_(scaling)
    if dx is not None:
        same_dtype = ds.dtype == dx.dtype
        if keep is None and same_dtype:
            dx.addmm_(ds, lora_a)
        elif same_dtype:
            dx.addcmul_(ds_dropped @ lora_a, keep)
        else:
            dx = (dx + _masked(ds_dropped @ lora_a, keep, ds.dtype)).to(x.dtype)
    return dx, d_lora_a, d_lora_b, d_bias, d_lora_bias
