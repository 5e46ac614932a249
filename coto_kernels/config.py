"""``CoToConfig``: the options that define a CoTo run, declared and validated in one place.

Like PEFT's ``LoraConfig``: a dataclass whose fields carry their help text (``field(metadata={"help": ...})``)
and whose ``__post_init__`` rejects a value outside its meaning with a message naming the option. ``patch``,
``CoToController``, ``activation_probability`` and the controller's ``state_dict`` all take their schedule,
grouping and seed from it. Options that only choose *how* the same run is computed (the kernel ``backend``, the
rank-agreement check) are not part of it: they are arguments of ``patch``, as PEFT keeps ``LoraRuntimeConfig``
apart from ``LoraConfig``.

The config is frozen: the controller derives p and the gates from it, so a change goes through
``dataclasses.replace`` (or the controller's ``total_steps`` setter), which validates again.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ScheduleFn = Callable[[int, int | None], float]
Schedule = str | ScheduleFn

SCHEDULES = ("linear", "sine", "exponential", "off")
GRANULARITIES = ("layer", "module")


def as_real(name: str, value: Any, *, type_error: type[Exception] = ValueError) -> float:
    """``value`` as a finite float; NaN/inf is a ``ValueError``, a bool or a string a ``type_error``, naming ``name``.

    Options of a config are one ``ValueError`` family (PEFT's convention); the tools' arguments raise
    ``TypeError`` for a wrong type, as Python's own functions do.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def as_int(name: str, value: Any) -> int:
    """``value`` as an int; a float (even ``2.0``), a bool or a string is a ``ValueError`` naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)  # int, numpy integers; never truncates a float
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


@dataclass(frozen=True)
class CoToConfig:
    """The CoTo schedule, gate grouping and sampler seed (see the field help texts)."""

    initial_p: float = field(default=0.1, metadata={"help": "Activation probability before the first optimizer "
                                                             "step (p0; 0.1 in the authors' code), in [0, 1]."})
    final_p: float = field(default=1.0, metadata={"help": "Activation probability at the end of the ramp, in "
                                                           "(0, 1], at least initial_p."})
    stage1_ratio: float = field(default=0.75, metadata={"help": "Fraction of total_steps over which p ramps from "
                                                                 "initial_p to final_p, in (0, 1]."})
    schedule: Schedule = field(default="linear", metadata={"help": "Shape of the ramp: 'linear' (the authors'), "
                                                                   "'sine' (concave), 'exponential' (convex), 'off' "
                                                                   "(p = 1 always: plain fused LoRA), or a callable "
                                                                   "fn(step, total_steps) -> p."})
    granularity: str = field(default="layer", metadata={"help": "'layer': one gate per transformer block; "
                                                                 "'module': one gate per adapted module."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the gate sampler. None: patch draws one from "
                                                              "torch's default generator (rank 0's under "
                                                              "torch.distributed)."})
    total_steps: int | None = field(default=None, metadata={"help": "Optimizer steps of the run; needed before the "
                                                                     "first step of a ramping schedule (the Trainer "
                                                                     "callback fills it in)."})

    def __post_init__(self) -> None:
        # Frozen: the normalised values (floats, ints) are stored once, here.
        for name in ("initial_p", "final_p", "stage1_ratio"):
            object.__setattr__(self, name, as_real(name, getattr(self, name)))
        if not 0.0 <= self.initial_p <= 1.0:
            raise ValueError(f"initial_p must lie in [0, 1], got {self.initial_p}")
        if not 0.0 < self.final_p <= 1.0:
            raise ValueError(f"final_p must lie in (0, 1], got {self.final_p}")
        if self.initial_p > self.final_p:
            raise ValueError(f"initial_p ({self.initial_p}) must not exceed final_p ({self.final_p})")
        if not 0.0 < self.stage1_ratio <= 1.0:
            raise ValueError(f"stage1_ratio must lie in (0, 1], got {self.stage1_ratio}")
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown CoTo schedule {self.schedule!r}; expected one of {SCHEDULES} or a callable")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.seed is not None:
            object.__setattr__(self, "seed", as_int("seed", self.seed))
        if self.total_steps is not None:
            total = as_int("total_steps", self.total_steps)
            if total <= 0:
                raise ValueError(f"total_steps must be a positive integer or None, got {total}")
            object.__setattr__(self, "total_steps", total)

    @classmethod
    def build(cls, config: CoToConfig | None = None, **options: Any) -> CoToConfig:
        """``config`` (default: the defaults) with ``options`` replacing its fields; unknown names are a TypeError."""
        if config is not None and not isinstance(config, CoToConfig):
            raise TypeError(f"config must be a coto_kernels.CoToConfig, got {type(config).__name__}")
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown CoTo option(s) {unknown}; the options are {cls.option_names()}")
        if config is None:
            return cls(**options)
        return dataclasses.replace(config, **options) if options else config

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @property
    def is_constant(self) -> bool:
        """Whether p never changes (``"off"``, or a named ramp from a value to itself): no total_steps needed."""
        return self.schedule == "off" or (not callable(self.schedule) and self.initial_p == self.final_p)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields; a callable schedule is stored as None (code cannot be serialised)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if callable(values["schedule"]):
            values["schedule"] = None
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> CoToConfig:
        """Inverse of ``to_dict`` (keys that are not options are ignored); ``overrides`` replace fields."""
        names = set(cls.option_names())
        return cls.build(**{**{k: v for k, v in values.items() if k in names}, **overrides})
