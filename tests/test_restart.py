"""
Live restart without I/O: a connection's handover state and its resumption
in another L{ServerConnection} or L{NBDServerProtocol} (see
L{twisted_nbd.restart}; the real handover between two processes is in
C{tests/interop/test_restart.py}).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

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
from twisted_nbd.config import ExportSpec
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.registry import PluginRef
from twisted_nbd.restart import movable
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
        self.assertIn(
            "cow", movable(ExportSpec(image="/dev/null", filters=(PluginRef("cow", ()),))) or ""
        )
