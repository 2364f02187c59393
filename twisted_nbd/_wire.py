# -*- test-case-name: tests.test_wire -*-
"""
The NBD wire format: constants, fixed structures, and pure encoders and
decoders. Nothing here knows about Twisted or keeps state.

Rule ids (H-, T-, C-) refer to the protocol digest the tests cite.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

#: Bytes of zero padding after an EXPORT_NAME reply unless NO_ZEROES.
EXPORT_NAME_PADDING = 124
#: The default (and portable) maximum payload, 32 MiB.
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024


class HandshakeFlags(IntFlag):
    """Server handshake flags (u16)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(IntFlag):
    """Client flags (u32)."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    """Option numbers (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    """Option reply types (NBD_REP_*)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009
    ERR_EXT_HEADER_REQD = 0x8000000A


class Info(IntEnum):
    """Information types in NBD_REP_INFO (NBD_INFO_*)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlags(IntFlag):
    """Transmission flags (u16)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Cmd(IntEnum):
    """Command types (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlags(IntFlag):
    """Command flags (u16)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlags(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class ChunkType(IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


class Errno(IntEnum):
    """The error numbers the protocol allows on the wire."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: The command flags the spec defines for each command (section 2.7); which
#: of them a connection may use also depends on what was advertised.
COMMAND_FLAGS: dict[int, int] = {
    Cmd.READ: CmdFlags.FUA | CmdFlags.DF,
    Cmd.WRITE: CmdFlags.FUA,
    Cmd.FLUSH: CmdFlags.FUA,
    Cmd.TRIM: CmdFlags.FUA,
    Cmd.CACHE: CmdFlags.FUA,
    Cmd.WRITE_ZEROES: CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlags.FUA | CmdFlags.REQ_ONE,
}

# Fixed structures, all big-endian.
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
EXTENDED_REPLY = struct.Struct(">IHHQQQ")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")
ERROR_HEAD = struct.Struct(">IH")
EXTENT = struct.Struct(">II")
EXTENT_EXT = struct.Struct(">QQ")
BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")

_ZEROES = bytes(EXPORT_NAME_PADDING)


@dataclass(frozen=True, slots=True)
class OptionHeader:
    """A client option header: option number and the length of its data."""

    option: int
    length: int


class RequestHeader(NamedTuple):
    """
    A transmission request header, compact (28 bytes) or extended (32).

    A named tuple rather than a dataclass: one is made per request, and
    building a tuple straight from C{struct.unpack} is the cheapest way.

    @ivar length: the payload length for a WRITE (or any request with
        PAYLOAD_LEN), otherwise the length the command acts on.
    """

    magic: int
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def encode_greeting(flags: int) -> bytes:
    """The newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags (H-01)."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_option_header(data: bytes) -> tuple[int, OptionHeader]:
    """
    Decode the 16 bytes of an option header.

    @return: the magic (which the caller checks against L{IHAVEOPT}) and the
        header.
    """
    magic, option, length = OPTION_HEADER.unpack(data)
    return magic, OptionHeader(option, length)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """An option reply header and its data (H-05)."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The reply to a successful NBD_OPT_EXPORT_NAME (H-10)."""
    head = EXPORT_NAME_REPLY.pack(size, flags)
    return head if no_zeroes else head + _ZEROES


def encode_info_export(size: int, flags: int) -> bytes:
    """The payload of NBD_REP_INFO for NBD_INFO_EXPORT."""
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """The payload of NBD_REP_INFO for NBD_INFO_BLOCK_SIZE."""
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_text(info: int, text: str) -> bytes:
    """The payload of NBD_REP_INFO for NBD_INFO_NAME or DESCRIPTION."""
    return U16.pack(info) + text.encode("utf-8")


def encode_server(name: str, description: str) -> bytes:
    """The payload of NBD_REP_SERVER: name length, name, description."""
    raw = name.encode("utf-8")
    return U32.pack(len(raw)) + raw + description.encode("utf-8")


def encode_meta_context(context_id: int, name: str) -> bytes:
    """The payload of NBD_REP_META_CONTEXT."""
    return U32.pack(context_id) + name.encode("utf-8")


def decode_request(data: bytes, extended: bool) -> RequestHeader:
    """Decode a 28-byte compact or a 32-byte extended request header."""
    fmt = EXTENDED_REQUEST if extended else REQUEST
    return RequestHeader._make(fmt.unpack(data))


def encode_simple_reply(error: int, cookie: int) -> bytes:
    """A simple reply header (data, if any, follows separately)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(
    flags: int, type: int, cookie: int, length: int, offset: int = 0, extended: bool = False
) -> bytes:
    """
    A structured (20-byte) or extended (32-byte) reply chunk header; its
    payload of C{length} bytes follows separately.
    """
    if extended:
        return EXTENDED_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, type, cookie, offset, length)
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, type, cookie, length)


def encode_error_payload(error: int, message: str, offset: int | None = None) -> bytes:
    """
    The payload of an ERROR chunk, or of an ERROR_OFFSET chunk when
    C{offset} is given. The message is cut to 4096 bytes (T-14).
    """
    raw = message.encode("utf-8")[:4096]
    payload = ERROR_HEAD.pack(error, len(raw)) + raw
    if offset is not None:
        payload += U64.pack(offset)
    return payload
