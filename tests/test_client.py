# -*- test-case-name: tests.test_client -*-
"""
Tests for L{twisted_nbd._client_connection} and L{twisted_nbd.client}.

The sans-I/O tests check the client's bytes against golden vectors written
by hand from the spec's layouts (not from the codec in L{twisted_nbd._wire}),
feed server transcripts whole and one byte at a time, and check that a
server breaking the protocol is caught. The Twisted tests use a
C{StringTransport}; the integration tests run our own server in-process on
127.0.0.1 and talk to it over TCP.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_nbd._client_connection import (
    NEED_DATA,
    AbortAcknowledged,
    BlockSize,
    ClientConfiguration,
    ClientConnection,
    ExportsListed,
    HandshakeComplete,
    HandshakeRefused,
    NBDHandshakeError,
    Phase,
    Reply,
    ReplyReceived,
)
from twisted_nbd.client import NBDClient, NBDClientProtocol, connect, list_exports
from twisted_nbd.errors import NBDError, ProtocolViolation
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO, Capabilities, Extent
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol

try:
    from twisted_nbd.backends.memory import MemoryBlockDevice
except ImportError:  # pragma: no cover - the backend is another module's work
    MemoryBlockDevice = None  # type: ignore[assignment, misc]

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * MiB

# Hand-written wire values (spec section 0), independent of twisted_nbd._wire.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXTENDED_MAGIC = 0x6E8A278C
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO = 1, 2, 3, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 8, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_UNKNOWN = 0x80000001, 0x80000006
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 5, 6, 7
FLAG_FUA, FLAG_DF, FLAG_REQ_ONE, FLAG_PAYLOAD_LEN = 0x1, 0x4, 0x8, 0x20
DONE = 1
NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, BLOCK_STATUS_EXT = 0, 1, 2, 5, 6
ERROR, ERROR_OFFSET = 0x8001, 0x8002
EPERM, EIO, EINVAL, ENOSPC, ESHUTDOWN = 1, 5, 22, 28, 108
#: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_DF,
#: SEND_CACHE, SEND_FAST_ZERO.
ALL_TX = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0080 | 0x0400 | 0x0800
READ_ONLY_TX = 0x0001 | 0x0002 | 0x0004 | 0x0080


def h(text: str) -> bytes:
    """Bytes from hex with spaces (golden vectors read like the spec's tables)."""
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def greeting(flags: int = 3) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def opt_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPT_REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int = SIZE, flags: int = ALL_TX) -> bytes:
    return opt_reply(OPT_GO, REP_INFO, struct.pack(">HQH", 0, size, flags))


def info_block_size(minimum: int = 1, preferred: int = 4096, maximum: int = 32 * MiB) -> bytes:
    return opt_reply(OPT_GO, REP_INFO, struct.pack(">HIII", 3, minimum, preferred, maximum))


def meta_context(context_id: int, name: str) -> bytes:
    return opt_reply(
        OPT_SET_META_CONTEXT, REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode()
    )


def simple(error: int, cookie: int) -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie)


def chunk(
    flags: int, type_: int, cookie: int, payload: bytes = b"", offset: int | None = None
) -> bytes:
    """A compact chunk, or an extended one when the header C{offset} is given."""
    if offset is None:
        return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, type_, cookie, len(payload)) + payload
    return (
        struct.pack(">IHHQQQ", EXTENDED_MAGIC, flags, type_, cookie, offset, len(payload)) + payload
    )


def error_payload(errno: int, message: bytes = b"", offset: int | None = None) -> bytes:
    out = struct.pack(">IH", errno, len(message)) + message
    return out + struct.pack(">Q", offset) if offset is not None else out


def handshake_transcript(
    structured: bool = True,
    extended: bool = False,
    contexts: Sequence[tuple[int, str]] = ((1, "base:allocation"),),
    size: int = SIZE,
    tx: int = ALL_TX,
    block: tuple[int, int, int] | None = (1, 4096, 32 * MiB),
) -> bytes:
    """What a server sends to a default client, up to transmission."""
    out = greeting()
    if structured:
        if extended:
            out += opt_reply(OPT_EXTENDED_HEADERS, REP_ACK)
        else:
            out += opt_reply(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP)
            out += opt_reply(OPT_STRUCTURED_REPLY, REP_ACK)
        out += b"".join(meta_context(i, n) for i, n in contexts)
        out += opt_reply(OPT_SET_META_CONTEXT, REP_ACK)
    out += info_export(size, tx)
    if block is not None:
        out += info_block_size(*block)
    return out + opt_reply(OPT_GO, REP_ACK)


def events_of(conn: ClientConnection, data: bytes, chunk_size: int = 0) -> list[Any]:
    """Feed C{data} (in pieces of C{chunk_size}, or whole) and collect the events."""
    events: list[Any] = []
    step = chunk_size or max(len(data), 1)
    for start in range(0, max(len(data), 1), step):
        conn.receive_data(data[start : start + step])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def open_conn(structured: bool = True, extended: bool = False, **kwargs: Any) -> ClientConnection:
    """A client connection in transmission, its handshake bytes discarded."""
    conn = ClientConnection(
        ClientConfiguration(structured_replies=structured, extended_headers=True)
    )
    [event] = events_of(conn, handshake_transcript(structured, extended, **kwargs))
    assert isinstance(event, HandshakeComplete), event
    conn.data_to_send()
    return conn


_E = TypeVar("_E", bound=BaseException)


async def failure_of(d: Deferred[Any], kind: type[_E]) -> _E:
    """Await C{d}, which must fail with C{kind}; the exception."""
    try:
        result = await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}, got the result {result!r}")


def replies(conn: ClientConnection, data: bytes, chunk_size: int = 0) -> list[Reply]:
    out = []
    for event in events_of(conn, data, chunk_size):
        assert isinstance(event, ReplyReceived), event
        out.append(event.reply)
    return out


# ---------------------------------------------------------------- handshake


class HandshakeTests(SynchronousTestCase):
    """The options the client sends, and how it reads the replies."""

    def test_golden_handshake_extended(self) -> None:
        """
        Against a server that takes everything, the client sends exactly:
        client flags, EXTENDED_HEADERS, SET_META_CONTEXT for base:allocation,
        GO asking for NAME, DESCRIPTION and BLOCK_SIZE; one option at a time.
        """
        conn = ClientConnection()
        self.assertEqual(conn.data_to_send(), [])
        self.assertEqual(events_of(conn, greeting(3)), [])
        self.assertEqual(
            b"".join(conn.data_to_send()),
            h("0000000349484156454f5054 0000000b 00000000"),
        )
        self.assertEqual(events_of(conn, opt_reply(OPT_EXTENDED_HEADERS, REP_ACK)), [])
        self.assertEqual(
            b"".join(conn.data_to_send()),
            h(
                "49484156454f5054 0000000a 0000001b"
                "00000000 00000001 0000000f 626173653a616c6c6f636174696f6e"
            ),
        )
        events_of(conn, meta_context(5, "base:allocation"))
        self.assertEqual(conn.data_to_send(), [])  # still waiting for the final reply
        events_of(conn, opt_reply(OPT_SET_META_CONTEXT, REP_ACK))
        self.assertEqual(
            b"".join(conn.data_to_send()),
            h("49484156454f5054 00000007 0000000c 00000000 0003 0001 0002 0003"),
        )
        transcript = (
            info_export(SIZE, ALL_TX)
            + opt_reply(OPT_GO, REP_INFO, b"\x00\x01canonical")
            + opt_reply(OPT_GO, REP_INFO, b"\x00\x02a description")
            + opt_reply(OPT_GO, REP_INFO, b"\x00\x09unknown info is ignored")
            + info_block_size(512, 4096, 8 * MiB)
            + opt_reply(OPT_GO, REP_ACK)
        )
        [event] = events_of(conn, transcript)
        self.assertIsInstance(event, HandshakeComplete)
        info = event.info
        self.assertEqual(info.name, "canonical")
        self.assertEqual(info.size, SIZE)
        self.assertEqual(info.transmission_flags, ALL_TX)
        self.assertEqual(info.block_size, BlockSize(512, 4096, 8 * MiB))
        self.assertEqual(info.description, "a description")
        self.assertTrue(info.structured_replies)
        self.assertTrue(info.extended_headers)
        self.assertEqual(dict(info.meta_contexts), {"base:allocation": 5})
        self.assertIs(conn.phase, Phase.TRANSMISSION)
        self.assertEqual(conn.data_to_send(), [])

    def test_named_export_and_contexts(self) -> None:
        """The export name and every requested context go into SET_META_CONTEXT and GO."""
        conn = ClientConnection(
            ClientConfiguration("disk", meta_contexts=["base:allocation", "qemu:dirty-bitmap:b"])
        )
        events_of(conn, greeting() + opt_reply(OPT_EXTENDED_HEADERS, REP_ACK))
        data = b"".join(conn.data_to_send())
        self.assertEqual(
            data[-70:],
            h(
                "49484156454f5054 0000000a 00000036 00000004 6469736b 00000002"
                "0000000f 626173653a616c6c6f636174696f6e"
                "00000013 71656d753a64697274792d6269746d61703a62"
            ),
        )

    def test_fallback_to_structured_replies(self) -> None:
        """A server without extended headers gets STRUCTURED_REPLY next (on any error)."""
        conn = ClientConnection()
        events_of(conn, greeting())
        conn.data_to_send()
        events_of(conn, opt_reply(OPT_EXTENDED_HEADERS, 0x80000003, b"nope"))
        self.assertEqual(b"".join(conn.data_to_send()), h("49484156454f5054 00000008 00000000"))
        [event] = events_of(conn, handshake_transcript()[18 + 20 :])
        self.assertTrue(event.info.structured_replies)
        self.assertFalse(event.info.extended_headers)

    def test_no_structured_replies(self) -> None:
        """structured_replies=False: no EXTENDED_HEADERS, no meta contexts, just GO."""
        conn = ClientConnection(ClientConfiguration(structured_replies=False))
        events_of(conn, greeting())
        self.assertEqual(
            b"".join(conn.data_to_send()),
            h("00000003 49484156454f5054 00000007 0000000c 00000000 0003 0001 0002 0003"),
        )
        [event] = events_of(conn, info_export() + opt_reply(OPT_GO, REP_ACK))
        self.assertFalse(event.info.structured_replies)
        self.assertEqual(dict(event.info.meta_contexts), {})
        # The defaults of spec section 5 when the server sends no block sizes.
        self.assertEqual(event.info.block_size, BlockSize(1, 4096, 32 * MiB))

    def test_structured_refused_falls_back_to_simple(self) -> None:
        """If both are refused, the client goes on with simple replies and no contexts."""
        conn = ClientConnection()
        transcript = (
            greeting()
            + opt_reply(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP)
            + opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP)
            + info_export()
            + opt_reply(OPT_GO, REP_ACK)
        )
        [event] = events_of(conn, transcript)
        self.assertFalse(event.info.structured_replies)
        sent = b"".join(conn.data_to_send())
        self.assertNotIn(struct.pack(">QI", IHAVEOPT, OPT_SET_META_CONTEXT), sent)

    def test_meta_context_refused(self) -> None:
        """A refused SET_META_CONTEXT leaves no context selected; GO still follows."""
        conn = ClientConnection()
        transcript = (
            greeting()
            + opt_reply(OPT_EXTENDED_HEADERS, REP_ACK)
            + opt_reply(OPT_SET_META_CONTEXT, 0x80000009)
            + info_export()
            + opt_reply(OPT_GO, REP_ACK)
        )
        [event] = events_of(conn, transcript)
        self.assertEqual(dict(event.info.meta_contexts), {})
        self.assertRaises(ValueError, conn.validate, CMD_BLOCK_STATUS, 0, 4096)

    def test_export_name_fallback(self) -> None:
        """
        GO refused with ERR_UNSUP: the client sends NBD_OPT_EXPORT_NAME and
        reads the 10-byte reply (NO_ZEROES agreed) or the 134-byte one.
        """
        for server_flags, padding in ((3, 0), (1, 124)):
            conn = ClientConnection(ClientConfiguration("disk", structured_replies=False))
            events_of(conn, greeting(server_flags))
            conn.data_to_send()
            self.assertEqual(events_of(conn, opt_reply(OPT_GO, REP_ERR_UNSUP)), [])
            self.assertEqual(
                b"".join(conn.data_to_send()), h("49484156454f5054 00000001 00000004 6469736b")
            )
            reply = struct.pack(">QH", 12345 * 512, 0x0003) + bytes(padding)
            self.assertEqual(events_of(conn, reply[:-1]), [])
            [event] = events_of(conn, reply[-1:])
            self.assertEqual(event.info.size, 12345 * 512)
            self.assertEqual(event.info.transmission_flags, 3)
            self.assertEqual(event.info.name, "disk")

    def test_not_fixed_newstyle(self) -> None:
        """A server without FIXED_NEWSTYLE gets client flags 0 and EXPORT_NAME at once."""
        conn = ClientConnection(ClientConfiguration("x"))
        events_of(conn, greeting(0))
        self.assertEqual(
            b"".join(conn.data_to_send()), h("00000000 49484156454f5054 00000001 00000001 78")
        )
        [event] = events_of(conn, struct.pack(">QH", 4096, 1) + bytes(124))
        self.assertFalse(event.info.structured_replies)

    def test_go_refused(self) -> None:
        """GO refused (unknown export): HandshakeRefused, then ABORT, then close on its ACK."""
        conn = ClientConnection(ClientConfiguration("nope"))
        events_of(conn, greeting())
        conn.data_to_send()
        transcript = (
            opt_reply(OPT_EXTENDED_HEADERS, REP_ACK)
            + opt_reply(OPT_SET_META_CONTEXT, 0x80000006)
            + opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export")
        )
        [event] = events_of(conn, transcript)
        self.assertIsInstance(event, HandshakeRefused)
        error = event.error
        self.assertIsInstance(error, NBDHandshakeError)
        self.assertEqual(
            (error.option, error.reply, error.message), (7, REP_ERR_UNKNOWN, "no such export")
        )
        self.assertEqual(str(error), "NBD_OPT_GO failed with NBD_REP_ERR_UNKNOWN: no such export")
        self.assertEqual(conn.data_to_send()[-1], h("49484156454f5054 00000002 00000000"))
        self.assertEqual(events_of(conn, opt_reply(OPT_ABORT, REP_ACK)), [AbortAcknowledged()])
        self.assertIs(conn.phase, Phase.CLOSED)

    def test_list(self) -> None:
        """Listing mode: LIST, the SERVER replies collected, then ABORT."""
        conn = ClientConnection(ClientConfiguration(list_exports=True))
        events_of(conn, greeting())
        self.assertEqual(
            b"".join(conn.data_to_send()), h("00000003 49484156454f5054 00000003 00000000")
        )
        transcript = (
            opt_reply(OPT_LIST, REP_SERVER, h("00000004") + b"disk" + b"the disk")
            + opt_reply(OPT_LIST, REP_SERVER, h("00000000"))
            + opt_reply(OPT_LIST, REP_ACK)
        )
        for size in (1, 0):
            conn = ClientConnection(ClientConfiguration(list_exports=True))
            events_of(conn, greeting())
            conn.data_to_send()
            [event] = events_of(conn, transcript, size)
            self.assertEqual(event, ExportsListed((("disk", "the disk"), ("", ""))))
            self.assertEqual(b"".join(conn.data_to_send()), h("49484156454f5054 00000002 00000000"))

    def test_handshake_one_byte_at_a_time(self) -> None:
        """The handshake gives the same result and bytes whatever the read sizes."""
        results = []
        for size in (0, 1, 3, 7):
            conn = ClientConnection()
            events = events_of(conn, handshake_transcript(extended=True), size)
            results.append((events, b"".join(conn.data_to_send())))
        self.assertEqual(results[1:], results[:1] * 3)

    def test_violations(self) -> None:
        """A server that breaks the handshake rules is a ProtocolViolation."""
        cases = {
            "bad greeting magic": struct.pack(">QQH", 1, IHAVEOPT, 3),
            "oldstyle": struct.pack(">QQ", NBDMAGIC, 0x00420281861253) + bytes(8),
            "bad reply magic": greeting() + struct.pack(">QIII", 1, 11, 1, 0),
            "wrong option echoed": greeting() + opt_reply(OPT_GO, REP_ACK),
            "huge option reply": greeting() + struct.pack(">QIII", OPT_REPLY_MAGIC, 11, 1, 1 << 30),
            "unexpected reply type": greeting() + opt_reply(OPT_EXTENDED_HEADERS, REP_SERVER),
            "GO without INFO_EXPORT": handshake_transcript(block=None).replace(info_export(), b""),
            "short INFO_EXPORT": handshake_transcript().replace(
                info_export(), opt_reply(OPT_GO, REP_INFO, b"\x00\x00\x00")
            ),
        }
        for name, transcript in cases.items():
            conn = ClientConnection()
            with self.assertRaises(ProtocolViolation, msg=name):
                events_of(conn, transcript)
            self.assertIs(conn.phase, Phase.CLOSED, name)
            conn.receive_data(b"more")  # ignored
            self.assertIs(conn.next_event(), NEED_DATA)


# ---------------------------------------------------------------- requests


class RequestEncodingTests(SynchronousTestCase):
    """Requests on the wire: compact (28 bytes) and extended (32 bytes)."""

    def test_compact_golden(self) -> None:
        """A compact READ header is >IHHQQI with magic 0x25609513; cookies count from 1."""
        conn = open_conn()
        self.assertEqual(conn.send_request(CMD_READ, 0x1234_5678_9ABC, 0x10000, FLAG_DF), 1)
        self.assertEqual(
            conn.data_to_send(),
            [h("25609513 0004 0000 0000000000000001 0000123456789abc 00010000")],
        )

    def test_compact_write_payload_not_copied(self) -> None:
        """A WRITE's payload is its own item after the header, the very same object."""
        conn = open_conn()
        payload = b"x" * 100_000
        cookie = conn.write_request(4096, payload, FLAG_FUA)
        header, sent = conn.data_to_send()
        self.assertEqual(header, struct.pack(">IHHQQI", 0x25609513, 1, 1, cookie, 4096, 100_000))
        self.assertIs(sent, payload)

    def test_extended_golden(self) -> None:
        """
        With extended headers a request is the 32-byte >IHHQQQ with magic
        0x21e41c71 and a 64-bit length; a WRITE sets PAYLOAD_LEN.
        """
        conn = open_conn(extended=True)
        conn.send_request(CMD_TRIM, 0x1_0000_0000, 0x1_2345_6789, 0)
        self.assertEqual(
            conn.data_to_send(),
            [h("21e41c71 0000 0004 0000000000000001 0000000100000000 0000000123456789")],
        )
        conn.write_request(512, b"hello")
        self.assertEqual(
            conn.data_to_send(),
            [h("21e41c71 0020 0001 0000000000000002 0000000000000200 0000000000000005"), b"hello"],
        )

    def test_compact_length_limit(self) -> None:
        """A compact header cannot carry a length of 2^32; an extended one can."""
        conn = open_conn()
        self.assertRaises(ValueError, conn.send_request, CMD_TRIM, 0, 1 << 32)
        self.assertEqual(conn.data_to_send(), [])
        self.assertEqual(conn.in_flight, 0)
        open_conn(extended=True).send_request(CMD_TRIM, 0, 1 << 32)

    def test_cookies_unique(self) -> None:
        """Cookies of requests in flight never repeat, even when the counter wraps."""
        conn = open_conn()
        cookies = {conn.send_request(CMD_FLUSH, 0, 0) for _ in range(100)}
        self.assertEqual(len(cookies), 100)
        conn._next_cookie = 2**64 - 2
        more = [conn.send_request(CMD_FLUSH, 0, 0) for _ in range(4)]
        self.assertEqual(more, [2**64 - 2, 2**64 - 1, 0, 101])

    def test_disc(self) -> None:
        """DISC has no reply and nothing may follow it."""
        conn = open_conn()
        conn.disconnect()
        self.assertEqual(
            conn.data_to_send(),
            [h("25609513 0000 0002 0000000000000001 0000000000000000 00000000")],
        )
        self.assertEqual(conn.in_flight, 0)
        self.assertRaises(ValueError, conn.send_request, CMD_FLUSH, 0, 0)

    def test_not_in_transmission(self) -> None:
        """No request before the handshake is over."""
        conn = ClientConnection()
        self.assertRaises(ValueError, conn.send_request, CMD_READ, 0, 1)
        self.assertRaises(ValueError, conn.validate, CMD_READ, 0, 1)

    def test_validate(self) -> None:
        """validate() refuses what a polite client must not send."""
        conn = open_conn(size=1 * MiB, block=(512, 4096, 64 * 1024))
        conn.validate(CMD_READ, 0, 4096)
        conn.validate(CMD_READ, 0, 512, FLAG_DF)
        conn.validate(CMD_BLOCK_STATUS, 0, 1 * MiB, FLAG_REQ_ONE)
        conn.validate(CMD_FLUSH, 0, 0, FLAG_FUA)
        for args in [
            (CMD_READ, 1 * MiB, 512),  # past the end
            (CMD_READ, 512, 1 * MiB),
            (CMD_READ, 100, 512),  # misaligned
            (CMD_READ, 0, 500),
            (CMD_READ, 0, 128 * 1024),  # over the maximum payload
            (CMD_READ, 0, 512, FLAG_REQ_ONE),  # a flag for another command
            (CMD_FLUSH, 0, 512),
            (CMD_DISC, 0, 0),
            (99, 0, 0),
            (CMD_READ, -1, 512),
        ]:
            self.assertRaises(ValueError, conn.validate, *args)
        ro = open_conn(tx=READ_ONLY_TX)
        for args in [
            (CMD_WRITE, 0, 512),
            (CMD_TRIM, 0, 512),
            (CMD_WRITE_ZEROES, 0, 512),
            (CMD_READ, 0, 512, FLAG_FUA),  # FUA not advertised
        ]:
            self.assertRaises(ValueError, ro.validate, *args)
        ro.validate(CMD_FLUSH, 0, 0)
        ro.validate(CMD_CACHE, 0, 512)  # CACHE may be sent unadvertised
        simple_conn = open_conn(structured=False, tx=ALL_TX & ~0x80)
        self.assertRaises(ValueError, simple_conn.validate, CMD_READ, 0, 512, FLAG_DF)
        self.assertRaises(ValueError, simple_conn.validate, CMD_BLOCK_STATUS, 0, 512)


# ---------------------------------------------------------------- replies


class SimpleReplyTests(SynchronousTestCase):
    """Simple replies (no structured replies negotiated)."""

    def test_golden(self) -> None:
        """A simple reply is >IIQ with magic 0x67446698; a READ's data follows it."""
        conn = open_conn(structured=False)
        write = conn.write_request(0, b"abc")
        read = conn.send_request(CMD_READ, 0, 3)
        failed = conn.send_request(CMD_READ, 1 << 40, 3)
        transcript = (
            h("67446698 00000000 0000000000000002")
            + b"xyz"
            + h("67446698 00000016 0000000000000003")
            + h("67446698 00000000 0000000000000001")
        )
        for size in (0, 1):
            conn2 = open_conn(structured=False)
            conn2.write_request(0, b"abc")
            conn2.send_request(CMD_READ, 0, 3)
            conn2.send_request(CMD_READ, 1 << 40, 3)
            got = replies(conn2, transcript, size)
            self.assertEqual([r.cookie for r in got], [read, failed, write])
            self.assertEqual(got[0].data, b"xyz")
            self.assertIsNone(got[1].data)
            error = got[1].error
            assert isinstance(error, NBDError)
            self.assertEqual(error.errno, EINVAL)
            self.assertIsNone(got[2].error)
        self.assertEqual(conn.in_flight, 3)

    def test_unknown_errno_is_einval(self) -> None:
        """Error numbers the spec does not list are treated like EINVAL (section 2.8)."""
        conn = open_conn(structured=False)
        cookie = conn.send_request(CMD_FLUSH, 0, 0)
        [reply] = replies(conn, simple(12345, cookie))
        assert reply.error is not None
        self.assertEqual(reply.error.errno, EINVAL)
        self.assertIn("12345", reply.error.message)

    def test_simple_reply_allowed_with_structured(self) -> None:
        """With structured replies, a simple reply is fine for anything but READ."""
        conn = open_conn()
        cookie = conn.send_request(CMD_WRITE_ZEROES, 0, 4096)
        [reply] = replies(conn, simple(EPERM, cookie))
        assert reply.error is not None
        self.assertEqual(reply.error.errno, EPERM)


class StructuredReplyTests(SynchronousTestCase):
    """Structured reply chunks (20-byte header, magic 0x668e33ef)."""

    def test_golden_offset_data_and_hole(self) -> None:
        """
        A READ answered by OFFSET_HOLE, OFFSET_DATA (out of order) and NONE
        is put together with the hole as zeroes.
        """
        transcript = (
            h("668e33ef 0000 0002 0000000000000001 0000000c 0000000000001004 00000ffc")
            + h("668e33ef 0000 0001 0000000000000001 0000000c 0000000000001000")
            + b"abcd"
            + h("668e33ef 0001 0000 0000000000000001 00000000")
        )
        for size in (0, 1):
            conn = open_conn()
            self.assertEqual(conn.send_request(CMD_READ, 4096, 4096), 1)
            [reply] = replies(conn, transcript, size)
            self.assertEqual(reply.data, b"abcd" + bytes(4092))
            self.assertIsNone(reply.error)
            self.assertEqual(conn.in_flight, 0)

    def test_single_data_chunk(self) -> None:
        """One OFFSET_DATA chunk with DONE covering the read is the whole answer."""
        conn = open_conn()
        cookie = conn.send_request(CMD_READ, 512, 5)
        [reply] = replies(conn, chunk(DONE, OFFSET_DATA, cookie, struct.pack(">Q", 512) + b"hello"))
        self.assertEqual(reply.data, b"hello")

    def test_hole_only(self) -> None:
        """A read that is all hole reads as zeroes."""
        conn = open_conn()
        cookie = conn.send_request(CMD_READ, 0, 1 * MiB)
        [reply] = replies(conn, chunk(DONE, OFFSET_HOLE, cookie, struct.pack(">QI", 0, 1 * MiB)))
        self.assertEqual(reply.data, bytes(1 * MiB))

    def test_golden_block_status(self) -> None:
        """A BLOCK_STATUS chunk: u32 context id, then (u32 length, u32 flags) descriptors."""
        conn = open_conn(contexts=[(7, "base:allocation")])
        cookie = conn.send_request(CMD_BLOCK_STATUS, 0, 1 * MiB)
        transcript = h(
            "668e33ef 0001 0005 0000000000000001 00000014"
            "00000007 00010000 00000000 000f0000 00000003"
        )
        [reply] = replies(conn, transcript, 1)
        self.assertEqual(reply.cookie, cookie)
        self.assertEqual(dict(reply.extents), {7: (Extent(0x10000, 0), Extent(0xF0000, 3))})

    def test_block_status_two_contexts(self) -> None:
        """One chunk per selected context, in any order; both are needed."""
        contexts = [(1, "base:allocation"), (2, "qemu:dirty-bitmap:b")]
        conn = open_conn(contexts=contexts)
        cookie = conn.send_request(CMD_BLOCK_STATUS, 0, 8192)
        reply_bytes = chunk(0, BLOCK_STATUS, cookie, struct.pack(">III", 2, 8192, 1)) + chunk(
            DONE, BLOCK_STATUS, cookie, struct.pack(">III", 1, 4096, 3)
        )
        [reply] = replies(conn, reply_bytes)
        self.assertEqual(dict(reply.extents), {2: (Extent(8192, 1),), 1: (Extent(4096, 3),)})
        conn = open_conn(contexts=contexts)
        cookie = conn.send_request(CMD_BLOCK_STATUS, 0, 8192)
        with self.assertRaises(ProtocolViolation):
            replies(conn, chunk(DONE, BLOCK_STATUS, cookie, struct.pack(">III", 1, 4096, 3)))

    def test_error_chunks(self) -> None:
        """ERROR and ERROR_OFFSET carry the errno and the message to the reply."""
        conn = open_conn()
        cookie = conn.send_request(CMD_WRITE_ZEROES, 0, 4096)
        [reply] = replies(conn, chunk(DONE, ERROR, cookie, error_payload(ENOSPC, b"disk full")))
        assert reply.error is not None
        self.assertEqual((reply.error.errno, reply.error.message), (ENOSPC, "disk full"))
        cookie = conn.send_request(CMD_READ, 4096, 4096)
        transcript = (
            chunk(0, OFFSET_DATA, cookie, struct.pack(">Q", 4096) + bytes(512))
            + chunk(0, ERROR_OFFSET, cookie, error_payload(EIO, b"bad sector", 4608))
            + chunk(DONE, NONE, cookie)
        )
        [reply] = replies(conn, transcript)
        assert reply.error is not None
        self.assertEqual(reply.error.errno, EIO)
        self.assertEqual(reply.error.message, "bad sector (at offset 4608)")
        self.assertIsNone(reply.data)

    def test_unknown_error_type(self) -> None:
        """An error chunk of a type we do not know still fails the request."""
        conn = open_conn()
        cookie = conn.send_request(CMD_FLUSH, 0, 0)
        [reply] = replies(conn, chunk(DONE, 0x8123, cookie, error_payload(EIO)))
        assert reply.error is not None
        self.assertEqual(reply.error.errno, EIO)

    def test_interleaved_replies(self) -> None:
        """Chunks of different requests may interleave; replies complete independently."""
        conn = open_conn()
        a = conn.send_request(CMD_READ, 0, 8)
        b = conn.send_request(CMD_READ, 8, 8)
        transcript = (
            chunk(0, OFFSET_DATA, a, struct.pack(">Q", 0) + b"aaaa")
            + chunk(0, OFFSET_DATA, b, struct.pack(">Q", 8) + b"bbbbbbbb")
            + chunk(DONE, OFFSET_DATA, a, struct.pack(">Q", 4) + b"AAAA")
            + chunk(DONE, NONE, b)
        )
        got = replies(conn, transcript, 1)
        self.assertEqual([(r.cookie, r.data) for r in got], [(a, b"aaaaAAAA"), (b, b"bbbbbbbb")])


class ExtendedReplyTests(SynchronousTestCase):
    """Extended reply chunks (32-byte header >IHHQQQ, magic 0x6e8a278c)."""

    def test_golden_offset_data(self) -> None:
        """An extended OFFSET_DATA chunk, its header echoing the request's offset."""
        conn = open_conn(extended=True)
        cookie = conn.send_request(CMD_READ, 0x1_0000_0000, 4)
        transcript = (
            h(
                "6e8a278c 0001 0001 0000000000000001 0000000100000000 000000000000000c"
                "0000000100000000"
            )
            + b"data"
        )
        [reply] = replies(conn, transcript, 1)
        self.assertEqual((reply.cookie, reply.data), (cookie, b"data"))

    def test_golden_block_status_ext(self) -> None:
        """BLOCK_STATUS_EXT: u32 id, u32 count, then (u64 length, u64 status) descriptors."""
        conn = open_conn(extended=True, size=16 * GiB)
        cookie = conn.send_request(CMD_BLOCK_STATUS, 0, 12 * GiB)
        transcript = h(
            "6e8a278c 0001 0006 0000000000000001 0000000000000000 0000000000000028"
            "00000001 00000002"
            "0000000100000000 0000000000000000"
            "0000000200000000 0000000000000003"
        )
        [reply] = replies(conn, transcript, 1)
        self.assertEqual(reply.cookie, cookie)
        self.assertEqual(dict(reply.extents), {1: (Extent(4 * GiB, 0), Extent(8 * GiB, 3))})

    def test_golden_error(self) -> None:
        """An extended ERROR chunk."""
        conn = open_conn(extended=True)
        conn.send_request(CMD_TRIM, 4096, 4096)
        transcript = (
            h("6e8a278c 0001 8001 0000000000000001 0000000000001000 000000000000000800000001 0002")
            + b"ro"
        )
        [reply] = replies(conn, transcript)
        assert reply.error is not None
        self.assertEqual((reply.error.errno, reply.error.message), (EPERM, "ro"))

    def test_none(self) -> None:
        """An extended NONE chunk ends a successful payload-less request."""
        conn = open_conn(extended=True)
        cookie = conn.write_request(0, b"x")
        [reply] = replies(conn, chunk(DONE, NONE, cookie, offset=0))
        self.assertIsNone(reply.error)


class ViolationTests(SynchronousTestCase):
    """Replies that break the protocol raise ProtocolViolation and close the connection."""

    def assert_violation(self, conn: ClientConnection, data: bytes) -> None:
        with self.assertRaises(ProtocolViolation):
            events_of(conn, data)
        self.assertIs(conn.phase, Phase.CLOSED)

    def test_compact(self) -> None:
        """Each broken reply to a compact, structured connection is caught."""
        read = (CMD_READ, 4096, 4096, 0)
        cases: list[tuple[str, tuple[int, int, int, int], bytes]] = [
            ("unknown cookie", read, chunk(DONE, NONE, 99)),
            ("bad magic", read, struct.pack(">IIQ", 0x12345678, 0, 1)),
            ("extended magic without extended headers", read, chunk(DONE, NONE, 1, offset=4096)),
            ("simple reply to a structured READ", read, simple(0, 1)),
            ("NONE without DONE", read, chunk(0, NONE, 1)),
            ("NONE with payload", read, chunk(DONE, NONE, 1, b"x")),
            ("unknown chunk type", read, chunk(DONE, 3, 1, b"xxxx")),
            (
                "data before the range",
                read,
                chunk(DONE, OFFSET_DATA, 1, struct.pack(">Q", 0) + b"x"),
            ),
            (
                "data past the range",
                read,
                chunk(DONE, OFFSET_DATA, 1, struct.pack(">Q", 8190) + bytes(4)),
            ),
            ("data chunk too long", read, chunk(DONE, OFFSET_DATA, 1, bytes(8 + 4097))),
            ("empty data chunk", read, chunk(DONE, OFFSET_DATA, 1, struct.pack(">Q", 4096))),
            ("hole of size 0", read, chunk(DONE, OFFSET_HOLE, 1, struct.pack(">QI", 4096, 0))),
            ("hole chunk of 16 bytes", read, chunk(DONE, OFFSET_HOLE, 1, bytes(16))),
            (
                "overlapping chunks",
                read,
                chunk(0, OFFSET_HOLE, 1, struct.pack(">QI", 4096, 100))
                + chunk(DONE, OFFSET_HOLE, 1, struct.pack(">QI", 4195, 3997)),
            ),
            (
                "READ success not covering the range",
                read,
                chunk(DONE, OFFSET_HOLE, 1, struct.pack(">QI", 4096, 4095)),
            ),
            (
                "two content chunks for a DF read",
                (CMD_READ, 4096, 4096, FLAG_DF),
                chunk(0, OFFSET_HOLE, 1, struct.pack(">QI", 4096, 100))
                + chunk(DONE, OFFSET_HOLE, 1, struct.pack(">QI", 4196, 3996)),
            ),
            (
                "content after an error at the same offset",
                read,
                chunk(0, ERROR_OFFSET, 1, error_payload(EIO, b"", 4096))
                + chunk(DONE, OFFSET_HOLE, 1, struct.pack(">QI", 4096, 4096)),
            ),
            ("error 0", read, chunk(DONE, ERROR, 1, error_payload(0))),
            (
                "error message too long",
                read,
                chunk(DONE, ERROR, 1, struct.pack(">IH", 5, 10) + b"x"),
            ),
            ("error chunk too short", read, chunk(DONE, ERROR, 1, b"\x00\x00\x00\x05")),
            (
                "ERROR_OFFSET outside the range",
                read,
                chunk(DONE, ERROR_OFFSET, 1, error_payload(EIO, b"", 0)),
            ),
            (
                "status chunk for a READ",
                read,
                chunk(DONE, BLOCK_STATUS, 1, struct.pack(">III", 1, 1, 0)),
            ),
            (
                "unknown context id",
                (CMD_BLOCK_STATUS, 0, 4096, 0),
                chunk(DONE, BLOCK_STATUS, 1, struct.pack(">III", 9, 4096, 0)),
            ),
            (
                "two chunks for one context",
                (CMD_BLOCK_STATUS, 0, 4096, 0),
                chunk(0, BLOCK_STATUS, 1, struct.pack(">III", 1, 4096, 0))
                + chunk(DONE, BLOCK_STATUS, 1, struct.pack(">III", 1, 4096, 0)),
            ),
            (
                "zero-length descriptor",
                (CMD_BLOCK_STATUS, 0, 4096, 0),
                chunk(DONE, BLOCK_STATUS, 1, struct.pack(">III", 1, 0, 0)),
            ),
            (
                "descriptors past the request",
                (CMD_BLOCK_STATUS, 0, 4096, 0),
                chunk(DONE, BLOCK_STATUS, 1, struct.pack(">IIIII", 1, 4096, 0, 4096, 3)),
            ),
            (
                "REQ_ONE with two descriptors",
                (CMD_BLOCK_STATUS, 0, 8192, FLAG_REQ_ONE),
                chunk(DONE, BLOCK_STATUS, 1, struct.pack(">IIIII", 1, 4096, 0, 4096, 3)),
            ),
            (
                "REQ_ONE descriptor longer than the request",
                (CMD_BLOCK_STATUS, 0, 4096, FLAG_REQ_ONE),
                chunk(DONE, BLOCK_STATUS, 1, struct.pack(">III", 1, 8192, 0)),
            ),
            (
                "status chunk of bad length",
                (CMD_BLOCK_STATUS, 0, 4096, 0),
                chunk(DONE, BLOCK_STATUS, 1, bytes(10)),
            ),
            (
                "BLOCK_STATUS_EXT without extended headers",
                (CMD_BLOCK_STATUS, 0, 4096, 0),
                chunk(DONE, BLOCK_STATUS_EXT, 1, struct.pack(">IIQQ", 1, 1, 4096, 0)),
            ),
            (
                "BLOCK_STATUS success without chunks",
                (CMD_BLOCK_STATUS, 0, 4096, 0),
                chunk(DONE, NONE, 1),
            ),
            (
                "a chunk after DONE",
                (CMD_FLUSH, 0, 0, 0),
                chunk(DONE, NONE, 1) + chunk(DONE, NONE, 1),
            ),
            (
                "simple reply after a chunk",
                (CMD_FLUSH, 0, 0, 0),
                chunk(0, ERROR, 1, error_payload(EIO)) + simple(0, 1),
            ),
        ]
        for name, request, data in cases:
            conn = open_conn()
            conn.send_request(*request)
            with self.assertRaises(ProtocolViolation, msg=name):
                events_of(conn, data)
            self.assertIs(conn.phase, Phase.CLOSED, name)

    def test_extended(self) -> None:
        """Each broken reply to an extended-header connection is caught."""
        cases = [
            ("simple reply", simple(0, 1)),
            ("compact chunk", chunk(DONE, NONE, 1)),
            ("offset not the request's", chunk(DONE, NONE, 1, offset=0)),
            (
                "compact BLOCK_STATUS",
                chunk(DONE, BLOCK_STATUS, 1, struct.pack(">III", 1, 4096, 0), offset=4096),
            ),
            (
                "descriptor count mismatch",
                chunk(DONE, BLOCK_STATUS_EXT, 1, struct.pack(">IIQQ", 1, 2, 4096, 0), offset=4096),
            ),
        ]
        for name, data in cases:
            conn = open_conn(extended=True)
            conn.send_request(CMD_BLOCK_STATUS, 4096, 4096)
            with self.assertRaises(ProtocolViolation, msg=name):
                events_of(conn, data)

    def test_simple_without_structured(self) -> None:
        """Chunks need structured replies to have been negotiated."""
        conn = open_conn(structured=False)
        conn.send_request(CMD_FLUSH, 0, 0)
        self.assert_violation(conn, chunk(DONE, NONE, 1))


# ---------------------------------------------------------------- the Twisted protocol


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps each writeSequence call's items."""

    def __init__(self) -> None:
        super().__init__()
        self.sequences: list[list[bytes]] = []
        self.aborted = False

    def writeSequence(self, data: Any) -> None:
        self.sequences.append(list(data))
        super().writeSequence(data)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def protocol_pair(
    structured: bool = True, extended: bool = False, **kwargs: Any
) -> tuple[NBDClientProtocol, RecordingTransport, NBDClient]:
    """A client protocol on a RecordingTransport, past the handshake."""
    conn = ClientConnection(ClientConfiguration(structured_replies=structured))
    proto = NBDClientProtocol(conn)
    transport = RecordingTransport()
    proto.makeConnection(transport)
    proto.dataReceived(handshake_transcript(structured, extended, **kwargs))
    info = proto.handshake
    assert info.called
    transport.clear()
    transport.sequences.clear()
    return proto, transport, NBDClient(proto, conn)


class ProtocolTests(SynchronousTestCase):
    """NBDClientProtocol and NBDClient on a StringTransport."""

    def test_handshake(self) -> None:
        """The handshake Deferred fires with the ExportInfo; NBDClient exposes it."""
        proto, _, client = protocol_pair(extended=True)
        info = self.successResultOf(proto.handshake)
        self.assertEqual(info.size, SIZE)
        self.assertEqual(client.size, SIZE)
        self.assertEqual(client.block_size, (1, 4096, 32 * MiB))
        self.assertTrue(client.extended_headers and client.structured_replies)
        self.assertEqual(dict(client.meta_contexts), {"base:allocation": 1})
        for name in (
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_df",
        ):
            self.assertTrue(getattr(client, name), name)
        self.assertFalse(client.read_only)
        self.assertFalse(client.can_multi_conn)

    def test_handshake_refused(self) -> None:
        """GO refused: ABORT goes out; the handshake fails with the refusal once closed."""
        proto = NBDClientProtocol(
            ClientConnection(ClientConfiguration("x", structured_replies=False))
        )
        transport = RecordingTransport()
        proto.makeConnection(transport)
        proto.dataReceived(greeting() + opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"unknown"))
        self.assertTrue(transport.value().endswith(h("49484156454f5054 00000002 00000000")))
        self.assertNoResult(proto.handshake)
        proto.dataReceived(opt_reply(OPT_ABORT, REP_ACK))
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(proto.handshake, NBDHandshakeError)
        self.assertEqual(failure.value.reply, REP_ERR_UNKNOWN)

    def test_handshake_lost(self) -> None:
        """A server that hangs up during the handshake fails it with ConnectionLost."""
        proto = NBDClientProtocol(ClientConnection())
        proto.makeConnection(RecordingTransport())
        proto.dataReceived(greeting())
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(proto.handshake, ConnectionLost)

    def test_handshake_cancel(self) -> None:
        """Cancelling the handshake drops the connection."""
        proto = NBDClientProtocol(ClientConnection())
        transport = RecordingTransport()
        proto.makeConnection(transport)
        proto.handshake.cancel()
        self.assertTrue(transport.aborted)
        self.failureResultOf(proto.handshake, CancelledError)

    def test_requests_and_replies(self) -> None:
        """Many requests in flight; replies in any order fire the right Deferreds."""
        proto, transport, client = protocol_pair()
        reads = [client.read(i * 4096, 4) for i in range(5)]
        write = client.write(0, b"data")
        flush = client.flush()
        status = client.block_status(0, 8192)
        self.assertEqual(client.in_flight, 8)
        for d in (*reads, write, flush, status):
            self.assertNoResult(d)
        proto.dataReceived(chunk(DONE, NONE, 7))  # the flush
        self.successResultOf(flush)
        proto.dataReceived(
            b"".join(
                chunk(DONE, OFFSET_DATA, 5 - i, struct.pack(">Q", (4 - i) * 4096) + b"%04d" % i)
                for i in range(5)
            )
        )
        self.assertEqual(
            [self.successResultOf(d) for d in reads], [b"0004", b"0003", b"0002", b"0001", b"0000"]
        )
        proto.dataReceived(chunk(DONE, BLOCK_STATUS, 8, struct.pack(">III", 1, 8192, 3)))
        self.assertEqual(
            self.successResultOf(status),
            {"base:allocation": [Extent(8192, STATE_HOLE | STATE_ZERO)]},
        )
        proto.dataReceived(chunk(DONE, ERROR, 6, error_payload(EPERM, b"read-only")))
        error = self.failureResultOf(write, NBDError).value
        self.assertEqual((error.errno, error.message), (EPERM, "read-only"))
        self.assertEqual(client.in_flight, 0)

    def test_write_uses_write_sequence(self) -> None:
        """A WRITE goes out as one writeSequence of header and the payload object itself."""
        proto, transport, client = protocol_pair()
        payload = os.urandom(1 << 20)
        client.write(0, payload, fua=True)
        [sequence] = transport.sequences
        self.assertEqual(len(sequence), 2)
        self.assertEqual(len(sequence[0]), 28)
        self.assertIs(sequence[1], payload)

    def test_request_unchecked(self) -> None:
        """request() sends what the polite methods refuse, with any flags."""
        proto, transport, client = protocol_pair(tx=READ_ONLY_TX)
        self.failureResultOf(client.write(0, b"x"), ValueError)
        self.failureResultOf(client.read(SIZE, 1), ValueError)
        self.assertEqual(transport.value(), b"")
        d = client.request(CMD_WRITE, SIZE, 1, flags=0x8000, payload=b"x")
        self.assertEqual(
            transport.value(), struct.pack(">IHHQQI", 0x25609513, 0x8000, 1, 1, SIZE, 1) + b"x"
        )
        proto.dataReceived(chunk(DONE, ERROR, 1, error_payload(EPERM)))
        self.assertEqual(self.failureResultOf(d, NBDError).value.errno, EPERM)

    def test_zero_length(self) -> None:
        """Zero-length reads and writes are answered without a request."""
        proto, transport, client = protocol_pair()
        self.assertEqual(self.successResultOf(client.read(0, 0)), b"")
        self.assertIsNone(self.successResultOf(client.write(0, b"")))
        self.assertIsNone(self.successResultOf(client.trim(0, 0)))
        self.failureResultOf(client.block_status(0, 0), ValueError)
        self.assertEqual(transport.value(), b"")

    def test_flags(self) -> None:
        """The keyword arguments become the command flags."""
        proto, transport, client = protocol_pair()
        client.zero(0, 4096, fua=True, no_hole=True, fast=True)
        client.read(0, 4096, df=True)
        client.trim(0, 4096, fua=True)
        client.block_status(0, 4096, req_one=True)
        client.cache(0, 4096)
        data = transport.value()
        heads = [struct.unpack(">IHHQQI", data[i : i + 28]) for i in range(0, len(data), 28)]
        self.assertEqual(
            [(flags, cmd) for _, flags, cmd, *_ in heads],
            [(0x13, 6), (0x4, 0), (0x1, 4), (0x8, 7), (0, 5)],
        )

    def test_block_status_long_compact(self) -> None:
        """Without extended headers, a BLOCK_STATUS over 4 GiB asks for less (a hint)."""
        proto, transport, client = protocol_pair(size=16 * GiB)
        client.block_status(0, 16 * GiB)
        self.assertEqual(struct.unpack(">IHHQQI", transport.value())[-1], 0xFFFFFFFF)

    def test_connection_lost(self) -> None:
        """Losing the connection fails every pending request with ConnectionLost."""
        proto, transport, client = protocol_pair()
        pending = [client.read(0, 512), client.flush(), client.block_status(0, 512)]
        proto.connectionLost(Failure(ConnectionDone("bye")))
        for d in pending:
            failure = self.failureResultOf(d, ConnectionLost)
            self.assertIn("lost", str(failure.value))
        self.failureResultOf(client.flush(), ConnectionLost)
        self.successResultOf(client.disconnect())

    def test_violation(self) -> None:
        """A protocol violation drops the connection and fails every pending request with it."""
        proto, transport, client = protocol_pair()
        pending = [client.read(0, 512), client.flush()]
        proto.dataReceived(chunk(DONE, NONE, 99))
        self.assertTrue(transport.aborted)
        proto.connectionLost(Failure(ConnectionLost()))
        for d in pending:
            self.failureResultOf(d, ProtocolViolation)
        self.failureResultOf(client.flush(), ProtocolViolation)

    def test_disconnect_waits(self) -> None:
        """disconnect() sends DISC only after replies to what is in flight, then closes."""
        proto, transport, client = protocol_pair()
        flush = client.flush()
        transport.clear()
        done = client.disconnect()
        self.failureResultOf(client.flush(), ConnectionDone)
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(chunk(DONE, NONE, 1))
        self.successResultOf(flush)
        self.assertEqual(transport.value(), struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(done)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(done))

    def test_raw_disc(self) -> None:
        """
        request(DISC) goes out at once with requests in flight, which still
        get their replies; it fires when the server closes the connection.
        """
        proto, transport, client = protocol_pair()
        flush = client.flush()
        transport.clear()
        disc = client.request(CMD_DISC, 0, 0)
        self.assertEqual(transport.value(), struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))
        self.assertFalse(transport.disconnecting)
        self.failureResultOf(client.flush(), ConnectionDone)
        proto.dataReceived(chunk(DONE, NONE, 1))
        self.successResultOf(flush)
        self.assertNoResult(disc)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(disc).command, CMD_DISC)

    def test_eshutdown_disconnects(self) -> None:
        """ESHUTDOWN from the server starts a soft disconnect (section 2.8)."""
        proto, transport, client = protocol_pair()
        d = client.flush()
        transport.clear()
        proto.dataReceived(chunk(DONE, ERROR, 1, error_payload(ESHUTDOWN)))
        self.failureResultOf(d, NBDError)
        self.assertEqual(transport.value(), struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))
        self.assertTrue(transport.disconnecting)

    def test_cancelled_request(self) -> None:
        """A cancelled request's late reply is dropped quietly."""
        proto, transport, client = protocol_pair()
        d = client.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        proto.dataReceived(chunk(DONE, NONE, 1))
        self.assertEqual(client.in_flight, 0)


# ---------------------------------------------------------------- integration


def memory_device(size: int, caps: Capabilities | None = None) -> Any:
    if MemoryBlockDevice is None:  # pragma: no cover
        raise NotImplementedError("twisted_nbd.backends.memory is missing")
    return MemoryBlockDevice(size, caps)


class _TrackingFactory(NBDServerFactory):
    """Our server factory, remembering when each connection has closed."""

    def __init__(self, registry: ExportRegistry) -> None:
        super().__init__(registry)
        self.closed: list[Deferred[None]] = []

    def buildProtocol(self, addr: object) -> NBDServerProtocol | None:
        proto = super().buildProtocol(addr)
        if proto is None:
            return None
        done: Deferred[None] = Deferred()
        self.closed.append(done)
        lost = proto.connectionLost

        def connectionLost(reason: Failure = connectionDone) -> None:
            lost(reason)
            done.callback(None)

        proto.connectionLost = connectionLost  # type: ignore[method-assign]
        return proto


class IntegrationTests(TestCase):
    """The client against our own server, in-process over loopback TCP."""

    timeout = 60

    async def serve(self, *exports: Export) -> str:
        """Listen on 127.0.0.1 with C{exports}; the client endpoint string."""
        factory = _TrackingFactory(ExportRegistry.of(exports))
        port: IListeningPort = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            factory
        )

        async def stop() -> None:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
            await DeferredList(factory.closed)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return f"tcp:127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]

    async def exercise(self, client: NBDClient) -> None:
        """Concurrent writes, reads, flush, trim, zero, cache and block_status."""
        blocks = {i: bytes([i]) * 4096 + os.urandom(60 * 1024) for i in range(1, 65)}
        offset = {i: i * 128 * 1024 for i in blocks}
        await gatherResults([client.write(offset[i], data) for i, data in blocks.items()])
        self.assertEqual(client.in_flight, 0)
        reads = await gatherResults([client.read(offset[i], len(blocks[i])) for i in blocks])
        self.assertEqual(reads, list(blocks.values()))
        mixed: list[Deferred[Any]] = [
            client.read(offset[4], len(blocks[4])),
            client.write(0, b"w" * 512, fua=True),
            client.flush(),
            client.zero(offset[2], 64 * 1024),
            client.trim(offset[3], 64 * 1024),
            client.cache(0, 1 * MiB),
            client.block_status(0, client.size),
            client.read(offset[1], 4096, df=True),
        ]
        results = await gatherResults(mixed)
        self.assertEqual(results[0], blocks[4])
        self.assertEqual(results[7], bytes([1]) * 4096)
        self.assertEqual(await client.read(offset[2], 64 * 1024), bytes(64 * 1024))
        self.assertEqual(await client.read(0, 512), b"w" * 512)
        status = await client.block_status(0, client.size)
        extents = status["base:allocation"]
        self.assertEqual(sum(e.length for e in extents), client.size)
        # The tail of the device was never written: a hole that reads as zeroes.
        self.assertEqual(extents[-1].flags, STATE_HOLE | STATE_ZERO)
        [one] = (await client.block_status(0, 4096, req_one=True))["base:allocation"]
        self.assertLessEqual(one.length, 4096)

    async def test_compact_structured(self) -> None:
        """Structured replies without extended headers."""
        endpoint = await self.serve(Export("", memory_device(SIZE), "a RAM disk"))
        client = await connect(reactor, endpoint, extended_headers=False)
        self.assertTrue(client.structured_replies)
        self.assertFalse(client.extended_headers)
        self.assertEqual(client.description, "a RAM disk")
        self.assertEqual(dict(client.meta_contexts), {"base:allocation": 1})
        await self.exercise(client)
        await client.disconnect()

    async def test_extended_headers(self) -> None:
        """Extended headers, the default: everything above, over 32-byte headers."""
        endpoint = await self.serve(Export("", memory_device(SIZE)))
        client = await connect(reactor, endpoint)
        self.assertTrue(client.extended_headers)
        await self.exercise(client)
        await client.disconnect()

    async def test_simple_replies(self) -> None:
        """structured_replies=False: simple replies, no meta contexts, no DF."""
        endpoint = await self.serve(Export("", memory_device(SIZE)))
        client = await connect(reactor, endpoint, structured_replies=False)
        self.assertFalse(client.structured_replies or client.extended_headers)
        self.assertFalse(client.can_df)
        await client.write(4096, b"abc")
        results = await gatherResults([client.read(4096 + i, 1) for i in range(3)])
        self.assertEqual(results, [b"a", b"b", b"c"])
        await failure_of(client.block_status(0, 4096), ValueError)
        await client.disconnect()

    async def test_64_bit_lengths(self) -> None:
        """
        With extended headers: READ past 4 GiB, TRIM and BLOCK_STATUS of more
        than 4 GiB in one request, answered by BLOCK_STATUS_EXT with a 64-bit
        extent.
        """
        size = 12 * GiB
        endpoint = await self.serve(Export("", memory_device(size)))
        client = await connect(reactor, endpoint)
        self.assertTrue(client.extended_headers)
        far = 5 * GiB + 4096
        await client.write(far, b"far away")
        self.assertEqual(await client.read(far, 8), b"far away")
        status = (await client.block_status(6 * GiB, 6 * GiB))["base:allocation"]
        self.assertEqual(status, [Extent(6 * GiB, STATE_HOLE | STATE_ZERO)])
        await client.trim(0, 5 * GiB)
        await client.zero(6 * GiB, 5 * GiB)
        await client.disconnect()

    async def test_64_bit_lengths_need_extended_headers(self) -> None:
        """Without extended headers, a 5 GiB TRIM cannot be encoded: ValueError, nothing sent."""
        endpoint = await self.serve(Export("", memory_device(8 * GiB)))
        client = await connect(reactor, endpoint, extended_headers=False)
        await failure_of(client.trim(0, 5 * GiB), ValueError)
        status = (await client.block_status(0, 8 * GiB))["base:allocation"]
        self.assertLess(status[0].length, 1 << 32)
        await client.disconnect()

    async def test_errors_carry_errno(self) -> None:
        """The server's errno comes back in NBDError: EINVAL, ENOSPC, EPERM."""
        endpoint = await self.serve(
            Export("rw", memory_device(SIZE)),
            Export("ro", memory_device(SIZE), read_only=True),
        )
        for extended in (False, True):
            client = await connect(reactor, endpoint, "rw", extended_headers=extended)
            await failure_of(client.read(SIZE, 4096), ValueError)
            error = await failure_of(client.request(CMD_READ, SIZE, 4096), NBDError)
            self.assertEqual(error.errno, EINVAL)
            self.assertIn("beyond", error.message)
            flags = FLAG_PAYLOAD_LEN if extended else 0
            error = await failure_of(client.request(CMD_WRITE, SIZE - 1, 2, flags, b"xx"), NBDError)
            self.assertEqual(error.errno, ENOSPC)
            error = await failure_of(client.request(CMD_FLUSH, 0, 0, 0x4000), NBDError)
            self.assertEqual(error.errno, EINVAL)
            error = await failure_of(client.request(200, 0, 0), NBDError)
            self.assertEqual(error.errno, EINVAL)
            # The connection is still fine afterwards.
            self.assertEqual(await client.read(0, 4), bytes(4))
            await client.disconnect()

            ro = await connect(reactor, endpoint, "ro", extended_headers=extended)
            self.assertTrue(ro.read_only)
            self.assertFalse(ro.can_trim or ro.can_zero or ro.can_fua)
            await failure_of(ro.write(0, b"x"), ValueError)
            error = await failure_of(ro.request(CMD_WRITE, 0, 1, flags, b"x"), NBDError)
            self.assertEqual(error.errno, EPERM)
            await ro.disconnect()

    async def test_unknown_export(self) -> None:
        """An unknown export fails connect() with NBDHandshakeError (ERR_UNKNOWN)."""
        endpoint = await self.serve(Export("disk", memory_device(SIZE)))
        error = await failure_of(connect(reactor, endpoint, "nope"), NBDHandshakeError)
        self.assertEqual(error.reply, REP_ERR_UNKNOWN)

    async def test_list_exports(self) -> None:
        """list_exports returns every export's name and description."""
        endpoint = await self.serve(
            Export("a", memory_device(4096), "first"), Export("b", memory_device(4096))
        )
        exports = await list_exports(reactor, endpoint)
        self.assertEqual(sorted(exports), [("a", "first"), ("b", "")])

    async def test_endpoint_object(self) -> None:
        """connect() takes an endpoint object as well as a string."""
        endpoint = await self.serve(Export("", memory_device(SIZE)))
        port = int(endpoint.rsplit(":", 1)[1])
        client = await connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        self.assertEqual(client.size, SIZE)
        await client.disconnect()

    async def test_min_block(self) -> None:
        """The client honours the server's minimum block size."""
        caps = Capabilities(can_extents=True, min_block=4096)
        endpoint = await self.serve(Export("", memory_device(SIZE, caps)))
        client = await connect(reactor, endpoint)
        self.assertEqual(client.block_size.minimum, 4096)
        await failure_of(client.read(512, 512), ValueError)
        error = await failure_of(client.request(CMD_READ, 512, 512), NBDError)
        self.assertEqual(error.errno, EINVAL)
        await client.disconnect()

    async def test_disc_completes_in_flight(self) -> None:
        """
        C-06: after NBD_CMD_DISC the server still answers every request sent
        before it, then closes.
        """
        endpoint = await self.serve(Export("", memory_device(SIZE)))
        for extended in (False, True):
            client = await connect(reactor, endpoint, extended_headers=extended)
            writes = [client.write(i * 4096, b"%04d" % i) for i in range(200)]
            reads = [client.read(i * 4096, 4) for i in range(200, 400)]
            disc = client.request(CMD_DISC, 0, 0)
            await gatherResults(writes)
            self.assertEqual(await gatherResults(reads), [bytes(4)] * 200)
            await disc

    async def test_connect_cancelled(self) -> None:
        """Cancelling connect() during the handshake (a silent server) drops the connection."""
        made: Deferred[None] = Deferred()
        lost: Deferred[None] = Deferred()

        class Silent(Protocol):
            def connectionMade(self) -> None:
                made.callback(None)

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                lost.callback(None)

        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(Silent)
        )
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        d = connect(reactor, endpoint)
        await made
        # One more turn of the reactor: the client side is connected too, and
        # connect() is waiting for the greeting.
        await deferLater(reactor, 0, lambda: None)
        self.assertNoResult(d)
        d.cancel()
        await failure_of(d, CancelledError)
        await lost

    async def test_many_in_flight(self) -> None:
        """A thousand requests in flight at once, beyond the server's queue depth."""
        endpoint = await self.serve(Export("", memory_device(SIZE)))
        client = await connect(reactor, endpoint)
        writes = [client.write(i * 512, i.to_bytes(4, "big") * 128) for i in range(1000)]
        self.assertEqual(client.in_flight, 1000)
        reads = [client.read(i * 512, 4) for i in range(1000)]
        await gatherResults(writes)
        self.assertEqual(await gatherResults(reads), [i.to_bytes(4, "big") for i in range(1000)])
        await client.disconnect()


class ExampleTests(SynchronousTestCase):
    """docs/examples/client_example.py runs and prints what it says."""

    def test_example(self) -> None:
        script = REPO / "docs" / "examples" / "client_example.py"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertIn("read back: b'Hello, NBD!'", lines)
        self.assertIn("extended headers: True", lines)
        self.assertTrue(any(line.startswith("base:allocation: ") for line in lines), lines)
        self.assertEqual(lines[-1], "disconnected")
