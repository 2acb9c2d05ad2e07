"""Output files (``export -o``, ``report --html``) never destroy the store and are never half written;
and every read command takes ``--format`` and ``--status`` through the same checks.

Every command runs for real as a subprocess on a real SQLite store; the output layer's
writers (:mod:`mcpmeter.output`) are also checked on their own, into a ``StringIO``.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
from collections.abc import Callable
from io import BytesIO, StringIO
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import MCPMETER, call_record, read_rows
from test_docs import RUNNABLE, long_options
from test_export import export, one_line_error

from mcpmeter.errors import UsageError
from mcpmeter.metering.audit import spill_path_for
from mcpmeter.output.csv import write_csv
from mcpmeter.output.formats import check_format
from mcpmeter.output.json import write_json, write_json_lines, write_json_stream
from mcpmeter.output.table import write_table
from mcpmeter.store import SQLiteStore

ROWS = 5
#: Rows in the store whose export outgrows :data:`FILE_LIMIT`.
BIG_ROWS = 3000
#: The largest file a process may write in the midway-failure tests (RLIMIT_FSIZE): room for
#: SQLite's 32 KiB shared-memory index, far less than the export.
FILE_LIMIT = 256 * 1024
FORMATS = ["jsonl", "csv", "parquet", "html"]


def fill(db: Path, rows: int, message_bytes: int = 0) -> Path:
    """A store of ``rows`` calls (error messages of ``message_bytes`` random hex, to defeat compression)."""
    store = SQLiteStore(str(db))
    try:
        store.write_calls(
            [
                call_record(
                    ts=1_700_000_000.0 + i,
                    jsonrpc_id=str(i),
                    error_message=os.urandom(message_bytes // 2).hex() or None,
                )
                for i in range(rows)
            ]
        )
    finally:
        store.close()
    return db


@pytest.fixture
def store(db_path: Path) -> Path:
    return fill(db_path, ROWS)


def write_out(
    fmt: str, db: Path, target: Path | str, env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """``export --format FMT -o TARGET`` or, for ``html``, ``report --html TARGET``."""
    if fmt == "html":
        return subprocess.run(
            [MCPMETER, "report", "--db", str(db), "--html", str(target)],
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
    return export("--db", str(db), "--format", fmt, "-o", str(target), env=env)


def assert_store_intact(db: Path, env: dict[str, str], rows: int) -> None:
    result = subprocess.run(
        [MCPMETER, "verify", "--db", str(db)], capture_output=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result
    assert result.stdout.decode().startswith(f"ok: {rows} rows"), result.stdout
    assert len(read_rows(db)) == rows


def leftovers(directory: Path) -> list[str]:
    """Temporary or partial files an output left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or ".partial" in p.name)


# -- the store and its files are refused -----------------------------------------------------


def same(db: Path) -> Path:
    return db


def wal(db: Path) -> Path:
    return db.with_name(db.name + "-wal")


def shm(db: Path) -> Path:
    return db.with_name(db.name + "-shm")


def journal(db: Path) -> Path:
    return db.with_name(db.name + "-journal")


def spill(db: Path) -> Path:
    return db.with_name(db.name + ".spill.jsonl")


def loading_spill(db: Path) -> Path:
    return db.with_name(db.name + ".spill.jsonl.4242.loading")


def rejected_spill(db: Path) -> Path:
    return db.with_name(db.name + ".spill.jsonl.rejected")


def symlink(db: Path) -> Path:
    link = db.with_name("link-to-store.db")
    link.symlink_to(db)
    return link


def hard_link(db: Path) -> Path:
    link = db.with_name("hard-link-to-store.db")
    os.link(db, link)
    return link


def relative_with_dotdot(db: Path) -> Path:
    sub = db.parent / "sub"
    sub.mkdir()
    return Path(os.path.relpath(sub, Path.cwd())) / ".." / db.name


TARGETS = [
    same,
    wal,
    shm,
    journal,
    spill,
    loading_spill,
    rejected_spill,
    symlink,
    hard_link,
    relative_with_dotdot,
]


@pytest.mark.parametrize("target", TARGETS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_output_onto_the_store_or_one_of_its_files_is_refused_and_the_store_keeps_every_row(
    store: Path, meter_env: dict[str, str], fmt: str, target: Callable[[Path], Path]
) -> None:
    out = target(store)
    before = store.read_bytes()
    listing = sorted(p.name for p in store.parent.iterdir())
    result = write_out(fmt, store, out, meter_env)
    assert result.returncode == 2, result
    message = one_line_error(result)
    assert message.startswith(f"mcpmeter: refusing to write {'--html' if fmt == 'html' else '-o'} {out}: ")
    assert str(store) in message
    assert store.read_bytes() == before
    assert sorted(p.name for p in store.parent.iterdir()) == listing  # nothing created, not even a temp
    assert_store_intact(store, meter_env, ROWS)


def test_the_store_named_through_a_symlink_refuses_an_output_onto_the_file_it_points_to(
    store: Path, meter_env: dict[str, str]
) -> None:
    link = symlink(store)
    result = export("--db", str(link), "-o", str(store), env=meter_env)
    assert result.returncode == 2
    assert "it is the store" in one_line_error(result)
    assert_store_intact(store, meter_env, ROWS)


def test_the_spill_file_beside_the_store_as_named_through_a_symlink_is_refused(
    store: Path, meter_env: dict[str, str]
) -> None:
    link = symlink(store)
    result = export("--db", str(link), "-o", str(spill(link)), env=meter_env)
    assert result.returncode == 2
    assert "spill file" in one_line_error(result)


@pytest.mark.parametrize("suffix", ["", ".4242.loading", ".rejected"])
def test_a_postgres_store_refuses_an_output_onto_its_spill_file_before_connecting(
    tmp_path: Path, meter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    env = {**meter_env, "XDG_DATA_HOME": str(tmp_path / "data")}
    url = "postgresql://meter:s3cret@127.0.0.1:1/metering"  # nothing listens on port 1
    spill_file = spill_path_for(url)
    assert spill_file is not None
    out = spill_file.with_name(spill_file.name + suffix)
    result = export("--db", url, "-o", str(out), env=env)
    assert result.returncode == 2, result
    message = one_line_error(result)
    assert "spill file" in message and "s3cret" not in message
    assert not out.exists()


def test_a_directory_as_output_is_a_one_line_usage_error(store: Path, meter_env: dict[str, str]) -> None:
    result = export("--db", str(store), "-o", str(store.parent), env=meter_env)
    assert result.returncode == 2
    assert "is a directory" in one_line_error(result)


# -- a failed write leaves the old file; a good one replaces it atomically --------------------


def limit_file_size() -> None:
    """In the child: writing past FILE_LIMIT fails with EFBIG (instead of killing the process)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_an_export_that_fails_midway_leaves_the_existing_file_byte_identical_and_no_temp_file(
    db_path: Path, meter_env: dict[str, str], tmp_path: Path, fmt: str
) -> None:
    fill(db_path, BIG_ROWS, message_bytes=512)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"calls.{fmt}"
    out.write_bytes(b"yesterday's export, still needed\n")
    inode = out.stat().st_ino
    result = subprocess.run(
        [MCPMETER, "export", "--db", str(db_path), "--format", fmt, "-o", str(out)],
        capture_output=True,
        env=meter_env,
        timeout=120,
        check=False,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 1, result
    assert re.fullmatch(rf"mcpmeter: cannot write {re.escape(str(out))}: .+\n", one_line_error(result))
    assert out.read_bytes() == b"yesterday's export, still needed\n"
    assert out.stat().st_ino == inode
    assert leftovers(out_dir) == []
    assert_store_intact(db_path, meter_env, BIG_ROWS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_successful_output_replaces_the_existing_file_atomically_and_keeps_its_mode(
    store: Path, meter_env: dict[str, str], tmp_path: Path, fmt: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"calls.{fmt}"
    out.write_bytes(b"old content\n")
    out.chmod(0o640)
    inode = out.stat().st_ino
    result = write_out(fmt, store, out, meter_env)
    assert result.returncode == 0, result
    assert out.stat().st_ino != inode
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in out_dir.iterdir()) == [out.name]
    if fmt in ("jsonl", "csv"):
        assert out.read_bytes() == export("--db", str(store), "--format", fmt, env=meter_env).stdout
    elif fmt == "parquet":
        assert pq.read_table(out).num_rows == ROWS
    else:
        assert out.read_text(encoding="utf-8").lower().startswith("<!doctype html")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_new_output_file_gets_the_mode_the_umask_allows(
    store: Path, meter_env: dict[str, str], tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"new.{fmt}"
    command = (
        [MCPMETER, "report", "--db", str(store), "--html", str(out)]
        if fmt == "html"
        else [MCPMETER, "export", "--db", str(store), "--format", fmt, "-o", str(out)]
    )
    result = subprocess.run(command, capture_output=True, env=meter_env, timeout=60, check=False, umask=0o027)
    assert result.returncode == 0, result
    assert out.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


def test_an_output_through_a_symlink_replaces_the_file_it_points_to_and_keeps_the_link(
    store: Path, meter_env: dict[str, str], tmp_path: Path
) -> None:
    real = tmp_path / "exports" / "calls.jsonl"
    real.parent.mkdir()
    real.write_bytes(b"old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(real)
    result = export("--db", str(store), "-o", str(link), env=meter_env)
    assert result.returncode == 0, result
    assert link.is_symlink() and link.resolve() == real
    assert real.read_bytes() == export("--db", str(store), env=meter_env).stdout
    assert leftovers(real.parent) == [] and leftovers(tmp_path) == []


def test_an_output_to_dev_stdout_streams_to_stdout_instead_of_replacing_the_device(
    store: Path, meter_env: dict[str, str]
) -> None:
    result = export("--db", str(store), "-o", "/dev/stdout", env=meter_env)
    assert result.returncode == 0, result
    assert result.stdout == export("--db", str(store), env=meter_env).stdout
    assert result.stdout.count(b"\n") == ROWS


# -- one --format, one --status, for every read command -----------------------------------------


def runnable_with(option: str) -> list[str]:
    return sorted(name for name, command in RUNNABLE.items() if option in long_options(command))


def required_arguments(name: str) -> list[str]:
    """A value for each argument the command needs (``ledger import FILE``), so that the
    option under test is what fails."""
    return [
        "/dev/null" for param in RUNNABLE[name].params if param.required and not param.opts[0].startswith("-")
    ]


def run_with(name: str, store: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    argv = [MCPMETER, *name.split(), *required_arguments(name), *args, "--db", str(store)]
    return subprocess.run(argv, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL)


def test_the_commands_with_format_and_status_are_the_read_commands() -> None:
    assert runnable_with("--format") == [
        "budget show",
        "export",
        "ledger import",
        "prices show",
        "report",
        "report invocations",
        "tail",
    ]
    assert runnable_with("--status") == ["export", "report", "report invocations", "tail"]


@pytest.mark.parametrize("name", runnable_with("--format"))
def test_an_unknown_format_is_one_line_and_exit_2_in_every_command(name: str, store: Path) -> None:
    result = run_with(name, store, "--format", "xml")
    assert (result.returncode, result.stdout) == (2, b""), result
    assert one_line_error(result).startswith("mcpmeter: unknown format 'xml': use ")


@pytest.mark.parametrize("name", runnable_with("--status"))
def test_an_unknown_status_is_one_line_and_exit_2_in_every_command(name: str, store: Path) -> None:
    result = run_with(name, store, "--status", "bogus")
    assert (result.returncode, result.stdout) == (2, b""), result
    statuses = "ok, error, tool_error, rejected, cancelled, no_response"
    assert one_line_error(result) == f"mcpmeter: unknown status 'bogus': use one of {statuses}\n"


def test_a_format_is_checked_exactly_and_the_error_names_every_choice() -> None:
    assert check_format("csv", ("table", "json", "csv")) == "csv"
    for wrong in ("CSV", "", " csv"):
        with pytest.raises(UsageError, match=r"^unknown format .*: use one of table, json, csv$"):
            check_format(wrong, ("table", "json", "csv"))


# -- the writers ---------------------------------------------------------------------------------


def test_json_is_one_indented_document_or_one_compact_line() -> None:
    out = StringIO()
    write_json([{"a": 1, "b": None}], out)
    assert out.getvalue() == '[\n  {\n    "a": 1,\n    "b": null\n  }\n]\n'
    out = StringIO()
    write_json([{"a": 1, "b": "é"}], out, indent=False)
    assert out.getvalue() == '[{"a":1,"b":"é"}]\n'


def test_json_lines_are_one_object_per_row_keyed_in_column_order_buffered_or_flushed() -> None:
    rows = [(i, f"t{i}") for i in range(2500)]
    buffered, flushed = BytesIO(), BytesIO()
    assert write_json_lines(("id", "tool"), rows, buffered) == 2500
    assert write_json_lines(("id", "tool"), rows, flushed, flush=True) == 2500
    assert buffered.getvalue() == flushed.getvalue()
    assert buffered.getvalue().splitlines()[:2] == [b'{"id":0,"tool":"t0"}', b'{"id":1,"tool":"t1"}']


def test_a_json_stream_writes_its_items_one_a_line_then_the_other_members() -> None:
    out = StringIO()
    write_json_stream(out, "items", iter([{"a": 1}, {"a": 2}]), {"count": {"n": 2}, "more": 0})
    assert (
        out.getvalue()
        == '{\n  "items": [\n    {"a":1},\n    {"a":2}\n  ],\n  "count": {"n":2},\n  "more": 0\n}\n'
    )
    out = StringIO()
    write_json_stream(out, "items", iter([]), {})
    assert out.getvalue() == '{\n  "items": [\n  ]\n}\n'


def test_csv_escapes_formulas_writes_nulls_empty_and_lists_as_their_json() -> None:
    out = StringIO()
    assert (
        write_csv(("tool", "code", "tools"), [("=1+1", -32602, ["a,b", "c"]), (None, 0, [])], out.write) == 2
    )
    assert out.getvalue() == 'tool,code,tools\n\'=1+1,-32602,"[""a,b"",""c""]"\n,0,[]\n'


def test_a_table_aligns_numbers_right_escapes_control_characters_and_ends_with_its_total() -> None:
    out = StringIO()
    write_table(
        out,
        ("agent", "calls"),
        [["bot\x1b[2J", "1,000"], ["x", "2"]],
        numeric=[False, True],
        total=["total", "1,002"],
        notes=["a note"],
    )
    assert out.getvalue().splitlines() == [
        "agent       calls",
        "bot\\x1b[2J  1,000",
        "x               2",
        "----------  -----",
        "total       1,002",
        "a note",
    ]
    out = StringIO()
    write_table(out, ("agent",), [], numeric=[False], total=["total"])
    assert out.getvalue() == "agent\n(no rows)\n"
