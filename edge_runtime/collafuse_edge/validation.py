"""Argument checks shared by every package: each names the field, the bad value and the rule.

``bool`` is refused where a number is expected (``True`` is an ``int`` to Python, never to a
user). The error class is the caller's (``ConfigError`` for a config field, ``InputError`` for
a runtime argument, ``ServerConfigError`` for the server's file), so the exit code and the
message prefix stay theirs.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import CollafuseError, InputError


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite-or-infinite real number (int/float, numpy too), not a bool, not NaN."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return not math.isnan(float(value))
    except OverflowError:  # an int beyond float range is still a (huge) number
        return True


def _range_text(low: float | None, high: float | None, kind: str) -> str:
    if low is not None and high is not None:
        return f"{kind} in [{low}, {high}]"
    if low == 1 and kind == "an integer":
        return "a positive integer"
    if low == 0 and kind == "an integer":
        return "a non-negative integer"
    if low is not None:
        return f"{kind} ≥ {low}"
    if high is not None:
        return f"{kind} ≤ {high}"
    return kind


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False, error: type[CollafuseError] = InputError) -> None:
    """Raise ``error`` unless ``value`` is an integer in ``[low, high]`` (bounds optional)."""
    if value is None and allow_none:
        return
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{name} must be {_range_text(low, high, 'an integer')}, got {value!r}")


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 positive: bool = False, finite: bool = True, allow_none: bool = False,
                 error: type[CollafuseError] = InputError) -> None:
    """Raise ``error`` unless ``value`` is a real number (not NaN) within the bounds.

    ``positive`` demands ``value > 0``; ``finite`` (default) refuses ±inf."""
    if value is None and allow_none:
        return
    try:
        ok = is_number(value) and not (finite and math.isinf(float(value)))
    except OverflowError:
        ok = not finite
    if ok and positive and not value > 0:
        ok = False
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        rule = "a positive number" if positive and low is None and high is None else \
            _range_text(low, high, "a positive number" if positive else "a number")
        raise error(f"{name} must be {rule}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple | list, *,
                 error: type[CollafuseError] = InputError) -> None:
    """Raise ``error`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise error(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


__all__ = ["check_choice", "check_int", "check_number", "is_int", "is_number"]
