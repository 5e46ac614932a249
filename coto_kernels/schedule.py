"""The CoTo activation-probability schedule p(step).

The authors' callback (github zwebzone/coto) computes, after ``k`` completed optimizer steps::

    p(k) = min(p_final, p0 + (p_final - p0) * k / ceil(total_steps * stage1_ratio))

and uses ``p0`` before the first step. The paper's schedule ablation also tries a concave ("sine") and a
convex ("exponential") ramp with the same end points; all three reach ``p_final`` at ``stage1_ratio`` of
training and stay there.
"""

from __future__ import annotations

import math
from typing import Any

from .config import SCHEDULES, CoToConfig, Schedule, ScheduleFn

__all__ = ["SCHEDULES", "Schedule", "ScheduleFn", "activation_probability", "stage1_steps"]

# Curvature of the convex ramp: (e^{a t} - 1) / (e^a - 1). a = 4 keeps p below half of the way up until
# ~83% of stage 1, a clearly convex shape without starving the first half of training.
EXPONENTIAL_CURVATURE = 4.0


def _ramp(shape: str, progress: float) -> float:
    """Map progress through stage 1 (0..1) to the fraction of the way from p0 to p_final."""
    if shape == "linear":
        return progress
    if shape == "sine":
        return math.sin(0.5 * math.pi * progress)
    if shape == "exponential":
        return math.expm1(EXPONENTIAL_CURVATURE * progress) / math.expm1(EXPONENTIAL_CURVATURE)
    raise ValueError(f"unknown CoTo schedule {shape!r}; expected one of {SCHEDULES} or a callable")


def stage1_steps(total_steps: int, stage1_ratio: float) -> int:
    """Number of optimizer steps over which p ramps up (the authors' ``ceil(max_steps * stage1_ratio)``)."""
    return max(1, math.ceil(total_steps * stage1_ratio))


def activation_probability(
    step: int, total_steps: int | None = None, *, config: CoToConfig | None = None, **options: Any
) -> float:
    """Probability that an adapter group is active after ``step`` completed optimizer steps.

    The run is ``config`` (default ``CoToConfig()``) with ``total_steps`` and any ``CoToConfig`` field given as a
    keyword (``initial_p``, ``final_p``, ``stage1_ratio``, ``schedule``) replacing its own. ``schedule`` is
    ``"linear"`` (the authors' callback), ``"sine"`` (concave), ``"exponential"`` (convex), ``"off"`` (always 1:
    plain fused LoRA), or a callable ``fn(step, total_steps) -> p`` that returns p itself. A constant schedule
    (``"off"``, or ``initial_p == final_p``) needs no ``total_steps``.
    """
    if total_steps is not None:
        options["total_steps"] = total_steps
    config = CoToConfig.build(config, **options)
    schedule = config.schedule
    if callable(schedule):
        p = float(schedule(step, config.total_steps))
        if not 0.0 <= p <= 1.0:  # NaN fails too
            raise ValueError(f"the CoTo schedule callable returned p={p} at step {step}; p must lie in [0, 1]")
        return p
    if schedule == "off":
        return 1.0
    if step <= 0 or config.is_constant:
        return config.initial_p
    if config.total_steps is None:
        raise ValueError(
            "CoTo needs total_steps to advance the schedule: pass patch(..., total_steps=N), set "
            "controller.total_steps, or use coto_kernels.CoToCallback with a transformers Trainer"
        )
    progress = min(1.0, step / stage1_steps(config.total_steps, config.stage1_ratio))
    return min(config.final_p, config.initial_p + (config.final_p - config.initial_p) * _ramp(schedule, progress))
