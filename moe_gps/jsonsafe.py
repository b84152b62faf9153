"""JSON that strict parsers accept: NaN and infinities become ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which is not JSON. Every
JSON the commands print or write goes through :func:`jsonable` / :func:`dumps_json`.
"""

from __future__ import annotations

import json
import math
from typing import Any


def jsonable(v: Any) -> Any:
    """Plain JSON data: NaN and infinities to None, numpy scalars and arrays to Python, other objects to str."""
    import numpy as np

    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`jsonable` ``(obj)``; never writes NaN or Infinity."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)
