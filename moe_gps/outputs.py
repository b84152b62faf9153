"""Output paths of every command: checked before any work, and locked while a run writes.

* :func:`check_output_file` - the ``-o FILE`` of a command: not a folder, not a special
  file (FIFO, device, socket), not under a regular file, in a folder this process can
  write (or can create).
* :func:`check_output_dir` - the ``-o DIR`` of a command: not a file, and writable (or
  creatable). Both try it: they create the missing folders (or, for an existing folder, a
  file in it) and remove them again, since the permission bits alone do not tell (root,
  /proc, a file system that refuses writes).
* :func:`staged_outputs` - a run's files are written into a hidden folder inside the output
  folder and moved into it together at the end, so that a run cut short (Ctrl-C, a full disk,
  an error) leaves the folder as it was, never new tables beside an earlier run's.
* :func:`locked_output_dir` - create the folder and hold an advisory lock
  (``fcntl.flock``) on it while a run writes there, so that a second run into the same
  folder fails at once with one line naming the first (its pid and command).
  :func:`hold_output_dir` takes the same lock for the rest of the command (the CLI's
  :func:`command_scope` releases it when the command ends).

Each problem is one :class:`~moe_gps.errors.UserError` line that names the flag and
the path. The files themselves are written by :mod:`moe_gps.atomic`.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from moe_gps.errors import UserError
from moe_gps.signals import held

#: name of the lock file inside a locked output folder (removed when the run ends)
LOCK_NAME = ".moe-gps.lock"
#: the name of the folder a run's files are staged in (:func:`staged_outputs`) begins with this
STAGE_PREFIX = ".moe-gps-staging-"
#: the folder :func:`set_aside` keeps an earlier run's files in while a run writes in place
ASIDE_NAME = ".moe-gps-earlier"


def arrow_path(path: str | os.PathLike) -> str:
    """``path`` as pyarrow opens files by name: a UTF-8 string. A name that is not valid UTF-8 (bytes
    Python keeps as surrogates) is a UserError, not pyarrow's traceback."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
        raise UserError(f"{shown}: the file name is not valid UTF-8, which Parquet files (pyarrow) need; "
                        "rename the file or choose another name") from None
    return name


def special_kind(mode: int) -> str | None:
    """'a FIFO', 'a character device', ... for a non-regular, non-folder file mode; None otherwise."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "a special file"


def _where(path: object, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def _stat(p: Path) -> os.stat_result | None:
    try:
        return os.stat(p)          # follows symbolic links: the file that would be written
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None                # checked by _check_folder
    except OSError as err:
        raise UserError(f"{p}: cannot check ({err.strerror})") from None


def _check_folder(folder: Path, where: str) -> None:
    """``folder`` (to be created if missing) can hold new files: its nearest existing ancestor is a
    writable folder."""
    anc = folder
    while True:
        try:
            st = os.stat(anc)
            break
        except FileNotFoundError:
            if anc == anc.parent:
                return
            anc = anc.parent
        except NotADirectoryError:
            anc = anc.parent   # a component above is a file: found on the way up
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{where}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        reason = "permission denied"
        try:
            if os.statvfs(anc).f_flag & os.ST_RDONLY:
                reason = "read-only file system"
        except OSError:
            pass
        raise UserError(f"{where}: cannot write in {anc}/ ({reason})")
    try:
        _try_writing(folder, anc)
    except OSError as err:
        reason = (err.strerror or type(err).__name__)
        raise UserError(f"{where}: cannot write in {anc}/ ({reason[:1].lower() + reason[1:]})") from None


def _try_writing(folder: Path, anc: Path) -> None:
    """Do what writing into ``folder`` needs and undo it: create the missing folders from ``anc`` (its
    nearest existing ancestor) down to it, or, when it exists, a file in it; then remove what was made.
    os.access alone cannot tell, e.g. for root under /proc or on a file system that refuses writes;
    OSError when the file system refuses."""
    if anc == folder:
        with held():              # made and removed before a signal can arrive
            fd, name = tempfile.mkstemp(prefix=".moe-gps-probe-", dir=folder)
            os.close(fd)
            os.unlink(name)
        return
    missing = []
    d = folder
    while d != anc:
        missing.append(d)
        d = d.parent
    made: list[Path] = []
    with held():
        try:
            for d in reversed(missing):
                try:
                    os.mkdir(d)
                except FileExistsError:
                    continue      # made meanwhile by someone else: not ours to remove
                made.append(d)
        finally:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)


def check_output_file(path: str | os.PathLike, flag: str | None = "-o") -> Path:
    """Check the output file ``path`` before any work; returns it as a Path.

    Refuses a folder, a special file and a path under a regular file, and checks that the
    folder it goes in can be written. A symbolic link is judged by the file it points to.
    """
    p = Path(path)
    where = _where(path, flag)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise UserError(f"{where}: not a file name")
    real = Path(os.path.realpath(p))
    st = _stat(real)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"{where}: is a folder; give the file to write")
        kind = special_kind(st.st_mode)
        if kind:
            raise UserError(f"{where}: is {kind}, not a regular file; refusing to replace it")
    _check_folder(real.parent if p.is_symlink() else p.parent, where)
    return p


def check_trace_output(path: str | os.PathLike, flag: str = "-o") -> Path:
    """The output trace file (:func:`check_output_file`), whose name must end in .parquet (a trace is written
    as Parquet whatever the name says)."""
    out = check_output_file(path, flag)
    if not str(path).lower().endswith(".parquet"):
        raise UserError(f"{flag} {path}: a trace is written as Parquet; give a file name ending in .parquet")
    return out


def check_output_dir(path: str | os.PathLike, flag: str | None = "-o") -> Path:
    """Check the output folder ``path`` before any work; returns it as a Path."""
    p = Path(path)
    where = _where(path, flag)
    if str(path) == "":
        raise UserError(f"{where}: not a folder name")
    real = Path(os.path.realpath(p))
    st = _stat(real)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        kind = special_kind(st.st_mode) or "a file"
        raise UserError(f"{where}: exists and is {kind}, not a folder")
    _check_folder(p, where)
    return p


def _holder(lock: Path) -> str:
    """The holder's line in the lock file (it writes it just after taking the lock)."""
    for _ in range(10):
        try:
            text = lock.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.02)
    return "another process"


def _take_lock(lock: Path, where: str) -> int:
    """Open ``lock`` and take its exclusive flock (not blocking); UserError naming the holder."""
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{where}: cannot write in the folder ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{where}: another run is writing to this folder ({_holder(lock)}); wait for it to "
                            "finish or choose another folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass                 # the holder removed the file as we opened it: take the lock afresh
        os.close(fd)


def _program() -> str:
    prog = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    return "moe-gps" if prog.replace(os.sep, "/").endswith("moe_gps/cli/main.py") else Path(prog).name


@contextlib.contextmanager
def locked_output_dir(path: str | os.PathLike, flag: str | None = "-o") -> Iterator[Path]:
    """Check ``path`` (:func:`check_output_dir`), create it and hold its lock while the block runs.

    A second run into the same folder fails at once: ``UserError`` naming the first run
    (pid, start time, command). The lock file is removed at the end; the folders this call
    created (the output folder and any missing folder above it) are removed again if the run left
    them empty (e.g. it failed before writing).
    """
    p = check_output_dir(path, flag)
    where = _where(path, flag)
    created = [d for d in (p, *p.parents) if not d.exists()]         # the folders mkdir makes, deepest first
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{where}: cannot create the folder ({err.strerror})") from None
    lock, fd = p / LOCK_NAME, None
    try:
        with held():              # taken and named before a signal can arrive, so the clean-up below knows it
            fd = _take_lock(lock, where)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                             f"{' '.join([_program()] + sys.argv[1:])}\n".encode("utf-8", "surrogateescape"))
            except OSError as err:
                raise UserError(f"{where}: cannot write in the folder ({err.strerror})") from None
        yield p
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)
        for d in created:
            try:
                d.rmdir()            # only when empty
            except OSError:
                break


_SCOPES: list[contextlib.ExitStack] = []


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Locks taken by :func:`hold_output_dir` inside the block are released when it ends."""
    with contextlib.ExitStack() as stack:
        _SCOPES.append(stack)
        try:
            yield
        finally:
            _SCOPES.remove(stack)


def hold_output_dir(path: str | os.PathLike, flag: str | None = "-o") -> Path:
    """:func:`locked_output_dir` until the current :func:`command_scope` ends (else until exit)."""
    if _SCOPES:
        return _SCOPES[-1].enter_context(locked_output_dir(path, flag))
    import atexit

    stack = contextlib.ExitStack()
    atexit.register(stack.close)
    return stack.enter_context(locked_output_dir(path, flag))


def fsync_path(path: Path, folder: bool = False) -> None:
    """Flush a file (or, ``folder``, a folder's entries: a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:      # some file systems cannot sync a folder; the file itself must be synced
            raise
    finally:
        os.close(fd)


#: in an output folder: the files moe-gps runs wrote there (relative paths, one a line), so that a later
#: run removes only its own command's stale files, never a file of the user's that has the same name
MANIFEST = ".moe-gps-files"


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path once links and spellings such as ``./x`` are
    resolved, or, where both exist, the same file (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Staged:
    """The files of one run, staged (:func:`staged_outputs`). path: the folder to write them into;
    after the block, removed: an earlier run's optional files removed because this run did not make
    them; kept: optional files this run did not make that no earlier run is recorded to have written
    (the user's own, or an old version's), left alone."""

    def __init__(self, path: Path, out: Path) -> None:
        self.path, self.out = path, out
        self.removed: list[Path] = []
        self.kept: list[Path] = []

    def final(self, paths: list) -> list[Path]:
        """Where files written into :attr:`path` are once moved into the output folder (same order)."""
        return [self.out / Path(p).relative_to(self.path) for p in paths]


def _name_the_output(err: BaseException, stage: Path, out: Path) -> None:
    """An error about a file being written into the staging folder names the file it was to become in
    ``out`` (a full disk, say), not the hidden folder."""
    if isinstance(err, OSError) and isinstance(err.filename, str):
        err.filename = err.filename.replace(str(stage), str(out))
    elif isinstance(err, UserError) and err.args and isinstance(err.args[0], str):
        err.args = (err.args[0].replace(str(stage), str(out)), *err.args[1:])


def _manifest(out: Path) -> set[str]:
    """The files :data:`MANIFEST` in ``out`` records (none where it is missing or unreadable)."""
    try:
        return {line for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines() if line}
    except (OSError, UnicodeDecodeError):
        return set()


def _same_content(new: Path, old: Path) -> bool:
    """Whether ``new`` says what ``old`` says: the same bytes, or YAML files of the same data (their comments,
    such as the command line a config's header records, aside)."""
    if filecmp.cmp(new, old, shallow=False):
        return True
    if new.suffix not in (".yaml", ".yml"):
        return False
    import yaml

    try:
        return yaml.safe_load(new.read_text(encoding="utf-8")) == yaml.safe_load(old.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False


@contextlib.contextmanager
def staged_outputs(out: str | os.PathLike, optional: tuple[str, ...] = (),
                   stop: Callable[[], None] | None = None,
                   inputs: tuple[str | os.PathLike | None, ...] = ()) -> Iterator[Staged]:
    """Write a run's files into ``Staged.path``, a hidden folder inside ``out`` (held locked by the
    caller); when the block ends without an error they move into ``out`` together (renames in one file
    system, with signals held), replacing an earlier run's files of the same names, and the earlier run's
    files named in ``optional`` (paths relative to ``out``: plots, a timeline) that this run did not make
    are removed where :data:`MANIFEST` records that a run wrote them (else they are kept: ``Staged.kept``).
    On an error or a signal, ``stop`` ends whatever else still writes into the staging
    folder (a process drawing the plots), the folder is removed and ``out`` keeps what it had. Staging
    folders a killed run left behind are removed first. A file of this run that would replace or remove
    one of ``inputs`` (the files the run read: a trace named layers.parquet in ``out``) is a UserError
    before anything moves, unless it holds what the input holds (:func:`_same_content`: a rerun from the
    config.yaml a run wrote), and then the input stays as it is."""
    out = Path(out)
    for old in out.glob(STAGE_PREFIX + "*"):          # a run killed outright (SIGKILL) left it: the lock is ours
        shutil.rmtree(old, ignore_errors=True)
    try:
        with held():              # made and remembered before a signal can arrive
            stage = Staged(Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out)), out)
    except OSError as err:
        raise UserError(f"{out}: cannot write in the folder ({err.strerror})") from None
    try:
        try:
            yield stage
        except BaseException as err:
            if stop is not None:
                stop()
            _name_the_output(err, stage.path, out)
            raise
        earlier = _manifest(out)
        made = {f.relative_to(stage.path).as_posix() for f in stage.path.rglob("*") if f.is_file()}
        stale = [name for name in optional if name not in made and (out / name).is_file()]
        ours = sorted(made | {name for name in earlier if name not in stale and (out / name).is_file()})
        (stage.path / MANIFEST).write_text("".join(f"{name}\n" for name in ours if name != MANIFEST),
                                           encoding="utf-8")
        rels = sorted(Path(name) for name in made | {MANIFEST})
        read = [p for p in inputs if p is not None and Path(p).is_file()]
        held_by_input = set()
        for rel in [*rels, *(Path(n) for n in stale if n in earlier)]:    # before any moves: the inputs stay
            hit = next((p for p in read if same_file(p, out / rel)), None)
            if hit is None:
                continue
            if rel in rels and _same_content(stage.path / rel, Path(hit)):
                held_by_input.add(rel)    # a rerun from the config it wrote: the input already says it; it stays
                continue
            raise UserError(f"{out / rel}: this run's {rel} would {'replace' if rel in rels else 'remove'} "
                            f"its input {hit}; write to another folder (-o)")
        rels = [rel for rel in rels if rel not in held_by_input]
        for rel in rels:          # checked before any moves: a folder where a file goes, a file where a folder
            if (out / rel).is_dir():
                raise UserError(f"{out / rel}: a folder where this run writes the file {rel}; move it")
            for d in (out.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))):
                if d.exists() and not d.is_dir():
                    raise UserError(f"{d}: a file where this run writes the folder {d.name}/; move it")
        with held():              # every file moves, or (a signal before the block) none
            for rel in rels:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage.path / rel, out / rel)
            for d in sorted({(out / rel).parent for rel in rels}):
                fsync_path(d, folder=True)                # the renames on disk, as the atomic writers' are
            for name in stale:
                if name in earlier:
                    (out / name).unlink()
                    stage.removed.append(out / name)
                else:
                    stage.kept.append(out / name)
    finally:
        shutil.rmtree(stage.path, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def set_aside(out: str | os.PathLike, rels: list[str | os.PathLike]) -> Iterator[None]:
    """For a run that must write in place (its files record their own paths, as validate's runs do): the
    earlier files and folders at ``rels`` (relative to ``out``, held locked by the caller) move into
    ``out/.moe-gps-earlier`` first. When the block ends without an error that folder is removed; on an error
    or a signal what the block wrote at those paths is removed and the earlier files move back, so that
    ``out`` keeps what it had. A folder left by a run killed outright is a UserError naming it."""
    out = Path(out)
    aside = out / ASIDE_NAME
    if aside.exists():
        raise UserError(f"{aside}: the files of an earlier run in {out} that was killed before it ended; move "
                        "them back into the folder, or remove it")
    paths = sorted({Path(r) for r in rels})
    with held():                    # every earlier file moves aside, or (a signal before the block) none
        moved = []
        for rel in paths:
            if (out / rel).exists() or (out / rel).is_symlink():
                (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(out / rel, aside / rel)
                moved.append(rel)
    try:
        yield
    except BaseException:
        with held():
            for rel in paths:
                _remove(out / rel)
            for rel in moved:
                os.replace(aside / rel, out / rel)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
