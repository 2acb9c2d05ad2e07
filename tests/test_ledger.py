"""The LLM ledger: every import format from real-looking files, idempotence, bad rows, the API.

Imports run against a real SQLite file, through the Python functions or the installed
``mcpmeter`` command as users run it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MCPMETER
from stores import BACKENDS, Backend, make_backend, subprocess_env

from mcpmeter.errors import UsageError
from mcpmeter.ledger import MAX_TOKENS, BadRow, Ledger, LedgerRow, import_file, record
from mcpmeter.store import SQLiteStore

DATA = Path(__file__).resolve().parent / "data"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC).timestamp()
#: The ledger's columns, as DESIGN.md names them.
LEDGER_COLUMNS = ", ".join(
    [
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
    ]
)


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(str(db_path))
    yield opened
    opened.close()


def ledger_rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT {LEDGER_COLUMNS} FROM llm_calls ORDER BY id")]
    finally:
        con.close()


def mcpmeter(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MCPMETER, *args], env=env, capture_output=True, text=True, timeout=60)


def write_lines(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- each format -----------------------------------------------------------------------------


def test_a_litellm_spend_log_export_takes_agent_project_and_tags_from_its_metadata_and_tags(
    store: SQLiteStore, db_path: Path
) -> None:
    result = import_file(store, DATA / "litellm_spend_logs.jsonl", now=NOW)

    assert (result.format, result.imported, result.skipped) == ("litellm", 4, 0)
    rows = ledger_rows(db_path)
    assert rows == [
        {
            "ts": "2026-11-02T09:14:03.512000Z",
            "agent_id": "triage-bot",  # metadata.user_api_key_alias
            "project_id": "acme",  # end_user
            "request_id": "chatcmpl-AqX3b8kZt1mN0pQrS2uVw4xYz5A6B",
            "model": "gpt-4o-2024-08-06",
            "prompt_tokens": 1250,
            "completion_tokens": 215,
            "cached_tokens": 1024,  # metadata.usage_object.prompt_tokens_details.cached_tokens
            "source": "litellm",
            "tags": '{"env":"prod","feature":"ticket-triage"}',
        },
        {
            "ts": "2026-11-02T09:14:07.004000Z",
            "agent_id": "triage-bot-v2",  # spend_logs_metadata wins over the key alias
            "project_id": "acme-eu",
            "request_id": "chatcmpl-AqX3dLm9Pq2Rs3Tu4Vw5Xy6Za7Bc8",
            "model": "gpt-4o-mini-2024-07-18",
            "prompt_tokens": 1700,
            "completion_tokens": 120,
            "cached_tokens": 0,
            "source": "litellm",
            "tags": '{"env":"prod"}',
        },
        {
            "ts": "2026-11-02T10:02:41.118000Z",  # no zone: UTC
            "agent_id": "deep-research",  # the agent: tag wins
            "project_id": "globex",  # the project: tag
            "request_id": "chatcmpl-Br7YkQ2wE3rT4yU5iO6pA7sD8fG9h",
            "model": "claude-sonnet-4-5-20250929",  # the anthropic/ provider prefix dropped
            "prompt_tokens": 4800,
            "completion_tokens": 440,
            "cached_tokens": 0,
            "source": "litellm",
            "tags": '{"agent":"deep-research","nightly":"true","project":"globex"}',
        },
        {
            "ts": "2026-11-02T10:03:12.500000Z",
            "agent_id": "research-agent",
            "project_id": None,
            "request_id": "chatcmpl-Cs8ZlR3xF4sU5zV6jP7qB8tE9gH0i",
            "model": "gemini-2.5-pro",
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "source": "litellm",
            "tags": "{}",
        },
    ]


def test_openai_chat_completions_and_responses_objects_import_with_cached_tokens_and_their_created_time(
    store: SQLiteStore, db_path: Path
) -> None:
    result = import_file(store, DATA / "openai_responses.jsonl", now=NOW)

    assert (result.format, result.imported, result.skipped) == ("openai", 3, 0)
    rows = ledger_rows(db_path)
    got = [
        (r["ts"], r["request_id"], r["model"], r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"])
        for r in rows
    ]
    assert got == [
        (
            "2026-11-06T09:14:03.000000Z",
            "chatcmpl-BXq0Zc3WbE1f9hJkLmNoPqRsTuVwX",
            "gpt-4o-2024-08-06",
            2231,
            48,
            1920,
        ),
        (
            "2026-11-06T09:14:11.000000Z",
            "chatcmpl-BXq0fH7yTgR5eW3qA1sD2fG4hJ6kL",
            "gpt-4o-mini-2024-07-18",
            512,
            19,
            0,
        ),
        (
            "2026-11-06T09:15:02.000000Z",
            "resp_68f1c2a9d4e08190b7a1c3e5f7091b2d",
            "gpt-5-mini-2025-08-07",
            3150,
            410,
            2048,
        ),
    ]
    assert [(r["agent_id"], r["project_id"]) for r in rows] == [
        (None, None),
        (None, None),
        ("billing-bot", "initech"),  # the Responses object's metadata
    ]
    assert {r["source"] for r in rows} == {"openai"}


def test_anthropic_messages_count_cache_writes_and_reads_in_the_prompt_and_reads_as_cached(
    store: SQLiteStore, db_path: Path
) -> None:
    result = import_file(store, DATA / "anthropic_messages.jsonl", now=NOW)

    assert (result.format, result.imported, result.skipped) == ("anthropic", 3, 0)
    rows = ledger_rows(db_path)
    got = [(r["request_id"], r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"]) for r in rows]
    assert got == [
        ("msg_01XFDUDYJgAACzvnptvVoYEL", 412 + 2048 + 0, 0, 96),
        ("msg_01Aq9w8E7r6T5y4U3i2O1pZx", 130 + 0 + 2048, 2048, 21),
        ("msg_013Zva2CMHLNnXjNJJKqJ2EF", 25, 0, 3),
    ]
    # A message has no time: the line's own ts when it has one, else the import's.
    assert [r["ts"] for r in rows] == [
        "2026-11-20T12:00:00.000000Z",
        "2026-11-02T11:20:05.250000Z",
        "2026-11-20T12:00:00.000000Z",
    ]
    assert [(r["agent_id"], r["project_id"]) for r in rows][1] == ("support-bot", "acme")
    assert [r["model"] for r in rows] == [
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5-20251001",
    ]


def test_a_csv_with_the_ledger_columns_imports_with_its_tags_and_empty_cells_as_defaults(
    store: SQLiteStore, db_path: Path
) -> None:
    result = import_file(store, DATA / "ledger.csv", now=NOW)

    assert (result.format, result.imported, result.skipped) == ("csv", 4, 0)
    assert ledger_rows(db_path) == [
        {
            "ts": "2026-11-03T08:00:01.000000Z",
            "agent_id": "onboarding_bot",
            "project_id": "acme",
            "request_id": "req-0001",
            "model": "gpt-4.1",
            "prompt_tokens": 1800,
            "completion_tokens": 240,
            "cached_tokens": 1024,
            "source": "csv",
            "tags": '{"team":"growth"}',
        },
        {
            "ts": "2026-11-03T08:00:09.500000Z",
            "agent_id": "onboarding_bot",
            "project_id": "acme",
            "request_id": "req-0002",
            "model": "gpt-4.1",
            "prompt_tokens": 2100,
            "completion_tokens": 95,
            "cached_tokens": 1536,
            "source": "csv",
            "tags": '{"team":"growth"}',
        },
        {
            "ts": "2026-11-03T08:01:30.000000Z",
            "agent_id": "triage-bot",
            "project_id": "globex",
            "request_id": "req-0003",
            "model": "claude-haiku-4-5",
            "prompt_tokens": 640,
            "completion_tokens": 80,
            "cached_tokens": 0,
            "source": "csv",
            "tags": "{}",
        },
        {
            "ts": "2026-11-03T08:02:00.000000Z",
            "agent_id": "triage-bot",
            "project_id": "globex",
            "request_id": "req-0004",
            "model": "claude-haiku-4-5",
            "prompt_tokens": 700,
            "completion_tokens": 64,
            "cached_tokens": 0,
            "source": "csv",
            "tags": "{}",
        },
    ]


def test_ledger_json_lines_keep_a_source_they_carry_and_default_to_the_format_name(
    store: SQLiteStore, db_path: Path
) -> None:
    result = import_file(store, DATA / "ledger.jsonl", now=NOW)

    assert (result.format, result.imported) == ("jsonl", 2)
    rows = ledger_rows(db_path)
    assert [(r["request_id"], r["source"], r["tags"]) for r in rows] == [
        ("req-1001", "runtime", '{"team":"growth"}'),
        ("req-1002", "jsonl", "{}"),
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("litellm_spend_logs.jsonl", "litellm"),
        ("openai_responses.jsonl", "openai"),
        ("anthropic_messages.jsonl", "anthropic"),
        ("ledger.csv", "csv"),
        ("ledger.jsonl", "jsonl"),
    ],
)
def test_format_auto_tells_each_sample_file_from_its_first_record(
    name: str, expected: str, store: SQLiteStore
) -> None:
    assert import_file(store, DATA / name, now=NOW).format == expected


def test_an_explicit_format_is_used_as_given(store: SQLiteStore, db_path: Path) -> None:
    result = import_file(store, DATA / "openai_responses.jsonl", format="openai", source="gateway")

    assert (result.format, result.imported) == ("openai", 3)
    assert {r["source"] for r in ledger_rows(db_path)} == {"gateway"}


def test_a_first_record_of_no_known_format_asks_for_format(store: SQLiteStore, tmp_path: Path) -> None:
    file = write_lines(tmp_path / "odd.jsonl", [{"hello": "world"}])

    with pytest.raises(UsageError, match=r"odd\.jsonl:1: cannot tell the format .* use --format"):
        import_file(store, file)


def test_a_json_array_is_refused_with_a_hint_to_give_one_object_a_line(
    store: SQLiteStore, tmp_path: Path
) -> None:
    file = tmp_path / "spend.json"
    file.write_text(json.dumps([{"request_id": "a"}]))

    with pytest.raises(UsageError, match=r"spend\.json is one JSON array.*jq -c"):
        import_file(store, file)


# -- idempotence -----------------------------------------------------------------------------


def test_importing_the_same_file_twice_adds_nothing_the_second_time(
    meter_env: dict[str, str], db_path: Path
) -> None:
    first = mcpmeter(meter_env, "ledger", "import", str(DATA / "litellm_spend_logs.jsonl"))
    second = mcpmeter(meter_env, "ledger", "import", str(DATA / "litellm_spend_logs.jsonl"))

    assert (first.returncode, first.stdout, first.stderr) == (0, "", "imported 4, skipped 0\n")
    assert (second.returncode, second.stderr) == (0, "imported 0, skipped 0; 4 already in the ledger\n")
    assert len(ledger_rows(db_path)) == 4


def test_a_renamed_copy_of_an_export_imports_nothing_new_since_the_source_is_the_format(
    store: SQLiteStore, db_path: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "spend-2026-11-02-overlap.jsonl"
    copy.write_bytes((DATA / "litellm_spend_logs.jsonl").read_bytes())

    import_file(store, DATA / "litellm_spend_logs.jsonl")
    again = import_file(store, copy)

    assert (again.imported, again.already) == (0, 4)
    assert len(ledger_rows(db_path)) == 4


def test_the_same_request_ids_under_another_source_are_other_rows(store: SQLiteStore, db_path: Path) -> None:
    import_file(store, DATA / "anthropic_messages.jsonl", now=NOW)
    other = import_file(store, DATA / "anthropic_messages.jsonl", source="eu-gateway", now=NOW)

    assert other.imported == 3
    assert [r["source"] for r in ledger_rows(db_path)] == ["anthropic"] * 3 + ["eu-gateway"] * 3


# -- bad rows --------------------------------------------------------------------------------


def bad_file(tmp_path: Path) -> Path:
    good = {
        "ts": "2026-11-03T09:00:00Z",
        "agent_id": "a",
        "request_id": "r1",
        "model": "gpt-4.1",
        "prompt_tokens": 10,
        "completion_tokens": 2,
    }
    path = tmp_path / "calls.jsonl"
    lines = [
        json.dumps(good),
        json.dumps(good | {"request_id": "r2", "prompt_tokens": "lots"}),
        "",
        "{not json",
        json.dumps(good | {"request_id": "r3"}),
        json.dumps(good | {"request_id": "r4", "ts": None}),
        json.dumps(good | {"request_id": "r5", "cached_tokens": 11}),
        json.dumps(good | {"request_id": "r6"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_skipped_and_counted_and_the_first_is_named_by_file_line_and_field(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    file = bad_file(tmp_path)

    done = mcpmeter(meter_env, "ledger", "import", str(file))

    assert done.returncode == 0
    assert done.stderr == (
        f"imported 3, skipped 4 (first: {file}:2 prompt_tokens:"
        " expected a non-negative integer, got 'lots')\n"
    )
    assert [r["request_id"] for r in ledger_rows(db_path)] == ["r1", "r3", "r6"]


def test_each_kind_of_bad_row_names_its_line_and_field(store: SQLiteStore, tmp_path: Path) -> None:
    file = bad_file(tmp_path)
    try:
        orjson.loads(b"{not json")
    except orjson.JSONDecodeError as exc:
        not_json = exc.msg  # the decoder's own words
    errors: list[str] = []
    for line in (2, 4, 6, 7):
        with pytest.raises(BadRow) as caught:
            import_file(store, file, strict=True)
        errors.append(str(caught.value))
        # Drop the line that stopped the import, keep the rest as it was (line numbers too).
        lines = file.read_text().split("\n")
        lines[line - 1] = ""
        file.write_text("\n".join(lines))

    assert errors == [
        f"{file}:2 prompt_tokens: expected a non-negative integer, got 'lots'"
        " (--strict: stopped here; 1 row imported before it)",
        f"{file}:4: not JSON: {not_json} at column 2 (--strict: stopped here; 0 rows imported before it)",
        f"{file}:6 ts: missing (--strict: stopped here; 1 row imported before it)",
        f"{file}:7 cached_tokens: 11 cached tokens is more than the 10 prompt tokens"
        " (--strict: stopped here; 0 rows imported before it)",
    ]


def test_strict_stops_at_the_first_bad_row_with_one_line_on_stderr_and_exit_1(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    file = bad_file(tmp_path)

    done = mcpmeter(meter_env, "ledger", "import", "--strict", str(file))

    assert done.returncode == 1
    assert done.stderr == (
        f"mcpmeter: {file}:2 prompt_tokens: expected a non-negative integer, got 'lots'"
        " (--strict: stopped here; 1 row imported before it)\n"
    )
    assert [r["request_id"] for r in ledger_rows(db_path)] == ["r1"]


def test_a_csv_row_with_a_wrong_number_of_cells_is_named_by_its_line(
    store: SQLiteStore, tmp_path: Path
) -> None:
    file = tmp_path / "ledger.csv"
    file.write_text((DATA / "ledger.csv").read_text() + "2026-11-03T08:03:00Z,bot,acme,req-9\n")

    result = import_file(store, file)

    assert (result.imported, result.skipped) == (4, 1)
    assert str(result.first_error) == f"{file}:6: expected 10 columns as in the header, got 4"


def test_a_missing_usage_in_a_provider_response_is_a_bad_row_naming_the_field(
    store: SQLiteStore, tmp_path: Path
) -> None:
    file = write_lines(
        tmp_path / "msgs.jsonl",
        [
            {
                "id": "msg_1",
                "type": "message",
                "model": "claude-haiku-4-5",
                "usage": {"input_tokens": 1, "output_tokens": 1},
            },
            {"id": "msg_2", "type": "message", "model": "claude-haiku-4-5"},
            {"id": "msg_3", "type": "message", "model": "claude-haiku-4-5", "usage": {"input_tokens": 5}},
        ],
    )

    result = import_file(store, file, format="anthropic")

    assert (result.imported, result.skipped) == (1, 2)
    assert str(result.first_error) == f"{file}:2 usage: missing"


def test_a_file_that_cannot_be_read_is_one_line_on_stderr_and_a_nonzero_exit(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    done = mcpmeter(meter_env, "ledger", "import", str(tmp_path / "nope.jsonl"))

    assert done.returncode == 2
    assert done.stderr == f"mcpmeter: cannot read {tmp_path / 'nope.jsonl'}: No such file or directory\n"


def test_an_unknown_format_is_a_usage_error(meter_env: dict[str, str]) -> None:
    done = mcpmeter(meter_env, "ledger", "import", "--format", "xml", str(DATA / "ledger.csv"))

    assert done.returncode == 2
    assert done.stderr.startswith("mcpmeter: unknown format 'xml': use one of auto, jsonl, csv, litellm")


# -- tenant flags and streaming ----------------------------------------------------------------


def test_agent_and_project_flags_apply_to_every_row_of_an_import(
    meter_env: dict[str, str], db_path: Path
) -> None:
    done = mcpmeter(
        meter_env,
        "ledger",
        "import",
        str(DATA / "anthropic_messages.jsonl"),
        "--agent",
        "support-bot",
        "--project",
        "globex",
        "--source",
        "anthropic-eu",
    )

    assert done.returncode == 0, done.stderr
    rows = ledger_rows(db_path)
    assert {(r["agent_id"], r["project_id"], r["source"]) for r in rows} == {
        ("support-bot", "globex", "anthropic-eu")
    }


def big_ledger(path: Path, rows: int) -> Path:
    with path.open("w") as out:
        for n in range(rows):
            out.write(
                json.dumps(
                    {
                        "ts": f"2026-11-03T09:{n // 6000 % 60:02d}:{n // 100 % 60:02d}.{n % 100:06d}Z",
                        "agent_id": f"agent-{n % 50}",
                        "project_id": f"project-{n % 10}",
                        "request_id": f"req-{n:08d}",
                        "model": "gpt-4.1",
                        "prompt_tokens": 1000 + n % 700,
                        "completion_tokens": 100 + n % 90,
                        "cached_tokens": n % 500,
                        "tags": {"team": "growth"},
                    }
                )
                + "\n"
            )
    return path


def test_a_big_import_streams_in_batches_with_flat_memory(
    store: SQLiteStore, db_path: Path, tmp_path: Path
) -> None:
    file = big_ledger(tmp_path / "big.jsonl", 20_000)
    size = file.stat().st_size

    tracemalloc.start()
    try:
        result = import_file(store, file)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (result.imported, result.skipped) == (20_000, 0)
    assert size > 4_000_000
    assert peak < size / 4, f"peak {peak} bytes for a {size} byte file"
    con = sqlite3.connect(db_path)
    assert con.execute("SELECT count(*), sum(prompt_tokens) FROM llm_calls").fetchone() == (
        20_000,
        sum(1000 + n % 700 for n in range(20_000)),
    )
    con.close()


def test_a_strict_import_keeps_the_batches_written_before_the_bad_row(
    store: SQLiteStore, db_path: Path, tmp_path: Path
) -> None:
    file = big_ledger(tmp_path / "big.jsonl", 2_500)
    lines = file.read_text().splitlines()
    lines[2_100] = lines[2_100].replace('"model": "gpt-4.1"', '"model": ""')
    file.write_text("\n".join(lines) + "\n")

    with pytest.raises(BadRow, match=r"big\.jsonl:2101 model: missing .* 2100 rows imported before it"):
        import_file(store, file, strict=True, batch=1000)

    assert len(ledger_rows(db_path)) == 2_100
    again = import_file(store, file, batch=1000)
    assert (again.imported, again.already, again.skipped) == (399, 2_100, 1)


# -- the Python API ----------------------------------------------------------------------------


def test_record_writes_one_row_to_mcpmeter_db_and_is_idempotent_on_source_and_request_id(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MCPMETER_AGENT_ID", "MCPMETER_AGENT_NAME", "MCPMETER_PROJECT_ID", "MCPMETER_TAGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MCPMETER_DB", str(db_path))
    call = {
        "request_id": "chatcmpl-42",
        "model": "gpt-4o",
        "prompt_tokens": 1200,
        "completion_tokens": 80,
        "cached_tokens": 1024,
        "agent_id": "triage-bot",
        "project_id": "acme",
        "ts": datetime(2026, 11, 22, 17, 0, 1, 250000, tzinfo=UTC),
        "tags": {"team": "growth"},
    }

    assert record(**call) is True
    assert record(**call) is False
    assert record(**call | {"source": "gateway"}) is True

    assert ledger_rows(db_path) == [
        {
            "ts": "2026-11-22T17:00:01.250000Z",
            "agent_id": "triage-bot",
            "project_id": "acme",
            "request_id": "chatcmpl-42",
            "model": "gpt-4o",
            "prompt_tokens": 1200,
            "completion_tokens": 80,
            "cached_tokens": 1024,
            "source": source,
            "tags": '{"team":"growth"}',
        }
        for source in ("api", "gateway")
    ]


def test_record_takes_agent_project_and_tags_from_the_env_vars_wrap_reads(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCPMETER_AGENT_NAME", "named-bot")
    monkeypatch.delenv("MCPMETER_AGENT_ID", raising=False)
    monkeypatch.setenv("MCPMETER_PROJECT_ID", "globex")
    monkeypatch.setenv("MCPMETER_TAGS", "env=prod,team=core")

    with Ledger(db_path) as ledger:
        ledger.record(
            request_id="r-1", model="claude-haiku-4-5", prompt_tokens=10, completion_tokens=1, ts=NOW
        )
        ledger.record(
            request_id="r-2",
            model="claude-haiku-4-5",
            prompt_tokens=10,
            completion_tokens=1,
            agent_id="own-bot",
        )

    rows = ledger_rows(db_path)
    assert [(r["agent_id"], r["project_id"], r["tags"]) for r in rows] == [
        ("named-bot", "globex", '{"env":"prod","team":"core"}'),
        ("own-bot", "globex", '{"env":"prod","team":"core"}'),
    ]
    assert rows[0]["ts"] == "2026-11-20T12:00:00.000000Z"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt_tokens", -1, "prompt_tokens: expected a non-negative integer, got -1"),
        ("completion_tokens", "many", "completion_tokens: expected a non-negative integer, got 'many'"),
        ("request_id", "", "request_id: missing"),
        ("model", " ", "model: missing"),
        ("cached_tokens", 5000, "cached_tokens: 5000 cached tokens is more than the 100 prompt tokens"),
        ("ts", "yesterday", "ts: expected an ISO-8601 time or POSIX seconds, got 'yesterday'"),
        ("ts", datetime(2026, 11, 22), "ts: a datetime needs a time zone"),
    ],
)
def test_record_refuses_a_bad_value_with_a_value_error_naming_the_field(
    field: str, value: Any, message: str, db_path: Path
) -> None:
    call: dict[str, Any] = {"request_id": "r", "model": "m", "prompt_tokens": 100, "completion_tokens": 1}

    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        record(**call | {field: value}, db=db_path)
    assert ledger_rows(db_path) == []


def test_ledger_add_writes_one_row_and_a_second_add_of_the_same_call_is_a_no_op(
    meter_env: dict[str, str], db_path: Path
) -> None:
    args = ["ledger", "add", "--agent", "triage-bot", "--request-id", "req-7", "--model", "gpt-4.1"]
    args += ["--prompt-tokens", "900", "--completion-tokens", "60", "--cached-tokens", "512"]
    args += ["--project", "acme", "--ts", "2026-11-21T10:00:00Z"]

    first = mcpmeter(meter_env, *args)
    second = mcpmeter(meter_env, *args)

    assert (first.returncode, first.stderr) == (0, "added req-7 (manual)\n")
    assert (second.returncode, second.stderr) == (
        0,
        "req-7 (manual) is already in the ledger: nothing added\n",
    )
    assert ledger_rows(db_path) == [
        {
            "ts": "2026-11-21T10:00:00.000000Z",
            "agent_id": "triage-bot",
            "project_id": "acme",
            "request_id": "req-7",
            "model": "gpt-4.1",
            "prompt_tokens": 900,
            "completion_tokens": 60,
            "cached_tokens": 512,
            "source": "manual",
            "tags": "{}",
        }
    ]


def test_ledger_add_with_a_negative_count_is_a_one_line_usage_error(meter_env: dict[str, str]) -> None:
    done = mcpmeter(
        meter_env, "ledger", "add", "--request-id", "r", "--model", "m", "--prompt-tokens", "-5",
        "--completion-tokens", "1",
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.startswith("mcpmeter: Invalid value for '--prompt-tokens'")
    assert done.stderr.count("\n") == 1


# -- bounds: token counts and times ------------------------------------------------------------

#: One more than SQLite (and Postgres BIGINT) can hold, a count that fits but makes every sum
#: overflow, and the first count past the ledger's bound.
TOO_BIG = (99999999999999999999999999, 2**63 - 1, MAX_TOKENS + 1)
TOO_BIG_MESSAGE = "expected at most 1,000,000,000,000 tokens for one call"
LAST_SECOND = "9999-12-31T23:59:59.000000Z"


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    with make_backend(request.param, tmp_path, monkeypatch) as made:
        yield made


def ledger_call(n: int, **fields: Any) -> dict[str, Any]:
    """A ledger JSON line: call ``n`` of agent ``a``, 10 prompt and 2 completion tokens."""
    call = {
        "ts": "2026-11-03T09:00:00Z",
        "agent_id": "a",
        "request_id": f"r{n}",
        "model": "gpt-4.1",
        "prompt_tokens": 10,
        "completion_tokens": 2,
    }
    return call | fields


def report_json(env: dict[str, str]) -> list[dict[str, Any]]:
    done = mcpmeter(env, "report", "--by", "agent", "--format", "json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_a_thousand_row_import_with_one_overflowing_count_stores_999_rows_and_skips_one(
    backend: Backend, tmp_path: Path
) -> None:
    calls = [ledger_call(n) for n in range(1000)]
    calls[500]["prompt_tokens"] = TOO_BIG[0]
    file = write_lines(tmp_path / "calls.jsonl", calls)

    done = mcpmeter(subprocess_env(backend, tmp_path), "ledger", "import", str(file))

    assert (done.returncode, done.stderr) == (
        0,
        f"imported 999, skipped 1 (first: {file}:501 prompt_tokens: {TOO_BIG_MESSAGE}, got 1e+26)\n",
    )
    assert backend.sql("SELECT count(*), sum(prompt_tokens) FROM llm_calls") == [(999, 9990)]


def test_a_row_of_2_63_minus_1_tokens_is_skipped_and_report_still_sums_the_others(
    backend: Backend, tmp_path: Path
) -> None:
    env = subprocess_env(backend, tmp_path)
    huge = 2**63 - 1
    calls = [
        ledger_call(1),
        ledger_call(2, prompt_tokens=huge, cached_tokens=huge),
        ledger_call(3, completion_tokens=huge),
        ledger_call(4, prompt_tokens=huge),
        ledger_call(5),
    ]
    file = write_lines(tmp_path / "calls.jsonl", calls)

    done = mcpmeter(env, "ledger", "import", str(file))

    assert done.stderr.startswith(f"imported 2, skipped 3 (first: {file}:2 prompt_tokens: {TOO_BIG_MESSAGE}")
    [group] = report_json(env)
    assert (group["agent"], group["prompt_tokens"], group["completion_tokens"]) == ("a", 20, 4)


def test_rows_of_negative_tokens_are_skipped_and_counted(backend: Backend, tmp_path: Path) -> None:
    calls = [
        ledger_call(1, prompt_tokens=-1),
        ledger_call(2, completion_tokens=-5),
        ledger_call(3, cached_tokens=-2),
        ledger_call(4, prompt_tokens=-(2**63)),
        ledger_call(5),
    ]
    file = write_lines(tmp_path / "calls.jsonl", calls)

    done = mcpmeter(subprocess_env(backend, tmp_path), "ledger", "import", str(file))

    assert done.stderr == (
        f"imported 1, skipped 4 (first: {file}:1 prompt_tokens: expected a non-negative integer, got -1)\n"
    )
    assert backend.sql("SELECT request_id FROM llm_calls") == [("r5",)]


def provider_records(field: str, value: Any) -> dict[str, dict[str, Any]]:
    """One record per import format with ``field`` (a dotted path) set to ``value``."""
    litellm = {
        "request_id": "l-1",
        "startTime": "2026-11-02T09:14:03Z",
        "model": "gpt-4o",
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "metadata": {"usage_object": {"prompt_tokens_details": {"cached_tokens": 1}}},
    }
    openai = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1762420443,
        "model": "gpt-4o",
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}},
    }
    responses = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1762420443,
        "model": "gpt-5-mini",
        "usage": {"input_tokens": 10, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}},
    }
    anthropic = {
        "id": "msg_1",
        "type": "message",
        "model": "claude-haiku-4-5",
        "usage": {
            "input_tokens": 10,
            "output_tokens": 2,
            "cache_creation_input_tokens": 3,
            "cache_read_input_tokens": 1,
        },
    }
    by_format = {"jsonl": ledger_call(1, cached_tokens=1), "litellm": litellm, "openai": openai}
    by_format |= {"openai-responses": responses, "anthropic": anthropic}
    found: dict[str, dict[str, Any]] = {}
    for name, rec in by_format.items():
        *path, last = field.split(".")
        holder: Any = rec
        for key in path:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and last in holder:
            holder[last] = value
            found[name] = rec
    return found


#: Every integer field an import format reads, as a dotted path in its record.
INTEGER_FIELDS = [
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "metadata.usage_object.prompt_tokens_details.cached_tokens",
    "usage.prompt_tokens",
    "usage.completion_tokens",
    "usage.prompt_tokens_details.cached_tokens",
    "usage.input_tokens",
    "usage.output_tokens",
    "usage.input_tokens_details.cached_tokens",
    "usage.cache_creation_input_tokens",
    "usage.cache_read_input_tokens",
]


@pytest.mark.parametrize("value", [TOO_BIG[1], TOO_BIG[2], -1, "99999999999999999999999999"])
def test_every_integer_field_of_every_format_refuses_a_count_out_of_bounds(
    value: Any, store: SQLiteStore, db_path: Path, tmp_path: Path
) -> None:
    cases = [
        (field, name, rec) for field in INTEGER_FIELDS for name, rec in provider_records(field, value).items()
    ]
    assert {name for _, name, _ in cases} == {"jsonl", "litellm", "openai", "openai-responses", "anthropic"}
    for field, name, rec in cases:
        good = provider_records("model", rec["model"])[name]  # the same format, its counts untouched
        good["id" if "id" in good else "request_id"] = f"good-{name}-{field}"
        file = write_lines(tmp_path / f"{name}.jsonl", [rec, good])

        result = import_file(store, file, format=name.removesuffix("-responses"), now=NOW)

        assert (result.imported, result.skipped) == (1, 1), (field, name)
        assert result.first_error is not None and result.first_error.line == 1, (field, name)
    assert len(ledger_rows(db_path)) == len(cases)


def test_anthropic_cache_tokens_that_add_up_past_the_bound_are_a_bad_prompt(
    store: SQLiteStore, tmp_path: Path
) -> None:
    usage = {
        "input_tokens": MAX_TOKENS,
        "output_tokens": 1,
        "cache_creation_input_tokens": MAX_TOKENS,
        "cache_read_input_tokens": 0,
    }
    file = write_lines(tmp_path / "msgs.jsonl", [{"id": "m", "model": "claude-haiku-4-5", "usage": usage}])

    result = import_file(store, file, format="anthropic", now=NOW)

    assert (result.imported, result.skipped) == (0, 1)
    assert str(result.first_error) == (
        f"{file}:1 usage.input_tokens + cache_creation_input_tokens + cache_read_input_tokens:"
        f" {TOO_BIG_MESSAGE}, got {2 * MAX_TOKENS}"
    )


def test_a_csv_cell_of_too_many_tokens_is_a_bad_row(store: SQLiteStore, tmp_path: Path) -> None:
    file = tmp_path / "ledger.csv"
    file.write_text(
        "ts,request_id,model,prompt_tokens,completion_tokens,cached_tokens\n"
        "2026-11-03T09:00:00Z,r1,gpt-4.1,99999999999999999999999999,1,0\n"
        "2026-11-03T09:00:00Z,r2,gpt-4.1,10,1e30,0\n"
        "2026-11-03T09:00:00Z,r3,gpt-4.1,10,1,0\n"
    )

    result = import_file(store, file)

    assert (result.imported, result.skipped) == (1, 2)
    assert str(result.first_error) == (
        f"{file}:2 prompt_tokens: {TOO_BIG_MESSAGE}, got '99999999999999999999999999'"
    )


def test_ledger_add_with_a_huge_count_is_one_line_on_stderr_and_exit_2(
    backend: Backend, tmp_path: Path
) -> None:
    env = subprocess_env(backend, tmp_path)
    args = ["ledger", "add", "--request-id", "r", "--model", "m", "--completion-tokens", "1"]

    done = mcpmeter(env, *args, "--prompt-tokens", "99999999999999999999999999")
    at_bound = mcpmeter(env, *args, "--prompt-tokens", str(MAX_TOKENS))

    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        f"mcpmeter: --prompt-tokens: {TOO_BIG_MESSAGE}, got 99999999999999999999999999\n",
    )
    assert (at_bound.returncode, at_bound.stderr) == (0, "added r (manual)\n")
    assert backend.sql("SELECT prompt_tokens FROM llm_calls") == [(MAX_TOKENS,)]


def test_ledger_add_with_more_cached_than_prompt_tokens_is_one_line_and_exit_2(
    meter_env: dict[str, str], db_path: Path
) -> None:
    done = mcpmeter(
        meter_env, "ledger", "add", "--request-id", "r", "--model", "m", "--prompt-tokens", "5",
        "--completion-tokens", "1", "--cached-tokens", "6",
    )  # fmt: skip

    assert (done.returncode, done.stderr) == (
        2,
        "mcpmeter: --cached-tokens: 6 cached tokens is more than the 5 prompt tokens\n",
    )


def test_ledger_add_at_the_last_second_of_year_9999_reads_back_exactly(
    backend: Backend, tmp_path: Path
) -> None:
    env = subprocess_env(backend, tmp_path)
    args = ["ledger", "add", "--model", "m", "--prompt-tokens", "1", "--completion-tokens", "1"]

    whole = mcpmeter(env, *args, "--request-id", "r1", "--ts", "9999-12-31T23:59:59Z")
    micros = mcpmeter(env, *args, "--request-id", "r2", "--ts", "9999-12-31T23:59:59.999999Z")
    zoned = mcpmeter(env, *args, "--request-id", "r3", "--ts", "9999-12-31T21:59:59.123456-02:00")

    assert [whole.returncode, micros.returncode, zoned.returncode] == [0, 0, 0], zoned.stderr
    assert backend.sql("SELECT request_id, ts FROM llm_calls ORDER BY request_id") == [
        ("r1", LAST_SECOND),
        ("r2", "9999-12-31T23:59:59.999999Z"),
        ("r3", "9999-12-31T23:59:59.123456Z"),
    ]


def test_ledger_add_of_a_time_past_year_9999_in_utc_is_one_line_and_exit_2(
    meter_env: dict[str, str], db_path: Path
) -> None:
    done = mcpmeter(
        meter_env, "ledger", "add", "--request-id", "r", "--model", "m", "--prompt-tokens", "1",
        "--completion-tokens", "1", "--ts", "9999-12-31T23:00:00-05:00",
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.startswith("mcpmeter: cannot read time '9999-12-31T23:00:00-05:00'")
    assert done.stderr.count("\n") == 1


def test_an_import_row_at_the_last_second_of_year_9999_reads_back_exactly(
    backend: Backend, tmp_path: Path
) -> None:
    calls = [
        ledger_call(1, ts="9999-12-31T23:59:59Z"),
        ledger_call(2, ts="9999-12-31T23:59:59"),  # no zone: UTC
        ledger_call(3, ts=253402300799999),  # epoch milliseconds: the last one of 9999
        ledger_call(4, ts="253402300800000"),  # a millisecond later: refused, never guessed at
        ledger_call(5, ts=1762420443),  # epoch seconds
    ]
    file = write_lines(tmp_path / "calls.jsonl", calls)

    done = mcpmeter(subprocess_env(backend, tmp_path), "ledger", "import", str(file))

    assert done.stderr == (
        f"imported 4, skipped 1 (first: {file}:4 ts: expected POSIX seconds (below 10^11) or"
        " milliseconds (up to 253402300799999, the end of year 9999), got '253402300800000')\n"
    )
    assert backend.sql("SELECT request_id, ts FROM llm_calls ORDER BY request_id") == [
        ("r1", LAST_SECOND),
        ("r2", LAST_SECOND),
        ("r3", "9999-12-31T23:59:59.999000Z"),
        ("r5", "2025-11-06T09:14:03.000000Z"),
    ]


@pytest.mark.parametrize(
    ("ts", "stored"),
    [
        ("9999-12-31T23:59:59Z", LAST_SECOND),
        ("2026-11-03T09:00:00.123456+00:00", "2026-11-03T09:00:00.123456Z"),
        ("1700000000", "2023-11-14T22:13:20.000000Z"),  # epoch seconds, as a CSV cell
        ("1700000000123", "2023-11-14T22:13:20.123000Z"),  # epoch milliseconds (10^11 and up)
        ("99999999999", "5138-11-16T09:46:39.000000Z"),  # the last epoch seconds
        ("100000000000", "1973-03-03T09:46:40.000000Z"),  # the first epoch milliseconds
    ],
)
def test_a_csv_time_is_iso_as_written_or_epoch_seconds_below_1e11_and_milliseconds_from_there(
    ts: str, stored: str, store: SQLiteStore, db_path: Path, tmp_path: Path
) -> None:
    file = tmp_path / "ledger.csv"
    file.write_text(f"ts,request_id,model,prompt_tokens,completion_tokens\n{ts},r1,gpt-4.1,10,1\n")

    result = import_file(store, file)

    assert (result.imported, result.skipped) == (1, 0), result.first_error
    assert [r["ts"] for r in ledger_rows(db_path)] == [stored]


@pytest.mark.parametrize(
    "ts", ["1969-12-31T23:59:59Z", "0001-01-01", "9999-12-31T23:00:00-05:00", -1, 1e20, "nan"]
)
def test_a_time_outside_1970_to_9999_is_a_bad_row_naming_ts(
    ts: Any, store: SQLiteStore, tmp_path: Path
) -> None:
    file = write_lines(tmp_path / "calls.jsonl", [ledger_call(1, ts=ts), ledger_call(2)])

    result = import_file(store, file)

    assert (result.imported, result.skipped) == (1, 1)
    assert result.first_error is not None and result.first_error.field == "ts"


def test_record_takes_a_datetime_in_year_9999_as_it_is(db_path: Path) -> None:
    call: dict[str, Any] = {"request_id": "r", "model": "m", "prompt_tokens": 1, "completion_tokens": 1}

    record(**call, ts=datetime(9999, 12, 31, 23, 59, 59, 654321, tzinfo=UTC), db=db_path)

    assert [r["ts"] for r in ledger_rows(db_path)] == ["9999-12-31T23:59:59.654321Z"]


@pytest.mark.parametrize("field", ["prompt_tokens", "completion_tokens", "cached_tokens"])
def test_record_refuses_a_count_past_the_bound_with_a_value_error_and_writes_nothing(
    field: str, db_path: Path
) -> None:
    call: dict[str, Any] = {
        "request_id": "r",
        "model": "m",
        "prompt_tokens": MAX_TOKENS,
        "completion_tokens": 1,
    }

    with pytest.raises(ValueError, match=f"^{field}: {TOO_BIG_MESSAGE}, got {MAX_TOKENS + 1}$"):
        record(**call | {field: MAX_TOKENS + 1}, db=db_path)
    assert ledger_rows(db_path) == []


def test_a_ledger_row_made_by_hand_with_a_bad_count_is_refused_before_any_write(db_path: Path) -> None:
    fields: dict[str, Any] = {
        "ts": "2026-11-03T09:00:00.000000Z",
        "agent_id": None,
        "project_id": None,
        "request_id": "r",
        "model": "m",
        "completion_tokens": 1,
    }

    with pytest.raises(BadRow, match=f"^prompt_tokens: {TOO_BIG_MESSAGE}, got {2**63 - 1}$"):
        LedgerRow(**fields, prompt_tokens=2**63 - 1)
    with pytest.raises(BadRow, match=r"^completion_tokens: expected a non-negative integer, got -1$"):
        LedgerRow(**fields | {"completion_tokens": -1}, prompt_tokens=1)
    with pytest.raises(BadRow, match=r"^cached_tokens: 2 cached tokens is more than the 1 prompt tokens$"):
        LedgerRow(**fields, prompt_tokens=1, cached_tokens=2)
    with Ledger(db_path) as ledger:
        assert ledger.write([LedgerRow(**fields, prompt_tokens=MAX_TOKENS)]) == 1
