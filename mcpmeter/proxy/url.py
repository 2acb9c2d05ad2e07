"""``wrap --url URL``: our stdio relayed to a remote MCP server over HTTP.

The client on our stdin and stdout speaks newline-delimited JSON-RPC, as to any stdio
server; each line goes to the server through an
:class:`~mcpmeter.proxy.http_upstream.HttpUpstream` (streamable HTTP or HTTP+SSE), and
each message the server sends comes back as one line on stdout. Both directions are
metered by one :class:`~mcpmeter.metering.calls.CallMeter`; a ``tools/call`` a budget or
the loop guard refuses is answered here and never sent. stdin is read, and stdout written,
on threads of their own, so a slow client never blocks the event loop.

The session ends when stdin closes, on SIGTERM/SIGINT/SIGHUP, or when the server closes
its event stream (exit status 1); requests in flight then get up to ``DRAIN_S`` seconds to
be answered before the remote session is ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from mcpmeter.errors import MeterError
from mcpmeter.log import warn
from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.frame import C2S, Frame, LineSplitter
from mcpmeter.proxy.http_upstream import HttpUpstream, new_client
from mcpmeter.proxy.observers import Observers, may_be_call
from mcpmeter.proxy.relay import FdEndpoint
from mcpmeter.proxy.runtime import GateSettings, Runtime
from mcpmeter.proxy.shutdown import Signals
from mcpmeter.proxy.upstream import UpstreamError
from mcpmeter.record import CallRecord
from mcpmeter.threads import quiet_thread

#: After stdin closes or a signal, how long in-flight requests may take to be answered.
DRAIN_S = 5.0


class UrlOptions(NamedTuple):
    url: str
    tenant: Tenant
    transport: str = "auto"
    headers: Mapping[str, str] = {}
    #: Budget flags (``--budget``, ``--max-calls``, the loop guard); stored ones are read too.
    gates: GateSettings = GateSettings()


class _StdoutWriter:
    """Writes frames to fd 1 from its own thread, so a slow client never blocks the loop."""

    def __init__(self, on_lost: threading.Event) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=256)
        self._sink = FdEndpoint(1)
        self._lost = on_lost
        self._thread = threading.Thread(target=self._run, name="mcpmeter-stdout", daemon=True)
        self._thread.start()

    async def write(self, data: bytes) -> None:
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            await anyio.to_thread.run_sync(self._queue.put, data, abandon_on_cancel=True)

    def _run(self) -> None:
        quiet_thread()
        while (data := self._queue.get()) is not None:
            if self._lost.is_set():
                continue
            try:
                self._sink.write(data)
            except OSError:
                self._lost.set()

    def close(self, timeout: float) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


def _read_stdin(
    loop: asyncio.AbstractEventLoop, send: MemoryObjectSendStream[list[tuple[bytes, float]]]
) -> None:
    """The stdin thread: lines (no size limit) go to the loop, a chunk's worth at a time."""
    quiet_thread()
    source = FdEndpoint(0)
    lines: list[tuple[bytes, float]] = []
    splitter = LineSplitter(lambda line, seen: lines.append((bytes(line), seen)))
    try:
        while True:
            try:
                data = source.read()
            except OSError:
                data = b""
            seen = time.perf_counter()
            if data:
                splitter.feed(data, seen)
            else:
                splitter.finish(seen)
            if lines:
                batch = lines[:]
                lines.clear()
                asyncio.run_coroutine_threadsafe(send.send(batch), loop).result()
            if not data:
                return
    except (RuntimeError, anyio.ClosedResourceError, anyio.BrokenResourceError):
        return  # the loop is gone
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(send.close)


class _Connection:
    """The one client connection of ``wrap --url``: its observers (meter and gate) and the
    upstream once it exists (``auto`` may fall back to HTTP+SSE: the rows say which)."""

    def __init__(self, options: UrlOptions, runtime: Runtime) -> None:
        self._put = runtime.writer.put
        self.upstream: HttpUpstream | None = None
        meter = runtime.meter(
            options.tenant,
            transport="stdio",
            upstream="sse" if options.transport == "sse" else "http",
            default_server=urlsplit(options.url).hostname or options.url,
            sink=self._sink,
        )
        gate = runtime.gate(options.tenant, options.gates, server_name=lambda: meter.peers.server_name)
        self.observers = Observers(meter, gate)

    def _sink(self, record: CallRecord) -> None:
        upstream = self.upstream
        if upstream is not None and record.upstream != upstream.kind:
            record = record._replace(upstream=upstream.kind)
        self._put(record)


def run_url(options: UrlOptions, runtime: Runtime) -> int:
    """Relay our stdio to the server at ``options.url`` until stdin closes or a signal comes."""
    signals = Signals().install()  # ours to the exit (see mcpmeter.proxy.shutdown)
    connection = _Connection(options, runtime)
    runtime.start()
    try:
        return anyio.run(_relay_url, options, connection, signals, backend="asyncio")
    finally:
        runtime.finish(signals, [connection.observers.meter])


async def _relay_url(options: UrlOptions, connection: _Connection, signals: Signals) -> int:
    observers = connection.observers
    stdout_lost = threading.Event()
    out = _StdoutWriter(stdout_lost)
    send_lines, receive_lines = anyio.create_memory_object_stream[list[tuple[bytes, float]]](16)
    stop = anyio.Event()
    exit_code = 0

    async def deliver(frame: Frame) -> None:
        observers.observe(frame)
        await out.write(frame.tobytes() + b"\n")
        if stdout_lost.is_set():
            stop.set()

    async def pump(upstream: HttpUpstream) -> None:
        async with receive_lines:
            async for batch in receive_lines:
                for data, seen in batch:
                    frame = Frame(data, C2S, seen)
                    verdict = None
                    if observers.gating and may_be_call(data):
                        # A budget or the loop guard may answer it here (a store transaction:
                        # off the event loop). The gate decides before the frame is sent.
                        verdict = await anyio.to_thread.run_sync(observers.verdict, frame)
                    observers.observe(frame)
                    if verdict is not None:
                        rpc_id, answer = verdict
                        with observers.lock:
                            observers.refused(C2S, rpc_id, len(answer), time.perf_counter())
                        await out.write(answer + b"\n")
                        continue
                    if data.strip():
                        await upstream.send(frame)
        stop.set()  # stdin closed: the session is over

    async def upstream_gone(upstream: HttpUpstream) -> None:
        nonlocal exit_code
        await upstream.closed.wait()
        if not stop.is_set():
            warn(f"the server at {options.url} closed its event stream")
            exit_code = 1
            stop.set()

    loop = asyncio.get_running_loop()
    # A signal (handled on this thread, between the loop's steps) ends the session.
    signals.while_relaying(lambda sig: loop.call_soon_threadsafe(stop.set))
    signals.watch(loop)
    threading.Thread(target=_read_stdin, args=(loop, send_lines), name="mcpmeter-stdin", daemon=True).start()
    async with new_client() as client, anyio.create_task_group() as tg:
        upstream = HttpUpstream(
            options.url, deliver, client=client, tg=tg, mode=options.transport, headers=options.headers
        )
        connection.upstream = upstream
        failed: str | None = None
        try:
            await upstream.start()
        except UpstreamError as exc:
            failed = str(exc)
            stop.set()
        if failed is None:
            tg.start_soon(pump, upstream)
            tg.start_soon(upstream_gone, upstream)
        if signals.received:
            stop.set()  # one came before the handler above was in place
        await stop.wait()
        with anyio.move_on_after(DRAIN_S):
            await upstream.wait_idle()
        await upstream.aclose()
        tg.cancel_scope.cancel()
    await anyio.to_thread.run_sync(out.close, DRAIN_S)
    if failed is not None:
        raise MeterError(failed)
    return exit_code
