"""``patch(model)``: make every PEFT LoRA layer of a model CoTo-gated, and fused where the math allows.

The pass swaps each LoRA layer's class for a gated subclass of it (``CoToLinear`` for ``lora.Linear``, a
generated subclass for other LoRA layer types). Parameters, buffers, ``state_dict`` keys and PEFT's own
attributes are untouched, so ``save_pretrained`` writes exactly what vanilla PEFT writes, and ``unpatch``
restores the original class.

A gated-off layer (training mode, gate off) returns ``base_layer(x)`` and runs nothing else: its adapter gets
no gradient, and when nothing below needs gradients autograd stops there. A gated-on ``lora.Linear`` over an
``nn.Linear`` or GPT-2 ``Conv1D`` runs ``coto_kernels.functional.lora_linear``; everything else (DoRA and
other variants, several active adapters, ``adapter_names`` batches, merged weights, LoRA on embeddings or
convolutions, quantized bases) runs PEFT's own forward, gated, after one warning naming the layers.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from . import distributed
from .controller import CoToController
from .functional import BACKENDS, lora_linear, triton_available
from .gates import block_prefix
from .schedule import Schedule

try:  # transformers >= 4.x ships Conv1D here; kept optional so plain-PyTorch models still patch
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = nn.Linear

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers < 4.52 checkpoints inside the model's loop
    GradientCheckpointingLayer = None

_VARIANT_KWARGS = ("adapter_names", "alora_offsets")


def _warn_once(layer: nn.Module, reason: str) -> None:
    seen = layer.__dict__.setdefault("_coto_warned", set())
    if reason not in seen:
        seen.add(reason)
        warnings.warn(
            f"CoTo: {layer.coto_name} runs PEFT's unfused forward ({reason}); it is still gated by CoTo",
            stacklevel=3,
        )


def static_fallback_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot take the fused path at all, or None when it can."""
    if not isinstance(layer, LoraLinear):
        return f"{type(layer).__name__} LoRA layers are not fused"
    base = layer.get_base_layer()
    if type(base) not in (nn.Linear, Conv1D):
        return f"base layer {type(base).__name__} is not nn.Linear or Conv1D"
    return _adapter_fallback_reason(layer)


def _adapter_fallback_reason(layer: LoraLinear) -> str | None:
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    adapter = active[0]
    for name, module in (("lora_A", layer.lora_A[adapter]), ("lora_B", layer.lora_B[adapter])):
        if type(module) is not nn.Linear:  # e.g. its own FSDP unit: only its forward gathers its weight
            return f"{name} is a {type(module).__name__}, not nn.Linear (wrapped, e.g. as its own FSDP unit)"
    if adapter in getattr(layer, "lora_variant", {}):
        return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}"
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[adapter]).__name__}"
    if layer.lora_A[adapter].bias is not None:
        return "lora_A has a bias"
    if layer.merged:
        return "adapter weights are merged into the base layer"
    return None


class CoToLayerMixin:
    """Gating shared by every patched LoRA layer; ``controller`` sets ``coto_gate`` / ``coto_override``."""

    coto_override: bool | None = None
    coto_name: str = ""

    @property
    def coto_gate(self) -> bool:
        """The gate as a Python bool (eager mode); mirrored in place into ``coto_gate_tensor`` for compiled graphs."""
        return self.__dict__.get("_coto_gate", True)

    @coto_gate.setter
    def coto_gate(self, on: bool) -> None:
        on = bool(on)
        self.__dict__["_coto_gate"] = on
        tensor = self.__dict__.get("coto_gate_tensor")
        if tensor is None:  # a 0-d CPU bool: compiled graphs read it as data (coto_kernels.compile)
            self.__dict__["coto_gate_tensor"] = torch.tensor(on)
        else:
            tensor.fill_(on)

    def _coto_compiling(self) -> bool:
        """Whether Dynamo traces a training forward gated by the schedule: then the gate must be data."""
        return torch.compiler.is_compiling() and self.training and self.coto_override is None

    def coto_is_on(self) -> bool:
        """Whether the adapter takes part in the current forward."""
        if self.coto_override is not None:
            return self.coto_override
        return not self.training or self.coto_gate  # eval first: a compiled eval graph must not guard on gates

    def _base_only(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:  # the merged weights contain the adapter; PEFT unmerges for disable_adapters too
            self.unmerge()
        for key in _VARIANT_KWARGS:
            kwargs.pop(key, None)
        return self.base_layer(x, *args, **kwargs)

    def _compiled_unfused(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # PEFT's own forward cannot take a tensor gate: select between its result and the base output.
        full = super().forward(x, *args, **kwargs)
        return torch.where(self.coto_gate_tensor, full, self._base_only(x, *args, **kwargs))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._coto_compiling():
            return self._compiled_unfused(x, *args, **kwargs)
        if not self.coto_is_on():
            return self._base_only(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)


class CoToLinear(CoToLayerMixin, LoraLinear):
    """A ``peft`` ``lora.Linear`` whose forward is gated and, where possible, one fused autograd Function."""

    coto_backend: str = "auto"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._coto_compiling():
            return self._compiled_forward(x, *args, **kwargs)
        if not self.coto_is_on():
            return self._base_only(x, *args, **kwargs)
        if self.disable_adapters:
            return LoraLinear.forward(self, x, *args, **kwargs)
        reason = "extra forward arguments" if args or kwargs else static_fallback_reason(self)
        if reason is not None:
            _warn_once(self, reason)
            return LoraLinear.forward(self, x, *args, **kwargs)
        operands, options = self._fused_operands()
        return lora_linear(x, *operands, **options)

    def _fused_operands(self) -> tuple[tuple, dict[str, Any]]:
        """(weight, bias, lora_a, lora_b, lora_bias) and the scalar options of the fused call."""
        adapter = next(a for a in self.active_adapters if a in self.lora_A)
        base = self.get_base_layer()
        dropout = self.lora_dropout[adapter]
        operands = (base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                    self.lora_B[adapter].bias)
        options = dict(
            scaling=self.scaling[adapter],
            dropout_p=dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0,
            weight_is_kn=isinstance(base, Conv1D),
            backend=self.coto_backend,
        )
        return operands, options

    def _compiled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The traced form: same math, gate as a tensor into opaque custom ops (``coto_kernels.compile``)."""
        if self.disable_adapters or args or kwargs or static_fallback_reason(self) is not None:
            return self._compiled_unfused(x, *args, **kwargs)
        from .compile import gated_lora_linear

        operands, options = self._fused_operands()
        return gated_lora_linear(x, *operands, gate=self.coto_gate_tensor, **options)


@functools.cache
def _gated_class(cls: type) -> type:
    if cls is LoraLinear:
        return CoToLinear
    return type(f"CoTo{cls.__name__}", (CoToLayerMixin, cls), {"__module__": __name__})


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")}


# -- gradient checkpointing: keep the backward truncation -----------------------------------------------------
#
# PEFT and Transformers call ``enable_input_require_grads()``, a hook that makes the embedding output require
# grad so reentrant checkpointing sees a grad-requiring input. It also makes every block below the lowest active
# adapter run its backward. While patched we replace it by a pre-hook on each adapted block that marks the
# block's hidden-state input as requiring grad only when the block has an active adapter and is checkpointed
# reentrantly. Transformers' ``GradientCheckpointingLayer`` checkpoints ``forward`` inside ``__call__``, so the
# pre-hook runs outside the checkpoint, where it must. Blocks of other kinds keep the embedding hook (correct,
# but without the truncation).


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


def _take_over_input_grads(model: nn.Module, layers: dict[str, nn.Module]) -> list[Callable[[], None]]:
    """Install the block pre-hooks and neutralise ``enable_input_require_grads``; return the undo actions."""
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
               if getattr(fn, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad")]
    for m, key, _ in orphans:
        del m._forward_hooks[key]
    undo.append(lambda: [m._forward_hooks.__setitem__(key, fn) for m, key, fn in orphans])
    return undo


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
        backend: ``"auto"`` (Triton on CUDA tensors, the native kernels on the CPU when built, PyTorch otherwise),
            ``"torch"``, ``"triton"`` or ``"native"``.

    Returns:
        The ``CoToController``; also stored as ``model.coto_controller``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    distributed.check_not_wrapped(model)
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    if "coto_controller" in model.__dict__ or any(isinstance(m, CoToLayerMixin) for m in model.modules()):
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
        layer.__class__ = _gated_class(type(layer))
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
    model.__dict__["coto_controller"] = controller
    undo = _take_over_input_grads(model, layers)
    undo.append(model.register_forward_pre_hook(distributed.training_guard(controller)).remove)
    model.__dict__["_coto_undo"] = undo
    return controller


def unpatch(model: nn.Module) -> None:
    """Undo ``patch``: original PEFT classes, hooks and ``enable_input_require_grads`` restored."""
    if "coto_controller" not in model.__dict__:
        raise RuntimeError("this model is not patched by coto_kernels (call unpatch on the model given to patch)")
    for undo in model.__dict__.pop("_coto_undo"):
        undo()
    del model.__dict__["coto_controller"]
    for module in model.modules():
        if isinstance(module, CoToLayerMixin):
            module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, CoToLayerMixin))
            for attr in ("coto_gate", "_coto_gate", "coto_gate_tensor", "coto_override", "coto_name", "coto_backend",
                         "_coto_warned"):
                module.__dict__.pop(attr, None)
