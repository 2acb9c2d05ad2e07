"""An SDK server whose tools ask the client things: server->client requests through the proxy.

``ask_model(question)`` sends ``sampling/createMessage`` and returns the model's text;
``list_roots()`` sends ``roots/list`` and returns the root URIs. Both need the initialize
handshake era (``mode="legacy"``): 2026-07-28 replaced these requests with input-required
results.
"""

from __future__ import annotations

import warnings

from mcp import types
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("sampling-server", version="0.4.2")


@server.tool()
async def ask_model(question: str, ctx: Context) -> str:
    """Ask the client's model a question (sampling/createMessage)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sampling is deprecated as of 2026-07-28
        result = await ctx.session.create_message(
            [types.SamplingMessage(role="user", content=types.TextContent(type="text", text=question))],
            max_tokens=16,
        )
    content = result.content
    return content.text if isinstance(content, types.TextContent) else repr(content)


@server.tool()
async def list_roots(ctx: Context) -> list[str]:
    """List the client's roots (roots/list)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roots are deprecated as of 2026-07-28
        result = await ctx.session.list_roots()
    return [str(root.uri) for root in result.roots]


if __name__ == "__main__":
    server.run()
