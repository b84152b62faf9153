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
from typing import Iterator

from moe_gps.errors import UserError, environment_error
from moe_gps.signals import held


def _refuse_non_regular(target: Path, shown: object) -> None:
    from moe_gps.outputs import special_kind

    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{shown}: is a folder; give the file to write")
    kind = special_kind(st.st_mode)
    if kind:
        raise UserError(f"{shown}: is {kind}, not a regular file; refusing to replace it")


def _fsync(path: Path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:      # some file systems cannot sync a folder; the file itself must be synced
            raise
    finally:
        os.close(fd)


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
        _fsync(tmp_path)
        _refuse_non_regular(target, shown)       # may have appeared while the file was written
        os.replace(tmp_path, target)
        _fsync(target.parent, folder=True)
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


def write_csv_atomic(target: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame to ``target`` as CSV atomically (no index, 6 significant digits)."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return Path(target)


def write_parquet_atomic(target: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame to ``target`` as Parquet atomically (no index); or an iterable of
    DataFrames with the same columns, one row group each, so that only one is held at a time."""
    import pandas as pd

    with atomic_path(target) as tmp:
        if isinstance(frame, pd.DataFrame):
            frame.to_parquet(tmp, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer = None
            try:
                for part in frame:
                    table = pa.Table.from_pandas(part, preserve_index=False)
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                raise ValueError(f"{target}: no rows to write")
    return Path(target)
