"""Adapter groups and the CoTo gate sampler.

A group is the unit CoTo switches on or off together. By default it is one transformer block: every adapter
whose module path shares the prefix up to the block's index (``...layers.7.self_attn.q_proj`` and
``...layers.7.mlp.up_proj`` are both in ``...layers.7``). Two stacks (an encoder and a decoder) have different
prefixes, so different groups. An adapter outside any indexed block is a group of its own. With
``granularity="module"`` every adapted module is its own group.

The sampler is stateless in the step: the gates of step ``k`` are a function of ``(seed, k)`` only, so every
process that shares the seed draws the same gates (data-parallel ranks agree by construction) and a resumed
run continues the same sequence without storing a generator state.
"""

from __future__ import annotations

import re

import torch

from .config import GRANULARITIES

_INDEX = re.compile(r"^\d+$")


def block_prefix(module_name: str) -> str | None:
    """The module path up to and including the first numeric component (the block index), or None.

    The first index is the outer ``ModuleList`` of blocks; later indices are inside the block (T5's
    ``block.2.layer.0``, MoE experts ``layers.3.experts.5``) and must not split it.
    """
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return None


def natural_key(name: str) -> list:
    """Sort key comparing the numeric parts of a module path as numbers (``layers.10`` after ``layers.9``)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _outermost_adapted(name: str, adapted: set[str]) -> str:
    """The outermost adapted module containing ``name`` (itself if none does).

    A LoRA layer nested in another one cannot be switched on its own: PEFT's ``MultiheadAttention`` adapts its
    ``out_proj`` by a nested ``lora.Linear`` whose delta it merges itself when on, and whose weight the base
    attention reads directly when off. So a nested layer is in its container's group."""
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in adapted), name)


def group_names(module_names: list[str], granularity: str = "layer") -> tuple[list[str], list[int]]:
    """Assign each adapted module to a group.

    A layer nested in another adapted layer joins that layer's group (``_outermost_adapted``).
    Returns ``(groups, index)``: the sorted group names (numeric parts compared as numbers, never module
    order) and, for each entry of ``module_names``, the index of its group.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    adapted = set(module_names)
    outer = [_outermost_adapted(name, adapted) for name in module_names]
    if granularity == "module":
        keys = outer
    else:
        keys = [block_prefix(name) or name for name in outer]
    groups = sorted(set(keys), key=natural_key)
    position = {g: i for i, g in enumerate(groups)}
    return groups, [position[k] for k in keys]


def _mix(seed: int, step: int, attempt: int) -> int:
    """SplitMix64 of (seed, step, attempt): decorrelated generator seeds for neighbouring steps."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + attempt * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def draw_gates(num_groups: int, p: float, seed: int, step: int) -> list[bool]:
    """Draw one Bernoulli(p) gate per group for optimizer step ``step``, redrawn until one is on.

    This is the authors' rejection sampling. At p = 0 it degenerates to exactly one group on, chosen
    uniformly, which is also the limit of the rejection sampler as p -> 0.
    """
    if num_groups <= 0:
        raise ValueError("CoTo needs at least one adapter group")
    if not 0.0 <= p <= 1.0:  # NaN fails this too: with p = NaN no gate is ever drawn on and the loop never ends
        raise ValueError(f"draw_gates needs p in [0, 1], got {p}")
    if p >= 1.0:
        return [True] * num_groups
    generator = torch.Generator().manual_seed(_mix(seed, step, 0))
    if p <= 0.0:
        chosen = int(torch.randint(num_groups, (1,), generator=generator))
        return [i == chosen for i in range(num_groups)]
    while True:
        gates = torch.rand(num_groups, generator=generator) < p
        if bool(gates.any()):
            return gates.tolist()


def random_seed() -> int:
    """A fresh sampler seed from torch's default generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2**62, (1,)))
