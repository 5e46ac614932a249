"""Gradient checkpointing under CoTo: keep the backward truncation below the lowest active adapter.

PEFT and Transformers call ``enable_input_require_grads()``, a hook that makes the embedding output require
grad so reentrant checkpointing sees a grad-requiring input. It also makes every block below the lowest active
adapter run its backward. While patched we replace it by a pre-hook on each adapted block that marks the
block's hidden-state input as requiring grad only when the block has an active adapter and is checkpointed
reentrantly. Transformers' ``GradientCheckpointingLayer`` checkpoints ``forward`` inside ``__call__``, so the
pre-hook runs outside the checkpoint, where it must. Blocks of other kinds keep the embedding hook (correct,
but without the truncation).

No state lives in closures: the pre-hook is one module-level function that finds the gated layers through the
block it is registered on, and what the takeover suspends is kept in the ``__dict__`` of the module it belongs
to. So a patched model pickles, a ``copy.deepcopy`` of it hooks its own layers, and ``release_input_grads`` finds
everything to undo by walking the model it is given.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .gates import block_prefix
from .layers import CoToLayerMixin

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers < 4.52 checkpoints inside the model's loop
    GradientCheckpointingLayer = None

# Names of the forward hooks Transformers' and PEFT's ``enable_input_require_grads`` register.
INPUT_GRAD_HOOK_NAMES = ("make_inputs_require_grads", "make_inputs_require_grad")
# In a pretrained model's ``__dict__``: whether ``enable_input_require_grads`` was asked for while patched.
REQUESTED_KEY = "_coto_input_grads_requested"
# In any module's ``__dict__``: the input-grad forward hooks the takeover removed from it, by hook id.
SUSPENDED_KEY = "_coto_suspended_input_grad_hooks"
_INPUT_GRAD_METHODS = ("enable_input_require_grads", "disable_input_require_grads")


def _checkpoints_reentrantly(block: nn.Module) -> bool:
    if not (getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()):
        return False
    func = getattr(block, "_gradient_checkpointing_func", None)
    return getattr(func, "keywords", {}).get("use_reentrant", True) is not False


def _gated_layers(module: nn.Module) -> Iterator[CoToLayerMixin]:
    """The gated LoRA layers under ``module`` (not descending into them: a LoRA layer holds no other)."""
    for child in module.children():
        if isinstance(child, CoToLayerMixin):
            yield child
        else:
            yield from _gated_layers(child)


def input_grad_pre_hook(block: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with kwargs) of an adapted block: its hidden-state input requires grad when the block
    is checkpointed reentrantly and one of its gated layers is on."""
    if not _checkpoints_reentrantly(block) or not any(layer.coto_is_on() for layer in _gated_layers(block)):
        return None
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and not args[0].requires_grad:
        args = (args[0].detach().requires_grad_(),) + tuple(args[1:])
    hidden = kwargs.get("hidden_states")
    if torch.is_tensor(hidden) and hidden.is_floating_point() and not hidden.requires_grad:
        kwargs = {**kwargs, "hidden_states": hidden.detach().requires_grad_()}
    return args, kwargs


def _record_input_grads_request(pretrained: nn.Module, on: bool) -> None:
    """Stands in for ``enable_input_require_grads`` / ``disable_input_require_grads`` while patched."""
    pretrained.__dict__[REQUESTED_KEY] = on


def _pretrained_models(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if callable(getattr(type(m), "enable_input_require_grads", None))]


def _has_pre_hook(block: nn.Module) -> bool:
    return any(hook is input_grad_pre_hook for hook in block._forward_pre_hooks.values())


def take_over_input_grads(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Install the block pre-hooks and neutralise ``enable_input_require_grads`` (undone by ``release``).

    ``layers``: every gated LoRA layer of ``model`` by qualified name. Nothing happens unless each of their
    blocks is a Transformers ``GradientCheckpointingLayer``.
    """
    prefixes = {prefix for name in layers if (prefix := block_prefix(name)) is not None}
    blocks = [model.get_submodule(prefix) for prefix in sorted(prefixes)]
    if not blocks or GradientCheckpointingLayer is None or not all(
        isinstance(b, GradientCheckpointingLayer) for b in blocks
    ):
        return
    for block in blocks:
        if not _has_pre_hook(block):
            block.register_forward_pre_hook(input_grad_pre_hook, with_kwargs=True)
    for pretrained in _pretrained_models(model):
        if REQUESTED_KEY in pretrained.__dict__:
            continue  # already taken over
        had_hook = bool(getattr(pretrained, "_require_grads_hooks", None)) or hasattr(pretrained, "_require_grads_hook")
        if had_hook:
            pretrained.disable_input_require_grads()
        pretrained.__dict__[REQUESTED_KEY] = had_hook
        for method, on in zip(_INPUT_GRAD_METHODS, (True, False)):
            pretrained.__dict__[method] = functools.partial(_record_input_grads_request, pretrained, on)
    # Input-grad hooks no handle tracks any more (Transformers' gradient_checkpointing_enable and PEFT both call
    # enable_input_require_grads, the second call overwrites the first one's handle; PEFT's own fallback hook):
    # suspended as well while patched, put back by ``release_input_grads``.
    for module in model.modules():
        orphans = {key: fn for key, fn in module._forward_hooks.items()
                   if getattr(fn, "__name__", "") in INPUT_GRAD_HOOK_NAMES}
        for key in orphans:
            del module._forward_hooks[key]
        if orphans:
            module.__dict__.setdefault(SUSPENDED_KEY, {}).update(orphans)


def release_input_grads(model: nn.Module) -> None:
    """Undo ``take_over_input_grads`` on ``model``: pre-hooks removed, ``enable_input_require_grads`` restored
    (and re-run when it was asked for while patched), suspended hooks put back."""
    for module in model.modules():
        for key in [key for key, hook in module._forward_pre_hooks.items() if hook is input_grad_pre_hook]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
        module._forward_hooks.update(module.__dict__.pop(SUSPENDED_KEY, {}))
    for pretrained in _pretrained_models(model):
        if REQUESTED_KEY not in pretrained.__dict__:
            continue
        for method in _INPUT_GRAD_METHODS:
            pretrained.__dict__.pop(method, None)
        if pretrained.__dict__.pop(REQUESTED_KEY):
            pretrained.enable_input_require_grads()
