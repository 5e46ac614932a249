"""Evaluation that starts at the first encoder block whose input it has not seen before.

The paper experiment pushes the same test batches through the same frozen BERT body a few hundred times (pruning
selections, merges, 2^6 Shapley coalitions). Whatever happens inside a block, its input depends only on the batch
and on what the blocks before it did: their adapter state. So the input of block d is cached under
``(batch key, states[:d])``, where ``states[i]`` is a hashable description of block i's adapters (``None``: all
off, the frozen base), and an evaluation whose first d states were seen before starts at block d with that input.

Where it pays: pruning selections that switch off the first blocks start from the base model's cached states
(adapter-independent, kept across adapters); the Shapley coalitions, enumerated with block 0 as the most
significant bit, share their prefixes: 2^(L+1) - 2 block evaluations instead of L * 2^L (126 against 384 for
L = 6). The result is bit-identical to a full forward (the same ops on the same tensors); the tests check this.

Works on Hugging Face encoders with an ``embeddings`` module and an ``encoder.layer`` ModuleList (BERT and its
relatives); starting at block d replaces the embeddings' output by the cached input and runs
``encoder.layer[d:]``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

__all__ = ["BlockReplay"]


def _embeddings_and_blocks(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The ``embeddings`` module and the encoder owning the ``layer`` ModuleList (exactly one pair)."""
    pairs = [(module.embeddings, module.encoder) for module in model.modules()
             if isinstance(getattr(module, "embeddings", None), nn.Module)
             and isinstance(getattr(getattr(module, "encoder", None), "layer", None), nn.ModuleList)]
    if len(pairs) != 1:
        raise ValueError(f"BlockReplay needs one embeddings + encoder.layer pair in {type(model).__name__}, "
                         f"found {len(pairs)}")
    return pairs[0]


class BlockReplay:
    """Logits of ``model`` on a batch, starting at the deepest block whose input is cached (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.embeddings, self.encoder = _embeddings_and_blocks(model)
        self.all_blocks = self.encoder.layer
        self.blocks = list(self.all_blocks)
        self.cache: dict[tuple, Tensor] = {}
        self.block_runs = 0  # blocks actually evaluated (for the savings figure)

    def index_of(self, module: nn.Module) -> int:
        """The position of ``module`` among the encoder blocks."""
        for i, block in enumerate(self.blocks):
            if block is module:
                return i
        raise ValueError(f"{type(module).__name__} is not one of the encoder's blocks")

    @torch.no_grad()
    def logits(self, batch_key: Hashable, batch: dict[str, Tensor], states: Sequence[Hashable]) -> Tensor:
        """``model(**batch).logits`` with the model already in the adapter state ``states`` describes."""
        states = tuple(states)
        if len(states) != len(self.blocks):
            raise ValueError(f"{len(states)} block states for {len(self.blocks)} blocks")
        start = next((d for d in range(len(self.blocks) - 1, 0, -1) if (batch_key, states[:d]) in self.cache), 0)
        hooks = [block.register_forward_pre_hook(partial(self._store, batch_key, states[:k]), with_kwargs=True)
                 for k, block in enumerate(self.blocks) if k > start]
        if start:
            cached = self.cache[(batch_key, states[:start])]
            hooks.append(self.embeddings.register_forward_hook(lambda module, args, output: cached))
            self.encoder.layer = nn.ModuleList(self.blocks[start:])
        try:
            logits = self.model(**batch).logits
        finally:
            self.encoder.layer = self.all_blocks
            for hook in hooks:
                hook.remove()
        self.block_runs += len(self.blocks) - start
        return logits

    def _store(self, batch_key: Hashable, prefix: tuple, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.cache[(batch_key, prefix)] = hidden.detach()

    def keep_only(self, states: Sequence[Hashable]) -> None:
        """Drop every cached input except the base model's (all states ``None``) and those on the way to
        ``states``: what a walk in prefix order (the Shapley enumeration) still needs."""
        states = tuple(states)
        self.cache = {key: value for key, value in self.cache.items()
                      if all(s is None for s in key[1]) or key[1] == states[:len(key[1])]}

    def forget_adapters(self) -> None:
        """Drop every cached input that depends on an adapter (call when the model's adapter weights change)."""
        self.keep_only(())
