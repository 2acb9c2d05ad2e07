"""mcpmeter: a metering proxy for MCP servers.

It relays every JSON-RPC frame between an MCP client and server unchanged and records one
audit row per request (tool, latency, bytes, project, agent, session), so tool-call spend
can be allocated per agent, per customer and per feature, and joined to the LLM ledger on
``request_id``.
"""

__version__ = "0.1.0"
