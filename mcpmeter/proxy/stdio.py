"""``mcpmeter wrap -- CMD``: run a stdio server behind the metering relay.

The server is spawned first (before any thread exists, since ``fork`` and threads do not
mix), then the audit writer and the two pumps start. The main thread waits for the server
to exit, handling signals meanwhile: SIGINT/SIGTERM/SIGHUP go to the server's process group
and SIGKILL follows after ``kill_after`` seconds if it is still running. Our stdin closing
closes the server's stdin; the client closing our stdout does too. Once the server has
exited and its stdout is drained, what it left in its group is stopped, every row is
written (or, when the store does not take them within a second, or a signal comes
meanwhile, spilled), and mcpmeter exits with the server's code. Our signal handlers stay
in place to the end (see :mod:`mcpmeter.proxy.shutdown`).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import NamedTuple

from mcpmeter.errors import MeterError
from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.frame import C2S, S2C
from mcpmeter.proxy.observers import Observers
from mcpmeter.proxy.process import ServerProcess, exit_status
from mcpmeter.proxy.relay import ClientWriter, FdEndpoint, Pump, Tap
from mcpmeter.proxy.runtime import GateSettings, Runtime
from mcpmeter.proxy.shutdown import Signals
from mcpmeter.threads import QuietTimer

#: After the server exits, how long its stdout may stay open without a byte moving (a
#: grandchild holding it, or a client that stopped reading) before the relay gives up.
DRAIN_IDLE_S = 2.0
#: After the server exits, how long our stdin may stay quiet before the relay stops reading it
#: (a client that still holds it open while its server is gone).
STDIN_IDLE_S = 0.1


class WrapOptions(NamedTuple):
    argv: list[str]
    tenant: Tenant
    kill_after: float = 5.0
    #: Budget flags (``--budget``, ``--max-calls``, the loop guard); stored ones are read too.
    gates: GateSettings = GateSettings()


def run_wrap(options: WrapOptions, runtime: Runtime) -> int:
    """Relay until the server exits; write every row; return the exit code for mcpmeter."""
    server = ServerProcess(options.argv)
    try:
        server.start()
    except FileNotFoundError:
        raise MeterError(f"command not found: {options.argv[0]}", exit_code=127) from None
    except PermissionError:
        raise MeterError(f"permission denied: {options.argv[0]}", exit_code=126) from None
    except OSError as exc:
        raise MeterError(f"cannot start {options.argv[0]}: {exc.strerror or exc}", exit_code=126) from None

    # Ours from now to the exit: the default action would drop the rows not yet written.
    signals = Signals().install()
    # Our stdout: the server's frames, and between them any answer the proxy gives itself.
    client_out = ClientWriter(FdEndpoint(1))
    meter = runtime.meter(
        options.tenant, transport="stdio", upstream="stdio", default_server=os.path.basename(options.argv[0])
    )
    gate = runtime.gate(
        options.tenant, options.gates, server_name=lambda: meter.peers.server_name, inject=client_out.inject
    )
    runtime.start()
    try:
        return _relay(server, Observers(meter, gate), options.kill_after, client_out, signals)
    finally:
        runtime.finish(signals, [meter])


def _relay(
    server: ServerProcess, observers: Observers, kill_after: float, client_out: ClientWriter, signals: Signals
) -> int:
    assert server.stdin is not None and server.stdout is not None
    c2s = Pump("c2s", FdEndpoint(0), server.stdin, Tap(C2S, observers), gated=True, on_eof=server.close_stdin)
    # The client stopped reading our stdout: the session is over, tell the server so.
    s2c = Pump("s2c", server.stdout, client_out, Tap(S2C, observers), on_sink_lost=server.close_stdin)
    kill_timer: threading.Timer | None = None

    def forward(sig: int) -> None:
        nonlocal kill_timer
        server.signal(sig)
        if kill_timer is None:
            kill_timer = QuietTimer(kill_after, server.signal, (signal.SIGKILL,))
            kill_timer.daemon = True
            kill_timer.start()

    signals.while_relaying(forward)
    try:
        c2s.start()
        s2c.start()
        returncode = server.wait()
        _drain(s2c)
        # What the client had already sent (a pipelined backlog behind its EOF) is read and
        # metered before the meter closes: each of those requests gets its row.
        _drain(c2s, idle=STDIN_IDLE_S)
        client_out.flush()
        server.reap_group(kill_after)
        return exit_status(returncode)
    finally:
        signals.while_relaying(None)
        if kill_timer is not None:
            kill_timer.cancel()
        server.close()


def _drain(pump: Pump, idle: float = DRAIN_IDLE_S) -> None:
    """Wait for the pump's source to reach EOF, as long as bytes keep moving."""
    last = -1
    while not pump.done.wait(idle):
        if pump.bytes == last:
            return  # nothing moved for DRAIN_IDLE_S: a grandchild holds the pipe open
        last = pump.bytes
