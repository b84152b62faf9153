"""Plain-text tables for the terminal (right-aligned numbers, left-aligned text), and tables as
columns (column name -> values) for the output files (:func:`moe_gps.atomic.write_csv_atomic`)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence


def format_value(value: Any, fmt: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt:
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_bytes(b: float | None) -> str:
    """A byte count in binary units, e.g. ``1.50 GiB``; ``-`` for None."""
    if b is None:
        return "-"
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]],
                 title: str | None = None) -> str:
    """Render ``rows`` as an aligned table.

    columns: (key in the row dict, header, format spec such as ".2f" or "" for default).
    """
    cells = [[format_value(r.get(key), fmt) for key, _, fmt in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r.get(key)) for r in rows) for key, _, _ in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def format_indices(indices: Iterable[int]) -> str:
    """``[2, 5, 6, 7]`` -> ``"2,5-7"``."""
    idx = sorted(set(int(i) for i in indices))
    parts, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts)


def concat_columns(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The tables ``parts`` (column name -> values, the same names in each) one after the other."""
    import numpy as np

    parts = list(parts)
    return {n: np.concatenate([np.asarray(p[n]) for p in parts]) for n in (parts[0] if parts else {})}


def rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Rows (dicts) as a table: every key any row has, in the order first seen; None where a row lacks it."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return {n: [r.get(n) for r in rows] for n in names}
