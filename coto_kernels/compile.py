"""The gated LoRA layer for ``torch.compile``: the gate is data (a tensor), not a Python bool Dynamo guards on.

In eager mode a patched layer reads its Python bool ``coto_gate`` and either runs the fused LoRA Function or
returns ``base_layer(x)``; Dynamo would guard on that bool and compile one graph per gate pattern. While
Dynamo traces, a patched layer instead passes its gate as a 0-d CPU bool tensor (``layer.coto_gate_tensor``,
updated in place by the controller, so the compiled graph stays valid) into two opaque custom ops:

- ``coto_kernels::gated_lora_fwd``: ``Y = X W^T + b + gate * s * (drop(X) A^T B^T + lora_b)``; with the gate off
  only the base GEMM runs (same kernels as eager: ``coto_kernels.kernels``). The dropout seed is drawn inside
  the op, so it is no Python int for Dynamo to specialise on either.
- ``coto_kernels::gated_lora_bwd``: the explicit backward; with the gate off it computes only ``dX = dY W`` and
  returns zero ``dA``/``dB``.

What differs from eager, by construction of a static graph:
- A gated-off adapter gets a *zero* gradient, not ``None``. Zero is not "no update" (AdamW momentum and weight
  decay still move it), so the controller clears those gradients before the optimizer step:
  ``controller.clear_inactive_grads()``, run by the Trainer callback (``on_pre_optimizer_step``) or by an
  optimizer step pre-hook (``controller.attach_optimizer(optimizer)``) in a plain loop.
- The LoRA GEMMs of gated-off adapters are skipped, but the backward of the frozen base below the lowest active
  adapter is not (the compiled backward graph is fixed): the truncation saving is an eager-mode saving.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import base_weight_grad, new_dropout_seed, resolve_backend, run_on_rows
from .kernels import load_backend
from .kernels.interface import GradRequest, LoraOptions

_OPS = "coto_kernels"


def _empty() -> Tensor:
    return torch.empty(0)


@torch.library.custom_op(f"{_OPS}::gated_lora_fwd", mutates_args=())
def gated_lora_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    gate: Tensor, scaling: float, dropout_p: float, weight_is_kn: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """2-D ``x``; returns ``(Y, S, seed)`` (``S`` is zeros and ``seed`` 0 when the gate is off)."""
    on = bool(gate.item())  # a CPU scalar: no device synchronisation
    seed = new_dropout_seed() if on and dropout_p > 0.0 else 0
    options = LoraOptions(scaling=scaling, dropout_p=dropout_p, seed=seed, gate=on, weight_is_kn=weight_is_kn)
    y, s = load_backend(resolve_backend(backend, x.device)).lora_forward(x, weight, bias, lora_a, lora_b, lora_bias,
                                                                         options=options)
    if s is None:
        s = torch.zeros(x.shape[0], lora_a.shape[0], dtype=lora_a.dtype, device=x.device)
    return y, s, torch.tensor(seed, dtype=torch.int64)


@gated_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, lora_bias, gate, scaling, dropout_p, weight_is_kn, backend):
    n = weight.shape[1] if weight_is_kn else weight.shape[0]
    y = x.new_empty(x.shape[0], n)
    s = x.new_empty(x.shape[0], lora_a.shape[0], dtype=lora_a.dtype)
    return y, s, torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op(f"{_OPS}::gated_lora_bwd", mutates_args=())
def gated_lora_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    s: Tensor,
    seed: Tensor,
    gate: Tensor,
    scaling: float,
    dropout_p: float,
    weight_is_kn: bool,
    backend: str,
    need_dx: bool,
    need_dbias: bool,
    need_dlora_bias: bool,
) -> list[Tensor]:
    """``[dX, dA, dB, d_bias, d_lora_bias]``; zeros for dA/dB when gated off, empty where not needed."""
    on = bool(gate.item())
    dy = dy if dy.is_contiguous() else dy.contiguous()
    options = LoraOptions(scaling=scaling, dropout_p=dropout_p, seed=int(seed.item()), gate=on,
                          weight_is_kn=weight_is_kn)
    need = GradRequest(dx=need_dx, dlora=True, dbias=need_dbias, dlora_bias=need_dlora_bias)
    dx, d_a, d_b, d_bias, d_lora_bias = load_backend(resolve_backend(backend, x.device)).lora_backward(
        dy, x, weight, lora_a, lora_b, s if on else None, options=options, need=need
    )
    if d_a is None:
        d_a, d_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    if need_dlora_bias and d_lora_bias is None:
        d_lora_bias = dy.new_zeros(lora_b.shape[0], dtype=lora_b.dtype)
    return [
        dx if need_dx else dy.new_empty(0),
        d_a,
        d_b,
        d_bias if need_dbias else dy.new_empty(0),
        d_lora_bias if need_dlora_bias else dy.new_empty(0),
    ]


@gated_lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, s, seed, gate, scaling, dropout_p, weight_is_kn, backend, need_dx, need_dbias,
      need_dlora_bias):
    n = dy.shape[1]
    return [
        x.new_empty(x.shape) if need_dx else dy.new_empty(0),
        torch.empty_like(lora_a),
        torch.empty_like(lora_b),
        dy.new_empty(n) if need_dbias else dy.new_empty(0),
        dy.new_empty(n, dtype=lora_b.dtype) if need_dlora_bias else dy.new_empty(0),
    ]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, lora_bias, gate, scaling, dropout_p, weight_is_kn, backend = inputs
    _, s, seed = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, seed, gate)
    ctx.options = (scaling, dropout_p, weight_is_kn, backend)
    ctx.mark_non_differentiable(s, seed)


def _backward(ctx, dy, _ds, _dseed):
    x, weight, lora_a, lora_b, s, seed, gate = ctx.saved_tensors
    scaling, dropout_p, weight_is_kn, backend = ctx.options
    need = ctx.needs_input_grad
    dx, d_a, d_b, d_bias, d_lora_bias = gated_lora_bwd(
        dy, x, weight, lora_a, lora_b, s, seed, gate, scaling, dropout_p, weight_is_kn, backend,
        need[0], need[2], need[5],
    )
    d_weight = base_weight_grad(x, dy, weight_is_kn) if need[1] else None
    return (
        dx if need[0] else None,
        d_weight,
        d_bias if need[2] else None,
        d_a if need[3] else None,
        d_b if need[4] else None,
        d_lora_bias if need[5] else None,
        None, None, None, None, None,
    )


gated_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def _gated_lora_output(*args) -> Tensor:
    """``gated_lora_fwd``'s output ``Y`` alone (``S`` and the seed are for the backward)."""
    return gated_lora_fwd(*args)[0]


def gated_lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    *,
    gate: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    weight_is_kn: bool = False,
    backend: str = "auto",
) -> Tensor:
    """``coto_kernels.lora_linear`` with the gate as a 0-d bool tensor: one graph for every gate value."""
    return run_on_rows(
        _gated_lora_output, x, weight, bias, lora_a, lora_b, lora_bias,
        gate, float(scaling), float(dropout_p), bool(weight_is_kn), backend,
    )
