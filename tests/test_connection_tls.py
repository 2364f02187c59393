"""
STARTTLS in the sans-I/O cores (S- rules of the protocol digest): the
server's policy gate and export visibility in each TLS mode, forgetting what
was negotiated before TLS, and the client's STARTTLS step.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests import builders as b
from twisted_nbd import _wire as w
from twisted_nbd._client_connection import (
    ClientConfiguration,
    ClientConnection,
    HandshakeComplete,
    HandshakeRefused,
    TLSStarting,
)
from twisted_nbd._connection import (
    NEED_DATA,
    ExportChosen,
    OptionRejected,
    ServerConfiguration,
    ServerConnection,
    StartTLS,
)
from twisted_nbd._wire import Opt, Rep
from twisted_nbd.errors import ProtocolViolation
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.testing import ControllableBlockDevice

GREETING_SIZE = 18


def registry() -> ExportRegistry:
    """A plain export "disk" (the default), a TLS-only "secret", and "alice-only"."""
    return ExportRegistry.of(
        [
            Export("disk", ControllableBlockDevice(4096), "plain"),
            Export("secret", ControllableBlockDevice(4096), "tls only", tls_required=True),
            Export(
                "alice-only",
                ControllableBlockDevice(4096),
                "",
                tls_required=True,
                allowed_dns=("CN=alice,*",),
            ),
        ],
        default_name="disk",
    )


class Server:
    """A server connection fed whole messages; collects events and option replies."""

    def __init__(self, mode: str, **config: Any) -> None:
        self.conn = ServerConnection(registry(), ServerConfiguration(tls=mode, **config))  # type: ignore[arg-type]
        out = b"".join(self.conn.data_to_send())
        assert len(out) == GREETING_SIZE
        self.conn.receive_data(b.client_flags(3))
        assert self.conn.next_event() is NEED_DATA

    def send(self, data: bytes) -> tuple[list[Any], list[tuple[int, int, bytes]]]:
        """Feed C{data}; the events up to NEED_DATA and the option replies sent."""
        self.conn.receive_data(data)
        events: list[Any] = []
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
        out = b"".join(self.conn.data_to_send())
        return events, b.parse_option_replies(out)

    def starttls(self, peer_dn: str | None = None) -> None:
        events, replies = self.send(b.option(Opt.STARTTLS))
        assert replies == [(Opt.STARTTLS, Rep.ACK, b"")], replies
        assert [type(e) for e in events] == [StartTLS], events
        self.conn.tls_established(peer_dn)

    def listed(self) -> list[str]:
        _, replies = self.send(b.option(Opt.LIST))
        names = []
        for _, rep, data in replies:
            if rep == Rep.SERVER:
                (length,) = struct.unpack_from(">I", data)
                names.append(data[4 : 4 + length].decode())
        return names


class ForcedTLSTests(SynchronousTestCase):
    """C{tls="require"}: the spec's FORCEDTLS."""

    def test_options_before_tls_S03(self) -> None:
        """
        S-03: every option but STARTTLS and ABORT, unknown ones included, gets
        ERR_TLS_REQD after its data is consumed.
        """
        server = Server("require")
        for option in (Opt.LIST, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY, 99):
            data = b.info_data("disk") if option in (Opt.INFO, Opt.GO) else b""
            events, replies = server.send(b.option(option, data))
            self.assertEqual([(r[0], r[1]) for r in replies], [(option, Rep.ERR_TLS_REQD)])
            self.assertEqual([type(e) for e in events], [OptionRejected])

    def test_export_name_before_tls_S03(self) -> None:
        """S-03: EXPORT_NAME before TLS terminates the session."""
        server = Server("require")
        with self.assertRaises(ProtocolViolation):
            server.send(b.option(Opt.EXPORT_NAME, b"disk"))

    def test_abort_before_tls_S03(self) -> None:
        """S-03: ABORT is still answered."""
        server = Server("require")
        _, replies = server.send(b.option(Opt.ABORT))
        self.assertEqual(replies, [(Opt.ABORT, Rep.ACK, b"")])

    def test_after_tls_S05(self) -> None:
        """S-05: once TLS is up, options work and ERR_TLS_REQD is never sent."""
        server = Server("require")
        server.starttls()
        self.assertEqual(server.listed(), ["disk", "secret"])
        events, replies = server.send(b.go("secret"))
        self.assertEqual(replies[-1][:2], (Opt.GO, Rep.ACK))
        self.assertIsInstance(events[-1], ExportChosen)

    def test_starttls_twice_S05(self) -> None:
        """S-05: STARTTLS once TLS is up gets ERR_INVALID."""
        server = Server("require")
        server.starttls()
        _, replies = server.send(b.option(Opt.STARTTLS))
        self.assertEqual([r[:2] for r in replies], [(Opt.STARTTLS, Rep.ERR_INVALID)])


class SelectiveTLSTests(SynchronousTestCase):
    """C{tls="on"}: plaintext allowed, TLS-only exports hidden (SELECTIVETLS)."""

    def test_tls_only_export_hidden_from_list_S04(self) -> None:
        """S-04: LIST before TLS shows only the exports plaintext may use."""
        server = Server("on")
        self.assertEqual(server.listed(), ["disk"])

    def test_tls_only_export_refused_S04(self) -> None:
        """S-04: INFO and GO of a TLS-only export before TLS get ERR_TLS_REQD."""
        server = Server("on")
        for option in (Opt.INFO, Opt.GO):
            _, replies = server.send(b.option(option, b.info_data("secret")))
            self.assertEqual([r[:2] for r in replies], [(option, Rep.ERR_TLS_REQD)])

    def test_export_name_of_tls_only_export_S04(self) -> None:
        """S-04: EXPORT_NAME of a TLS-only export before TLS terminates."""
        server = Server("on")
        with self.assertRaises(ProtocolViolation):
            server.send(b.option(Opt.EXPORT_NAME, b"secret"))

    def test_plain_export_without_tls(self) -> None:
        """A plain export is served without TLS, and ERR_TLS_REQD is not used for others."""
        server = Server("on")
        _, replies = server.send(b.go("nope"))
        self.assertEqual([r[:2] for r in replies], [(Opt.GO, Rep.ERR_UNKNOWN)])
        events, replies = server.send(b.go("disk"))
        self.assertIsInstance(events[-1], ExportChosen)

    def test_negotiation_forgotten_S06(self) -> None:
        """S-06: structured replies negotiated before STARTTLS are off afterwards."""
        server = Server("on")
        _, replies = server.send(b.option(Opt.STRUCTURED_REPLY))
        self.assertEqual([r[:2] for r in replies], [(Opt.STRUCTURED_REPLY, Rep.ACK)])
        self.assertTrue(server.conn.negotiated.structured_replies)
        server.starttls()
        self.assertFalse(server.conn.negotiated.structured_replies)
        self.assertTrue(server.conn.negotiated.tls)
        # So it can be asked for again, which would be an error (H-17) had it stayed.
        _, replies = server.send(b.option(Opt.STRUCTURED_REPLY))
        self.assertEqual([r[:2] for r in replies], [(Opt.STRUCTURED_REPLY, Rep.ACK)])

    def test_pipelined_bytes_after_starttls_S07(self) -> None:
        """S-07: bytes sent after STARTTLS, before its reply, make a hard close."""
        server = Server("on")
        with self.assertRaises(ProtocolViolation):
            server.send(b.option(Opt.STARTTLS) + b.go("disk"))

    def test_starttls_with_data_H07(self) -> None:
        """H-07: STARTTLS with data gets ERR_INVALID and TLS does not start."""
        server = Server("on")
        events, replies = server.send(b.option(Opt.STARTTLS, b"x"))
        self.assertEqual([r[:2] for r in replies], [(Opt.STARTTLS, Rep.ERR_INVALID)])
        self.assertNotIn(StartTLS, [type(e) for e in events])

    def test_certificate_dn_allow_list(self) -> None:
        """An export with allowed DNs is visible only to a matching certificate."""
        server = Server("on")
        server.starttls("CN=bob,O=Example")
        self.assertEqual(server.listed(), ["disk", "secret"])
        _, replies = server.send(b.go("alice-only"))
        self.assertEqual([r[:2] for r in replies], [(Opt.GO, Rep.ERR_POLICY)])
        server = Server("on")
        server.starttls("CN=alice,O=Example")
        self.assertEqual(server.listed(), ["disk", "secret", "alice-only"])
        events, _ = server.send(b.go("alice-only"))
        self.assertIsInstance(events[-1], ExportChosen)


class NoTLSTests(SynchronousTestCase):
    """C{tls="off"}: the spec's NOTLS."""

    def test_starttls_refused_S02(self) -> None:
        """S-02: STARTTLS gets ERR_POLICY; TLS-only exports stay hidden."""
        server = Server("off")
        _, replies = server.send(b.option(Opt.STARTTLS))
        self.assertEqual([r[:2] for r in replies], [(Opt.STARTTLS, Rep.ERR_POLICY)])
        self.assertEqual(server.listed(), ["disk"])


class OptionCountTests(SynchronousTestCase):
    """A client may not keep a connection in option haggling for ever."""

    def test_too_many_options(self) -> None:
        """The option after C{max_options} closes the connection."""
        server = Server("off", max_options=5)
        for _ in range(5):
            _, replies = server.send(b.option(Opt.LIST))
            self.assertEqual(replies[-1][:2], (Opt.LIST, Rep.ACK))
        with self.assertRaises(ProtocolViolation):
            server.send(b.option(Opt.LIST))


def _server_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", w.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


class ClientTLSTests(SynchronousTestCase):
    """The client's STARTTLS step."""

    def start(self, tls: str) -> ClientConnection:
        conn = ClientConnection(ClientConfiguration(tls=tls, extended_headers=False))
        conn.receive_data(struct.pack(">QQH", w.NBDMAGIC, w.IHAVEOPT, 3))
        self.assertIs(conn.next_event(), NEED_DATA)
        out = b"".join(conn.data_to_send())
        # Client flags, then STARTTLS first of all.
        self.assertEqual(out[4:], b.option(Opt.STARTTLS))
        return conn

    def test_starttls_first(self) -> None:
        """With TLS asked for, STARTTLS comes first; the next option only once TLS is up."""
        conn = self.start("require")
        conn.receive_data(_server_reply(Opt.STARTTLS, Rep.ACK))
        self.assertIsInstance(conn.next_event(), TLSStarting)
        self.assertEqual(b"".join(conn.data_to_send()), b"")
        conn.tls_started()
        self.assertTrue(conn.negotiated.tls)
        self.assertEqual(b"".join(conn.data_to_send()), b.option(Opt.STRUCTURED_REPLY))

    def test_refused_when_required(self) -> None:
        """C{tls="require"}: a refusal ends the handshake (ABORT is sent)."""
        conn = self.start("require")
        conn.receive_data(_server_reply(Opt.STARTTLS, Rep.ERR_POLICY))
        event = conn.next_event()
        self.assertIsInstance(event, HandshakeRefused)
        self.assertEqual(b"".join(conn.data_to_send()), b.option(Opt.ABORT))

    def test_refused_when_allowed(self) -> None:
        """C{tls="allow"}: a refusal means going on in plaintext."""
        conn = self.start("allow")
        conn.receive_data(_server_reply(Opt.STARTTLS, Rep.ERR_UNSUP))
        self.assertIs(conn.next_event(), NEED_DATA)
        self.assertEqual(b"".join(conn.data_to_send()), b.option(Opt.STRUCTURED_REPLY))

    def test_tls_bytes_too_early_S07(self) -> None:
        """Bytes after the STARTTLS ACK in the same read are not taken as options."""
        conn = self.start("require")
        conn.receive_data(_server_reply(Opt.STARTTLS, Rep.ACK) + b"\x16\x03\x01")
        with self.assertRaises(ProtocolViolation):
            conn.next_event()

    def test_round_trip_with_server(self) -> None:
        """The two cores agree: STARTTLS, then GO on a TLS-only export."""
        server = ServerConnection(registry(), ServerConfiguration(tls="require"))
        client = ClientConnection(ClientConfiguration("secret", tls="require"))
        client.receive_data(b"".join(server.data_to_send()))
        done = None
        for _ in range(50):
            while (cevent := client.next_event()) is not NEED_DATA:
                if isinstance(cevent, TLSStarting):
                    client.tls_started()
                if isinstance(cevent, HandshakeComplete):
                    done = cevent
            if done is not None:
                break
            server.receive_data(b"".join(client.data_to_send()))
            while (event := server.next_event()) is not NEED_DATA:
                if isinstance(event, StartTLS):
                    server.tls_established(None)
            client.receive_data(b"".join(server.data_to_send()))
        assert done is not None
        self.assertEqual(done.info.size, 4096)
        self.assertTrue(server.negotiated.tls)
