"""The CoTo controller: owns the schedule, draws the gates each optimizer step and hands them to the layers.

It depends only on the config, the schedule and the gate sampler. The layers above it plug in: ``patch``
resolves the seed (a broadcast under ``torch.distributed``) and builds the controller; the Trainer
integration (``coto_kernels.callbacks``) registers the callback class that ``callback()`` returns.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist

from .config import CoToConfig, Schedule, as_int, as_real
from .gates import draw_gates, group_names, random_seed
from .schedule import activation_probability


class GatedLayer(Protocol):
    """What the controller needs from a patched layer."""

    coto_gate: bool
    coto_override: bool | None


class _ConfigField:
    """A read-only attribute of the controller that reads the field of the same name of its ``CoToConfig``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, controller: CoToController | None, owner: type | None = None) -> Any:
        return self if controller is None else getattr(controller.config, self.name)

    def __set__(self, controller: CoToController, value: Any) -> None:  # never shadowed by an instance attribute
        raise AttributeError(f"CoToController.{self.name} is read-only: it comes from the CoToConfig given to patch")


# Every controller alive, for code that meets an optimizer without knowing which model it trains
# (``inactive_adapter_parameters``); weak, so a dropped model takes its controller with it.
_LIVE_CONTROLLERS: weakref.WeakSet[CoToController] = weakref.WeakSet()


# Optimizers handed to ``attach_optimizer``: their gated-off adapters lose their gradients before each step.
_ATTACHED_OPTIMIZERS: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def inactive_adapter_parameters() -> list[torch.nn.Parameter]:
    """The trainable adapter parameters that are off for the current step, over every live controller."""
    return [param for controller in list(_LIVE_CONTROLLERS) for param in controller.inactive_parameters()]


def clears_inactive_grads(optimizer: torch.optim.Optimizer) -> bool:
    """Whether some controller's ``attach_optimizer`` clears the gated-off gradients before ``optimizer``'s step."""
    return optimizer in _ATTACHED_OPTIMIZERS


class CoToController:
    """Schedule + gate sampler for a patched model; returned by ``coto_kernels.patch``.

    Call ``step()`` after every optimizer step (or pass ``coto_kernels.CoToCallback(controller)`` to a
    ``transformers.Trainer``). ``gates[i]`` tells whether group ``groups[i]`` is on for the current optimizer step;
    gates are valid right after construction. In ``model.eval()`` every adapter is on, whatever the gates, unless
    ``override`` says otherwise.

    ``config`` holds the options (``CoToConfig``); keyword options build or override it, as in ``patch``. Without a
    seed one is drawn from torch's default generator; under ``torch.distributed`` pass one (``patch`` passes rank
    0's), since every rank must draw the same gates.
    """

    #: The ``transformers.TrainerCallback`` class ``callback()`` builds. ``coto_kernels.callbacks`` sets it when it
    #: is imported (``import coto_kernels`` does), so this module never imports the Trainer integration above it.
    trainer_callback: ClassVar[Callable[..., Any] | None] = None

    def __init__(self, layers: Mapping[str, GatedLayer], config: CoToConfig | None = None, **options: Any) -> None:
        config = CoToConfig.build(config, **options)
        if not layers:
            raise ValueError("CoTo found no LoRA layers to gate")
        if config.seed is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError(
                    "CoToController needs a seed under torch.distributed (each rank would draw its own): pass "
                    "seed=..., or use coto_kernels.patch, which broadcasts rank 0's"
                )
            config = CoToConfig.build(config, seed=random_seed())
        self._config = config
        self._index_layers(dict(layers))
        self._step = 0
        self._warned_stale_grads = False
        self.p = config.initial_p
        self.gates: list[bool] = []
        self.redraw()
        _LIVE_CONTROLLERS.add(self)

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy / unpickling: the copy is a live controller too
        self.__dict__.update(state)
        _LIVE_CONTROLLERS.add(self)

    def _index_layers(self, layers: dict[str, GatedLayer]) -> None:
        self._layers = layers
        self.layer_names = list(layers)
        self.groups, group_of_layer = group_names(self.layer_names, self.granularity)
        self._members: list[list[GatedLayer]] = [[] for _ in self.groups]
        for layer, group in zip(layers.values(), group_of_layer):
            self._members[group].append(layer)
        self.group_of_layer = dict(zip(self.layer_names, (self.groups[g] for g in group_of_layer)))

    def add_layers(self, layers: Mapping[str, GatedLayer]) -> None:
        """Gate layers created after ``patch`` (e.g. by ``add_adapter`` on other target modules).

        The groups are recomputed over all layers, exactly as if the controller had been built with them from the
        start (a new block becomes a new group, in block order), and the current step's gates are redrawn and
        applied, so the new layers are gated at once.
        """
        known = sorted(set(layers) & set(self._layers))
        if known:
            raise ValueError(f"CoTo already gates the layers {known}")
        self._index_layers({**self._layers, **layers})
        self.redraw()

    def set_layers(self, layers: Mapping[str, GatedLayer]) -> None:
        """Gate exactly ``layers``: every gated layer of the model by its current qualified name.

        For sets that changed by more than additions: PEFT's mixed models wrap a gated LoRA layer in another
        adapter type's layer, which takes over its name (``lin0`` -> the new layer, ``lin0.base_layer`` -> the old
        one). Groups are recomputed as at construction, a layer's override stays with the layer, and the current
        step's gates are applied.
        """
        if not layers:
            raise ValueError("CoTo needs at least one LoRA layer to gate")
        self._index_layers(dict(layers))
        self.redraw()

    # -- options ---------------------------------------------------------------------------------------------

    @property
    def config(self) -> CoToConfig:
        """The run's options, with the resolved seed (frozen; ``total_steps`` is settable on the controller)."""
        return self._config

    @property
    def total_steps(self) -> int | None:
        """Total optimizer steps of the run; the schedule ramps over ``stage1_ratio`` of them."""
        return self._config.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._config = CoToConfig.build(self._config, total_steps=value)

    # Read-only views of the config's fields (CoToConfig documents each); the seed is the resolved one.
    initial_p: float = _ConfigField()
    final_p: float = _ConfigField()
    stage1_ratio: float = _ConfigField()
    schedule: Schedule = _ConfigField()
    granularity: str = _ConfigField()
    seed: int = _ConfigField()

    @property
    def can_skip_adapters(self) -> bool:
        """Whether the schedule can switch an adapter off (``schedule="off"`` keeps every adapter on)."""
        return self.schedule != "off" or self.initial_p < 1.0

    # -- schedule ------------------------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """Completed optimizer steps."""
        return self._step

    def step(self) -> None:
        """Advance by one optimizer step and draw the gates for the next one.

        Warns once if an adapter that was off for the finished step holds a gradient: the optimizer step just
        taken moved it (AdamW: momentum, weight decay) although CoTo skipped it. ``zero_grad(set_to_none=False)``
        and compiled graphs leave such zero gradients; ``attach_optimizer`` clears them before the step.
        """
        self._warn_on_stale_inactive_grads()
        self.set_step(self._step + 1)

    def set_step(self, step: int) -> None:
        """Jump to ``step`` completed optimizer steps (resuming) and draw its gates.

        Nothing changes when it raises (e.g. a ramping schedule without ``total_steps``).
        """
        step = as_int("step", step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        p, gates = self._draw(self._config, step)
        self._step, self.p, self.gates = step, p, gates
        self._apply(gates)

    def redraw(self) -> None:
        """Recompute p for the current step and draw the gates; deterministic in (seed, step)."""
        self.set_step(self._step)

    def _draw(self, config: CoToConfig, step: int) -> tuple[float, list[bool]]:
        p = activation_probability(step, config=config)
        return p, draw_gates(len(self.groups), p, config.seed, step)

    def _apply(self, gates: Sequence[bool]) -> None:
        for members, on in zip(self._members, gates):
            for layer in members:
                layer.coto_gate = bool(on)

    # -- gradients of gated-off adapters ---------------------------------------------------------------------

    def inactive_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable adapter parameters of the layers that are off for the current step (not the base layer's)."""
        params = []
        for members in self._members:
            for layer in members:  # the layer's own state: what its last training forward used
                forced = getattr(layer, "coto_override", None)
                if (forced if forced is not None else layer.coto_gate) or not isinstance(layer, torch.nn.Module):
                    continue
                params.extend(p for name, p in layer.named_parameters()
                              if p.requires_grad and not name.startswith("base_layer."))
        return params

    def clear_inactive_grads(self) -> None:
        """Set ``grad = None`` on the adapters that are off this step, so the optimizer leaves them alone.

        Eager CoTo never gives them a gradient; a compiled model gives them zeros (a static graph), and so do
        ``zero_grad(set_to_none=False)`` leftovers. A zero gradient still moves AdamW weights (momentum, weight
        decay). Call it between backward and ``optimizer.step()``; the Trainer callback and
        ``attach_optimizer`` do.
        """
        for param in self.inactive_parameters():
            param.grad = None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer):
        """Run ``clear_inactive_grads`` before every ``optimizer.step()``; returns the hook handle."""
        _ATTACHED_OPTIMIZERS.add(optimizer)
        return optimizer.register_step_pre_hook(lambda *_: self.clear_inactive_grads())

    def _warn_on_stale_inactive_grads(self) -> None:
        if self._warned_stale_grads:
            return
        stale = sum(1 for param in self.inactive_parameters() if param.grad is not None)
        if stale:
            self._warned_stale_grads = True
            warnings.warn(
                f"CoTo: {stale} parameters of gated-off adapters had a gradient at this optimizer step (zeros left "
                "by optimizer.zero_grad(set_to_none=False) or by a compiled graph), so the optimizer moved them "
                "(AdamW: momentum, weight decay) although CoTo skipped them. Use zero_grad(set_to_none=True) or "
                "call controller.attach_optimizer(optimizer) once before training.",
                stacklevel=3,
            )

    # -- forcing adapters off (evaluation, pruning) ---------------------------------------------------------

    def _as_gate_list(self, gates: Sequence[bool] | Mapping[str, bool]) -> list[bool]:
        if isinstance(gates, Mapping):
            unknown = set(gates) - set(self.groups)
            if unknown:
                raise KeyError(f"unknown CoTo groups {sorted(unknown)}; groups are {self.groups}")
            return [bool(gates.get(g, True)) for g in self.groups]
        gates = [bool(g) for g in gates]
        if len(gates) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} gates (one per group), got {len(gates)}")
        return gates

    def overrides(self) -> dict[str, bool | None]:
        """What each adapted layer is forced to (``True``/``False``), or ``None`` where the schedule decides."""
        return {name: getattr(layer, "coto_override", None) for name, layer in self._layers.items()}

    def set_override(self, gates: Sequence[bool] | Mapping[str, bool] | None) -> None:
        """Force groups on/off in training *and* evaluation (``None`` returns control to the schedule).

        A mapping names only the groups to force; groups it leaves out stay on.
        """
        forced = None if gates is None else self._as_gate_list(gates)
        for i, members in enumerate(self._members):
            for layer in members:
                layer.coto_override = None if forced is None else forced[i]

    @contextlib.contextmanager
    def override(self, gates: Sequence[bool] | Mapping[str, bool]) -> Iterator[None]:
        """Context manager form of ``set_override``: e.g. evaluate with the top third of blocks switched off.

        On exit every layer gets back the override it had before (nested overrides, or one made with
        ``set_override``, survive), not ``None``.
        """
        previous = self.overrides()
        self.set_override(gates)
        try:
            yield
        finally:
            for name, forced in previous.items():
                self._layers[name].coto_override = forced

    # -- integration ----------------------------------------------------------------------------------------

    def callback(self, check_gates_every: int | None = None) -> Any:
        """Alias of ``coto_kernels.CoToCallback(self, check_gates_every=...)``: a ``transformers.TrainerCallback``
        that drives this controller from a ``Trainer``.

        ``check_gates_every``: in multi-process runs, also check every that many optimizer steps that all ranks
        hold the same gates (always checked at train begin).
        """
        if self.trainer_callback is None:
            raise RuntimeError("the Trainer integration is not loaded: import coto_kernels.callbacks")
        return self.trainer_callback(self, check_gates_every=check_gates_every)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; with ``load_state_dict`` a resumed run continues the same schedule."""
        options = self._config.to_dict()
        # The sampler is a pure function of (seed, step): the seed is its whole RNG state.
        seed = options.pop("seed")
        return {"step": self._step, "p": self.p, "gates": list(self.gates), "groups": list(self.groups), **options,
                "rng": {"seed": seed}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict``; the groups must match this model's.

        Everything is checked before anything is applied: on an error the controller is unchanged.
        """
        config, step, saved_p, saved_gates = self._parse_state(state)
        p, gates = self._draw(config, step)
        if not math.isclose(p, saved_p, rel_tol=1e-9, abs_tol=1e-12) or gates != saved_gates:
            raise RuntimeError(
                f"CoTo state did not reproduce its p and gates at step {step} (saved p={saved_p}, gates "
                f"{[int(g) for g in saved_gates]}; recomputed p={p}, gates {[int(g) for g in gates]}); was it edited "
                "or saved by another version?"
            )
        self._config = config
        self._step, self.p, self.gates = step, p, gates
        self._apply(gates)

    def _parse_state(self, state: Mapping[str, Any]) -> tuple[CoToConfig, int, float, list[bool]]:
        """The config, step, p and gates a saved state describes; raises ``ValueError`` naming what is wrong."""
        required = ("step", "p", "gates", "groups", "rng", "initial_p", "final_p", "stage1_ratio", "total_steps")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"CoTo state lacks {missing}")
        if list(state["groups"]) != self.groups:
            raise ValueError("CoTo state was saved for different adapter groups than this model has")
        saved_schedule = state.get("schedule")  # None: a callable, which cannot be saved; this controller's is kept
        if saved_schedule is not None and saved_schedule != self.schedule:
            raise ValueError(f"CoTo state uses schedule {saved_schedule!r}, this controller {self.schedule!r}")
        seed = state["rng"].get("seed") if isinstance(state["rng"], Mapping) else None
        if seed is None:
            raise ValueError("invalid CoTo state: rng.seed is missing")
        try:
            config = CoToConfig.from_dict(state, schedule=self.schedule, granularity=self.granularity, seed=seed)
            step = as_int("step", state["step"])
            saved_p = as_real("p", state["p"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid CoTo state: {err}") from err
        if step < 0:
            raise ValueError(f"invalid CoTo state: step must be >= 0, got {step}")
        if not 0.0 <= saved_p <= 1.0:
            raise ValueError(f"invalid CoTo state: p must lie in [0, 1], got {saved_p}")
        gates = state["gates"]
        if not isinstance(gates, Sequence) or len(gates) != len(self.groups) or any(
            isinstance(g, float) or g not in (0, 1) for g in gates
        ):
            raise ValueError(f"invalid CoTo state: gates must be {len(self.groups)} bools, got {gates!r}")
        return config, step, saved_p, [bool(g) for g in gates]

    def __repr__(self) -> str:
        on = sum(self.gates)
        return (
            f"CoToController(step={self._step}, total_steps={self.total_steps}, p={self.p:.3f}, "
            f"groups={len(self.groups)}, on={on}, schedule={self.schedule!r}, granularity={self.granularity!r})"
        )
