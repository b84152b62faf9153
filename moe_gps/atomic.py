"""Atomic output: write to a temporary name beside the target, then rename.

An interrupted run never leaves a half-written file, and an existing file at the
target is replaced only once the new one is complete. The new file is flushed to disk
(``fsync``) before the rename, and its folder after it, so that a crash of the machine
leaves either the old file or the whole new one. Only a regular file is ever replaced:
a folder, FIFO, device or socket at the target is refused (a symbolic link is followed,
and the file it points to is replaced). A failure of the file system (disk full, no
permission, read-only) is one :class:`~moe_gps.errors.UserError` naming the target.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from moe_gps.errors import UserError, environment_error
from moe_gps.outputs import arrow_path, fsync_path, special_kind
from moe_gps.signals import held


def _refuse_non_regular(target: Path, shown: object) -> None:
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{shown}: is a folder; give the file to write")
    kind = special_kind(st.st_mode)
    if kind:
        raise UserError(f"{shown}: is {kind}, not a regular file; refusing to replace it")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left untouched; an
    ``OSError`` of the file system becomes a ``UserError`` naming ``target``.
    """
    shown = target
    target = Path(os.path.realpath(target))       # through a symbolic link, to the file it names
    _refuse_non_regular(target, shown)
    tmp_path = None
    try:
        with held():                               # the new file is named here before a signal can arrive
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            tmp_path = Path(tmp)
            os.close(fd)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        yield tmp_path
        fsync_path(tmp_path)
        _refuse_non_regular(target, shown)       # may have appeared while the file was written
        os.replace(tmp_path, target)
        fsync_path(target.parent, folder=True)
    except BaseException as err:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        mapped = environment_error(err, shown) if isinstance(err, OSError) else None
        if mapped is not None:
            raise mapped from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv_atomic(target: str | os.PathLike, columns: Mapping[str, Any], exact: tuple[str, ...] = ()) -> Path:
    """Write a table to ``target`` as CSV atomically: ``columns`` maps each column's name to its
    values (sequences of one length; a pandas DataFrame is such a mapping). Floats have 6 significant
    digits (``%.6g``), or, in the columns named in ``exact``, the shortest text that reads back the same
    float; a missing value (None or NaN) is an empty field, a column of Python numbers with a float or a
    None in it is a float column (as pandas reads it back)."""
    import csv
    import io

    names = list(columns)
    fields = [_csv_fields(columns[n], n in exact) for n in names]
    if len({len(f) for f in fields}) > 1:
        raise ValueError(f"{target}: columns of different lengths: "
                         + ", ".join(f"{n} {len(f)}" for n, f in zip(names, fields)))
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(names)
    out.writerows(zip(*fields))
    with atomic_path(target) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(target)


def _column(values: Any):
    """One column's values as a NumPy array, typed as pandas would type them: Python numbers with a
    None among them are floats (None as NaN); text, or anything mixed, stays an object array."""
    import numpy as np

    a = values if isinstance(values, np.ndarray) else np.asarray(values)
    if a.dtype.kind == "O":
        vals = a.tolist()
        if vals and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals):
            return np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
    return a


def _csv_fields(values: Any, exact: bool = False) -> list[str]:
    """One column's CSV fields (:func:`write_csv_atomic`)."""
    a = _column(values)
    if a.dtype.kind == "f":
        return ["" if x != x else (repr(x) if exact else "%.6g" % x) for x in a.tolist()]
    if a.dtype.kind != "O":
        return [str(x) for x in a.tolist()]
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in a.tolist()]


def write_parquet_atomic(target: str | os.PathLike,
                         tables: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> Path:
    """Write a table (column name -> values, as for :func:`write_csv_atomic`) to ``target`` as Parquet
    atomically; or an iterable of tables with the same columns, one row group each, so that only one
    is held at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [tables] if isinstance(tables, Mapping) else tables
    with atomic_path(arrow_path(target)) as tmp:
        writer = None
        try:
            for part in parts:
                table = pa.Table.from_arrays([_arrow_column(v) for v in part.values()], names=list(part))
                writer = writer or pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"{target}: no rows to write")
    return Path(target)


def _arrow_column(values: Any):
    """One column as an Arrow array, made from its buffers (pyarrow's own conversions import pandas, a
    third of a second): numbers as they are with NaN as null (as pandas writes it), booleans, and
    anything else as text (``large_string``; None as null)."""
    import numpy as np
    import pyarrow as pa

    a = _column(values)
    n = len(a)
    if a.dtype.kind == "b":
        return pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(np.packbits(a, bitorder="little"))])
    if a.dtype.kind in "iuf":
        a = np.ascontiguousarray(a)
        missing = np.isnan(a) if a.dtype.kind == "f" else np.zeros(n, dtype=bool)
        return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), n, [_validity(missing), pa.py_buffer(a)],
                                     null_count=int(missing.sum()))
    missing = np.array([v is None for v in a.tolist()], dtype=bool)
    if n and not missing.any() and (a == a[0]).all():                 # one value: its bytes n times
        one = str(a[0]).encode()
        data, offsets = one * n, np.arange(n + 1, dtype=np.int64) * len(one)
    else:
        text = [b"" if m else str(v).encode() for v, m in zip(a.tolist(), missing)]
        data, offsets = b"".join(text), np.concatenate([[0], np.cumsum([len(t) for t in text])]).astype(np.int64)
    return pa.Array.from_buffers(pa.large_string(), n,
                                 [_validity(missing), pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=int(missing.sum()))


def _validity(missing):
    """An Arrow validity bitmap (None when nothing is missing)."""
    import numpy as np
    import pyarrow as pa

    return pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None
