"""Keyword options from a config or a strategy name, checked against the annotations of the
function (or class) that takes them, so that a wrong type is one line naming the option,
not a traceback from deep inside a planner or predictor.

Checked annotations: ``float`` (a number, an int too, never NaN), ``int``, ``bool`` (true or
false only: a bool is not a number here), ``str``, and their unions with ``None``. Others
(a time model, an overhead object) are left to the function.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from typing import Any, Callable

import numpy as np

from moe_gps.errors import UserError

#: annotation -> (the Python types a value may have for it, how to say it)
_TYPES = {float: ((float, int, np.floating, np.integer), "a number"), int: ((int, np.integer), "an integer"),
          bool: ((bool, np.bool_), "true or false"), str: ((str,), "a string"), type(None): ((type(None),), "null")}


def check_options(fn: Callable, options: dict[str, Any], where: str) -> None:
    """UserError ``<where>: <option> must be ..., got ...`` for the first option of ``options`` whose
    value does not fit ``fn``'s annotation of it (``fn``: a function, or a class for its ``__init__``)."""
    hints = _hints(fn)
    for key, value in options.items():
        hint = hints.get(key)
        choices = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not all(t in _TYPES for t in choices):
            continue
        fits = any(isinstance(value, _TYPES[t][0]) and (t is bool or not isinstance(value, (bool, np.bool_)))
                   for t in choices)
        if not fits or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            raise UserError(f"{where}: {key} must be {' or '.join(_TYPES[t][1] for t in choices)}, got {value!r}")


@functools.cache
def _hints(fn: Callable) -> dict[str, Any]:
    return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
