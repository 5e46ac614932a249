"""Shapley values of LoRA adapters (per block or per module) by the multilinear extension, as in the CoTo paper.

Players are adapter groups; a coalition ``S`` is evaluated with the adapters of ``S`` on and all others off
(``coto_kernels.tools.pruned``), ``v(S)`` being a user metric (accuracy, minus the loss, ...). The Shapley value
of player ``i`` among ``n`` is

    phi_i = sum_{S not containing i} |S|! (n - |S| - 1)! / n!  [v(S + i) - v(S)]
          = integral_0^1  E_{R ~ Bernoulli(p)^(n-1)} [v(R + i) - v(R)]  dp            (multilinear extension)

where ``R`` draws every *other* player independently with probability ``p`` (Owen, 1972: the Beta(|S|+1, n-|S|)
integral of ``p^|S| (1-p)^(n-1-|S|)`` is the Shapley weight). Efficiency: ``sum_i phi_i = v(all) - v(none)``.

Monte Carlo (``shapley_values``): ``m`` samples; sample ``j`` takes ``p_j = (j + u_j) / m`` (``u_j`` uniform: one
draw per stratum of [0, 1]) and ``R_j`` with every player on with probability ``p_j``. For every player
``i`` the marginal ``d_ij = v(R_j + i) - v(R_j - i)`` uses ``R_j``'s draw of the others only, so it is an unbiased
sample of the integrand; one sample costs ``n + 1`` evaluations (``v(R_j)`` is shared). The estimate is
``phi_i = mean_j d_ij`` with standard error ``std_j(d_ij) / sqrt(m)`` (conservative: it ignores the
stratification, which only lowers the variance); the same for ``sum_i d_ij`` gives the standard error of
``sum_i phi_i``. Coalitions are memoised, so repeated draws cost nothing (``n_evaluations`` counts distinct
ones). ``exact_shapley`` enumerates all ``2^n`` coalitions for small ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..benchmarking import save_plot
from ..gates import block_prefix
from .checks import integer
from .prune import adapter_blocks, lora_modules, projection_of, pruned

ValueFn = Callable[[frozenset], float]


@dataclass
class ShapleyResult:
    """Monte Carlo Shapley estimate: ``values[i] +- stderr[i]`` for ``players[i]``."""

    players: list[str]
    values: list[float]
    stderr: list[float]
    n_samples: int
    n_evaluations: int
    v_all: float
    v_none: float
    sum_stderr: float

    @property
    def efficiency_gap(self) -> float:
        """``sum(values) - (v_all - v_none)``; zero in expectation, of order ``sum_stderr``."""
        return sum(self.values) - (self.v_all - self.v_none)

    def as_dict(self) -> dict:
        return {**asdict(self), "efficiency_gap": self.efficiency_gap}


class _Memo:
    def __init__(self, value: ValueFn) -> None:
        self.value = value
        self.cache: dict[frozenset, float] = {}

    def __call__(self, coalition: frozenset) -> float:
        if coalition not in self.cache:
            self.cache[coalition] = float(self.value(coalition))
        return self.cache[coalition]


def shapley_values(
    value: ValueFn,
    players: Sequence[str],
    n_samples: int = 32,
    seed: int = 0,
) -> ShapleyResult:
    """Monte Carlo Shapley values of ``players`` for ``value(coalition: frozenset[str]) -> float`` (see the
    module docstring for the estimator); ``n_samples`` samples of ``n + 1`` evaluations each at most."""
    players = list(players)
    if len(set(players)) != len(players) or not players:
        raise ValueError("players must be a non-empty list of distinct names")
    n_samples = integer("n_samples", n_samples, minimum=2)  # two at least, for a standard error
    seed = integer("seed", seed)
    v = _Memo(value)
    n = len(players)
    generator = torch.Generator().manual_seed(seed)
    diffs = torch.zeros(n_samples, n, dtype=torch.float64)
    for j in range(n_samples):
        p = (j + float(torch.rand((), generator=generator, dtype=torch.float64))) / n_samples
        on = (torch.rand(n, generator=generator, dtype=torch.float64) < p).tolist()
        coalition = frozenset(pl for pl, o in zip(players, on) if o)
        v_r = v(coalition)
        for i, player in enumerate(players):
            if on[i]:
                diffs[j, i] = v_r - v(coalition - {player})
            else:
                diffs[j, i] = v(coalition | {player}) - v_r
    root = math.sqrt(n_samples)
    return ShapleyResult(
        players=players,
        values=diffs.mean(0).tolist(),
        stderr=(diffs.std(0, unbiased=True) / root).tolist(),
        n_samples=n_samples,
        n_evaluations=len(v.cache),
        v_all=v(frozenset(players)),
        v_none=v(frozenset()),
        sum_stderr=float(diffs.sum(1).std(unbiased=True) / root),
    )


def exact_shapley(value: ValueFn, players: Sequence[str]) -> list[float]:
    """Exact Shapley values by enumerating all ``2^n`` coalitions (use for ``n`` up to ~12)."""
    players = list(players)
    n = len(players)
    v = _Memo(value)
    phi = [0.0] * n
    for i, player in enumerate(players):
        others = players[:i] + players[i + 1:]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in combinations(others, size):
                s = frozenset(subset)
                phi[i] += weight * (v(s | {player}) - v(s))
    return phi


# -- adapters as players ---------------------------------------------------------------------------------------


def adapter_players(model: nn.Module, granularity: str = "layer", adapter_name: str = "default"
                    ) -> dict[str, list[str]]:
    """``{player: [module paths]}``: one player per block (``"layer"``; modules outside blocks alone) or per
    LoRA module (``"module"``)."""
    modules = list(lora_modules(model, adapter_name))
    if granularity == "module":
        return {m: [m] for m in modules}
    if granularity != "layer":
        raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}")
    players: dict[str, list[str]] = {}
    for m in modules:
        players.setdefault(block_prefix(m) or m, []).append(m)
    return players


def adapter_value_fn(
    model: nn.Module,
    metric: Callable[[nn.Module], float],
    players: Mapping[str, Sequence[str]],
    adapter_name: str = "default",
) -> ValueFn:
    """``v(S) = metric(model)`` evaluated with only the modules of the players in ``S`` switched on."""
    all_modules = [m for ms in players.values() for m in ms]

    def value(coalition: frozenset) -> float:
        on = {m for p in coalition for m in players[p]}
        with pruned(model, [m for m in all_modules if m not in on], adapter_name):
            return float(metric(model))

    return value


def adapter_shapley(
    model: nn.Module,
    metric: Callable[[nn.Module], float],
    *,
    granularity: str = "layer",
    n_samples: int = 32,
    seed: int = 0,
    adapter_name: str = "default",
) -> ShapleyResult:
    """Shapley values of the model's adapters (per block or per module) for ``metric(model) -> float``, e.g.
    the accuracy on a fixed batch set (run under ``torch.no_grad()`` and ``model.eval()``)."""
    players = adapter_players(model, granularity, adapter_name)
    return shapley_values(adapter_value_fn(model, metric, players, adapter_name), list(players), n_samples, seed)


# -- heat map --------------------------------------------------------------------------------------------------


def shapley_grid(result: ShapleyResult, modules: Iterable[str] | None = None
                 ) -> tuple[list[str], list[str], list[list[float]]]:
    """Arrange per-module values as ``(block labels, projection labels, rows)`` (blocks x projections, NaN where
    a block lacks a projection). ``modules`` defaults to ``result.players``."""
    modules = list(modules or result.players)
    value = dict(zip(result.players, result.values))
    blocks = adapter_blocks(modules)
    projections = list(dict.fromkeys(projection_of(m) for m in modules if block_prefix(m) is not None))
    rows = [[math.nan] * len(projections) for _ in blocks]
    for m in modules:
        b = block_prefix(m)
        if b is not None and m in value:
            rows[blocks.index(b)][projections.index(projection_of(m))] = value[m]
    labels = [b.rsplit(".", 1)[-1] for b in blocks]
    return labels, [p.rsplit(".", 1)[-1] if p.count(".") else p for p in projections], rows


def draw_shapley_heatmap(
    plt: Any,
    results: Mapping[str, ShapleyResult],
    title: str = "Shapley value per adapter",
    value_label: str = "Shapley value",
) -> Any:
    """The figure of ``plot_shapley_heatmap`` drawn with ``plt`` (``matplotlib.pyplot``); returns the figure."""
    grids = {name: shapley_grid(r) for name, r in results.items()}
    finite = [x for _, _, rows in grids.values() for row in rows for x in row if not math.isnan(x)]
    vmax = max((abs(x) for x in finite), default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(grids), figsize=(1.2 + 1.6 * len(grids) * 1.6, 3.6), squeeze=False)
    image = None
    for ax, (name, (blocks, projections, rows)) in zip(axes[0], grids.items()):
        image = ax.imshow(rows, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_xticks(range(len(projections)), projections)
        ax.set_yticks(range(len(blocks)), blocks)
        ax.set_xlabel("projection")
        ax.set_ylabel("block")
        ax.set_title(name)
        for y, row in enumerate(rows):
            for x, val in enumerate(row):
                if not math.isnan(val):
                    ax.text(x, y, f"{val:.3f}", ha="center", va="center", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=value_label, shrink=0.9)
    fig.suptitle(title, y=1.03)
    return fig


def plot_shapley_heatmap(
    results: Mapping[str, ShapleyResult],
    path: str | Path,
    title: str = "Shapley value per adapter",
    value_label: str = "Shapley value",
) -> Path | None:
    """One panel per entry of ``results`` (e.g. ``{"LoRA": r1, "CoTo": r2}``), blocks x projections, shared
    colour scale, like the paper's Figure r5. Returns the PNG path, or None when matplotlib is not installed."""
    return save_plot(lambda plt: draw_shapley_heatmap(plt, results, title, value_label), path)
