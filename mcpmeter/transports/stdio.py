"""stdio on both sides: our own stdin/stdout (the client) and a server subprocess.

Pipes, sockets and terminals are read and written by the event loop without blocking
(asyncio pipe transports call back with each chunk as it is read; writes go straight to
``os.write`` and are buffered only when the reader is slow). A regular file or anything the
loop cannot poll falls back to a reader thread or blocking writes.

The server runs in its own process group (signals go to the whole group) and, on Linux,
gets ``PR_SET_PDEATHSIG`` = SIGKILL, so it dies with mcpmeter even when mcpmeter is
SIGKILLed. Grandchildren that leave the group are beyond that guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from mcpmeter.relay import Pump

_HIGH_WATER = 256 * 1024


class _ReadProtocol(asyncio.Protocol):
    """Feeds a pump from a read pipe (our stdin)."""

    def __init__(self, pump: Pump) -> None:
        self._pump = pump

    def data_received(self, data: bytes) -> None:
        self._pump.data(data)

    def eof_received(self) -> bool:
        self._pump.end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._pump.end()


class _WriteProtocol(asyncio.BaseProtocol):
    """Reports a write pipe's flow control to the pump feeding it, and its loss."""

    def __init__(self, pump: Pump, on_lost: Callable[[], None]) -> None:
        self._pump = pump
        self._on_lost = on_lost

    def pause_writing(self) -> None:
        self._pump.pause()

    def resume_writing(self) -> None:
        self._pump.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class PipeSink:
    """A :class:`~mcpmeter.relay.Sink` over an asyncio write transport."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.lost = False
        self.closed = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif self.transport is None:
            self.mark_lost()

    def mark_lost(self) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)

    def buffered(self) -> int:
        return 0 if self.transport is None or self.lost else self.transport.get_write_buffer_size()


class BlockingFileSink:
    """A sink for a regular file (``> out.jsonl``): plain blocking writes, nothing to poll."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.lost = False
        self.closed = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        if self.lost:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self.mark_lost()

    def close(self) -> None:
        self.mark_lost()

    def mark_lost(self) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)

    def buffered(self) -> int:
        return 0


class _ThreadSource:
    """Reads a file descriptor that the loop cannot poll, in a thread."""

    def __init__(self, fd: int, pump: Pump, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._pump = pump
        self._loop = loop
        self._resume = threading.Event()
        self._resume.set()
        threading.Thread(target=self._run, name="mcpmeter-stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._resume.wait()
            try:
                data = os.read(self._fd, 1 << 16)
            except OSError:
                data = b""
            try:
                if not data:
                    self._loop.call_soon_threadsafe(self._pump.end)
                    return
                self._loop.call_soon_threadsafe(self._pump.data, data)
            except RuntimeError:  # the loop is closed: nothing left to feed
                return

    def pause_reading(self) -> None:
        self._resume.clear()

    def resume_reading(self) -> None:
        self._resume.set()


class ClientStdio:
    """Our own stdin (requests from the client) and stdout (what the client reads)."""

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._read_transport: asyncio.ReadTransport | None = None
        self.sink: PipeSink | BlockingFileSink | None = None
        self._blocking = {fd: _get_blocking(fd) for fd in (stdin_fd, stdout_fd)}

    async def connect_stdout(self, outbound: Pump, on_lost: Callable[[], None]) -> None:
        """Make stdout the sink of ``outbound``; ``on_lost`` runs if the client stops reading."""
        loop = asyncio.get_running_loop()
        try:
            stdout = os.fdopen(self._stdout_fd, "wb", buffering=0, closefd=False)
            pipe_sink = PipeSink()

            def lost() -> None:
                pipe_sink.mark_lost()
                on_lost()

            transport, _ = await loop.connect_write_pipe(lambda: _WriteProtocol(outbound, lost), stdout)
            transport.set_write_buffer_limits(high=_HIGH_WATER)
            pipe_sink.transport = transport
            self.sink = pipe_sink
        except (ValueError, OSError):
            self.sink = BlockingFileSink(self._stdout_fd)
        outbound.sink = self.sink

    async def connect_stdin(self, inbound: Pump) -> None:
        """Start reading stdin into ``inbound`` (whose sink must already be set)."""
        loop = asyncio.get_running_loop()
        if _pollable(self._stdin_fd):
            try:
                stdin = os.fdopen(self._stdin_fd, "rb", buffering=0, closefd=False)
                transport, _ = await loop.connect_read_pipe(lambda: _ReadProtocol(inbound), stdin)
                self._read_transport = transport
                inbound.source = transport
                return
            except (ValueError, OSError):
                pass
        inbound.source = _ThreadSource(self._stdin_fd, inbound, loop)

    async def flush(self, wait_s: float) -> None:
        """Write out what is buffered for the client (bounded: a client may stop reading)."""
        sink = self.sink
        if sink is None:
            return
        sink.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sink.closed), wait_s)

    def restore(self) -> None:
        """Give the terminal or pipes back in the blocking mode we found them in."""
        if self._read_transport is not None:
            self._read_transport.close()
        for fd, blocking in self._blocking.items():
            if blocking is not None:
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, blocking)


def _pollable(fd: int) -> bool:
    """Whether the event loop can wait on ``fd`` (pipes, sockets, terminals; not files, /dev/null)."""
    import selectors

    selector = selectors.DefaultSelector()
    try:
        selector.register(fd, selectors.EVENT_READ)
        return True
    except (OSError, ValueError):
        return False
    finally:
        selector.close()


def _get_blocking(fd: int) -> bool | None:
    try:
        return os.get_blocking(fd)
    except OSError:
        return None


class _ServerProtocol(asyncio.SubprocessProtocol):
    def __init__(self, server: ServerProcess) -> None:
        self._server = server

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd == 1 and isinstance(data, bytes):
            self._server.outbound.data(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self._server.outbound.end()
        elif fd == 0:
            self._server.stdin_sink.mark_lost()

    def pause_writing(self) -> None:
        self._server.inbound.pause()

    def resume_writing(self) -> None:
        self._server.inbound.resume()

    def process_exited(self) -> None:
        self._server.on_exit()


class ServerProcess:
    """The wrapped server: ``inbound`` pump writes to its stdin, its stdout feeds ``outbound``."""

    def __init__(self, argv: list[str], inbound: Pump, outbound: Pump) -> None:
        self.argv = argv
        self.inbound = inbound
        self.outbound = outbound
        self.transport: asyncio.SubprocessTransport | None = None
        self.pid: int | None = None
        self.stdin_sink = PipeSink()
        self.exited = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        """Spawn the server. Raises FileNotFoundError / PermissionError like ``exec`` does."""
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {"process_group": 0}
        guard = _parent_death_guard()
        if guard is not None:
            kwargs["preexec_fn"] = guard
        transport, _ = await loop.subprocess_exec(
            lambda: _ServerProtocol(self),
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            **kwargs,
        )
        self.transport = transport
        self.pid = transport.get_pid()
        stdin = transport.get_pipe_transport(0)
        stdout = transport.get_pipe_transport(1)
        assert isinstance(stdin, asyncio.WriteTransport) and isinstance(stdout, asyncio.ReadTransport)
        stdin.set_write_buffer_limits(high=_HIGH_WATER)
        self.stdin_sink.transport = stdin
        self.inbound.sink = self.stdin_sink
        self.outbound.source = stdout

    def on_exit(self) -> None:
        if not self.exited.done() and self.transport is not None:
            self.exited.set_result(self.transport.get_returncode())

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server's process group (the server and what it spawned)."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            if not self.exited.done():  # the server left its group: signal it alone
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self.pid, sig)

    def group_alive(self) -> bool:
        """Whether any process is left in the server's process group."""
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def reap_group(self, kill_after: float) -> None:
        """After the server exits: SIGTERM what it left in its group, SIGKILL after ``kill_after``."""
        if not self.group_alive():
            return
        self.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + kill_after
        # Grandchildren are not our children: nothing signals their exit, so poll.
        while self.group_alive() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if self.group_alive():
            self.signal(signal.SIGKILL)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def exit_status(returncode: int | None) -> int:
    """The server's exit code, or 128+N when signal N killed it (as a shell reports it)."""
    if returncode is None:
        return 1
    if returncode < 0:
        return 128 - returncode
    return returncode


def _parent_death_guard() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the server when mcpmeter dies, or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def guard() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # mcpmeter died between fork and prctl
            os._exit(1)

    return guard
