"""stdio on the server side: the wrapped server as a subprocess.

The server runs in its own process group, so a forwarded signal reaches everything it
spawned, and what it leaves behind can be found and stopped when it exits. On Linux it also
gets ``PR_SET_PDEATHSIG`` = SIGKILL: it dies with mcpmeter even when mcpmeter is SIGKILLed
(grandchildren that leave the group, or outlive the server itself, are beyond that guard;
the group sweep at exit catches those that stay in the group).

Its pipes are enlarged to 1 MiB where the kernel allows (``F_SETPIPE_SZ``), so a large
frame crosses in fewer wake-ups; its stderr is ours, untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mcpmeter.proxy.relay import FdEndpoint

_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


class ServerProcess:
    """The wrapped server. ``stdin``/``stdout`` are endpoints for the relay's pumps."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin_lock = threading.Lock()
        self._stdin_open = False
        self.stdin: FdEndpoint | None = None
        self.stdout: FdEndpoint | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        """Spawn the server. Raises FileNotFoundError / PermissionError like ``exec`` does."""
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            bufsize=0,
            process_group=0,
            preexec_fn=_parent_death_guard(),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        stdin_fd, stdout_fd = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        for fd in (stdin_fd, stdout_fd):
            _enlarge_pipe(fd)
        self.stdin = FdEndpoint(stdin_fd)
        self.stdout = FdEndpoint(stdout_fd)
        self._stdin_open = True

    def close_stdin(self) -> None:
        """EOF to the server (once, from whichever thread asks first)."""
        with self._stdin_lock:
            if not self._stdin_open or self._proc is None or self._proc.stdin is None:
                return
            self._stdin_open = False
            with contextlib.suppress(OSError):
                self._proc.stdin.close()

    def wait(self) -> int:
        """Block until the server exits; signal handlers still run meanwhile."""
        assert self._proc is not None
        return self._proc.wait()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server's process group (the server and what it spawned)."""
        if self._proc is not None:
            signal_group(self._proc, sig)

    def group_alive(self) -> bool:
        """Whether any process is left in the server's process group."""
        return self._proc is not None and group_alive(self._proc.pid)

    def reap_group(self, kill_after: float) -> None:
        """After the server exits: SIGTERM what it left in its group, SIGKILL after ``kill_after``.

        Grandchildren are not our children, so nothing signals their exit: this polls.
        """
        if not self.group_alive():
            return
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + kill_after
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.group_alive():
            self.signal(signal.SIGKILL)

    def close(self) -> None:
        if self._proc is not None and self._proc.stdout is not None:
            with contextlib.suppress(OSError):
                self._proc.stdout.close()
        self.close_stdin()


class _Child(Protocol):
    pid: int

    @property
    def returncode(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


def signal_group(proc: _Child, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (what it spawned too); to ``proc``
    alone if it left its group while still running."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                proc.send_signal(sig)


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def exit_status(returncode: int | None) -> int:
    """The server's exit code, or 128+N when signal N killed it (as a shell reports it)."""
    if returncode is None:
        return 1
    if returncode < 0:
        return 128 - returncode
    return returncode


def _enlarge_pipe(fd: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


def _parent_death_guard() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the server when mcpmeter dies, or None.

    It also gives the server the open-file limit mcpmeter was started with (see
    :mod:`mcpmeter.proxy.fdlimit`)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    from mcpmeter.proxy.fdlimit import restore_fd_limit

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def guard() -> None:
        restore_fd_limit()
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # mcpmeter died between fork and prctl
            os._exit(1)

    return guard
