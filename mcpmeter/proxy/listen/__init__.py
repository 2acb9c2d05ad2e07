"""mcpmeter as an HTTP server: ``wrap --listen HOST:PORT (-- CMD | --url URL)``.

Clients reach the wrapped server over HTTP, as many at once as they like: streamable HTTP
on ``/mcp``, and the HTTP+SSE transport (2024-11-05) on ``/sse`` + ``/messages``. Each
client session has its own meter and its own upstream (a server subprocess, a share of
one, or a session with the remote server); every frame either way is metered, and every
session writes to one audit writer.

The package, in the order a request meets it:

* :mod:`~mcpmeter.proxy.listen.serve`: :func:`run_listen`: the socket, uvicorn, signals, shutdown.
* :mod:`~mcpmeter.proxy.listen.guard`: uvicorn's h11 protocol under the connection limits.
* :mod:`~mcpmeter.proxy.listen.asgi`: the ASGI application: the checks, then a handler per route.
* :mod:`~mcpmeter.proxy.listen.security`: Origin, Host, the bearer token, CORS.
* :mod:`~mcpmeter.proxy.listen.http`: request bodies, plain answers, the SSE event stream.
* :mod:`~mcpmeter.proxy.listen.gateway`: every session: opened under the caps, evicted, closed.
* :mod:`~mcpmeter.proxy.listen.sessions`: one session, and which POST each answer goes to.
* :mod:`~mcpmeter.proxy.listen.limits`: the limits, the refusals past them, their notices.
* :mod:`~mcpmeter.proxy.listen.options`: :class:`ListenOptions`, the ``--listen`` address.

Nothing is imported here, so that the command line can read the options and the limits
without loading uvicorn.
"""
