"""An example MCP server for the mcpmeter demo and tests.

Four tools, each showing a different kind of call in the audit log:
``search`` (fast), ``summarize`` (slow), ``fail`` (a tool error) and ``fetch_report``
(a large result). Run it with ``python examples/demo_server.py``; it speaks MCP over stdio.
"""

from __future__ import annotations

import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("demo-server", log_level=os.environ.get("DEMO_SERVER_LOG_LEVEL", "WARNING"))  # type: ignore[arg-type]


@server.tool()
def search(query: str) -> str:
    """Search a tiny catalogue (fast)."""
    catalogue = ["invoices", "customers", "orders", "refunds", "tickets"]
    hits = [item for item in catalogue if query.lower() in item]
    return ", ".join(hits) or "no match"


@server.tool()
def summarize(text: str, delay_ms: int = 150) -> str:
    """Summarise a text (slow: simulates a model or a remote API)."""
    time.sleep(delay_ms / 1000)
    words = text.split()
    return " ".join(words[:8]) + (" ..." if len(words) > 8 else "")


@server.tool()
def fail(reason: str = "upstream quota exceeded") -> str:
    """Always fails: the result comes back with isError true."""
    raise ToolError(reason)


@server.tool()
def fetch_report(kilobytes: int = 256) -> str:
    """Return a large result of about ``kilobytes`` KiB."""
    line = "row,amount,currency,customer\n"
    return line * max(1, (kilobytes * 1024) // len(line))


if __name__ == "__main__":
    server.run()
