"""The tamper-evident chain over the audit log.

Each row's ``hash`` is SHA-256 over the previous row's hash and the row's canonical fields:

    hash(n) = sha256( hash(n-1) + "\\n" + canonical(row n) )     (hash(0) = "")

where ``canonical`` is the compact JSON array of every stored column but ``id`` and
``hash`` (``record.INSERT_COLUMNS``: the documented columns in order, then ``args``), with
REAL columns as floats and INTEGER columns as integers (so a value reads back from any
engine exactly as it was hashed). Rows are chained in ``id``
order, per store.

Concurrent writers: the chain is extended only inside the store's write lock (SQLite's
``BEGIN IMMEDIATE``; an advisory transaction lock on Postgres), by reading the last row's
hash and inserting the batch in the same transaction. So however many ``wrap`` processes
write one store, there is one chain, in id order. Altering, deleting, inserting or
reordering a row breaks the chain at that row (or the next), which ``mcpmeter verify``
reports.

The keyed chain. Anyone who can write the store can also recompute a SHA-256 chain, so the
plain chain only catches accidents and edits by someone who does not recompute it. With a
key (``MCPMETER_CHAIN_KEY``, the key text, or ``MCPMETER_CHAIN_KEY_FILE``, a file holding it;
read once per process, see :func:`chain_key`) a row's hash is instead

    hash(n) = "hmac-sha256:" + hmac_sha256(key, hash(n-1) + "\\n" + canonical(row n))

the same message, keyed, and marked by its prefix, so a log whose writers got a key part-way
(plain rows, then keyed rows) still verifies. :func:`link`, :func:`chain` and :func:`chained`
use the configured key unless told otherwise, so the stores need not know about it.

The rules :func:`verify` applies to keyed rows (a rewrite by someone without the key must
not verify):

- Once keyed, always keyed: a plain row after a keyed row breaks the chain (a downgrade),
  with or without the key at hand.
- With a key configured, plain rows are accepted only before the first keyed row (written
  before keying started; the verdict counts them), and the last row must be keyed: a log
  rewritten entirely with plain hashes does not verify. ``require_key`` accepts no plain row.
- Without the key, keyed rows cannot be checked: they are counted (``unchecked``), their
  form is checked, and the plain rows before them are checked as usual.
"""

from __future__ import annotations

import hmac
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from hashlib import sha256 as _sha256
from typing import Any, Final, Literal, NamedTuple, TypeAlias

import msgspec

from mcpmeter.errors import UsageError
from mcpmeter.record import INSERT_COLUMNS

#: The hashed columns, in order: every stored column but ``id`` and ``hash``.
CHAIN_COLUMNS: tuple[str, ...] = INSERT_COLUMNS
_REAL = frozenset({"latency_ms", "cost_usd"})
_INTEGER = frozenset({"request_bytes", "response_bytes", "error_code"})
GENESIS = ""
_encode = msgspec.json.encode

#: What starts the stored hash of a keyed row (then 64 lowercase hex digits).
KEYED_PREFIX: Final = "hmac-sha256:"
KEY_ENV: Final = "MCPMETER_CHAIN_KEY"
KEY_FILE_ENV: Final = "MCPMETER_CHAIN_KEY_FILE"
NO_KEY_TO_REQUIRE: Final = f"--require-key needs the chain key: set {KEY_ENV} or {KEY_FILE_ENV}"
_KEYED_FORM = re.compile(re.escape(KEYED_PREFIX) + "[0-9a-f]{64}")


_REAL_AT = tuple(i for i, c in enumerate(CHAIN_COLUMNS) if c in _REAL)
_INTEGER_AT = tuple(i for i, c in enumerate(CHAIN_COLUMNS) if c in _INTEGER)


def canonical(fields: Sequence[Any]) -> bytes:
    """The bytes hashed for one row (``fields`` in :data:`CHAIN_COLUMNS` order)."""
    values = list(fields)
    # Only the numeric columns can read back as another type (an integer in a REAL column).
    for i in _REAL_AT:
        value = values[i]
        if value is not None and type(value) is not float:
            values[i] = float(value)
    for i in _INTEGER_AT:
        value = values[i]
        if value is not None and type(value) is not int:
            values[i] = int(value)
    return _encode(values)


# -- the key ------------------------------------------------------------------------------------


class _Configured(Enum):
    KEY = "the key configured in the environment"


#: The default ``key`` of :func:`link`, :func:`chain`, :func:`chained` and :func:`verify`:
#: whatever :func:`chain_key` returns. Pass ``None`` for the plain chain, or the key's bytes.
CONFIGURED: Final = _Configured.KEY
Key: TypeAlias = bytes | Literal[_Configured.KEY] | None

_key_lock = threading.Lock()
#: The key read from the environment, or the one-line reason it could not be: read once.
_key_cache: tuple[bytes | None, str | None] | None = None


def chain_key() -> bytes | None:
    """The configured chain key, or None: read from the environment once per process.

    ``MCPMETER_CHAIN_KEY`` is the key text (an empty value is no key);
    ``MCPMETER_CHAIN_KEY_FILE`` names a file holding it (trailing newlines are not part of
    the key, so ``MCPMETER_CHAIN_KEY="$(cat FILE)"`` is the same key). A key file that group
    or others may read, write or run (any of mode 077) is refused, as ssh refuses a private
    key: :class:`~mcpmeter.errors.UsageError`, one line, raised again on every call, so a
    writer never falls back to the plain chain (its rows spill until the file is fixed).
    """
    cached = _key_cache
    if cached is None:
        with _key_lock:
            cached = _key_cache if _key_cache is not None else _load_key()
    key, problem = cached
    if problem is not None:
        raise UsageError(problem)
    return key


def reload_chain_key() -> bytes | None:
    """Forget the cached key and read the environment again (tests; a process told to)."""
    global _key_cache
    with _key_lock:
        _key_cache = None
    return chain_key()


def _load_key() -> tuple[bytes | None, str | None]:
    """Read the key into the cache (the caller holds ``_key_lock``)."""
    global _key_cache
    _key_cache = _read_key()
    return _key_cache


def _read_key() -> tuple[bytes | None, str | None]:
    text = os.environ.get(KEY_ENV, "")
    path = os.environ.get(KEY_FILE_ENV, "")
    if text and path:
        return None, f"set {KEY_ENV} or {KEY_FILE_ENV}, not both"
    if text:
        return os.fsencode(text), None
    if not path:
        return None, None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return None, f"cannot read the chain key file {path} ({KEY_FILE_ENV}): {exc.strerror}"
    try:
        mode = os.fstat(fd).st_mode
        if os.name == "posix" and mode & 0o077:
            return None, (
                f"the chain key file {path} ({KEY_FILE_ENV}) is open to group or others "
                f"(mode {mode & 0o777:03o}): chmod 600 it"
            )
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read()
    except OSError as exc:
        return None, f"cannot read the chain key file {path} ({KEY_FILE_ENV}): {exc.strerror}"
    finally:
        os.close(fd)
    key = data.rstrip(b"\r\n")
    if not key:
        return None, f"the chain key file {path} ({KEY_FILE_ENV}) is empty"
    return key, None


def resolve_key(key: Key) -> bytes | None:
    """``key``, or the configured key when ``key`` is :data:`CONFIGURED`."""
    return chain_key() if key is CONFIGURED else key


# -- links --------------------------------------------------------------------------------------


def _linker(key: bytes | None) -> Callable[[str, Sequence[Any]], str]:
    if key is None:

        def plain(previous: str, fields: Sequence[Any]) -> str:
            return _sha256(previous.encode() + b"\n" + canonical(fields)).hexdigest()

        return plain

    def keyed(previous: str, fields: Sequence[Any]) -> str:
        return KEYED_PREFIX + hmac.digest(key, previous.encode() + b"\n" + canonical(fields), "sha256").hex()

    return keyed


def link(previous: str, fields: Sequence[Any], key: Key = CONFIGURED) -> str:
    """The hash of a row whose predecessor's hash is ``previous`` (keyed when a key is given
    or, by default, configured)."""
    return _linker(resolve_key(key))(previous, fields)


def chain(previous: str, rows: Iterable[Sequence[Any]], key: Key = CONFIGURED) -> list[str]:
    """Hashes for ``rows`` appended after a row whose hash is ``previous``."""
    linked = _linker(resolve_key(key))
    hashes = []
    for fields in rows:
        previous = linked(previous, fields)
        hashes.append(previous)
    return hashes


def chained(previous: str, rows: Iterable[list[Any]], key: Key = CONFIGURED) -> list[list[Any]]:
    """``rows`` (lists of :data:`CHAIN_COLUMNS` values), each with its hash appended, in place."""
    linked = _linker(resolve_key(key))
    out = []
    for fields in rows:
        previous = linked(previous, fields)
        fields.append(previous)
        out.append(fields)
    return out


def is_keyed(stored: str | None) -> bool:
    """Whether a stored hash is a keyed one."""
    return stored is not None and stored.startswith(KEYED_PREFIX)


# -- verification -------------------------------------------------------------------------------


class Break(NamedTuple):
    """Where the chain breaks: the first row whose stored hash is not what it should be."""

    id: int
    reason: str


class Verdict(NamedTuple):
    rows: int
    first_id: int | None
    last_id: int | None
    broken: Break | None
    #: The last walked row's stored hash (with ``last_id``, the head to keep as a checkpoint).
    head: str | None = None
    #: Keyed rows walked, the first of them, and how many of them went unchecked (no key).
    keyed: int = 0
    first_keyed_id: int | None = None
    unchecked: int = 0
    #: Whether a key was configured (keyed rows checked by HMAC, plain rows only before them).
    with_key: bool = False


_ALTERED = "this row was altered, or the row before it was deleted, inserted or altered"


def verify(
    rows: Iterable[Sequence[Any]],
    previous: str = GENESIS,
    *,
    key: Key = CONFIGURED,
    require_key: bool = False,
) -> Verdict:
    """Walk ``(id, *CHAIN_COLUMNS, hash)`` rows in id order; stop at the first break.

    ``previous`` is the hash of the row before the first one (``GENESIS`` from the start).
    Keyed rows are checked with ``key`` (by default the configured one) under the rules of
    the module docstring; ``require_key`` (which needs a key) accepts no plain row.
    Streaming: memory is constant whatever the number of rows.
    """
    secret = resolve_key(key)
    if require_key and secret is None:
        raise UsageError(NO_KEY_TO_REQUIRE)
    plain, keyed = _linker(None), (_linker(secret) if secret is not None else None)
    keyed_seen = is_keyed(previous)
    count = n_keyed = unchecked = 0
    first_id = last_id = first_keyed_id = None

    def verdict(broken: Break | None) -> Verdict:
        return Verdict(
            count,
            first_id,
            last_id,
            broken,
            previous if count and broken is None else None,
            n_keyed,
            first_keyed_id,
            unchecked,
            secret is not None,
        )

    for row in rows:
        row_id, fields, stored = row[0], row[1:-1], row[-1]
        count += 1
        if first_id is None:
            first_id = row_id
        last_id = row_id
        if stored is None:
            return verdict(Break(row_id, "the row has no hash"))
        if stored.startswith(KEYED_PREFIX):
            n_keyed += 1
            if first_keyed_id is None:
                first_keyed_id = row_id
            keyed_seen = True
            if keyed is None:
                if not _KEYED_FORM.fullmatch(stored):
                    return verdict(Break(row_id, f"stored hash {stored[:24]}... is not a keyed hash's form"))
                unchecked += 1
            else:
                expected = keyed(previous, fields)
                if stored != expected:
                    reason = (
                        f"stored keyed hash {stored[:24]}... is not the HMAC computed with the "
                        f"configured key from its fields and the previous row's hash: {_ALTERED} "
                        "(by someone without the key), or the key is not the one it was written with"
                    )
                    return verdict(Break(row_id, reason))
        else:
            if keyed_seen:
                reason = (
                    "a plain (unkeyed) hash after a keyed row: a downgrade; the rows from here "
                    "were rewritten by someone without the key, or written by a writer that has "
                    f"no key ({KEY_ENV} or {KEY_FILE_ENV})"
                )
                return verdict(Break(row_id, reason))
            if require_key:
                return verdict(Break(row_id, "the row is not keyed, and --require-key accepts no plain row"))
            expected = plain(previous, fields)
            if stored != expected:
                reason = (
                    f"stored hash {stored[:12]}... is not {expected[:12]}... computed from its fields and "
                    f"the previous row's hash: {_ALTERED}"
                )
                return verdict(Break(row_id, reason))
        previous = stored
    if secret is not None and count and not keyed_seen and last_id is not None:
        reason = (
            "a key is configured but no row is keyed: the log was rewritten (or is written) "
            "without the key; plain rows are accepted only before the first keyed row"
        )
        return verdict(Break(last_id, reason))
    return verdict(None)
