"""The gated LoRA layer classes a patched model runs: ``CoToLinear`` and the generated ``CoTo<PEFT class>``.

``patch`` swaps each PEFT LoRA layer's class for a gated subclass of it; parameters, buffers, ``state_dict`` keys
and PEFT's own attributes are untouched. A gated-off layer (training mode, gate off) returns ``base_layer(x)``
and runs nothing else: its adapter gets no gradient, and when nothing below needs gradients autograd stops
there. A gated-on ``lora.Linear`` over an ``nn.Linear`` or GPT-2 ``Conv1D`` runs
``coto_kernels.functional.lora_linear``; everything else (DoRA and other variants, several active adapters,
``adapter_names`` batches, merged weights, LoRA on embeddings or convolutions, quantized bases) runs PEFT's own
forward, gated, after one warning naming the layer.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import layer as peft_lora_layer
from torch import nn

from .functional import lora_linear

try:  # transformers >= 4.x ships Conv1D here; kept optional so plain-PyTorch models still patch
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = nn.Linear

# Forward kwargs PEFT's LoRA forward consumes itself and never hands to the base layer: ``adapter_names`` (mixed
# batches) plus PEFT's own list of variant kwargs (absent from older PEFT, which has no such variants).
PEFT_ONLY_FORWARD_KWARGS: tuple[str, ...] = ("adapter_names", *getattr(peft_lora_layer, "VARIANT_KWARG_KEYS", ()))

# Every attribute ``patch`` may add to a layer's ``__dict__``; ``unpatch`` removes exactly these.
PATCH_ATTRIBUTES: tuple[str, ...] = (
    "coto_gate", "_coto_gate", "coto_gate_tensor", "coto_override", "coto_name", "coto_backend", "_coto_warned",
)


def warn_once(layer: nn.Module, reason: str) -> None:
    """Warn, once per layer and reason, that ``layer`` runs PEFT's unfused forward."""
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
    return _adapter_fallback_reason(layer) or _hooks_fallback_reason(layer)


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


def _hooks_of(module: nn.Module) -> str | None:
    """What would run around ``module``'s forward and be lost if the fused call bypassed it."""
    if getattr(module, "_hf_hook", None) is not None or "forward" in module.__dict__:
        return "an accelerate hook (or a replaced forward)"  # e.g. cpu_offload: weights load in the hook
    if module._forward_hooks or module._forward_pre_hooks:
        return "forward hooks"
    if module._backward_hooks or getattr(module, "_backward_pre_hooks", None):
        return "backward hooks"
    return None


def _hooks_fallback_reason(layer: LoraLinear) -> str | None:
    """Why hooks force PEFT's forward: the fused call reads the weights and never calls these modules."""
    adapter = next(a for a in layer.active_adapters if a in layer.lora_A)
    parts = (("base layer", layer.get_base_layer()), ("lora_A", layer.lora_A[adapter]),
             ("lora_B", layer.lora_B[adapter]), ("lora_dropout", layer.lora_dropout[adapter]))
    for part, module in parts:
        hooks = _hooks_of(module)
        if hooks is not None:
            return f"its {part} has {hooks}"
    if _global_module_hooks():
        return "global module hooks are registered (torch.nn.modules.module.register_module_forward_hook)"
    return None


def _global_module_hooks() -> bool:
    module_hooks = torch.nn.modules.module
    return any(getattr(module_hooks, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"
    ))


class CoToLayerMixin:
    """Gating shared by every patched LoRA layer; ``controller`` sets ``coto_gate`` / ``coto_override``."""

    coto_override: bool | None = None
    coto_name: str = ""

    def __reduce_ex__(self, protocol: int):
        # Pickle (torch.save, deepcopy) by the PEFT class, which is importable by name; the gated classes are
        # made at run time (``gated_class``) and found again from it on load.
        _, _, *state = super().__reduce_ex__(max(protocol, 2))
        return (_new_gated, (ungated_class(type(self)),), *state)

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
        for key in PEFT_ONLY_FORWARD_KWARGS:
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
            warn_once(self, reason)
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


# The gated classes carry PEFT's class name (``__name__``), so ``repr`` prints ``lora.Linear(``, PEFT's messages name
# PEFT's class, and PEFT's own checks by class name (``ParamWrapper`` for ``target_parameters``) still hold.
# ``__qualname__`` keeps the ``CoTo`` prefix, so ``type(layer)`` still shows that the layer is patched.
CoToLinear.__name__ = LoraLinear.__name__


@functools.cache
def gated_class(cls: type) -> type:
    """The gated subclass ``patch`` swaps in for the PEFT LoRA layer class ``cls``."""
    if cls is LoraLinear:
        return CoToLinear
    return type(cls.__name__, (CoToLayerMixin, cls), {"__module__": __name__, "__qualname__": f"CoTo{cls.__name__}"})


def _new_gated(peft_class: type) -> nn.Module:
    """Unpickling: an empty instance of the gated class of ``peft_class`` (``__setstate__`` fills it)."""
    return object.__new__(gated_class(peft_class))


def ungated_class(cls: type) -> type:
    """The PEFT class a gated class was made from (inverse of ``gated_class``)."""
    return next(c for c in cls.__mro__[1:] if not issubclass(c, CoToLayerMixin))


def strip_patch_attributes(layer: nn.Module) -> None:
    """Restore ``layer``'s PEFT class and remove every attribute the patch added."""
    layer.__class__ = ungated_class(type(layer))
    for attr in PATCH_ATTRIBUTES:
        layer.__dict__.pop(attr, None)
