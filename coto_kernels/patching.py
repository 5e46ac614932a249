"""``patch(model)`` / ``unpatch(model)``: make every PEFT LoRA layer of a model CoTo-gated, and undo it.

The pass swaps each LoRA layer's class for a gated subclass of it (``coto_kernels.layers``), takes over the
input-gradient hooks of gradient checkpointing (``coto_kernels.checkpointing``) and hands the layers to a
``CoToController``. Parameters, buffers, ``state_dict`` keys and PEFT's own attributes are untouched, so
``save_pretrained`` writes exactly what vanilla PEFT writes, and ``unpatch`` restores the original classes.

PEFT's own methods that change the set of LoRA layers stay correct on a patched model: the PEFT tuner's
``inject_adapter`` (``add_adapter``, ``load_adapter``) gates the LoRA layers it creates (at once), LoRA layers
added without a tuner (``peft.inject_adapter_in_model`` on a plain module) are gated by a forward pre-hook at
the first training forward of the next optimizer step (``NewLayerWatch``, which walks the model only after a module
was registered somewhere), and
``merge_and_unload()`` / ``unload()`` unpatch first, so the base model they return carries nothing of CoTo.
Everything the patch adds is found again by walking the model (no closures, no undo list), so a patched model
pickles and a ``copy.deepcopy`` of it is an independent patched model.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import distributed, peft_optimizers
from .checkpointing import release_input_grads, take_over_input_grads
from .config import CoToConfig
from .controller import CoToController
from .functional import BACKENDS, triton_available
from .gates import random_seed
from .layers import CoToLayerMixin, gated_class, static_fallback_reason, strip_patch_attributes
from .siblings import SiblingInputs

# Where ``patch`` keeps the controller in the patched model's ``__dict__``.
CONTROLLER_KEY = "coto_controller"
# Where it keeps the model's ``SiblingInputs`` (absent with ``fuse_siblings=False``); every gated layer shares it.
SIBLINGS_KEY = "coto_siblings"
# The PEFT tuner methods ``patch`` wraps (instance attributes of the tuner, removed by ``unpatch``).
_UNPATCHING_TUNER_METHODS = ("merge_and_unload", "unload")
_GATING_TUNER_METHODS = ("inject_adapter",)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")}


def _check_triton_device(layers: Mapping[str, nn.Module]) -> None:
    """``backend="triton"`` runs on CUDA tensors only (or under the Triton CPU interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    for name, layer in layers.items():
        weight = getattr(layer.get_base_layer(), "weight", None)
        if weight is not None and weight.device.type != "cuda":
            raise ValueError(
                f"backend='triton': Triton needs CUDA tensors, but the LoRA layer {name} is on {weight.device}. Move "
                "the model to a GPU before patch, or use backend='auto' (PyTorch off the GPU) or 'torch' (with "
                "TRITON_INTERPRET=1 set before triton is imported, Triton's CPU interpreter runs the kernels: for "
                "tests only)"
            )


def _gate_layers(model: nn.Module, layers: Mapping[str, nn.Module], backend: str) -> None:
    """Swap in the gated classes and warn once, naming the layers that run PEFT's unfused forward."""
    unfused = {name: reason for name, m in layers.items() if (reason := static_fallback_reason(m)) is not None}
    for name, layer in layers.items():
        layer.__class__ = gated_class(type(layer))
        layer.coto_name = name
        layer.coto_backend = backend
        if SIBLINGS_KEY in model.__dict__:
            layer.coto_siblings = model.__dict__[SIBLINGS_KEY]
        if name in unfused:  # already named in the warning below
            layer.__dict__["_coto_warned"] = {unfused[name]}
    if unfused:
        listing = "; ".join(f"{name} ({reason})" for name, reason in unfused.items())
        warnings.warn(f"CoTo gates these LoRA layers through PEFT's unfused forward: {listing}", stacklevel=3)


def _ungated_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in _lora_layers(model).items() if not isinstance(m, CoToLayerMixin)}


def _gate_new_layers(model: nn.Module, backend: str) -> None:
    """Gate the LoRA layers of a patched ``model`` that were added after ``patch``."""
    new = _ungated_lora_layers(model)
    if new:
        controller: CoToController = model.__dict__[CONTROLLER_KEY]
        if backend == "triton":
            _check_triton_device(new)
        _gate_layers(model, new, backend)
        controller.set_layers(_lora_layers(model))  # a wrapped gated layer may have moved (mixed models)
        release_input_grads(model)  # the new layers may sit in blocks of other kinds: take over afresh
        take_over_input_grads(model, _lora_layers(model))


def _inject_and_gate(model: nn.Module, tuner: BaseTuner, backend: str, *args: Any, **kwargs: Any) -> Any:
    """The tuner's ``inject_adapter`` on a patched ``model``: the LoRA layers it creates are gated too."""
    result = type(tuner).inject_adapter(tuner, *args, **kwargs)
    _gate_new_layers(model, backend)
    return result


class _ModuleRegistrations:
    """How many modules this process has registered as a submodule for the first time (in any model).

    Counted by a global module registration hook (``nn.Module.__setattr__`` / ``add_module``: how PEFT puts its
    layers into a model, and how a block holding LoRA layers would be swapped in), installed by the first ``patch``:
    ``NewLayerWatch`` walks a model only when the count has moved since its last walk. Only first registrations
    count: Transformers re-registers its decoder layers at every forward (``self.layers[:n]`` builds a new
    ``ModuleList``), which adds nothing to a model."""

    count = 0
    seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
    installed = False

    @classmethod
    def install(cls, model: nn.Module | None = None) -> None:
        """Install the hook once per process; ``model``'s modules (patched as they are) count as seen."""
        if not cls.installed:
            torch.nn.modules.module.register_module_module_registration_hook(cls._observe)
            cls.installed = True
        if model is not None:
            for module in model.modules():
                with contextlib.suppress(TypeError):  # not weakly referenceable: counted at each registration
                    cls.seen.add(module)

    @classmethod
    def _observe(cls, parent: nn.Module, name: str, submodule: nn.Module) -> None:
        if torch.compiler.is_compiling():  # traced registrations (``self.layers[:n]``) never run; counting them
            return                         # would only make the compiled graph guard on the count
        try:
            if submodule in cls.seen:
                return
            cls.seen.add(submodule)
        except TypeError:  # not weakly referenceable: count it every time
            pass
        cls.count += 1


class NewLayerWatch:
    """Forward pre-hook on the patched model: gates LoRA layers that appeared without a PEFT tuner.

    ``peft.inject_adapter_in_model`` on a plain module creates LoRA layers that no wrapped ``inject_adapter``
    sees. A walk over the model's modules costs ~2.7 ms for a 32-layer Llama with LoRA on every linear (2,665
    modules, 2-core CPU), so it runs at most once per optimizer step (at the first training forward after each
    ``controller.step()``, and after ``patch``), and then only when some module anywhere in the process was
    registered as a submodule for the first time since the last walk (``_ModuleRegistrations``). Layers injected
    in the middle of a step are gated from the next step on; a layer written into a ``_modules`` dict directly,
    past ``nn.Module``'s registration, is not seen. A class, not a closure, so the patched model pickles and
    deep-copies (the hook gets the model as its argument and holds no reference).
    """

    def __init__(self, controller: CoToController, backend: str) -> None:
        self.controller = controller
        self.backend = backend
        self.checked_step: int | None = None
        self.seen_registrations: int | None = None  # None: walk at the first check

    def __setstate__(self, state: dict) -> None:  # unpickled (maybe in a process no patch ran in) or deep-copied
        self.__dict__.update(state, checked_step=None, seen_registrations=None)
        _ModuleRegistrations.install()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not module.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        step = self.controller.global_step
        if step == self.checked_step:
            return
        self.checked_step = step
        if self.seen_registrations == _ModuleRegistrations.count:
            return
        self.seen_registrations = _ModuleRegistrations.count
        if any(isinstance(m, LoraLayer) and not isinstance(m, CoToLayerMixin) for m in module.modules()):
            _gate_new_layers(module, self.backend)


def _unpatch_and_call(model: nn.Module, tuner: BaseTuner, method: str, *args: Any, **kwargs: Any) -> Any:
    """The tuner's ``merge_and_unload`` / ``unload`` on a patched ``model``: unpatch first, so the returned base
    model keeps no CoTo hook and a working ``enable_input_require_grads``."""
    unpatch(model)
    return getattr(tuner, method)(*args, **kwargs)


def _tuners(model: nn.Module) -> list[BaseTuner]:
    return [m for m in model.modules() if isinstance(m, BaseTuner)]


def _wrap_tuner_methods(model: nn.Module, backend: str) -> None:
    for tuner in _tuners(model):
        for method in _UNPATCHING_TUNER_METHODS:
            tuner.__dict__[method] = functools.partial(_unpatch_and_call, model, tuner, method)
        for method in _GATING_TUNER_METHODS:
            tuner.__dict__[method] = functools.partial(_inject_and_gate, model, tuner, backend)


def _unwrap_tuner_methods(model: nn.Module) -> None:
    for tuner in _tuners(model):
        for method in _UNPATCHING_TUNER_METHODS + _GATING_TUNER_METHODS:
            tuner.__dict__.pop(method, None)


def _remove_model_hooks(model: nn.Module) -> None:
    hooks = (distributed.TrainingGuard, NewLayerWatch, SiblingInputs)
    for key in [k for k, hook in model._forward_pre_hooks.items() if isinstance(hook, hooks)]:
        del model._forward_pre_hooks[key]


# -- public API --------------------------------------------------------------------------------------------------


def patch(
    model: nn.Module,
    config: CoToConfig | None = None,
    *,
    backend: str = "auto",
    check_gates: bool = True,
    fuse_siblings: bool = True,
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
        backend: ``"auto"`` (Triton on CUDA tensors, the native kernels on the CPU when built, PyTorch otherwise),
            ``"torch"``, ``"triton"`` or ``"native"``.
        check_gates: under DDP/FSDP, check at the first training forward that every rank holds the same gates
            (one all-gather that every rank must reach); ``False`` skips that check.
        fuse_siblings: fused layers that read the same input one after another (a block's q/k/v, gate/up; found
            by watching the forward, ``coto_kernels.siblings``) compute their LoRA products on that input together
            (``lora_linear_group``; DoRA layers without dropout ``dora_linear_group``): with the BLAS backends
            (``"torch"``, ``"native"``; with dropout ``"native"`` on the CPU), adapters on. Same results up to
            summation order (the same dropout masks); ``False`` computes every layer on its own.

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
        raise RuntimeError(f"this {type(model).__name__} is already patched by coto_kernels (or holds patched "
                           "layers); call coto_kernels.unpatch(model) first")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "coto_kernels.patch found no PEFT LoRA layers in this model; wrap it with peft.get_peft_model "
            "(LoraConfig) first"
        )
    if config.seed is None:  # every rank must draw the same gates: rank 0's seed under torch.distributed
        config = CoToConfig.build(config, seed=distributed.broadcast_seed(random_seed()))
    if backend == "triton":
        _check_triton_device(layers)
    controller = CoToController(layers, config)
    peft_optimizers.install()  # PEFT's LoRA-FA optimizer skips gated-off adapters too
    if fuse_siblings:
        model.__dict__[SIBLINGS_KEY] = SiblingInputs()
        model.register_forward_pre_hook(model.__dict__[SIBLINGS_KEY])  # learnt groups take effect per forward
    _gate_layers(model, layers, backend)
    controller.redraw()  # hand the initial gates to the now-gated layers
    model.__dict__[CONTROLLER_KEY] = controller
    take_over_input_grads(model, layers)
    model.register_forward_pre_hook(distributed.training_guard(controller, check_gates))
    _ModuleRegistrations.install(model)
    model.register_forward_pre_hook(NewLayerWatch(controller, backend))
    _wrap_tuner_methods(model, backend)
    return controller


def unpatch(model: nn.Module) -> None:
    """Undo ``patch``: original PEFT classes, hooks and ``enable_input_require_grads`` restored."""
    if CONTROLLER_KEY not in model.__dict__:
        raise RuntimeError(
            f"this {type(model).__name__} is not patched by coto_kernels (call unpatch on the model given to patch)"
        )
    _unwrap_tuner_methods(model)
    _remove_model_hooks(model)
    release_input_grads(model)
    del model.__dict__[CONTROLLER_KEY]
    model.__dict__.pop(SIBLINGS_KEY, None)
    for module in model.modules():
        if isinstance(module, CoToLayerMixin):
            strip_patch_attributes(module)
