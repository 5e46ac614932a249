"""Argument checks of the tools: a wrong value is an error naming the argument, never silently coerced."""

from __future__ import annotations

import numbers
import operator
from typing import Any

from ..config import as_real


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (numpy integers too); a bool, a float (even ``2.0``) or a string is a ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def finite(name: str, value: Any) -> float:
    """``value`` as a finite float; a bool or a string is a ``TypeError``, NaN or an infinity a ``ValueError``."""
    return as_real(name, value, type_error=TypeError)
