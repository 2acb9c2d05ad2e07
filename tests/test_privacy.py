"""Arguments and results never reach the store, the spill file or the logs (unless asked, redacted)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import MCPMETER, PYTHON, read_rows

from mcpmeter.redact import MASK, is_secret_key, redact, redacted_json

RAW = str(Path(__file__).resolve().parent / "servers" / "raw_server.py")
SECRET = "sk-live-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
PLAIN_SECRET = "correct-horse-battery-staple-7731"  # no pattern would recognise this one


def calls_with_secrets() -> bytes:
    frames = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {
                "name": "whoami",
                "arguments": {
                    "api_key": SECRET,
                    "query": f"look up {PLAIN_SECRET}",
                    "headers": {"Authorization": f"Bearer {SECRET}"},
                    "limit": 5,
                },
            },
        },
    ]
    return b"".join(json.dumps(f).encode() + b"\n" for f in frames)


def run_wrap(env: dict[str, str], *options: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [MCPMETER, "wrap", *options, "--", PYTHON, RAW],
        input=calls_with_secrets(),
        capture_output=True,
        env={**env, "MCPMETER_LOG": "info"},
        timeout=60,
    )


def files_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_a_secret_in_arguments_appears_nowhere_in_the_store_or_the_logs(
    meter_env: dict[str, str], db_path: Path
) -> None:
    result = run_wrap(meter_env)
    assert result.returncode == 0, result.stderr
    rows = read_rows(db_path)
    assert [r["tool"] for r in rows] == [None, "whoami"] and rows[1]["args"] is None
    stored = files_under(db_path.parent)  # the database, its WAL and anything beside it
    for secret in (SECRET, PLAIN_SECRET):
        assert secret.encode() not in stored
        assert secret.encode() not in result.stderr
    assert b"frames" in result.stderr  # the log did run


def test_a_secret_in_arguments_appears_nowhere_in_the_spill_file(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    blocked = tmp_path / "blocked.db"
    blocked.mkdir()  # a directory where the store should be: SQLite cannot open it, rows spill
    result = run_wrap({**meter_env, "MCPMETER_DB": str(blocked)})
    assert result.returncode == 0
    spill = tmp_path / "blocked.db.spill.jsonl"
    assert spill.exists() and b"whoami" in spill.read_bytes()
    for secret in (SECRET, PLAIN_SECRET):
        assert secret.encode() not in spill.read_bytes()
        assert secret.encode() not in result.stderr


def test_record_args_stores_a_redacted_copy_with_secrets_masked(
    meter_env: dict[str, str], db_path: Path
) -> None:
    result = run_wrap(meter_env, "--record-args")
    assert result.returncode == 0, result.stderr
    args = json.loads(str(read_rows(db_path)[1]["args"]))
    assert args == {
        "api_key": MASK,
        "query": f"look up {PLAIN_SECRET}",  # kept: nothing marks it as a secret
        "headers": {"Authorization": MASK},
        "limit": 5,
    }
    assert SECRET.encode() not in files_under(db_path.parent)


def test_recorded_args_are_not_part_of_export(meter_env: dict[str, str], db_path: Path) -> None:
    run_wrap(meter_env, "--record-args")
    out = subprocess.run([MCPMETER, "export", "--db", str(db_path)], capture_output=True, timeout=60).stdout
    assert b'"args"' not in out and b"look up" not in out


@pytest.mark.parametrize(
    "key",
    ["api_key", "X-Api-Key", "accessToken", "password", "db_password", "client_secret", "Authorization"],
)
def test_keys_that_name_a_secret_are_masked(key: str) -> None:
    assert is_secret_key(key)
    assert redact({key: "value"}) == {key: MASK}


@pytest.mark.parametrize("key", ["max_tokens", "author", "query", "sort", "session", "path"])
def test_ordinary_keys_are_kept(key: str) -> None:
    assert not is_secret_key(key)


@pytest.mark.parametrize(
    "text",
    [
        "Bearer abcdefghijklmnop",
        "sk-ant-api03-abcdefghijklmnopqrstuvwx",
        "ghp_" + "a" * 36,
        "github_pat_" + "b" * 40,
        "AKIAABCDEFGHIJKLMNOP",
        "xoxb-1234567890-abcdef",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
    ],
)
def test_credential_shaped_strings_are_masked_wherever_they_appear(text: str) -> None:
    assert redact({"note": f"use {text} please"}) == {"note": f"use {MASK} please"}


def test_a_password_in_a_url_is_masked_and_the_rest_of_the_url_kept() -> None:
    assert redact("postgres://bob:hunter2@db.internal/app") == f"postgres://{MASK}@db.internal/app"


def test_a_long_argument_copy_is_cut_and_marked() -> None:
    text = redacted_json({"blob": "x" * 10_000})
    assert len(text.encode()) <= 4096 and text.endswith("...")
