"""Gradient checkpointing under CoTo: keep the backward truncation below the lowest active adapter.

PEFT and Transformers call ``enable_input_require_grads()``, a hook that makes the embedding output require
grad so reentrant checkpointing sees a grad-requiring input. It also makes every block below the lowest active
adapter run its backward. While patched we replace it by a pre-hook on each adapted block that marks the
block's hidden-state input as requiring grad only when the block has an active adapter and is checkpointed
reentrantly. Transformers' ``GradientCheckpointingLayer`` checkpoints ``forward`` inside ``__call__``, so the
pre-hook runs outside the checkpoint, where it must. Blocks of other kinds keep the embedding hook (correct,
but without the truncation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .gates import block_prefix

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers < 4.52 checkpoints inside the model's loop
    GradientCheckpointingLayer = None

# Names of the forward hooks Transformers' and PEFT's ``enable_input_require_grads`` register.
INPUT_GRAD_HOOK_NAMES = ("make_inputs_require_grads", "make_inputs_require_grad")


def _checkpoints_reentrantly(block: nn.Module) -> bool:
    if not (getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()):
        return False
    func = getattr(block, "_gradient_checkpointing_func", None)
    return getattr(func, "keywords", {}).get("use_reentrant", True) is not False


def _input_grad_pre_hook(layers: list[nn.Module]) -> Callable:
    def hook(block: nn.Module, args: tuple, kwargs: dict):
        if not _checkpoints_reentrantly(block) or not any(layer.coto_is_on() for layer in layers):
            return None
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and not args[0].requires_grad:
            args = (args[0].detach().requires_grad_(),) + tuple(args[1:])
        hidden = kwargs.get("hidden_states")
        if torch.is_tensor(hidden) and hidden.is_floating_point() and not hidden.requires_grad:
            kwargs = {**kwargs, "hidden_states": hidden.detach().requires_grad_()}
        return args, kwargs

    return hook


def _pretrained_models(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if callable(getattr(type(m), "enable_input_require_grads", None))]


def take_over_input_grads(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[Callable[[], None]]:
    """Install the block pre-hooks and neutralise ``enable_input_require_grads``; return the undo actions.

    ``layers`` are the gated LoRA layers by qualified name (they provide ``coto_is_on()``).
    """
    blocks: dict[str, list[nn.Module]] = {}
    for name, layer in layers.items():
        prefix = block_prefix(name)
        if prefix is not None:
            blocks.setdefault(prefix, []).append(layer)
    block_modules = {prefix: model.get_submodule(prefix) for prefix in blocks}
    if not blocks or GradientCheckpointingLayer is None or not all(
        isinstance(b, GradientCheckpointingLayer) for b in block_modules.values()
    ):
        return []
    undo: list[Callable[[], None]] = []
    for prefix, block in block_modules.items():
        handle = block.register_forward_pre_hook(_input_grad_pre_hook(blocks[prefix]), with_kwargs=True)
        undo.append(handle.remove)
    for pretrained in _pretrained_models(model):
        had_hook = bool(getattr(pretrained, "_require_grads_hooks", None)) or hasattr(pretrained, "_require_grads_hook")
        if had_hook:
            pretrained.disable_input_require_grads()
        requested = {"on": had_hook}

        def enable(requested=requested):
            requested["on"] = True

        def disable(requested=requested):
            requested["on"] = False

        pretrained.enable_input_require_grads = enable
        pretrained.disable_input_require_grads = disable

        def restore(pretrained=pretrained, requested=requested):
            del pretrained.enable_input_require_grads
            del pretrained.disable_input_require_grads
            if requested["on"]:
                pretrained.enable_input_require_grads()

        undo.append(restore)
    # Input-grad hooks no handle tracks any more (Transformers' gradient_checkpointing_enable and PEFT both call
    # enable_input_require_grads, the second call overwrites the first one's handle; PEFT's own fallback hook):
    # removed as well while patched, put back by unpatch.
    orphans = [(m, key, fn) for m in model.modules() for key, fn in list(m._forward_hooks.items())
               if getattr(fn, "__name__", "") in INPUT_GRAD_HOOK_NAMES]
    for m, key, _ in orphans:
        del m._forward_hooks[key]
    undo.append(lambda: [m._forward_hooks.__setitem__(key, fn) for m, key, fn in orphans])
    return undo
