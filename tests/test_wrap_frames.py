"""`mcpmeter wrap` as a process, with frames that push the meter: one id in flight several
times, JSON nested 100,000 levels deep, and a very large call through the budget gate.

The client is a raw pipe (the SDK client never reuses an id nor nests that deep); the
servers are ``tests/servers/raw_server.py`` (answers every call, and records what it read),
``tests/servers/sink_server.py`` (answers by id without ever holding a frame) and, to see
the bytes the server got, ``tests/servers/tee.py``. Every run is bounded by a timeout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import MCPMETER, PYTHON, SERVERS, read_rows

RAW = str(SERVERS / "raw_server.py")
SINK = str(SERVERS / "sink_server.py")
TEE = str(SERVERS / "tee.py")
WAIT_S = 120
DEEP = 100_000


def dumps(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def tool_call(rpc_id: object, name: str, **arguments: Any) -> bytes:
    return dumps(
        {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
    )


def run_wrap(
    env: dict[str, str], frames: bytes, server: list[str], *options: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [MCPMETER, "wrap", *options, "--", *server],
        input=frames,
        capture_output=True,
        env=env,
        timeout=WAIT_S,
    )


def messages(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


# -- one id in flight more than once ----------------------------------------------------------


def test_three_calls_sharing_one_id_relay_unchanged_and_make_three_ok_rows_in_order(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-read.bin"
    calls = [
        tool_call(7, "echo", text="a"),
        tool_call(7, "echo", text="bb" * 50),
        tool_call(7, "echo", text="c" * 7),
    ]
    frames = b"".join(call + b"\n" for call in calls)  # one write: all three in flight at once

    result = run_wrap(meter_env, frames, [PYTHON, RAW, "--record", str(record)])

    assert result.returncode == 0, result.stderr
    assert record.read_bytes() == frames  # the server got every frame, byte for byte
    answers = result.stdout.splitlines()
    assert [json.loads(a)["result"]["text"] for a in answers] == ["a", "bb" * 50, "c" * 7]
    rows = [r for r in read_rows(db_path) if r["method"] == "tools/call"]
    assert [(r["jsonrpc_id"], r["status"]) for r in rows] == [("7", "ok")] * 3
    # Each row pairs its own request with its own answer (the sizes differ from call to call).
    assert [(r["request_bytes"], r["response_bytes"]) for r in rows] == [
        (len(call), len(answer)) for call, answer in zip(calls, answers, strict=True)
    ]
    assert result.stderr == b""


# -- JSON nested 100,000 levels deep ----------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_call(rpc_id: int) -> bytes:
    return (
        b'{"jsonrpc":"2.0","id":'
        + str(rpc_id).encode()
        + b',"method":"tools/call","params":{"name":"deep","arguments":{"tree":'
        + nested(DEEP)
        + b"}}}"
    )


def test_a_call_nested_100k_deep_relays_byte_exact_and_makes_its_row_with_no_message(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    junk = b"[" * DEEP  # never closed: not JSON, whatever its depth
    frames = deep_call(1) + b"\n" + junk + b"\n" + b'{"jsonrpc":"2.0","id":2,"method":"ping"}\n'

    result = run_wrap(meter_env, frames, [PYTHON, TEE, str(tmp_path / "wire"), "--", PYTHON, SINK])

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "wire" / "c2s.bin").read_bytes() == frames
    assert [m["id"] for m in messages(result.stdout)] == [1, 2]
    assert result.stderr == b""  # no "budget check failed", no metering error
    rows = read_rows(db_path)
    assert [(r["method"], r["tool"], r["status"]) for r in rows] == [
        ("tools/call", "deep", "ok"),
        ("ping", None, "ok"),
    ]
    assert rows[0]["request_bytes"] == len(deep_call(1))


def test_with_a_budget_a_call_nested_100k_deep_is_checked_and_refused_like_any_other(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    frames = deep_call(1) + b"\n" + deep_call(2) + b"\n"

    result = run_wrap(
        meter_env, frames, [PYTHON, TEE, str(tmp_path / "wire"), "--", PYTHON, SINK], "--max-calls", "1"
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "wire" / "c2s.bin").read_bytes() == deep_call(1) + b"\n"  # the second never ran
    by_id = {m["id"]: m for m in messages(result.stdout)}
    assert "bytes" in by_id[1]["result"] and by_id[2]["result"]["isError"] is True
    # The budget's own warning only: the check did not fail, the meter did not stumble.
    assert [line.split(b":")[1] for line in result.stderr.splitlines()] == [b" budget warning"]
    rows = sorted(read_rows(db_path), key=lambda r: str(r["jsonrpc_id"]))
    assert [(r["jsonrpc_id"], r["tool"], r["status"]) for r in rows] == [
        ("1", "deep", "ok"),
        ("2", "deep", "rejected"),
    ]


# -- a very large call through the budget gate ------------------------------------------------

LINE_MB = 64
#: The wrap process may hold the frame once, plus an interpreter and its imports; a copy of
#: the frame (or its arguments as Python objects) would take it over.
MAX_PEAK_PER_LINE = 2.5

#: Runs CMD with stdin from a file, in a process of its own, and prints the exit status,
#: stdout and peak RSS (KiB) of its process tree. ``ru_maxrss`` of children inherits the
#: high-water mark of whoever started them, so the test's own process (which may have been
#: large in an earlier test) must not be the parent.
PROBE = """
import json, resource, subprocess, sys
with open(sys.argv[1], "rb") as stdin:
    done = subprocess.run(sys.argv[2:], stdin=stdin, capture_output=True, timeout=300)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": done.returncode, "stdout": done.stdout.decode(), "stderr": done.stderr.decode(),
                  "peak_kib": peak}))
"""


def test_a_64_mb_call_through_the_budget_gate_peaks_under_2_5x_its_size(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    line = tmp_path / "call.jsonl"
    head = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ingest","arguments":{"items":['
    item = b'"abcdefghij",' * 1024  # many small strings: as Python objects, many times their bytes
    with line.open("wb") as out:
        out.write(head)
        for _ in range(LINE_MB * 1024 * 1024 // len(item)):
            out.write(item)
        out.write(b'"z"]}}}\n')
    size = line.stat().st_size - 1
    # Both the budget and the loop guard: the gate reads every tools/call before it goes on.
    wrap = [MCPMETER, "wrap", "--max-calls", "5", "--max-repeat", "5", "--", PYTHON, SINK]

    probe = subprocess.run(
        [PYTHON, "-c", PROBE, str(line), *wrap], capture_output=True, env=meter_env, timeout=WAIT_S
    )

    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["code"] == 0, report["stderr"]
    assert json.loads(report["stdout"]) == {"jsonrpc": "2.0", "id": 1, "result": {"bytes": size}}
    (row,) = read_rows(db_path)
    assert (row["tool"], row["status"], row["request_bytes"]) == ("ingest", "ok", size)
    peak = report["peak_kib"] * 1024
    assert peak < MAX_PEAK_PER_LINE * size, (
        f"peak RSS {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB line"
    )
