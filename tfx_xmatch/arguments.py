"""Checks of constructor arguments, shared by the layers, indexes and models.

Each check names the argument and quotes the value, accepts NumPy scalars as well as Python
numbers (configs and arrays hand those over), and returns the value as a plain Python number so
``get_config`` stays JSON-serializable. They run in ``__init__``, before any weight exists, so a
bad value never surfaces later as a Keras shape error that names some inner layer's argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import numpy as np


def is_integer(value) -> bool:
    """True for Python and NumPy integers (bool excluded), False for tensors and the rest."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value, minimum: Optional[int] = None) -> int:
    """``value`` as an int, if it is an integer of at least ``minimum``.

    Raises:
      ValueError: Not an integer (a float such as 2.7 included), or below ``minimum``.
    """
    if not is_integer(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def optional_integer(name: str, value, minimum: Optional[int] = None) -> Optional[int]:
    """``integer``, except that None passes through as None.

    Raises:
      ValueError: Neither None nor an integer of at least ``minimum``.
    """
    if value is None:
        return None
    try:
        return integer(name, value, minimum)
    except ValueError:
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound} or None, got {value!r}") from None


def boolean(name: str, value) -> bool:
    """``value`` as a bool, if it is one (Python or NumPy); the string "false" is not.

    Raises:
      ValueError: Not a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def real(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, if it is a real number within the (closed unless open) bounds.

    Raises:
      ValueError: Not a real number, or outside the bounds.
    """
    # NaN and inf pass every comparison a bound makes (or fail none that matters): a NaN weight
    # trained a NaN model, an infinite temperature scored every item 0.
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        left, right = ("(" if low is None else left), (")" if high is None else right)
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def widths(name: str, values: Iterable, allow_empty: bool = True) -> tuple:
    """A sequence of layer widths, each an integer >= 1, as a tuple of ints.

    Raises:
      ValueError: Not a sequence of integers >= 1 (or empty when ``allow_empty`` is False).
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of widths (integers >= 1), got {values!r}")
    values = tuple(values)
    if (not values and not allow_empty) or not all(is_integer(value) and value >= 1 for value in values):
        what = "one or more" if not allow_empty else "a list of"
        raise ValueError(f"{name} must be {what} widths (integers >= 1), got {values!r}")
    return tuple(int(value) for value in values)
