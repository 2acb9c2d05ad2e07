"""Running ``wrap --listen``: the socket, uvicorn, the signals, the shutdown.

SIGTERM or SIGINT: new requests get 503, the requests in flight get up to 5 s to be
answered, every stream ends, every session is closed (subprocesses get stdin EOF, then
SIGTERM, then SIGKILL; remote sessions get their DELETE), and every row is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import anyio

from mcpmeter.errors import MeterError
from mcpmeter.log import warn
from mcpmeter.proxy.http_upstream import new_client
from mcpmeter.proxy.listen.asgi import ListenApp
from mcpmeter.proxy.listen.gateway import Gateway
from mcpmeter.proxy.listen.options import ListenOptions, check_options
from mcpmeter.proxy.runtime import Runtime
from mcpmeter.proxy.shutdown import Signals

#: After SIGTERM, how long requests in flight may take to be answered.
DRAIN_S = 5.0


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise MeterError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def run_listen(options: ListenOptions, runtime: Runtime) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; then drain, close every session, write every row."""
    check_options(options)
    sock = _bind(options.host, options.port)
    signals = Signals().install()  # ours to the exit (see mcpmeter.proxy.shutdown)
    runtime.start()
    try:
        anyio.run(_serve, options, runtime, sock, signals, backend="asyncio")
    finally:
        sock.close()
        # A signal is how --listen stops: queued webhooks are dropped only on a second one.
        runtime.finish(signals, hurried=bool(signals.received[1:]))
    return 0


async def _serve(options: ListenOptions, runtime: Runtime, sock: socket.socket, signals: Signals) -> None:
    import uvicorn

    from mcpmeter.proxy.listen import guard as lim

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # the signals are ours to handle
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # uvicorn's backlog (lim.ACCEPT_BATCH) is also asyncio's accept batch and the
            # listen queue's length; the queue gets its full length back.
            sock.listen(lim.LISTEN_QUEUE)

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    async with anyio.create_task_group() as tg:
        gateway = Gateway(options, runtime, tg)
        async with contextlib.AsyncExitStack() as stack:
            if options.url is not None:
                gateway.client = await stack.enter_async_context(new_client())
            limits = options.limits
            guard = lim.guard_for(
                limits,
                gateway.notices,
                servers=min(limits.max_servers, limits.max_sessions) if gateway._own_servers else 2,
                per_connection=1 if options.url is None else 2,  # --url: one to the server, too
            )
            stack.enter_context(lim.quiet_uvicorn(gateway.notices))
            stack.callback(gateway.notices.flush)
            config = uvicorn.Config(
                ListenApp(gateway),
                lifespan="off",
                log_level="warning",
                log_config=None,
                access_log=False,
                http=lim.protocol_for(guard),
                ws="none",
                interface="asgi3",
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=2,
                timeout_keep_alive=lim.KEEP_ALIVE_S,
                backlog=lim.ACCEPT_BATCH,
            )
            server = Server(config)
            served = anyio.Event()

            async def serve() -> None:
                try:
                    await server.serve(sockets=[sock])
                finally:
                    served.set()

            # Signals stay ours until the end: a second SIGTERM must not cut the shutdown short.
            stop = anyio.Event()
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lim.loop_exception_handler(gateway.notices, guard))
            signals.while_relaying(lambda sig: loop.call_soon_threadsafe(stop.set))
            signals.watch(loop)
            if signals.received:
                stop.set()
            tg.start_soon(serve)
            tg.start_soon(gateway.reap_idle)
            warn(f"listening on http://{shown}:{port}/mcp (streamable HTTP) and /sse (HTTP+SSE)")
            if guard.cap < limits.max_connections:
                warn(
                    f"the open-file limit leaves room for {guard.cap} connections: "
                    f"--max-connections {limits.max_connections} lowered to {guard.cap}"
                )
            await stop.wait()
            with anyio.move_on_after(DRAIN_S):
                await gateway.drain()
            await gateway.close_all()
            server.should_exit = True
            with anyio.move_on_after(DRAIN_S):
                await served.wait()
        tg.cancel_scope.cancel()
