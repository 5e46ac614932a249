"""The contract every kernel backend of the gated LoRA linear layer implements, and its math (written once).

Notation: X [M, K] (2-D; callers flatten leading dimensions), frozen base weight W [N, K] (``nn.Linear``) or
[K, N] (GPT-2 ``Conv1D``, ``weight_is_kn=True``, read through its strides), adapters A [r, K] and B [N, r],
s = scaling, g = gate, p = dropout probability, drop(X) = keep * X / (1 - p) with ``keep`` the mask defined in
``coto_kernels.kernels.dropout_mask`` (a pure function of the seed and the element index, bit-identical in
every backend, regenerated wherever it is needed and never stored).

Forward::

    S = drop(X) A^T                                  (M x r, fp32 or the adapters' dtype; saved for backward)
    Y = X W^T + bias + g * s * (S B^T + lora_bias)

Backward::

    dS = s * dY B                 dB = s * dY^T S              dA = dS^T drop(X)
    dX = dY W + g * drop'(dS A)   d_bias = sum_rows(dY)        d_lora_bias = s * sum_rows(dY)

where drop'(Z) = keep * Z / (1 - p). With g = 0 a backend runs only the base GEMMs (``X W^T + bias`` and
``dY W``): the adapter gets no gradient (None) and no LoRA kernel is launched.

DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``), exactly as PEFT 0.21 computes it. m [N] is the
magnitude vector (``lora_magnitude_vector``), ``n`` the row norm of the adapted weight, *detached* (DoRA paper
section 4.3: it gets no gradient), ``c = m / n`` the per-output-column scale, S = drop(X) A^T as for LoRA::

    n_j^2 = ||W_j + s (B A)_j + s lora_bias_j 1^T||^2          (the norm PEFT takes of ``W + s * B(A(I_K))``)

Without dropout (p = 0, or eval mode)::

    Z = X W^T + s (S B^T + lora_bias)           Y = bias + c * Z

    G = c * dY        dS = s G B        dB = s G^T S        dA = dS^T X        d_lora_bias = s sum_rows(G)
    dX = G W + dS A   d_bias = sum_rows(dY)     dm = sum_rows(dY * Z) / n = sum_rows(dY * (Y - bias)) / m

With dropout (training, p > 0; D = drop(X), PEFT's two-term formula: the base term on the full X)::

    Z = D W^T + s (S B^T + lora_bias)           Y = X W^T + bias + c * Z - D W^T

    G = c * dY        dS = s G B        dB = s G^T S        dA = dS^T D        d_lora_bias = s sum_rows(G)
    dX = dY W + drop'((G - dY) W + dS A)        d_bias = sum_rows(dY)          dm = sum_rows(dY * Z) / n

The gate is handled above the kernels: a gated-off DoRA layer runs ``X W^T + bias`` only (no magnitude, no norm).

A backend is a module with ``lora_forward``, ``lora_backward`` and ``dropout_keep_mask`` of the signatures in
``LoraBackend``; ``coto_kernels.kernels.load_backend`` imports one by name. A DoRA kernel module
(``dora_<name>``) implements ``DoraBackend``; ``coto_kernels.kernels.load_dora_backend`` imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraOptions:
    """The scalar options of one gated LoRA call (hashable: compiled and cached code may key on it)."""

    scaling: float
    """s: PEFT's ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA)."""
    dropout_p: float = 0.0
    """p: probability of dropping an element of X on the LoRA path (0 in eval mode)."""
    seed: int = 0
    """Seed of the dropout mask; the same seed regenerates the same mask in forward and backward."""
    gate: bool = True
    """g: False runs the frozen base only (CoTo switched the adapter off for this step)."""
    weight_is_kn: bool = False
    """True when the base weight is stored [K, N] (GPT-2 ``Conv1D``) rather than [N, K] (``nn.Linear``)."""

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0


@dataclass(frozen=True)
class GradRequest:
    """Which gradients a backward must produce (from ``ctx.needs_input_grad``); the others come back None."""

    dx: bool = True
    """dX, the input gradient."""
    dlora: bool = True
    """dA and dB, the adapter gradients (computed together: they share dS)."""
    dbias: bool = False
    """d_bias, the gradient of a trainable base bias."""
    dlora_bias: bool = False
    """d_lora_bias, the gradient of ``lora_B.bias`` (PEFT's ``lora_bias=True``)."""


class LoraGrads(NamedTuple):
    """What ``lora_backward`` returns; None where not requested or gated off."""

    dx: Tensor | None
    d_lora_a: Tensor | None
    d_lora_b: Tensor | None
    d_bias: Tensor | None
    d_lora_bias: Tensor | None


class LoraBackend(Protocol):
    """What ``coto_kernels.functional`` needs from a kernel backend module."""

    def lora_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
        lora_bias: Tensor | None, *, options: LoraOptions,
    ) -> tuple[Tensor, Tensor | None]:
        """``(Y, S)`` for 2-D ``x``: Y in x's dtype, S as defined above, or None when the gate is off."""

    def lora_backward(
        self, dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor | None, *,
        options: LoraOptions, need: GradRequest,
    ) -> LoraGrads:
        """The gradients of the forward for 2-D ``dy`` (contiguous); ``s`` is what ``lora_forward`` returned.

        dX comes in x's dtype, dA/dB in the adapters' dtypes, d_bias in dY's and d_lora_bias in lora_b's.
        """

    def dropout_keep_mask(
        self, seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device | str
    ) -> Tensor:
        """The keep mask (bool ``shape``) this backend regenerates for ``seed``; for tests and references."""


def weight_nk(weight: Tensor, weight_is_kn: bool) -> Tensor:
    """The base weight as [N, K]; a transposed view (no copy) for Conv1D's [K, N] layout."""
    return weight.t() if weight_is_kn else weight


# -- DoRA ---------------------------------------------------------------------------------------------------------


class DoraGrads(NamedTuple):
    """What ``dora_backward`` returns: ``LoraGrads`` plus the magnitude vector's gradient; None where not requested."""

    dx: Tensor | None
    d_lora_a: Tensor | None
    d_lora_b: Tensor | None
    d_bias: Tensor | None
    d_lora_bias: Tensor | None
    d_magnitude: Tensor | None


class DoraBackend(Protocol):
    """What ``coto_kernels.functional_dora`` needs from a DoRA kernel module (math: this module's docstring, DoRA)."""

    def dora_row_norm(
        self, weight: Tensor, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None, *, scaling: float,
        weight_is_kn: bool,
    ) -> Tensor:
        """n (fp32, [N]) without any N x K temporary; the frozen ``weight``'s own row norms may be cached."""

    def dora_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
        lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, *, options: LoraOptions, save_z: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(Y, S, Z)`` for 2-D ``x``; with ``save_z`` (dm needed), Z when Y cannot give it, else None (save Y)."""

    def dora_backward(
        self, dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
        lora_b: Tensor, lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor, s: Tensor,
        z_saved: Tensor | None, *, options: LoraOptions, need: GradRequest, need_magnitude: bool,
    ) -> DoraGrads:
        """The gradients of ``dora_forward`` for 2-D contiguous ``dy``; ``y``: the saved output when Z is None."""



def frozen_base_grads(dy: Tensor, weight: Tensor, options: LoraOptions, need: GradRequest) -> LoraGrads:
    """The gated-off backward every BLAS-based backend shares: dX = dY W and d_bias only, no adapter gradient."""
    dx = dy @ weight_nk(weight, options.weight_is_kn) if need.dx else None
    return LoraGrads(dx, None, None, dy.sum(0) if need.dbias else None, None)


def gated_off_runs_frozen_base(backward: Callable[..., LoraGrads]) -> Callable[..., LoraGrads]:
    """Decorate a backend's ``lora_backward`` so a gated-off call returns ``frozen_base_grads`` without it."""

    @functools.wraps(backward)
    def gated(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s: Tensor | None, *,
              options: LoraOptions, need: GradRequest) -> LoraGrads:
        if not options.gate:
            return frozen_base_grads(dy, weight, options, need)
        return backward(dy, x, weight, lora_a, lora_b, s, options=options, need=need)

    return gated
