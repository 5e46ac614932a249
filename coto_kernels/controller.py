"""The CoTo controller: owns the schedule, draws the gates each optimizer step and hands them to the layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .gates import draw_gates, group_names
from .schedule import Schedule, activation_probability, validate_schedule_options

if TYPE_CHECKING:
    from transformers import TrainerCallback


class GatedLayer(Protocol):
    """What the controller needs from a patched layer."""

    coto_gate: bool
    coto_override: bool | None


class CoToController:
    """Schedule + gate sampler for a patched model; returned by ``coto_kernels.patch``.

    Call ``step()`` after every optimizer step (or use ``callback()`` with a ``transformers.Trainer``).
    ``gates[i]`` tells whether group ``groups[i]`` is on for the current optimizer step; gates are valid right
    after construction. In ``model.eval()`` every adapter is on, whatever the gates, unless ``override`` says
    otherwise.
    """

    def __init__(
        self,
        layers: Mapping[str, GatedLayer],
        *,
        total_steps: int | None = None,
        initial_p: float = 0.1,
        final_p: float = 1.0,
        stage1_ratio: float = 0.75,
        schedule: Schedule = "linear",
        granularity: str = "layer",
        seed: int | None = None,
    ) -> None:
        validate_schedule_options(initial_p, final_p, stage1_ratio, schedule)
        if not layers:
            raise ValueError("CoTo found no LoRA layers to gate")
        self.initial_p = initial_p
        self.final_p = final_p
        self.stage1_ratio = stage1_ratio
        self.schedule = schedule
        self.granularity = granularity
        self.layer_names = list(layers)
        self.groups, group_of_layer = group_names(self.layer_names, granularity)
        self._members: list[list[GatedLayer]] = [[] for _ in self.groups]
        for layer, group in zip(layers.values(), group_of_layer):
            self._members[group].append(layer)
        self.group_of_layer = dict(zip(self.layer_names, (self.groups[g] for g in group_of_layer)))
        self.total_steps = total_steps
        # Without a seed, one comes from torch's default generator, so torch.manual_seed fixes the run; under
        # torch.distributed every rank takes rank 0's (a broadcast), so ranks draw the same gates.
        if seed is None:
            from .distributed import broadcast_seed

            seed = broadcast_seed(int(torch.randint(0, 2**62, (1,))))
        self.seed = int(seed)
        self._step = 0
        self.p = initial_p
        self.gates: list[bool] = []
        self.redraw()

    # -- schedule ------------------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int | None:
        """Total optimizer steps of the run; the schedule ramps over ``stage1_ratio`` of them."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (int(value) != value or value <= 0):
            raise ValueError(f"total_steps must be a positive integer or None, got {value!r}")
        self._total_steps = None if value is None else int(value)

    @property
    def global_step(self) -> int:
        """Completed optimizer steps."""
        return self._step

    def step(self) -> None:
        """Advance by one optimizer step and draw the gates for the next one."""
        self.set_step(self._step + 1)

    def set_step(self, step: int) -> None:
        """Jump to ``step`` completed optimizer steps (resuming) and draw its gates."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._step = int(step)
        self.redraw()

    def redraw(self) -> None:
        """Recompute p for the current step and draw the gates; deterministic in (seed, step)."""
        self.p = activation_probability(
            self._step, self._total_steps, initial_p=self.initial_p, final_p=self.final_p,
            stage1_ratio=self.stage1_ratio, schedule=self.schedule,
        )
        self.gates = draw_gates(len(self.groups), self.p, self.seed, self._step)
        self._apply(self.gates)

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
        return optimizer.register_step_pre_hook(lambda *_: self.clear_inactive_grads())

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
        """Context manager form of ``set_override``: e.g. evaluate with the top third of blocks switched off."""
        self.set_override(gates)
        try:
            yield
        finally:
            self.set_override(None)

    # -- integration ----------------------------------------------------------------------------------------

    def callback(self, check_gates_every: int | None = None) -> TrainerCallback:
        """A ``transformers.TrainerCallback`` that drives this controller from a ``Trainer``.

        ``check_gates_every``: in multi-process runs, also check every that many optimizer steps that all ranks
        hold the same gates (always checked at train begin).
        """
        from .callbacks import CoToCallback

        return CoToCallback(self, check_gates_every=check_gates_every)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; with ``load_state_dict`` a resumed run continues the same schedule."""
        return {
            "step": self._step,
            "p": self.p,
            "gates": list(self.gates),
            "groups": list(self.groups),
            "total_steps": self._total_steps,
            "initial_p": self.initial_p,
            "final_p": self.final_p,
            "stage1_ratio": self.stage1_ratio,
            "schedule": self.schedule if isinstance(self.schedule, str) else None,
            "granularity": self.granularity,
            # The sampler is a pure function of (seed, step): this is its whole RNG state.
            "rng": {"seed": self.seed},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict``; the groups must match this model's."""
        if list(state["groups"]) != self.groups:
            raise ValueError("CoTo state was saved for different adapter groups than this model has")
        if state.get("schedule") is not None and state["schedule"] != self.schedule:
            raise ValueError(f"CoTo state uses schedule {state['schedule']!r}, this controller {self.schedule!r}")
        self.initial_p = float(state["initial_p"])
        self.final_p = float(state["final_p"])
        self.stage1_ratio = float(state["stage1_ratio"])
        self.total_steps = state["total_steps"]
        self.seed = int(state["rng"]["seed"])
        self.set_step(int(state["step"]))
        if [bool(g) for g in state["gates"]] != self.gates:
            raise RuntimeError("CoTo state did not reproduce its gates; was it edited or saved by another version?")

    def __repr__(self) -> str:
        on = sum(self.gates)
        return (
            f"CoToController(step={self._step}, total_steps={self._total_steps}, p={self.p:.3f}, "
            f"groups={len(self.groups)}, on={on}, schedule={self.schedule!r}, granularity={self.granularity!r})"
        )
