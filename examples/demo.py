"""The mcpmeter demo: two agents call tools through `mcpmeter wrap`, then we read the audit log.

What it does, in about ten seconds:

1. starts ``examples/demo_server.py`` (an MCP server written with the official SDK) behind
   ``mcpmeter wrap``, twice, once per agent, each with its own tenant tags;
2. drives each with the real SDK client: fast calls, a slow call, a failing call and a large
   result, each stamped with the id of the LLM call that decided it (``_meta``), the way an
   agent runtime would;
3. runs ``mcpmeter export`` and prints calls, errors, latency and bytes per agent and tool;
4. with tool prices set and each LLM call's tokens in the ledger, runs ``mcpmeter report``
   for what finance asks: the all-in cost (tools + LLM) per customer and agent.

Run it with ``make run`` (or ``python examples/demo.py``). The store is ``demo-data/audit.db``
unless ``MCPMETER_DB`` says otherwise; it is recreated on every run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import anyio
import orjson
from mcp import Client, StdioServerParameters
from rich.console import Console
from rich.table import Table

from mcpmeter import ledger

HERE = Path(__file__).resolve().parent
MCPMETER = str(Path(sys.executable).with_name("mcpmeter"))
console = Console(width=max(100, shutil.get_terminal_size().columns))


def meter_params(db: Path, project: str, agent: str) -> StdioServerParameters:
    """The server command an MCP client would be configured with: the real one, wrapped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env.update(
        MCPMETER_DB=str(db),
        MCPMETER_PROJECT_ID=project,
        MCPMETER_AGENT_ID=agent,
        MCPMETER_TAGS="team=support,env=demo",
    )
    return StdioServerParameters(
        command=MCPMETER,
        args=["wrap", "--", sys.executable, str(HERE / "demo_server.py")],
        env=env,
    )


MODEL = "claude-sonnet-4-5"


async def run_agent(db: Path, project: str, agent: str, questions: list[str]) -> None:
    """One agent session: each tool call carries the id of the LLM call that asked for it.

    The agent runtime also writes each LLM call's token counts to the ledger (here with the
    Python API, as a runtime would; `mcpmeter ledger import` takes provider exports too).
    """
    async with Client(meter_params(db, project, agent), mode="legacy") as client:
        await client.list_tools()
        for n, question in enumerate(questions):
            llm_call = f"chatcmpl-{uuid.uuid4().hex[:12]}"
            ledger.record(
                request_id=llm_call,
                model=MODEL,
                prompt_tokens=12_000 + 4_000 * n,
                completion_tokens=600,
                cached_tokens=8_000,
                agent_id=agent,
                project_id=project,
                db=str(db),
            )
            meta = {"dev.mcpmeter/requestId": llm_call}
            await client.call_tool("search", {"query": question}, meta=meta)
            await client.call_tool(
                "summarize", {"text": f"notes about {question} " * 6, "delay_ms": 60}, meta=meta
            )
        await client.call_tool("fail", {"reason": "CRM quota exceeded"})
        await client.call_tool("fetch_report", {"kilobytes": 512})


def export_rows(db: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [MCPMETER, "export", "--db", str(db), "--format", "jsonl"], check=True, capture_output=True
    ).stdout
    return [orjson.loads(line) for line in out.splitlines()]


def summary_table(rows: list[dict[str, object]]) -> Table:
    groups: dict[tuple[str, str], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        groups[(str(row["agent_id"]), str(row["tool"] or row["method"]))].append(row)
    table = Table(title="Tool calls per agent (from `mcpmeter export`)", title_justify="left")
    for column in ("agent", "tool / method", "calls", "errors", "p50 ms", "max ms", "bytes in", "bytes out"):
        table.add_column(column, justify="left" if column in ("agent", "tool / method") else "right")
    for (agent, tool), items in sorted(groups.items()):
        latencies = [float(r["latency_ms"]) for r in items if r["latency_ms"] is not None]  # type: ignore[arg-type]
        errors = sum(1 for r in items if r["status"] in ("error", "tool_error"))
        table.add_row(
            agent,
            tool,
            str(len(items)),
            f"[red]{errors}[/red]" if errors else "0",
            f"{statistics.median(latencies):.1f}" if latencies else "-",
            f"{max(latencies):.1f}" if latencies else "-",
            f"{sum(int(r['request_bytes']) for r in items):,}",  # type: ignore[call-overload]
            f"{sum(int(r['response_bytes'] or 0) for r in items):,}",  # type: ignore[call-overload]
        )
    return table


def main() -> None:
    db = Path(os.environ.get("MCPMETER_DB") or HERE.parent / "demo-data" / "audit.db")
    if db.parent.exists() and db.parent.name == "demo-data":
        shutil.rmtree(db.parent)
    db.parent.mkdir(parents=True, exist_ok=True)

    console.rule("[bold]mcpmeter demo")
    console.print("server: [cyan]python examples/demo_server.py[/cyan] wrapped by [cyan]mcpmeter wrap[/cyan]")
    console.print(f"store:  [cyan]{db}[/cyan]\n")

    async def agents() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_agent, db, "acme", "onboarding_bot", ["invoices", "customers"])
            tg.start_soon(run_agent, db, "globex", "billing_agent", ["refunds", "orders", "tickets"])

    # What the tools cost: per call, and per KB of response for the report tool.
    for pattern, flags in (
        ("demo-server/*", ["--per-call", "0.001"]),
        ("demo-server/summarize", ["--per-call", "0.01"]),
        ("demo-server/fetch_report", ["--per-call", "0.002", "--per-kb", "0.0001"]),
    ):
        subprocess.run(
            [MCPMETER, "prices", "set", "tool", pattern, *flags, "--from", "2020-01-01", "--db", str(db)],
            check=True,
            capture_output=True,
        )

    anyio.run(agents)
    rows = export_rows(db)
    console.print(summary_table(rows))

    joined = [r for r in rows if r["request_id"]]
    console.print(
        f"\n{len(rows)} audit rows; {len(joined)} tool calls carry the LLM call id that decided them "
        "(column [bold]request_id[/bold]: the join key to the LLM cost ledger)."
    )
    sample = joined[0]
    console.print(
        "one row: "
        + ", ".join(
            f"{key}={sample[key]}"
            for key in ("project_id", "agent_id", "tool", "request_id", "latency_ms", "status")
        )
    )
    console.print(f"\n[bold]All-in cost[/bold] (`mcpmeter report --by project,agent`; {MODEL} list prices):")
    report = subprocess.run(
        [MCPMETER, "report", "--by", "project,agent", "--db", str(db)],
        check=True,
        capture_output=True,
        text=True,
    )
    sys.stdout.write(report.stdout)  # as the command prints it (its own widths)
    sys.stdout.flush()
    console.print(f"\nTry: [cyan]mcpmeter report invocations --db {db}[/cyan]")


if __name__ == "__main__":
    main()
