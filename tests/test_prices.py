"""Dated prices: the bundled table, LLM cost at query time, tool prices on audit rows.

Everything runs against real SQLite files; the end-to-end test drives the demo server through
a real ``mcpmeter wrap`` with the official MCP SDK client.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import EXAMPLES, MCPMETER, PYTHON, read_rows
from mcp import Client, StdioServerParameters, types

from mcpmeter.ledger import Ledger
from mcpmeter.prices import (
    BEGINNING,
    LLM_COST_SQL,
    ToolPricer,
    bundled_path,
    bundled_table,
    ensure_bundled,
    llm_cost_sql,
    load_bundled,
    model_prices,
    set_model_price,
    set_tool_price,
    tool_pricer,
)
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.store import SQLiteStore

DATA = Path(__file__).resolve().parent / "data"
MTOK = 1_000_000


def at(day: str) -> float:
    """POSIX seconds of an ISO date or time (UTC)."""
    moment = datetime.fromisoformat(day)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def iso(day: str) -> str:
    return iso_utc(at(day))


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(str(db_path))
    yield opened
    opened.close()


def mcpmeter(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MCPMETER, *args], env=env, capture_output=True, text=True, timeout=60)


def llm_costs(db: Path) -> dict[str, float | None]:
    """request_id -> cost, computed by the one SQL expression the report reuses."""
    con = sqlite3.connect(db)
    try:
        return dict(con.execute(f"SELECT request_id, {LLM_COST_SQL} FROM llm_calls l ORDER BY id"))
    finally:
        con.close()


def add_call(
    store: SQLiteStore, request_id: str, model: str, day: str, prompt: int, cached: int, done: int
) -> None:
    Ledger(store=store).record(
        request_id=request_id,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=done,
        cached_tokens=cached,
        ts=at(day),
        agent_id="bot",
        project_id="acme",
        tags={},
    )


# -- the bundled table -------------------------------------------------------------------------


def test_the_bundled_table_is_dated_names_its_sources_and_covers_claude_gpt_and_gemini() -> None:
    doc = json.loads(bundled_path().read_text())
    models = {p.model: p for p in bundled_table().models}

    assert datetime.fromisoformat(doc["as_of"])
    assert any("anthropic.com" in s for s in doc["sources"])
    assert any("openai.com" in s for s in doc["sources"])
    assert any("ai.google.dev" in s for s in doc["sources"])
    for family in ("claude-", "gpt-", "gemini-"):
        assert sum(name.startswith(family) for name in models) >= 5, family
    for price in models.values():
        assert price.effective_from == BEGINNING and price.source == "bundled"
        assert 0 < price.input <= price.output
        assert price.cached is None or price.cached < price.input
    # Dated ids a provider reports price like their model.
    assert models["claude-sonnet-4-5-20250929"].input == models["claude-sonnet-4-5"].input
    assert models["gpt-4o-2024-08-06"].output == models["gpt-4o"].output


def test_the_bundled_prices_load_on_first_use_only_and_price_all_history(
    store: SQLiteStore, db_path: Path
) -> None:
    add_call(store, "old", "gpt-4o", "2019-05-01", prompt=MTOK, cached=0, done=0)

    assert ensure_bundled(store) is True
    assert ensure_bundled(store) is False

    assert len(model_prices(store)) == len(bundled_table().models)
    assert llm_costs(db_path) == {"old": pytest.approx(2.5)}


def test_loading_the_bundled_table_again_keeps_a_price_you_set_at_the_same_date(store: SQLiteStore) -> None:
    load_bundled(store)
    set_model_price(store, "gpt-4o", 2.0, 8.0, None, BEGINNING)

    load_bundled(store)

    (gpt4o,) = [p for p in model_prices(store) if p.model == "gpt-4o"]
    assert (gpt4o.input, gpt4o.output, gpt4o.source) == (2.0, 8.0, "manual")


# -- LLM cost at query time --------------------------------------------------------------------


def test_llm_cost_charges_uncached_prompt_at_input_cached_at_the_cached_price_and_completion_at_output(
    store: SQLiteStore, db_path: Path
) -> None:
    set_model_price(store, "m", input=3.0, output=15.0, cached=0.3, effective_from=iso("2026-01-01"))
    set_model_price(
        store, "no-cache-price", input=2.0, output=6.0, cached=None, effective_from=iso("2026-01-01")
    )
    add_call(store, "a", "m", "2026-11-02", prompt=1_200_000, cached=1_000_000, done=100_000)
    add_call(store, "b", "no-cache-price", "2026-11-02", prompt=1_000_000, cached=400_000, done=500_000)

    assert llm_costs(db_path) == {
        "a": pytest.approx(0.2 * 3.0 + 1.0 * 0.3 + 0.1 * 15.0),
        "b": pytest.approx(0.6 * 2.0 + 0.4 * 2.0 + 0.5 * 6.0),  # cached at the input price
    }


def test_a_later_model_price_reprices_history_from_its_date_and_leaves_earlier_rows_at_the_old_price(
    meter_env: dict[str, str], store: SQLiteStore, db_path: Path
) -> None:
    for request_id, day in (
        ("before-any", "2025-12-31T23:59:59"),
        ("oct", "2026-10-15"),
        ("nov", "2026-11-15"),
    ):
        add_call(store, request_id, "acme-model", day, prompt=MTOK, cached=200_000, done=500_000)
    first = mcpmeter(
        meter_env, "prices", "set", "model", "acme-model", "--input", "2", "--output", "8", "--cached", "0.5",
        "--from", "2026-01-01",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = llm_costs(db_path)

    later = mcpmeter(
        meter_env,
        "prices",
        "set",
        "model",
        "acme-model",
        "--input",
        "1",
        "--output",
        "4",
        "--from",
        "2026-11-01",
    )
    assert later.returncode == 0, later.stderr

    old_price = 0.8 * 2 + 0.2 * 0.5 + 0.5 * 8
    assert before == {"before-any": None, "oct": pytest.approx(old_price), "nov": pytest.approx(old_price)}
    assert llm_costs(db_path) == {
        "before-any": None,  # no price in force yet: null, never a guess
        "oct": pytest.approx(old_price),
        "nov": pytest.approx(0.8 * 1 + 0.2 * 1 + 0.5 * 4),
    }
    con = sqlite3.connect(db_path)
    assert con.execute("SELECT count(*) FROM llm_calls WHERE model = 'acme-model'").fetchone() == (3,)
    con.close()


def test_the_cost_expression_takes_the_ledger_alias_it_is_given(store: SQLiteStore) -> None:
    set_model_price(store, "m", 1.0, 1.0, None, iso("2026-01-01"))
    add_call(store, "a", "m", "2026-02-01", prompt=MTOK, cached=0, done=MTOK)

    row = store.query_one(
        f"SELECT sum({llm_cost_sql('ledger_row')}) FROM llm_calls ledger_row WHERE ledger_row.agent_id = ?",
        ("bot",),
    )

    assert row == (pytest.approx(2.0),)
    with pytest.raises(ValueError, match="not a table name or alias"):
        llm_cost_sql("l; DROP TABLE llm_calls")


# -- prices commands ---------------------------------------------------------------------------


def price_rows(db: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    con = sqlite3.connect(db)
    try:
        models = con.execute(
            "SELECT model, effective_from, input_per_mtok, output_per_mtok, cached_per_mtok, source"
            " FROM model_prices WHERE source != 'bundled' ORDER BY model, effective_from"
        ).fetchall()
        tools = con.execute(
            "SELECT pattern, effective_from, per_call, per_kb, source FROM tool_prices ORDER BY pattern"
        ).fetchall()
        return models, tools
    finally:
        con.close()


def test_prices_import_reads_a_json_price_file_with_dates_and_aliases(
    meter_env: dict[str, str], db_path: Path
) -> None:
    done = mcpmeter(meter_env, "prices", "import", str(DATA / "prices.json"))

    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == f"imported 3 model prices and 2 tool prices from {DATA / 'prices.json'}\n"
    models, tools = price_rows(db_path)
    assert models == [
        ("acme-finetune-v3", iso("2026-06-01"), 3.0, 12.0, None, "import"),
        ("ft:gpt-4.1:acme::v3", iso("2026-06-01"), 3.0, 12.0, None, "import"),
        ("gpt-4.1", iso("2026-01-01"), 1.6, 6.4, 0.4, "import"),
    ]
    assert tools == [
        ("*/web_search", iso("2026-01-01"), 0.005, 0.0001, "import"),
        ("github/*", iso("2026-01-01"), 0.002, 0.0, "import"),
    ]


def test_prices_import_reads_a_csv_price_file(meter_env: dict[str, str], db_path: Path) -> None:
    done = mcpmeter(meter_env, "prices", "import", str(DATA / "prices.csv"))

    assert done.returncode == 0, done.stderr
    models, tools = price_rows(db_path)
    assert models == [
        ("claude-haiku-4-5", iso("2026-07-01"), 0.8, 4.0, None, "import"),
        ("gpt-4.1", iso("2026-01-01"), 1.6, 6.4, 0.4, "import"),
    ]
    assert [(p, c, k) for p, _, c, k, _ in tools] == [
        ("*/web_search", 0.005, 0.0001),
        ("github/*", 0.002, 0.0),
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.csv",
            "kind,name,input,output\nmodel,gpt-4.1,1,2\nmodel,gpt-4o,abc,2\n",
            "{file}:3 input: expected a number of USD, got 'abc'",
        ),
        (
            "bad.csv",
            "kind,name,per_call\ntool,github,0.1\n",
            "{file}:2 name: tool price pattern 'github' is not",
        ),
        (
            "bad.csv",
            "kind,name,input\nprice,gpt-4o,1\n",
            "{file}:2 kind: expected model or tool, got 'price'",
        ),
        (
            "bad.json",
            '{"models": [{"model": "gpt-4o", "input": 1, "output": -2}]}',
            "{file} models[0].output: expected a non-negative number of USD, got -2",
        ),
        ("bad.json", '{"tools": [{"pattern": "a/*"}]}', "{file} tools[0].per_call: missing"),
        (
            "bad.json",
            '{"tools": [{"pattern": "a/*", "per_call": 1, "price": 2}]}',
            "{file} tools[0].price: unknown",
        ),
    ],
)
def test_a_bad_price_file_is_one_line_naming_file_line_or_entry_and_field_and_imports_nothing(
    name: str, content: str, message: str, meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    file = tmp_path / name
    file.write_text(content)

    done = mcpmeter(meter_env, "prices", "import", str(file))

    assert done.returncode == 2
    assert done.stderr.startswith("mcpmeter: " + message.format(file=file)), done.stderr
    assert done.stderr.count("\n") == 1
    assert not db_path.exists() or price_rows(db_path) == ([], [])


def test_prices_show_json_has_the_import_shape_and_round_trips_through_prices_import(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    mcpmeter(meter_env, "prices", "import", str(DATA / "prices.json"))
    shown = mcpmeter(meter_env, "prices", "show", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    exported = tmp_path / "prices.json"
    exported.write_text(shown.stdout)

    other = meter_env | {"MCPMETER_DB": str(tmp_path / "other.db")}
    assert mcpmeter(other, "prices", "import", str(exported)).returncode == 0
    again = json.loads(mcpmeter(other, "prices", "show", "--format", "json").stdout)

    def without_source(doc: dict[str, Any]) -> dict[str, Any]:
        return {kind: [{k: v for k, v in row.items() if k != "source"} for row in doc[kind]] for kind in doc}

    first = json.loads(shown.stdout)
    assert without_source(again) == without_source(first)
    assert {"model": "gpt-4.1", "from": iso("2026-01-01"), "input": 1.6, "output": 6.4, "cached": 0.4} in (
        without_source(first)["models"]
    )
    assert len(first["tools"]) == 2


def test_prices_show_without_a_store_shows_the_bundled_table_and_creates_nothing(
    meter_env: dict[str, str], db_path: Path
) -> None:
    done = mcpmeter(meter_env, "prices", "show")

    assert done.returncode == 0, done.stderr
    assert "Model prices (USD per million tokens)" in done.stdout
    assert "claude-sonnet-4-5" in done.stdout and "gemini-2.5-pro" in done.stdout
    assert "Tool prices (USD)" in done.stdout
    assert not db_path.exists()


def test_prices_set_tool_with_a_pattern_that_is_not_server_slash_tool_is_a_usage_error(
    meter_env: dict[str, str],
) -> None:
    done = mcpmeter(meter_env, "prices", "set", "tool", "web_search", "--per-call", "0.01")

    assert done.returncode == 2
    assert done.stderr == (
        "mcpmeter: tool price pattern 'web_search' is not SERVER/TOOL-GLOB"
        " (e.g. github/*, */web_search, github/create_issue)\n"
    )


def test_prices_import_needs_a_file_or_bundled(meter_env: dict[str, str]) -> None:
    neither = mcpmeter(meter_env, "prices", "import")
    bundled = mcpmeter(meter_env, "prices", "import", "--bundled")

    assert (neither.returncode, neither.stderr) == (
        2,
        "mcpmeter: prices import: give a FILE or --bundled (not both)\n",
    )
    assert bundled.returncode == 0
    assert bundled.stderr.startswith(
        f"loaded {len(bundled_table().models)} bundled model prices (list prices of 20"
    )


# -- tool prices on audit rows -----------------------------------------------------------------


def call(
    server: str | None,
    tool: str | None,
    ts: float,
    response_bytes: int | None = 100,
    method: str = "tools/call",
    status: str = "ok",
) -> CallRecord:
    return CallRecord(
        ts, 3.0, "acme", "bot", "s-1", "{}", server, "stdio", "stdio", "c2s", method, tool, "1", None, None,
        120, response_bytes, status, None, None, None, None, None, None, None,
    )  # fmt: skip


def cost_of(store: SQLiteStore, server: str, tool: str, ts: float, response_bytes: int = 0) -> float | None:
    (priced,) = tool_pricer(store)([call(server, tool, ts, response_bytes)])
    return priced.cost_usd


GLOBS = {
    "*/*": 0.0001,
    "github/*": 0.002,
    "*/web_search": 0.005,
    "github/web_search": 0.007,
    "github/create_*": 0.003,
    "*/create_issue": 0.004,
}


@pytest.mark.parametrize(
    ("server", "tool", "price"),
    [
        ("github", "web_search", 0.007),  # no wildcard beats everything
        ("brave", "web_search", 0.005),  # a tool-specific price beats a catch-all
        ("github", "list_repos", 0.002),  # the server's price
        ("github", "create_pr", 0.003),  # more literal tool characters: github/create_*
        ("github", "create_issue", 0.004),  # */create_issue names more of the tool than github/create_*
        ("linear", "create_issue", 0.004),
        ("filesystem", "read_file", 0.0001),  # the catch-all
    ],
)
def test_the_most_specific_matching_glob_prices_a_tool_call(
    server: str, tool: str, price: float, store: SQLiteStore
) -> None:
    for pattern, per_call in GLOBS.items():
        set_tool_price(store, pattern, per_call, 0.0, iso("2026-01-01"))

    assert cost_of(store, server, tool, at("2026-11-02")) == price


def test_a_tool_call_is_priced_at_the_latest_price_in_force_at_its_time(store: SQLiteStore) -> None:
    set_tool_price(store, "github/*", 0.001, 0.0, iso("2026-01-01"))
    set_tool_price(store, "github/*", 0.002, 0.0, iso("2026-06-01"))
    set_tool_price(store, "github/*", 0.004, 0.0, iso("2026-12-01"))

    assert cost_of(store, "github", "search", at("2025-12-31")) is None
    assert cost_of(store, "github", "search", at("2026-01-01")) == 0.001
    assert cost_of(store, "github", "search", at("2026-05-31T23:59:59")) == 0.001
    assert cost_of(store, "github", "search", at("2026-11-30")) == 0.002
    assert cost_of(store, "github", "search", at("2026-12-02")) == 0.004


def test_a_specific_price_not_yet_in_force_leaves_the_general_one_to_price_the_call(
    store: SQLiteStore,
) -> None:
    set_tool_price(store, "github/*", 0.002, 0.0, iso("2026-01-01"))
    set_tool_price(store, "github/search", 0.01, 0.0, iso("2026-11-01"))

    assert cost_of(store, "github", "search", at("2026-10-31")) == 0.002
    assert cost_of(store, "github", "search", at("2026-11-01")) == 0.01


def test_a_per_kb_price_adds_the_response_size_in_kib_to_the_per_call_price(store: SQLiteStore) -> None:
    set_tool_price(store, "search/*", 0.001, 0.0005, iso("2026-01-01"))

    assert cost_of(store, "search", "fetch", at("2026-11-02"), response_bytes=0) == 0.001
    assert cost_of(store, "search", "fetch", at("2026-11-02"), response_bytes=10 * 1024) == pytest.approx(
        0.006
    )
    assert cost_of(store, "search", "fetch", at("2026-11-02"), response_bytes=1536) == pytest.approx(0.00175)


def test_only_tools_call_rows_with_a_matching_price_get_a_cost(store: SQLiteStore) -> None:
    set_tool_price(store, "github/*", 0.002, 0.001, iso("2026-01-01"))
    ts = at("2026-11-02")
    records = [
        call("github", "search", ts, 2048),
        call("github", None, ts, 500, method="tools/list"),
        call("github", "search", ts, None, status="no_response"),
        call("github", "search", ts, None, status="rejected"),
        call("github", "search", ts, 80, status="error"),
        call("slack", "post", ts, 100),
        call(None, None, ts, 100),
    ]

    priced = tool_pricer(store)(records)

    assert [r.cost_usd for r in priced] == [
        pytest.approx(0.004),
        None,  # not a tool call
        0.002,  # no response: the call went out
        None,  # rejected by a budget: never forwarded
        pytest.approx(0.002 + 0.001 * 80 / 1024),
        None,  # no price matches
        None,
    ]
    assert [r._replace(cost_usd=None) for r in priced] == records


def test_a_batch_without_any_price_is_returned_as_it_is(store: SQLiteStore) -> None:
    records = [call("github", "search", at("2026-11-02"))]

    assert tool_pricer(store)(records) is records


def test_the_pricer_reads_new_prices_only_after_its_refresh_interval(store: SQLiteStore) -> None:
    set_tool_price(store, "github/*", 0.002, 0.0, iso("2026-01-01"))
    ts = at("2026-11-02")
    slow = ToolPricer(store, refresh_s=3600)
    eager = ToolPricer(store, refresh_s=0)
    assert slow([call("github", "search", ts)])[0].cost_usd == 0.002
    assert eager([call("github", "search", ts)])[0].cost_usd == 0.002

    set_tool_price(store, "github/*", 0.009, 0.0, iso("2026-01-01"))

    assert slow([call("github", "search", ts)])[0].cost_usd == 0.002
    assert eager([call("github", "search", ts)])[0].cost_usd == 0.009


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cost_usd_is_stamped_on_tool_calls_recorded_through_a_real_wrap_when_a_tool_price_is_set(
    meter_env: dict[str, str], db_path: Path
) -> None:
    for args in (
        ["demo-server/*", "--per-call", "0.001", "--from", "2020-01-01"],
        ["demo-server/fetch_report", "--per-call", "0.01", "--per-kb", "0.0005", "--from", "2020-01-01"],
    ):
        done = mcpmeter(meter_env, "prices", "set", "tool", *args)
        assert done.returncode == 0, done.stderr
    server = StdioServerParameters(
        command=MCPMETER, args=["wrap", "--", PYTHON, str(EXAMPLES / "demo_server.py")], env=meter_env
    )
    agent = types.Implementation(name="pricing-test", version="1.0.0")

    with anyio.fail_after(60):
        async with Client(server, mode="legacy", client_info=agent) as session:
            await session.call_tool("search", {"query": "in"})
            await session.call_tool("fetch_report", {"kilobytes": 64})
            await session.call_tool("fail", {"reason": "quota"})

    rows = read_rows(db_path)
    assert [r["cost_usd"] for r in rows if r["method"] != "tools/call"] == [None] * (len(rows) - 3)
    calls = {r["tool"]: r for r in rows if r["method"] == "tools/call"}
    assert calls["search"]["cost_usd"] == 0.001
    assert calls["fail"]["cost_usd"] == 0.001  # a tool error still ran
    report = calls["fetch_report"]
    assert report["response_bytes"] > 64 * 1024
    assert report["cost_usd"] == pytest.approx(0.01 + 0.0005 * report["response_bytes"] / 1024)
