"""The gated DoRA linear layer as one ``torch.autograd.Function`` over the DoRA kernels (PEFT's semantics).

``dora_linear`` computes PEFT 0.21's DoRA forward (``peft/tuners/lora/variants.py``, ``dora.py``; the math with
its backward is in ``coto_kernels.kernels.interface``): with c = m / ||W + s B A||_row (detached)::

    no dropout / eval:  Y = bias + c * (X W^T + s (B A X + lora_bias))
    dropout p > 0:      Y = X W^T + bias + (c - 1) * drop(X) W^T + c * s * (B A drop(X) + lora_bias)

The row norm comes from ``dora_row_norm`` (no N x K temporary, ||W||^2 cached) and is taken from the weights as
stored (before any autocast cast), in fp32. Saved for backward: X, S = drop(X) A^T (M x r), the norm (N), and for
the magnitude gradient the output Y (no dropout) or Z = drop(X) W^T + s(S B^T + lora_bias) (dropout); never a
mask, a dropped copy of X or an N x K matrix.

``dora_linear_group`` computes several DoRA layers that read the same input (q/k/v, gate/up) together, without
dropout (``coto_kernels.kernels.dora_group``); ``patch`` forms such groups itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .functional import (
    GROUP_BACKENDS,
    autocast_operands,
    base_weight_grad,
    can_group,
    new_dropout_seed,
    per_member,
    resolve_backend,
    run_on_rows,
    traced_outputs,
)
from .kernels import load_dora_backend
from .kernels.dora_group import DoraGroupMember, group_backward, group_forward
from .kernels.interface import GradRequest, LoraOptions, weight_nk
from .kernels.lora_group import GroupMember


class DoRAFunction(torch.autograd.Function):
    """Fused DoRA layer: base GEMM, in-place low-rank add and per-column scale; see the module docstring.

    Input and output are 2-D: ``dora_linear`` reshapes outside the Function (``run_on_rows``), so the output is
    no view made inside a custom Function, which autograd would refuse to let anyone change in place."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
        lora_bias: Tensor | None, magnitude: Tensor, norm: Tensor,
        scaling: float, dropout_p: float, seed: int, weight_is_kn: bool, backend: str,
    ) -> Tensor:
        options = LoraOptions(scaling=scaling, dropout_p=dropout_p, seed=seed, weight_is_kn=weight_is_kn)
        need_magnitude = ctx.needs_input_grad[6]
        y, s, z = load_dora_backend(backend).dora_forward(
            x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm, options=options, save_z=need_magnitude,
        )
        saved_output = y if need_magnitude and z is None else None
        ctx.save_for_backward(x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm, s, z, saved_output)
        ctx.options = options
        ctx.backend = backend
        return traced_outputs(y)[0]

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm, s, z, y = ctx.saved_tensors
        options: LoraOptions = ctx.options
        need_x, need_weight, need_bias, need_a, need_b, need_lora_bias, need_magnitude = ctx.needs_input_grad[:7]
        dy = dy if dy.is_contiguous() else dy.contiguous()
        need = GradRequest(dx=need_x, dlora=need_a or need_b, dbias=need_bias, dlora_bias=need_lora_bias)
        kernels = load_dora_backend(ctx.backend)
        grads = kernels.dora_backward(
            dy, x, y, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm, s, z, options=options, need=need,
            need_magnitude=need_magnitude,
        )
        d_weight = None
        if need_weight:  # rare (frozen is the norm): Y depends on W through X W^T and (c - 1) D W^T, or c X W^T
            scaled_dy = dy * kernels.column_scale(magnitude, norm).to(dy.dtype)
            if options.has_dropout:
                d_weight = base_weight_grad(x, dy, options.weight_is_kn) + base_weight_grad(
                    kernels.dropped_input(x, options), scaled_dy - dy, options.weight_is_kn)
            else:
                d_weight = base_weight_grad(x, scaled_dy, options.weight_is_kn)
        return (
            grads.dx,
            d_weight,
            grads.d_bias,
            grads.d_lora_a if need_a else None,
            grads.d_lora_b if need_b else None,
            grads.d_lora_bias,
            grads.d_magnitude,
            None, None, None, None, None, None,
        )


def dora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    magnitude: Tensor, *, scaling: float, dropout_p: float = 0.0, gate: bool = True, weight_is_kn: bool = False,
    seed: int | None = None, backend: str = "auto",
) -> Tensor:
    """PEFT's DoRA layer output (module docstring) with a fused backward; ``gate=False`` runs ``x W^T + bias`` only.

    ``weight`` is ``[out, in]`` (``nn.Linear``) or ``[in, out]`` with ``weight_is_kn=True`` (GPT-2 ``Conv1D``);
    ``magnitude`` is PEFT's ``lora_magnitude_vector[adapter].weight`` ([out]). Under ``torch.autocast`` the
    operands except the magnitude are cast to the autocast dtype, as for PEFT's separate ``F.linear`` calls;
    the norm is taken from the weights as stored.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if not gate:
        return F.linear(x, weight_nk(weight, weight_is_kn), bias)
    out_features = lora_b.shape[0]
    if x.shape[-1] != lora_a.shape[1] or lora_b.shape[1] != lora_a.shape[0] or magnitude.shape != (out_features,):
        raise ValueError(
            f"DoRA shape mismatch: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, "
            f"magnitude {tuple(magnitude.shape)}"
        )
    backend = resolve_backend(backend, x.device)
    norm = load_dora_backend(backend).dora_row_norm(weight, lora_a, lora_b, lora_bias, scaling=float(scaling),
                                                    weight_is_kn=weight_is_kn)
    if seed is None:
        seed = new_dropout_seed() if dropout_p > 0.0 else 0
    return run_on_rows(DoRAFunction.apply, x, weight, bias, lora_a, lora_b, lora_bias, magnitude, norm,
                       float(scaling), float(dropout_p), seed, weight_is_kn, backend)


_GROUP_OPERANDS = 7  # per member after the scalars: weight, bias, lora_a, lora_b, lora_bias, magnitude, norm
_FIRST_MEMBER_INPUT = 4  # x, scalings, weight_is_kn, backend


def _dora_members(flat: Sequence[Tensor | None], scalings: Sequence[float],
                  weight_is_kn: Sequence[bool]) -> list[DoraGroupMember]:
    return [DoraGroupMember(*operands, scalings[i], weight_is_kn[i])
            for i, operands in enumerate(per_member(flat, len(scalings), _GROUP_OPERANDS))]


class GatedDoRAGroupFunction(torch.autograd.Function):
    """``dora_linear`` of several gated-on DoRA layers reading one 2-D ``x``, without dropout (math:
    ``kernels.dora_group``). Inputs after the scalars: each member's (weight, bias, lora_a, lora_b, lora_bias,
    magnitude, norm), flattened. Saves X, S, the operands and, per member whose magnitude needs a gradient, its output
    Y or (with a bias) Z; outputs one Y per member, separate tensors."""

    @staticmethod
    def forward(ctx, x: Tensor, scalings: tuple[float, ...], weight_is_kn: tuple[bool, ...], backend: str,
                *flat: Tensor | None):
        members = _dora_members(flat, scalings, weight_is_kn)
        needs = per_member(ctx.needs_input_grad, len(members), _GROUP_OPERANDS, first=_FIRST_MEMBER_INPUT)
        ys, s, zs = group_forward(x, members, save_z=[need[5] for need in needs])
        saved_outputs = [y if need[5] and z is None else None for y, z, need in zip(ys, zs, needs, strict=True)]
        ctx.save_for_backward(x, s, *flat, *zs, *saved_outputs)
        ctx.scalings, ctx.weight_is_kn, ctx.backend = scalings, weight_is_kn, backend
        ctx.set_materialize_grads(False)  # an unused output's dY stays None: its member gets no gradient
        return traced_outputs(*ys)

    @staticmethod
    def backward(ctx, *dys: Tensor | None):
        x, s, *rest = ctx.saved_tensors
        count = len(ctx.scalings)
        flat, zs, ys = rest[:_GROUP_OPERANDS * count], rest[-2 * count:-count], rest[-count:]
        members = _dora_members(flat, ctx.scalings, ctx.weight_is_kn)
        needs = per_member(ctx.needs_input_grad, count, _GROUP_OPERANDS, first=_FIRST_MEMBER_INPUT)
        dys = [dy if dy is None or dy.is_contiguous() else dy.contiguous() for dy in dys]
        kernels = load_dora_backend(ctx.backend)
        dx, grads = group_backward(
            dys, x, [z if z is not None else y for z, y in zip(zs, ys, strict=True)], members, s,
            need_dx=ctx.needs_input_grad[0], need_lora=[need[2] or need[3] for need in needs],
            need_bias=[need[1] for need in needs], need_lora_bias=[need[4] for need in needs],
            need_magnitude=[need[5] for need in needs], from_z=[z is not None for z in zs],
            scale_dy=kernels.scale_dy,
        )
        flat_grads: list[Tensor | None] = []
        for member, need, dy, g in zip(members, needs, dys, grads, strict=True):
            d_weight = None
            if need[0] and dy is not None:  # rare (frozen is the norm): Y depends on W through c X W^T
                scaled_dy = dy * kernels.column_scale(member.magnitude, member.norm).to(dy.dtype)
                d_weight = base_weight_grad(x, scaled_dy, member.weight_is_kn)
            flat_grads += [d_weight, g.d_bias, g.d_lora_a if need[2] else None, g.d_lora_b if need[3] else None,
                           g.d_lora_bias, g.d_magnitude, None]
        return (dx, None, None, None, *flat_grads)


def dora_linear_group(
    x: Tensor, members: Sequence[GroupMember], magnitudes: Sequence[Tensor], *, backend: str = "auto",
) -> tuple[Tensor, ...]:
    """``dora_linear(x, *member, magnitude, gate=True)`` for every member (no dropout), computed together.

    For DoRA layers that read the same ``x`` (a decoder block's q/k/v or gate/up projections): X is read once for
    all the members' S = X A_i^T and once for their dA, and dX accumulates into one tensor
    (``coto_kernels.kernels.dora_group``). Same results as the separate calls up to summation order. ``magnitudes``:
    each member's PEFT ``lora_magnitude_vector[adapter].weight``. Needs ``can_group(x, members, backend)``.
    """
    if len(magnitudes) != len(members):
        raise ValueError(f"dora_linear_group needs one magnitude per member ({len(members)}), got {len(magnitudes)}")
    if not can_group(x, members, backend):
        raise ValueError(
            f"dora_linear_group needs at least two members, backend one of {GROUP_BACKENDS} (got {backend!r}) and, "
            "outside autocast, every operand in x's dtype and on its device"
        )
    for m, magnitude in zip(members, magnitudes, strict=True):
        if (x.shape[-1] != m.lora_a.shape[1] or m.lora_b.shape[1] != m.lora_a.shape[0]
                or magnitude.shape != (m.lora_b.shape[0],)):
            raise ValueError(f"DoRA shape mismatch: x {tuple(x.shape)}, lora_a {tuple(m.lora_a.shape)}, "
                             f"lora_b {tuple(m.lora_b.shape)}, magnitude {tuple(magnitude.shape)}")
    backend = resolve_backend(backend, x.device)
    kernels = load_dora_backend(backend)
    norms = [kernels.dora_row_norm(m.weight, m.lora_a, m.lora_b, m.lora_bias, scaling=float(m.scaling),
                                   weight_is_kn=bool(m.weight_is_kn)) for m in members]
    operands = (x, *(t for m in members for t in m[:5]))
    cast = autocast_operands(*operands)
    x_cast, *cast_flat = cast or operands
    flat = []
    for operands, magnitude, norm in zip(per_member(cast_flat, len(members), 5), magnitudes, norms, strict=True):
        flat += [*operands, magnitude, norm]
    with torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext():
        ys = GatedDoRAGroupFunction.apply(
            x_cast.reshape(-1, x.shape[-1]), tuple(float(m.scaling) for m in members),
            tuple(bool(m.weight_is_kn) for m in members), backend, *flat,
        )
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)
