"""CoTo under data parallelism (DDP, FSDP, ``torchrun``, ``accelerate``, the Transformers ``Trainer``).

What CoTo needs from a data-parallel engine, and how this module makes sure of it:

- Every rank must gate the same adapters at every step. The sampler is a pure function of ``(seed, step)``;
  ``patch(seed=None)`` takes its seed from rank 0 (``broadcast_seed``) when ``torch.distributed`` is up, and
  ``check_gates_consistent`` all-gathers a fingerprint of ``(seed, step, gates)`` and raises
  ``GateMismatchError`` naming the ranks that disagree. It runs by itself at the first training forward under
  DDP/FSDP (not with ``patch(check_gates=False)``, for loops whose ranks do not all run that forward together)
  and at ``Trainer`` train begin (and every ``check_gates_every`` steps if asked).
- A gated-off adapter takes no part in the forward, so DDP sees an *unused parameter*. The mechanism is DDP's
  own ``find_unused_parameters=True``: the reducer marks the skipped adapters ready at once, and since every
  rank skips the same ones they are globally unused and keep ``grad=None`` (no optimizer update, no AdamW
  momentum or weight decay), while backward still stops below the lowest active adapter. Its cost is one walk
  of the autograd graph per step. ``find_unused_parameters=False`` raises at the first training forward (not
  at DDP's cryptic second-step error), and so does ``static_graph=True`` (the graph changes every step).
- FSDP2 (``fully_shard``) keeps one parameter per adapter tensor and reduces only the gradients that exist:
  it needs nothing. FSDP1 (``FullyShardedDataParallel``) must run with ``use_orig_params=True``; with flat
  parameters a skipped adapter would get a zero gradient inside its flat tensor, which AdamW still applies.
- Order: ``patch`` first, then wrap (DDP, FSDP, ``accelerator.prepare``, ``Trainer``). ``patch`` on an already
  wrapped model raises.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from .controller import CoToController

FIND_UNUSED_HINT = (
    "CoTo switches adapters off, so DDP sees their parameters as unused. Wrap with "
    "DistributedDataParallel(model, find_unused_parameters=True); with the Trainer set "
    "TrainingArguments(ddp_find_unused_parameters=True); with accelerate pass "
    "kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] to Accelerator"
)


class GateMismatchError(RuntimeError):
    """The ranks of a data-parallel run would gate different adapters (or are at different steps)."""


def world_size() -> int:
    """The size of the default process group, 1 when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device(group: Any = None) -> torch.device:
    """Where small control tensors must live for the group's backend (CUDA for NCCL, else CPU)."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int, group: Any = None) -> int:
    """Rank 0's ``seed`` on every rank of ``group`` (a collective: every rank must call it)."""
    if world_size() <= 1:
        return int(seed)
    value = torch.tensor([int(seed)], dtype=torch.int64, device=_collective_device(group))
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(value, src=src, group=group)
    return int(value.item())


def gate_fingerprint(controller: CoToController) -> int:
    """A 62-bit hash of what decides the gates: groups, seed, step, schedule state and the gates themselves."""
    text = repr((controller.groups, controller.seed, controller.global_step, round(controller.p, 12),
                 [bool(g) for g in controller.gates], sorted(controller.overrides().items())))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def check_gates_consistent(controller: CoToController, group: Any = None) -> None:
    """Raise ``GateMismatchError`` unless every rank of ``group`` has the same step and gates.

    A collective (one all-gather of two integers): call it on every rank, at the same point of the loop.
    Without ``torch.distributed`` (or with one process) it returns at once.
    """
    if world_size() <= 1:
        return
    mine = torch.tensor([controller.global_step, gate_fingerprint(controller)], dtype=torch.int64,
                        device=_collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rows = [tuple(int(v) for v in t.tolist()) for t in gathered]
    if len(set(rows)) > 1:
        listing = ", ".join(f"rank {r}: step {s} fingerprint {f:016x}" for r, (s, f) in enumerate(rows))
        raise GateMismatchError(
            f"CoTo gates differ across ranks ({listing}); this rank has seed {controller.seed}, step "
            f"{controller.global_step}, gates {[int(g) for g in controller.gates]}. Ranks must share the seed "
            "(patch(seed=...) with the same value everywhere, or seed=None after init_process_group so rank 0's "
            "seed is broadcast), call controller.step() once per optimizer step on every rank, and set the same "
            "overrides everywhere."
        )


# -- engines ---------------------------------------------------------------------------------------------------


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    return FullyShardedDataParallel


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return None
    return FSDPModule


def wrapper_name(module: nn.Module) -> str | None:
    """The kind of data-parallel wrapper ``module`` is or contains (DDP, FSDP, ``fully_shard``), or None."""
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    for m in module.modules():
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return type(m).__name__
        if fsdp1 is not None and isinstance(m, fsdp1):
            return "FullyShardedDataParallel"
        if fsdp2 is not None and isinstance(m, fsdp2):
            return "fully_shard (FSDP2)"
    return None


def check_not_wrapped(model: nn.Module) -> None:
    """``patch`` must see the bare (PEFT) model: raise if it is already DDP/FSDP-wrapped."""
    kind = wrapper_name(model)
    if kind is not None:
        raise RuntimeError(
            f"coto_kernels.patch got a model wrapped by {kind}. Patch the PEFT model first, then wrap it "
            "(DistributedDataParallel / FSDP / fully_shard / accelerator.prepare / Trainer do the wrapping after "
            "patch): wrappers capture parameters and hooks at wrap time, so patching inside them is unsupported."
        )


def check_ddp(ddp: nn.Module) -> None:
    """Raise if a ``DistributedDataParallel`` wrapper is set up in a way CoTo cannot run under."""
    if getattr(ddp, "static_graph", False):
        raise RuntimeError(
            "CoTo cannot run under DDP with static_graph=True: the set of adapters in the graph changes every "
            "step. Use static_graph=False (TrainingArguments(ddp_static_graph=False)) and find_unused_parameters=True."
        )
    if not getattr(ddp, "find_unused_parameters", True):
        raise RuntimeError(f"DDP was built with find_unused_parameters=False. {FIND_UNUSED_HINT}.")


def check_engine(model: Any) -> None:
    """Check every DDP / FSDP wrapper in ``model`` (the wrapped model) for settings CoTo cannot run under."""
    if not isinstance(model, nn.Module):
        return
    fsdp1 = _fsdp1_class()
    for m in model.modules():
        if isinstance(m, nn.parallel.DistributedDataParallel):
            check_ddp(m)
        elif fsdp1 is not None and isinstance(m, fsdp1) and not getattr(m, "_use_orig_params", True):
            raise RuntimeError(
                "CoTo needs FullyShardedDataParallel(use_orig_params=True) (Trainer/accelerate: fsdp_config "
                "use_orig_params=true), or FSDP2 fully_shard: with flat parameters a gated-off adapter gets a zero "
                "gradient inside its flat tensor, and AdamW still moves it (momentum, weight decay)."
            )


class TrainingGuard:
    """Forward pre-hook for the patched model: engine and gate checks at the first training forward.

    Under DDP (seen through ``DistributedDataParallel._active_ddp_module``, which DDP sets around the inner
    forward) or FSDP it checks the engine options once per wrapper and, unless ``check_gates=False``
    (``patch(check_gates=False)``), the gates once: collectives-free except the one all-gather of the gate check,
    which every rank must reach in its first training forward.

    A class, not a closure, so a patched model pickles, and ``copy.deepcopy`` of the model gives the copy a guard
    over the copy's controller (the controller is an attribute the deepcopy memo maps). The set of wrappers
    already checked is per process and starts empty in a copy.
    """

    def __init__(self, controller: CoToController, check_gates: bool = True) -> None:
        self.controller = controller
        self.check_gates = check_gates
        self._checked: weakref.WeakSet = weakref.WeakSet()

    def __getstate__(self) -> dict[str, Any]:
        return {"controller": self.controller, "check_gates": self.check_gates}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["controller"], state["check_gates"])

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not module.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        if world_size() <= 1:
            return
        ddp = nn.parallel.DistributedDataParallel._get_active_ddp_module()
        wrapper = ddp if ddp is not None else module
        if wrapper in self._checked:
            return
        fsdp2 = _fsdp2_class()
        if ddp is None and not (fsdp2 is not None and isinstance(module, fsdp2)):
            return  # not inside a data-parallel forward we can see
        if ddp is not None and self.controller.can_skip_adapters:
            check_ddp(ddp)
        self._checked.add(wrapper)
        if self.check_gates:
            check_gates_consistent(self.controller)


def training_guard(controller: CoToController, check_gates: bool = True) -> TrainingGuard:
    """The ``TrainingGuard`` hook ``patch`` registers on the model."""
    return TrainingGuard(controller, check_gates)
