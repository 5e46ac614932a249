"""Which patched LoRA layers read the same input, learnt from the forward, and the outputs held for them.

A decoder block calls q_proj, k_proj and v_proj (and gate_proj, up_proj) one after another on one tensor. Such
siblings share their X-side LoRA products when computed together (``coto_kernels.functional.lora_linear_group``),
but each is a separate module call. So ``SiblingInputs`` watches the calls: consecutive fused calls on the same
tensor (same object, same version) form a *run*; when the next input arrives, a run of two or more layers is
learnt as a group, led by its first layer. Learnt groups take effect at the start of the model's next forward
(``SiblingInputs`` is the patched model's forward pre-hook), never in the middle of one: a block that activation
checkpointing recomputes during the backward must save the same tensors as when it first ran. From then on the
leader computes every member's output in one call and *holds* the others' outputs; each member, when called with
that same tensor, takes its output instead of computing it. Nothing is assumed about module names or model
classes.

Safe by construction: a held output is handed over only for the very tensor (and version) it was computed from,
and only to a layer whose own checks already chose the fused path; anything else (an input changed in place, a
member called with another tensor, called with extra arguments, or never called) discards it and the member
computes its own output, the unused held one getting no gradient. Held outputs are dropped as soon as a call
on another tensor begins, so they never outlive their input's turn. State is per thread. Code that
``torch.compile`` traces does not group (a compiled graph cannot depend on this Python state).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["SiblingInputs"]


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.input: Callable[[], Tensor | None] = lambda: None  # weak reference to the current run's input
        self.version = -1
        self.run: list[nn.Module] = []
        self.held: dict[nn.Module, Tensor] = {}


def _identity(x: Tensor) -> int | None:
    """x's version counter, or None when it has none (inference tensors) and so cannot be matched safely."""
    if x.is_inference():
        return None
    return x._version


class SiblingInputs:
    """The groups of one patched model (leader -> members, leader first) and the per-thread call tracking."""

    def __init__(self) -> None:
        self._groups: dict[nn.Module, tuple[nn.Module, ...]] = {}  # in effect for the current forward
        self._learnt: dict[nn.Module, tuple[nn.Module, ...]] = {}  # as the calls seen so far show them
        self._state = _ThreadState()

    def __call__(self, model: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the patched model: a new forward begins, and the groups learnt so far take effect."""
        if torch.compiler.is_compiling():  # compiled graphs run every layer on its own (no Python state to guard)
            return
        self._close_run()
        self._groups = dict(self._learnt)

    def __getstate__(self) -> dict:  # pickling / deepcopy: the groups are learnt again, thread state is per thread
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def observe(self, layer: nn.Module, x: Tensor) -> bool:
        """Record that ``layer`` takes the fused path on ``x``; False when ``x`` cannot be tracked (no grouping)."""
        version = _identity(x)
        state = self._state
        if version is not None and state.input() is x and state.version == version and layer not in state.run:
            state.run.append(layer)
            return True
        self._close_run()
        if version is None:
            return False
        state.input, state.version, state.run = weakref.ref(x), version, [layer]
        return True

    def group_led_by(self, layer: nn.Module) -> tuple[nn.Module, ...] | None:
        """The members (``layer`` first) of the group ``layer`` leads in this forward (learnt before it); else None."""
        return self._groups.get(layer)

    def hold(self, layer: nn.Module, x: Tensor, output: Tensor) -> None:
        """Keep ``output`` for ``layer``'s coming call on ``x`` (the input ``observe`` last saw)."""
        if self._state.input() is x:
            self._state.held[layer] = output

    def take(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        """The output held for ``layer`` if it was computed from this very ``x``; else None."""
        state = self._state
        output = state.held.pop(layer, None)
        if output is None or state.input() is not x or state.version != _identity(x):
            return None
        return output

    def _close_run(self) -> None:
        state = self._state
        run = state.run
        if len(run) >= 2:
            self._learnt[run[0]] = tuple(run)
            for member in run[1:]:
                self._learnt.pop(member, None)
        elif run:
            self._learnt.pop(run[0], None)
        state.run, state.held = [], {}
        state.input, state.version = (lambda: None), -1
