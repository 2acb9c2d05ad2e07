"""Output files (``export -o``, ``report --html``): never onto the store, never half written.

:func:`guard_output` refuses, before the store is opened or a byte is written, an output path
that is the store or one of its companion files: for a SQLite store the file itself, its
``-wal``, ``-shm`` and ``-journal`` files and anything whose name starts with ``<db>.spill``
(the spill file and its ``.loading`` / ``.rejected`` leftovers), beside the store as named and
beside the file it resolves to; for a Postgres URL, the spill file
:func:`mcpmeter.store.spill.spill_locations` names, and anything starting with their names. Paths
are compared resolved (symlinks, ``..``, relative names) and, when both exist, by inode
(:func:`os.path.samefile`), which catches hard links.

:func:`atomic_output` writes through a temporary file beside the target (``.<name>.<random>.tmp``
from :func:`tempfile.mkstemp`), fsyncs it and :func:`os.replace` s it onto the target, so the
target is either its old self or the complete new file: a failure at any point removes the
temporary file and leaves an existing target byte for byte as it was (it is never truncated
first). Choices:

- Mode: an existing target keeps its permission bits (and, where allowed, its owner); a new
  file gets ``0o666`` less the umask, as a plain ``open()`` would give it (``0o644`` with the
  usual umask ``022``).
- A target that exists but cannot be written by us (no write permission) is refused, as a
  plain ``open()`` would refuse it, rather than replaced behind the owner's back.
- A symlink target is written through: the file it points to is replaced, the link stays.
- A target that is not a regular file (``/dev/stdout``, ``/dev/null``, a named pipe) has
  nothing to replace and is written in place.
- A target with other hard links is replaced under this name only; the other names keep the
  old content (the price of an atomic rename).

:func:`write_output` is :func:`atomic_output` for content already whole in memory (the HTML
page).

:func:`writing_stdout` does for stdout what :func:`atomic_output` does for a file's errors: a
write or the final flush failing (``/dev/full``, a full disk behind a redirect, EIO) is one
line and exit 1, not a traceback, and nothing is reported twice at exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mcpmeter.errors import MeterError, UsageError

#: The files SQLite keeps beside a database, by suffix, and what to call them.
SQLITE_COMPANIONS = (
    ("", "the store"),
    ("-wal", "the write-ahead log of the store"),
    ("-shm", "the shared-memory index of the store"),
    ("-journal", "the rollback journal of the store"),
)
#: Beside a SQLite store, every file whose name starts with ``<db>`` + this is a spill file.
SPILL_PREFIX = ".spill"


def guard_output(target: Path, location: str, *, option: str = "-o") -> None:
    """Raise :class:`UsageError` if writing ``target`` could destroy the store at ``location``.

    Also refuses a ``target`` that is a directory, so that every reason not to write is
    known before the store is opened.
    """
    what = _store_file(target, location)
    if what is not None:
        shown = re.sub(r"^([a-z]+://[^:/@]*):[^@]*@", r"\1:***@", location)  # no password in messages
        raise UsageError(f"refusing to write {option} {target}: it is {what} {shown}; choose another file")
    if target.is_dir():
        raise UsageError(f"cannot write {option} {target}: it is a directory")


def _store_file(target: Path, location: str) -> str | None:
    """What of the store ``target`` names (for the message), or None when it is none of it."""
    from mcpmeter.store import is_url
    from mcpmeter.store.spill import spill_locations

    exact: list[tuple[str, str, str]] = []  # (directory, name, what)
    prefixes: list[tuple[str, str, str]] = []
    if not is_url(location):
        for directory, name in _forms(location):
            exact += [(directory, name + suffix, what) for suffix, what in SQLITE_COMPANIONS]
            prefixes.append((directory, name + SPILL_PREFIX, "a spill file of the store"))
    for spill in spill_locations(location):  # the first choice and the fallback locations
        prefixes += [(d, n, "a spill file of the store") for d, n in _forms(str(spill))]

    forms = _forms(str(target))
    for directory, name, what in exact:
        if (directory, name) in forms:
            return what
    for directory, prefix, what in prefixes:
        if any(d == directory and n.startswith(prefix) for d, n in forms):
            return what
    try:
        target_stat = os.stat(target)
    except OSError:
        return None  # a file that does not exist yet is no other file's hard link
    for directory, name, what in exact:
        if _same(target_stat, os.path.join(directory, name)):
            return what
    for directory, prefix, what in prefixes:
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and _same(target_stat, entry.path):
                    return what
    return None


def _forms(path: str) -> set[tuple[str, str]]:
    """``(directory, name)`` pairs a path is known by: as named (its directory resolved) and resolved."""
    absolute = os.path.abspath(path)
    named = (os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    return {named, os.path.split(os.path.realpath(absolute))}


def _same(target_stat: os.stat_result, other: str) -> bool:
    """Whether ``other`` exists and is the file ``target_stat`` describes (same device and inode)."""
    try:
        other_stat = os.stat(other)
    except OSError:
        return False
    return os.path.samestat(target_stat, other_stat)


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[BinaryIO]:
    """Yield a binary file whose content becomes ``target`` only when the block succeeds.

    An ``OSError`` (disk full, file too large, no permission) becomes one ``MeterError``
    line naming the target; any error leaves an existing target untouched.
    """
    try:
        existing: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise _cannot_write(target, exc) from exc
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise UsageError(f"cannot write {target}: it is a directory")
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:  # a device or a pipe (/dev/stdout is a link to one): nothing to replace
            with open(target, "wb") as stream:
                yield stream
        except OSError as exc:
            raise _cannot_write(target, exc) from exc
        return
    final = Path(os.path.realpath(target))  # through a symlink: replace the file, keep the link
    if existing is not None and not os.access(final, os.W_OK):
        raise _cannot_write(target, PermissionError(13, "Permission denied"))

    try:
        fd, temp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise _cannot_write(target, exc) from exc
    out = os.fdopen(fd, "wb")
    try:
        yield out
        out.flush()
        os.fsync(out.fileno())
        out.close()
        if existing is not None:
            if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(OSError):
                    os.chown(temp, existing.st_uid, existing.st_gid)
            os.chmod(temp, stat.S_IMODE(existing.st_mode))
        else:
            os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            out.close()  # closes the descriptor even when the final flush fails
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise _cannot_write(target, exc) from exc
        raise
    _fsync_directory(final.parent)


def write_output(target: Path, data: bytes) -> None:
    """Make ``data`` the content of ``target``, atomically (:func:`atomic_output`)."""
    with atomic_output(target) as out:
        out.write(data)


def _cannot_write(target: Path, exc: OSError) -> MeterError:
    return MeterError(f"cannot write {target}: {exc.strerror or exc}")


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; best effort (some filesystems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def writing_stdout() -> Iterator[None]:
    """Within the block, stdout failing is one :class:`MeterError` line instead of a traceback.

    Everything written in the block is flushed before it ends, so a failure of the last
    write surfaces here. A reader that went away (``BrokenPipeError``) is left to the caller
    (``mcpmeter.__main__`` exits 141 quietly). Either way stdout is then pointed at
    ``/dev/null``, so the interpreter's flush at exit has nowhere to fail.
    """
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        raise
    except OSError as exc:
        _discard_stdout()
        raise MeterError(f"cannot write to stdout: {exc.strerror or exc}") from None


def _discard_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
