"""``patch(model)`` / ``unpatch(model)``: make every PEFT LoRA layer of a model CoTo-gated, and undo it.

The pass swaps each LoRA layer's class for a gated subclass of it (``coto_kernels.layers``), takes over the
input-gradient hooks of gradient checkpointing (``coto_kernels.checkpointing``) and hands the layers to a
``CoToController``. Parameters, buffers, ``state_dict`` keys and PEFT's own attributes are untouched, so
``save_pretrained`` writes exactly what vanilla PEFT writes, and ``unpatch`` restores the original classes.
"""

from __future__ import annotations

import warnings

from peft.tuners.lora import LoraLayer
from torch import nn

from . import distributed
from .checkpointing import take_over_input_grads
from .controller import CoToController
from .functional import BACKENDS, triton_available
from .layers import CoToLayerMixin, gated_class, static_fallback_reason, strip_patch_attributes
from .schedule import Schedule

# Where ``patch`` keeps the controller (and the undo actions) in the patched model's ``__dict__``.
CONTROLLER_KEY = "coto_controller"
UNDO_KEY = "_coto_undo"


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")}


# -- public API --------------------------------------------------------------------------------------------------


def patch(
    model: nn.Module,
    *,
    total_steps: int | None = None,
    initial_p: float = 0.1,
    final_p: float = 1.0,
    stage1_ratio: float = 0.75,
    schedule: Schedule = "linear",
    granularity: str = "layer",
    seed: int | None = None,
    backend: str = "auto",
) -> CoToController:
    """Gate every PEFT LoRA layer of ``model`` with CoTo and fuse the ones the kernels cover.

    Args:
        model: a ``peft.PeftModel`` or any module holding PEFT LoRA layers.
        total_steps: optimizer steps of the run (the Trainer callback fills it in); needed before ``step()``.
        initial_p, final_p, stage1_ratio: the schedule p(k) = min(final_p, initial_p + (final_p - initial_p)
            * k / ceil(total_steps * stage1_ratio)), as in the authors' callback.
        schedule: ``"linear"``, ``"sine"``, ``"exponential"``, ``"off"`` (p = 1 always: plain fused LoRA) or a
            callable ``fn(step, total_steps) -> p``.
        granularity: ``"layer"`` (one gate per transformer block) or ``"module"`` (one per adapted module).
        seed: seed of the gate sampler (default: drawn from torch's default generator).
        backend: ``"auto"`` (Triton on CUDA tensors, PyTorch elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        The ``CoToController``; also stored as ``model.coto_controller``.
    """
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
    controller = CoToController(
        layers, total_steps=total_steps, initial_p=initial_p, final_p=final_p, stage1_ratio=stage1_ratio,
        schedule=schedule, granularity=granularity, seed=seed,
    )
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
    undo.append(model.register_forward_pre_hook(distributed.training_guard(controller)).remove)
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
