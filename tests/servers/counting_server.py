"""An SDK server whose tools count their calls in a file: a call the proxy refused never runs."""

from __future__ import annotations

import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer

COUNTS = Path(sys.argv[1])
server = MCPServer("counting-server", log_level="WARNING")


@server.tool()
def lookup(query: str) -> str:
    """Count the call, answer it."""
    with COUNTS.open("a") as out:
        out.write(f"{query}\n")
    return f"found {query}"


if __name__ == "__main__":
    server.run()
