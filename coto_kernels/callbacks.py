"""``transformers.Trainer`` integration: the authors' callback, plus checkpoint/resume of the CoTo state."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import distributed
from .controller import CoToController

STATE_KEY = "coto_state"


def find_controller(model: Any) -> CoToController | None:
    """The controller ``patch`` attached to ``model`` (or to a module inside it), if any."""
    if model is None:
        return None
    controller = getattr(model, "coto_controller", None)
    if isinstance(controller, CoToController):
        return controller
    for module in getattr(model, "modules", list)():
        controller = module.__dict__.get("coto_controller")
        if isinstance(controller, CoToController):
            return controller
    return None


class CoToCallback(TrainerCallback, ExportableState):
    """Drives a ``CoToController`` from a ``Trainer``.

    - train begin: total steps from ``state.max_steps``; on resume, the saved CoTo state is restored and the
      schedule continues at ``state.global_step``;
    - step end (once per optimizer step, after all gradient-accumulation micro-batches): redraw the gates;
    - evaluation runs in ``model.eval()``, where every adapter is on;
    - checkpoints: the state is stored in ``trainer_state.json`` (``stateful_callbacks``);
    - multi-process runs (``coto_kernels.distributed``): engine options CoTo cannot run under fail at Trainer
      construction; gates are checked identical on every rank at train begin (and every ``check_gates_every``
      optimizer steps if set); gated-off adapters' gradients are cleared before each optimizer step.
    """

    def __init__(self, controller: CoToController | None = None, check_gates_every: int | None = None) -> None:
        # None happens when the Trainer re-creates the callback from a checkpoint
        # (restore_callback_states_from_checkpoint=True); the controller is then found on the model.
        self.controller = controller
        self.check_gates_every = check_gates_every

    def on_init_end(self, args, state, control, model=None, **kwargs):
        distributed.check_trainer_args(args, model, self._controller(model))
        return control

    def _controller(self, model: Any) -> CoToController:
        if self.controller is None:
            self.controller = find_controller(model)
        if self.controller is None:
            raise RuntimeError("CoToCallback has no controller: pass controller.callback() or patch the model first")
        return self.controller

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        controller = self._controller(model)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):
            coto_state = saved.get("attributes", {}).get(STATE_KEY)
            if coto_state is not None:
                controller.load_state_dict(coto_state)
        controller.total_steps = state.max_steps
        controller.set_step(state.global_step)
        distributed.check_engine(model)
        distributed.check_gates_consistent(controller)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._controller(model).clear_inactive_grads()
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        controller = self._controller(model)
        controller.set_step(state.global_step)
        if self.check_gates_every and state.global_step % self.check_gates_every == 0:
            distributed.check_gates_consistent(controller)
        return control

    def state(self) -> dict:
        attributes = {} if self.controller is None else {STATE_KEY: self.controller.state_dict()}
        return {"args": {"check_gates_every": self.check_gates_every}, "attributes": attributes}
