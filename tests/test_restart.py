"""
Live restart without I/O: a connection's handover state and its resumption
in another L{ServerConnection} or L{NBDServerProtocol} (see
L{twisted_nbd.restart}; the real handover between two processes is in
C{tests/interop/test_restart.py}).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import builders as b
from tests.test_connection import registry
from twisted_nbd import _wire as w
from twisted_nbd._connection import (
    NEED_DATA,
    Phase,
    ReadRequest,
    ServerConnection,
    WriteRequest,
)
from twisted_nbd._wire import Cmd, Opt
from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.registry import PluginRef
from twisted_nbd.restart import HandoverService, attach_takeover, movable
from twisted_nbd.service import NBDService, build
from twisted_nbd.testing import ControllableBlockDevice

NEGOTIATE = (
    b.client_flags(3)
    + b.option(Opt.EXTENDED_HEADERS)
    + b.option(Opt.SET_META_CONTEXT, b.meta_data("", "base:allocation"))
    + b.go("")
)


def negotiated(handshake: bytes = NEGOTIATE) -> ServerConnection:
    """A connection in transmission after C{handshake}."""
    conn = ServerConnection(registry())
    conn.receive_data(handshake)
    while conn.next_event() is not NEED_DATA:
        pass
    conn.data_to_send()
    assert conn.phase is Phase.TRANSMISSION
    return conn


def events(conn: ServerConnection) -> list[Any]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


class HandoverStateTests(SynchronousTestCase):
    """L{ServerConnection.handover_state} and L{ServerConnection.resume}."""

    def test_boundary(self) -> None:
        """
        Only a connection in transmission between two requests is at a
        boundary: not while negotiating, nor while a WRITE's payload is
        still arriving.
        """
        conn = ServerConnection(registry())
        self.assertFalse(conn.at_request_boundary())
        conn = negotiated()
        self.assertTrue(conn.at_request_boundary())
        conn.receive_data(b.ext_request(Cmd.WRITE, 1, 0, 8, w.CmdFlags.PAYLOAD_LEN, b"half"))
        self.assertEqual(events(conn), [])
        self.assertFalse(conn.at_request_boundary())
        self.assertRaises(ValueError, conn.handover_state)
        conn.receive_data(b"done")
        self.assertEqual([type(e) for e in events(conn)], [WriteRequest])
        self.assertTrue(conn.at_request_boundary())

    def test_round_trip(self) -> None:
        """
        The state is JSON; the resumed connection has what was negotiated
        (extended headers, the meta context and its id), sends no greeting,
        and parses the bytes the first one had buffered, a request cut in
        the middle included.
        """
        conn = negotiated()
        pending = b.ext_request(Cmd.READ, 7, 4096, 512)
        conn.receive_data(pending[:10])
        self.assertEqual(events(conn), [])
        state = json.loads(json.dumps(conn.handover_state()))
        self.assertEqual(state["export"], "disk")
        self.assertEqual(state["negotiated"]["meta_contexts"], {"base:allocation": 1})
        self.assertTrue(state["negotiated"]["extended_headers"])
        # Reading the state leaves the connection as it was.
        self.assertTrue(conn.at_request_boundary())

        resumed = ServerConnection.resume(registry(), None, state)
        self.assertEqual(resumed.data_to_send(), [])
        self.assertEqual(resumed.negotiated, conn.negotiated)
        self.assertEqual(resumed.tx_flags, conn.tx_flags)
        assert resumed.rules is not None
        self.assertTrue(resumed.rules.block_status)
        resumed.receive_data(pending[10:])
        self.assertEqual(events(resumed), [ReadRequest(7, 4096, 512, 0)])
        # Extended replies, as negotiated in the other process.
        reply = b"".join(resumed.reply_read(ReadRequest(7, 4096, 512, 0), b"x" * 512))
        self.assertEqual(struct.unpack_from(">I", reply)[0], w.EXTENDED_REPLY_MAGIC)

    def test_simple_replies(self) -> None:
        """A client without structured replies keeps simple replies."""
        conn = negotiated(b.client_flags(3) + b.go(""))
        resumed = ServerConnection.resume(registry(), None, conn.handover_state())
        self.assertFalse(resumed.structured_replies)
        resumed.receive_data(b.read(3, 0, 512))
        (event,) = events(resumed)
        reply = b"".join(resumed.reply_read(event, b"y" * 512))
        self.assertEqual(reply[:16], struct.pack(">IIQ", w.SIMPLE_REPLY_MAGIC, 0, 3))

    def test_export_differs(self) -> None:
        """
        A connection is not resumed where its export would not behave as the
        client was told: another size, read-only, or missing.
        """
        state = negotiated().handover_state()
        for reg in (
            registry(size=2 << 20),
            registry(read_only=True),
            ExportRegistry.of([Export("elsewhere", ControllableBlockDevice(1 << 20))]),
        ):
            self.assertRaises(ValueError, ServerConnection.resume, reg, None, state)

    def test_malformed(self) -> None:
        """A state that is not one is refused with ValueError."""
        state = negotiated().handover_state()
        for broken in (
            {},
            {**state, "version": 99},
            {**state, "buffered": "not base64!"},
            {**state, "negotiated": {"what": 1}},
            {**state, "negotiated": {**state["negotiated"], "tls": True}},  # type: ignore[dict-item]
        ):
            self.assertRaises(ValueError, ServerConnection.resume, registry(), None, broken)


class ProtocolHandoverTests(SynchronousTestCase):
    """Freezing a connection in one protocol and resuming it in another."""

    def connect(self, factory: NBDServerFactory) -> tuple[Any, StringTransport]:
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_freeze_waits_for_in_flight(self) -> None:
        """
        A frozen connection stops taking requests at the next boundary and
        says so only once the requests in flight have been answered; what
        it had received meanwhile goes with its state, and a second protocol
        carries on with it.
        """
        device = ControllableBlockDevice(1 << 20)
        reg = ExportRegistry.of([Export("disk", device)], default_name="disk")
        old, transport = self.connect(NBDServerFactory(reg))
        old.dataReceived(b.client_flags(3) + b.go(""))
        transport.clear()
        old.dataReceived(b.read(1, 0, 512))
        self.assertEqual(len(device.calls), 1)
        frozen: list[bool] = []
        self.assertTrue(old.freeze(lambda: frozen.append(True)))
        # Received while frozen: not parsed, not answered.
        old.dataReceived(b.read(2, 512, 512))
        self.assertEqual(len(device.calls), 1)
        self.assertEqual(frozen, [])
        device.calls[0].deferred.callback(b"a" * 512)
        self.assertEqual(frozen, [True])
        self.assertEqual(transport.value()[16:], b"a" * 512)

        state = json.loads(json.dumps(old.handover_state()))
        new_factory = NBDServerFactory(reg)
        new = new_factory.make_protocol()
        new.resume(state)
        new_transport = StringTransport()
        new.makeConnection(new_transport)
        self.assertEqual(len(device.calls), 2)
        self.assertEqual(
            (device.calls[1].args["offset"], device.calls[1].args["length"]), (512, 512)
        )
        device.calls[1].deferred.callback(b"b" * 512)
        reply = new_transport.value()
        self.assertEqual(reply[:16], struct.pack(">IIQ", w.SIMPLE_REPLY_MAGIC, 0, 2))
        self.assertIn(new, new_factory.connections)

    def test_thaw(self) -> None:
        """A connection that stays after all goes on where it stopped."""
        device = ControllableBlockDevice(1 << 20)
        reg = ExportRegistry.of([Export("disk", device)], default_name="disk")
        proto, transport = self.connect(NBDServerFactory(reg))
        proto.dataReceived(b.client_flags(3) + b.go(""))
        self.assertTrue(proto.freeze(lambda: None))
        proto.dataReceived(b.read(1, 0, 512))
        self.assertEqual(device.calls, [])
        proto.thaw()
        self.assertEqual(len(device.calls), 1)

    def test_negotiating_cannot_freeze(self) -> None:
        """A connection still negotiating is not frozen (it moves later)."""
        reg = ExportRegistry.of([Export("disk", ControllableBlockDevice(4096))])
        proto, _ = self.connect(NBDServerFactory(reg))
        self.assertFalse(proto.freeze(lambda: None))
        proto.dataReceived(b.client_flags(3))
        self.assertFalse(proto.freeze(lambda: None))


class MovableTests(SynchronousTestCase):
    """Which exports' connections may move to another process."""

    def test_movable(self) -> None:
        self.assertIsNone(movable(ExportSpec(image="/dev/null", read_only=True)))
        self.assertIsNone(movable(ExportSpec(image="/dev/null", filters=(PluginRef("stats", ()),))))
        self.assertIn("RAM disk", movable(ExportSpec(memory=4096)) or "")
        self.assertIsNone(movable(ExportSpec(memory=4096), shared=True))
        self.assertIn(
            "cow", movable(ExportSpec(image="/dev/null", filters=(PluginRef("cow", ()),))) or ""
        )


class InProcessHandoverTests(TestCase):
    """
    Both ends of L{twisted_nbd.restart} in this process, over real sockets:
    the new server's blocking hello runs in a thread while the reactor
    serves the old one.
    """

    async def serve(self, config: Config, name: str) -> tuple[NBDService, HandoverService]:
        """Build a server for C{config}, take over at the test's path, start it."""
        from twisted.internet import reactor

        top = build(config, reactor)
        handover = await deferToThread(
            attach_takeover, top, config, self.path, reactor, stop_reactor=False
        )
        cast(Service, top).privilegedStartService()
        cast(Service, top).startService()
        self.addCleanup(lambda: cast(Service, top).stopService())
        return top, handover

    async def wait(self, condition: Any) -> None:
        from twisted.internet import reactor

        for _ in range(500):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("timed out")

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "takeover.sock")
        self.image = os.path.join(directory, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(1 << 20)
        self.spec = ExportSpec(image=self.image)

    async def connect_client(self, top: NBDService) -> Any:
        from twisted.internet import reactor

        from twisted_nbd.client import connect

        port = top.factory  # noqa: F841 - the factory is shared by the listeners
        listener = next(c for c in top if hasattr(c, "_waitingForPort"))
        address = listener._waitingForPort.result.getHost()
        client = await connect(reactor, f"tcp:127.0.0.1:{address.port}")
        return client

    async def test_moves(self) -> None:
        """
        The client's connection moves to the new server, which serves it;
        the old one has none left and says it is done.
        """
        config = Config([self.spec], listen=("tcp:0:interface=127.0.0.1",))
        old, old_handover = await self.serve(config, "old")
        client = await self.connect_client(old)
        await client.write(0, b"before" * 100)
        new, _ = await self.serve(config, "new")
        await self.wait(lambda: old_handover._done)
        await self.wait(lambda: not old.factory.connections)
        self.assertEqual(len(new.factory.connections), 1)
        self.assertEqual(await client.read(0, 600), b"before" * 100)
        await client.write(600, b"after")
        self.assertEqual(await client.read(600, 5), b"after")
        await client.disconnect()

    async def test_declined(self) -> None:
        """
        A new server whose export differs (here: read-only) declines the
        connection; the old server serves it on.
        """
        config = Config([self.spec], listen=("tcp:0:interface=127.0.0.1",))
        old, old_handover = await self.serve(config, "old")
        client = await self.connect_client(old)
        changed = Config([ExportSpec(image=self.image, read_only=True)], listen=config.listen)
        new, _ = await self.serve(changed, "new")
        await self.wait(lambda: old_handover._done)
        self.assertEqual(len(old.factory.connections), 1)
        self.assertEqual(len(new.factory.connections), 0)
        await client.write(0, b"still here")
        self.assertEqual(await client.read(0, 10), b"still here")
        await client.disconnect()

    async def test_successor_goes_away(self) -> None:
        """
        A new server that goes away before it listens changes nothing: the
        old one serves on, listens for a successor again, and a later one
        takes over.
        """
        config = Config([self.spec], listen=("tcp:0:interface=127.0.0.1",))
        old, old_handover = await self.serve(config, "old")
        client = await self.connect_client(old)

        def hello_and_leave() -> int:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(self.path)
            sock.sendall(b'{"hello": 1}\n')
            _, fds, _, _ = socket.recv_fds(sock, 65536, 8)
            for fd in fds:
                os.close(fd)
            sock.close()
            return len(fds)

        self.assertEqual(await deferToThread(hello_and_leave), 1)
        await self.wait(lambda: old_handover._successor is None and old_handover._port is not None)
        await client.write(0, b"served on")
        self.assertEqual(len(old.factory.connections), 1)

        new, _ = await self.serve(config, "new")
        await self.wait(lambda: old_handover._done)
        await self.wait(lambda: not old.factory.connections)
        self.assertEqual(await client.read(0, 9), b"served on")
        self.assertEqual(len(new.factory.connections), 1)
        await client.disconnect()

    async def test_moves_ram_disk(self) -> None:
        """
        A RAM disk in shared memory goes along: the new server serves the
        old one's memory, so a connection to it moves and finds its data.
        """
        config = Config([ExportSpec(memory=1 << 20)], listen=("tcp:0:interface=127.0.0.1",))
        old, old_handover = await self.serve(config, "old")
        client = await self.connect_client(old)
        await client.write(4096, b"kept in memory")
        new, new_handover = await self.serve(config, "new")
        await self.wait(lambda: old_handover._done)
        await self.wait(lambda: not old.factory.connections)
        self.assertEqual(new_handover.shared, {""})
        self.assertEqual(len(new.factory.connections), 1)
        self.assertEqual(await client.read(4096, 14), b"kept in memory")
        await client.disconnect()
