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

u16 = st.integers(0, w.MAX_U16)
u32 = st.integers(0, w.MAX_U32)
u64 = st.integers(0, w.MAX_U64)


def _fits(text: str) -> bool:
    return len(text.encode("utf-8")) <= w.MAX_STRING


#: Strings the protocol allows: at most MAX_STRING bytes of UTF-8.
strings = st.text().filter(_fits)
#: Byte strings that are not UTF-8.
not_utf8 = st.sampled_from([b"\xff", b"\xc3", b"ab\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
#: Information types NBD_REP_INFO decodes as InfoUnknown.
unknown_infos = st.integers(0, w.MAX_U16).filter(lambda i: i not in {int(x) for x in w.Info})

info_replies: st.SearchStrategy[w.InfoReply] = st.one_of(
    st.builds(w.InfoExport, u64, u16),
    st.builds(w.InfoText, st.sampled_from([w.Info.NAME, w.Info.DESCRIPTION]), st.text()),
    st.builds(w.InfoBlockSize, u32, u32, u32),
    st.builds(w.InfoUnknown, unknown_infos, st.binary(max_size=64)),
)


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

    def test_info_request_H11(self) -> None:
        """
        H-11: INFO/GO data is u32 namelen, name, u16 count, count x u16, so
        namelen is exactly the option length - 6 - 2 x count.
        """
        self.assertEqual(
            w.encode_info_request("disk", [w.Info.NAME, w.Info.BLOCK_SIZE]),
            bytes.fromhex("00000004") + b"disk" + bytes.fromhex("000200010003"),
        )
        self.assertEqual(w.encode_info_request(""), bytes.fromhex("000000000000"))

    def test_meta_context_request_H16(self) -> None:
        """
        H-16: LIST/SET_META_CONTEXT data is u32 namelen, name, u32 count,
        then each query after its u32 length (the length H-16 checks).
        """
        self.assertEqual(
            w.encode_meta_context_request("disk", ["base:allocation", "qemu:"]),
            b"\x00\x00\x00\x04disk\x00\x00\x00\x02"
            b"\x00\x00\x00\x0fbase:allocation\x00\x00\x00\x05qemu:",
        )
        self.assertEqual(w.encode_meta_context_request(""), bytes(8))

    def test_extended_request_T01(self) -> None:
        """
        T-01: an extended request starts with 0x21e41c71 and carries a
        64-bit length (32 bytes in all).
        """
        raw = w.encode_request(
            w.CmdFlags.PAYLOAD_LEN, w.Cmd.WRITE, 0x0102030405060708, 4096, 1 << 32, extended=True
        )
        self.assertEqual(
            raw,
            bytes.fromhex("21e41c71 0020 0001 0102030405060708 0000000000001000 0000000100000000"),
        )
        self.assertEqual(len(raw), w.request_size(True))

    def test_compact_request_T01(self) -> None:
        """T-01: a compact request starts with 0x25609513 and carries a 32-bit length."""
        raw = w.encode_request(w.CmdFlags.FUA, w.Cmd.WRITE, 7, 512, 1024, extended=False)
        self.assertEqual(
            raw,
            bytes.fromhex("25609513 0001 0001 0000000000000007 0000000000000200 00000400"),
        )
        self.assertEqual(len(raw), w.request_size(False))

    def test_extended_chunk(self) -> None:
        """An extended chunk header is magic, flags, type, cookie, offset, u64 length."""
        self.assertEqual(
            w.encode_chunk_header(1, w.ChunkType.BLOCK_STATUS_EXT, 9, 40, 4096, extended=True),
            bytes.fromhex("6e8a278c 0001 0006 0000000000000009 0000000000001000 0000000000000028"),
        )

    def test_block_status_compact_T17(self) -> None:
        """T-17: BLOCK_STATUS is u32 context id, then (u32 length, u32 flags) descriptors."""
        self.assertEqual(
            w.encode_block_status(7, [(4096, 0), (8192, 3)], extended=False),
            bytes.fromhex("00000007 00001000 00000000 00002000 00000003"),
        )

    def test_block_status_extended_T17(self) -> None:
        """
        T-17: BLOCK_STATUS_EXT is u32 context id, u32 descriptor count, then
        (u64 length, u64 flags) descriptors.
        """
        self.assertEqual(
            w.encode_block_status(7, [(4096, 0), (1 << 32, 3)], extended=True),
            bytes.fromhex("00000007 00000002")
            + bytes.fromhex("0000000000001000 0000000000000000")
            + bytes.fromhex("0000000100000000 0000000000000003"),
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

    @given(u16)
    def test_greeting(self, flags: int) -> None:
        """The handshake flags come back out of the greeting."""
        raw = w.encode_greeting(flags)
        self.assertEqual(len(raw), w.GREETING_SIZE)
        self.assertEqual(w.decode_greeting(raw), flags)

    @given(u32)
    def test_client_flags(self, flags: int) -> None:
        """The client flags come back out of their four bytes."""
        raw = w.encode_client_flags(flags)
        self.assertEqual(len(raw), w.CLIENT_FLAGS_SIZE)
        self.assertEqual(w.decode_client_flags(raw), flags)

    @given(u32, st.binary(max_size=100))
    def test_option(self, option: int, data: bytes) -> None:
        """An encoded option is a header giving the option and data length, then the data."""
        raw = w.encode_option(option, data)
        header = w.decode_option_header(raw[: w.OPTION_HEADER_SIZE])
        self.assertEqual(header, w.OptionHeader(option, len(data)))
        self.assertEqual(raw[w.OPTION_HEADER_SIZE :], data)

    @given(u32, u32, st.binary(max_size=100))
    def test_option_reply(self, option: int, reply: int, data: bytes) -> None:
        """An option reply is a header giving option, type and data length, then the data."""
        raw = w.encode_option_reply(option, reply, data)
        header = w.decode_option_reply_header(raw[: w.OPTION_REPLY_HEADER_SIZE])
        self.assertEqual(header, w.OptionReplyHeader(option, reply, len(data)))
        self.assertEqual(raw[w.OPTION_REPLY_HEADER_SIZE :], data)

    @given(u64, u16, st.booleans())
    def test_export_name_reply(self, size: int, flags: int, no_zeroes: bool) -> None:
        """The EXPORT_NAME reply has the size export_name_reply_size says, padded or not."""
        raw = w.encode_export_name_reply(size, flags, no_zeroes)
        self.assertEqual(len(raw), w.export_name_reply_size(no_zeroes))
        self.assertEqual(w.decode_export_name_reply(raw), w.ExportNameReply(size, flags))

    @given(strings, st.lists(u16, max_size=40))
    def test_info_request(self, name: str, infos: list[int]) -> None:
        """INFO/GO data gives back the name and the information types in order."""
        raw = w.encode_info_request(name, infos)
        self.assertEqual(w.decode_info_request(raw), w.InfoRequest(name, tuple(infos)))

    @given(strings, st.lists(strings, max_size=5))
    def test_meta_context_request(self, name: str, queries: list[str]) -> None:
        """META_CONTEXT data gives back the name and the queries in order."""
        raw = w.encode_meta_context_request(name, queries)
        self.assertEqual(
            w.decode_meta_context_request(raw), w.MetaContextRequest(name, tuple(queries))
        )

    def test_strings_at_the_limit(self) -> None:
        """Strings of exactly MAX_STRING bytes round-trip; one byte more is refused."""
        longest = "\u00e9" * (w.MAX_STRING // 2)
        self.assertEqual(len(longest.encode("utf-8")), w.MAX_STRING)
        self.assertEqual(
            w.decode_info_request(w.encode_info_request(longest)), w.InfoRequest(longest)
        )
        self.assertEqual(
            w.decode_meta_context_request(w.encode_meta_context_request(longest, [longest])),
            w.MetaContextRequest(longest, (longest,)),
        )
        self.assertRaises(ValueError, w.encode_info_request, longest + "x")
        self.assertRaises(ValueError, w.encode_meta_context_request, "", [longest + "x"])

    @given(strings, strings)
    def test_server_entry(self, name: str, description: str) -> None:
        """NBD_REP_SERVER gives back the name and the description."""
        raw = w.encode_server(name, description)
        self.assertEqual(w.decode_server(raw), w.ServerEntry(name, description))

    @given(u32, strings)
    def test_meta_context(self, context_id: int, name: str) -> None:
        """NBD_REP_META_CONTEXT gives back the context id and name."""
        raw = w.encode_meta_context(context_id, name)
        self.assertEqual(w.decode_meta_context(raw), w.MetaContext(context_id, name))

    @given(info_replies)
    def test_info(self, value: w.InfoReply) -> None:
        """Every kind of NBD_REP_INFO payload decodes to the value encoded."""
        self.assertEqual(w.decode_info(w.encode_info(value)), value)

    @given(u64, u16)
    def test_info_export(self, size: int, flags: int) -> None:
        """encode_info_export is encode_info of an InfoExport, 12 bytes long (H-12)."""
        raw = w.encode_info_export(size, flags)
        self.assertEqual(len(raw), 12)
        self.assertEqual(raw, w.encode_info(w.InfoExport(size, flags)))
        self.assertEqual(w.decode_info(raw), w.InfoExport(size, flags))

    @given(u16, u16, u64, u64, u32)
    def test_request_compact(
        self, flags: int, command: int, cookie: int, offset: int, length: int
    ) -> None:
        """Compact requests decode to what was encoded, with a magic that checks out."""
        raw = w.encode_request(flags, command, cookie, offset, length, extended=False)
        self.assertEqual(len(raw), w.request_size(False))
        header = w.decode_request(raw, extended=False)
        self.assertEqual(
            header, w.RequestHeader(w.REQUEST_MAGIC, flags, command, cookie, offset, length)
        )
        w.check_request_magic(header, extended=False)
        self.assertRaises(w.WireError, w.check_request_magic, header, True)

    @given(u16, u16, u64, u64, u64)
    def test_request_extended(
        self, flags: int, command: int, cookie: int, offset: int, length: int
    ) -> None:
        """Extended requests decode to what was encoded, with a magic that checks out."""
        raw = w.encode_request(flags, command, cookie, offset, length, extended=True)
        self.assertEqual(len(raw), w.request_size(True))
        header = w.decode_request(raw, extended=True)
        self.assertEqual(
            header,
            w.RequestHeader(w.EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length),
        )
        w.check_request_magic(header, extended=True)
        self.assertRaises(w.WireError, w.check_request_magic, header, False)

    @given(u32, u64)
    def test_simple_reply(self, error: int, cookie: int) -> None:
        """Simple replies decode to their error and cookie."""
        raw = w.encode_simple_reply(error, cookie)
        self.assertEqual(len(raw), w.SIMPLE_REPLY_SIZE)
        self.assertEqual(w.reply_magic(raw), w.SIMPLE_REPLY_MAGIC)
        self.assertEqual(w.decode_simple_reply(raw), w.SimpleReply(error, cookie))

    @given(u16, u16, u64, u32, u64)
    def test_chunk_header_compact(
        self, flags: int, type_: int, cookie: int, length: int, offset: int
    ) -> None:
        """Structured chunk headers decode with offset -1: they do not carry it."""
        raw = w.encode_chunk_header(flags, type_, cookie, length, offset, extended=False)
        self.assertEqual(len(raw), w.chunk_header_size(False))
        self.assertEqual(w.reply_magic(raw), w.STRUCTURED_REPLY_MAGIC)
        self.assertEqual(
            w.decode_chunk_header(raw, extended=False),
            w.ChunkHeader(flags, type_, cookie, -1, length),
        )

    @given(u16, u16, u64, u64, u64)
    def test_chunk_header_extended(
        self, flags: int, type_: int, cookie: int, length: int, offset: int
    ) -> None:
        """Extended chunk headers decode with the offset they echo."""
        raw = w.encode_chunk_header(flags, type_, cookie, length, offset, extended=True)
        self.assertEqual(len(raw), w.chunk_header_size(True))
        self.assertEqual(w.reply_magic(raw), w.EXTENDED_REPLY_MAGIC)
        self.assertEqual(
            w.decode_chunk_header(raw, extended=True),
            w.ChunkHeader(flags, type_, cookie, offset, length),
        )

    @given(u64)
    def test_offset_data_head(self, offset: int) -> None:
        """The eight bytes in front of OFFSET_DATA give back the offset."""
        raw = w.encode_offset_data_head(offset)
        self.assertEqual(len(raw), w.OFFSET_DATA_HEAD_SIZE)
        self.assertEqual(w.decode_offset_data_head(raw), offset)

    @given(u64, u32)
    def test_offset_hole(self, offset: int, length: int) -> None:
        """OFFSET_HOLE gives back its offset and length."""
        raw = w.encode_offset_hole(offset, length)
        self.assertEqual(len(raw), w.OFFSET_HOLE_SIZE)
        self.assertEqual(w.decode_offset_hole(raw), (offset, length))

    @given(st.integers(1, w.MAX_U32), strings)
    def test_error_payload(self, errno: int, message: str) -> None:
        """An ERROR payload gives back its errno and message, and no offset."""
        raw = w.encode_error_payload(errno, message)
        self.assertEqual(w.decode_error_payload(raw, False), w.ErrorPayload(errno, message))

    @given(st.integers(1, w.MAX_U32), strings, u64)
    def test_error_offset_payload(self, errno: int, message: str, offset: int) -> None:
        """An ERROR_OFFSET payload gives back its errno, message and offset."""
        raw = w.encode_error_payload(errno, message, offset)
        self.assertEqual(w.decode_error_payload(raw, True), w.ErrorPayload(errno, message, offset))

    def test_error_message_at_the_limit(self) -> None:
        """A message of exactly MAX_STRING bytes is sent and decoded whole."""
        message = "\u00e9" * (w.MAX_STRING // 2)
        raw = w.encode_error_payload(5, message, 8)
        self.assertEqual(w.decode_error_payload(raw, True), w.ErrorPayload(5, message, 8))

    @given(u32, st.lists(st.tuples(u32, u32), min_size=1, max_size=20))
    def test_block_status_compact(
        self, context_id: int, descriptors: list[tuple[int, int]]
    ) -> None:
        """BLOCK_STATUS gives back the context id and the descriptors in order."""
        raw = w.encode_block_status(context_id, descriptors, extended=False)
        self.assertEqual(len(raw), 4 + 8 * len(descriptors))
        self.assertEqual(
            w.decode_block_status(raw, extended=False),
            w.BlockStatusPayload(context_id, tuple(descriptors)),
        )

    @given(u32, st.lists(st.tuples(u64, u64), min_size=1, max_size=20))
    def test_block_status_extended(
        self, context_id: int, descriptors: list[tuple[int, int]]
    ) -> None:
        """BLOCK_STATUS_EXT gives back the context id and the descriptors in order."""
        raw = w.encode_block_status(context_id, descriptors, extended=True)
        self.assertEqual(len(raw), 8 + 16 * len(descriptors))
        self.assertEqual(
            w.decode_block_status(raw, extended=True),
            w.BlockStatusPayload(context_id, tuple(descriptors)),
        )


def _u32(value: int) -> bytes:
    return w.U32.pack(value)


def _u16(value: int) -> bytes:
    return w.U16.pack(value)


class MalformedInputTests(SynchronousTestCase):
    """Every decoder raises L{w.WireError} for bytes that cannot be its message."""

    # ------------------------------------------------------------ magic numbers

    @given(u64.filter(lambda m: m != w.NBDMAGIC), u16)
    def test_greeting_first_magic(self, magic: int, flags: int) -> None:
        """A greeting that does not start with NBDMAGIC is refused."""
        raw = w.GREETING.pack(magic, w.IHAVEOPT, flags)
        self.assertRaises(w.WireError, w.decode_greeting, raw)

    @given(u64.filter(lambda m: m != w.IHAVEOPT), u16)
    def test_greeting_second_magic(self, magic: int, flags: int) -> None:
        """A greeting whose second word is not IHAVEOPT is refused."""
        raw = w.GREETING.pack(w.NBDMAGIC, magic, flags)
        self.assertRaises(w.WireError, w.decode_greeting, raw)

    def test_oldstyle_greeting(self) -> None:
        """The first 18 bytes of an oldstyle greeting (cliserv_magic) are refused."""
        raw = bytes.fromhex("4e42444d41474943 0000420281861253 0000")
        self.assertRaises(w.WireError, w.decode_greeting, raw)

    @given(u64.filter(lambda m: m != w.IHAVEOPT), u32, u32)
    def test_option_header_magic_H03(self, magic: int, option: int, length: int) -> None:
        """H-03: an option header whose magic is not IHAVEOPT is refused."""
        raw = w.OPTION_HEADER.pack(magic, option, length)
        self.assertRaises(w.WireError, w.decode_option_header, raw)

    @given(u64.filter(lambda m: m != w.OPTION_REPLY_MAGIC), u32, u32, u32)
    def test_option_reply_header_magic_H05(
        self, magic: int, option: int, reply: int, length: int
    ) -> None:
        """H-05: an option reply header with the wrong magic is refused."""
        raw = w.OPTION_REPLY_HEADER.pack(magic, option, reply, length)
        self.assertRaises(w.WireError, w.decode_option_reply_header, raw)

    @given(u32.filter(lambda m: m != w.SIMPLE_REPLY_MAGIC), u32, u64)
    def test_simple_reply_magic(self, magic: int, error: int, cookie: int) -> None:
        """A simple reply with any other magic is refused."""
        raw = w.SIMPLE_REPLY.pack(magic, error, cookie)
        self.assertRaises(w.WireError, w.decode_simple_reply, raw)

    def test_simple_reply_structured_magic(self) -> None:
        """A structured chunk's first 16 bytes are not a simple reply."""
        raw = w.encode_chunk_header(1, 0, 7, 0)[: w.SIMPLE_REPLY_SIZE]
        self.assertRaises(w.WireError, w.decode_simple_reply, raw)

    @given(u32.filter(lambda m: m != w.STRUCTURED_REPLY_MAGIC), u16, u16, u64, u32)
    def test_chunk_header_compact_magic(
        self, magic: int, flags: int, type_: int, cookie: int, length: int
    ) -> None:
        """A structured chunk header with any other magic is refused."""
        raw = w.STRUCTURED_REPLY.pack(magic, flags, type_, cookie, length)
        self.assertRaises(w.WireError, w.decode_chunk_header, raw, False)

    @given(u32.filter(lambda m: m != w.EXTENDED_REPLY_MAGIC), u16, u16, u64, u64, u64)
    def test_chunk_header_extended_magic(
        self, magic: int, flags: int, type_: int, cookie: int, offset: int, length: int
    ) -> None:
        """An extended chunk header with any other magic is refused."""
        raw = w.EXTENDED_REPLY.pack(magic, flags, type_, cookie, offset, length)
        self.assertRaises(w.WireError, w.decode_chunk_header, raw, True)

    def test_chunk_header_wrong_kind(self) -> None:
        """Each chunk header size refuses the other size's magic."""
        compact = w.STRUCTURED_REPLY.pack(w.EXTENDED_REPLY_MAGIC, 1, 0, 7, 0)
        self.assertRaises(w.WireError, w.decode_chunk_header, compact, False)
        extended = w.EXTENDED_REPLY.pack(w.STRUCTURED_REPLY_MAGIC, 1, 0, 7, 0, 0)
        self.assertRaises(w.WireError, w.decode_chunk_header, extended, True)

    # ------------------------------------------------------------ INFO / GO data

    def test_info_request_lengths_H11(self) -> None:
        """H-11: INFO/GO data whose lengths disagree with it is refused."""
        for data in [
            b"",
            b"\x00\x00\x00",
            # namelen runs past the data, and past optlen - 6.
            _u32(10) + b"disk" + _u16(0),
            _u32(0xFFFF_FFFF) + b"disk" + _u16(0),
            # namelen too short: the rest is read as a count that does not fit.
            _u32(3) + b"disk" + _u16(0),
            # No count after the name.
            _u32(4) + b"disk",
            _u32(4) + b"disk\x00",
            # Count larger than the types that follow.
            _u32(4) + b"disk" + _u16(2) + _u16(1),
            # Count smaller than the types that follow, or trailing bytes.
            _u32(4) + b"disk" + _u16(0) + _u16(1),
            _u32(4) + b"disk" + _u16(1) + _u16(1) + b"\x00",
        ]:
            self.assertRaises(w.WireError, w.decode_info_request, data)

    @given(strings, st.lists(u16, max_size=10), st.data())
    def test_info_request_truncated_H11(
        self, name: str, infos: list[int], data: st.DataObject
    ) -> None:
        """H-11: every strict prefix of valid INFO/GO data is refused, never read past."""
        raw = w.encode_info_request(name, infos)
        cut = data.draw(st.integers(0, len(raw) - 1))
        self.assertRaises(w.WireError, w.decode_info_request, raw[:cut])

    @given(strings, st.lists(u16, max_size=10), st.binary(min_size=1, max_size=10))
    def test_info_request_trailing_H11(self, name: str, infos: list[int], extra: bytes) -> None:
        """H-11: valid INFO/GO data followed by anything more is refused."""
        raw = w.encode_info_request(name, infos)
        self.assertRaises(w.WireError, w.decode_info_request, raw + extra)

    @given(not_utf8)
    def test_info_request_not_utf8(self, name: bytes) -> None:
        """An export name that is not UTF-8 is refused."""
        data = _u32(len(name)) + name + _u16(0)
        self.assertRaises(w.WireError, w.decode_info_request, data)

    def test_info_request_name_too_long(self) -> None:
        """An export name over MAX_STRING bytes is refused, even when all there."""
        name = b"x" * (w.MAX_STRING + 1)
        data = _u32(len(name)) + name + _u16(0)
        self.assertRaises(w.WireError, w.decode_info_request, data)

    # ------------------------------------------------------------ META_CONTEXT data

    def test_meta_context_request_lengths_H11(self) -> None:
        """H-11/H-16: META_CONTEXT data whose lengths disagree with it is refused."""
        base = b"base:allocation"
        for data in [
            b"",
            _u32(4) + b"disk",
            # namelen too long or too short.
            _u32(9) + b"disk" + _u32(0),
            _u32(3) + b"disk" + _u32(0),
            # A query length running past the data (H-16).
            _u32(4) + b"disk" + _u32(1) + _u32(16) + base,
            _u32(4) + b"disk" + _u32(1) + _u32(0xFFFF_FFFF) + base,
            # A query length too short: the rest is left over or misread.
            _u32(4) + b"disk" + _u32(1) + _u32(14) + base,
            # More queries counted than present, or fewer.
            _u32(4) + b"disk" + _u32(2) + _u32(15) + base,
            _u32(4) + b"disk" + _u32(0) + _u32(15) + base,
            _u32(4) + b"disk" + _u32(0xFFFF_FFFF),
            # Trailing bytes.
            _u32(4) + b"disk" + _u32(1) + _u32(15) + base + b"\x00",
        ]:
            self.assertRaises(w.WireError, w.decode_meta_context_request, data)

    @given(strings, st.lists(strings, max_size=3), st.data())
    def test_meta_context_request_truncated_H11(
        self, name: str, queries: list[str], data: st.DataObject
    ) -> None:
        """H-11: every strict prefix of valid META_CONTEXT data is refused."""
        raw = w.encode_meta_context_request(name, queries)
        cut = data.draw(st.integers(0, len(raw) - 1))
        self.assertRaises(w.WireError, w.decode_meta_context_request, raw[:cut])

    @given(strings, st.lists(strings, max_size=3), st.binary(min_size=1, max_size=10))
    def test_meta_context_request_trailing_H11(
        self, name: str, queries: list[str], extra: bytes
    ) -> None:
        """H-11: valid META_CONTEXT data followed by anything more is refused."""
        raw = w.encode_meta_context_request(name, queries)
        self.assertRaises(w.WireError, w.decode_meta_context_request, raw + extra)

    @given(not_utf8)
    def test_meta_context_request_not_utf8(self, bad: bytes) -> None:
        """An export name or a query that is not UTF-8 is refused."""
        name_bad = _u32(len(bad)) + bad + _u32(0)
        self.assertRaises(w.WireError, w.decode_meta_context_request, name_bad)
        query_bad = _u32(0) + _u32(1) + _u32(len(bad)) + bad
        self.assertRaises(w.WireError, w.decode_meta_context_request, query_bad)

    def test_meta_context_request_too_long(self) -> None:
        """An export name or a query over MAX_STRING bytes is refused."""
        long = b"x" * (w.MAX_STRING + 1)
        self.assertRaises(
            w.WireError, w.decode_meta_context_request, _u32(len(long)) + long + _u32(0)
        )
        self.assertRaises(
            w.WireError,
            w.decode_meta_context_request,
            _u32(0) + _u32(1) + _u32(len(long)) + long,
        )

    # ------------------------------------------------------------ option replies

    @given(st.binary(max_size=3))
    def test_server_too_short(self, data: bytes) -> None:
        """An NBD_REP_SERVER shorter than its name length is refused."""
        self.assertRaises(w.WireError, w.decode_server, data)

    @given(st.binary(max_size=20), st.integers(1, 100))
    def test_server_name_past_end(self, rest: bytes, over: int) -> None:
        """An NBD_REP_SERVER whose name length runs past the reply is refused."""
        data = _u32(len(rest) + over) + rest
        self.assertRaises(w.WireError, w.decode_server, data)

    @given(st.binary(max_size=3))
    def test_meta_context_too_short(self, data: bytes) -> None:
        """An NBD_REP_META_CONTEXT shorter than its context id is refused."""
        self.assertRaises(w.WireError, w.decode_meta_context, data)

    @given(st.binary(max_size=1))
    def test_info_too_short(self, data: bytes) -> None:
        """An NBD_REP_INFO shorter than its type is refused."""
        self.assertRaises(w.WireError, w.decode_info, data)

    @given(st.binary(max_size=30).filter(lambda d: len(d) != 10))
    def test_info_export_size_H12(self, body: bytes) -> None:
        """H-12: an NBD_INFO_EXPORT that is not exactly 12 bytes is refused."""
        self.assertRaises(w.WireError, w.decode_info, _u16(w.Info.EXPORT) + body)

    @given(st.binary(max_size=30).filter(lambda d: len(d) != 12))
    def test_info_block_size_size(self, body: bytes) -> None:
        """An NBD_INFO_BLOCK_SIZE that is not exactly 14 bytes is refused."""
        self.assertRaises(w.WireError, w.decode_info, _u16(w.Info.BLOCK_SIZE) + body)

    # ------------------------------------------------------------ reply chunks

    @given(st.binary(max_size=30).filter(lambda d: len(d) != w.OFFSET_HOLE_SIZE))
    def test_offset_hole_size_T14(self, data: bytes) -> None:
        """T-14: an OFFSET_HOLE payload that is not 12 bytes is refused."""
        self.assertRaises(w.WireError, w.decode_offset_hole, data)

    @given(strings, st.booleans())
    def test_error_zero_T14(self, message: str, with_offset: bool) -> None:
        """T-14: an error chunk with error 0 is refused."""
        raw = w.encode_error_payload(0, message, 0 if with_offset else None)
        self.assertRaises(w.WireError, w.decode_error_payload, raw, with_offset)

    @given(st.booleans(), st.data())
    def test_error_too_short_T14(self, with_offset: bool, data: st.DataObject) -> None:
        """T-14: an error payload shorter than its fixed fields is refused."""
        size = data.draw(st.integers(0, (14 if with_offset else 6) - 1))
        raw = w.encode_error_payload(5, "", 0 if with_offset else None)[:size]
        self.assertRaises(w.WireError, w.decode_error_payload, raw, with_offset)

    @given(st.integers(1, w.MAX_U32), st.binary(max_size=40), st.integers(1, 100))
    def test_error_message_past_payload_T14(self, errno: int, message: bytes, over: int) -> None:
        """T-14: a message length that runs past the payload is refused."""
        raw = w.ERROR_HEAD.pack(errno, len(message) + over) + message
        self.assertRaises(w.WireError, w.decode_error_payload, raw, False)

    @given(st.integers(1, w.MAX_U32), st.binary(max_size=40), st.integers(1, 8))
    def test_error_message_into_offset_T14(self, errno: int, message: bytes, over: int) -> None:
        """T-14: an ERROR_OFFSET message that leaves no room for its offset is refused."""
        raw = w.ERROR_HEAD.pack(errno, len(message) + over) + message + bytes(8)
        self.assertRaises(w.WireError, w.decode_error_payload, raw, True)

    def test_block_status_without_descriptors_T17(self) -> None:
        """T-17: a BLOCK_STATUS chunk carries at least one descriptor."""
        self.assertRaises(w.WireError, w.decode_block_status, bytes(4), False)
        self.assertRaises(w.WireError, w.decode_block_status, bytes(8), True)

    def test_long_message_cut_at_a_character_T14(self) -> None:
        """
        T-14: a message over 4096 bytes is cut to at most 4096, at a character
        boundary, so what is sent is still UTF-8.
        """
        payload = w.encode_error_payload(5, "x" + "\u00e9" * 2048)
        message = payload[6:]
        self.assertLessEqual(len(message), w.MAX_STRING)
        self.assertEqual(message.decode("utf-8"), "x" + "\u00e9" * 2047)
        self.assertEqual(w.encode_message("\u00e9" * 3000), ("\u00e9" * 2048).encode("utf-8"))

    def test_error_message_too_long_T14(self) -> None:
        """T-14: a message over MAX_STRING bytes is refused even when all there."""
        message = b"x" * (w.MAX_STRING + 1)
        raw = w.ERROR_HEAD.pack(5, len(message)) + message
        self.assertRaises(w.WireError, w.decode_error_payload, raw, False)
        self.assertRaises(w.WireError, w.decode_error_payload, raw + bytes(8), True)

    @given(st.lists(st.tuples(u32, u32), max_size=5), st.integers(1, 7))
    def test_block_status_compact_ragged_T17(
        self, descriptors: list[tuple[int, int]], extra: int
    ) -> None:
        """T-17: a BLOCK_STATUS payload that is not a whole number of descriptors is refused."""
        raw = w.encode_block_status(1, descriptors, extended=False) + bytes(extra)
        self.assertRaises(w.WireError, w.decode_block_status, raw, False)

    @given(st.lists(st.tuples(u64, u64), max_size=5), st.integers(1, 15))
    def test_block_status_extended_ragged_T17(
        self, descriptors: list[tuple[int, int]], extra: int
    ) -> None:
        """T-17: a BLOCK_STATUS_EXT payload that is not a whole number of descriptors is refused."""
        raw = w.encode_block_status(1, descriptors, extended=True) + bytes(extra)
        self.assertRaises(w.WireError, w.decode_block_status, raw, True)

    def test_block_status_head_too_short_T17(self) -> None:
        """T-17: a payload shorter than its head is refused."""
        for size in range(4):
            self.assertRaises(w.WireError, w.decode_block_status, bytes(size), False)
        for size in range(8):
            self.assertRaises(w.WireError, w.decode_block_status, bytes(size), True)

    @given(st.lists(st.tuples(u64, u64), max_size=5), u32)
    def test_block_status_extended_count_T17(
        self, descriptors: list[tuple[int, int]], count: int
    ) -> None:
        """T-17: a BLOCK_STATUS_EXT whose count disagrees with its descriptors is refused."""
        if count == len(descriptors):
            count += 1
        body = w.encode_block_status(1, descriptors, extended=True)[8:]
        raw = w.BLOCK_STATUS_EXT_HEAD.pack(1, count) + body
        self.assertRaises(w.WireError, w.decode_block_status, raw, True)
