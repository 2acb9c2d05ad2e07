"""``mcpmeter report``: tool calls joined to LLM calls on request_id, checked against sums
computed here in plain Python over the very rows written to a real SQLite store.

Percentiles are nearest-rank: the p-th percentile of n latencies is the value at rank
ceil(p * n / 100) in ascending order; rows without a latency are left out.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import random
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import MCPMETER
from hypothesis import given, settings
from hypothesis import strategies as st
from stores import BACKENDS, Backend, make_backend

from mcpmeter.analysis.html import render
from mcpmeter.analysis.invocations import invocations
from mcpmeter.analysis.report import COLUMNS, grouped
from mcpmeter.store import CallFilter, open_store

TOOL_COLUMNS = (
    "ts",
    "latency_ms",
    "project_id",
    "agent_id",
    "session_id",
    "tags",
    "server",
    "transport",
    "upstream",
    "direction",
    "method",
    "tool",
    "jsonrpc_id",
    "request_id",
    "request_bytes",
    "response_bytes",
    "status",
    "cost_usd",
)
LLM_COLUMNS = (
    "ts",
    "agent_id",
    "project_id",
    "request_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "source",
    "tags",
)
PRICE_COLUMNS = ("model", "effective_from", "input_per_mtok", "output_per_mtok", "cached_per_mtok")
INSERT_TOOL = f"INSERT INTO calls ({', '.join(TOOL_COLUMNS)}) VALUES ({', '.join('?' * len(TOOL_COLUMNS))})"
INSERT_LLM = f"INSERT INTO llm_calls ({', '.join(LLM_COLUMNS)}) VALUES ({', '.join('?' * len(LLM_COLUMNS))})"
INSERT_PRICE = f"INSERT INTO model_prices ({', '.join(PRICE_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
DESIGN_KEYS = [
    "calls",
    "errors",
    "rejected",
    "p50_ms",
    "p95_ms",
    "request_bytes",
    "response_bytes",
    "tool_cost_usd",
    "prompt_tokens",
    "completion_tokens",
    "llm_cost_usd",
    "total_cost_usd",
]
CHROMIUM = Path("/usr/bin/chromium")


# -- rows, written as the store holds them ---------------------------------------------------


def tool_row(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ts": "2026-03-10T12:00:00.000000Z",
        "latency_ms": 10.0,
        "project_id": "acme",
        "agent_id": "planner",
        "session_id": "s-1",
        "tags": "{}",
        "server": "github",
        "transport": "stdio",
        "upstream": "stdio",
        "direction": "c2s",
        "method": "tools/call",
        "tool": "search",
        "jsonrpc_id": "1",
        "request_id": None,
        "request_bytes": 100,
        "response_bytes": 1000,
        "status": "ok",
        "cost_usd": None,
    }
    row.update(fields)
    return row


def llm_row(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ts": "2026-03-10T12:00:00.000000Z",
        "agent_id": "planner",
        "project_id": "acme",
        "request_id": "r-1",
        "model": "claude-sonnet-4",
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "cached_tokens": 0,
        "source": "manual",
        "tags": "{}",
    }
    row.update(fields)
    return row


@dataclass(frozen=True)
class Price:
    model: str
    effective_from: str
    input: float
    output: float
    cached: float | None = None


def fill(
    location: str | Path,
    tools: Iterable[dict[str, Any]] = (),
    llms: Iterable[dict[str, Any]] = (),
    prices: Iterable[Price] = (),
) -> None:
    store = open_store(str(location))
    try:
        with store.transaction():
            store.executemany(INSERT_TOOL, ([r[c] for c in TOOL_COLUMNS] for r in tools))
            store.executemany(INSERT_LLM, ([r[c] for c in LLM_COLUMNS] for r in llms))
            store.executemany(
                INSERT_PRICE, ((p.model, p.effective_from, p.input, p.output, p.cached) for p in prices)
            )
    finally:
        store.close()


def report(
    location: str | Path, by: Sequence[str], where: CallFilter | None = None, top: int | None = None
) -> Any:
    store = open_store(str(location), create=False)
    try:
        return grouped(store, by, where or CallFilter(), top)
    finally:
        store.close()


def by_key(rows: list[dict[str, Any]], *keys: str) -> dict[Any, dict[str, Any]]:
    return {(row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)): row for row in rows}


def run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    return subprocess.run(
        [MCPMETER, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@pytest.fixture(params=BACKENDS)
def location(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A new store location: a SQLite file, or a schema of its own in Postgres."""
    backend: Backend
    with make_backend(request.param, tmp_path, monkeypatch) as backend:
        yield backend.location


# -- the independent computation -------------------------------------------------------------


def nearest_rank(values: Sequence[float], pct: int) -> float | None:
    """The value at rank ceil(pct * n / 100) of the sorted values (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct * len(ordered) / 100)) - 1]


class PriceBook:
    """Model prices by date: the row with the greatest effective_from at or before ts."""

    def __init__(self, prices: Iterable[Price]) -> None:
        self._by_model: dict[str, list[Price]] = defaultdict(list)
        for price in sorted(prices, key=lambda p: p.effective_from):
            self._by_model[price.model].append(price)

    def cost(self, row: dict[str, Any]) -> float | None:
        eras = self._by_model.get(row["model"], [])
        i = bisect.bisect_right([p.effective_from for p in eras], row["ts"])
        if i == 0:
            return None
        p = eras[i - 1]
        cached = row["cached_tokens"]
        return (
            (row["prompt_tokens"] - cached) * p.input
            + cached * (p.input if p.cached is None else p.cached)
            + row["completion_tokens"] * p.output
        ) / 1e6


@dataclass
class Expected:
    calls: int = 0
    errors: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)
    request_bytes: int = 0
    response_bytes: int = 0
    tool_cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_cost_usd: float = 0.0


def expected_groups(
    tools: Iterable[dict[str, Any]],
    llms: Iterable[dict[str, Any]],
    book: PriceBook,
    tool_key: Callable[[dict[str, Any]], Any],
    llm_key: Callable[[dict[str, Any]], Any],
) -> dict[Any, Expected]:
    groups: dict[Any, Expected] = defaultdict(Expected)
    for row in tools:
        g = groups[tool_key(row)]
        g.calls += 1
        g.errors += row["status"] in ("error", "tool_error")
        g.rejected += row["status"] == "rejected"
        if row["latency_ms"] is not None:
            g.latencies.append(row["latency_ms"])
        g.request_bytes += row["request_bytes"]
        g.response_bytes += row["response_bytes"] or 0
        g.tool_cost_usd += row["cost_usd"] or 0.0
    for row in llms:
        g = groups[llm_key(row)]
        g.prompt_tokens += row["prompt_tokens"]
        g.completion_tokens += row["completion_tokens"]
        g.llm_cost_usd += book.cost(row) or 0.0
    return groups


def assert_matches(actual: dict[str, Any], want: Expected) -> None:
    assert actual["calls"] == want.calls
    assert actual["errors"] == want.errors
    assert actual["rejected"] == want.rejected
    assert actual["request_bytes"] == want.request_bytes
    assert actual["response_bytes"] == want.response_bytes
    assert actual["prompt_tokens"] == want.prompt_tokens
    assert actual["completion_tokens"] == want.completion_tokens
    assert actual["tool_cost_usd"] == pytest.approx(want.tool_cost_usd, rel=1e-9, abs=1e-8)
    assert actual["llm_cost_usd"] == pytest.approx(want.llm_cost_usd, rel=1e-9, abs=1e-8)
    total = want.tool_cost_usd + want.llm_cost_usd
    assert actual["total_cost_usd"] == pytest.approx(total, rel=1e-9, abs=1e-8)
    for pct in (50, 95):
        value = nearest_rank(want.latencies, pct)
        assert actual[f"p{pct}_ms"] == (None if value is None else round(value, 3)), pct


# -- the fleet: 50 agents, 10 projects, 100k LLM calls, 500k tool calls ------------------------


@dataclass
class Fleet:
    location: str
    tools: list[dict[str, Any]]
    llms: list[dict[str, Any]]
    prices: list[Price]


FLEET_PRICES = [
    Price("claude-sonnet-4", "2026-01-01", 3.0, 15.0, 0.3),
    Price("claude-sonnet-4", "2026-01-16T00:00:00.000000Z", 2.0, 10.0, 0.2),  # mid-fleet re-pricing
    Price("gpt-4o", "2026-01-01", 2.5, 10.0, None),
    Price("gemini-2.5-pro", "2026-01-01", 1.25, 10.0, 0.31),
    # "local-llama" has no price: its rows count as unpriced, at $0
]
STATUSES = ["ok"] * 88 + ["error"] * 4 + ["tool_error"] * 4 + ["rejected"] * 2 + ["no_response", "cancelled"]
TOOLS = [
    ("github", "search", 0.002),
    ("github", "get_issue", 0.001),
    ("web", "fetch", None),
    ("fs", "read", None),
]


def make_fleet(location: str, n_llm: int = 100_000, n_tool: int = 500_000, seed: int = 7) -> Fleet:
    rng = random.Random(seed)
    agents = [(f"agent-{i:02d}", f"project-{i % 10}") for i in range(50)]
    models = ["claude-sonnet-4", "gpt-4o", "gemini-2.5-pro", "local-llama"]
    start = 1_767_225_600  # 2026-01-01T00:00:00Z
    span = 30 * 86400
    llms: list[dict[str, Any]] = []
    for i in range(n_llm):
        agent, project = agents[rng.randrange(50)]
        prompt = rng.randrange(100, 40_000)
        llms.append(
            llm_row(
                ts=_iso(start + span * i / n_llm),
                agent_id=agent,
                project_id=project,
                request_id=f"req-{i:06d}",
                model=models[rng.randrange(4)],
                prompt_tokens=prompt,
                completion_tokens=rng.randrange(10, 4000),
                cached_tokens=rng.randrange(0, prompt // 2) if rng.random() < 0.5 else 0,
                source="litellm",
                tags=json.dumps({"team": f"team-{rng.randrange(5)}"}),
            )
        )
    # The same LLM call recorded by a second source: both rows count, the first gives the model.
    llms.extend({**row, "source": "manual"} for row in llms[:50])
    # 3% of the LLM calls decide no tool call at all (unmatched on the LLM side).
    deciders = [row for row in llms[:n_llm] if rng.random() >= 0.03]
    tools: list[dict[str, Any]] = []
    for j in range(n_tool):
        parent = deciders[j * len(deciders) // n_tool]
        server, tool, price = TOOLS[rng.randrange(len(TOOLS))]
        status = rng.choice(STATUSES)
        r = rng.random()
        if r < 0.02:
            request_id, agent, project = None, *agents[rng.randrange(50)]  # not stamped
        elif r < 0.03:
            request_id, agent, project = f"orphan-{j}", parent["agent_id"], parent["project_id"]
        else:
            request_id, agent, project = parent["request_id"], parent["agent_id"], parent["project_id"]
        method = "tools/call" if rng.random() < 0.98 else "resources/read"
        no_latency = status in ("no_response", "cancelled")
        tools.append(
            tool_row(
                ts=parent["ts"],
                latency_ms=None if no_latency else round(rng.lognormvariate(3, 1.2), 6),
                project_id=project,
                agent_id=agent,
                session_id=f"s-{agent}-{j // 2000}",
                tags=json.dumps({"team": f"team-{rng.randrange(5)}"}),
                server=server,
                method=method,
                tool=tool,
                jsonrpc_id=str(j),
                request_id=request_id,
                request_bytes=rng.randrange(50, 2000),
                response_bytes=None if no_latency else rng.randrange(10, 100_000),
                status=status,
                cost_usd=price if status not in ("rejected",) else None,
            )
        )
    fill(location, tools, llms, FLEET_PRICES)
    return Fleet(location, tools, llms, FLEET_PRICES)


def _iso(ts: float) -> str:
    secs = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{round((ts - secs) * 1e6):06d}Z"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return make_fleet(str(tmp_path_factory.mktemp("fleet") / "audit.db"))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["agent", "project"])
def test_fleet_totals_per_key_equal_an_independent_computation(fleet: Fleet, key: str) -> None:
    column = f"{key}_id"
    result = report(fleet.location, [key])
    want = expected_groups(
        fleet.tools, fleet.llms, PriceBook(fleet.prices), lambda r: r[column], lambda r: r[column]
    )
    rows = by_key(result.rows, key)
    assert set(rows) == set(want)
    assert len(rows) == (50 if key == "agent" else 10)
    for name, expected in want.items():
        assert_matches(rows[name], expected)


@pytest.mark.slow
def test_fleet_unmatched_rows_are_counted_on_both_sides(fleet: Fleet) -> None:
    ledger_ids = {r["request_id"] for r in fleet.llms}
    tool_ids = {r["request_id"] for r in fleet.tools if r["request_id"] is not None}
    result = report(fleet.location, ["agent"])
    u = result.unmatched
    assert u.tool_calls_without_request_id == sum(
        1 for r in fleet.tools if r["request_id"] is None and r["method"] == "tools/call"
    )
    assert u.tool_calls_without_llm_call == sum(
        1 for r in fleet.tools if r["request_id"] is not None and r["request_id"] not in ledger_ids
    )
    assert u.llm_calls_without_tool_call == sum(1 for r in fleet.llms if r["request_id"] not in tool_ids)
    assert u.tool_calls_without_request_id > 0
    assert u.tool_calls_without_llm_call > 0
    assert u.llm_calls_without_tool_call > 0
    book = PriceBook(fleet.prices)
    assert result.llm_calls_without_price == sum(1 for r in fleet.llms if book.cost(r) is None)


@pytest.mark.slow
def test_fleet_by_model_takes_a_tool_calls_model_from_its_llm_call_and_drops_nothing(fleet: Fleet) -> None:
    first_model: dict[str, str] = {}
    for row in fleet.llms:  # inserted in this order: ids ascend
        first_model.setdefault(row["request_id"], row["model"])
    want = expected_groups(
        fleet.tools,
        fleet.llms,
        PriceBook(fleet.prices),
        lambda r: first_model.get(r["request_id"]) if r["request_id"] else None,
        lambda r: r["model"],
    )
    rows = by_key(report(fleet.location, ["model"]).rows, "model")
    assert set(rows) == {"claude-sonnet-4", "gpt-4o", "gemini-2.5-pro", "local-llama", None}
    for model, expected in want.items():
        assert_matches(rows[model], expected)
    assert sum(r["calls"] for r in rows.values()) == len(fleet.tools)


@pytest.mark.slow
def test_fleet_filtered_by_time_and_project_keeps_each_side_by_its_own_rows(fleet: Fleet) -> None:
    since, until = "2026-01-10T00:00:00.000000Z", "2026-01-20T00:00:00.000000Z"

    def inside(r: dict[str, Any]) -> bool:
        return since <= r["ts"] < until and r["project_id"] == "project-3"

    where = CallFilter(since=since, until=until, project_id="project-3")
    tools = [r for r in fleet.tools if inside(r)]
    llms = [r for r in fleet.llms if inside(r)]
    want = expected_groups(
        tools, llms, PriceBook(fleet.prices), lambda r: r["agent_id"], lambda r: r["agent_id"]
    )
    result = report(fleet.location, ["agent"], where)
    rows = by_key(result.rows, "agent")
    assert set(rows) == set(want)
    for agent, expected in want.items():
        assert_matches(rows[agent], expected)
    # partners are looked for store-wide, whatever the filter
    ledger_ids = {r["request_id"] for r in fleet.llms}
    tool_ids = {r["request_id"] for r in fleet.tools if r["request_id"] is not None}
    assert result.unmatched.as_dict() == {
        "tool_calls_without_request_id": sum(
            1 for r in tools if r["request_id"] is None and r["method"] == "tools/call"
        ),
        "tool_calls_without_llm_call": sum(
            1 for r in tools if r["request_id"] is not None and r["request_id"] not in ledger_ids
        ),
        "llm_calls_without_tool_call": sum(1 for r in llms if r["request_id"] not in tool_ids),
    }


def test_a_small_fleet_reports_the_independent_totals_on_every_backend(location: str) -> None:
    fleet = make_fleet(location, n_llm=2_000, n_tool=10_000, seed=11)
    want = expected_groups(
        fleet.tools, fleet.llms, PriceBook(fleet.prices), lambda r: r["project_id"], lambda r: r["project_id"]
    )
    rows = by_key(report(location, ["project"]).rows, "project")
    assert set(rows) == set(want)
    for project, expected in want.items():
        assert_matches(rows[project], expected)
    store = open_store(location, create=False)
    try:
        result = invocations(store, CallFilter())
    finally:
        store.close()
    ledger_ids = {r["request_id"] for r in fleet.llms}
    assert result.unmatched.tool_calls_without_llm_call == sum(
        1 for r in fleet.tools if r["request_id"] is not None and r["request_id"] not in ledger_ids
    )
    assert sum(r["tool_calls"] for r in result.rows) == sum(1 for r in fleet.tools if r["request_id"])
    assert sum(r["llm_cost_usd"] for r in result.rows) == pytest.approx(
        sum(w.llm_cost_usd for w in want.values()), rel=1e-9
    )


# -- percentiles ---------------------------------------------------------------------------

latency = st.one_of(
    st.none(),
    st.floats(min_value=0.0, max_value=0.999, allow_nan=False),
    st.floats(min_value=0.0, max_value=120_000.0, allow_nan=False),
    st.sampled_from([5.0, 5.0, 10.0, 999.999, 1000.0, 10_000.0]),  # ties and bucket edges
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), latency), max_size=300))
def test_percentiles_are_nearest_rank_over_the_latencies_of_each_group(
    calls: list[tuple[str, float | None]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        tools = [
            tool_row(agent_id=agent, latency_ms=ms, jsonrpc_id=str(i)) for i, (agent, ms) in enumerate(calls)
        ]
        fill(path, tools)
        rows = by_key(report(path, ["agent"]).rows, "agent")
    assert set(rows) == {agent for agent, _ in calls}
    for agent, row in rows.items():
        values = [ms for a, ms in calls if a == agent and ms is not None]
        for pct in (50, 95):
            value = nearest_rank(values, pct)
            assert row[f"p{pct}_ms"] == (None if value is None else round(value, 3)), (agent, pct, values)


EDGE_LATENCIES = [None, 0.0, 0.004, 0.999, 1.0, 5.0, 5.0, 5.0, 9.99, 10.0, 99.5, 999.999, 1000.0, 65_000.0]


def test_percentiles_are_exact_at_bucket_edges_ties_and_sub_millisecond_values_on_every_backend(
    location: str,
) -> None:
    rng = random.Random(5)
    calls = [("a", ms) for ms in EDGE_LATENCIES] + [("b", rng.choice(EDGE_LATENCIES)) for _ in range(97)]
    calls += [("c", None), ("d", 42.0)]
    fill(
        location, [tool_row(agent_id=a, latency_ms=ms, jsonrpc_id=str(i)) for i, (a, ms) in enumerate(calls)]
    )
    rows = by_key(report(location, ["agent"]).rows, "agent")
    for agent, row in rows.items():
        values = [ms for a, ms in calls if a == agent and ms is not None]
        for pct in (50, 95):
            value = nearest_rank(values, pct)
            assert row[f"p{pct}_ms"] == (None if value is None else round(value, 3)), (agent, pct)
    assert (rows["c"]["p50_ms"], rows["d"]["p50_ms"], rows["d"]["p95_ms"]) == (None, 42.0, 42.0)


# -- prices --------------------------------------------------------------------------------


def test_a_later_dated_model_price_reprices_only_the_rows_after_it(location: str) -> None:
    feb = llm_row(
        ts="2026-02-10T09:00:00.000000Z",
        request_id="r-feb",
        prompt_tokens=1_000_000,
        completion_tokens=100_000,
    )
    mar = llm_row(
        ts="2026-03-10T09:00:00.000000Z",
        request_id="r-mar",
        prompt_tokens=1_000_000,
        completion_tokens=100_000,
    )
    fill(location, llms=[feb, mar], prices=[Price("claude-sonnet-4", "2026-01-01", 3.0, 15.0)])
    before = by_key(report(location, ["day"]).rows, "day")
    assert before["2026-02-10"]["llm_cost_usd"] == pytest.approx(3.0 + 0.1 * 15.0)
    assert before["2026-03-10"]["llm_cost_usd"] == pytest.approx(3.0 + 0.1 * 15.0)

    fill(location, prices=[Price("claude-sonnet-4", "2026-03-01", 1.0, 5.0)])
    after = by_key(report(location, ["day"]).rows, "day")
    assert after["2026-02-10"]["llm_cost_usd"] == pytest.approx(3.0 + 0.1 * 15.0)
    assert after["2026-03-10"]["llm_cost_usd"] == pytest.approx(1.0 + 0.1 * 5.0)


def test_cached_tokens_cost_the_cached_price_or_the_input_price_when_none_is_set(location: str) -> None:
    fill(
        location,
        llms=[
            llm_row(
                request_id="r-1",
                model="with-cache",
                prompt_tokens=1_000_000,
                cached_tokens=400_000,
                completion_tokens=100_000,
            ),
            llm_row(
                request_id="r-2",
                model="no-cache",
                prompt_tokens=1_000_000,
                cached_tokens=400_000,
                completion_tokens=100_000,
            ),
        ],
        prices=[Price("with-cache", "2026-01-01", 3.0, 15.0, 0.3), Price("no-cache", "2026-01-01", 2.0, 8.0)],
    )
    rows = by_key(report(location, ["model"]).rows, "model")
    assert rows["with-cache"]["llm_cost_usd"] == pytest.approx(0.6 * 3.0 + 0.4 * 0.3 + 0.1 * 15.0)
    assert rows["no-cache"]["llm_cost_usd"] == pytest.approx(1.0 * 2.0 + 0.1 * 8.0)


def test_an_llm_call_before_any_price_of_its_model_is_unpriced_and_counted(location: str) -> None:
    fill(
        location,
        llms=[llm_row(ts="2025-12-31T23:59:59.999999Z", request_id="r-early")],
        prices=[Price("claude-sonnet-4", "2026-01-01", 3.0, 15.0)],
    )
    result = report(location, ["agent"])
    assert result.rows[0]["llm_cost_usd"] == 0.0
    assert result.llm_calls_without_price == 1
    assert any("1 LLM calls have no model price" in note for note in result.notes())


# -- how the two sides meet in a group -------------------------------------------------------


def two_sided_store(path: str | Path) -> None:
    """Two LLM calls of planner (one deciding two tools on one session, one two sessions),
    one of critic with no tool call, and tool calls with and without a partner."""
    fill(
        path,
        tools=[
            tool_row(request_id="r-1", tool="search", session_id="s-1", server="github", cost_usd=0.01),
            tool_row(request_id="r-1", tool="search", session_id="s-1", server="github", cost_usd=0.01),
            tool_row(request_id="r-2", tool="fetch", session_id="s-1", server="web", jsonrpc_id="2"),
            tool_row(request_id="r-2", tool="search", session_id="s-2", server="web", jsonrpc_id="3"),
            tool_row(request_id="r-lost", tool="fetch", session_id="s-3", jsonrpc_id="4", cost_usd=0.5),
            tool_row(request_id=None, tool="fetch", session_id="s-3", jsonrpc_id="5", status="error"),
            tool_row(request_id=None, method="tools/list", tool=None, session_id="s-3", jsonrpc_id="6"),
        ],
        llms=[
            llm_row(request_id="r-1", prompt_tokens=1_000_000, completion_tokens=0),
            llm_row(request_id="r-2", prompt_tokens=2_000_000, completion_tokens=0, model="gpt-4o"),
            llm_row(request_id="r-3", agent_id="critic", prompt_tokens=4_000_000, completion_tokens=0),
        ],
        prices=[
            Price("claude-sonnet-4", "2026-01-01", 1.0, 1.0),
            Price("gpt-4o", "2026-01-01", 10.0, 10.0),
        ],
    )


def test_an_llm_call_takes_the_session_tool_and_server_its_tool_calls_agree_on(location: str) -> None:
    two_sided_store(location)
    sessions = by_key(report(location, ["session"]).rows, "session")
    assert sessions["s-1"]["llm_cost_usd"] == pytest.approx(1.0)  # r-1 only: r-2 spans s-1 and s-2
    assert sessions[None]["llm_cost_usd"] == pytest.approx(20.0 + 4.0)  # r-2 (mixed), r-3 (none)
    assert sessions[None]["calls"] == 0
    tools = by_key(report(location, ["tool"]).rows, "tool")
    assert tools["search"]["llm_cost_usd"] == pytest.approx(1.0)
    assert tools["search"]["calls"] == 3
    servers = by_key(report(location, ["server"]).rows, "server")
    assert servers["github"]["llm_cost_usd"] == pytest.approx(1.0)
    assert servers["web"]["llm_cost_usd"] == pytest.approx(20.0)


def test_a_tool_call_takes_the_model_of_its_llm_call_and_none_without_one(location: str) -> None:
    two_sided_store(location)
    rows = by_key(report(location, ["model"]).rows, "model")
    assert rows["claude-sonnet-4"]["calls"] == 2
    assert rows["claude-sonnet-4"]["llm_cost_usd"] == pytest.approx(1.0 + 4.0)
    assert rows["gpt-4o"]["calls"] == 2
    assert rows[None]["calls"] == 3
    assert rows[None]["tool_cost_usd"] == pytest.approx(0.5)


def test_filters_on_session_tool_or_status_keep_the_llm_calls_of_matching_tool_calls(location: str) -> None:
    two_sided_store(location)
    on_s2 = report(location, ["agent"], CallFilter(session_id="s-2")).rows
    assert [(r["agent"], r["calls"], r["prompt_tokens"]) for r in on_s2] == [("planner", 1, 2_000_000)]
    fetches = report(location, ["agent"], CallFilter(tool="fetch")).rows
    assert [(r["agent"], r["calls"], r["prompt_tokens"]) for r in fetches] == [("planner", 3, 2_000_000)]
    critic = report(location, ["agent"], CallFilter(agent_id="critic")).rows
    assert [(r["agent"], r["calls"], r["prompt_tokens"]) for r in critic] == [("critic", 0, 4_000_000)]


def test_group_by_day_and_by_tag_read_each_sides_own_time_and_tags(location: str) -> None:
    fill(
        location,
        tools=[
            tool_row(ts="2026-03-01T23:59:59.999999Z", tags='{"team": "growth"}', request_id="r-1"),
            tool_row(ts="2026-03-02T00:00:00.000000Z", tags='{"team": "infra"}', jsonrpc_id="2"),
            tool_row(ts="2026-03-02T08:00:00.000000Z", tags="{}", jsonrpc_id="3"),
        ],
        llms=[
            llm_row(ts="2026-03-01T23:59:59.000000Z", tags='{"team": "growth"}', request_id="r-1"),
            llm_row(ts="2026-03-02T10:00:00.000000Z", tags='{"team": "research"}', request_id="r-2"),
        ],
        prices=[Price("claude-sonnet-4", "2026-01-01", 1000.0, 0.0)],
    )
    days = by_key(report(location, ["day"]).rows, "day")
    assert {d: (r["calls"], r["llm_cost_usd"]) for d, r in days.items()} == {
        "2026-03-01": (1, 1.0),
        "2026-03-02": (2, 1.0),
    }
    teams = by_key(report(location, ["tag:team"]).rows, "tag:team")
    assert {t: (r["calls"], r["llm_cost_usd"]) for t, r in teams.items()} == {
        None: (1, 0.0),
        "growth": (1, 1.0),
        "infra": (1, 0.0),
        "research": (0, 1.0),
    }
    both = by_key(report(location, ["day", "tag:team"]).rows, "day", "tag:team")
    assert set(both) == {
        ("2026-03-01", "growth"),
        ("2026-03-02", "infra"),
        ("2026-03-02", None),
        ("2026-03-02", "research"),
    }


def test_top_keeps_the_costliest_groups_costliest_first(location: str) -> None:
    fill(
        location,
        tools=[
            tool_row(agent_id=f"agent-{i}", jsonrpc_id=str(i), cost_usd=float(i % 7)) for i in range(1, 30)
        ],
    )
    everyone = report(location, ["agent"]).rows
    assert [r["agent"] for r in everyone] == sorted(r["agent"] for r in everyone)
    top = report(location, ["agent"], top=5).rows
    costs = sorted((r["total_cost_usd"] for r in everyone), reverse=True)[:5]
    assert [r["total_cost_usd"] for r in top] == costs
    assert [r["agent"] for r in top][:4] == ["agent-13", "agent-20", "agent-27", "agent-6"]


# -- the command ---------------------------------------------------------------------------


def test_json_prints_an_array_of_the_group_keys_and_exactly_the_design_keys(db_path: Path) -> None:
    two_sided_store(db_path)
    result = run("report", "--db", str(db_path), "--by", "project,agent", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [list(row) for row in rows] == [["project", "agent", *DESIGN_KEYS]] * 2
    assert list(COLUMNS) == DESIGN_KEYS
    planner = by_key(rows, "agent")["planner"]
    assert planner["calls"] == 7
    assert planner["total_cost_usd"] == pytest.approx(0.02 + 0.5 + 1.0 + 20.0)
    assert "unmatched: 1 tool calls without a request_id, 1 rows with a request_id not in the ledger" in (
        result.stderr
    )


def test_csv_prints_a_header_of_keys_and_columns_then_one_line_per_group(db_path: Path) -> None:
    two_sided_store(db_path)
    result = run("report", "--db", str(db_path), "--by", "agent", "--format", "csv")
    assert result.returncode == 0, result.stderr
    lines = list(csv.reader(io.StringIO(result.stdout)))
    assert lines[0] == ["agent", *DESIGN_KEYS]
    assert [line[0] for line in lines[1:]] == ["critic", "planner"]
    critic = dict(zip(lines[0], lines[1], strict=True))
    assert critic["calls"] == "0"
    assert critic["p50_ms"] == ""
    assert float(critic["llm_cost_usd"]) == pytest.approx(4.0)


def test_the_table_ends_with_a_total_line_and_the_unmatched_counts(db_path: Path) -> None:
    two_sided_store(db_path)
    result = run("report", "--db", str(db_path), "--by", "agent")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["agent", *DESIGN_KEYS]
    assert lines[1].split()[0] == "critic"
    assert lines[2].split()[0] == "planner"
    assert lines[4].split()[:2] == ["total", "7"]
    assert "$25.5200" in lines[4]
    assert lines[5] == (
        "unmatched: 1 tool calls without a request_id, 1 rows with a request_id not in the ledger,"
        " 1 LLM calls without a tool call"
    )


def test_invocations_sum_each_request_ids_llm_and_tool_rows_and_count_the_unmatched(db_path: Path) -> None:
    two_sided_store(db_path)
    result = run("report", "invocations", "--db", str(db_path), "--format", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    rows = by_key(document["invocations"], "request_id")
    assert set(rows) == {"r-1", "r-2", "r-3", "r-lost"}
    r2 = rows["r-2"]
    assert (r2["model"], r2["llm_calls"], r2["tool_calls"]) == ("gpt-4o", 1, 2)
    assert r2["tools"] == ["fetch", "search"]
    assert r2["llm_cost_usd"] == pytest.approx(20.0)
    assert rows["r-1"]["total_cost_usd"] == pytest.approx(1.0 + 0.02)
    assert (rows["r-3"]["tool_calls"], rows["r-lost"]["llm_calls"]) == (0, 0)
    assert document["unmatched"] == {
        "tool_calls_without_request_id": 1,
        "tool_calls_without_llm_call": 1,
        "llm_calls_without_tool_call": 1,
    }
    top = run("report", "invocations", "--db", str(db_path), "--top", "1")
    assert top.returncode == 0, top.stderr
    lines = top.stdout.splitlines()
    assert lines[1].split()[0] == "r-2"
    assert lines[-1].startswith("unmatched: 1 tool calls without a request_id")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "customer"], "--by: unknown key 'customer'"),
        (["--by", "tag:"], "a tag name must be non-empty"),
        (["--format", "xml"], "unknown format 'xml'"),
        (["--since", "yesterday"], "cannot read time 'yesterday'"),
    ],
)
def test_a_bad_option_is_one_line_on_stderr_and_exit_2(db_path: Path, args: list[str], message: str) -> None:
    fill(db_path)
    result = run("report", "--db", str(db_path), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


def test_an_empty_store_reports_no_rows_and_no_invocations(db_path: Path) -> None:
    fill(db_path)
    result = run("report", "--db", str(db_path), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    result = run("report", "invocations", "--db", str(db_path), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "invocations": [],
        "unmatched": dict.fromkeys(
            ["tool_calls_without_request_id", "tool_calls_without_llm_call", "llm_calls_without_tool_call"], 0
        ),
        "llm_calls_without_price": 0,
    }


# -- the picture ---------------------------------------------------------------------------


@pytest.fixture
def chromium() -> Iterator[Path]:
    if not CHROMIUM.exists():
        if os.environ.get("MCPMETER_REQUIRE_CHROMIUM"):
            pytest.fail(
                f"MCPMETER_REQUIRE_CHROMIUM is set but {CHROMIUM} is missing (apt-get install chromium)"
            )
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium): the HTML is not rendered")
    yield CHROMIUM


def test_the_html_report_is_self_contained_and_renders_in_headless_chromium(
    tmp_path: Path, chromium: Path
) -> None:
    db = tmp_path / "audit.db"
    make_fleet(str(db), n_llm=2_000, n_tool=10_000, seed=3)
    page = tmp_path / "report.html"
    result = run("report", "--db", str(db), "--by", "agent", "--html", str(page))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    html = page.read_text()
    assert "http://" not in html
    assert "https://" not in html
    assert "<script" not in html
    for heading in ("Spend over time, by agent", "Top tools by cost", "Latency distribution"):
        assert heading in html
    assert html.count("<svg") == 3
    assert "agent-00" in html

    shot = tmp_path / "report.png"
    profile = tmp_path / "profile"
    env = {**os.environ, "HOME": str(tmp_path)}
    rendered = subprocess.run(
        [
            str(chromium),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1280,1600",
            page.as_uri(),
        ],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert shot.exists(), rendered.stderr.decode(errors="replace")[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 1600)
    assert len(png) > 50_000  # a blank page is a few KB; charts and a table are far more


def test_the_html_report_of_an_empty_store_says_so_instead_of_drawing(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    fill(db)
    page = tmp_path / "empty.html"
    result = run("report", "--db", str(db), "--html", str(page))
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    assert "no calls in scope" in html
    assert "no tool calls in scope" in html
    assert "no latencies in scope" in html


def test_the_html_page_draws_its_three_charts_from_every_backend(location: str) -> None:
    two_sided_store(location)
    store = open_store(location, create=False)
    try:
        html = render(store, ["agent"], CallFilter(), now=0.0)
    finally:
        store.close()
    assert html.count("<svg") == 3
    assert "per hour" in html  # the calls span less than two days
    assert "github/fetch" in html and "$0.5000" in html
    assert "planner" in html and "critic" in html
    assert "generated 1970-01-01 00:00 UTC" in html


def test_the_html_report_with_top_lists_the_costliest_groups_and_counts_every_call(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    fill(
        db,
        tools=[tool_row(agent_id=f"agent-{i:02d}", jsonrpc_id=str(i), cost_usd=float(i)) for i in range(29)],
    )
    page = tmp_path / "top.html"
    result = run("report", "--db", str(db), "--by", "agent", "--top", "3", "--html", str(page))
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    table = html[html.index("<table>") :]
    assert table.count("<tr>") == 1 + 3
    assert table.index("agent-28") < table.index("agent-27") < table.index("agent-26")
    assert "agent-25" not in table
    assert "<b>29</b><span>calls</span>" in html
    assert "<b>$406.00</b><span>total cost</span>" in html


def test_the_html_report_references_nothing_outside_the_page(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    fill(
        db,
        tools=[
            tool_row(method="resources/read", tool="https://example.org/doc", cost_usd=0.01),
            tool_row(agent_id="<b>bot</b>", jsonrpc_id="2", cost_usd=0.02),
        ],
    )
    page = tmp_path / "r.html"
    result = run("report", "--db", str(db), "--by", "tool", "--html", str(page))
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    assert "http://" not in html
    assert "https://" not in html
    assert "<script" not in html
    assert " src=" not in html
    assert " href=" not in html
    assert "<b>bot</b>" not in html
