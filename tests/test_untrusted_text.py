"""Names from clients and servers reach spreadsheets and terminals as text, never as commands.

Tool names, agents and client names are whatever the other side sent. The CSV outputs escape
what a spreadsheet would run as a formula; the human-readable outputs show control
characters as visible escapes; JSON keeps every value exact; a name with a comma stays one
name. The stores are filled through the store's own write path and read by real
``mcpmeter`` processes.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import select
import sqlite3
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import MCPMETER, call_record, read_rows
from hypothesis import given
from hypothesis import strategies as st
from stores import BACKENDS, make_backend, subprocess_env

from mcpmeter.exporters.text import CsvWriter
from mcpmeter.output.terminal import printable
from mcpmeter.record import COLUMNS, CallRecord
from mcpmeter.store import SQLiteStore

#: Tool names a hostile or careless server could announce, one row each.
HOSTILE_TOOLS = [
    '=HYPERLINK("http://evil.example/x","click")',
    "+1+1",
    "-2+3",
    "@SUM(A1:A9)",
    "\tlead-tab",
    "bare\rcarriage-return",
    "line\nfeed",
    "'=already-quoted",
    "clip\x1b]52;c;aGVsbG8=\x07board",
    "wipe\x1b[2Jscreen",
    "8bit\x9b31mcsi",
    "bidi\u202etxt.exe",
    "<script>alert(1)</script>",
    "a,b",
    "plain",
]
CLIENT = "=cmd|' /C calc'!A0"
AGENT = "=agent()"
#: Columns whose values are numbers: written as numbers, never escaped.
NUMERIC = {"id", "latency_ms", "request_bytes", "response_bytes", "error_code", "cost_usd"}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: What must never reach a terminal raw (line ends are the outputs' own).
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: The colour sequences rich writes itself, removed before looking for injected ones.
SGR = re.compile(r"\x1b\[[0-9;]*m")
TIMEOUT_S = 60


def hostile_records() -> list[CallRecord]:
    return [
        call_record(
            ts=1_700_000_000.0 + i,
            jsonrpc_id=str(i),
            tool=tool,
            agent_id=AGENT,
            client_name=CLIENT,
            request_id="r-1",
            status="error",
            error_code=-32602,
            error_message="bad \x1b[2J params",
        )
        for i, tool in enumerate(HOSTILE_TOOLS)
    ]


@pytest.fixture
def hostile(db_path: Path) -> Path:
    store = SQLiteStore(str(db_path))
    try:
        store.write_calls(hostile_records())
    finally:
        store.close()
    return db_path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mcpmeter ARGS``; stdout and stderr decoded as written (no newline translation: a CR
    inside a quoted cell must reach the CSV reader as a CR)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    done = subprocess.run([MCPMETER, *args], capture_output=True, env=env, timeout=TIMEOUT_S, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def unescape(cell: str) -> str:
    """A text cell as it was before the formula escape."""
    return cell[1:] if cell.startswith("'") else cell


# -- 1. CSV: no formula, one record per row --------------------------------------------------------


def test_csv_outputs_escape_formula_cells_quote_line_breaks_and_keep_numbers_numbers(hostile: Path) -> None:
    exported = run("export", "--db", str(hostile), "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    header, *rows = csv_rows(exported.stdout)
    assert header == list(COLUMNS)
    stored = read_rows(hostile)
    assert len(rows) == len(stored) == len(HOSTILE_TOOLS)  # a bare CR or an LF splits no record
    for row, values in zip(rows, stored, strict=True):
        for column, cell in zip(COLUMNS, row, strict=True):
            value = values[column]
            if column in NUMERIC:
                assert cell == ("" if value is None else str(value)), column
            else:
                assert not cell.startswith(FORMULA_START), (column, cell)
                assert unescape(cell) == ("" if value is None else value), column
        assert row[COLUMNS.index("error_code")] == "-32602"  # a negative number stays a number
    assert {row[COLUMNS.index("client_name")] for row in rows} == {"'" + CLIENT}

    grouped = run("report", "--db", str(hostile), "--since", "5000d", "--by", "tool,agent", "--format", "csv")
    assert grouped.returncode == 0, grouped.stderr
    header, *rows = csv_rows(grouped.stdout)
    assert len(rows) == len(HOSTILE_TOOLS)
    assert sorted(unescape(row[0]) for row in rows) == sorted(HOSTILE_TOOLS)
    assert {row[1] for row in rows} == {"'" + AGENT}
    assert not any(cell.startswith(FORMULA_START) for row in rows for cell in row)

    per_call = run("report", "invocations", "--db", str(hostile), "--since", "5000d", "--format", "csv")
    assert per_call.returncode == 0, per_call.stderr
    header, *rows = csv_rows(per_call.stdout)
    (row,) = rows
    record = dict(zip(header, row, strict=True))
    assert record["agent"] == "'" + AGENT
    assert json.loads(record["tools"]) == sorted(HOSTILE_TOOLS)


def cell_text() -> st.SearchStrategy[str]:
    """Any text, with the characters that matter to CSV and spreadsheets made likely."""
    special = st.sampled_from(["=", "+", "-", "@", "'", "\t", "\r", "\n", ",", '"', "\r\n", " "])
    return st.lists(st.one_of(special, st.text(max_size=4)), max_size=6).map("".join)


@given(st.lists(st.lists(cell_text(), min_size=1, max_size=6), max_size=8))
def test_the_csv_writer_round_trips_any_text_and_starts_no_cell_with_a_formula_character(
    rows: list[list[str]],
) -> None:
    out = io.StringIO(newline="")
    writer = CsvWriter(out.write)
    for row in rows:
        writer.writerow(row)
    read = csv_rows(out.getvalue())
    assert len(read) == len(rows)
    assert [[unescape(cell) for cell in row] for row in read] == rows
    assert not any(cell.startswith(FORMULA_START) for row in read for cell in row)


# -- 2. terminals: control characters are shown, not obeyed ---------------------------------------


def in_a_terminal(args: Sequence[str], env: dict[str, str]) -> str:
    """What ``mcpmeter ARGS`` writes to a real terminal (a pty, 200 x 50, colours on)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
    process = subprocess.Popen(
        [MCPMETER, *args], stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, env=env
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other end closed: the process is done
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=TIMEOUT_S) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
        if process.stderr is not None:
            process.stderr.close()
        os.close(controller)
    return output.decode()


def assert_shown_not_obeyed(text: str, *names: str) -> None:
    """No control character in ``text`` (rich's own colours aside), and each name shown escaped."""
    bare = SGR.sub("", text).replace("\r\n", "\n")
    assert CONTROL.search(bare) is None, repr(CONTROL.findall(bare))
    for name in names:
        assert printable(name) in bare, printable(name)


def test_report_tail_prices_and_verify_show_control_characters_as_escapes(hostile: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    db = str(hostile)
    osc52, clear = HOSTILE_TOOLS[8], HOSTILE_TOOLS[9]

    table = run("report", "--db", db, "--since", "5000d", "--by", "tool")
    assert table.returncode == 0, table.stderr
    assert_shown_not_obeyed(table.stdout, osc52, clear, HOSTILE_TOOLS[10], HOSTILE_TOOLS[11])
    per_call = run("report", "invocations", "--db", db, "--since", "5000d")
    assert per_call.returncode == 0, per_call.stderr
    assert_shown_not_obeyed(per_call.stdout, osc52, clear)

    frame = in_a_terminal(["tail", "--db", db, "--no-follow", "--since", "5000d"], env)
    assert_shown_not_obeyed(frame, clear, "bidi\u202etxt")
    assert "\x1b[2J" not in frame and "\x1b]52" not in frame

    pattern = "srv\x1b]52;c;QQ==\x07/*"
    assert run("prices", "set", "tool", pattern, "--per-call", "0.01", "--db", db).returncode == 0
    shown = run("prices", "show", "--db", db)
    assert shown.returncode == 0, shown.stderr
    assert_shown_not_obeyed(shown.stdout, pattern)

    con = sqlite3.connect(db)  # a tamperer's hash: verify quotes it in its verdict
    try:
        con.execute("UPDATE calls SET hash = ? WHERE id = 3", ("\x1b]52;c;AAAA\x07" + "0" * 52,))
        con.commit()
    finally:
        con.close()
    verdict = run("verify", "--db", db)
    assert verdict.returncode == 1, verdict.stderr
    assert verdict.stdout.startswith("broken at row 3")
    assert_shown_not_obeyed(verdict.stdout + verdict.stderr, "\x1b]52;c;AAAA\x07")

    exact = run("report", "invocations", "--db", db, "--since", "5000d", "--format", "json")
    (row,) = json.loads(exact.stdout)["invocations"]
    assert row["tools"] == sorted(HOSTILE_TOOLS)  # JSON keeps every value exact


def test_the_html_report_escapes_markup_and_control_characters_of_names(
    hostile: Path, tmp_path: Path
) -> None:
    page_path = tmp_path / "report.html"
    made = run("report", "--db", str(hostile), "--since", "5000d", "--by", "tool", "--html", str(page_path))
    assert made.returncode == 0, made.stderr
    page = page_path.read_text(encoding="utf-8")
    assert CONTROL.search(page) is None, repr(CONTROL.findall(page))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "=HYPERLINK(&quot;http:&#47;&#47;evil.example" in page  # text, and no link
    assert "clip\\x1b]52;c;aGVsbG8=\\x07board" in page and "wipe\\x1b[2Jscreen" in page


def control_free(text: str) -> bool:
    return CONTROL.search(text) is None and "\n" not in text


@given(st.text())
def test_printable_never_lets_a_control_character_through(text: str) -> None:
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", printable(text))


@given(st.text().filter(control_free))
def test_printable_leaves_text_without_control_characters_as_it_is(text: str) -> None:
    assert printable(text) == text


# -- 3. a tool name with a comma is one name ---------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_report_invocations_keeps_tool_names_that_contain_commas_whole(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_backend(kind, tmp_path, monkeypatch) as backend:
        store = backend.open()
        try:
            store.write_calls(
                [
                    call_record(ts=1_700_000_000.0 + i, jsonrpc_id=str(i), tool=tool, request_id="r-1")
                    for i, tool in enumerate(["z,a", "m", "z,a", "a, b", "m"])
                ]
            )
        finally:
            store.close()
        env = subprocess_env(backend, tmp_path)
        tools = ["a, b", "m", "z,a"]

        as_json = run("report", "invocations", "--since", "5000d", "--format", "json", env=env)
        assert as_json.returncode == 0, as_json.stderr
        (row,) = json.loads(as_json.stdout)["invocations"]
        assert (row["tool_calls"], row["tools"]) == (5, tools)

        as_csv = run("report", "invocations", "--since", "5000d", "--format", "csv", env=env)
        assert as_csv.returncode == 0, as_csv.stderr
        header, line = csv_rows(as_csv.stdout)
        assert json.loads(dict(zip(header, line, strict=True))["tools"]) == tools

        as_table = run("report", "invocations", "--since", "5000d", env=env)
        assert as_table.returncode == 0, as_table.stderr
        assert '"a, b", m, "z,a"' in as_table.stdout


def test_budget_show_writes_stored_names_as_text_not_markup_or_escapes(db_path: Path) -> None:
    db = str(db_path)
    agent = "loop\x1b]52;c;QQ==\x07[bold]bot[/bold]"
    assert run("budget", "set", "--agent", agent, "--usd", "5", "--db", db).returncode == 0
    wide = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")} | {"COLUMNS": "300"}
    shown = run("budget", "show", "--db", db, env=wide)
    assert shown.returncode == 0, shown.stderr
    assert_shown_not_obeyed(shown.stdout, agent)
