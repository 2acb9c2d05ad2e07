"""Budgets that hold: shared through the store, atomic under concurrency, answered by the proxy."""

from __future__ import annotations

import calendar
import json
import math
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from conftest import MCPMETER, PYTHON, SERVERS, call_record, read_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client, StdioServerParameters
from stores import BACKENDS, Backend, make_backend

from mcpmeter.errors import UsageError
from mcpmeter.metering.budget import Budget, reserve, window
from mcpmeter.metering.gate import Budgets
from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.frame import Frame
from mcpmeter.store import SQLiteStore

RAW = str(SERVERS / "raw_server.py")
COUNTING = str(SERVERS / "counting_server.py")


def call(rpc_id: int, name: str = "whoami", **arguments: Any) -> bytes:
    frame = {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    return json.dumps(frame, separators=(",", ":")).encode() + b"\n"


def run_raw(env: dict[str, str], frames: bytes, *options: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [MCPMETER, "wrap", *options, "--", PYTHON, RAW],
        input=frames,
        capture_output=True,
        env=env,
        timeout=120,
    )


def answers(stdout: bytes) -> dict[Any, dict[str, Any]]:
    return {m["id"]: m for m in (json.loads(line) for line in stdout.splitlines()) if "id" in m}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([MCPMETER, *args], capture_output=True, env=env, timeout=60)


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(db_path))
    yield s
    s.close()


def at(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


# -- windows, with the clock injected --------------------------------------------------------


def test_a_day_budget_spent_at_23_59_59_utc_is_fresh_again_at_midnight(store: SQLiteStore) -> None:
    day = Budget("project", "acme", "day", limit_calls=1)
    assert reserve(store, [day], 0.0, at("2026-11-22T23:59:59"))[0] is None
    refused, _ = reserve(store, [day], 0.0, at("2026-11-22T23:59:59"))
    assert refused is not None and refused.data["resets_at"] == "2026-11-23T00:00:00.000000Z"
    assert reserve(store, [day], 0.0, at("2026-11-23T00:00:00"))[0] is None


def test_month_and_total_windows_start_and_reset_where_they_should() -> None:
    assert window("month", at("2026-12-31T23:59:59")) == (
        "2026-12-01T00:00:00.000000Z",
        "2027-01-01T00:00:00.000000Z",
    )
    assert window("total", at("2026-12-31T23:59:59")) == ("total", None)


def test_a_dollar_budget_refuses_the_call_that_would_take_it_past_its_limit(store: SQLiteStore) -> None:
    budget = Budget("agent", "bot", "total", limit_usd=0.05)
    results = [reserve(store, [budget], 0.02, 0.0)[0] for _ in range(4)]
    assert [r is None for r in results] == [True, True, False, False]
    assert results[2] is not None and "$0.0400 of $0.0500" in results[2].reason


# -- the proxy answers refused calls itself --------------------------------------------------


def test_a_refused_call_reaches_the_sdk_client_as_a_tool_error_and_never_reaches_the_server(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    counts = tmp_path / "counts.txt"

    async def main() -> list[tuple[bool, str]]:
        params = StdioServerParameters(
            command=MCPMETER,
            args=["wrap", "--max-calls", "2", "--", PYTHON, COUNTING, str(counts)],
            env=meter_env,
        )
        out = []
        with anyio.fail_after(60):
            async with Client(params, mode="legacy") as client:
                for i in range(4):
                    result = await client.call_tool("lookup", {"query": f"q{i}"})
                    text = result.content[0].text  # type: ignore[union-attr]
                    out.append((result.is_error, text))
        return out

    results = anyio.run(main)
    assert [error for error, _ in results] == [False, False, True, True]
    assert "Budget exhausted" in results[2][1] and "2 of 2 calls" in results[2][1]
    assert counts.read_text().split() == ["q0", "q1"]  # the server ran only what was allowed
    calls = [r for r in read_rows(db_path) if r["method"] == "tools/call"]
    # Rows are in the order calls settled; a refusal settles at once, so order them by request.
    by_request = sorted(calls, key=lambda r: int(str(r["jsonrpc_id"])))
    assert [r["status"] for r in by_request] == ["ok", "ok", "rejected", "rejected"]


def test_reject_as_jsonrpc_error_answers_code_31402_with_the_budget_in_data(
    meter_env: dict[str, str],
) -> None:
    result = run_raw(meter_env, call(1) + call(2), "--max-calls", "1", "--reject-as", "jsonrpc-error")
    got = answers(result.stdout)
    assert "result" in got[1]
    error = got[2]["error"]
    assert error["code"] == -31402
    assert error["data"]["limit_calls"] == 1 and error["data"]["scope"] == "session"


def test_methods_other_than_tools_call_are_never_refused(meter_env: dict[str, str], db_path: Path) -> None:
    frames = (
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}\n'
        b'{"jsonrpc":"2.0","id":2,"method":"ping"}\n' + call(3)
    )
    result = run_raw(meter_env, frames, "--max-calls", "0")
    got = answers(result.stdout)
    assert "result" in got[1] and "result" in got[2] and got[3]["result"]["isError"] is True
    assert {r["method"]: r["status"] for r in read_rows(db_path)} == {
        "initialize": "ok",
        "ping": "ok",
        "tools/call": "rejected",
    }


def test_the_loop_guard_refuses_the_call_after_n_identical_ones_and_not_a_different_one(
    meter_env: dict[str, str], db_path: Path
) -> None:
    frames = call(1, q="a") + call(2, q="a") + call(3, q="a") + call(4, q="b")
    result = run_raw(meter_env, frames, "--max-repeat", "2")
    got = answers(result.stdout)
    assert [
        ("isError" in got[i].get("result", {}) and got[i]["result"]["isError"]) for i in (1, 2, 3, 4)
    ] == [
        False,
        False,
        True,
        False,
    ]
    assert "Loop guard" in got[3]["result"]["content"][0]["text"]


def test_a_budget_set_in_the_store_applies_to_every_wrap_on_it(
    meter_env: dict[str, str], db_path: Path
) -> None:
    assert cli("budget", "set", "--project", "acme", "--calls", "3", "--db", str(db_path)).returncode == 0
    env = {**meter_env, "MCPMETER_PROJECT_ID": "acme"}
    first = answers(run_raw(env, call(1) + call(2), "--session", "one").stdout)
    second = answers(run_raw(env, call(1) + call(2), "--session", "two").stdout)
    assert [first[1]["result"].get("isError"), first[2]["result"].get("isError")] == [None, None]
    assert [second[1]["result"].get("isError"), second[2]["result"].get("isError")] == [None, True]
    other = answers(run_raw({**meter_env, "MCPMETER_PROJECT_ID": "globex"}, call(1)).stdout)
    assert other[1]["result"].get("isError") is None


# -- many proxies, one budget ----------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    with make_backend(request.param, tmp_path, monkeypatch) as made:
        yield made


def test_twenty_concurrent_wraps_never_overspend_one_project_budget(
    meter_env: dict[str, str], backend: Backend
) -> None:
    price, limit = 0.01, 0.50
    db = backend.location
    assert cli("prices", "set", "tool", "*/*", "--per-call", str(price), "--db", db).returncode == 0
    assert cli("budget", "set", "--project", "acme", "--usd", str(limit), "--db", db).returncode == 0
    env = {**meter_env, "MCPMETER_PROJECT_ID": "acme", "MCPMETER_DB": db}
    frames = b"".join(call(i) for i in range(10))
    procs = [
        subprocess.Popen(
            [MCPMETER, "wrap", "--session", f"w{w}", "--", PYTHON, RAW],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for w in range(20)
    ]
    refused = 0
    for p in procs:
        out, err = p.communicate(frames, timeout=120)
        assert p.returncode == 0, err
        refused += sum(1 for m in answers(out).values() if m.get("result", {}).get("isError"))
    rows = [r for r in backend.rows() if r["method"] == "tools/call"]
    allowed = [r for r in rows if r["status"] == "ok"]
    assert len(rows) == 200
    assert sum(1 for r in rows if r["status"] == "rejected") == refused == 200 - len(allowed)
    spent = sum(float(r["cost_usd"]) for r in allowed)
    assert limit - price - 1e-9 <= spent <= limit + 1e-9  # within one call's price, never over
    ((stored,),) = backend.sql("SELECT spent_usd FROM budget_spend WHERE scope = 'project'")
    assert stored == pytest.approx(spent)


# -- warnings ---------------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_at_80_percent_one_warning_goes_to_stderr_the_store_and_the_webhook(
    meter_env: dict[str, str], db_path: Path
) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        frames = b"".join(call(i) for i in range(10))
        result = run_raw(meter_env, frames, "--max-calls", "10", "--alert-webhook", url, "--agent", "bot")
    finally:
        server.shutdown()
        server.server_close()
    warnings = [line for line in result.stderr.decode().splitlines() if "budget warning" in line]
    assert len(warnings) == 1 and "80%" in warnings[0]
    con = sqlite3.connect(db_path)
    events = con.execute("SELECT kind, calls FROM budget_events").fetchall()
    con.close()
    assert events == [("warning", 8)]
    assert len(_Hook.received) == 1 and "budget warning" in _Hook.received[0]["text"]


def test_budget_show_lists_limits_spend_and_reset_and_reset_starts_over(
    meter_env: dict[str, str], db_path: Path
) -> None:
    cli("budget", "set", "--agent", "bot", "--usd", "2", "--window", "day", "--db", str(db_path))
    run_raw({**meter_env, "MCPMETER_AGENT_ID": "bot"}, call(1))
    shown = json.loads(cli("budget", "show", "--format", "json", "--db", str(db_path)).stdout)
    assert [(b["scope"], b["subject"], b["window"], b["limit_usd"], b["calls"]) for b in shown] == [
        ("agent", "bot", "day", 2.0, 1)
    ]
    assert shown[0]["resets_at"].endswith("T00:00:00.000000Z")
    assert cli("budget", "reset", "--agent", "bot", "--db", str(db_path)).returncode == 0
    assert json.loads(cli("budget", "show", "--format", "json", "--db", str(db_path)).stdout)[0]["calls"] == 0


def test_budget_commands_say_what_is_wrong_in_one_line(db_path: Path) -> None:
    result = cli("budget", "set", "--usd", "1", "--db", str(db_path))
    assert result.returncode == 2 and result.stderr.count(b"\n") == 1


def one_line_error(result: subprocess.CompletedProcess[bytes], mentions: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr, result.stderr
    assert mentions.encode() in result.stderr


@pytest.mark.parametrize(
    "limit",
    [
        ("--usd", "nan"),  # stored as NULL, it would be a budget without a limit
        ("--usd", "inf"),
        ("--usd", "1e400"),
        ("--usd", "-0.5"),
        ("--calls", "99999999999999999999999"),  # more than the store's integers hold
        ("--calls", "-1"),
    ],
)
def test_budget_set_refuses_a_limit_that_is_not_finite_negative_or_too_big_in_one_line(
    db_path: Path, limit: tuple[str, str]
) -> None:
    one_line_error(cli("budget", "set", "--project", "acme", *limit, "--db", str(db_path)), limit[0])
    if db_path.exists():
        con = sqlite3.connect(db_path)
        assert con.execute("SELECT count(*) FROM budgets").fetchone() == (0,)
        con.close()


@pytest.mark.parametrize(
    "flags",
    [
        ["--budget", "nan"],
        ["--budget", "inf"],
        ["--budget", "-1"],
        ["--max-calls", "99999999999999999999999"],
        ["--max-calls", "-1"],
        ["--max-repeat", "99999999999999999999999"],
        ["--kill-after", "nan"],
        ["--kill-after", "inf"],
    ],
)
def test_wrap_refuses_a_budget_flag_that_is_not_finite_negative_or_too_big_in_one_line(
    meter_env: dict[str, str], flags: list[str]
) -> None:
    result = subprocess.run(
        [MCPMETER, "wrap", *flags, "--", PYTHON, RAW],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=meter_env,
        timeout=60,
    )
    one_line_error(result, flags[0])


@pytest.mark.parametrize(
    ("usd", "calls"),
    [(math.nan, None), (math.inf, None), (-1.0, None), (None, 2**63), (None, -1), (None, None)],
)
def test_the_python_api_refuses_the_same_limits(db_path: Path, usd: float | None, calls: int | None) -> None:
    from mcpmeter.metering.budget_admin import set_budget

    with pytest.raises(UsageError):
        set_budget(str(db_path), "project", "acme", "total", usd, calls, False, 0.8)


def test_a_call_cut_across_two_reads_or_spelt_with_escapes_is_still_refused(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    # Read from a file, stdin comes in reads of exactly 64 KiB: the padding puts the read
    # boundary inside the first call's "tools/call". The second call spells its method
    # "tools\/call", which is "tools/call" to any JSON parser.
    record = tmp_path / "server-read.bin"
    first = call(1)
    cut = 65536 - (first.index(b'"tools/call"') + 6)
    head = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"pad":"'
    padding = head + b"x" * (cut - len(head) - 4) + b'"}}\n'
    escaped = call(2).replace(b'"tools/call"', b'"tools\\/call"')
    stdin = tmp_path / "stdin.jsonl"
    stdin.write_bytes(padding + first + escaped)
    with stdin.open("rb") as source:
        result = subprocess.run(
            [MCPMETER, "wrap", "--max-calls", "0", "--", PYTHON, RAW, "--record", str(record)],
            stdin=source,
            capture_output=True,
            env=meter_env,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    got = answers(result.stdout)
    assert got[1]["result"]["isError"] is True and got[2]["result"]["isError"] is True
    assert record.read_bytes() == padding  # neither call reached the server
    assert sorted(r["status"] for r in read_rows(db_path)) == ["rejected", "rejected"]


# -- calls made before the server has named itself -------------------------------------------

INITIALIZE = (
    b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    b'"capabilities":{},"clientInfo":{"name":"pipeliner","version":"1"}}}\n'
)


def test_calls_pipelined_behind_initialize_are_never_reserved_free(
    meter_env: dict[str, str], db_path: Path
) -> None:
    # The price names the server (the raw server calls itself raw-server), which is not known
    # until initialize is answered; the four calls go out in the same write as initialize.
    db = str(db_path)
    assert cli("prices", "set", "tool", "raw-server/*", "--per-call", "0.01", "--db", db).returncode == 0
    frames = INITIALIZE + b"".join(call(i) for i in range(1, 5))

    result = run_raw(meter_env, frames, "--budget", "0.015")

    assert result.returncode == 0, result.stderr
    got = answers(result.stdout)
    assert [bool(got[i]["result"].get("isError")) for i in range(1, 5)] == [False, True, True, True]
    calls = {r["jsonrpc_id"]: r for r in read_rows(db_path) if r["method"] == "tools/call"}
    assert [calls[str(i)]["status"] for i in range(1, 5)] == ["ok", "rejected", "rejected", "rejected"]
    assert calls["1"]["server"] == "raw-server" and calls["1"]["cost_usd"] == pytest.approx(0.01)
    con = sqlite3.connect(db_path)
    ((spent,),) = con.execute("SELECT spent_usd FROM budget_spend").fetchall()
    con.close()
    assert spent == pytest.approx(0.01)


def test_a_call_before_the_server_is_named_reserves_its_tools_worst_price_and_settles_to_the_real_one(
    db_path: Path, store: SQLiteStore
) -> None:
    db = str(db_path)
    for pattern, price in (
        ("raw-server/*", "0.01"),
        ("other-server/lookup", "0.03"),
        ("*/other_tool", "0.5"),
    ):
        assert cli("prices", "set", "tool", pattern, "--per-call", price, "--db", db).returncode == 0
    server: list[str | None] = [None]
    tenant = Tenant(project_id="acme", agent_id="bot", session_id="s-1", tags={})
    budgets = Budgets(lambda: SQLiteStore(db))
    gate = budgets.gate(
        tenant,
        inject=lambda frame: None,
        budgets=[Budget("session", "s-1", limit_usd=1.0)],
        server_name=lambda: server[0],
    )

    def spent() -> float:
        ((value,),) = store.query("SELECT spent_usd FROM budget_spend")
        return float(value)

    try:
        gate.refresh(store)
        assert gate.check(Frame(call(1, "lookup")[:-1], "c2s", 0.0)) is None
        assert spent() == pytest.approx(0.03)  # the most "lookup" costs on any server
        server[0] = "raw-server"
        assert gate.check(Frame(call(2, "lookup")[:-1], "c2s", 0.0)) is None
        assert spent() == pytest.approx(0.04)
        rows = [
            call_record(
                jsonrpc_id=str(i), session_id="s-1", tool="lookup", server="raw-server", cost_usd=0.01
            )
            for i in (1, 2)
        ]
        budgets.after_write(store, rows)  # as the audit writer does once the rows are written
        assert spent() == pytest.approx(0.02)  # what the real price did not use, given back
    finally:
        budgets.close()


# -- the gate never changes a byte it lets through -------------------------------------------

FRAME = st.one_of(
    st.builds(lambda i, q: call(i, q=q)[:-1], st.integers(0, 10**6), st.text(max_size=30)),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
    st.just(b'{"jsonrpc":"2.0","id":7,"method":"tools/call"'),  # unfinished JSON
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(FRAME, max_size=12), chunk=st.integers(1, 97), crlf=st.booleans())
def test_with_the_gate_active_allowed_frames_reach_the_server_byte_for_byte(
    meter_env: dict[str, str], frames: list[bytes], chunk: int, crlf: bool
) -> None:
    data = b"".join(f + (b"\r\n" if crlf else b"\n") for f in frames)
    proc = subprocess.Popen(
        [MCPMETER, "wrap", "--max-repeat", "1000000", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=meter_env,
    )
    assert proc.stdin is not None
    for start in range(0, len(data), chunk):
        proc.stdin.write(data[start : start + chunk])
        proc.stdin.flush()
    out, _ = proc.communicate(timeout=60)
    assert out == data


def test_when_the_store_cannot_be_used_budget_checks_fail_open_and_the_relay_goes_on(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    blocked = tmp_path / "blocked.db"
    blocked.mkdir()  # SQLite cannot open a directory: the store is down for the whole run
    result = run_raw({**meter_env, "MCPMETER_DB": str(blocked)}, call(1) + call(2), "--max-calls", "1")
    got = answers(result.stdout)
    assert result.returncode == 0
    assert [got[i]["result"].get("isError") for i in (1, 2)] == [None, None]  # both reached the server
    assert b"budget check failed, calls are forwarded unchecked" in result.stderr
    assert (tmp_path / "blocked.db.spill.jsonl").exists()  # and the rows were kept
