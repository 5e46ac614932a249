"""The gated LoRA linear layer as one ``torch.autograd.Function`` over interchangeable kernel backends.

``lora_linear`` computes ``Y = X W^T + bias + gate * scaling * (B A drop(X) + lora_bias)`` with an explicit
backward (the math is in ``coto_kernels.kernels.interface``). It saves only X (a reference to the input, no
copy), S = drop(X) A^T (M x r) and the dropout seed: never a dropped copy of X, a mask, or anything M x N.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .kernels import KERNEL_BACKENDS, backend_available, load_backend, native_cuda_status
from .kernels.interface import GradRequest, LoraOptions
from .kernels.lora_group import GroupDropout, GroupMember, group_backward, group_forward

BACKENDS = ("auto", *KERNEL_BACKENDS)
#: Backends whose layers run ``lora_linear_group``: their products are BLAS calls, which the group shares. The
#: Triton kernels compute S inside the base GEMM's tiles, where X is already read once per layer. With dropout
#: only the native backend on the CPU groups (its ``lora_down_group`` / ``lora_dx_da_group`` ops).
GROUP_BACKENDS = ("torch", "native")


def triton_available() -> bool:
    """Whether the Triton backend can be imported here."""
    return backend_available("triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``device``. ``auto``: on CUDA Triton, else the native CUDA kernels when built;
    on the CPU the native kernels when built; PyTorch otherwise. ``native`` on CUDA without its CUDA kernels is a
    ValueError that says why they are missing (the CPU ops cannot take CUDA tensors)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native" and device.type == "cuda" and (why := native_cuda_status()) is not None:
        raise ValueError(f"backend='native' on CUDA tensors needs the native CUDA kernels, unavailable here: {why}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if triton_available():
            return "triton"
        return "native" if native_cuda_status() is None else "torch"
    return "native" if device.type == "cpu" and backend_available("native") else "torch"


def new_dropout_seed() -> int:
    """A dropout seed from torch's default generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, 2**31 - 1, (1,)))


def base_weight_grad(x2d: Tensor, dy2d: Tensor, weight_is_kn: bool) -> Tensor:
    """Gradient of an unfrozen base weight (frozen is the norm), in its own layout."""
    return x2d.t() @ dy2d if weight_is_kn else dy2d.t() @ x2d


def autocast_operands(x: Tensor, *operands: Tensor | None) -> tuple[Tensor | None, ...] | None:
    """``(x, *operands)`` cast to the autocast dtype (None stays None), as autocast would for PEFT's separate
    F.linear calls; e.g. ``(x, weight, bias, lora_a, lora_b, lora_bias)``.

    None when autocast is off for ``x``'s device. The caller then runs with autocast disabled.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None else None for t in (x, *operands))


def run_on_rows(
    fused_2d: Callable[..., Tensor],
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
    *scalars: Any,
) -> Tensor:
    """``fused_2d(x2d, weight, bias, lora_a, lora_b, lora_bias, *scalars)`` for an ``x`` of any leading dimensions.

    What both autograd paths (``lora_linear`` here, ``coto_kernels.compile.gated_lora_linear``) do around their
    2-D fused call: under ``torch.autocast`` the operands are cast first (``autocast_operands``) and the call runs
    with autocast off; the result is viewed back to ``x``'s leading dimensions outside the autograd Function or
    custom op, so it stays an ordinary autograd view that PEFT may add onto in place.
    """
    cast = autocast_operands(x, weight, bias, lora_a, lora_b, lora_bias)
    if cast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return run_on_rows(fused_2d, *cast, *scalars)
    y2d = fused_2d(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, lora_bias, *scalars)
    return y2d.view(*x.shape[:-1], y2d.shape[-1])


def traced_outputs(*ys: Tensor) -> tuple[Tensor, ...]:
    """A custom Function's outputs, copied while Dynamo traces it (``torch.compile``), as they are otherwise.

    The backends write Y in place (the low-rank term and the DoRA scale go onto the base GEMM's output). Dynamo in
    torch 2.11 turns a Function whose forward changes its output in place into one whose gradients are all zero
    (2.13 does not); a copy as the returned tensor avoids that, at no cost in eager mode. Patched layers do not
    reach this under ``torch.compile`` (they run ``coto_kernels.compile``'s opaque ops); ``lora_linear`` and
    ``dora_linear`` called in compiled code do."""
    if torch.compiler.is_compiling():
        return tuple(y.clone() for y in ys)
    return ys


class GatedLoRAFunction(torch.autograd.Function):
    """Fused base GEMM + low-rank update + gate on 2-D ``x``; see the module docstring for what is saved.

    Inputs and output are 2-D: the caller reshapes outside the Function. A view returned from inside a custom
    Function cannot be modified in place (autograd refuses, as it would bypass the custom backward), and
    PEFT's layers and AdaLoRA add onto a layer's output in place (``result += ...``).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_bias: Tensor | None,
        scaling: float, dropout_p: float, seed: int, gate: bool, weight_is_kn: bool, backend: str,
    ) -> Tensor:
        options = LoraOptions(scaling=scaling, dropout_p=dropout_p, seed=seed, gate=gate, weight_is_kn=weight_is_kn)
        y, s = load_backend(backend).lora_forward(x, weight, bias, lora_a, lora_b, lora_bias, options=options)
        ctx.save_for_backward(x, weight, lora_a, lora_b, s)
        ctx.options = options
        ctx.backend = backend
        return traced_outputs(y)[0]

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2d, weight, lora_a, lora_b, s = ctx.saved_tensors
        options: LoraOptions = ctx.options
        need_x, need_weight, need_bias, need_a, need_b, need_lora_bias = ctx.needs_input_grad[:6]
        dy2d = dy if dy.is_contiguous() else dy.contiguous()
        need = GradRequest(dx=need_x, dlora=need_a or need_b, dbias=need_bias, dlora_bias=need_lora_bias)
        grads = load_backend(ctx.backend).lora_backward(dy2d, x2d, weight, lora_a, lora_b, s, options=options,
                                                        need=need)
        d_weight = base_weight_grad(x2d, dy2d, options.weight_is_kn) if need_weight else None
        return (
            grads.dx,
            d_weight,
            grads.d_bias,
            grads.d_lora_a if need_a else None,
            grads.d_lora_b if need_b else None,
            grads.d_lora_bias,
            None, None, None, None, None, None,
        )


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    lora_bias: Tensor | None = None,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    gate: bool = True,
    weight_is_kn: bool = False,
    seed: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """``x W^T + bias + gate * scaling * (lora_b(lora_a(dropout(x))) + lora_bias)`` with a fused backward.

    ``weight`` is ``[out, in]`` (``nn.Linear``) or ``[in, out]`` with ``weight_is_kn=True`` (GPT-2 ``Conv1D``).
    ``x`` may have any number of leading dimensions. With ``gate=False`` only the base GEMM runs and the
    adapter receives no gradient. Under ``torch.autocast`` every operand is cast to the autocast dtype first,
    as autocast would do for PEFT's separate ``F.linear`` calls.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if x.shape[-1] != lora_a.shape[1] or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    if seed is None:
        seed = new_dropout_seed() if dropout_p > 0.0 and gate else 0
    return run_on_rows(
        GatedLoRAFunction.apply, x, weight, bias, lora_a, lora_b, lora_bias,
        float(scaling), float(dropout_p), seed, bool(gate), weight_is_kn, resolve_backend(backend, x.device),
    )


class GatedLoRAGroupFunction(torch.autograd.Function):
    """``lora_linear`` of several gated-on layers reading one 2-D ``x`` (math: ``kernels.lora_group``).

    Inputs after the scalars: each member's (weight, bias, lora_a, lora_b, lora_bias), flattened. Saves X, S and
    the operands; outputs one Y per member, separate tensors (each may be modified in place by its caller).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scalings: tuple[float, ...], weight_is_kn: tuple[bool, ...], dropout_p: float,
                seeds: tuple[int, ...], backend: str, *flat: Tensor | None):
        members = _group_members(flat, scalings, weight_is_kn)
        dropout = GroupDropout(dropout_p, seeds, load_backend(backend)) if dropout_p > 0.0 else None
        ys, s = group_forward(x, members, dropout)
        ctx.save_for_backward(x, s, *flat)
        ctx.scalings, ctx.weight_is_kn, ctx.dropout = scalings, weight_is_kn, dropout
        ctx.set_materialize_grads(False)  # an unused output's dY stays None: its member gets no gradient
        return traced_outputs(*ys)

    @staticmethod
    def backward(ctx, *dys: Tensor | None):
        x, s, *flat = ctx.saved_tensors
        members = _group_members(flat, ctx.scalings, ctx.weight_is_kn)
        needs = per_member(ctx.needs_input_grad, len(members), 5, first=6)  # 6 inputs before the members'
        dys = [dy if dy is None or dy.is_contiguous() else dy.contiguous() for dy in dys]
        dx, grads = group_backward(
            dys, x, members, s, need_dx=ctx.needs_input_grad[0],
            need_lora=[need[2] or need[3] for need in needs],
            need_bias=[need[1] for need in needs], need_lora_bias=[need[4] for need in needs],
            dropout=ctx.dropout,
        )
        flat_grads: list[Tensor | None] = []
        for member, need, dy, g in zip(members, needs, dys, grads, strict=True):
            d_weight = base_weight_grad(x, dy, member.weight_is_kn) if need[0] and dy is not None else None
            flat_grads += [d_weight, g.d_bias, g.d_lora_a if need[2] else None, g.d_lora_b if need[3] else None,
                           g.d_lora_bias]
        return (dx, None, None, None, None, None, *flat_grads)


def per_member(values: Sequence[Any], count: int, size: int, first: int = 0) -> list[tuple[Any, ...]]:
    """``values[first:]`` cut into ``count`` consecutive slices of ``size``: a group Function's flattened inputs
    (or their ``needs_input_grad``), member by member."""
    return [tuple(values[first + size * i: first + size * (i + 1)]) for i in range(count)]


def _group_members(flat: Sequence[Tensor | None], scalings: Sequence[float],
                   weight_is_kn: Sequence[bool]) -> list[GroupMember]:
    return [GroupMember(*operands, scalings[i], weight_is_kn[i])
            for i, operands in enumerate(per_member(flat, len(scalings), 5))]


def can_group(x: Tensor, members: Sequence[GroupMember], backend: str, dropout_p: float = 0.0) -> bool:
    """Whether ``lora_linear_group`` takes these members: two or more, a BLAS backend (``GROUP_BACKENDS``; with
    dropout the native one on the CPU) and, unless autocast casts them all to one dtype, every operand in ``x``'s
    dtype and on its device."""
    resolved = resolve_backend(backend, x.device)
    if len(members) < 2 or resolved not in GROUP_BACKENDS:
        return False
    if dropout_p > 0.0 and (resolved != "native" or x.device.type != "cpu"):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return all(t.device == x.device for m in members for t in m[:5] if t is not None)
    return all(t.dtype == x.dtype and t.device == x.device for m in members for t in m[:5] if t is not None)


def lora_linear_group(
    x: Tensor, members: Sequence[GroupMember], *, dropout_p: float = 0.0, seeds: Sequence[int] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, ...]:
    """``lora_linear(x, *member, gate=True, dropout_p=dropout_p)`` for every member, computed together.

    For layers that read the same ``x`` (a decoder block's q/k/v or gate/up projections): X is read once for
    all the members' S = drop_i(X) A_i^T and once for their dA, and dX accumulates into one tensor
    (``coto_kernels.kernels.lora_group``). Same results as the separate calls up to summation order; with dropout,
    member i's mask is the one ``lora_linear(..., seed=seeds[i])`` draws (seeds default to one
    ``new_dropout_seed()`` per member, in order). Needs ``can_group(x, members, backend, dropout_p)``; ``patch``
    forms the groups itself (``CoToLinear``).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if not can_group(x, members, backend, dropout_p):
        raise ValueError(
            f"lora_linear_group needs at least two members, backend one of {GROUP_BACKENDS} (got {backend!r}; "
            "with dropout: 'native' on the CPU) and, outside autocast, every operand in x's dtype and on its device"
        )
    for m in members:
        if x.shape[-1] != m.lora_a.shape[1] or m.lora_b.shape[1] != m.lora_a.shape[0]:
            raise ValueError(f"shape mismatch: x {tuple(x.shape)}, lora_a {tuple(m.lora_a.shape)}, "
                             f"lora_b {tuple(m.lora_b.shape)}")
    if seeds is None:
        seeds = [new_dropout_seed() if dropout_p > 0.0 else 0 for _ in members]
    if len(seeds) != len(members):
        raise ValueError(f"seeds needs one entry per member ({len(members)}), got {len(seeds)}")
    operands = (x, *(t for m in members for t in m[:5]))
    cast = autocast_operands(*operands)
    with torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext():
        x_cast, *flat = cast or operands
        ys = GatedLoRAGroupFunction.apply(
            x_cast.reshape(-1, x.shape[-1]), tuple(float(m.scaling) for m in members),
            tuple(bool(m.weight_is_kn) for m in members), float(dropout_p), tuple(int(seed) for seed in seeds),
            resolve_backend(backend, x.device), *flat,
        )
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)
