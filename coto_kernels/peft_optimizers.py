"""PEFT's own optimizers under CoTo's gate.

PEFT's LoRA-FA optimizer (``peft.optimizers.create_lorafa_optimizer``) updates each adapter as an (A, B) pair and
reads ``B.grad`` unconditionally; CoTo leaves a gated-off adapter without a gradient (grad stays None), so its
step raised a ``TypeError``. ``install`` registers a global optimizer step pre-hook that, for LoRA-FA optimizers
only, hides from the param groups, for the duration of the step, the pairs of the adapters that are off this step
and have no gradient (a post-hook, and the next pre-hook should a step raise, puts them back): those adapters get
no update and their optimizer state does not advance, as a standard optimizer skips parameters without a
gradient. A gated-off adapter that does hold a gradient (zeros from ``zero_grad(set_to_none=False)`` or a
compiled graph, or one set by hand) is updated, as a standard optimizer would, unless the optimizer was given to
``controller.attach_optimizer``: that clears those gradients (after this global hook: torch runs global hooks
first), so then every gated-off pair is hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .controller import clears_inactive_grads, inactive_adapter_parameters

__all__ = ["install"]

_HIDDEN = "_coto_hidden_lora_pairs"  # param-group key holding the full lists while pairs are hidden
_PARALLEL_KEYS = ("params", "names", "scaling_factors")  # LoRA-FA's per-parameter lists in a group
_installed = False


def _is_lorafa(optimizer: torch.optim.Optimizer) -> bool:
    cls = type(optimizer)
    return cls.__name__ == "LoraFAOptimizer" and cls.__module__.startswith("peft.")


def _adapter_prefix(name: str) -> str | None:
    """``...lin0.`` for ``...lin0.lora_B.default.weight`` (how LoRA-FA pairs A with B), None for other params."""
    at = name.find("lora")
    return name[:at] if at >= 0 else None


def _restore(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        full = group.pop(_HIDDEN, None)
        if full is not None:
            group.update(full)


def _hide_inactive_pairs(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _is_lorafa(optimizer):
        return
    _restore(optimizer)  # a step that raised left its pairs hidden
    cleared = clears_inactive_grads(optimizer)
    inactive = {id(p) for p in inactive_adapter_parameters() if cleared or p.grad is None}
    if not inactive:
        return
    for group in optimizer.param_groups:
        names = group.get("names")
        if names is None:
            continue
        off = {_adapter_prefix(n) for p, n in zip(group["params"], names) if id(p) in inactive} - {None}
        keep = [i for i, n in enumerate(names) if _adapter_prefix(n) not in off]
        if len(keep) == len(names):
            continue
        full = {key: group[key] for key in _PARALLEL_KEYS if isinstance(group.get(key), list)}
        group[_HIDDEN] = full
        for key, values in full.items():
            group[key] = [values[i] for i in keep]


def _put_back(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if _is_lorafa(optimizer):
        _restore(optimizer)


def install() -> None:
    """Register the hooks once per process (``patch`` calls this)."""
    global _installed
    if not _installed:
        register_optimizer_step_pre_hook(_hide_inactive_pairs)
        register_optimizer_step_post_hook(_put_back)
        _installed = True
