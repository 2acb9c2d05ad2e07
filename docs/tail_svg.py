"""Draws docs/tail.svg: the `mcpmeter tail` view of a small, made-up fleet.

The rows are generated (seeded, so the picture only changes when the view does) and drawn
by the same renderables the live view uses. Run: ``.venv/bin/python docs/tail_svg.py``.
"""

from __future__ import annotations

import random
import sys
from io import StringIO
from pathlib import Path
from typing import Any

from rich.console import Console

from mcpmeter.record import COLUMNS, iso_utc
from mcpmeter.tail.model import TailState
from mcpmeter.tail.view import TailView

NOW = 1_795_366_800.0  # 2026-11-22T17:00:00Z
OUT = Path(__file__).resolve().parent / "tail.svg"

#: (project, agent, server, tool, typical latency ms, response bytes, price per call, error rate)
FLEET = [
    ("acme", "onboarding_bot", "crm", "search_contacts", 9.0, 900, None, 0.0),
    ("acme", "onboarding_bot", "crm", "create_contact", 35.0, 400, 0.002, 0.05),
    ("acme", "onboarding_bot", "docs", "fetch_page", 180.0, 48_000, None, 0.0),
    ("globex", "billing_agent", "stripe", "list_invoices", 120.0, 22_000, 0.001, 0.0),
    ("globex", "billing_agent", "stripe", "refund", 410.0, 700, 0.01, 0.3),
    ("globex", "support_triage", "github", "create_issue", 620.0, 1_600, 0.005, 0.1),
    ("globex", "support_triage", "github", "search_issues", 95.0, 12_000, None, 0.0),
    ("initech", "etl_runner", "postgres", "query", 45.0, 260_000, None, 0.02),
]


def fleet_rows() -> list[tuple[Any, ...]]:
    rng = random.Random(7)
    rows = []
    ts = NOW - 110
    sessions = {agent: f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}" for _, agent, *_ in FLEET}
    for row_id in range(4_181, 4_181 + 140):
        ts += rng.expovariate(1.3)
        project, agent, server, tool, latency, size, price, error_rate = rng.choice(FLEET)
        roll = rng.random()
        status = "tool_error" if roll < error_rate else "ok"
        if agent == "etl_runner" and roll > 0.97:
            status = "no_response"
        if agent == "billing_agent" and tool == "refund" and roll > 0.8:
            status = "rejected"
        values: dict[str, Any] = dict.fromkeys(COLUMNS)
        values.update(
            id=row_id,
            ts=iso_utc(min(ts, NOW - 0.2)),
            latency_ms=None
            if status in ("no_response", "rejected")
            else latency * rng.lognormvariate(0, 0.3),
            project_id=project,
            agent_id=agent,
            session_id=sessions[agent],
            tags="{}",
            server=server,
            method="tools/call",
            tool=tool,
            request_bytes=rng.randint(90, 600),
            response_bytes=None if status == "no_response" else int(size * rng.uniform(0.6, 1.4)),
            status=status,
            cost_usd=price if status == "ok" else None,
        )
        rows.append(tuple(values[c] for c in COLUMNS))
    return rows


def main(out: Path = OUT) -> None:
    state = TailState()
    state.add_rows(fleet_rows(), NOW)
    console = Console(record=True, width=140, height=44, file=StringIO())
    console.print(TailView(state.snapshot(NOW), location="/var/lib/mcpmeter/audit.db"))
    console.save_svg(str(out), title="mcpmeter tail")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
