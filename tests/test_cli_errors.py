"""What cannot be done is one line on stderr and a non-zero exit, never a traceback; and a
store on a read-only filesystem can still be read.

Every case runs the real ``mcpmeter`` against a real SQLite store filled through the store's
own write path. The read-only cases mount a small tmpfs (the tests run as root, as CI does).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from conftest import MCPMETER, call_record

from mcpmeter.record import COLUMNS
from mcpmeter.store import SQLiteStore

TIMEOUT_S = 60
STATUSES = "ok, error, tool_error, rejected, cancelled, no_response"
LATIN1_CSV = (
    b"ts,request_id,model,prompt_tokens,completion_tokens\n"
    b"2026-01-01T00:00:00Z,r-1,gpt-4o,10,5\n"
    b"2026-01-01T00:00:01Z,r-2,caf\xe9,10,5\n"
)
LATIN1_JSONL = (
    b'{"ts": "2026-01-01T00:00:00Z", "request_id": "r-1", "model": "m", "prompt_tokens": 1,'
    b' "completion_tokens": 1}\n'
    b'{"ts": "2026-01-01T00:00:01Z", "request_id": "r-2", "model": "caf\xe9", "prompt_tokens": 1,'
    b' "completion_tokens": 1}\n'
)
#: Where the first non-UTF-8 byte (0xe9, a Latin-1 e-acute) sits in each file: line, column.
CSV_AT = f"latin1.csv:3: not UTF-8 (byte 0xe9 at column {LATIN1_CSV.splitlines()[2].index(0xE9) + 1})"
JSONL_AT = f"latin1.jsonl:2: not UTF-8 (byte 0xe9 at column {LATIN1_JSONL.splitlines()[1].index(0xE9) + 1})"


def fill(db: Path, n: int = 3) -> None:
    store = SQLiteStore(str(db))
    try:
        store.write_calls([call_record(ts=1_700_000_000.0 + i, jsonrpc_id=str(i)) for i in range(n)])
    finally:
        store.close()


def mcpmeter(args: list[str], cwd: Path, stdout: str | None = None) -> tuple[int, str]:
    """Run ``mcpmeter ARGS`` (stdout to the file ``stdout``, else discarded); (exit code, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["XDG_DATA_HOME"] = str(cwd / "xdg")
    with open(stdout or os.devnull, "wb") as out:
        done = subprocess.run(
            [MCPMETER, *args], stdout=out, stderr=subprocess.PIPE, cwd=cwd, env=env, timeout=TIMEOUT_S
        )
    return done.returncode, done.stderr.decode()


FULL = "/dev/full"  # every write fails with ENOSPC


def case(name: str, args: list[str], code: int, message: str, stdout: str | None = None) -> object:
    """One run: ``args`` ({tmp} is the test's directory), stdout to a file or discarded, the
    exit code and a part of the one line on stderr."""
    return pytest.param(args, stdout, code, message, id=name)


CASES = [
    case("export -o a directory", ["export", "-o", "{tmp}"], 2, "it is a directory"),
    case("export -o in a missing dir", ["export", "-o", "{tmp}/no/out.csv"], 1, "No such file or directory"),
    case("export -o /dev/full", ["export", "-o", FULL], 1, "cannot write /dev/full: No space left"),
    case("export to a full stdout", ["export"], 1, "cannot write to stdout: No space left on device", FULL),
    case("csv to a full stdout", ["export", "--format", "csv"], 1, "cannot write to stdout", FULL),
    case("report to a full stdout", ["report", "--since", "5000d"], 1, "cannot write to stdout", FULL),
    case("invocations to a full stdout", ["report", "invocations"], 1, "cannot write to stdout", FULL),
    case("verify to a full stdout", ["verify"], 1, "cannot write to stdout", FULL),
    case(
        "tail --json to a full stdout", ["tail", "--json", "--no-follow"], 1, "cannot write to stdout", FULL
    ),
    case("prices show to a full stdout", ["prices", "show"], 1, "cannot write to stdout", FULL),
    case("--db /dev/null", ["export", "--db", "/dev/null"], 2, "store /dev/null is not a regular file"),
    case("--db a directory", ["verify", "--db", "{tmp}"], 2, "is a directory"),
    case("--db a URI", ["export", "--db", "file:{tmp}/m.db?mode=memory"], 2, "SQLite URI filenames"),
    case(
        "a write to a URI",
        [
            "ledger",
            "add",
            "--db",
            "file:m.db?mode=memory",
            "--request-id",
            "r",
            "--model",
            "m",
            "--prompt-tokens",
            "1",
            "--completion-tokens",
            "1",
        ],
        2,
        "SQLite URI filenames are not supported",
    ),
    case(
        "export --status bogus",
        ["export", "--status", "bogus"],
        2,
        f"unknown status 'bogus': use one of {STATUSES}",
    ),
    case("report --status bogus", ["report", "--status", "bogus"], 2, "unknown status 'bogus'"),
    case("invocations --status bogus", ["report", "invocations", "--status", "bogus"], 2, "unknown status"),
    case("tail --status bogus", ["tail", "--json", "--status", "bogus"], 2, "unknown status 'bogus'"),
    case("Latin-1 CSV", ["ledger", "import", "{tmp}/latin1.csv"], 1, CSV_AT),
    case("Latin-1 JSON lines", ["ledger", "import", "{tmp}/latin1.jsonl"], 1, JSONL_AT),
]


@pytest.mark.parametrize(("args", "stdout", "code", "message"), CASES)
def test_what_cannot_be_done_is_one_line_on_stderr_and_a_non_zero_exit(
    tmp_path: Path, args: list[str], stdout: str | None, code: int, message: str
) -> None:
    db = tmp_path / "audit.db"
    fill(db)
    (tmp_path / "latin1.csv").write_bytes(LATIN1_CSV)
    (tmp_path / "latin1.jsonl").write_bytes(LATIN1_JSONL)
    companions = [p for p in ("/dev/null-journal", "/dev/null-wal") if not os.path.exists(p)]
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--db" not in argv:
        argv += ["--db", str(db)]

    exit_code, stderr = mcpmeter(argv, tmp_path, stdout)

    assert exit_code == code, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert stderr.startswith("mcpmeter: ") and message in stderr, stderr
    assert "Traceback" not in stderr
    assert not [p for p in companions if os.path.exists(p)]  # nothing created beside a device
    assert not (tmp_path / "file:").exists()  # nor a directory named after a URI
    if argv[:2] == ["ledger", "import"]:  # the rows before the bad line are in, none after it
        con = sqlite3.connect(db)
        try:
            assert con.execute("SELECT request_id FROM llm_calls").fetchall() == [("r-1",)]
        finally:
            con.close()


# -- a store on a read-only filesystem ----------------------------------------------------------------


@contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """A small tmpfs at ``path``, unmounted afterwards."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)


LEAVE_WAL = """
import os, sys
from mcpmeter.store import SQLiteStore
sys.path.insert(0, {tests!r})
from conftest import call_record
store = SQLiteStore({db!r})
store.write_calls([call_record(ts=1_700_000_000.0 + i, jsonrpc_id=str(i)) for i in range(5)])
os._exit(0)  # no close: the -wal and -shm files stay, the rows only in the log
"""


def test_export_verify_and_report_read_a_store_on_a_read_only_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro") as ro:
        closed = ro / "closed.db"  # checkpointed: the main file alone (read as immutable)
        fill(closed, n=5)
        crashed = ro / "crashed.db"  # a writer that died: rows in the -wal, read through the -shm
        leave_wal = LEAVE_WAL.format(tests=str(Path(__file__).parent), db=str(crashed))
        subprocess.run([sys.executable, "-c", leave_wal], check=True, timeout=TIMEOUT_S)
        assert (ro / "crashed.db-wal").stat().st_size > 0
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, timeout=30)
        files = sorted(p.name for p in ro.iterdir())

        for db in (closed, crashed):
            out = tmp_path / f"{db.stem}.jsonl"
            code, stderr = mcpmeter(["export", "--db", str(db)], tmp_path, str(out))
            assert (code, stderr) == (0, "")
            exported = [orjson.loads(line) for line in out.read_bytes().splitlines()]
            assert [r["jsonrpc_id"] for r in exported] == ["0", "1", "2", "3", "4"]
            assert exported == rows_on_read_only(db)

            verdict = tmp_path / f"{db.stem}.verify"
            code, stderr = mcpmeter(["verify", "--db", str(db)], tmp_path, str(verdict))
            assert code == 0, stderr
            assert verdict.read_text() == "ok: 5 rows (ids 1..5), hash chain intact\n"

            code, stderr = mcpmeter(["report", "--db", str(db), "--since", "5000d"], tmp_path, os.devnull)
            assert code == 0, stderr
            assert "Traceback" not in stderr
        assert sorted(p.name for p in ro.iterdir()) == files  # nothing created, nothing migrated


def rows_on_read_only(db: Path) -> list[dict[str, object]]:
    """The exported columns of every row, read by the test's own read-only connection."""
    for mode in ("ro", "ro&immutable=1"):  # immutable: no -shm, and none can be made
        con = sqlite3.connect(f"file:{db}?mode={mode}", uri=True)
        con.row_factory = sqlite3.Row
        try:
            return [{c: row[c] for c in COLUMNS} for row in con.execute("SELECT * FROM calls ORDER BY id")]
        except sqlite3.OperationalError:
            continue
        finally:
            con.close()
    raise AssertionError(f"{db} cannot be read read-only")
