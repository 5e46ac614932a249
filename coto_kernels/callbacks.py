"""``transformers.Trainer`` integration: the authors' callback, checkpoint/resume of the CoTo state, and the
Trainer-argument checks.

Two ways in:

- ``controller = coto_kernels.patch(model, ...)`` then ``callbacks=[coto_kernels.CoToCallback(controller)]``
  (``controller.callback()`` is the same thing);
- ``callbacks=[coto_kernels.CoToCallback(seed=..., ...)]`` alone, for trainers that build the PEFT model
  themselves (TRL's ``SFTTrainer(..., peft_config=...)``): the callback patches the model the Trainer hands to
  ``on_init_end``, which is before the Trainer wraps it for DDP/FSDP.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import ExportableState

from . import distributed
from .config import CoToConfig
from .controller import CoToController
from .patching import patch

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


def check_trainer_args(args: Any, model: Any, controller: CoToController) -> None:
    """Fail at ``Trainer`` construction for engine options CoTo cannot run under (see ``coto_kernels.distributed``)."""
    multi_process = getattr(args, "world_size", 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        raise RuntimeError(
            "coto_kernels does not support DeepSpeed: ZeRO reduces flat gradient partitions, so a gated-off "
            "adapter would get a zero gradient and still be moved by AdamW. Use DDP or FSDP (fsdp_version 2)."
        )
    if not multi_process or not controller.can_skip_adapters:
        return
    if getattr(args, "ddp_static_graph", None):
        raise RuntimeError("CoTo cannot run with TrainingArguments(ddp_static_graph=True): the graph changes "
                           "every step. Leave it unset.")
    find_unused = getattr(args, "ddp_find_unused_parameters", None)
    if find_unused is None:
        # The Trainer's own default: True, except for a PreTrainedModel with gradient checkpointing.
        find_unused = not (isinstance(model, PreTrainedModel) and (
            getattr(model, "is_activation_checkpointing", False) or getattr(args, "activation_checkpointing", False)
        ))
    if getattr(args, "fsdp", None):
        return  # FSDP ignores the DDP flag; check_engine looks at the wrapped model at train begin
    if not find_unused:
        raise RuntimeError(
            f"The Trainer would build DDP with find_unused_parameters=False. {distributed.FIND_UNUSED_HINT}."
        )


class CoToCallback(TrainerCallback, ExportableState):
    """Drives a ``CoToController`` from a ``Trainer`` (and patches the Trainer's model if given patch options).

    ``CoToCallback(controller)`` drives a controller from ``coto_kernels.patch``. ``CoToCallback(**options)``
    (any ``patch`` option: ``seed``, ``initial_p``, ``schedule``, ..., ``config=CoToConfig(...)``, ``backend``,
    ``check_gates``) patches the model the Trainer hands to ``on_init_end`` if it is not patched yet, and then
    drives it the same way. ``CoToCallback()`` does either: it finds the controller on a patched model, or patches
    with the defaults.

    - train begin: total steps from ``state.max_steps``; on resume, the saved CoTo state is restored and the
      schedule continues at ``state.global_step`` (a changed ``max_steps`` re-ramps p against the new total);
    - before each optimizer step: gated-off adapters' gradients are cleared (``clear_inactive_grads``);
    - step end (once per optimizer step, after all gradient-accumulation micro-batches): redraw the gates;
    - evaluation runs in ``model.eval()``, where every adapter is on;
    - checkpoints: the state is stored in ``trainer_state.json`` (``stateful_callbacks``);
    - multi-process runs (``coto_kernels.distributed``): engine options CoTo cannot run under fail at Trainer
      construction; gates are checked identical on every rank at train begin (and every ``check_gates_every``
      optimizer steps if set).
    """

    def __init__(
        self,
        controller: CoToController | None = None,
        check_gates_every: int | None = None,
        *,
        config: CoToConfig | None = None,
        backend: str = "auto",
        check_gates: bool = True,
        **options: Any,
    ) -> None:
        patch_options = config is not None or bool(options) or backend != "auto" or not check_gates
        if controller is not None and patch_options:
            raise ValueError("CoToCallback takes either a controller (from coto_kernels.patch) or patch options, "
                             "not both")
        # None happens when the Trainer re-creates the callback from a checkpoint
        # (restore_callback_states_from_checkpoint=True); the controller is then found on the model.
        self.controller = controller
        self.check_gates_every = check_gates_every
        self.patch_config = CoToConfig.build(config, **options)  # validated now, not at Trainer construction
        self.patch_runtime = {"backend": backend, "check_gates": check_gates}
        self._has_patch_options = patch_options

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.controller is None:
            self.controller = find_controller(model)
            if self.controller is None:
                if model is None:
                    raise RuntimeError("CoToCallback got no model from the Trainer to patch")
                self.controller = patch(model, self.patch_config, **self.patch_runtime)
            elif self._has_patch_options:
                raise RuntimeError(
                    "CoToCallback was given patch options, but the Trainer's model is already patched by "
                    "coto_kernels.patch: pass CoToCallback(controller) instead, or leave the model unpatched"
                )
        check_trainer_args(args, model, self.controller)
        return control

    def _controller(self, model: Any) -> CoToController:
        if self.controller is None:
            self.controller = find_controller(model)
        if self.controller is None:
            raise RuntimeError("CoToCallback has no controller: the Trainer's model is not patched by coto_kernels")
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


# ``controller.callback()`` is an alias of ``CoToCallback(controller)``; registering the class here keeps the
# controller module free of any import of this one.
CoToController.trainer_callback = CoToCallback
