# -*- test-case-name: tests.test_wire -*-
"""
Tests for L{twisted_nbd._wire}: golden bytes from the specification and
round trips.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_nbd import _wire as w


class GoldenBytesTests(SynchronousTestCase):
    """Encodings match the byte layouts in the specification."""

    def test_greeting_H01(self) -> None:
        """H-01: "NBDMAGIC" "IHAVEOPT" then the u16 handshake flags."""
        self.assertEqual(w.encode_greeting(3), b"NBDMAGICIHAVEOPT\x00\x03")

    def test_option_reply_H05(self) -> None:
        """H-05: reply magic, option, reply type, length, data."""
        self.assertEqual(
            w.encode_option_reply(w.Opt.GO, w.Rep.ERR_UNKNOWN, b"no"),
            bytes.fromhex("0003e889045565a9000000078000000600000002") + b"no",
        )

    def test_export_name_reply_H10(self) -> None:
        """H-10: u64 size, u16 flags, 124 zeroes unless NO_ZEROES."""
        full = w.encode_export_name_reply(1 << 30, 0x0103, no_zeroes=False)
        self.assertEqual(full[:10], bytes.fromhex("00000000400000000103"))
        self.assertEqual(full[10:], bytes(124))
        self.assertEqual(w.encode_export_name_reply(1 << 30, 0x0103, no_zeroes=True), full[:10])

    def test_info_payloads(self) -> None:
        """NBD_INFO_EXPORT is 12 bytes and NBD_INFO_BLOCK_SIZE 14 (H-12)."""
        self.assertEqual(w.encode_info_export(512, 1), bytes.fromhex("000000000000000002000001"))
        self.assertEqual(
            w.encode_info_block_size(1, 4096, 1 << 25),
            bytes.fromhex("0003000000010000100002000000"),
        )

    def test_request_decoding(self) -> None:
        """A compact request is magic, flags, type, cookie, offset, length."""
        raw = bytes.fromhex("25609513000100010102030405060708000000000000100000000200")
        self.assertEqual(
            w.decode_request(raw, extended=False),
            w.RequestHeader(w.REQUEST_MAGIC, 1, 1, 0x0102030405060708, 4096, 512),
        )

    def test_simple_reply(self) -> None:
        """A simple reply is magic, error, cookie."""
        self.assertEqual(
            w.encode_simple_reply(22, 7), bytes.fromhex("67446698000000160000000000000007")
        )

    def test_structured_chunk(self) -> None:
        """A structured chunk header is magic, flags, type, cookie, length (20 bytes)."""
        self.assertEqual(
            w.encode_chunk_header(1, w.ChunkType.OFFSET_DATA, 9, 12),
            bytes.fromhex("668e33ef0001000100000000000000090000000c"),
        )

    def test_error_payload_T14(self) -> None:
        """T-14: error chunk messages are capped at 4096 bytes."""
        payload = w.encode_error_payload(5, "x" * 5000)
        self.assertEqual(payload[:6], bytes.fromhex("000000051000"))
        self.assertEqual(len(payload), 6 + 4096)
        self.assertEqual(
            w.encode_error_payload(5, "", offset=8)[6:], bytes.fromhex("0000000000000008")
        )


class RoundTripTests(SynchronousTestCase):
    """Encoding and decoding agree for every value."""

    @given(
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
    )
    def test_request(self, flags: int, typ: int, cookie: int, offset: int, length: int) -> None:
        """Compact requests decode to what was packed."""
        raw = w.REQUEST.pack(w.REQUEST_MAGIC, flags, typ, cookie, offset, length)
        self.assertEqual(
            w.decode_request(raw, False),
            w.RequestHeader(w.REQUEST_MAGIC, flags, typ, cookie, offset, length),
        )

    @given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
    def test_option_header(self, option: int, length: int) -> None:
        """Option headers decode to magic, option and length."""
        raw = w.OPTION_HEADER.pack(w.IHAVEOPT, option, length)
        self.assertEqual(w.decode_option_header(raw), w.OptionHeader(option, length))
