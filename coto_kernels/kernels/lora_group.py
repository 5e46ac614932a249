"""LoRA layers that read the same input (q/k/v, gate/up), computed as one group by BLAS (torch and native backends).

Per member i: base weight W_i, bias_i, adapters A_i [r_i, K] and B_i [N_i, r_i], scaling s_i, all reading one
X [M, K]. With the adapters stacked, A = [A_1; ...; A_n] (R = sum r_i rows), and S = X A^T = [S_1 | ... | S_n]::

    Y_i = X W_i^T + bias_i + s_i (S_i B_i^T + lora_bias_i)

    dS_i = s_i dY_i B_i       dB_i = s_i dY_i^T S_i       d_bias_i = sum_rows(dY_i)   d_lora_bias_i = s_i d_bias_i
    dX = sum_i dY_i W_i + dS A                              dA = dS^T X   (dS = [dS_1 | ... | dS_n], rows split to dA_i)

This is the single layer's math (``interface``) member by member; what the group changes is how often X and dX are
touched. Separately, each member reads X for its own S and again for its own dA, and adds a rank-r_i update into
its own dX, which autograd then sums; together, X is read once for S and once for dA, and every term of dX
accumulates in place into one tensor (the dY_i W_i by ``addmm_``, dS A as one rank-R update). On the CPU these
skinny products cost a multiple of their arithmetic in memory traffic, so that is what they are worth saving.

With dropout (probability p, shared), member i drops X with the mask of its own seed: S_i = drop_i(X) A_i^T,
dA_i = dS_i^T drop_i(X), and dX's low-rank term is sum_i drop'_i(dS_i A_i). Those products go to a
``GroupDropoutOps`` (the native backend's ``lora_down_group`` / ``lora_dx_da_group``), which makes each member's
dropped copy of a row block of X while that block is in cache: X still comes from memory once per pass.

No gate here: every member is switched on (``coto_kernels.functional.lora_linear_group`` checks what can join). All
operands share one dtype, so every product runs in it, as the torch backend's single layer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .interface import LoraGrads, weight_nk
from .lora_torch import add_low_rank_

__all__ = ["GroupDropout", "GroupDropoutOps", "GroupMember", "group_backward", "group_forward"]


class GroupMember(NamedTuple):
    """One layer of a group: its operands and scalars, as ``lora_linear`` takes them."""

    weight: Tensor
    bias: Tensor | None
    lora_a: Tensor
    lora_b: Tensor
    lora_bias: Tensor | None
    scaling: float
    weight_is_kn: bool = False


class GroupDropoutOps(Protocol):
    """The dropout-fused X-side products of a group (``lora_native`` implements them on the CPU)."""

    def lora_down_group(self, x: Tensor, lora_a: Tensor, ranks: list[int], seeds: list[int],
                        dropout_p: float) -> Tensor:
        """S = [drop_1(X) A_1^T | ... | drop_n(X) A_n^T] in fp32; ``lora_a`` is the members' A stacked."""

    def lora_dx_da_group(self, dx: Tensor | None, x: Tensor, ds: Tensor, lora_a: Tensor, ranks: list[int],
                         seeds: list[int], dropout_p: float, need_da: bool) -> Tensor | None:
        """dX += sum_i drop'_i(dS_i A_i) in place (when given); the stacked dS_i^T drop_i(X) in fp32 if need_da."""


class GroupDropout(NamedTuple):
    """Dropout of a group: probability p, one mask seed per member, and the ops that apply it."""

    p: float
    seeds: tuple[int, ...]
    ops: GroupDropoutOps


def _ranks(members: Sequence[GroupMember]) -> list[int]:
    return [m.lora_a.shape[0] for m in members]


def group_forward(
    x: Tensor, members: Sequence[GroupMember], dropout: GroupDropout | None = None
) -> tuple[list[Tensor], Tensor]:
    """``([Y_1, ..., Y_n], S)`` for 2-D ``x``: each Y_i a tensor of its own, S for all members at once."""
    a = torch.cat([m.lora_a for m in members])
    if dropout is None:
        s = x @ a.t()
    else:
        s = dropout.ops.lora_down_group(x, a, _ranks(members), list(dropout.seeds), dropout.p).to(a.dtype)
    ys = [
        add_low_rank_(torch.nn.functional.linear(x, weight_nk(m.weight, m.weight_is_kn), m.bias), s_i, m.lora_b,
                      m.lora_bias, m.scaling)
        for m, s_i in zip(members, s.split(_ranks(members), 1), strict=True)
    ]
    return ys, s


def group_backward(
    dys: Sequence[Tensor | None], x: Tensor, members: Sequence[GroupMember], s: Tensor, *, need_dx: bool,
    need_lora: Sequence[bool], need_bias: Sequence[bool], need_lora_bias: Sequence[bool],
    dropout: GroupDropout | None = None,
) -> tuple[Tensor | None, list[LoraGrads]]:
    """``(dX, per-member LoraGrads with dx None)`` for 2-D contiguous ``dys``; a None dY_i (that output unused)
    gives its member no gradient at all, as a layer whose output is unused gets none."""
    grads = [LoraGrads(None, None, None, None, None)] * len(members)
    dx = None
    present, ds_parts = [], []
    for i, (dy, m, s_i) in enumerate(zip(dys, members, s.split(_ranks(members), 1), strict=True)):
        if dy is None:
            continue
        if need_dx:
            w = weight_nk(m.weight, m.weight_is_kn)
            dx = dy @ w if dx is None else dx.addmm_(dy, w)
        colsum = dy.sum(0) if need_bias[i] or need_lora_bias[i] else None
        grads[i] = LoraGrads(
            None, None,
            (dy.t() @ s_i).mul_(m.scaling) if need_lora[i] else None,
            colsum if need_bias[i] else None,
            colsum * m.scaling if need_lora_bias[i] else None,
        )
        if need_dx or need_lora[i]:
            present.append(i)
            ds_parts.append((dy @ m.lora_b).mul_(m.scaling))
    if not present:
        return dx, grads
    ds = torch.cat(ds_parts, 1)
    a = torch.cat([members[i].lora_a for i in present])
    ranks = _ranks([members[i] for i in present])
    need_da = any(need_lora[i] for i in present)
    if dropout is not None:
        da = dropout.ops.lora_dx_da_group(dx, x, ds, a, ranks, [dropout.seeds[i] for i in present], dropout.p,
                                          need_da)
    else:
        if dx is not None:
            dx.addmm_(ds, a)
        da = (x.t() @ ds).t() if need_da else None  # a cold X is the faster left operand (lora_native's dA)
    if da is not None:
        for i, da_i in zip(present, da.split(ranks, 0), strict=True):
            if need_lora[i]:
                grads[i] = grads[i]._replace(d_lora_a=da_i.to(members[i].lora_a.dtype).contiguous())
    return dx, grads
