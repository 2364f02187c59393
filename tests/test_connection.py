# -*- test-case-name: tests.test_connection -*-
"""
Tests for L{twisted_nbd._connection}: the protocol rules, without I/O.

Every transcript is fed whole and in every chunk size from one byte up, and
must give the same events and the same bytes out each time.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests import builders as b
from twisted_nbd import _wire as w
from twisted_nbd._connection import (
    NEED_DATA,
    Aborted,
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    ExportChosen,
    FlushRequest,
    OptionRejected,
    Phase,
    ReadRequest,
    RequestRejected,
    ServerConnection,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
    plan_sparse_read,
)
from twisted_nbd._wire import Cmd, CmdFlags, Errno, Opt, Rep, TxFlags
from twisted_nbd.errors import ProtocolViolation
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import Capabilities, Extent
from twisted_nbd.testing import ControllableBlockDevice

SIZE = 1 << 20
GREETING = struct.pack(">QQH", w.NBDMAGIC, w.IHAVEOPT, 3)
VIOLATION = "protocol violation"


def registry(
    size: int = SIZE, read_only: bool = False, caps: Capabilities | None = None
) -> ExportRegistry:
    """Two exports: the default "disk" and "other"."""
    return ExportRegistry.of(
        [
            Export("disk", ControllableBlockDevice(size, caps), "the disk", read_only),
            Export("other", ControllableBlockDevice(4096), ""),
        ],
        default_name="disk",
    )


def new_connection(reg: ExportRegistry | None = None) -> ServerConnection:
    reg = reg or registry()
    return ServerConnection(reg)


def run(reg: ExportRegistry | None, data: bytes, chunk: int) -> tuple[list[Any], bytes]:
    """Feed C{data} in chunks of C{chunk} bytes; return the events and output."""
    conn = new_connection(reg)
    events: list[Any] = []
    out = b"".join(conn.data_to_send())
    for pos in range(0, max(len(data), 1), chunk):
        conn.receive_data(data[pos : pos + chunk])
        while True:
            try:
                event = conn.next_event()
            except ProtocolViolation:
                events.append(VIOLATION)
                event = NEED_DATA
            out += b"".join(conn.data_to_send())
            if event is NEED_DATA:
                break
            events.append(event)
        if events and events[-1] == VIOLATION:
            break
    return events, out


class TranscriptMixin:
    """Runs a transcript at every chunk size and checks they all agree."""

    def transcript(self, data: bytes, reg: ExportRegistry | None = None) -> tuple[list[Any], bytes]:
        reg = reg or registry()
        whole = run(reg, data, max(len(data), 1))
        sizes = list(range(1, min(len(data), 64) + 1))
        if len(data) > 64:
            sizes += [100, 1000, 4096]
        for size in sizes:
            got = run(reg, data, size)
            assert got == whole, f"chunk size {size} differs:\n{got}\nvs\n{whole}"
        return whole


HANDSHAKE = b.client_flags(3) + b.go("")


def after_go(out: bytes, no_zeroes: bool = True) -> bytes:
    """The output after the greeting and a GO's replies (INFO x2, ACK)."""
    assert out.startswith(GREETING)
    rest = out[len(GREETING) :]
    pos = 0
    while True:
        _, opt, rep, length = struct.unpack_from(">QIII", rest, pos)
        pos += 20 + length
        if rep == Rep.ACK and opt in (Opt.GO, Opt.EXPORT_NAME):
            return rest[pos:]


class HandshakeTests(TranscriptMixin, SynchronousTestCase):
    """Option haggling (H- rules)."""

    def test_greeting_H01(self) -> None:
        """H-01: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES and nothing else."""
        conn = new_connection()
        self.assertEqual(b"".join(conn.data_to_send()), GREETING)
        self.assertIs(conn.next_event(), NEED_DATA)

    def test_unknown_client_flags_H02(self) -> None:
        """H-02: a client flag we did not offer closes the connection."""
        events, out = self.transcript(b.client_flags(4))
        self.assertEqual(events, [VIOLATION])
        self.assertEqual(out, GREETING)

    def test_garbage_after_greeting_H02(self) -> None:
        """H-02: text sent instead of client flags is refused at once."""
        events, _ = self.transcript(b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(events, [VIOLATION])

    def test_bad_option_magic_H03(self) -> None:
        """H-03: an option without IHAVEOPT closes the connection."""
        events, _ = self.transcript(b.client_flags() + b.option(Opt.LIST, magic=12345))
        self.assertEqual(events, [VIOLATION])

    def test_unknown_option_H04(self) -> None:
        """H-04: unknown options get ERR_UNSUP echoing the number; data skipped."""
        data = b.client_flags() + b.option(0x7654321, b"abcd") + b.option(Opt.PEEK_EXPORT)
        data += b.go("")
        events, out = self.transcript(data)
        self.assertEqual([type(e) for e in events], [OptionRejected, OptionRejected, ExportChosen])
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertEqual(replies[0][:2], (0x7654321, Rep.ERR_UNSUP))
        self.assertEqual(replies[1][:2], (Opt.PEEK_EXPORT, Rep.ERR_UNSUP))
        self.assertEqual(replies[-1], (Opt.GO, Rep.ACK, b""))

    def test_replies_echo_option_H05(self) -> None:
        """H-05: every reply carries the reply magic and the option number."""
        events, out = self.transcript(b.client_flags() + b.go("", (w.Info.NAME,)))
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertTrue(all(opt == Opt.GO for opt, _, _ in replies))
        self.assertEqual([rep for _, rep, _ in replies].count(Rep.ACK), 1)
        self.assertEqual(replies[-1][1], Rep.ACK)

    def test_oversized_option_is_drained_H06(self) -> None:
        """H-06: option data over the cap is refused and never buffered."""
        conn = new_connection()
        conn.data_to_send()
        conn.receive_data(b.client_flags() + struct.pack(">QII", w.IHAVEOPT, Opt.GO, 1 << 30))
        event = conn.next_event()
        self.assertIsInstance(event, OptionRejected)
        assert isinstance(event, OptionRejected)
        self.assertEqual(event.reply, Rep.ERR_TOO_BIG)
        for _ in range(100):
            conn.receive_data(bytes(65536))
            self.assertIs(conn.next_event(), NEED_DATA)
            self.assertEqual(len(conn._buffer), 0)
        conn.receive_data(bytes((1 << 30) - 100 * 65536) + b.go(""))
        self.assertIsInstance(conn.next_event(), ExportChosen)

    def test_data_on_dataless_options_H07(self) -> None:
        """H-07: LIST, STRUCTURED_REPLY and STARTTLS with data get ERR_INVALID."""
        data = b.client_flags()
        for opt in (Opt.LIST, Opt.STRUCTURED_REPLY, Opt.STARTTLS):
            data += b.option(opt, b"xx")
        events, out = self.transcript(data)
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertEqual([r[1] for r in replies], [Rep.ERR_INVALID] * 3)
        self.assertEqual(len(events), 3)

    def test_abort_H08(self) -> None:
        """H-08: ABORT (even with data) gets ACK; anything after it is ignored."""
        data = b.client_flags() + b.option(Opt.ABORT, b"junk") + b.go("")
        events, out = self.transcript(data)
        self.assertEqual(events, [Aborted()])
        self.assertEqual(b.parse_option_replies(out[len(GREETING) :]), [(Opt.ABORT, Rep.ACK, b"")])

    def test_export_name_unknown_H09(self) -> None:
        """H-09: EXPORT_NAME of an unknown export can only close the connection."""
        events, out = self.transcript(b.client_flags() + b.option(Opt.EXPORT_NAME, b"nosuch"))
        self.assertEqual(events, [VIOLATION])
        self.assertEqual(out, GREETING)

    def test_export_name_zeroes_H10(self) -> None:
        """H-10: size, flags, then 124 zeroes unless both sides agreed NO_ZEROES."""
        for flags, padding in ((1, 124), (3, 0)):
            events, out = self.transcript(
                b.client_flags(flags) + b.option(Opt.EXPORT_NAME, b"disk")
            )
            self.assertIsInstance(events[0], ExportChosen)
            reply = out[len(GREETING) :]
            self.assertEqual(len(reply), 10 + padding)
            size, tx = struct.unpack(">QH", reply[:10])
            self.assertEqual(size, SIZE)
            self.assertTrue(tx & TxFlags.HAS_FLAGS)
            self.assertEqual(reply[10:], bytes(padding))

    def test_export_name_default(self) -> None:
        """The empty name selects the default export."""
        events, _ = self.transcript(b.client_flags(1) + b.option(Opt.EXPORT_NAME, b""))
        self.assertEqual(events[0].export.name, "disk")

    def test_non_fixed_newstyle_allows_only_export_name(self) -> None:
        """Without C_FIXED_NEWSTYLE, any option but EXPORT_NAME closes (no replies possible)."""
        events, _ = self.transcript(b.client_flags(0) + b.go(""))
        self.assertEqual(events, [VIOLATION])

    def test_go_bad_lengths_H11(self) -> None:
        """H-11/H-18: GO whose lengths don't add up gets ERR_INVALID; haggling goes on
        (a bad option is answered, never a reason to hang up)."""
        bad = [
            struct.pack(">I", 100) + b"disk",  # name runs past the end
            b.info_data("disk") + b"extra",  # trailing bytes
            b.info_data("disk", (1, 2))[:-2],  # one info request missing
            b"\x00\x00",  # too short for the name length
        ]
        for data in bad:
            events, out = self.transcript(b.client_flags() + b.option(Opt.GO, data) + b.go())
            replies = b.parse_option_replies(out[len(GREETING) :])
            self.assertEqual(replies[0][1], Rep.ERR_INVALID, data)
            self.assertIsInstance(events[-1], ExportChosen)

    def test_go_success_H12(self) -> None:
        """H-12: NBD_INFO_EXPORT before ACK; unknown info types ignored; no padding."""
        events, out = self.transcript(b.client_flags() + b.go("disk", (999, w.Info.DESCRIPTION)))
        replies = b.parse_option_replies(out[len(GREETING) :])
        infos = {struct.unpack(">H", r[2][:2])[0]: r[2] for r in replies if r[1] == Rep.INFO}
        self.assertEqual(len(infos[w.Info.EXPORT]), 12)
        self.assertEqual(struct.unpack(">Q", infos[w.Info.EXPORT][2:10])[0], SIZE)
        self.assertEqual(infos[w.Info.DESCRIPTION][2:], b"the disk")
        self.assertEqual(struct.unpack(">III", infos[w.Info.BLOCK_SIZE][2:]), (1, 4096, 32 << 20))
        self.assertNotIn(999, infos)
        self.assertEqual(replies[-1], (Opt.GO, Rep.ACK, b""))
        self.assertEqual(after_go(out), b"")
        self.assertIsInstance(events[-1], ExportChosen)

    def test_go_unknown_export_H13(self) -> None:
        """H-13: ERR_UNKNOWN with a message and no INFO first; the connection stays usable."""
        events, out = self.transcript(b.client_flags() + b.go("nosuch") + b.go("other"))
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertEqual(replies[0][1], Rep.ERR_UNKNOWN)
        self.assertIn(b"nosuch", replies[0][2])
        self.assertEqual(events[-1].export.name, "other")

    def test_info_then_go_identical_H14(self) -> None:
        """H-14: INFO then GO with the same parameters give the same information."""
        data = b.client_flags() + b.option(Opt.STRUCTURED_REPLY)
        data += b.option(Opt.INFO, b.info_data("disk", (1, 2, 3)))
        data += b.go("disk", (1, 2, 3))
        events, out = self.transcript(data)
        replies = b.parse_option_replies(out[len(GREETING) :])
        info = [r[1:] for r in replies if r[0] == Opt.INFO]
        go = [r[1:] for r in replies if r[0] == Opt.GO]
        self.assertEqual(info, go)
        self.assertIsInstance(events[-1], ExportChosen)

    def test_no_block_size_required_H15(self) -> None:
        """H-15: GO without asking for block sizes is never refused."""
        reg = registry(caps=Capabilities(min_block=512))
        events, out = self.transcript(b.client_flags() + b.go(), reg)
        self.assertIsInstance(events[-1], ExportChosen)
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertNotIn(Rep.ERR_BLOCK_SIZE_REQD, [r[1] for r in replies])

    def test_meta_context_H16(self) -> None:
        """H-16: base:allocation is listed for base: and empty queries; SET selects it."""
        caps = Capabilities(can_extents=True)
        sr = b.client_flags() + b.option(Opt.STRUCTURED_REPLY)
        cases = [
            (Opt.LIST_META_CONTEXT, b.meta_data("disk"), [(0, "base:allocation")]),
            (Opt.LIST_META_CONTEXT, b.meta_data("disk", "base:"), [(0, "base:allocation")]),
            (Opt.LIST_META_CONTEXT, b.meta_data("disk", "x-foo:bar"), []),
            (Opt.LIST_META_CONTEXT, b.meta_data("disk", "base:nosuch"), []),
            (Opt.SET_META_CONTEXT, b.meta_data("disk", "base:"), []),
            (
                Opt.SET_META_CONTEXT,
                b.meta_data("disk", "base:allocation", "qemu:dirty-bitmap:x"),
                [(1, "base:allocation")],
            ),
        ]
        for opt, data, expected in cases:
            _, out = self.transcript(sr + b.option(opt, data), registry(caps=caps))
            replies = b.parse_option_replies(out[len(GREETING) :])[1:]
            got = [
                (struct.unpack(">I", r[2][:4])[0], r[2][4:].decode())
                for r in replies
                if r[1] == Rep.META_CONTEXT
            ]
            self.assertEqual(got, expected, data)
            self.assertEqual(replies[-1][1], Rep.ACK)

    def test_meta_context_errors_H16(self) -> None:
        """H-16: malformed lengths or a query without a namespace get ERR_INVALID;
        meta contexts without structured replies too."""
        sr = b.client_flags() + b.option(Opt.STRUCTURED_REPLY)
        for prefix, data in [
            (sr, b.meta_data("disk", "nocolon")),
            (sr, b.meta_data("disk", "base:")[:-2]),
            (b.client_flags(), b.meta_data("disk", "base:")),
        ]:
            _, out = self.transcript(prefix + b.option(Opt.SET_META_CONTEXT, data))
            self.assertEqual(b.parse_option_replies(out[len(GREETING) :])[-1][1], Rep.ERR_INVALID)

    def test_second_structured_reply_H17(self) -> None:
        """H-17: a repeated STRUCTURED_REPLY gets ERR_INVALID."""
        data = b.client_flags() + b.option(Opt.STRUCTURED_REPLY) * 2
        _, out = self.transcript(data)
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertEqual([r[1] for r in replies], [Rep.ACK, Rep.ERR_INVALID])

    def test_tx_flags_H20(self) -> None:
        """H-20: HAS_FLAGS always; DF only with structured replies; none unsupported."""
        _, out = self.transcript(b.client_flags(1) + b.option(Opt.EXPORT_NAME, b"disk"))
        (tx,) = struct.unpack(">H", out[len(GREETING) + 8 : len(GREETING) + 10])
        self.assertTrue(tx & TxFlags.HAS_FLAGS)
        self.assertFalse(tx & TxFlags.SEND_DF)
        self.assertFalse(tx & TxFlags.BLOCK_STATUS_PAYLOAD)
        caps = Capabilities(can_zero=False, can_fast_zero=True, can_trim=False, can_cache=False)
        conn = new_connection(registry(caps=caps))
        conn.receive_data(b.client_flags() + b.option(Opt.STRUCTURED_REPLY) + b.go())
        while conn.next_event() is not NEED_DATA:
            pass
        self.assertTrue(conn.tx_flags & TxFlags.SEND_DF)
        self.assertFalse(conn.tx_flags & (TxFlags.SEND_FAST_ZERO | TxFlags.SEND_WRITE_ZEROES))
        self.assertFalse(conn.tx_flags & (TxFlags.SEND_TRIM | TxFlags.SEND_CACHE))

    def test_read_only_tx_flags_H20(self) -> None:
        """H-20: a read-only export advertises READ_ONLY and no writing commands."""
        conn = new_connection(registry(read_only=True))
        conn.receive_data(HANDSHAKE)
        while conn.next_event() is not NEED_DATA:
            pass
        self.assertTrue(conn.tx_flags & TxFlags.READ_ONLY)
        for flag in (TxFlags.SEND_TRIM, TxFlags.SEND_WRITE_ZEROES, TxFlags.SEND_FUA):
            self.assertFalse(conn.tx_flags & flag)

    def test_list_exports(self) -> None:
        """LIST sends one SERVER reply per export with its description, then ACK."""
        _, out = self.transcript(b.client_flags() + b.option(Opt.LIST))
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertEqual(
            [r[2] for r in replies[:-1]],
            [struct.pack(">I", 4) + b"diskthe disk", struct.pack(">I", 5) + b"other"],
        )
        self.assertEqual(replies[-1][1], Rep.ACK)

    def test_starttls_refused_S02(self) -> None:
        """S-02: without TLS configured, STARTTLS gets ERR_POLICY, never ERR_TLS_REQD."""
        _, out = self.transcript(b.client_flags() + b.option(Opt.STARTTLS) + b.go())
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertEqual(replies[0][1], Rep.ERR_POLICY)
        self.assertNotIn(Rep.ERR_TLS_REQD, [r[1] for r in replies])

    def test_extended_headers_option(self) -> None:
        """Extended headers: ACK; with data ERR_INVALID; a later STRUCTURED_REPLY gets
        ERR_EXT_HEADER_REQD; a second EXTENDED_HEADERS ERR_INVALID (H-07, H-17)."""
        data = b.client_flags() + b.option(Opt.EXTENDED_HEADERS, b"x")
        data += b.option(Opt.EXTENDED_HEADERS) + b.option(Opt.STRUCTURED_REPLY)
        data += b.option(Opt.EXTENDED_HEADERS) + b.go()
        events, out = self.transcript(data)
        replies = b.parse_option_replies(out[len(GREETING) :])
        self.assertEqual(
            [r[1] for r in replies[:4]],
            [Rep.ERR_INVALID, Rep.ACK, Rep.ERR_EXT_HEADER_REQD, Rep.ERR_INVALID],
        )
        self.assertIsInstance(events[-1], ExportChosen)

    def test_export_name_after_extended_headers(self) -> None:
        """A client that negotiated extended headers must not use EXPORT_NAME: close."""
        data = b.client_flags() + b.option(Opt.EXTENDED_HEADERS) + b.option(Opt.EXPORT_NAME)
        events, _ = self.transcript(data)
        self.assertEqual(events[-1], VIOLATION)


class TransmissionTests(TranscriptMixin, SynchronousTestCase):
    """Requests and their validation (T- and C- rules)."""

    def requests(
        self, data: bytes, reg: ExportRegistry | None = None, handshake: bytes = HANDSHAKE
    ) -> tuple[list[Any], bytes]:
        events, out = self.transcript(handshake + data, reg)
        self.assertIsInstance(events[0], ExportChosen)
        return events[1:], after_go(out)

    def assert_rejected(self, event: Any, errno: Errno) -> None:
        self.assertIsInstance(event, RequestRejected)
        self.assertEqual(event.errno, errno, event.reason)

    def test_request_events(self) -> None:
        """Each command becomes its event with offset, length and flags."""
        data = (
            b.read(1, 0, 512)
            + b.write(2, 512, b"x" * 100, CmdFlags.FUA)
            + b.request(Cmd.FLUSH, 3)
            + b.request(Cmd.TRIM, 4, 4096, 8192)
            + b.request(Cmd.WRITE_ZEROES, 5, 0, 4096, CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO)
            + b.request(Cmd.CACHE, 6, 0, 65536)
            + b.request(Cmd.DISC, 7)
        )
        events, out = self.requests(data)
        self.assertEqual(
            events,
            [
                ReadRequest(1, 0, 512, 0),
                WriteRequest(2, 512, b"x" * 100, True),
                FlushRequest(3),
                TrimRequest(4, 4096, 8192, False),
                WriteZeroesRequest(5, 0, 4096, False, may_trim=False, fast=True),
                CacheRequest(6, 0, 65536),
                DisconnectRequest(),
            ],
        )
        self.assertEqual(out, b"")

    def test_bad_magic_T01(self) -> None:
        """T-01: a wrong request magic closes the connection."""
        events, _ = self.requests(b.request(Cmd.READ, 1, 0, 512, magic=0x12560953))
        self.assertEqual(events, [VIOLATION])

    def test_cookie_echoed_T02(self) -> None:
        """T-02: replies carry the request's cookie byte for byte."""
        cookie = 0xFEDCBA9876543210
        events, out = self.requests(b.request(99, cookie))
        self.assertEqual(b.parse_simple_replies(out), [(Errno.EINVAL, cookie)])

    def test_unknown_command_T03(self) -> None:
        """T-03: an unknown command gets EINVAL and the stream goes on."""
        events, out = self.requests(b.request(99, 1, 0, 512) + b.read(2, 0, 1))
        self.assert_rejected(events[0], Errno.EINVAL)
        self.assertEqual(events[1], ReadRequest(2, 0, 1, 0))

    def test_bad_flags_T04(self) -> None:
        """T-04: unknown flags, or flags not valid for the command, get EINVAL."""
        cases = [
            b.read(1, 0, 512, 0x8000),
            b.read(1, 0, 512, CmdFlags.DF),  # DF without structured replies
            b.request(Cmd.FLUSH, 1, flags=CmdFlags.NO_HOLE),
            b.write(1, 0, b"abc", CmdFlags.DF),
            b.request(Cmd.TRIM, 1, 0, 512, CmdFlags.REQ_ONE),
        ]
        for data in cases:
            events, out = self.requests(data + b.read(2, 0, 1))
            self.assert_rejected(events[0], Errno.EINVAL)
            self.assertEqual(events[1], ReadRequest(2, 0, 1, 0))

    def test_fast_zero_not_advertised_T04(self) -> None:
        """T-04: FAST_ZERO on an export that does not offer it gets EINVAL."""
        reg = registry(caps=Capabilities(can_fast_zero=False))
        events, _ = self.requests(b.request(Cmd.WRITE_ZEROES, 1, 0, 512, CmdFlags.FAST_ZERO), reg)
        self.assert_rejected(events[0], Errno.EINVAL)

    def test_rejected_write_payload_drained_T05(self) -> None:
        """T-05: the payload of a rejected WRITE is skipped, not parsed as requests."""
        # The payload looks like a READ request: it must not become one.
        payload = b.read(66, 0, 1) * 4
        events, out = self.requests(
            b.write(1, SIZE, payload) + b.write(2, 0, payload, 0x8000) + b.read(3, 0, 1)
        )
        self.assert_rejected(events[0], Errno.ENOSPC)
        self.assert_rejected(events[1], Errno.EINVAL)
        self.assertEqual(events[2:], [ReadRequest(3, 0, 1, 0)])

    def test_beyond_end_T06(self) -> None:
        """T-06: past the end, READ/TRIM/CACHE get EINVAL and WRITE/WRITE_ZEROES ENOSPC."""
        cases = [
            (b.read(1, SIZE - 1, 2), Errno.EINVAL),
            (b.read(1, SIZE + 1, 0), Errno.EINVAL),
            (b.read(1, 2**64 - 1, 2), Errno.EINVAL),
            (b.request(Cmd.TRIM, 1, SIZE, 1), Errno.EINVAL),
            (b.request(Cmd.CACHE, 1, 0, SIZE + 1), Errno.EINVAL),
            (b.write(1, SIZE - 1, b"ab"), Errno.ENOSPC),
            (b.request(Cmd.WRITE_ZEROES, 1, 2**64 - 512, 1024), Errno.ENOSPC),
        ]
        for data, errno in cases:
            events, out = self.requests(data + b.read(2, SIZE - 1, 1))
            self.assert_rejected(events[0], errno)
            self.assertEqual(events[1], ReadRequest(2, SIZE - 1, 1, 0))
            self.assertEqual(b.parse_simple_replies(out), [(errno, 1)])

    def test_last_byte_and_whole_export(self) -> None:
        """Requests that end exactly at the end of the export are fine."""
        events, _ = self.requests(b.read(1, SIZE - 1, 1) + b.read(2, 0, SIZE))
        self.assertEqual(events, [ReadRequest(1, SIZE - 1, 1, 0), ReadRequest(2, 0, SIZE, 0)])

    def test_misaligned_T07(self) -> None:
        """T-07: with a 512-byte minimum block, misaligned requests get EINVAL."""
        reg = registry(caps=Capabilities(min_block=512))
        for data in (b.read(1, 1, 512), b.read(1, 0, 100), b.write(1, 512, b"x" * 10)):
            events, _ = self.requests(data + b.read(2, 0, 512), reg)
            self.assert_rejected(events[0], Errno.EINVAL)
            self.assertEqual(events[1], ReadRequest(2, 0, 512, 0))

    def test_unaligned_tail_T07(self) -> None:
        """T-07: an export whose size is not a multiple of the block can reach its tail."""
        reg = registry(size=1000, caps=Capabilities(min_block=512))
        events, _ = self.requests(b.read(1, 512, 488), reg)
        self.assertEqual(events, [ReadRequest(1, 512, 488, 0)])

    def test_read_only_T08(self) -> None:
        """T-08: writes, trims and zeroes on a read-only export get EPERM; reads work."""
        reg = registry(read_only=True)
        data = (
            b.write(1, 0, b"abc")
            + b.request(Cmd.TRIM, 2, 0, 512)
            + b.request(Cmd.WRITE_ZEROES, 3, 0, 512)
            + b.read(4, 0, 3)
        )
        events, out = self.requests(data, reg)
        for event in events[:3]:
            self.assert_rejected(event, Errno.EPERM)
        self.assertEqual(events[3], ReadRequest(4, 0, 3, 0))
        self.assertEqual([e for e, _ in b.parse_simple_replies(out)], [Errno.EPERM] * 3)

    def test_zero_length_T09(self) -> None:
        """T-09: zero-length writes and trims succeed at once without the backend."""
        data = b.write(1, 0, b"") + b.request(Cmd.TRIM, 2, 0, 0) + b.read(3, 0, 0)
        events, out = self.requests(data)
        self.assertEqual(events, [ReadRequest(3, 0, 0, 0)])
        self.assertEqual(b.parse_simple_replies(out), [(0, 1), (0, 2)])

    def test_over_max_payload_T10(self) -> None:
        """T-10: a WRITE over the maximum payload is drained and gets EINVAL; no close."""
        reg = registry(caps=Capabilities(max_block=4096))
        events, out = self.requests(
            b.write(1, 0, b"y" * 5000) + b.read(2, 0, 5000) + b.read(3, 0, 1), reg
        )
        self.assert_rejected(events[0], Errno.EINVAL)
        self.assert_rejected(events[1], Errno.EINVAL)
        self.assertEqual(events[2], ReadRequest(3, 0, 1, 0))

    def test_long_trim_allowed_T11(self) -> None:
        """T-11: TRIM and WRITE_ZEROES longer than the maximum payload are fine."""
        reg = registry(caps=Capabilities(max_block=4096))
        events, _ = self.requests(b.request(Cmd.TRIM, 1, 0, SIZE), reg)
        self.assertEqual(events, [TrimRequest(1, 0, SIZE, False)])

    def test_simple_read_error_no_payload_T12(self) -> None:
        """T-12: a simple-reply READ error is just the 16-byte header."""
        conn = new_connection()
        conn.receive_data(HANDSHAKE + b.read(5, 0, 512))
        events = []
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
        request = events[-1]
        assert isinstance(request, ReadRequest)
        self.assertEqual(
            b"".join(conn.reply_error(request, Errno.EIO)), w.encode_simple_reply(5, 5)
        )

    def test_structured_read_T13_T14(self) -> None:
        """T-13/T-14: with structured replies READ gets one OFFSET_DATA chunk with DONE,
        errors and early EINVALs are ERROR chunks, and nothing is a simple reply."""
        handshake = b.client_flags() + b.option(Opt.STRUCTURED_REPLY) + b.go()
        events, out = self.requests(
            b.read(1, 0, 4, CmdFlags.DF) + b.read(2, SIZE, 1), handshake=handshake
        )
        self.assertEqual(events[0], ReadRequest(1, 0, 4, CmdFlags.DF))
        self.assert_rejected(events[1], Errno.EINVAL)
        [(flags, typ, cookie, payload)] = b.parse_chunks(out)
        self.assertEqual((flags, typ, cookie), (w.ReplyFlags.DONE, w.ChunkType.ERROR, 2))
        errno, msglen = struct.unpack(">IH", payload[:6])
        self.assertEqual((errno, len(payload)), (Errno.EINVAL, 6 + msglen))
        conn = new_connection()
        conn.receive_data(handshake)
        while conn.next_event() is not NEED_DATA:
            pass
        chunks = b.parse_chunks(b"".join(conn.reply_read(ReadRequest(1, 8, 4, 0), b"abcd")))
        self.assertEqual(chunks, [(1, w.ChunkType.OFFSET_DATA, 1, struct.pack(">Q", 8) + b"abcd")])
        chunks = b.parse_chunks(b"".join(conn.reply_read(ReadRequest(2, 8, 0, 0), b"")))
        self.assertEqual(chunks, [(1, w.ChunkType.NONE, 2, b"")])
        chunks = b.parse_chunks(b"".join(conn.reply_error(ReadRequest(3, 8, 9, 0), 5, "bad")))
        self.assertEqual(chunks, [(1, w.ChunkType.ERROR, 3, struct.pack(">IH", 5, 3) + b"bad")])

    def test_disc_ignores_what_follows_C06(self) -> None:
        """C-06: after DISC nothing the client sends is acted on."""
        events, out = self.requests(b.request(Cmd.DISC, 1) + b.read(2, 0, 1))
        self.assertEqual(events, [DisconnectRequest()])
        self.assertEqual(out, b"")

    def test_large_write_is_not_copied(self) -> None:
        """A WRITE payload that arrives as one chunk is handed on without a copy."""
        conn = new_connection()
        conn.receive_data(HANDSHAKE)
        while conn.next_event() is not NEED_DATA:
            pass
        payload = b"z" * (1 << 20)
        conn.receive_data(b.request(Cmd.WRITE, 1, 0, len(payload)))
        self.assertIs(conn.next_event(), NEED_DATA)
        conn.receive_data(payload)
        event = conn.next_event()
        assert isinstance(event, WriteRequest)
        self.assertIs(event.data, payload)


class BlockStatusTests(TranscriptMixin, SynchronousTestCase):
    """BLOCK_STATUS (T-17) and the clamping of extents."""

    BIG = 8 << 30  # an export bigger than 32 bits

    def connect(self, size: int = SIZE) -> ServerConnection:
        reg = registry(size=size, caps=Capabilities(can_extents=True))
        conn = new_connection(reg)
        conn.receive_data(
            b.client_flags()
            + b.option(Opt.STRUCTURED_REPLY)
            + b.option(Opt.SET_META_CONTEXT, b.meta_data("disk", "base:allocation"))
            + b.go("disk")
        )
        while conn.next_event() is not NEED_DATA:
            pass
        conn.data_to_send()
        return conn

    def extents(
        self, conn: ServerConnection, request: BlockStatusRequest, extents: list[Extent]
    ) -> list[tuple[int, int]]:
        [(flags, typ, cookie, payload)] = b.parse_chunks(
            b"".join(conn.reply_block_status(request, extents))
        )
        self.assertEqual((flags, typ, cookie), (1, w.ChunkType.BLOCK_STATUS, request.cookie))
        self.assertEqual(struct.unpack(">I", payload[:4])[0], 1)
        return [struct.unpack_from(">II", payload, p) for p in range(4, len(payload), 8)]

    def test_needs_context_T17(self) -> None:
        """T-17: BLOCK_STATUS without a selected context gets EINVAL."""
        handshake = b.client_flags() + b.option(Opt.STRUCTURED_REPLY) + b.go()
        events, out = self.transcript(handshake + b.request(Cmd.BLOCK_STATUS, 1, 0, 512))
        self.assertIsInstance(events[1], RequestRejected)

    def test_context_for_another_export_T17(self) -> None:
        """T-17: a context selected for another export does not count."""
        handshake = (
            b.client_flags()
            + b.option(Opt.STRUCTURED_REPLY)
            + b.option(Opt.SET_META_CONTEXT, b.meta_data("other", "base:allocation"))
            + b.go("disk")
        )
        reg = registry(caps=Capabilities(can_extents=True))
        events, out = self.transcript(handshake + b.request(Cmd.BLOCK_STATUS, 1, 0, 512), reg)
        self.assertIsInstance(events[-1], RequestRejected)

    def test_request_event(self) -> None:
        """A valid BLOCK_STATUS becomes an event, REQ_ONE included."""
        conn = self.connect()
        conn.receive_data(b.request(Cmd.BLOCK_STATUS, 9, 512, 4096, CmdFlags.REQ_ONE))
        self.assertEqual(conn.next_event(), BlockStatusRequest(9, 512, 4096, True))

    def test_clamped_to_size(self) -> None:
        """Extents never run past the end of the export; equal neighbours merge."""
        conn = self.connect()
        got = self.extents(
            conn,
            BlockStatusRequest(1, SIZE - 4096, 4096, False),
            [Extent(1024, 3), Extent(1024, 3), Extent(1 << 30, 0)],
        )
        self.assertEqual(got, [(2048, 3), (2048, 0)])

    def test_req_one_T17(self) -> None:
        """T-17: REQ_ONE gives one descriptor no longer than the request."""
        conn = self.connect()
        got = self.extents(
            conn, BlockStatusRequest(1, 0, 1000, True), [Extent(SIZE, 3), Extent(5, 0)]
        )
        self.assertEqual(got, [(1000, 3)])

    def test_32_bit_overflow(self) -> None:
        """An extent longer than 32 bits is split, never wrapped (cf. CVE-2025-47712)."""
        conn = self.connect(self.BIG)
        got = self.extents(conn, BlockStatusRequest(1, 0, 0xFFFFFFFF, False), [Extent(self.BIG, 3)])
        self.assertEqual(got, [(0xFFFF0000, 3)])
        self.assertTrue(all(0 < length <= 0xFFFFFFFF for length, _ in got))

    def test_maximum_length_edge(self) -> None:
        """A request of the maximum length ending exactly at the end is accepted and
        answered within it (cf. CVE-2025-47711's off-by-one)."""
        size = 0xFFFFFFFF + 512
        conn = self.connect(size)
        conn.receive_data(b.request(Cmd.BLOCK_STATUS, 1, 512, 0xFFFFFFFF))
        request = conn.next_event()
        self.assertEqual(request, BlockStatusRequest(1, 512, 0xFFFFFFFF, False))
        assert isinstance(request, BlockStatusRequest)
        got = self.extents(conn, request, [Extent(0xFFFFFFFF, 0), Extent(512, 3)])
        # Cut at the largest 32-bit multiple of 64 KiB; the next extent is not
        # misplaced after it.
        self.assertEqual(got, [(0xFFFF0000, 0)])
        got = self.extents(conn, request, [Extent(4096, 0), Extent(0xFFFFFFFF, 3)])
        self.assertEqual(got, [(4096, 0), (0xFFFF0000, 3)])
        self.assertLessEqual(sum(length for length, _ in got), size - 512)
        conn.receive_data(b.request(Cmd.BLOCK_STATUS, 2, 513, 0xFFFFFFFF))
        self.assertIsInstance(conn.next_event(), RequestRejected)

    def test_empty_answer(self) -> None:
        """A backend that returns no extents still yields one valid descriptor."""
        conn = self.connect()
        self.assertEqual(self.extents(conn, BlockStatusRequest(1, 0, 512, False), []), [(512, 0)])

    def test_phase(self) -> None:
        """The connection is in transmission after GO."""
        self.assertIs(self.connect().phase, Phase.TRANSMISSION)


class ExtendedHeaderTests(TranscriptMixin, SynchronousTestCase):
    """Transmission with extended headers (the extension-ext-header branch)."""

    HELLO = b.client_flags() + b.option(Opt.EXTENDED_HEADERS) + b.go()

    def requests(
        self, data: bytes, reg: ExportRegistry | None = None
    ) -> tuple[list[Any], list[tuple[int, int, int, int, bytes]]]:
        events, out = self.transcript(self.HELLO + data, reg)
        self.assertIsInstance(events[0], ExportChosen)
        return events[1:], b.parse_ext_chunks(after_go(out))

    def test_golden_write(self) -> None:
        """A 32-byte header with PAYLOAD_LEN carries a WRITE's payload."""
        raw = bytes.fromhex("21e41c7100210001000000000000000700000000000002000000000000000003")
        events, chunks = self.requests(raw + b"abc")
        self.assertEqual(events, [WriteRequest(7, 512, b"abc", True)])
        self.assertEqual(chunks, [])

    def test_write_without_payload_len(self) -> None:
        """A WRITE without PAYLOAD_LEN has no payload to skip: EINVAL, and go on."""
        events, chunks = self.requests(
            b.ext_request(Cmd.WRITE, 1, 0, 4) + b.ext_request(Cmd.READ, 2, 0, 4)
        )
        self.assertIsInstance(events[0], RequestRejected)
        self.assertEqual(events[1], ReadRequest(2, 0, 4, 0))
        self.assertEqual([(c[0], c[1], c[2]) for c in chunks], [(1, w.ChunkType.ERROR, 1)])

    def test_payload_on_payloadless_command(self) -> None:
        """A payload where none is expected is consumed, then EINVAL."""
        payload = b.ext_request(Cmd.READ, 66, 0, 1)  # must not be parsed
        events, _ = self.requests(
            b.ext_request(Cmd.TRIM, 1, 0, len(payload), CmdFlags.PAYLOAD_LEN, payload)
            + b.ext_request(Cmd.READ, 2, 0, 4)
        )
        self.assertIsInstance(events[0], RequestRejected)
        self.assertEqual(events[1:], [ReadRequest(2, 0, 4, 0)])

    def test_flush_with_payload_reason(self) -> None:
        """A FLUSH with a payload is refused for the payload, not for its length field."""
        events, _ = self.requests(
            b.ext_request(Cmd.FLUSH, 1, 0, 4, CmdFlags.PAYLOAD_LEN, b"abcd")
            + b.ext_request(Cmd.FLUSH, 2)
        )
        self.assertIsInstance(events[0], RequestRejected)
        self.assertIn("takes no payload", events[0].reason)
        self.assertEqual(events[1], FlushRequest(2))

    def test_payload_over_maximum_closes(self) -> None:
        """A PAYLOAD_LEN over the maximum payload gets a hard close."""
        events, _ = self.requests(b.ext_request(Cmd.WRITE, 1, 0, 64 << 20, CmdFlags.PAYLOAD_LEN))
        self.assertEqual(events, [VIOLATION])

    def test_64_bit_effect_length(self) -> None:
        """TRIM and BLOCK_STATUS may act on more than 4 GiB at once."""
        big = 16 << 30
        reg = registry(size=big, caps=Capabilities(can_extents=True))
        hello = (
            b.client_flags()
            + b.option(Opt.EXTENDED_HEADERS)
            + b.option(Opt.SET_META_CONTEXT, b.meta_data("disk", "base:allocation"))
            + b.go()
        )
        events, out = self.transcript(
            hello + b.ext_request(Cmd.TRIM, 1, 0, big) + b.ext_request(Cmd.BLOCK_STATUS, 2, 0, big),
            reg,
        )
        self.assertEqual(
            events[1:], [TrimRequest(1, 0, big, False), BlockStatusRequest(2, 0, big, False)]
        )

    def test_replies_are_extended(self) -> None:
        """Every reply is a 32-byte chunk echoing the offset; never a simple reply."""
        conn = new_connection(registry(caps=Capabilities(can_extents=True)))
        conn.receive_data(
            b.client_flags()
            + b.option(Opt.EXTENDED_HEADERS)
            + b.option(Opt.SET_META_CONTEXT, b.meta_data("disk", "base:allocation"))
            + b.go()
        )
        while conn.next_event() is not NEED_DATA:
            pass
        conn.data_to_send()
        ok = b.parse_ext_chunks(b"".join(conn.reply_ok(TrimRequest(1, 4096, 512, False))))
        self.assertEqual(ok, [(1, w.ChunkType.NONE, 1, 4096, b"")])
        data = b.parse_ext_chunks(b"".join(conn.reply_read(ReadRequest(2, 8, 3, 0), b"abc")))
        self.assertEqual(data, [(1, w.ChunkType.OFFSET_DATA, 2, 8, struct.pack(">Q", 8) + b"abc")])
        status = b.parse_ext_chunks(
            b"".join(
                conn.reply_block_status(
                    BlockStatusRequest(3, 0, SIZE, False), [Extent(4096, 0), Extent(SIZE, 3)]
                )
            )
        )
        self.assertEqual(
            status,
            [
                (
                    1,
                    w.ChunkType.BLOCK_STATUS_EXT,
                    3,
                    0,
                    struct.pack(">IIQQQQ", 1, 2, 4096, 0, SIZE - 4096, 3),
                )
            ],
        )


class SparseReadPlanTests(SynchronousTestCase):
    """L{plan_sparse_read} turns extents into data and hole segments."""

    def test_plan(self) -> None:
        """Zero runs of at least MIN_HOLE become holes; the rest, and gaps, are data."""
        extents = [Extent(100, 0), Extent(100, 3), Extent(8192, 3), Extent(50, 0)]
        self.assertEqual(
            plan_sparse_read(1000, 100000, extents),
            [(1000, 200, False), (1200, 8192, True), (9392, 100000 - 8392, False)],
        )

    def test_clamped(self) -> None:
        """Extents running past the read are cut at its end."""
        self.assertEqual(plan_sparse_read(0, 8192, [Extent(1 << 30, 3)]), [(0, 8192, True)])


class ShutdownTests(TranscriptMixin, SynchronousTestCase):
    """A server that shuts down refuses new work (H-19, C-07)."""

    def test_options_refused_H19(self) -> None:
        """H-19: every option but ABORT gets ERR_SHUTDOWN; ABORT still gets ACK."""
        conn = new_connection()
        conn.data_to_send()
        conn.receive_data(b.client_flags())
        self.assertIs(conn.next_event(), NEED_DATA)
        conn.shutdown()
        conn.receive_data(b.go() + b.option(Opt.LIST) + b.option(Opt.ABORT))
        events = [conn.next_event() for _ in range(3)]
        self.assertEqual(
            [getattr(e, "reply", None) for e in events[:2]], [Rep.ERR_SHUTDOWN, Rep.ERR_SHUTDOWN]
        )
        self.assertEqual(events[2], Aborted())
        replies = b.parse_option_replies(b"".join(conn.data_to_send()))
        self.assertEqual([r[1] for r in replies], [Rep.ERR_SHUTDOWN, Rep.ERR_SHUTDOWN, Rep.ACK])

    def test_requests_refused_C07(self) -> None:
        """C-07: requests after shutdown get ESHUTDOWN; a WRITE's payload is skipped."""
        conn = new_connection()
        conn.receive_data(HANDSHAKE)
        while conn.next_event() is not NEED_DATA:
            pass
        conn.data_to_send()
        conn.shutdown()
        conn.receive_data(b.write(1, 0, b.read(66, 0, 1)) + b.read(2, 0, 1) + b.request(Cmd.DISC))
        events = []
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
        self.assertEqual([getattr(e, "errno", None) for e in events[:2]], [Errno.ESHUTDOWN] * 2)
        self.assertEqual(events[2], DisconnectRequest())
        replies = b.parse_simple_replies(b"".join(conn.data_to_send()))
        self.assertEqual(replies, [(Errno.ESHUTDOWN, 1), (Errno.ESHUTDOWN, 2)])
