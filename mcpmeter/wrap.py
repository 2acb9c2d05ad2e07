"""``mcpmeter wrap -- CMD``: run a stdio server behind the metering relay.

Start-up order matters for transparency: stdout is connected first (so nothing the server
prints can be dropped), then the server is spawned, then stdin is read. The relay ends when
the server has exited and its stdout is drained; mcpmeter then exits with the server's code.
Our stdin closing closes the server's stdin; SIGINT/SIGTERM/SIGHUP go to the server's
process group, and SIGKILL follows after ``kill_after`` seconds if it is still running.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path

from mcpmeter.errors import MeterError
from mcpmeter.log import verbose, warn
from mcpmeter.meters.audit import AuditWriter, spill_path_for
from mcpmeter.meters.calls import C2S, S2C, CallMeter
from mcpmeter.relay import Pump, Tap
from mcpmeter.store import open_store, resolve_db
from mcpmeter.tags import Tenant
from mcpmeter.transports.stdio import ClientStdio, ServerProcess, exit_status

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: After the server exits, how long its stdout may stay open (a grandchild holding it).
DRAIN_AFTER_EXIT_S = 2.0
#: How long buffered output may wait for a client that stopped reading.
FLUSH_TIMEOUT_S = 10.0


@dataclass(slots=True)
class WrapOptions:
    argv: list[str]
    tenant: Tenant
    db: str | None = None
    kill_after: float = 5.0
    extra: dict[str, str] = field(default_factory=dict)


def run_wrap(options: WrapOptions) -> int:
    """Relay until the server exits; write every row; return the exit code for mcpmeter."""
    location = resolve_db(options.db)
    writer = AuditWriter(lambda: open_store(location), spill_path=spill_path_for(location)).start()
    meter = CallMeter(
        options.tenant,
        writer.put,
        transport="stdio",
        upstream="stdio",
        default_server=Path(options.argv[0]).name,
    )
    try:
        return asyncio.run(_relay(options.argv, meter, options.kill_after))
    finally:
        meter.close()
        writer.close()
        if verbose():
            s = meter.stats
            warn(
                f"{s.frames} frames ({s.requests} requests, {s.responses} responses, "
                f"{s.notifications} notifications, {s.not_json} not JSON, {s.not_jsonrpc} not JSON-RPC, "
                f"{s.unmatched_responses} unmatched); {writer.written} rows written, "
                f"{writer.spilled} spilled, {writer.recovered} recovered"
            )


async def _relay(argv: list[str], meter: CallMeter, kill_after: float) -> int:
    loop = asyncio.get_running_loop()
    server_eof = asyncio.Event()
    c2s = Pump(Tap(C2S, meter), on_eof=lambda: None)
    s2c = Pump(Tap(S2C, meter), on_eof=server_eof.set)
    client = ClientStdio()
    server = ServerProcess(argv, c2s, s2c)

    await client.connect_stdout(s2c, on_lost=server.stdin_sink.close)
    try:
        await server.start()
    except FileNotFoundError:
        raise MeterError(f"command not found: {argv[0]}", exit_code=127) from None
    except PermissionError:
        raise MeterError(f"permission denied: {argv[0]}", exit_code=126) from None
    except OSError as exc:
        raise MeterError(f"cannot start {argv[0]}: {exc.strerror or exc}", exit_code=126) from None

    kill_timer: asyncio.TimerHandle | None = None

    def forward(sig: int) -> None:
        nonlocal kill_timer
        server.signal(sig)
        if kill_timer is None:
            kill_timer = loop.call_later(kill_after, server.signal, signal.SIGKILL)

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    try:
        await client.connect_stdin(c2s)
        returncode = await server.exited
        try:
            await asyncio.wait_for(server_eof.wait(), DRAIN_AFTER_EXIT_S)
        except TimeoutError:
            s2c.end()
        await client.flush(FLUSH_TIMEOUT_S)
        await server.reap_group(kill_after)  # anything the server left behind in its group
        return exit_status(returncode)
    finally:
        if kill_timer is not None:
            kill_timer.cancel()
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
        server.close()
        client.restore()
