"""The gated LoRA layer classes a patched model runs: ``CoToLinear`` and the generated ``CoTo<PEFT class>``.

``patch`` swaps each PEFT LoRA layer's class for a gated subclass of it; parameters, buffers, ``state_dict`` keys
and PEFT's own attributes are untouched. A gated-off layer (training mode, gate off) returns ``base_layer(x)``
and runs nothing else: its adapter gets no gradient, and when nothing below needs gradients autograd stops
there. A gated-on ``lora.Linear`` over an ``nn.Linear`` or GPT-2 ``Conv1D`` runs
``coto_kernels.functional.lora_linear``, or ``coto_kernels.functional_dora.dora_linear`` for a DoRA adapter
(``use_dora=True``); everything else (other LoRA variants, several active adapters,
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

from .functional import can_group, lora_linear, lora_linear_group
from .functional_dora import dora_linear, dora_linear_group
from .kernels.dora_torch import clear_weight_norm_cache
from .kernels.lora_group import GroupMember
from .siblings import SiblingInputs

try:  # PEFT >= 0.15 implements DoRA as a LoRA variant
    from peft.tuners.lora.variants import DoraLinearVariant
except ImportError:  # pragma: no cover
    DoraLinearVariant = None

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
    "coto_siblings",
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


# The checks below run on every fused forward, so they read submodules from ``_modules`` directly: each
# ``layer.lora_A`` costs a trip through ``nn.Module.__getattr__`` (~1 us, dozens per call otherwise).
LORA_PART_DICTS = ("lora_A", "lora_B", "lora_dropout")


def _active_parts(layer: LoraLinear) -> tuple[list[str], dict[str, dict[str, nn.Module]]]:
    """The active adapters that have a lora_A, and layer.{lora_A, lora_B, lora_dropout}'s module dicts."""
    parts = {name: layer._modules[name]._modules for name in LORA_PART_DICTS}
    return [a for a in layer.active_adapters if a in parts["lora_A"]], parts


def static_fallback_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot take the fused path at all, or None when it can."""
    if not isinstance(layer, LoraLinear):
        return f"{type(layer).__name__} LoRA layers are not fused"
    base = layer._modules["base_layer"]  # not get_base_layer(): a nested adapter layer (PEFT's mixed models) must run
    if type(base) not in (nn.Linear, Conv1D):
        return f"base layer {type(base).__name__} is not nn.Linear or Conv1D"
    active, parts = _active_parts(layer)
    if len(active) != 1:
        return f"{len(active)} active adapters"
    return _adapter_fallback_reason(layer, active[0], parts) or _hooks_fallback_reason(base, active[0], parts)


def _adapter_fallback_reason(layer: LoraLinear, adapter: str, parts: dict[str, dict[str, nn.Module]]) -> str | None:
    for name in ("lora_A", "lora_B"):
        module = parts[name][adapter]
        if type(module) is not nn.Linear:  # e.g. its own FSDP unit: only its forward gathers its weight
            return f"{name} is a {type(module).__name__}, not nn.Linear (wrapped, e.g. as its own FSDP unit)"
    state = layer.__dict__
    if adapter in state.get("lora_variant", {}) and not is_dora(layer, adapter):
        return f"LoRA variant {type(state['lora_variant'][adapter]).__name__}"
    if state.get("use_dora", {}).get(adapter, False) and not is_dora(layer, adapter):
        return "DoRA without PEFT's DoraLinearVariant"
    if not isinstance(parts["lora_dropout"][adapter], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(parts['lora_dropout'][adapter]).__name__}"
    if parts["lora_A"][adapter]._parameters.get("bias") is not None:
        return "lora_A has a bias"
    if layer.merged:
        return "adapter weights are merged into the base layer"
    return None


def is_dora(layer: nn.Module, adapter: str) -> bool:
    """Whether ``adapter`` of ``layer`` is PEFT's linear DoRA (fused by ``dora_linear``)."""
    variant = layer.__dict__.get("lora_variant", {}).get(adapter)
    return DoraLinearVariant is not None and type(variant) is DoraLinearVariant


def _hooks_of(module: nn.Module) -> str | None:
    """What would run around ``module``'s forward and be lost if the fused call bypassed it."""
    state = module.__dict__
    if state.get("_hf_hook") is not None or "forward" in state:
        return "an accelerate hook (or a replaced forward)"  # e.g. cpu_offload: weights load in the hook
    if module._forward_hooks or module._forward_pre_hooks:
        return "forward hooks"
    if module._backward_hooks or state.get("_backward_pre_hooks"):
        return "backward hooks"
    return None


def _hooks_fallback_reason(base: nn.Module, adapter: str, parts: dict[str, dict[str, nn.Module]]) -> str | None:
    """Why hooks force PEFT's forward: the fused call reads the weights and never calls these modules."""
    for part, module in (("base layer", base), *((name, parts[name][adapter]) for name in LORA_PART_DICTS)):
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

    # PEFT merges and unmerges through ``weight.data``, which the fused DoRA layer's cached ||W_j||^2 cannot see.
    def merge(self, *args: Any, **kwargs: Any) -> None:
        super().merge(*args, **kwargs)
        self._forget_weight_norm()

    def unmerge(self, *args: Any, **kwargs: Any) -> None:
        super().unmerge(*args, **kwargs)
        self._forget_weight_norm()

    def _forget_weight_norm(self) -> None:
        weight = getattr(self.get_base_layer(), "weight", None)
        if isinstance(weight, torch.Tensor):
            clear_weight_norm_cache(weight)

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
        operands, magnitude, options = self._fused_operands()
        siblings: SiblingInputs | None = self.__dict__.get("coto_siblings")
        if siblings is not None and not torch.compiler.is_compiling() and siblings.observe(self, x):
            held = siblings.take(self, x)
            if held is not None:  # computed by this layer's group leader from this very x
                return held
            group = siblings.group_led_by(self)
            if group is not None and (output := self._group_forward(x, group, siblings)) is not None:
                return output
        if magnitude is not None:
            return dora_linear(x, *operands, magnitude, **options)
        return lora_linear(x, *operands, **options)

    def _group_member(self) -> tuple[GroupMember, torch.Tensor | None, float] | None:
        """This layer's operands, DoRA magnitude (None for LoRA) and dropout probability for its leader's group
        call, when its own forward would take the fused path now; else None. Not with forward pre-hooks (or an
        accelerate hook) on the layer itself: they run before its own call and may change its weights or state,
        after the leader."""
        if not self.coto_is_on() or self.disable_adapters or static_fallback_reason(self) is not None:
            return None
        if self._forward_pre_hooks or self.__dict__.get("_hf_hook") is not None:
            return None
        (weight, bias, lora_a, lora_b, lora_bias), magnitude, options = self._fused_operands()
        member = GroupMember(weight, bias, lora_a, lora_b, lora_bias, options["scaling"], options["weight_is_kn"])
        return member, magnitude, options["dropout_p"]

    def _group_forward(
        self, x: torch.Tensor, group: tuple[nn.Module, ...], siblings: SiblingInputs
    ) -> torch.Tensor | None:
        """Every member's output from one ``lora_linear_group`` (or, all DoRA without dropout, ``dora_linear_group``)
        call: this layer's returned, the others' held for their own calls on ``x``. None (nothing computed) when a
        member cannot join this forward."""
        joined = [layer._group_member() if isinstance(layer, CoToLinear) else None for layer in group]
        if any(j is None for j in joined) or any(layer.coto_backend != self.coto_backend for layer in group):
            return None
        members = [member for member, _, _ in joined]
        magnitudes = [magnitude for _, magnitude, _ in joined]
        dropout_p = joined[0][2]
        if any(p != dropout_p for _, _, p in joined) or not can_group(x, members, self.coto_backend, dropout_p):
            return None
        if all(magnitude is None for magnitude in magnitudes):
            outputs = lora_linear_group(x, members, dropout_p=dropout_p, backend=self.coto_backend)
        elif all(magnitude is not None for magnitude in magnitudes) and dropout_p == 0.0:
            outputs = dora_linear_group(x, members, magnitudes, backend=self.coto_backend)
        else:  # LoRA and DoRA mixed, or DoRA with dropout (no group form): each layer on its own
            return None
        for layer, output in zip(group[1:], outputs[1:], strict=True):
            siblings.hold(layer, x, output)
        return outputs[0]

    def _fused_operands(self) -> tuple[tuple, torch.Tensor | None, dict[str, Any]]:
        """(weight, bias, lora_a, lora_b, lora_bias), the DoRA magnitude (None for plain LoRA) and the scalar
        options of the fused call, for the active adapter.

        Only called on layers ``static_fallback_reason`` passed: their parts are plain ``nn.Linear`` / ``Conv1D``
        modules, whose parameters are read from ``_parameters`` (no ``nn.Module.__getattr__`` on the hot path).
        """
        active, parts = _active_parts(self)
        adapter = active[0]
        base = self._modules["base_layer"]._parameters
        lora_b = parts["lora_B"][adapter]._parameters
        dropout = parts["lora_dropout"][adapter]
        operands = (base["weight"], base.get("bias"), parts["lora_A"][adapter]._parameters["weight"],
                    lora_b["weight"], lora_b.get("bias"))
        dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        magnitude = None
        if is_dora(self, adapter):
            magnitude = self._modules["lora_magnitude_vector"]._modules[adapter]._parameters["weight"]
            if not self.training:  # PEFT's DoRA drops out only in training mode (``module.training``)
                dropout_p = 0.0
        options = dict(
            scaling=self.scaling[adapter],
            dropout_p=dropout_p,
            weight_is_kn=isinstance(self._modules["base_layer"], Conv1D),
            backend=self.coto_backend,
        )
        return operands, magnitude, options

    def _compiled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The traced form: same math, gate as a tensor into opaque custom ops (``coto_kernels.compile``)."""
        if self.disable_adapters or args or kwargs or static_fallback_reason(self) is not None or any(
            is_dora(self, a) for a in self.active_adapters
        ):  # DoRA has no compiled custom op yet: PEFT's forward, gated
            return self._compiled_unfused(x, *args, **kwargs)
        from .compile import gated_lora_linear

        operands, _, options = self._fused_operands()
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
