"""DoRA layers that read the same input (q/k/v, gate/up), computed as one group by BLAS, without dropout.

Per member i, with c_i = m_i / n_i (n_i its detached row norm) and S = X [A_1; ...; A_n]^T = [S_1 | ... | S_n]
(the single DoRA layer's math, ``interface``, member by member)::

    Z_i = X W_i^T + s_i (S_i B_i^T + lora_bias_i)        Y_i = bias_i + c_i * Z_i

    G_i = c_i * dY_i, then LoRA's group backward on the G_i (``lora_group``): dX = sum_i G_i W_i + dS A accumulated
    in place into one tensor, dA = dS^T X in one product, dB_i = s_i G_i^T S_i, d_lora_bias_i = s_i sum_rows(G_i);
    d_bias_i = sum_rows(dY_i), dm_i = sum_rows(dY_i * Z_i) / n_i (from the saved Y_i or Z_i, as ``dora_torch``).

What the group saves over separate layers is LoRA's group saving: X is read once for all the S_i and once for the
dA_i, and dX is one tensor; each member's forward after S and its G_i / dm_i pass are the single layer's own
(``dora_torch.forward_from_down``, the backend's ``scale_dy``), so results equal the separate calls up to the
summation order. Dropout has no group form here (DoRA's dropout path runs a second base product per member); such
layers run one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import lora_group
from .dora_torch import ScaleDy, column_scale, forward_from_down, magnitude_grad
from .interface import DoraGrads, weight_nk

__all__ = ["DoraGroupMember", "group_backward", "group_forward"]


class DoraGroupMember(NamedTuple):
    """One DoRA layer of a group: ``dora_linear``'s operands and scalars, the row norm n computed by the caller."""

    weight: Tensor
    bias: Tensor | None
    lora_a: Tensor
    lora_b: Tensor
    lora_bias: Tensor | None
    magnitude: Tensor
    norm: Tensor
    scaling: float
    weight_is_kn: bool = False

    def as_lora(self) -> lora_group.GroupMember:
        return lora_group.GroupMember(self.weight, self.bias, self.lora_a, self.lora_b, self.lora_bias, self.scaling,
                                      self.weight_is_kn)


def _ranks(members: Sequence[DoraGroupMember]) -> list[int]:
    return [m.lora_a.shape[0] for m in members]


def group_forward(
    x: Tensor, members: Sequence[DoraGroupMember], *, save_z: Sequence[bool]
) -> tuple[list[Tensor], Tensor, list[Tensor | None]]:
    """``([Y_1, ..., Y_n], S, [Z_1 or None, ...])`` for 2-D ``x``; Z_i (``save_z[i]``: member i's dm is needed)
    only where Y_i cannot give dm (a bias), as ``dora_torch.dora_forward``."""
    s = x @ torch.cat([m.lora_a for m in members]).t()
    ys, zs = [], []
    for m, s_i, keep_z in zip(members, s.split(_ranks(members), 1), save_z, strict=True):
        y, z = forward_from_down(x, weight_nk(m.weight, m.weight_is_kn), m.bias, s_i, m.lora_b, m.lora_bias,
                                 column_scale(m.magnitude, m.norm), m.scaling, keep_z)
        ys.append(y)
        zs.append(z)
    return ys, s, zs


def group_backward(
    dys: Sequence[Tensor | None], x: Tensor, saved: Sequence[Tensor | None], members: Sequence[DoraGroupMember],
    s: Tensor, *, need_dx: bool, need_lora: Sequence[bool], need_bias: Sequence[bool],
    need_lora_bias: Sequence[bool], need_magnitude: Sequence[bool], from_z: Sequence[bool], scale_dy: ScaleDy,
) -> tuple[Tensor | None, list[DoraGrads]]:
    """``(dX, per-member DoraGrads with dx None)`` for 2-D contiguous ``dys``. ``saved[i]``: member i's Z
    (``from_z[i]``) or output Y, for its dm; ``scale_dy``: the backend's G = c * dY pass. A None dY_i (that output
    unused) gives its member no gradient at all."""
    gs: list[Tensor | None] = []
    dots: list[Tensor | None] = []
    for dy, m, saved_i, need_m in zip(dys, members, saved, need_magnitude, strict=True):
        if dy is None:
            gs.append(None)
            dots.append(None)
            continue
        g, dots_i = scale_dy(dy, column_scale(m.magnitude, m.norm), saved_i if need_m else None)
        gs.append(g)
        dots.append(dots_i)
    dx, lora_grads = lora_group.group_backward(
        gs, x, [m.as_lora() for m in members], s, need_dx=need_dx, need_lora=need_lora,
        need_bias=[False] * len(members), need_lora_bias=need_lora_bias,
    )
    grads = []
    for i, (dy, m, s_i) in enumerate(zip(dys, members, s.split(_ranks(members), 1), strict=True)):
        if dy is None:
            grads.append(DoraGrads(None, None, None, None, None, None))
            continue
        d_magnitude = None
        if need_magnitude[i]:
            d_magnitude = magnitude_grad(dots[i], dy, x, weight_nk(m.weight, m.weight_is_kn), m.bias, m.lora_b,
                                         m.lora_bias, m.magnitude, m.norm, s_i, from_z[i], m.scaling)
        g = lora_grads[i]
        grads.append(DoraGrads(None, g.d_lora_a, g.d_lora_b, dy.sum(0) if need_bias[i] else None, g.d_lora_bias,
                               d_magnitude))
    return dx, grads
