# -*- test-case-name: tests.test_wire -*-
"""
The NBD wire format, both directions: constants, precompiled structures,
frozen message values, and an C{encode_*}/C{decode_*} pair for every
message the server and the client exchange. Nothing here knows about
Twisted or keeps state; the server core (L{twisted_nbd._connection}) and the
client core (L{twisted_nbd._client_connection}) both build and parse every
message through this module and do no packing of their own.

Decoders take exactly the bytes of one message (the caller frames them) and
raise L{WireError} when the bytes cannot be that message: a magic number
that is wrong, lengths inside a payload that disagree with it, a string
that is not UTF-8 or is longer than L{MAX_STRING}. What an error means is
the caller's business: the server answers a malformed option with
NBD_REP_ERR_INVALID, the client hangs up.

Rule ids (H-, T-, C-) refer to the protocol digest the tests cite.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence, Union

# ---------------------------------------------------------------- magic numbers

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# ---------------------------------------------------------------- protocol limits

#: The longest name, description, query or error message the protocol
#: allows, in UTF-8 bytes.
MAX_STRING = 4096
#: The largest option payload a server reads into memory; larger ones are
#: drained and refused (H-06). Names and queries are at most 4096 bytes
#: each, so real clients stay far below.
MAX_OPTION_DATA = 64 * 1024
#: The largest option reply payload a client accepts, for the same reason.
MAX_OPTION_REPLY = 64 * 1024
#: The largest error chunk payload a client accepts (a 4096-byte message
#: and its fixed fields, with room to spare).
MAX_ERROR_CHUNK = 64 * 1024
#: At most this many descriptors in one BLOCK_STATUS chunk (T-17).
MAX_EXTENTS = 1 << 20
#: The largest BLOCK_STATUS chunk payload a client accepts: L{MAX_EXTENTS}
#: extended descriptors and their head, with room to spare.
MAX_STATUS_CHUNK = 32 * 1024 * 1024
#: The longest extent a compact (32-bit) descriptor carries while staying a
#: multiple of every legal minimum block size (up to 64 KiB).
MAX_EXTENT_32 = 0x1_0000_0000 - 0x1_0000
#: Bytes of zero padding after an EXPORT_NAME reply unless NO_ZEROES.
EXPORT_NAME_PADDING = 124
#: The default (and portable) maximum payload, 32 MiB.
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: The largest values the header fields hold.
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFF_FFFF
MAX_U64 = 0xFFFF_FFFF_FFFF_FFFF

#: The meta context every server of this protocol may offer, and its
#: namespace.
BASE_ALLOCATION = "base:allocation"
BASE_NAMESPACE = "base:"


# ---------------------------------------------------------------- enumerations


class HandshakeFlags(IntFlag):
    """Server handshake flags (u16)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(IntFlag):
    """Client flags (u32)."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


#: The client flags this implementation knows, as a plain int.
KNOWN_CLIENT_FLAGS = int(ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES)


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


#: The bit that marks an option reply type as an error.
REP_ERROR_BIT = 0x8000_0000


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


#: The bit that marks a chunk type as an error.
CHUNK_ERROR_BIT = 0x8000


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

KNOWN_OPTIONS = frozenset(int(o) for o in Opt)
KNOWN_REPLIES = frozenset(int(r) for r in Rep)
KNOWN_COMMANDS = frozenset(int(c) for c in Cmd)
KNOWN_CHUNK_TYPES = frozenset(int(t) for t in ChunkType)
KNOWN_ERRNOS = frozenset(int(e) for e in Errno)


def option_name(option: int) -> str:
    """C{NBD_OPT_GO} for 7, the number for an unknown option."""
    return f"NBD_OPT_{Opt(option).name}" if option in KNOWN_OPTIONS else str(option)


def reply_name(reply: int) -> str:
    """C{NBD_REP_ACK} for 1, the number in hex for an unknown reply type."""
    return f"NBD_REP_{Rep(reply).name}" if reply in KNOWN_REPLIES else hex(reply)


def command_name(command: int) -> str:
    """C{READ} for 0, the number for an unknown command."""
    return Cmd(command).name if command in KNOWN_COMMANDS else str(command)


# ---------------------------------------------------------------- structures

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

# The sizes the cores frame messages by.
GREETING_SIZE = GREETING.size
CLIENT_FLAGS_SIZE = CLIENT_FLAGS.size
OPTION_HEADER_SIZE = OPTION_HEADER.size
OPTION_REPLY_HEADER_SIZE = OPTION_REPLY_HEADER.size
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size
#: Every reply starts with at least this many bytes (a simple reply); the
#: magic in its first four says how long the header really is.
REPLY_PEEK = SIMPLE_REPLY.size
#: The eight-byte offset in front of an OFFSET_DATA chunk's data.
OFFSET_DATA_HEAD_SIZE = U64.size
OFFSET_HOLE_SIZE = OFFSET_HOLE.size

_ZEROES = bytes(EXPORT_NAME_PADDING)


class WireError(ValueError):
    """Bytes that cannot be the message they were decoded as."""


# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class OptionHeader:
    """A client option header: option number and the length of its data."""

    option: int
    length: int


@dataclass(frozen=True, slots=True)
class OptionReplyHeader:
    """An option reply header: the option answered, the reply type, the data length."""

    option: int
    reply: int
    length: int


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """The data of NBD_OPT_INFO and NBD_OPT_GO: an export name and the information wanted."""

    name: str
    infos: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """The data of NBD_REP_SERVER: one export of an NBD_OPT_LIST."""

    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class MetaContext:
    """The data of NBD_REP_META_CONTEXT."""

    context_id: int
    name: str


@dataclass(frozen=True, slots=True)
class InfoExport:
    """NBD_INFO_EXPORT: the export's size and transmission flags."""

    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class InfoText:
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""

    info: int
    text: str


@dataclass(frozen=True, slots=True)
class InfoBlockSize:
    """NBD_INFO_BLOCK_SIZE: the block size constraints."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class InfoUnknown:
    """An information type this implementation does not know (clients ignore it)."""

    info: int
    data: bytes


InfoReply = Union[InfoExport, InfoText, InfoBlockSize, InfoUnknown]


@dataclass(frozen=True, slots=True)
class ExportNameReply:
    """The reply to NBD_OPT_EXPORT_NAME: size and transmission flags."""

    size: int
    flags: int


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


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """A simple reply header: error and cookie (a READ's data follows it)."""

    error: int
    cookie: int


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """
    A structured (20-byte) or extended (32-byte) reply chunk header.

    @ivar offset: the request's offset, echoed by extended replies; C{-1}
        in a structured one, which does not carry it.
    """

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ErrorPayload:
    """The payload of an ERROR chunk, or an ERROR_OFFSET one when C{offset} is set."""

    errno: int
    message: str
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class BlockStatusPayload:
    """
    The payload of a BLOCK_STATUS (compact) or BLOCK_STATUS_EXT chunk:
    the context id and C{(length, flags)} descriptors.
    """

    context_id: int
    descriptors: tuple[tuple[int, int], ...]


# ---------------------------------------------------------------- strings


def encode_string(text: str, what: str = "a string") -> bytes:
    """
    C{text} as UTF-8, checked against the protocol's string limit.

    @raise ValueError: it is longer than L{MAX_STRING} bytes.
    """
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} is longer than {MAX_STRING} bytes")
    return raw


def encode_message(text: str) -> bytes:
    """
    A human-readable message (an error reason) as UTF-8, cut to at most
    L{MAX_STRING} bytes at a character boundary, so it stays UTF-8.
    """
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


def _decode_string(raw: bytes) -> str:
    if len(raw) > MAX_STRING:
        raise WireError(f"string of {len(raw)} bytes exceeds {MAX_STRING}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("string is not valid UTF-8") from None


def decode_text(raw: bytes) -> str:
    """A human-readable string from a peer: bad UTF-8 is replaced, not refused."""
    return raw.decode("utf-8", "replace")


class _Reader:
    """Bounds-checked reading of a payload (H-11: never past its end)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        if count > len(self.data) - self.pos:
            raise WireError("option data is shorter than its lengths say")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self, count: int) -> str:
        if count > MAX_STRING:
            # Refused before reading, so a huge length never slices anything.
            raise WireError(f"string of {count} bytes exceeds {MAX_STRING}")
        return _decode_string(self.take(count))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError("option data is longer than its lengths say")


# ---------------------------------------------------------------- handshake


def encode_greeting(flags: int) -> bytes:
    """The newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags (H-01)."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_greeting(data: bytes) -> int:
    """
    Decode the 18-byte newstyle greeting.

    @return: the handshake flags.
    @raise WireError: a magic number is wrong (oldstyle servers included).
    """
    magic, second, flags = GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise WireError(f"greeting magic {magic:#x} is not NBDMAGIC")
    if second != IHAVEOPT:
        raise WireError(
            f"greeting magic {second:#x} is not IHAVEOPT (oldstyle servers are not supported)"
        )
    return int(flags)


def encode_client_flags(flags: int) -> bytes:
    """The client's 32-bit flags (H-02)."""
    return CLIENT_FLAGS.pack(flags)


def decode_client_flags(data: bytes) -> int:
    """Decode the client's 4-byte flags."""
    (flags,) = CLIENT_FLAGS.unpack(data)
    return int(flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    """An option header and its data, as a client sends it (H-03)."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes) -> OptionHeader:
    """
    Decode the 16 bytes of an option header.

    @raise WireError: the magic is not IHAVEOPT (H-03).
    """
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise WireError(f"option magic {magic:#x} is not IHAVEOPT (H-03)")
    return OptionHeader(option, length)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """An option reply header and its data (H-05)."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes) -> OptionReplyHeader:
    """
    Decode the 20 bytes of an option reply header.

    @raise WireError: the magic is wrong (H-05).
    """
    magic, option, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise WireError(f"option reply magic {magic:#x} is wrong (H-05)")
    return OptionReplyHeader(option, reply, length)


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The reply to a successful NBD_OPT_EXPORT_NAME (H-10)."""
    head = EXPORT_NAME_REPLY.pack(size, flags)
    return head if no_zeroes else head + _ZEROES


def export_name_reply_size(no_zeroes: bool) -> int:
    """How many bytes the reply to NBD_OPT_EXPORT_NAME takes on the wire."""
    return EXPORT_NAME_REPLY.size + (0 if no_zeroes else EXPORT_NAME_PADDING)


def decode_export_name_reply(data: bytes) -> ExportNameReply:
    """
    Decode the reply to NBD_OPT_EXPORT_NAME, with or without its padding
    (which is not looked at).
    """
    size, flags = EXPORT_NAME_REPLY.unpack(data[: EXPORT_NAME_REPLY.size])
    return ExportNameReply(size, flags)


def encode_info_request(name: str, infos: Iterable[int] = ()) -> bytes:
    """
    The data of NBD_OPT_INFO or NBD_OPT_GO.

    @raise ValueError: the name is too long.
    """
    raw = encode_string(name, "the export name")
    wanted = list(infos)
    return b"".join(
        [U32.pack(len(raw)), raw, U16.pack(len(wanted)), *(U16.pack(i) for i in wanted)]
    )


def decode_info_request(data: bytes) -> InfoRequest:
    """
    Decode the data of NBD_OPT_INFO or NBD_OPT_GO.

    @raise WireError: the lengths inside disagree with the data (H-11), or
        the name is too long or not UTF-8.
    """
    reader = _Reader(data)
    name = reader.string(reader.u32())
    count = reader.u16()
    infos = tuple(reader.u16() for _ in range(count))
    reader.end()
    return InfoRequest(name, infos)


def encode_meta_context_request(name: str, queries: Sequence[str] = ()) -> bytes:
    """
    The data of NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT.

    @raise ValueError: a string is too long.
    """
    raw = encode_string(name, "the export name")
    parts = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for query in queries:
        encoded = encode_string(query, "a meta context name")
        parts += [U32.pack(len(encoded)), encoded]
    return b"".join(parts)


def decode_meta_context_request(data: bytes) -> MetaContextRequest:
    """
    Decode the data of NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT.

    @raise WireError: the lengths disagree with the data, or a string is
        too long or not UTF-8.
    """
    reader = _Reader(data)
    name = reader.string(reader.u32())
    count = reader.u32()
    queries = tuple(reader.string(reader.u32()) for _ in range(count))
    reader.end()
    return MetaContextRequest(name, queries)


def encode_server(name: str, description: str = "") -> bytes:
    """The payload of NBD_REP_SERVER: name length, name, description."""
    raw = name.encode("utf-8")
    return U32.pack(len(raw)) + raw + description.encode("utf-8")


def decode_server(data: bytes) -> ServerEntry:
    """
    Decode the payload of NBD_REP_SERVER.

    @raise WireError: it is too short, or the name runs past it.
    """
    if len(data) < 4:
        raise WireError("an NBD_REP_SERVER shorter than 4 bytes")
    (length,) = U32.unpack(data[:4])
    if length > len(data) - 4:
        raise WireError("an NBD_REP_SERVER name runs past the reply")
    return ServerEntry(decode_text(data[4 : 4 + length]), decode_text(data[4 + length :]))


def encode_meta_context(context_id: int, name: str) -> bytes:
    """The payload of NBD_REP_META_CONTEXT."""
    return U32.pack(context_id) + name.encode("utf-8")


def decode_meta_context(data: bytes) -> MetaContext:
    """
    Decode the payload of NBD_REP_META_CONTEXT.

    @raise WireError: it is shorter than its id.
    """
    if len(data) < 4:
        raise WireError("an NBD_REP_META_CONTEXT shorter than 4 bytes")
    (context_id,) = U32.unpack(data[:4])
    return MetaContext(context_id, decode_text(data[4:]))


def encode_info_export(size: int, flags: int) -> bytes:
    """The payload of NBD_REP_INFO for NBD_INFO_EXPORT."""
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """The payload of NBD_REP_INFO for NBD_INFO_BLOCK_SIZE."""
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_text(info: int, text: str) -> bytes:
    """The payload of NBD_REP_INFO for NBD_INFO_NAME or DESCRIPTION."""
    return U16.pack(info) + text.encode("utf-8")


def encode_info(value: InfoReply) -> bytes:
    """The payload of NBD_REP_INFO for any information value."""
    if isinstance(value, InfoExport):
        return encode_info_export(value.size, value.flags)
    if isinstance(value, InfoBlockSize):
        return encode_info_block_size(value.minimum, value.preferred, value.maximum)
    if isinstance(value, InfoText):
        return encode_info_text(value.info, value.text)
    return U16.pack(value.info) + value.data


def decode_info(data: bytes) -> InfoReply:
    """
    Decode the payload of NBD_REP_INFO.

    @raise WireError: it is too short, or a known type has the wrong size.
    """
    if len(data) < 2:
        raise WireError("an NBD_REP_INFO shorter than 2 bytes")
    (info,) = U16.unpack(data[:2])
    if info == Info.EXPORT:
        if len(data) != INFO_EXPORT.size:
            raise WireError(f"NBD_INFO_EXPORT of {len(data)} bytes, not {INFO_EXPORT.size}")
        _, size, flags = INFO_EXPORT.unpack(data)
        return InfoExport(size, flags)
    if info == Info.BLOCK_SIZE:
        if len(data) != INFO_BLOCK_SIZE.size:
            raise WireError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, not {INFO_BLOCK_SIZE.size}")
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
        return InfoBlockSize(minimum, preferred, maximum)
    if info in (Info.NAME, Info.DESCRIPTION):
        return InfoText(info, decode_text(data[2:]))
    return InfoUnknown(info, bytes(data[2:]))


# ---------------------------------------------------------------- transmission


def request_size(extended: bool) -> int:
    """The size of a request header: 32 bytes with extended headers, else 28."""
    return EXTENDED_REQUEST.size if extended else REQUEST.size


def encode_request(
    flags: int, command: int, cookie: int, offset: int, length: int, extended: bool
) -> bytes:
    """
    A request header, compact or extended (a WRITE's payload follows it
    separately).

    @raise struct.error: a field does not fit.
    """
    if extended:
        return EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length)
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def decode_request(data: bytes, extended: bool) -> RequestHeader:
    """
    Decode a 28-byte compact or a 32-byte extended request header. The
    magic is returned, not checked: L{check_request_magic} does that, so the
    per-request path pays for one comparison only.
    """
    fmt = EXTENDED_REQUEST if extended else REQUEST
    return RequestHeader._make(fmt.unpack(data))


class _Unpacker(Protocol):
    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...] | None: ...


def take_request(buffer: _Unpacker, extended: bool) -> tuple[int, ...] | None:
    """
    Take a request header's fields (magic, flags, type, cookie, offset,
    length) from the front of a L{twisted_nbd._buffer.ReceiveBuffer}, or
    C{None} if it has not all arrived. The magic is not checked (see
    L{check_request_magic}).
    """
    return buffer.unpack(EXTENDED_REQUEST if extended else REQUEST)


def check_request_magic(header: RequestHeader, extended: bool) -> None:
    """
    @raise WireError: the header's magic is not the one its size needs (T-01).
    """
    expected = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
    if header.magic != expected:
        raise WireError(f"request magic {header.magic:#x} is wrong (T-01)")


def reply_magic(data: bytes) -> int:
    """The magic number at the start of a reply header."""
    (magic,) = U32.unpack(data[:4])
    return int(magic)


def encode_simple_reply(error: int, cookie: int) -> bytes:
    """A simple reply header (data, if any, follows separately)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def decode_simple_reply(data: bytes) -> SimpleReply:
    """
    Decode a 16-byte simple reply header.

    @raise WireError: the magic is wrong.
    """
    magic, error, cookie = SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise WireError(f"simple reply magic {magic:#x} is wrong")
    return SimpleReply(error, cookie)


def chunk_header_size(extended: bool) -> int:
    """The size of a reply chunk header: 32 bytes with extended headers, else 20."""
    return EXTENDED_REPLY.size if extended else STRUCTURED_REPLY.size


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


def decode_chunk_header(data: bytes, extended: bool) -> ChunkHeader:
    """
    Decode a structured (20-byte) or extended (32-byte) chunk header.

    @raise WireError: the magic is not the one C{extended} calls for.
    """
    if extended:
        magic, flags, type_, cookie, offset, length = EXTENDED_REPLY.unpack(data)
        expected = EXTENDED_REPLY_MAGIC
    else:
        magic, flags, type_, cookie, length = STRUCTURED_REPLY.unpack(data)
        offset, expected = -1, STRUCTURED_REPLY_MAGIC
    if magic != expected:
        raise WireError(f"reply magic {magic:#x} is not valid here")
    return ChunkHeader(flags, type_, cookie, offset, length)


def ok_reply_encoder(structured: bool, extended: bool) -> Callable[[int, int], bytes]:
    """
    A function C{(cookie, offset) -> bytes} for the success reply without
    data that a connection in this mode sends (the same bytes as
    L{encode_chunk_header} with C{NONE} and C{DONE}, or
    L{encode_simple_reply} with error 0), specialised once per connection
    because one is sent for nearly every request.
    """
    if not structured:
        pack_simple = SIMPLE_REPLY.pack
        return lambda cookie, offset: pack_simple(SIMPLE_REPLY_MAGIC, 0, cookie)
    done, none = int(ReplyFlags.DONE), int(ChunkType.NONE)
    if extended:
        pack_extended = EXTENDED_REPLY.pack
        return lambda cookie, offset: pack_extended(
            EXTENDED_REPLY_MAGIC, done, none, cookie, offset, 0
        )
    pack_structured = STRUCTURED_REPLY.pack
    return lambda cookie, offset: pack_structured(STRUCTURED_REPLY_MAGIC, done, none, cookie, 0)


_STRUCTURED_READ_HEAD = struct.Struct(">IHHQIQ")
_EXTENDED_READ_HEAD = struct.Struct(">IHHQQQQ")


def read_reply_head_encoder(structured: bool, extended: bool) -> Callable[[int, int, int], bytes]:
    """
    A function C{(cookie, offset, length) -> bytes} for everything that
    goes in front of a whole READ's data in a successful reply in this
    mode, as one piece: a simple reply header, or an OFFSET_DATA chunk
    header (DONE) with the offset that starts its payload. The same bytes
    as L{encode_simple_reply}, or L{encode_chunk_header} followed by
    L{encode_offset_data_head}.
    """
    if not structured:
        pack_simple = SIMPLE_REPLY.pack
        return lambda cookie, offset, length: pack_simple(SIMPLE_REPLY_MAGIC, 0, cookie)
    done, data = int(ReplyFlags.DONE), int(ChunkType.OFFSET_DATA)
    if extended:
        pack_extended = _EXTENDED_READ_HEAD.pack
        return lambda cookie, offset, length: pack_extended(
            EXTENDED_REPLY_MAGIC, done, data, cookie, offset, 8 + length, offset
        )
    pack_structured = _STRUCTURED_READ_HEAD.pack
    return lambda cookie, offset, length: pack_structured(
        STRUCTURED_REPLY_MAGIC, done, data, cookie, 8 + length, offset
    )


def encode_offset_data_head(offset: int) -> bytes:
    """The eight bytes in front of an OFFSET_DATA chunk's data: its offset."""
    return U64.pack(offset)


def decode_offset_data_head(data: bytes) -> int:
    """The offset of an OFFSET_DATA chunk from its first eight payload bytes."""
    (offset,) = U64.unpack(data)
    return int(offset)


def encode_offset_hole(offset: int, length: int) -> bytes:
    """The payload of an OFFSET_HOLE chunk."""
    return OFFSET_HOLE.pack(offset, length)


def decode_offset_hole(data: bytes) -> tuple[int, int]:
    """
    Decode the payload of an OFFSET_HOLE chunk.

    @return: C{(offset, length)}.
    @raise WireError: it is not 12 bytes (T-14).
    """
    if len(data) != OFFSET_HOLE.size:
        raise WireError(f"an OFFSET_HOLE chunk of {len(data)} bytes, not 12 (T-14)")
    offset, length = OFFSET_HOLE.unpack(data)
    return offset, length


def encode_error_payload(error: int, message: str, offset: int | None = None) -> bytes:
    """
    The payload of an ERROR chunk, or of an ERROR_OFFSET chunk when
    C{offset} is given. The message is cut to at most 4096 bytes (T-14),
    at a character boundary so that it stays UTF-8.
    """
    raw = encode_message(message)
    payload = ERROR_HEAD.pack(error, len(raw)) + raw
    if offset is not None:
        payload += U64.pack(offset)
    return payload


def decode_error_payload(data: bytes, with_offset: bool) -> ErrorPayload:
    """
    Decode the payload of an error chunk (ERROR_OFFSET when C{with_offset}).
    Error types this implementation does not know are decoded as ERROR.

    @raise WireError: the error is 0, or the message runs past the payload
        or is over L{MAX_STRING} bytes (T-14).
    """
    if len(data) < ERROR_HEAD.size + (8 if with_offset else 0):
        raise WireError(f"an error chunk of {len(data)} bytes (T-14)")
    errno, length = ERROR_HEAD.unpack(data[:6])
    if errno == 0:
        raise WireError("an error chunk with error 0 (T-14)")
    tail = 8 if with_offset else 0
    if length > len(data) - 6 - tail or length > MAX_STRING:
        raise WireError("an error chunk's message runs past its payload")
    message = decode_text(data[6 : 6 + length])
    offset = None
    if with_offset:
        (offset,) = U64.unpack(data[6 + length : 14 + length])
    return ErrorPayload(errno, message, offset)


def encode_block_status(
    context_id: int, descriptors: Sequence[tuple[int, int]], extended: bool
) -> bytes:
    """
    The payload of a BLOCK_STATUS chunk (or BLOCK_STATUS_EXT when
    C{extended}) for C{(length, flags)} descriptors.
    """
    if extended:
        pack = EXTENT_EXT.pack
        head = BLOCK_STATUS_EXT_HEAD.pack(context_id, len(descriptors))
    else:
        pack = EXTENT.pack
        head = U32.pack(context_id)
    return head + b"".join([pack(length, flags) for length, flags in descriptors])


def decode_block_status(data: bytes, extended: bool) -> BlockStatusPayload:
    """
    Decode the payload of a BLOCK_STATUS or BLOCK_STATUS_EXT chunk.

    @raise WireError: it is not a head and a whole number (at least one) of
        descriptors, or (extended) its count disagrees with them (T-17).
    """
    head, each = (BLOCK_STATUS_EXT_HEAD.size, EXTENT_EXT.size) if extended else (4, EXTENT.size)
    if len(data) < head or (len(data) - head) % each:
        raise WireError(f"a block status payload of {len(data)} bytes (T-17)")
    if len(data) == head:
        raise WireError("a block status payload without descriptors (T-17)")
    body = memoryview(data)[head:]
    if extended:
        context_id, count = BLOCK_STATUS_EXT_HEAD.unpack(data[:head])
        if count != len(body) // each:
            raise WireError(
                f"BLOCK_STATUS_EXT says {count} descriptors but carries {len(body) // each}"
            )
        descriptors = tuple(EXTENT_EXT.iter_unpack(body))
    else:
        (context_id,) = U32.unpack(data[:head])
        descriptors = tuple(EXTENT.iter_unpack(body))
    return BlockStatusPayload(context_id, descriptors)
