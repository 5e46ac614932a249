"""``patch(model)`` / ``unpatch(model)``: make every PEFT LoRA layer of a model CoTo-gated, and undo it.

The pass swaps each LoRA layer's class for a gated subclass of it (``coto_kernels.layers``), takes over the
input-gradient hooks of gradient checkpointing (``coto_kernels.checkpointing``) and hands the layers to a
``CoToController``. Parameters, buffers, ``state_dict`` keys and PEFT's own attributes are untouched, so
``save_pretrained`` writes exactly what vanilla PEFT writes, and ``unpatch`` restores the original classes.
"""

from __future__ import annotations

import warnings
from typing import Any

from peft.tuners.lora import LoraLayer
from torch import nn

from . import distributed
from .checkpointing import take_over_input_grads
from .config import CoToConfig
from .controller import CoToController
from .functional import BACKENDS, triton_available
from .gates import random_seed
from .layers import CoToLayerMixin, gated_class, static_fallback_reason, strip_patch_attributes

# Where ``patch`` keeps the controller (and the undo actions) in the patched model's ``__dict__``.
CONTROLLER_KEY = "coto_controller"
UNDO_KEY = "_coto_undo"


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")}


# -- public API --------------------------------------------------------------------------------------------------


def patch(
    model: nn.Module,
    config: CoToConfig | None = None,
    *,
    backend: str = "auto",
    check_gates: bool = True,
    **options: Any,
) -> CoToController:
    """Gate every PEFT LoRA layer of ``model`` with CoTo and fuse the ones the kernels cover.

    Args:
        model: a ``peft.PeftModel`` or any module holding PEFT LoRA layers.
        config: the run's ``CoToConfig`` (schedule, grouping, seed, total steps); default ``CoToConfig()``.
        **options: ``CoToConfig`` fields as keywords, building or overriding ``config``: ``total_steps`` (the
            Trainer callback fills it in; needed before ``step()``), ``initial_p``, ``final_p``,
            ``stage1_ratio``, ``schedule``, ``granularity``, ``seed`` (default: drawn from torch's default
            generator, rank 0's under ``torch.distributed``). Unknown names are a ``TypeError``.
        backend: ``"auto"`` (Triton on CUDA tensors, PyTorch elsewhere), ``"torch"`` or ``"triton"``.
        check_gates: under DDP/FSDP, check at the first training forward that every rank holds the same gates
            (one all-gather that every rank must reach); ``False`` skips that check.

    Returns:
        The ``CoToController``; also stored as ``model.coto_controller``.
    """
    config = CoToConfig.build(config, **options)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    distributed.check_not_wrapped(model)
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    if CONTROLLER_KEY in model.__dict__ or any(isinstance(m, CoToLayerMixin) for m in model.modules()):
        raise RuntimeError("this model is already patched by coto_kernels; call coto_kernels.unpatch(model) first")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "coto_kernels.patch found no PEFT LoRA layers in this model; wrap it with peft.get_peft_model "
            "(LoraConfig) first"
        )
    if config.seed is None:  # every rank must draw the same gates: rank 0's seed under torch.distributed
        config = CoToConfig.build(config, seed=distributed.broadcast_seed(random_seed()))
    controller = CoToController(layers, config)
    unfused = {name: reason for name, m in layers.items() if (reason := static_fallback_reason(m)) is not None}
    for name, layer in layers.items():
        layer.__class__ = gated_class(type(layer))
        layer.coto_name = name
        layer.coto_backend = backend
        if name in unfused:  # already named in the patch-time warning below
            layer.__dict__["_coto_warned"] = {unfused[name]}
    controller.redraw()  # hand the initial gates to the now-gated layers
    if unfused:
        listing = "; ".join(f"{name} ({reason})" for name, reason in unfused.items())
        warnings.warn(
            f"CoTo gates these LoRA layers through PEFT's unfused forward: {listing}", stacklevel=2
        )
    model.__dict__[CONTROLLER_KEY] = controller
    undo = take_over_input_grads(model, layers)
    undo.append(model.register_forward_pre_hook(distributed.training_guard(controller, check_gates)).remove)
    model.__dict__[UNDO_KEY] = undo
    return controller


def unpatch(model: nn.Module) -> None:
    """Undo ``patch``: original PEFT classes, hooks and ``enable_input_require_grads`` restored."""
    if CONTROLLER_KEY not in model.__dict__:
        raise RuntimeError("this model is not patched by coto_kernels (call unpatch on the model given to patch)")
    for undo in model.__dict__.pop(UNDO_KEY):
        undo()
    del model.__dict__[CONTROLLER_KEY]
    for module in model.modules():
        if isinstance(module, CoToLayerMixin):
            strip_patch_attributes(module)
