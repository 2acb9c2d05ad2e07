"""Every session of one ``wrap --listen``: opened under the caps, evicted, closed.

Each handshake-era session has an upstream of its own: a server subprocess (``-- CMD``,
the default), a share of one subprocess (``--shared-server``, ids rewritten by
:mod:`mcpmeter.proxy.mux`), or its own session with the remote server (``--url``).
2026-07-28 requests, which carry no session, share one upstream (ids rewritten): a
subprocess that served the handshake era refuses them, so they get one of their own. Each
such request is a short-lived session of its own (its own meter and channel), since
independent clients may send the same ids at the same time.

The :class:`Gateway` opens those upstreams, admits each new session under
``--max-sessions`` and ``--max-servers`` (closing an idle one for room), lets servers start
a few at a time, closes sessions that idle too long, and on shutdown drains the requests
in flight and closes everything. The HTTP side is :mod:`mcpmeter.proxy.listen.asgi`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import anyio
import httpx
from anyio.abc import TaskGroup

from mcpmeter.metering.gate import BudgetGate
from mcpmeter.metering.tags import Tenant, new_session_id
from mcpmeter.proxy.child import ChildServer
from mcpmeter.proxy.http_upstream import HttpUpstream
from mcpmeter.proxy.listen.http import EventStream
from mcpmeter.proxy.listen.limits import (
    ADMIT_WAIT_S,
    RETRY_S,
    STARTING,
    STARTING_HOLD_S,
    STARTING_WAIT_S,
    Notices,
    Refused,
    Slots,
)
from mcpmeter.proxy.listen.options import ListenOptions
from mcpmeter.proxy.listen.sessions import Session
from mcpmeter.proxy.mux import Mux
from mcpmeter.proxy.runtime import GateSettings, Runtime
from mcpmeter.proxy.upstream import Deliver, Upstream

#: A streamable-HTTP session with nothing in flight and no stream open for this long is closed.
SESSION_IDLE_S = 30 * 60.0


class Gateway:
    """The sessions of one ``--listen`` and what they share: the process's runtime (the audit
    writer, the budgets), the upstreams (a subprocess each, a shared one, or a remote
    server), the caps, the drain."""

    def __init__(self, options: ListenOptions, runtime: Runtime, tg: TaskGroup) -> None:
        self.options = options
        self.runtime = runtime
        self.tg = tg
        self._modern_gates: dict[tuple[str | None, str | None, str, str], BudgetGate] = {}
        self.sessions: dict[str, Session] = {}  # Mcp-Session-Id or /sse session_id -> session
        #: 2026-07-28 requests in flight, one short-lived session each (clients' ids may collide).
        self.exchanges: set[Session] = set()
        self.stateless_session = options.tenant.session_id if options.fixed_session else new_session_id()
        self.draining = False
        self.inflight = 0
        self._idle = anyio.Event()
        self._idle.set()
        self.client: httpx.AsyncClient | None = None
        if options.argv is not None:
            self.server_name: str | None = os.path.basename(options.argv[0])
            self.upstream_kind = "stdio"
        else:
            assert options.url is not None
            self.server_name = urlsplit(options.url).hostname or options.url
            self.upstream_kind = "sse" if options.transport == "sse" else "http"
        shared_kind = self.upstream_kind
        self._handshake_mux = Mux(self._open_direct, tg, kind=shared_kind) if options.shared_server else None
        self._modern_mux = Mux(self._open_direct, tg, kind=shared_kind)
        self.limits = limits = options.limits
        self.notices = Notices()
        #: Each handshake-era session has a server process of its own (``-- CMD``, not shared).
        self._own_servers = options.argv is not None and not options.shared_server
        #: Those processes, counted from their spawn to their exit (a closed session's may linger).
        self.servers = Slots(limits.max_servers)
        #: Those still starting (spawned, not yet heard from): a few at a time.
        self.starting = Slots(STARTING)
        self._opening = 0  # sessions admitted and still starting

    # -- upstreams -------------------------------------------------------------------------

    async def _open_direct(self, deliver: Deliver) -> Upstream:
        options = self.options
        if options.argv is not None:
            child = ChildServer(options.argv, deliver, kill_after=options.kill_after)
            await child.start(self.tg)
            return child
        assert options.url is not None and self.client is not None
        remote = HttpUpstream(
            options.url,
            deliver,
            client=self.client,
            tg=self.tg,
            mode=options.transport,
            headers=options.headers,
        )
        await remote.start()
        return remote

    async def open_upstream(self, deliver: Deliver, *, modern: bool) -> Upstream:
        if modern:
            return await self._modern_mux.channel(deliver)
        if self._handshake_mux is not None:
            return await self._handshake_mux.channel(deliver)
        return await self._open_direct(deliver)

    # -- sessions --------------------------------------------------------------------------

    def tenant_for(self, headers: Mapping[str, str], default_session: str) -> Tenant:
        base = self.options.tenant
        project, agent = base.project_id, base.agent_id
        session = base.session_id if self.options.fixed_session else default_session
        if self.options.trust_tag_headers:
            project = headers.get("x-mcpmeter-project") or project
            agent = headers.get("x-mcpmeter-agent") or agent
            session = headers.get("x-mcpmeter-session") or session
        return Tenant(project_id=project, agent_id=agent, session_id=session, tags=base.tags)

    async def new_session(
        self, headers: Mapping[str, str], transport: str, *, legacy: bool = False
    ) -> Session:
        """A handshake-era session, once the caps let it in (Refused otherwise)."""
        own_server = await self._admit()
        turn = False
        try:
            if own_server:
                await self._turn_to_start()
                turn = True
            sid = new_session_id()
            session = Session(self, sid, self.tenant_for(headers, sid), transport, modern=False)
            if legacy:
                session.legacy_stream = EventStream()
            await session.start()
        except BaseException:
            if turn:
                self.starting.give()
            if own_server:
                self.servers.give()
            raise
        finally:
            self._opening -= 1
        if own_server:
            self.tg.start_soon(self._server_slot, session.upstream)
        self.sessions[sid] = session
        return session

    async def _admit(self) -> bool:
        """Room for one more session under ``--max-sessions`` and ``--max-servers``, closing
        idle sessions for it if need be; Refused (503) when there is none. Counts the session
        as opening; True when it also took a server slot."""
        limits = self.limits
        deadline = time.monotonic() + ADMIT_WAIT_S
        while True:
            if len(self.sessions) + self._opening >= limits.max_sessions:
                if not self._evict_idle():
                    raise Refused(
                        503,
                        "sessions",
                        f"refused a new session: {limits.max_sessions} are open (--max-sessions)",
                        RETRY_S,
                    )
                continue
            if self._own_servers and self.servers.full:
                # Processes of closed sessions still exiting free their slots soon; else close one.
                exiting = self.servers.used - len(self.sessions) - self._opening
                left = deadline - time.monotonic()
                if (exiting > 0 or self._evict_idle()) and left > 0:
                    with anyio.move_on_after(left) as waited:
                        await self.servers.freed()
                    if not waited.cancelled_caught:
                        continue
                raise Refused(
                    503,
                    "servers",
                    f"refused a new session: {limits.max_servers} server processes are running "
                    "(--max-servers)",
                    RETRY_S,
                )
            break
        self._opening += 1
        if self._own_servers:
            self.servers.take()
        return self._own_servers

    def _evict_idle(self) -> bool:
        """Close the least recently used session idle for ``--evict-idle`` seconds (nothing
        in flight, no stream open); False when there is none."""
        after = self.limits.evict_idle
        if after <= 0:
            return False
        now = time.monotonic()
        victim: Session | None = None
        for session in self.sessions.values():
            if session.busy or session.waiters or session.get_stream or session.legacy_stream:
                continue
            if now - session.last_used >= after and (victim is None or session.last_used < victim.last_used):
                victim = session
        if victim is None:
            return False
        del self.sessions[victim.id]  # its place is free now; its close goes on in the background
        self.tg.start_soon(self.close_session, victim, "the session was idle and closed to make room")
        self.notices.note(
            "evict-session",
            f"closed a session idle for {now - victim.last_used:.0f} s to make room for a new one "
            "(--evict-idle)",
        )
        return True

    async def _turn_to_start(self) -> None:
        """Wait until fewer than STARTING servers are starting, and count this one: a burst
        of new sessions starts its servers a few at a time, never on every core at once.
        Refused (503) after STARTING_WAIT_S."""
        with anyio.move_on_after(STARTING_WAIT_S):
            while self.starting.full:
                await self.starting.freed()
            self.starting.take()
            return
        raise Refused(
            503,
            "starting",
            f"refused a new session: it waited {STARTING_WAIT_S:g} s for other servers to start",
            RETRY_S,
        )

    async def _server_slot(self, upstream: Upstream | None) -> None:
        """Give a session's turn to start back once its server has written something (or
        after STARTING_HOLD_S), and its server slot once its process has exited."""
        try:
            try:
                if isinstance(upstream, ChildServer):
                    with anyio.move_on_after(STARTING_HOLD_S):
                        await upstream.spoke.wait()
            finally:
                self.starting.give()
            if isinstance(upstream, ChildServer):
                await upstream.wait()
        finally:
            self.servers.give()

    async def exchange_session(self, headers: Mapping[str, str]) -> Session:
        """A session for one 2026-07-28 request: its own meter and its own share of the upstream."""
        tenant = self.tenant_for(headers, self.stateless_session)
        session = Session(self, tenant.session_id, tenant, "http", modern=True)
        await session.start()
        self.exchanges.add(session)
        return session

    def modern_gate(self, tenant: Tenant, server_name: Callable[[], str | None]) -> BudgetGate:
        """The gate 2026-07-28 requests with these tags share (each request is a session)."""
        key = (tenant.project_id, tenant.agent_id, tenant.session_id, tenant.tags_json)
        gate = self._modern_gates.get(key)
        if gate is None:
            gate = self._modern_gates[key] = self.budget_gate(tenant, server_name)
        return gate

    def budget_gate(self, tenant: Tenant, server_name: Callable[[], str | None]) -> BudgetGate:
        """A session's gate: the flag budgets of its tags, the store's, the loop guard.
        Refusals are the POST's answer (see :meth:`Session.refusal`)."""
        options = self.options
        settings = GateSettings(
            options.budgets_for(tenant) if options.budgets_for else (), options.max_repeat, options.reject_as
        )
        return self.runtime.gate(tenant, settings, server_name=server_name)

    async def close_session(self, session: Session, reason: str = "the server has exited") -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        self.exchanges.discard(session)
        await session.close(reason)

    async def reap_idle(self) -> None:
        while True:
            await anyio.sleep(60)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.busy == 0 and now - session.last_used > SESSION_IDLE_S:
                    self.tg.start_soon(self.close_session, session, "the session was idle too long")

    def begin(self) -> None:
        """A request is in flight (:meth:`drain` waits for it)."""
        self.inflight += 1
        self._idle = anyio.Event()

    def end(self) -> None:
        """A request begun with :meth:`begin` is over."""
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Refuse new requests; wait until none is in flight (the caller bounds the wait)."""
        self.draining = True
        await self._idle.wait()

    async def close_all(self) -> None:
        """Close every session at once (each answers its waiting POSTs first)."""
        sessions = [*self.sessions.values(), *self.exchanges]
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(self.close_session, session, "mcpmeter is shutting down")
            for mux in (self._handshake_mux, self._modern_mux):
                if mux is not None:
                    tg.start_soon(mux.aclose)
