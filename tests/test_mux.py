"""Many clients, one server, by example: what the mux sends the server and what each client gets.

A :class:`Mux` is driven through its public API only (``channel()``, ``MuxChannel.send`` and
``aclose``). The shared server behind it is the one boundary faked: a scripted upstream that
records the bytes of every frame it is sent and lets the test write frames back, as a server
would. Frames are written and compared as bytes. No sockets, no processes; every wait is
bounded by ``anyio.fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from mcpmeter.protocol.frame import Frame
from mcpmeter.proxy.mux import Mux, MuxChannel
from mcpmeter.proxy.upstream import Deliver, UpstreamError

pytestmark = pytest.mark.anyio

WAIT_S = 5  # every wait; nothing here needs more than a scheduler turn


class ScriptedServer:
    """The shared server as the mux sees it: what it was sent; what it says is up to the test."""

    def __init__(self, deliver: Deliver, kind: str) -> None:
        self.kind = kind
        self.closed = anyio.Event()
        self.received: list[bytes] = []
        self._deliver = deliver

    async def send(self, frame: Frame) -> None:
        assert not self.closed.is_set(), "a frame sent to a server that has gone"
        self.received.append(frame.tobytes())

    async def aclose(self) -> None:
        self.closed.set()

    async def says(self, frame: bytes) -> None:
        """The server writes ``frame`` to its client (the mux)."""
        await self._deliver(Frame(frame, "s2c", 0.0))

    def exits(self) -> None:
        self.closed.set()


class Client:
    """One client of the shared server: its channel and every frame it was handed."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.channel: MuxChannel | None = None

    async def deliver(self, frame: Frame) -> None:
        self.got.append(frame.tobytes())

    async def sends(self, frame: bytes) -> None:
        assert self.channel is not None
        await self.channel.send(Frame(frame, "c2s", 0.0))


class Shared:
    """A mux in a task group, the servers it opened (one per start) and its clients."""

    def __init__(self, mux: Mux, servers: list[ScriptedServer]) -> None:
        self.mux = mux
        self.servers = servers

    @property
    def server(self) -> ScriptedServer:
        return self.servers[-1]

    async def client(self) -> Client:
        client = Client()
        client.channel = await self.mux.channel(client.deliver)
        return client


@asynccontextmanager
async def shared_server(kind: str = "stdio") -> AsyncIterator[Shared]:
    servers: list[ScriptedServer] = []

    async def open_upstream(deliver: Deliver) -> ScriptedServer:
        server = ScriptedServer(deliver, kind)
        servers.append(server)
        return server

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            yield Shared(Mux(open_upstream, tg, kind="pending"), servers)
            tg.cancel_scope.cancel()


def call(rpc_id: str, name: str = "search", meta: str = "") -> bytes:
    """A tools/call whose id is the JSON text ``rpc_id`` (written as given), with ``_meta``
    members ``meta`` if given."""
    extra = f',"_meta":{{{meta}}}' if meta else ""
    params = f'{{"name":"{name}"{extra}}}'
    return f'{{"jsonrpc":"2.0","id":{rpc_id},"method":"tools/call","params":{params}}}'.encode()


def answer(rpc_id: str, text: str = "ok") -> bytes:
    """The server's answer to the request it knows as ``rpc_id`` (JSON text)."""
    result = f'{{"content":[{{"type":"text","text":"{text}"}}]}}'
    return f'{{"jsonrpc":"2.0","id":{rpc_id},"result":{result}}}'.encode()


LIST_CHANGED = b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'
CANCEL = b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":%b,"reason":"x"}}'
SAMPLING = b'{"jsonrpc":"2.0","id":"s-1","method":"sampling/createMessage","params":{"maxTokens":5}}'


# -- ids -----------------------------------------------------------------------------------------


async def test_two_clients_sending_the_same_id_each_get_their_own_answer_with_the_id_they_sent() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await alice.sends(call("7", "alice"))
        await bob.sends(call("7", "bob"))
        # The server sees fresh ids, every other byte as the clients wrote it.
        assert shared.server.received == [call("1", "alice"), call("2", "bob")]

        await shared.server.says(answer("2", "for bob"))  # answered out of order
        await shared.server.says(answer("1", "for alice"))
        assert alice.got == [answer("7", "for alice")]
        assert bob.got == [answer("7", "for bob")]
        assert shared.mux.unrouted == 0


async def test_an_id_goes_back_as_the_exact_bytes_the_client_sent_and_one_and_one_string_differ() -> None:
    async with shared_server() as shared:
        number, text, escaped = await shared.client(), await shared.client(), await shared.client()
        await number.sends(b'{"jsonrpc":"2.0", "id" : 1 ,"method":"ping"}')
        await text.sends(b'{"jsonrpc":"2.0","id":"1","method":"ping"}')
        await escaped.sends(b'{"jsonrpc":"2.0","id":"a\\u0062","method":"ping"}')
        assert shared.server.received == [
            b'{"jsonrpc":"2.0", "id" : 1 ,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":2,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":3,"method":"ping"}',
        ]
        for upstream_id in (3, 1, 2):
            await shared.server.says(b'{"jsonrpc":"2.0","id":%d,"result":{}}' % upstream_id)
        assert number.got == [b'{"jsonrpc":"2.0","id":1,"result":{}}']
        assert text.got == [b'{"jsonrpc":"2.0","id":"1","result":{}}']
        assert escaped.got == [b'{"jsonrpc":"2.0","id":"a\\u0062","result":{}}']


async def test_a_client_reusing_an_id_before_its_answer_gets_both_answers_with_that_id() -> None:
    async with shared_server() as shared:
        alice = await shared.client()
        await alice.sends(call('"x"', "first"))
        await alice.sends(call('"x"', "second"))
        assert shared.server.received == [call("1", "first"), call("2", "second")]
        await alice.sends(CANCEL % b'"x"')  # the newest request with that id
        assert shared.server.received[-1] == CANCEL % b"2"
        await shared.server.says(answer("1", "one"))
        await shared.server.says(answer("2", "two"))
        assert alice.got == [answer('"x"', "one"), answer('"x"', "two")]


async def test_a_batch_gets_a_fresh_id_per_request_and_its_answer_comes_back_with_every_id_restored() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await bob.sends(call("1"))
        batch = b"[" + call('"a"') + b"," + LIST_CHANGED + b"," + call('"b"') + b"]"
        await alice.sends(batch)
        assert shared.server.received[1] == b"[" + call("2") + b"," + LIST_CHANGED + b"," + call("3") + b"]"

        await shared.server.says(b"[" + answer("3", "b") + b"," + answer("2", "a") + b"]")
        assert alice.got == [b"[" + answer('"b"', "b") + b"," + answer('"a"', "a") + b"]"]
        assert bob.got == []


async def test_what_a_client_sends_that_is_not_a_request_reaches_the_server_untouched() -> None:
    async with shared_server() as shared:
        alice = await shared.client()
        frames = [
            b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
            b'{"jsonrpc":"2.0","id":"s-1","result":{"role":"assistant"}}',  # answering the server
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","id":2}',  # duplicate keys
            b"not json at all",
        ]
        for frame in frames:
            await alice.sends(frame)
        assert shared.server.received == frames


async def test_an_answer_with_an_id_the_server_was_never_given_reaches_nobody_and_is_counted() -> None:
    async with shared_server() as shared:
        alice = await shared.client()
        await alice.sends(call("1"))
        await shared.server.says(answer('"1"'))  # a string: not the integer it was given
        await shared.server.says(answer("99"))
        assert alice.got == []
        assert shared.mux.unrouted == 2
        await shared.server.says(answer("1"))
        assert alice.got == [answer("1")]


# -- cancellation --------------------------------------------------------------------------------


async def test_a_cancellation_names_the_id_the_server_saw_for_that_clients_request() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await alice.sends(call("5"))
        await bob.sends(call("5"))
        await bob.sends(CANCEL % b"5")
        assert shared.server.received[-1] == CANCEL % b"2"
        await alice.sends(CANCEL % b"5")
        assert shared.server.received[-1] == CANCEL % b"1"
        await alice.sends(CANCEL % b'"never-sent"')  # no request of hers: relayed as it is
        assert shared.server.received[-1] == CANCEL % b'"never-sent"'


# -- what the server starts itself ---------------------------------------------------------------


async def test_a_progress_notification_goes_to_the_client_whose_request_carries_its_token() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await alice.sends(call("1", meta='"progressToken":"tok-a"'))
        await bob.sends(call("1", meta='"progressToken":7'))  # bob's call is the newest
        progress = (
            b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":%b,"progress":1}}'
        )

        await shared.server.says(progress % b'"tok-a"')
        await shared.server.says(progress % b"7")
        assert alice.got == [progress % b'"tok-a"']
        assert bob.got == [progress % b"7"]
        await shared.server.says(progress % b'"7"')  # not bob's token (a string): the newest waiter
        assert bob.got == [progress % b"7", progress % b'"7"']


async def test_a_progress_token_is_forgotten_once_its_client_has_nothing_outstanding() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await alice.sends(call("1", meta='"progressToken":"tok-a"'))
        await shared.server.says(answer("1"))
        await bob.sends(call("1"))
        progress = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"tok-a"}}'
        await shared.server.says(progress)
        assert alice.got == [answer("1")]
        assert bob.got == [progress]  # to the one waiting, as any notification


async def test_a_request_from_the_server_goes_to_the_client_of_the_newest_request_still_waiting() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await alice.sends(call("1"))
        await bob.sends(call("1"))
        await shared.server.says(SAMPLING)
        assert (alice.got, bob.got) == ([], [SAMPLING])

        await shared.server.says(answer("2"))  # bob's call is done: alice's is the newest waiting
        await shared.server.says(SAMPLING)
        assert alice.got == [SAMPLING]

        await alice.sends(call("2"))
        await bob.sends(call("2"))
        await alice.sends(call("3"))  # newest again
        await shared.server.says(SAMPLING)
        assert alice.got == [SAMPLING, SAMPLING]
        assert bob.got == [SAMPLING, answer("1")]


async def test_a_request_from_the_server_while_no_client_waits_reaches_nobody_and_is_counted() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await shared.server.says(SAMPLING)
        assert (alice.got, bob.got) == ([], [])
        assert shared.mux.unrouted == 1


async def test_a_notification_goes_to_the_newest_waiting_client_or_to_every_client_when_none_waits() -> None:
    async with shared_server() as shared:
        alice, bob, carol = await shared.client(), await shared.client(), await shared.client()
        await shared.server.says(LIST_CHANGED)
        assert alice.got == bob.got == carol.got == [LIST_CHANGED]

        await bob.sends(call("1"))
        await shared.server.says(LIST_CHANGED)
        assert alice.got == carol.got == [LIST_CHANGED]
        assert bob.got == [LIST_CHANGED, LIST_CHANGED]
        assert shared.mux.unrouted == 0


# -- channels and the server coming and going ----------------------------------------------------


async def test_the_server_is_started_once_for_every_client_and_the_mux_takes_its_kind() -> None:
    async with shared_server(kind="sse") as shared:
        alice, bob = await shared.client(), await shared.client()
        assert len(shared.servers) == 1
        assert shared.mux.kind == "sse"
        assert alice.channel is not None and bob.channel is not None
        assert alice.channel.kind == bob.channel.kind == "sse"


async def test_a_closed_channel_cannot_send_and_the_answers_to_its_requests_reach_nobody() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await alice.sends(call("1", "alice"))
        await bob.sends(call("1", "bob"))
        assert alice.channel is not None
        await alice.channel.aclose()
        assert alice.channel.closed.is_set()
        with pytest.raises(UpstreamError, match="the server has exited"):
            await alice.sends(call("2"))

        await shared.server.says(answer("1"))  # alice's: she has gone, and bob must not get it
        assert alice.got == bob.got == []
        assert shared.mux.unrouted == 1
        await shared.server.says(SAMPLING)  # bob's call is the only one waiting now
        await shared.server.says(answer("2"))
        assert bob.got == [SAMPLING, answer("1")]
        await shared.server.says(LIST_CHANGED)  # nobody waits: every channel still open
        assert bob.got[-1] == LIST_CHANGED and alice.got == []
        assert not shared.server.closed.is_set()  # the others keep the server


async def test_when_the_server_exits_every_channel_closes_and_the_next_client_starts_a_new_one() -> None:
    async with shared_server() as shared:
        alice, bob = await shared.client(), await shared.client()
        await alice.sends(call("1"))
        first = shared.server
        first.exits()
        assert alice.channel is not None and bob.channel is not None
        await alice.channel.closed.wait()
        await bob.channel.closed.wait()
        for client in (alice, bob):
            with pytest.raises(UpstreamError, match="the server has exited"):
                await client.sends(call("2"))

        carol = await shared.client()
        assert len(shared.servers) == 2 and shared.server is not first
        await carol.sends(call("9"))
        assert first.received == [call("1")]
        assert shared.server.received == [call("2")]  # ids go on counting: none is seen twice
        await first.says(answer("1"))  # the old server's last words: its clients are gone
        assert alice.got == carol.got == []
        await shared.server.says(answer("2"))
        assert carol.got == [answer("9")]


async def test_closing_the_mux_closes_the_server_and_with_it_every_channel() -> None:
    async with shared_server() as shared:
        alice = await shared.client()
        await shared.mux.aclose()
        assert shared.server.closed.is_set()
        assert alice.channel is not None
        await alice.channel.closed.wait()
