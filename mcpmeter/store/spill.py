"""The spill: where audit rows go while the store cannot take them, and how they come back.

Locations. Rows spill beside a SQLite store (``audit.db`` -> ``audit.db.spill.jsonl``) or,
for a Postgres URL, under ``$XDG_DATA_HOME/mcpmeter/`` (see :func:`spill_path_for`). When
that location cannot be written (the store's disk is full, its filesystem read-only), the
writer falls back to ``$MCPMETER_SPILL_DIR`` (default ``$XDG_STATE_HOME/mcpmeter/``), then to
``<tmp>/mcpmeter-<uid>/``, under a name derived from the store's location
(:func:`spill_locations`); recovery looks in every one of them.

Lines. Each line is one JSON object ``{"h": CHECK, "d": [writer, batch, row]}`` where ``row``
is the record's fields in column order, ``writer`` the id of the audit writer that spilled it
and ``batch`` the number of the write it belonged to (null when the row never reached the
store). ``CHECK`` covers the exact bytes of ``d``: ``hmac-sha256:<hex>`` with the chain key
(``MCPMETER_CHAIN_KEY``), else ``sha256:<hex>``. Recovery verifies it before loading: a plain
SHA-256 catches corruption and edits by hand; only the keyed form stops someone who can
write the file and knows the format. With a key configured, unkeyed lines are rejected.

Exactly once. A write that failed may still have committed (a Postgres COMMIT whose answer
was lost; a write still in flight when mcpmeter had to exit). Every write records its batch
number in ``audit_writers`` in the same transaction, and the writer's next write records in
``spill_voids`` any spilled batch it finds committed after all; recovery skips a spilled
batch whose number is its writer's last committed one, or that has a void. See
:class:`mcpmeter.store.base.BatchMark`.

Bad lines. A line that fails its check, is not of the form above, or holds a value the
store cannot take (a wrong type, an integer beyond 64 bits, a timestamp outside years
1..9999, a NUL character) is moved to ``<spill file>.rejected`` with one line on stderr
naming the file and line; the rest of the file loads. Lines written by mcpmeter before the
check existed (bare JSON arrays) are rejected too: ``store recover --accept-unsigned`` loads
them (from the spill files and the ``.rejected`` files) once you have looked.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import msgspec

from mcpmeter.log import warn, warn_once
from mcpmeter.record import INSERT_COLUMNS, STORED_FIELDS, CallRecord

if TYPE_CHECKING:
    from mcpmeter.store.base import Store

#: At most this many bad lines are named one by one on stderr per recovery; then a count.
MAX_NAMED_REJECTS = 10

_INT64 = (-(2**63), 2**63 - 1)
#: POSIX seconds of 0001-01-01 and 9999-12-31T23:59:59.999999.
_TS_RANGE = (-62135596800.0, 253402300799.999999)


def spill_path_for(location: str) -> Path | None:
    """Where rows go first while the store cannot take them.

    Beside a SQLite store (``audit.db`` -> ``audit.db.spill.jsonl``); for a Postgres URL, a
    file under ``$XDG_DATA_HOME/mcpmeter/`` named after the server and database,
    ``spill-<host>[-<port>]-<db>[-<schema>].jsonl`` (the schema when the URL's ``options`` set a
    ``search_path``), so every process writing that database on this host shares it.
    """
    if "://" not in location:
        return Path(location + ".spill.jsonl")
    from mcpmeter.store import default_db

    url = urlsplit(location)
    query = parse_qs(url.query)
    host = url.hostname or (query.get("host") or ["localhost"])[0]
    port = "" if url.port in (None, 5432) else str(url.port)
    parts = [host, port, url.path.lstrip("/") or url.username or ""]
    found = re.search(r"search_path\s*=\s*([^\s,]+)", " ".join(query.get("options", [])))
    if found:
        parts.append(found.group(1))
    name = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", part) for part in parts if part)
    return Path(default_db()).parent / f"spill-{name}.jsonl"


def fallback_dirs() -> list[Path]:
    """Where rows spill when the first location cannot be written, in order."""
    state = os.environ.get("MCPMETER_SPILL_DIR")
    if not state:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        state = str(Path(base) / "mcpmeter")
    return [Path(state), Path(tempfile.gettempdir()) / f"mcpmeter-{os.getuid()}"]


def spill_locations(location: str) -> list[Path]:
    """Every spill file of the store at ``location``: the first choice, then the fallbacks."""
    first = spill_path_for(location)
    if first is None:
        return []
    if "://" in location:
        name = first.name
    else:
        digest = hashlib.sha256(os.path.abspath(location).encode()).hexdigest()[:12]
        name = f"{Path(location).name}-{digest}.spill.jsonl"
    paths = [first]
    for directory in fallback_dirs():
        path = directory / name
        if path not in paths:
            paths.append(path)
    return paths


# -- the line format --------------------------------------------------------------------------


def _key() -> bytes | None:
    """The chain key; a broken key set-up (say a key file others can read) spills with the
    plain check rather than not at all (one warning)."""
    from mcpmeter.errors import MeterError
    from mcpmeter.store.chain import chain_key

    try:
        return chain_key()
    except MeterError as exc:
        warn_once("spill-key", f"{exc}; spill lines carry the plain SHA-256 check meanwhile")
        return None


def _check(payload: bytes, key: bytes | None) -> bytes:
    if key is not None:
        return b"hmac-sha256:" + hmac.new(key, payload, hashlib.sha256).hexdigest().encode()
    return b"sha256:" + hashlib.sha256(payload).hexdigest().encode()


def encode_lines(writer: str, batch: int | None, records: Sequence[CallRecord]) -> bytes:
    """The spill lines for ``records`` (written by ``writer`` as its write ``batch``)."""
    key = _key()
    encode = msgspec.json.encode
    head = encode(writer)
    tag = b"null" if batch is None else str(batch).encode()
    out = []
    for record in records:
        payload = b"[" + head + b"," + tag + b"," + encode(record[:STORED_FIELDS]) + b"]"
        out.append(b'{"h":"' + _check(payload, key) + b'","d":' + payload + b"}\n")
    return b"".join(out)


def _bounded(hint: Any) -> Any:
    """``hint`` with the bounds the store needs (64-bit integers, timestamps in years 1..9999)."""
    args = typing.get_args(hint)
    if hint is int:
        return Annotated[int, msgspec.Meta(ge=_INT64[0], le=_INT64[1])]
    if hint is float:
        return Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _bounded(inner[0]) | None
    return hint


def _record_struct() -> type[msgspec.Struct]:
    hints = typing.get_type_hints(CallRecord)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for name in INSERT_COLUMNS:
        hint = _bounded(hints[name])
        if name == "ts":
            hint = Annotated[float, msgspec.Meta(ge=_TS_RANGE[0], le=_TS_RANGE[1])]
        default = CallRecord._field_defaults.get(name, msgspec.NODEFAULT)
        fields.append((name, hint) if default is msgspec.NODEFAULT else (name, hint, default))
    return msgspec.defstruct("SpilledRecord", fields, array_like=True, forbid_unknown_fields=True)


_Record = _record_struct()
_LINE_TYPE: Any = tuple[str, int | None, _Record]  # type: ignore[valid-type]
_decode_line = msgspec.json.Decoder(_LINE_TYPE).decode
_decode_legacy = msgspec.json.Decoder(_Record).decode
_LINE = re.compile(rb'\A\{"h":"((?:hmac-sha256|sha256):[0-9a-f]{64})","d":(\[.*\])\}\s*\Z', re.DOTALL)


class Spilled(NamedTuple):
    """The rows of one spilled write: ``batch`` None when they never reached the store."""

    writer: str
    batch: int | None
    records: list[CallRecord]


class BadLine(Exception):
    """A spill line that must not be loaded; ``str()`` says why."""


def decode_line(line: bytes, *, accept_unsigned: bool = False) -> tuple[str, int | None, CallRecord]:
    """(writer, batch, record) of one spill line; raises :class:`BadLine`."""
    match = _LINE.match(line)
    if match is None:
        if line.lstrip().startswith(b"["):
            if not accept_unsigned:
                raise BadLine("no integrity check (an older mcpmeter wrote it, or it was added by hand)")
            return "", None, _to_record(_decode(_decode_legacy, line))
        raise BadLine("not a spill line")
    check, payload = match.group(1), match.group(2)
    key = _key()
    if key is None and check.startswith(b"hmac-sha256:"):
        raise BadLine("keyed check, but no chain key is configured (MCPMETER_CHAIN_KEY)")
    if key is not None and not check.startswith(b"hmac-sha256:"):
        raise BadLine("unkeyed check while a chain key is configured")
    if not hmac.compare_digest(check, _check(payload, key)):
        raise BadLine("integrity check failed: the line was altered")
    writer, batch, row = _decode(_decode_line, payload)
    return writer, batch, _to_record(row)


def _decode(decode: Any, data: bytes) -> Any:
    try:
        return decode(data)
    except msgspec.ValidationError as exc:
        raise BadLine(f"bad value: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadLine(f"not JSON: {exc}") from None


def _to_record(row: Any) -> CallRecord:
    values = msgspec.structs.astuple(row)
    for value in values:
        if isinstance(value, str) and "\x00" in value:
            raise BadLine("a NUL character in a text field")
    return CallRecord(*values)


# -- claiming and loading ---------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(spill_path: Path) -> list[Path]:
    """Rename every loadable spill file of ``spill_path`` to a name this process owns.

    The live spill file (``audit.db.spill.jsonl``) and files left half-loaded by a process
    that died (``audit.db.spill.jsonl.<pid>.loading``) are claimed with an atomic rename, so
    two processes never load the same file.
    """
    mine = os.getpid()
    claimed: list[Path] = []
    try:
        loading = sorted(spill_path.parent.glob(spill_path.name + ".*.loading"))
    except OSError:
        return claimed
    for index, path in enumerate([spill_path, *loading]):
        if path != spill_path:
            owner = path.name[len(spill_path.name) + 1 : -len(".loading")].split("-")[0]
            if owner.isdigit() and (int(owner) == mine or _pid_alive(int(owner))):
                continue
        target = path.with_name(f"{spill_path.name}.{mine}-{index}.loading")
        try:
            os.rename(path, target)
        except OSError:
            continue  # absent, or another process claimed it first
        claimed.append(target)
    return claimed


class Rejects:
    """Bad lines moved aside: appended to ``<spill file>.rejected``, named on stderr."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, spill_path: Path, source: Path, number: int, line: bytes, reason: str) -> None:
        self.count += 1
        target = spill_path.with_name(spill_path.name + ".rejected")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.rstrip(b"\n") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            where = f"moved to {target}"
        except OSError as exc:
            where = f"and cannot be moved to {target} ({exc.strerror or exc}): dropped"
        if self.count <= MAX_NAMED_REJECTS:
            warn(f"{source} line {number}: {reason}; {where}")


def read_spill(
    path: Path, data: bytes, spill_path: Path, rejects: Rejects, *, accept_unsigned: bool = False
) -> list[Spilled]:
    """The batches in ``data`` (the claimed spill file ``path``), bad lines moved aside.

    A torn last line (mcpmeter died while spilling) is dropped with a warning: it was never
    acknowledged as written.
    """
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, as every whole write does
    out: list[Spilled] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            writer, batch, record = decode_line(line, accept_unsigned=accept_unsigned)
        except BadLine as exc:
            rejects.add(spill_path, path, number, line, str(exc))
            continue
        if out and out[-1].writer == writer and out[-1].batch == batch:
            out[-1].records.append(record)
        else:
            out.append(Spilled(writer, batch, [record]))
    if torn:
        warn(f"{path}: skipped 1 unreadable spill line (a torn last line)")
    return out


def recover_spill(store: Store, *, accept_unsigned: bool = False) -> int:
    """Load every spill file of ``store`` back into it, exactly once. Returns the rows added.

    Every location of :func:`spill_locations` is searched. Each file's rows and its content
    hash are committed in one transaction, so a file that was loaded but not removed (a
    crash in between) is not loaded twice; rows of a write that reached the store after all
    are skipped (see the module docstring). With ``accept_unsigned``, lines without an
    integrity check (older spill files, and lines rejected for that reason) load too.
    """
    added = 0
    rejects = Rejects()
    for first in spill_locations(store.location):
        claimed = _claim(first)
        if accept_unsigned:
            claimed += _claim_rejected(first)
        for path in claimed:
            data = path.read_bytes()
            batches = read_spill(path, data, first, rejects, accept_unsigned=accept_unsigned)
            added += store.load_spill(hashlib.sha256(data).hexdigest(), batches)
            path.unlink()
    if rejects.count > MAX_NAMED_REJECTS:
        warn(f"{rejects.count} spill lines rejected in all (the first {MAX_NAMED_REJECTS} named above)")
    return added


def _claim_rejected(spill_path: Path) -> list[Path]:
    """The rejected file, renamed for loading (``--accept-unsigned`` only)."""
    source = spill_path.with_name(spill_path.name + ".rejected")
    target = spill_path.with_name(f"{spill_path.name}.{os.getpid()}-r.loading")
    with contextlib.suppress(OSError):
        os.rename(source, target)
        return [target]
    return []
