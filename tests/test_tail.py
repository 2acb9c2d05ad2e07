"""`mcpmeter tail`: the model, the view, the poller on a real store, the JSON stream and the
full-screen view in a real terminal (tmux).

The model and the view take a fixed `now`, so their output is exact; the processes are real
(`mcpmeter wrap` driven by the SDK client, `mcpmeter tail` reading the same SQLite file) and
every wait has a deadline.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import EXAMPLES, MCPMETER, PYTHON, eventually, read_rows
from mcp import Client, StdioServerParameters
from rich.console import Console

from mcpmeter.record import COLUMNS, CallRecord, iso_utc
from mcpmeter.store import CallFilter, SQLiteStore
from mcpmeter.tail.app import Poller, read_budgets
from mcpmeter.tail.model import GROUPINGS, BudgetStatus, TailState, percentile
from mcpmeter.tail.view import TailView

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
NOW = 1_795_366_800.0  # 2026-11-22T17:00:00Z
DEMO = (PYTHON, str(EXAMPLES / "demo_server.py"))
PROCESS_S = 20  # start-up of a process under a loaded machine, bounded


def row(row_id: int, age_s: float, **fields: Any) -> tuple[Any, ...]:
    """A row of `calls` (every column, in order), `age_s` seconds before NOW."""
    values: dict[str, Any] = dict.fromkeys(COLUMNS)
    values.update(
        id=row_id,
        ts=iso_utc(NOW - age_s),
        latency_ms=12.0,
        project_id="acme",
        agent_id="onboarding_bot",
        session_id="6f1c2a9e-0d4b-4c11-9a55-2b7e0c1d3f80",
        tags="{}",
        server="crm",
        transport="stdio",
        upstream="stdio",
        direction="c2s",
        method="tools/call",
        tool="search",
        jsonrpc_id=str(row_id),
        request_bytes=120,
        response_bytes=480,
        status="ok",
    )
    values.update(fields)
    return tuple(values[c] for c in COLUMNS)


def record(ts: float, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "ts": ts,
        "latency_ms": 5.0,
        "project_id": "acme",
        "agent_id": "planner",
        "session_id": "s-1",
        "tags": "{}",
        "server": "demo-server",
        "transport": "stdio",
        "upstream": "stdio",
        "direction": "c2s",
        "method": "tools/call",
        "tool": "search",
        "jsonrpc_id": "1",
        "request_id": None,
        "trace_id": None,
        "request_bytes": 100,
        "response_bytes": 200,
        "status": "ok",
        "error_code": None,
        "error_message": None,
        "cost_usd": None,
        "client_name": None,
        "client_version": None,
        "server_version": None,
        "protocol_version": None,
    }
    values.update(fields)
    return CallRecord(**values)


# The fleet of the snapshot: two customers, three agents, two servers, every status.
FLEET_ROWS = [
    row(101, 150.0, tool=None, method="initialize", latency_ms=412.7, request_bytes=152, response_bytes=246),
    row(102, 95.0, tool="search", latency_ms=8.4),
    row(103, 58.5, agent_id="billing_agent", project_id="globex", session_id="0b9e77d1-5c2f",
        tool="summarize", latency_ms=161.2, request_bytes=410, response_bytes=388, cost_usd=0.0021),
    row(104, 52.25, agent_id="billing_agent", project_id="globex", session_id="0b9e77d1-5c2f", tool="fail",
        status="tool_error", latency_ms=3.1, response_bytes=214),
    row(105, 47.0, tool="fetch_report", latency_ms=48.9, response_bytes=524_288, cost_usd=0.0105),
    row(106, 41.5, agent_id="triage", server="github", tool="create_issue", latency_ms=640.0,
        request_bytes=980, response_bytes=1_540, cost_usd=0.01),
    row(107, 33.0, tool="search", latency_ms=7.9),
    row(108, 30.0, agent_id="billing_agent", project_id="globex", session_id="0b9e77d1-5c2f",
        tool="summarize", status="rejected", latency_ms=None, response_bytes=301),
    row(109, 21.75, agent_id="triage", server="github", tool="create_issue", status="error", latency_ms=15.0,
        response_bytes=190),
    row(110, 12.0, tool="search", latency_ms=9.6),
    row(111, 6.5, agent_id="triage", server="github", tool="list_issues", status="no_response",
        latency_ms=None, response_bytes=None),
    row(112, 1.25, tool="search", latency_ms=11.3, cost_usd=0.0004),
]  # fmt: skip


def render(state: TailState, *, width: int = 120, height: int = 40, filters: str = "") -> str:
    console = Console(record=True, width=width, height=height, file=StringIO(), color_system=None)
    console.print(TailView(state.snapshot(NOW), location="/var/lib/mcpmeter/audit.db", filters=filters))
    return console.export_text()


# -- the model ------------------------------------------------------------------------------


def test_the_summary_counts_calls_errors_bytes_and_cost_of_the_last_minute_only() -> None:
    state = TailState()
    state.add_rows(
        [
            row(1, 90.0, status="error", cost_usd=1.0),  # before the window: totals only
            row(2, 30.0, status="tool_error", cost_usd=0.25),
            row(3, 10.0, cost_usd=0.5),
            row(4, 5.0, status="rejected"),
        ],
        NOW,
    )
    snap = state.snapshot(NOW)
    [search] = snap.groups
    assert (search.key, search.calls, search.errors, search.bytes, search.cost_usd) == (
        "search",
        3,
        1,
        1800,
        0.75,
    )
    assert search.per_second == pytest.approx(3 / 60)
    assert (snap.rows, snap.errors, snap.rejected, snap.cost_usd) == (4, 2, 1, 1.75)
    assert snap.per_second == pytest.approx(3 / 60)
    assert [c.id for c in snap.recent] == [1, 2, 3, 4]


def test_a_group_leaves_the_summary_a_minute_after_its_last_call() -> None:
    state = TailState()
    state.add_rows([row(1, 50.0, tool="fail"), row(2, 5.0)], NOW)
    assert [g.key for g in state.snapshot(NOW).groups] == ["fail", "search"]
    assert [g.key for g in state.snapshot(NOW + 15).groups] == ["search"]
    assert state.snapshot(NOW + 60).groups == ()


def test_p50_and_p95_are_nearest_rank_percentiles_of_the_last_minutes_latencies() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.95)) == (50.0, 95.0)
    state = TailState()
    state.add_rows([row(i, 70.0 if i <= 20 else 30.0, latency_ms=float(i)) for i in range(1, 121)], NOW)
    [search] = state.snapshot(NOW).groups
    assert (search.calls, search.p50_ms, search.p95_ms) == (100, 70.0, 115.0)


def test_pausing_freezes_the_frame_at_the_moment_of_the_pause_and_resuming_moves_on() -> None:
    state = TailState()
    state.add_rows([row(1, 5.0)], NOW)
    assert state.toggle_pause(NOW) is True
    frozen = state.snapshot(NOW + 120)
    assert (frozen.paused, frozen.now, len(frozen.groups)) == (True, NOW, 1)
    assert state.toggle_pause(NOW + 120) is False
    moved = state.snapshot(NOW + 120)
    assert (moved.paused, moved.now, moved.groups) == (False, NOW + 120, ())


def test_g_cycles_the_summary_through_tool_agent_project_server_and_back() -> None:
    state = TailState(group_by="agent")
    state.add_rows(FLEET_ROWS, NOW)
    seen = [state.snapshot(NOW).group_by]
    for _ in GROUPINGS:
        state.cycle_grouping()
        seen.append(state.snapshot(NOW).group_by)
    assert seen == ["agent", "project", "server", "tool", "agent"]
    state.cycle_grouping()
    assert [(g.key, g.calls) for g in state.snapshot(NOW).groups] == [("acme", 7), ("globex", 3)]


# -- the view -------------------------------------------------------------------------------


def test_the_full_screen_view_of_a_fixed_fleet_matches_its_snapshot() -> None:
    state = TailState()
    state.add_rows(FLEET_ROWS, NOW)
    text = render(state, width=120, height=40)
    snapshot = SNAPSHOTS / "tail_view.txt"
    if os.environ.get("MCPMETER_UPDATE_SNAPSHOTS"):
        snapshot.write_text(text)
    assert text == snapshot.read_text()


def test_the_budgets_panel_lists_the_most_used_budget_first_and_flags_near_and_over() -> None:
    state = TailState()
    assert "no budgets" in render(state)
    state.set_budgets(
        [
            BudgetStatus("agent", "triage", "day", 2.0, 10.0, "usd"),
            BudgetStatus("project", "globex", "month", 1_020, 1_000, "calls"),
            BudgetStatus("agent", "billing_agent", "day", 4.1, 5.0, "usd"),
        ]
    )
    lines = [line for line in render(state).splitlines() if "%" in line]
    assert [line.split("│")[-2].split()[:3] for line in lines] == [
        ["102%", "project", "globex"],
        ["82%", "agent", "billing_agent"],
        ["20%", "agent", "triage"],
    ]


def test_a_narrow_terminal_keeps_time_agent_tool_and_status_and_drops_session_server_project() -> None:
    state = TailState()
    state.add_rows(FLEET_ROWS, NOW)
    text = render(state, width=80, height=30)
    assert all(len(line) <= 80 for line in text.splitlines())
    header = next(line for line in text.splitlines() if "time UTC" in line).split()
    assert header[1:] == ["time", "UTC", "agent", "tool", "status", "ms", "bytes", "cost", "│"]


# -- the poller on a real store -------------------------------------------------------------


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(db_path))
    yield s
    s.close()


def test_the_poller_reads_new_rows_by_id_in_batches_and_never_rereads_or_misses_one(
    store: SQLiteStore,
) -> None:
    now = time.time()
    store.write_calls([record(now, jsonrpc_id=str(i)) for i in range(2_500)])
    poller = Poller(store, CallFilter())
    seen: list[int] = []
    rows, more = poller.poll()
    seen += [r[0] for r in rows]
    assert (len(rows), more) == (1_000, True)
    while more:
        rows, more = poller.poll()
        seen += [r[0] for r in rows]
    assert seen == list(range(1, 2_501))
    assert poller.poll() == ([], False)
    store.write_calls([record(now, jsonrpc_id="late")])
    rows, more = poller.poll()
    assert ([r[0] for r in rows], more) == ([2_501], False)
    assert list(rows[0]) == list(next(store.iter_calls(CallFilter(after_id=2_500))))


def test_with_a_filter_the_poller_moves_past_rows_that_do_not_match(store: SQLiteStore) -> None:
    now = time.time()
    store.write_calls([record(now, agent_id="other") for _ in range(50)] + [record(now, agent_id="mine")])
    poller = Poller(store, CallFilter(agent_id="mine"))
    rows, _ = poller.poll()
    assert [r[COLUMNS.index("agent_id")] for r in rows] == ["mine"]
    store.write_calls([record(now, agent_id="other") for _ in range(50)])
    assert poller.poll() == ([], False)
    assert poller.last_id == 101


def test_a_poller_starts_at_since_else_at_the_end_when_following_new_rows(store: SQLiteStore) -> None:
    now = time.time()
    store.write_calls([record(now - 600), record(now - 30), record(now - 5)])
    since = Poller.starting(store, CallFilter(since=iso_utc(now - 60)), new_only=True, follow=True)
    assert [r[0] for r in since.poll()[0]] == [2, 3]
    new_only = Poller.starting(store, CallFilter(), new_only=True, follow=True)
    assert new_only.poll() == ([], False)
    everything = Poller.starting(store, CallFilter(), new_only=False, follow=False)
    store.write_calls([record(now)])  # after a --no-follow start: not part of what it prints
    assert [r[0] for r in everything.poll()[0]] == [1, 2, 3]
    assert everything.done


def test_budgets_panel_reads_each_budgets_current_spend_and_limit_from_the_store(store: SQLiteStore) -> None:
    assert read_budgets(store) == ([], None)
    with store.transaction():
        store.execute(
            "INSERT INTO budget_spend (scope, subject, period, period_start, spent_usd, calls, limit_usd)"
            " VALUES ('agent', 'triage', 'day', '2026-11-22T00:00:00.000000Z', 8.5, 3, 10)"
        )
    assert read_budgets(store) == ([BudgetStatus("agent", "triage", "day", 8.5, 10.0, "usd")], None)


# -- the command: --json, --no-follow, no terminal --------------------------------------------


def tail_command(db: Path, *args: str) -> list[str]:
    return [MCPMETER, "tail", "--db", str(db), *args]


@pytest.fixture
def filled(db_path: Path) -> Path:
    now = time.time()
    store = SQLiteStore(str(db_path))
    try:
        store.write_calls(
            [
                record(now - 7200, agent_id="planner", status="error", jsonrpc_id="1"),
                record(now - 30, agent_id="planner", status="error", jsonrpc_id="2"),
                record(now - 20, agent_id="planner", status="ok", jsonrpc_id="3"),
                record(now - 10, agent_id="coder", status="error", jsonrpc_id="4"),
                record(now - 5, agent_id="planner", status="error", tool="fetch", jsonrpc_id="5"),
            ]
        )
    finally:
        store.close()
    return db_path


def run_tail(db: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        tail_command(db, *args), capture_output=True, timeout=PROCESS_S, stdin=subprocess.DEVNULL
    )


def test_no_follow_prints_every_matching_row_once_and_exits_0(filled: Path) -> None:
    done = run_tail(
        filled, "--json", "--no-follow", "--agent", "planner", "--status", "error", "--since", "1h"
    )
    assert (done.returncode, done.stderr) == (0, b"")
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [r["jsonrpc_id"] for r in rows] == ["2", "5"]
    assert [list(r) for r in rows] == [list(COLUMNS)] * 2
    everything = run_tail(filled, "--json", "--no-follow", "--tool", "search")
    assert [orjson.loads(line)["jsonrpc_id"] for line in everything.stdout.splitlines()] == [
        "1",
        "2",
        "3",
        "4",
    ]


def test_format_json_is_the_same_stream_as_json(filled: Path) -> None:
    as_flag = run_tail(filled, "--json", "--no-follow", "--tool", "search")
    as_format = run_tail(filled, "--format", "json", "--no-follow", "--tool", "search")
    assert (as_format.returncode, as_format.stderr) == (0, b"")
    assert as_format.stdout == as_flag.stdout
    assert len(as_format.stdout.splitlines()) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "table"], b"unknown format 'table': use one of view, json"),
        (["--json", "--format", "view"], b"--json and --format view"),
        (["--json", "--status", "bogus"], b"unknown status 'bogus'"),
    ],
)
def test_a_format_or_status_tail_does_not_know_is_one_line_and_exit_2(
    filled: Path, args: list[str], message: bytes
) -> None:
    done = run_tail(filled, "--no-follow", *args)
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr.count(b"\n") == 1 and message in done.stderr, done.stderr


def test_without_a_terminal_and_without_json_tail_writes_nothing_on_stdout_and_exits_2(filled: Path) -> None:
    done = run_tail(filled)
    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr.count(b"\n") == 1 and b"--json" in done.stderr


def test_a_reader_that_stops_reading_ends_the_json_stream_quietly(db_path: Path) -> None:
    store = SQLiteStore(str(db_path))
    try:
        store.write_calls([record(time.time(), jsonrpc_id=str(i)) for i in range(5_000)])
    finally:
        store.close()
    with subprocess.Popen(
        tail_command(db_path, "--json", "--no-follow"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    ) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            assert orjson.loads(process.stdout.readline())["id"] == 1
            process.stdout.close()  # like `| head -1`
            assert process.wait(timeout=PROCESS_S) == 0
            assert process.stderr.read() == b""
        finally:
            process.kill()


def meter_env_for(env: dict[str, str], agent: str) -> dict[str, str]:
    return env | {"MCPMETER_AGENT_ID": agent, "MCPMETER_PROJECT_ID": "acme"}


def wrapped_demo(env: dict[str, str]) -> StdioServerParameters:
    return StdioServerParameters(command=MCPMETER, args=["wrap", "--", *DEMO], env=env)


@pytest.mark.anyio
async def test_json_follows_rows_written_by_a_concurrent_wrap_each_within_a_second(
    meter_env: dict[str, str], db_path: Path
) -> None:
    SQLiteStore(str(db_path)).close()
    started = iso_utc(time.time() - 1)
    printed: list[dict[str, Any]] = []
    async with await anyio.open_process(
        tail_command(db_path, "--json", "--since", started), env=meter_env, stdin=subprocess.DEVNULL
    ) as tail:
        assert tail.stdout is not None
        lines = BufferedByteReceiveStream(tail.stdout)

        async def next_row() -> dict[str, Any]:
            printed.append(orjson.loads(await lines.receive_until(b"\n", 1 << 20)))
            return printed[-1]

        try:
            async with Client(wrapped_demo(meter_env_for(meter_env, "follower")), mode="legacy") as client:
                await client.list_tools()
                with anyio.fail_after(PROCESS_S):  # tail has started and is following
                    while (await next_row())["method"] != "tools/list":
                        pass
                for name, arguments in [
                    ("search", {"query": "in"}),
                    ("fail", {}),
                    ("search", {"query": "o"}),
                ]:
                    await client.call_tool(name, arguments)
                    with anyio.fail_after(1.0):
                        row = await next_row()
                    assert (row["method"], row["tool"], row["agent_id"]) == ("tools/call", name, "follower")
        finally:
            tail.terminate()
    assert [list(r) for r in printed] == [list(COLUMNS)] * len(printed)
    assert [r["id"] for r in printed] == [r["id"] for r in read_rows(db_path)]


# -- the full-screen view in a real terminal ----------------------------------------------------

TMUX = shutil.which("tmux") or "/usr/bin/tmux"


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """A tmux server of our own (its own socket, no user config), killed afterwards."""
    if not os.path.exists(TMUX):
        if os.environ.get("MCPMETER_REQUIRE_TMUX"):
            pytest.fail("tmux is required (MCPMETER_REQUIRE_TMUX is set) but not installed")
        pytest.skip("tmux is not installed (Debian package tmux): the real-terminal test needs it")
    base = [TMUX, "-L", f"mcpmeter-test-{uuid.uuid4().hex[:12]}", "-f", os.devnull]
    try:
        yield base
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, timeout=PROCESS_S)


def start_tail_in_tmux(tmux: list[str], env: dict[str, str], db: Path, out: Path) -> str:
    """`mcpmeter tail` in a 160x45 terminal; its exit code and the terminal's settings after
    it exits land in ``out``/rc and ``out``/stty."""
    session = f"tail-{uuid.uuid4().hex[:8]}"
    script = (
        f"env MCPMETER_DB={shlex.quote(str(db))} {shlex.quote(MCPMETER)} tail; "
        f"echo $? > {shlex.quote(str(out / 'rc'))}; stty -a > {shlex.quote(str(out / 'stty'))}"
    )
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", "160", "-y", "45", "-s", session, "sh -c " + shlex.quote(script)],
        check=True,
        env=env,
        timeout=PROCESS_S,
    )
    return session


def screen(tmux: list[str], session: str) -> str:
    done = subprocess.run(
        [*tmux, "capture-pane", "-p", "-t", session], capture_output=True, timeout=PROCESS_S
    )
    return done.stdout.decode(errors="replace")


def send_key(tmux: list[str], session: str, key: str) -> None:
    subprocess.run([*tmux, "send-keys", "-t", session, key], check=True, timeout=PROCESS_S)


def wait_for(
    read: Callable[[], str], done: Callable[[str], bool], what: str, timeout: float = PROCESS_S
) -> str:
    """Poll ``read()`` until ``done`` holds for what it returns, for at most ``timeout`` seconds;
    return that (a tmux capture or a file read each time: polled every 0.05 s)."""
    seen = [""]

    def ready() -> bool:
        seen[0] = read()
        return done(seen[0])

    eventually(ready, what, timeout, poll=0.05, last_seen=lambda: seen[0])
    return seen[0]


def wait_for_screen(tmux: list[str], session: str, *needles: str) -> str:
    return wait_for(
        lambda: screen(tmux, session),
        lambda text: all(needle in text for needle in needles),
        f"the screen showing {needles}",
    )


def wait_for_line(path: Path) -> str:
    """The content of a file once a whole line is in it."""
    return wait_for(
        lambda: path.read_text() if path.exists() else "",
        lambda text: text.endswith("\n"),
        f"a line in {path.name}",
    )


def terminal_is_restored(stty: str) -> bool:
    flags = stty.replace(";", " ").split()
    return "icanon" in flags and "echo" in flags


async def drive_agents(env: dict[str, str], agents: list[str]) -> None:
    async def one(agent: str) -> None:
        async with Client(wrapped_demo(meter_env_for(env, agent)), mode="legacy") as client:
            await client.list_tools()
            await client.call_tool("search", {"query": "in"})
            await client.call_tool("fail", {"reason": "quota"})

    with anyio.fail_after(PROCESS_S * 2):
        async with anyio.create_task_group() as tg:
            for agent in agents:
                tg.start_soon(one, agent)


def test_in_a_real_terminal_tail_shows_the_agents_and_tools_and_p_g_q_work_and_q_exits_0(
    tmux: list[str], meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    SQLiteStore(str(db_path)).close()
    session = start_tail_in_tmux(tmux, meter_env, db_path, tmp_path)
    wait_for_screen(tmux, session, "mcpmeter tail", "no budgets")
    anyio.run(drive_agents, meter_env, ["alpha_agent", "beta_agent"])
    text = wait_for_screen(tmux, session, "alpha_agent", "beta_agent", "search", "fail", "tool_error")
    assert "by tool · last minute" in text

    send_key(tmux, session, "p")
    wait_for_screen(tmux, session, "PAUSED")
    send_key(tmux, session, "g")
    text = wait_for_screen(tmux, session, "by agent · last minute", "group by project")
    summary = text[text.index("by agent · last minute") :]
    assert "alpha_agent" in summary and "beta_agent" in summary
    send_key(tmux, session, "q")

    assert wait_for_line(tmp_path / "rc") == "0\n"
    assert terminal_is_restored(wait_for_line(tmp_path / "stty"))


def test_sigterm_ends_tail_with_143_and_leaves_the_terminal_as_it_found_it(
    tmux: list[str], meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    SQLiteStore(str(db_path)).close()
    session = start_tail_in_tmux(tmux, meter_env, db_path, tmp_path)
    wait_for_screen(tmux, session, "no budgets")
    panes = subprocess.run(
        [*tmux, "list-panes", "-t", session, "-F", "#{pane_pid}"],
        capture_output=True,
        check=True,
        timeout=PROCESS_S,
    )
    shell = int(panes.stdout.split()[0])
    [tail_pid] = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == shell]
    os.kill(tail_pid, signal.SIGTERM)
    assert wait_for_line(tmp_path / "rc") == "143\n"
    assert terminal_is_restored(wait_for_line(tmp_path / "stty"))


def _parent(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_writers_never_wait_for_tail_while_it_follows_the_store(filled: Path) -> None:
    """Polling at its fastest, `tail` holds no lock a writer could wait for (WAL readers)."""
    with subprocess.Popen(
        tail_command(filled, "--json", "--since", "1h", "--interval", "0.05"),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    ) as process:
        try:
            assert process.stdout is not None
            assert orjson.loads(process.stdout.readline())["jsonrpc_id"] == "2"  # tail is polling
            writer = sqlite3.connect(filled, timeout=0, isolation_level=None)
            try:
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    writer.execute("BEGIN IMMEDIATE")  # "database is locked" if tail held a lock
                    writer.execute("COMMIT")
            finally:
                writer.close()
        finally:
            process.kill()
