"""A stdio server run as a subprocess from the event loop (``--listen -- CMD``).

Like :class:`mcpmeter.proxy.process.ServerProcess` it runs in its own process group
with the Linux parent-death signal, and its stderr is ours, untouched. Frames go to its
stdin as the HTTP body they came in plus ``\\n``; its stdout is cut into lines with no size
limit. Closing it is gentle first: stdin EOF, then SIGTERM to its group, then SIGKILL, and
whatever it left in its group is stopped too.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence

import anyio
from anyio.abc import TaskGroup

from mcpmeter.protocol.frame import S2C, Frame, LineSplitter
from mcpmeter.protocol.rpc import one_line
from mcpmeter.proxy.process import _parent_death_guard, group_alive, signal_group
from mcpmeter.proxy.upstream import Deliver, UpstreamError

CHUNK = 1 << 16


class ChildServer:
    """One server subprocess; an :class:`~mcpmeter.proxy.upstream.Upstream`."""

    kind = "stdio"

    def __init__(self, argv: Sequence[str], deliver: Deliver, *, kill_after: float = 5.0) -> None:
        self.argv = list(argv)
        self.closed = anyio.Event()
        #: Set once the server has written its first output (it is up), or has closed it.
        self.spoke = anyio.Event()
        self._deliver = deliver
        self._kill_after = kill_after
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = anyio.Lock()
        self._stdin_open = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self, tg: TaskGroup) -> None:
        """Spawn the server; its output is read by a task in ``tg``. Raises UpstreamError."""
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,
                process_group=0,
                preexec_fn=_parent_death_guard(),
            )
        except OSError as exc:
            self.closed.set()
            raise UpstreamError(f"cannot start {self.argv[0]}: {exc.strerror or exc}") from None
        self._stdin_open = True
        tg.start_soon(self._read)

    async def send(self, frame: Frame) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or not self._stdin_open:
            raise UpstreamError("the server has exited")
        async with self._lock:
            try:
                proc.stdin.write(one_line(frame.tobytes()) + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise UpstreamError("the server has exited") from exc

    async def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        lines: list[bytes] = []
        splitter = LineSplitter(lambda line, seen: lines.append(bytes(line)))
        deliver = self._deliver
        try:
            while True:
                chunk = await proc.stdout.read(CHUNK)
                seen = time.perf_counter()
                self.spoke.set()
                if not chunk:
                    splitter.finish(seen)
                else:
                    splitter.feed(chunk, seen)
                for line in lines:
                    await deliver(Frame(line, S2C, seen))
                lines.clear()
                if not chunk:
                    break
        finally:
            self.spoke.set()
            self.closed.set()

    async def wait(self) -> None:
        """Until the server process has exited (at once if it never started)."""
        if self._proc is not None:
            await self._proc.wait()

    def signal(self, sig: int) -> None:
        """``sig`` to the server's process group (or to the server alone if it left it)."""
        if self._proc is not None:
            signal_group(self._proc, sig)

    def _group_alive(self) -> bool:
        return self._proc is not None and group_alive(self._proc.pid)

    def _close_stdin(self) -> None:
        proc = self._proc
        if self._stdin_open and proc is not None and proc.stdin is not None:
            self._stdin_open = False
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.close()

    async def aclose(self) -> None:
        """EOF first; SIGTERM after ``kill_after`` seconds, SIGKILL after as many again."""
        with anyio.CancelScope(shield=True):
            self._close_stdin()
            proc = self._proc
            if proc is None:
                return
            with anyio.move_on_after(self._kill_after):
                await proc.wait()
            if proc.returncode is None:
                self.signal(signal.SIGTERM)
                with anyio.move_on_after(self._kill_after):
                    await proc.wait()
            if proc.returncode is None:
                self.signal(signal.SIGKILL)
                await proc.wait()
            await self._reap_group()

    async def _reap_group(self) -> None:
        """What the server left in its group: SIGTERM, then SIGKILL after ``kill_after``."""
        if not self._group_alive():
            return
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + self._kill_after
        while self._group_alive() and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.01)  # grandchildren are not ours to wait for: poll
        if self._group_alive():
            self.signal(signal.SIGKILL)
