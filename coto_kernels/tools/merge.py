"""Merging LoRA adapters of the same model: linear fusion of the factors, or the exact ensemble of the products.

Given adapters ``i = 1..n`` with factors ``A_i`` (r_i x K), ``B_i`` (N x r_i), scalings ``s_i`` for a module and
weights ``w_i`` (default ``1/n``; they need not sum to one, e.g. for task arithmetic):

* ``"fusion"`` (the paper's linear fusion: average the factors)::

      A = sum_i w_i A_i,   B = sum_i w_i (s_i / s) B_i,   update = s B A = (sum_i w_i s_i B_i)(sum_j w_j A_j)

  It needs equal ranks. With equal scalings (the usual case) ``s = s_i`` and this is the plain weighted average
  of A and of B. The cross terms ``w_i w_j s_i B_i A_j`` (i != j) are what makes fusion of independently
  trained adapters lossy: their bases are not aligned.
* ``"ensemble"`` (average the products, exact as a rank-sum adapter)::

      A = [A_1; A_2; ...; A_n]   ((sum_i r_i) x K),   B = [w_1 (s_1/s) B_1, ..., w_n (s_n/s) B_n]   (N x sum_i r_i)
      update = s B A = sum_i w_i s_i B_i A_i

  The rank is ``sum_i r_i``; the saved ``LoraConfig`` gets ``r = sum_i r_i`` and ``lora_alpha = s * r`` so
  PEFT's ``lora_alpha / r`` is ``s``.

``s`` is the common scaling of the inputs when they agree, else 1 (the scalings are folded into B). Other saved
entries (``modules_to_save``, e.g. a classification head) are averaged with the same weights in both methods;
for a linear head ``logits = W h + b`` that is the weighted average of the heads' logits for a given ``h``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .adapter import LoraAdapter
from .checks import finite

METHODS = ("fusion", "ensemble")

AdapterLike = LoraAdapter | nn.Module | str | os.PathLike


def as_adapter(obj: AdapterLike, adapter_name: str = "default") -> LoraAdapter:
    """A ``LoraAdapter`` from an adapter, a ``PeftModel`` or a saved adapter folder."""
    if isinstance(obj, LoraAdapter):
        return obj
    if isinstance(obj, nn.Module):
        return LoraAdapter.from_model(obj, adapter_name)
    return LoraAdapter.from_pretrained(obj)


def merge_adapters(
    adapters: Sequence[AdapterLike],
    weights: Sequence[float] | None = None,
    method: str = "fusion",
) -> LoraAdapter:
    """Merge ``adapters`` (same modules and shapes) with ``weights`` by ``"fusion"`` or ``"ensemble"``.

    The result is a ``LoraAdapter``: ``save_pretrained(folder)`` writes a folder vanilla PEFT loads; a fusion
    result with the inputs' config also loads into one of the input models with ``load_into``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    items = [as_adapter(a) for a in adapters]
    if not items:
        raise ValueError("nothing to merge")
    w = [1.0 / len(items)] * len(items) if weights is None else [finite(f"merge weight {i}", x)
                                                                  for i, x in enumerate(weights)]
    if len(w) != len(items):
        raise ValueError(f"{len(items)} adapters but {len(w)} weights")
    first = items[0]
    for i, other in enumerate(items[1:], start=1):
        if other.modules != first.modules:
            differ = sorted(set(other.modules) ^ set(first.modules))[:3] or ["(same modules, other order)"]
            raise ValueError(f"adapters 0 and {i} adapt different modules, e.g. {differ}; merge adapters of the "
                             "same model and targets")
        if set(other.extra) != set(first.extra):
            raise ValueError(f"adapters 0 and {i} save different extra entries (modules_to_save): "
                             f"{sorted(set(other.extra) ^ set(first.extra))[:3]}")

    A, B, scaling = {}, {}, {}
    for m in first.modules:
        scalings = [a.scaling[m] for a in items]
        s = scalings[0] if all(math.isclose(x, scalings[0], rel_tol=1e-9) for x in scalings) else 1.0
        factors = [wi * si / s for wi, si in zip(w, scalings)]
        if method == "fusion":
            shapes = {(tuple(a.A[m].shape), tuple(a.B[m].shape)) for a in items}
            if len(shapes) != 1:
                raise ValueError(f"fusion needs equal shapes; {m} has {sorted(shapes)} (use method='ensemble')")
            A[m] = _weighted([a.A[m] for a in items], w)
            B[m] = _weighted([a.B[m] for a in items], factors)
        else:
            shapes = {(a.A[m].shape[1], a.B[m].shape[0]) for a in items}
            if len(shapes) != 1:
                raise ValueError(f"ensemble needs equal (in, out) features; {m} has {sorted(shapes)}")
            A[m] = torch.cat([a.A[m] for a in items], dim=0)
            B[m] = torch.cat([(f * a.B[m].double()).to(a.B[m].dtype) for f, a in zip(factors, items)], dim=1)
        scaling[m] = s
    extra = {}
    for key, value in first.extra.items():
        values = [a.extra[key] for a in items]
        if value.is_floating_point():
            extra[key] = _weighted(values, w)
        elif all(torch.equal(value, v) for v in values):
            extra[key] = value.clone()
        else:
            raise ValueError(f"cannot average the non-float entry {key}, and the adapters disagree on it")
    return LoraAdapter(A=A, B=B, scaling=scaling, config=first.config, extra=extra)


def interpolate(a: AdapterLike, b: AdapterLike, lam: float, method: str = "fusion") -> LoraAdapter:
    """``merge_adapters([a, b], [1 - lam, lam], method)``: lam = 0 is ``a``, lam = 1 is ``b``."""
    lam = finite("lam", lam)
    return merge_adapters([a, b], [1.0 - lam, lam], method)


def interpolation_curve(
    a: AdapterLike,
    b: AdapterLike,
    evaluate: Callable[[LoraAdapter], float],
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    method: str = "fusion",
) -> list[tuple[float, float]]:
    """``[(lam, evaluate(interpolate(a, b, lam, method))) for lam in lambdas]``."""
    a, b = as_adapter(a), as_adapter(b)
    return [(float(lam), float(evaluate(interpolate(a, b, lam, method)))) for lam in lambdas]


def _weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(float(wi) * t.double() for wi, t in zip(weights, tensors))
    return total.to(tensors[0].dtype)
