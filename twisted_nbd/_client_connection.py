# -*- test-case-name: tests.test_client -*-
"""
The sans-I/O client side of one NBD connection.

Bytes from the server go in with L{ClientConnection.receive_data}; events
come out, one at a time, from L{ClientConnection.next_event}; bytes for the
server wait in L{ClientConnection.data_to_send}. Requests are queued with
L{ClientConnection.send_request}. There are no sockets or Deferreds here:
the caller (L{twisted_nbd.client}) does the I/O and matches replies to the
Deferreds it handed out.

The connection owns the handshake (which options to send, in what order,
and how to fall back when the server refuses one), the framing of requests,
and the checking of every reply chunk against the request it answers. A
server that breaks the protocol makes L{ClientConnection.next_event} raise
L{ProtocolViolation}; the connection cannot be used after that.

Rule ids (H-, T-, C-) refer to the protocol digest the tests cite.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence, Union

from twisted_nbd import _wire as w
from twisted_nbd._buffer import NEED_DATA, ReceiveBuffer, _NeedData
from twisted_nbd._wire import ChunkType, Cmd, CmdFlags, Errno, Opt, Rep, ReplyFlags, TxFlags
from twisted_nbd.errors import NBDError, ProtocolViolation
from twisted_nbd.interfaces import Extent

__all__ = [
    "NEED_DATA",
    "AbortAcknowledged",
    "BlockSize",
    "ClientConnection",
    "ClientEvent",
    "ExportInfo",
    "ExportsListed",
    "HandshakeComplete",
    "HandshakeRefused",
    "NBDHandshakeError",
    "Reply",
    "ReplyReceived",
]

#: The block size constraints a server that says nothing is assumed to have
#: (spec section 5).
DEFAULT_BLOCK_SIZE_MIN = 1
DEFAULT_BLOCK_SIZE_PREFERRED = 4096
#: The longest option reply we accept: names and descriptions are at most
#: 4096 bytes each, so this is generous.
MAX_OPTION_REPLY = 64 * 1024
#: The longest error chunk payload we accept (a 4096-byte message and its
#: fixed fields, with room to spare).
MAX_ERROR_CHUNK = 64 * 1024
#: The longest BLOCK_STATUS chunk payload we accept: 2^20 extended
#: descriptors (T-17's limit) and their head, with room to spare.
MAX_STATUS_CHUNK = 32 * 1024 * 1024
#: The largest length a compact request can carry.
MAX_U32 = 0xFFFF_FFFF
MAX_U64 = 0xFFFF_FFFF_FFFF_FFFF
#: The longest name or message the protocol allows.
MAX_STRING = 4096

_REPLY_MAGIC_SIZE = w.SIMPLE_REPLY.size  # the smallest reply header




class Phase(enum.Enum):
    """Where the client connection is."""

    GREETING = "greeting"
    OPTIONS = "option haggling"
    EXPORT_NAME = "waiting for the NBD_OPT_EXPORT_NAME reply"
    ABORTING = "waiting for the NBD_OPT_ABORT reply"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class NBDHandshakeError(Exception):
    """
    The server refused the handshake: an option that cannot be done without
    got an error reply (the export does not exist, the server is shutting
    down, ...).

    @ivar option: the option number that was refused.
    @ivar reply: the error reply type (a L{Rep} or an unknown int).
    @ivar message: the server's message, if it sent one.
    """

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        super().__init__(option, reply, message)
        self.option = option
        self.reply = reply
        self.message = message

    def __str__(self) -> str:
        option = Opt(self.option).name if self.option in _OPTS else str(self.option)
        reply = Rep(self.reply).name if self.reply in _REPS else hex(self.reply)
        text = f"NBD_OPT_{option} failed with NBD_REP_{reply}"
        return f"{text}: {self.message}" if self.message else text


_OPTS = frozenset(int(o) for o in Opt)
_REPS = frozenset(int(r) for r in Rep)
_ERRNOS = frozenset(int(e) for e in Errno)


class BlockSize(NamedTuple):
    """The server's block size constraints (spec section 5)."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """
    What the handshake established.

    @ivar name: the export's canonical name (NBD_INFO_NAME), or the name the
        client asked for.
    @ivar size: the export's size in bytes.
    @ivar transmission_flags: the L{TxFlags} the server sent.
    @ivar block_size: the server's constraints, or the defaults.
    @ivar description: NBD_INFO_DESCRIPTION, or C{""}.
    @ivar structured_replies: structured replies are on (also when extended
        headers are).
    @ivar extended_headers: 32-byte requests and replies are on.
    @ivar meta_contexts: selected meta context names and their ids.
    """

    name: str
    size: int
    transmission_flags: int
    block_size: BlockSize
    description: str
    structured_replies: bool
    extended_headers: bool
    meta_contexts: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Reply:
    """
    The complete reply to one request.

    @ivar cookie: the request's cookie.
    @ivar command: the request's command number.
    @ivar error: the first error the server reported, or C{None} on success.
    @ivar data: a successful READ's data (holes filled with zeroes), else
        C{None}.
    @ivar extents: a successful BLOCK_STATUS's extents, by context id.
    """

    cookie: int
    command: int
    error: NBDError | None = None
    data: bytes | None = field(default=None, repr=False)
    extents: Mapping[int, tuple[Extent, ...]] = field(default_factory=dict)


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Transmission has started on the export C{info} describes."""

    info: ExportInfo


@dataclass(frozen=True, slots=True)
class ExportsListed:
    """
    NBD_OPT_LIST finished with these C{(name, description)} pairs;
    NBD_OPT_ABORT is queued.
    """

    exports: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """The handshake cannot go on; NBD_OPT_ABORT is queued."""

    error: NBDHandshakeError


@dataclass(frozen=True, slots=True)
class AbortAcknowledged:
    """The server answered NBD_OPT_ABORT: close the connection."""


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The last chunk of a reply arrived (or its simple reply)."""

    reply: Reply


ClientEvent = Union[
    HandshakeComplete, ExportsListed, HandshakeRefused, AbortAcknowledged, ReplyReceived
]


# ---------------------------------------------------------------- in flight


@dataclass(slots=True)
class _InFlight:
    """A request sent and not yet fully answered."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    # Content chunks received for a READ, and the sorted, disjoint ranges they
    # and error offsets cover (T-14: no overlap).
    pieces: list[tuple[int, bytes | int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    covered: int = 0
    content_chunks: int = 0
    error_offsets: list[int] = field(default_factory=list)
    errors: list[NBDError] = field(default_factory=list)
    extents: dict[int, tuple[Extent, ...]] = field(default_factory=dict)
    chunks: int = 0
    has_payload: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class _ChunkHeader:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


_CMDS = frozenset(int(c) for c in Cmd)
_CHUNK_TYPES = frozenset(int(t) for t in ChunkType)
# The flags a polite client may set on each command it sends.
_VALID_FLAGS = w.COMMAND_FLAGS
# The transmission flag that exposes a command, for the optional ones.
_FEATURES: dict[int, int] = {
    Cmd.FLUSH: TxFlags.SEND_FLUSH,
    Cmd.TRIM: TxFlags.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlags.SEND_WRITE_ZEROES,
}
# The transmission flag that allows a command flag.
_FLAG_FEATURES = (
    (CmdFlags.FUA, TxFlags.SEND_FUA),
    (CmdFlags.DF, TxFlags.SEND_DF),
    (CmdFlags.FAST_ZERO, TxFlags.SEND_FAST_ZERO),
)
_WRITING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})


def nbd_error(errno: int, message: str) -> NBDError:
    """
    An L{NBDError} for an error number from the wire; unknown numbers are
    treated like C{EINVAL}, as the spec tells clients to (section 2.8).
    """
    if errno in _ERRNOS:
        return NBDError(errno, message)
    detail = f"unknown error number {errno}"
    return NBDError(Errno.EINVAL, f"{detail}: {message}" if message else detail)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _encode_string(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} is longer than {MAX_STRING} bytes")
    return raw


class ClientConnection:
    """
    The client side of one NBD connection, without I/O.

    Construct it, send L{data_to_send} once the connection is up, and feed
    it what the server sends. The handshake runs by itself: a
    L{HandshakeComplete} event says transmission has begun (or
    L{ExportsListed} in listing mode, or L{HandshakeRefused}).

    @param export_name: the export to open.
    @param structured_replies: ask for structured replies.
    @param meta_contexts: the meta contexts to select when structured replies
        are on.
    @param extended_headers: ask for extended headers first (only together
        with structured replies, which they imply).
    @param list_exports: do not open an export: send NBD_OPT_LIST, then
        NBD_OPT_ABORT.

    @ivar phase: the current L{Phase}.
    @ivar info: the L{ExportInfo} once transmission has started.
    """

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        meta_contexts: Sequence[str] = ("base:allocation",),
        extended_headers: bool = True,
        list_exports: bool = False,
    ) -> None:
        if isinstance(meta_contexts, str):
            raise TypeError("meta_contexts is a sequence of names, not one string")
        self._name = export_name
        self._name_bytes = _encode_string(export_name, "the export name")
        self._contexts = [str(c) for c in meta_contexts]
        for context in self._contexts:
            _encode_string(context, "a meta context name")
        self._listing = list_exports
        self._buffer = ReceiveBuffer()
        self._outbox: list[bytes] = []
        self.phase = Phase.GREETING
        self.info: ExportInfo | None = None
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured_replies = False
        self.extended_headers = False
        # The options still to try, in order; and the one awaiting its reply.
        self._want_extended = extended_headers and structured_replies
        self._want_structured = structured_replies
        self._want_meta = bool(self._contexts)
        self._option: int | None = None
        self._option_header: tuple[int, int] | None = None  # (reply type, length)
        # Collected from option replies.
        self._contexts_selected: dict[str, int] = {}
        self._exports: list[tuple[str, str]] = []
        self._size: int | None = None
        self._tx_flags = 0
        self._canonical: str | None = None
        self._description = ""
        self._block_size: BlockSize | None = None
        # Transmission.
        self._in_flight: dict[int, _InFlight] = {}
        self._next_cookie = 1
        self._disconnected = False
        self._head: bytes | None = None  # the first bytes of a reply header
        self._chunk: _ChunkHeader | None = None  # a chunk waiting for its payload
        self._simple_read: _InFlight | None = None  # a simple READ reply's data to come

    # ------------------------------------------------------------ I/O API

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes received from the server; nothing is parsed yet."""
        if self.phase is not Phase.CLOSED:
            self._buffer.append(data)

    def data_to_send(self) -> list[bytes]:
        """Take the bytes queued for the server (handshake and requests)."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> ClientEvent | _NeedData:
        """
        Parse what is buffered up to the next event.

        @return: the next event, or L{NEED_DATA} when the buffered bytes do
            not hold one.
        @raise ProtocolViolation: the server broke the protocol; the phase is
            then C{CLOSED} and the connection must be dropped.
        """
        try:
            while self.phase is not Phase.CLOSED:
                event = self._step()
                if event is NEED_DATA:
                    return NEED_DATA
                if event is not None:
                    return event
        except ProtocolViolation:
            self.phase = Phase.CLOSED
            raise
        return NEED_DATA

    @property
    def in_flight(self) -> int:
        """The number of requests sent and not yet answered."""
        return len(self._in_flight)

    def _step(self) -> ClientEvent | _NeedData | None:
        if self.phase is Phase.GREETING:
            return self._greeting()
        if self.phase in (Phase.OPTIONS, Phase.ABORTING):
            return self._option_reply()
        if self.phase is Phase.EXPORT_NAME:
            return self._export_name_reply()
        return self._reply()

    # ------------------------------------------------------------ handshake

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._outbox.append(w.OPTION_HEADER.pack(w.IHAVEOPT, option, len(data)) + data)

    def _greeting(self) -> ClientEvent | _NeedData | None:
        if len(self._buffer) < w.GREETING.size:
            return NEED_DATA
        magic, second, flags = w.GREETING.unpack(self._buffer.take(w.GREETING.size))
        if magic != w.NBDMAGIC:
            raise ProtocolViolation(f"greeting magic {magic:#x} is not NBDMAGIC")
        if second != w.IHAVEOPT:
            raise ProtocolViolation(
                f"greeting magic {second:#x} is not IHAVEOPT (oldstyle servers are not supported)"
            )
        self.fixed_newstyle = bool(flags & w.HandshakeFlags.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & w.HandshakeFlags.NO_ZEROES)
        # Echo exactly the flags we understand and were offered (H-02).
        client = int(flags) & int(w.ClientFlags.C_FIXED_NEWSTYLE | w.ClientFlags.C_NO_ZEROES)
        self._outbox.append(w.CLIENT_FLAGS.pack(client))
        if not self.fixed_newstyle:
            # Only NBD_OPT_EXPORT_NAME is possible.
            self._want_extended = self._want_structured = False
            if self._listing:
                # Nothing but EXPORT_NAME may be sent, not even ABORT: just close.
                self.phase = Phase.CLOSED
                return HandshakeRefused(
                    NBDHandshakeError(Opt.LIST, Rep.ERR_UNSUP, "the server is not fixed newstyle")
                )
            self._send_export_name()
            return None
        self.phase = Phase.OPTIONS
        self._next_option()
        return None

    def _next_option(self) -> None:
        """Send the next option of the handshake."""
        if self._listing:
            self._send_option(Opt.LIST)
        elif self._want_extended:
            self._want_extended = False
            self._send_option(Opt.EXTENDED_HEADERS)
        elif self._want_structured and not self.structured_replies:
            self._want_structured = False
            self._send_option(Opt.STRUCTURED_REPLY)
        elif self._want_meta and self.structured_replies:
            self._want_meta = False
            parts = [w.U32.pack(len(self._name_bytes)), self._name_bytes]
            parts.append(w.U32.pack(len(self._contexts)))
            for context in self._contexts:
                raw = context.encode("utf-8")
                parts += [w.U32.pack(len(raw)), raw]
            self._send_option(Opt.SET_META_CONTEXT, b"".join(parts))
        else:
            infos = (w.Info.NAME, w.Info.DESCRIPTION, w.Info.BLOCK_SIZE)
            data = (
                w.U32.pack(len(self._name_bytes))
                + self._name_bytes
                + w.U16.pack(len(infos))
                + b"".join(w.U16.pack(i) for i in infos)
            )
            self._send_option(Opt.GO, data)

    def _send_export_name(self) -> None:
        self._option = Opt.EXPORT_NAME
        self._outbox.append(
            w.OPTION_HEADER.pack(w.IHAVEOPT, Opt.EXPORT_NAME, len(self._name_bytes))
            + self._name_bytes
        )
        self.phase = Phase.EXPORT_NAME

    def _abort_handshake(self, error: NBDHandshakeError) -> HandshakeRefused:
        self._send_option(Opt.ABORT)
        self.phase = Phase.ABORTING
        return HandshakeRefused(error)

    def _option_reply(self) -> ClientEvent | _NeedData | None:
        if self._option_header is None:
            if len(self._buffer) < w.OPTION_REPLY_HEADER.size:
                return NEED_DATA
            magic, option, reply, length = w.OPTION_REPLY_HEADER.unpack(
                self._buffer.take(w.OPTION_REPLY_HEADER.size)
            )
            if magic != w.OPTION_REPLY_MAGIC:
                raise ProtocolViolation(f"option reply magic {magic:#x} is wrong (H-05)")
            if option != self._option:
                raise ProtocolViolation(
                    f"option reply for option {option} while waiting for {self._option} (H-05)"
                )
            if length > MAX_OPTION_REPLY:
                raise ProtocolViolation(f"option reply of {length} bytes is too long")
            self._option_header = (reply, length)
        reply, length = self._option_header
        if len(self._buffer) < length:
            return NEED_DATA
        self._option_header = None
        data = self._buffer.take(length)
        if self.phase is Phase.ABORTING:
            # Whatever the answer, the session is over.
            self.phase = Phase.CLOSED
            return AbortAcknowledged()
        option = self._option
        if reply & 0x8000_0000:
            return self._option_failed(option, reply, _text(data))
        if option == Opt.EXTENDED_HEADERS or option == Opt.STRUCTURED_REPLY:
            if reply != Rep.ACK:
                raise ProtocolViolation(f"reply type {reply} to option {option}")
            if length:
                raise ProtocolViolation("an NBD_REP_ACK with data")
            self.structured_replies = True
            if option == Opt.EXTENDED_HEADERS:
                self.extended_headers = True
            self._next_option()
            return None
        if option == Opt.SET_META_CONTEXT:
            return self._meta_context_reply(reply, data)
        if option == Opt.LIST:
            return self._list_reply(reply, data)
        assert option == Opt.GO
        return self._go_reply(reply, data)

    def _option_failed(self, option: int | None, reply: int, message: str) -> ClientEvent | None:
        assert option is not None
        if option in (Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY):
            # Fall back: to structured replies, or to simple replies.
            self._next_option()
            return None
        if option == Opt.SET_META_CONTEXT:
            # SET replaces the selection even when it fails: none is selected.
            self._contexts_selected = {}
            self._next_option()
            return None
        if option == Opt.GO and reply == Rep.ERR_UNSUP and not self.extended_headers:
            # An old server: the only other way in (a client that negotiated
            # extended headers must not use it, and the server must not say this).
            self._size = None
            self._canonical = None
            self._description = ""
            self._block_size = None
            self._send_export_name()
            return None
        return self._abort_handshake(NBDHandshakeError(option, reply, message))

    def _meta_context_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        if reply == Rep.META_CONTEXT:
            if len(data) < 4:
                raise ProtocolViolation("an NBD_REP_META_CONTEXT shorter than 4 bytes")
            (context_id,) = w.U32.unpack(data[:4])
            name = _text(data[4:])
            if context_id in self._contexts_selected.values():
                raise ProtocolViolation(f"meta context id {context_id} was given twice")
            self._contexts_selected[name] = context_id
            return None
        if reply != Rep.ACK or data:
            raise ProtocolViolation(f"reply type {reply} to NBD_OPT_SET_META_CONTEXT")
        self._next_option()
        return None

    def _list_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        if reply == Rep.SERVER:
            if len(data) < 4:
                raise ProtocolViolation("an NBD_REP_SERVER shorter than 4 bytes")
            (name_length,) = w.U32.unpack(data[:4])
            if name_length > len(data) - 4:
                raise ProtocolViolation("an NBD_REP_SERVER name runs past the reply")
            name = _text(data[4 : 4 + name_length])
            self._exports.append((name, _text(data[4 + name_length :])))
            return None
        if reply != Rep.ACK or data:
            raise ProtocolViolation(f"reply type {reply} to NBD_OPT_LIST")
        exports = tuple(self._exports)
        self._send_option(Opt.ABORT)
        self.phase = Phase.ABORTING
        return ExportsListed(exports)

    def _go_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        if reply == Rep.INFO:
            if len(data) < 2:
                raise ProtocolViolation("an NBD_REP_INFO shorter than 2 bytes")
            (info,) = w.U16.unpack(data[:2])
            if info == w.Info.EXPORT:
                if len(data) != w.INFO_EXPORT.size:
                    raise ProtocolViolation(f"NBD_INFO_EXPORT of {len(data)} bytes, not 12")
                _, self._size, self._tx_flags = w.INFO_EXPORT.unpack(data)
            elif info == w.Info.NAME:
                self._canonical = _text(data[2:])
            elif info == w.Info.DESCRIPTION:
                self._description = _text(data[2:])
            elif info == w.Info.BLOCK_SIZE:
                if len(data) != w.INFO_BLOCK_SIZE.size:
                    raise ProtocolViolation(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, not 14")
                _, minimum, preferred, maximum = w.INFO_BLOCK_SIZE.unpack(data)
                self._block_size = BlockSize(minimum, preferred, maximum)
            # Unknown information types are ignored.
            return None
        if reply != Rep.ACK or data:
            raise ProtocolViolation(f"reply type {reply} to NBD_OPT_GO")
        if self._size is None:
            raise ProtocolViolation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT (H-12)")
        return self._start_transmission()

    def _export_name_reply(self) -> ClientEvent | _NeedData:
        want = w.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else w.EXPORT_NAME_PADDING)
        if len(self._buffer) < want:
            return NEED_DATA
        self._size, self._tx_flags = w.EXPORT_NAME_REPLY.unpack(
            self._buffer.take(w.EXPORT_NAME_REPLY.size)
        )
        self._buffer.skip(want - w.EXPORT_NAME_REPLY.size)
        return self._start_transmission()

    def _start_transmission(self) -> HandshakeComplete:
        assert self._size is not None
        block_size = self._block_size or BlockSize(
            DEFAULT_BLOCK_SIZE_MIN, DEFAULT_BLOCK_SIZE_PREFERRED, w.DEFAULT_MAX_PAYLOAD
        )
        self.info = ExportInfo(
            name=self._canonical if self._canonical is not None else self._name,
            size=self._size,
            transmission_flags=self._tx_flags,
            block_size=block_size,
            description=self._description,
            structured_replies=self.structured_replies,
            extended_headers=self.extended_headers,
            meta_contexts=dict(self._contexts_selected) if self.structured_replies else {},
        )
        self.phase = Phase.TRANSMISSION
        return HandshakeComplete(self.info)

    # ------------------------------------------------------------ requests

    def validate(self, command: int, offset: int, length: int, flags: int = 0) -> None:
        """
        Check that a request is one a polite client may send: the server
        advertised the command and its flags, and the range lies inside the
        export and obeys its block sizes. L{send_request} does not check;
        tests use it to send what this refuses.

        @raise ValueError: the request is not allowed, with the reason.
        """
        info = self._require_transmission()
        tx = info.transmission_flags
        name = Cmd(command).name if command in _CMDS else str(command)
        valid = _VALID_FLAGS.get(command)
        if valid is None:
            raise ValueError(f"{name} is not a command validate() knows")
        if offset < 0 or length < 0:
            raise ValueError(f"{name}: negative offset or length")
        feature = _FEATURES.get(command)
        if feature is not None and not tx & feature:
            raise ValueError(f"the server does not support {name}")
        if command in _WRITING and tx & TxFlags.READ_ONLY:
            raise ValueError(f"{name} on a read-only export")
        if command == Cmd.BLOCK_STATUS and not info.meta_contexts:
            raise ValueError("BLOCK_STATUS needs a selected meta context")
        if flags & ~valid:
            raise ValueError(f"flags {flags:#x} are not valid for {name}")
        for flag, needs in _FLAG_FEATURES:
            if flags & flag and not tx & needs:
                raise ValueError(f"the server does not support the {flag.name} flag")
        if command == Cmd.FLUSH:
            if offset or length:
                raise ValueError("FLUSH has no offset or length")
            return
        if offset > info.size or length > info.size - offset:
            raise ValueError(
                f"{name} of {length} bytes at {offset} is beyond the export size {info.size}"
            )
        minimum = info.block_size.minimum or 1
        if offset % minimum or (length % minimum and offset + length != info.size):
            raise ValueError(
                f"{name} of {length} bytes at {offset} is not aligned to the minimum block "
                f"size {minimum}"
            )
        if command in (Cmd.READ, Cmd.WRITE) and length > info.block_size.maximum:
            raise ValueError(
                f"{name} of {length} bytes is over the maximum payload {info.block_size.maximum}"
            )
        if not self.extended_headers and length > MAX_U32:
            raise ValueError(f"{name} of {length} bytes needs extended headers")

    def send_request(
        self, command: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> int:
        """
        Queue a request exactly as given (no checks beyond what the header
        can hold); C{payload}, if any, follows the header unchanged, as its
        own item in L{data_to_send} (never copied onto the header).

        With extended headers the caller sets C{PAYLOAD_LEN} and passes
        C{len(payload)} as C{length} for a WRITE; L{write_request} does that.

        @return: the request's cookie, unique among requests in flight.
        @raise ValueError: a field does not fit its header, or the
            connection is not in transmission.
        """
        self._require_transmission()
        if self._disconnected:
            raise ValueError("NBD_CMD_DISC was sent: no more requests")
        limit = MAX_U64 if self.extended_headers else MAX_U32
        if not 0 <= length <= limit:
            raise ValueError(f"length {length} does not fit the request header")
        if not 0 <= offset <= MAX_U64 or not 0 <= flags <= 0xFFFF or not 0 <= command <= 0xFFFF:
            raise ValueError("offset, flags or command does not fit the request header")
        cookie = self._take_cookie()
        if self.extended_headers:
            head = w.EXTENDED_REQUEST.pack(
                w.EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length
            )
        else:
            head = w.REQUEST.pack(w.REQUEST_MAGIC, flags, command, cookie, offset, length)
        self._outbox.append(head)
        if payload:
            self._outbox.append(payload)
        if command == Cmd.DISC:
            self._disconnected = True
        else:
            self._in_flight[cookie] = _InFlight(
                cookie, command, flags, offset, length, has_payload=bool(payload)
            )
        return cookie

    def write_request(self, offset: int, data: bytes, flags: int = 0) -> int:
        """
        Queue a WRITE of C{data}: with extended headers C{PAYLOAD_LEN} is set
        and the length is the payload's.

        @return: the request's cookie.
        """
        if self.extended_headers:
            flags |= CmdFlags.PAYLOAD_LEN
        return self.send_request(Cmd.WRITE, offset, len(data), int(flags), data)

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC; no request may follow it."""
        self.send_request(Cmd.DISC, 0, 0)

    def _require_transmission(self) -> ExportInfo:
        if self.phase is not Phase.TRANSMISSION or self.info is None:
            raise ValueError(f"not in transmission but in {self.phase.value}")
        return self.info

    def _take_cookie(self) -> int:
        cookie = self._next_cookie
        while cookie in self._in_flight:
            cookie = (cookie + 1) & MAX_U64
        self._next_cookie = (cookie + 1) & MAX_U64
        return cookie

    # ------------------------------------------------------------ replies

    def _reply(self) -> ClientEvent | _NeedData | None:
        if self._simple_read is not None:
            return self._simple_read_data()
        if self._chunk is not None:
            return self._chunk_payload(self._chunk)
        if self._head is None:
            if len(self._buffer) < _REPLY_MAGIC_SIZE:
                return NEED_DATA
            self._head = self._buffer.take(_REPLY_MAGIC_SIZE)
        (magic,) = w.U32.unpack(self._head[:4])
        if magic == w.SIMPLE_REPLY_MAGIC:
            head, self._head = self._head, None
            return self._simple_reply(head)
        if magic == w.STRUCTURED_REPLY_MAGIC and not self.extended_headers:
            fmt = w.STRUCTURED_REPLY
        elif magic == w.EXTENDED_REPLY_MAGIC and self.extended_headers:
            fmt = w.EXTENDED_REPLY
        else:
            raise ProtocolViolation(f"reply magic {magic:#x} is not valid here")
        if not self.structured_replies:
            raise ProtocolViolation("a structured reply chunk without structured replies")
        rest = fmt.size - _REPLY_MAGIC_SIZE
        if len(self._buffer) < rest:
            return NEED_DATA
        raw = self._head + self._buffer.take(rest)
        self._head = None
        if self.extended_headers:
            _, flags, type_, cookie, offset, length = w.EXTENDED_REPLY.unpack(raw)
        else:
            _, flags, type_, cookie, length = w.STRUCTURED_REPLY.unpack(raw)
            offset = -1
        self._chunk = self._check_chunk(_ChunkHeader(flags, type_, cookie, offset, length))
        return self._chunk_payload(self._chunk)

    def _request_for(self, cookie: int) -> _InFlight:
        request = self._in_flight.get(cookie)
        if request is None:
            raise ProtocolViolation(
                f"a reply for cookie {cookie:#x}, which is not in flight (T-02)"
            )
        return request

    def _simple_reply(self, raw: bytes) -> ClientEvent | _NeedData | None:
        _, error, cookie = w.SIMPLE_REPLY.unpack(raw)
        request = self._request_for(cookie)
        if self.extended_headers:
            raise ProtocolViolation("a simple reply while extended headers are on (T-13)")
        if self.structured_replies and request.command == Cmd.READ:
            raise ProtocolViolation("a simple reply to a READ with structured replies on (T-13)")
        if request.chunks:
            raise ProtocolViolation("a simple reply after structured chunks for the same cookie")
        if error:
            request.errors.append(nbd_error(error, ""))
            return self._finish(request)
        if request.command == Cmd.READ:
            self._simple_read = request
            return self._simple_read_data()
        return self._finish(request)

    def _simple_read_data(self) -> ClientEvent | _NeedData:
        request = self._simple_read
        assert request is not None
        if len(self._buffer) < request.length:
            return NEED_DATA
        self._simple_read = None
        data = self._buffer.take(request.length)
        del self._in_flight[request.cookie]
        return ReplyReceived(Reply(request.cookie, request.command, data=data))

    def _check_chunk(self, chunk: _ChunkHeader) -> _ChunkHeader:
        """Check a chunk header against its request before its payload is read."""
        request = self._request_for(chunk.cookie)
        if self.extended_headers and chunk.offset != request.offset:
            raise ProtocolViolation(
                f"extended reply offset {chunk.offset} is not the request's {request.offset}"
            )
        type_, length, command = chunk.type, chunk.length, request.command
        name = ChunkType(type_).name if type_ in _CHUNK_TYPES else str(type_)
        if type_ == ChunkType.NONE:
            if length != 0 or not chunk.flags & ReplyFlags.DONE:
                raise ProtocolViolation("a NONE chunk must be empty and carry DONE (T-14)")
        elif type_ in (ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE):
            if command != Cmd.READ:
                raise ProtocolViolation(f"a {name} chunk in reply to command {command}")
            if type_ == ChunkType.OFFSET_HOLE and length != w.OFFSET_HOLE.size:
                raise ProtocolViolation(f"an OFFSET_HOLE chunk of {length} bytes, not 12 (T-14)")
            if type_ == ChunkType.OFFSET_DATA and not 8 < length <= 8 + request.length:
                raise ProtocolViolation(f"an OFFSET_DATA chunk of {length} bytes (T-14)")
        elif type_ in (ChunkType.BLOCK_STATUS, ChunkType.BLOCK_STATUS_EXT):
            if command != Cmd.BLOCK_STATUS:
                raise ProtocolViolation(f"a {name} chunk in reply to command {command}")
            extended = type_ == ChunkType.BLOCK_STATUS_EXT
            if extended != self.extended_headers:
                raise ProtocolViolation(
                    f"a {name} chunk with extended headers {'off' if extended else 'on'}"
                )
            head, each = (8, 16) if extended else (4, 8)
            if length < head + each or (length - head) % each or length > MAX_STATUS_CHUNK:
                raise ProtocolViolation(f"a {name} chunk of {length} bytes (T-17)")
        elif type_ & 0x8000:
            # ERROR, ERROR_OFFSET and error types we do not know: all errors.
            minimum = 14 if type_ == ChunkType.ERROR_OFFSET else 6
            if not minimum <= length <= MAX_ERROR_CHUNK:
                raise ProtocolViolation(f"an error chunk of {length} bytes (T-14)")
        else:
            raise ProtocolViolation(f"unknown chunk type {type_} (a client must hang up)")
        request.chunks += 1
        return chunk

    def _chunk_payload(self, chunk: _ChunkHeader) -> ClientEvent | _NeedData | None:
        if len(self._buffer) < chunk.length:
            return NEED_DATA
        self._chunk = None
        request = self._in_flight[chunk.cookie]
        type_ = chunk.type
        if type_ == ChunkType.OFFSET_DATA:
            (offset,) = w.U64.unpack(self._buffer.take(8))
            data = self._buffer.take(chunk.length - 8)
            self._content(request, offset, len(data), data, request.flags & CmdFlags.DF)
        elif type_ == ChunkType.OFFSET_HOLE:
            offset, size = w.OFFSET_HOLE.unpack(self._buffer.take(chunk.length))
            if size == 0:
                raise ProtocolViolation("an OFFSET_HOLE chunk of size 0 (T-14)")
            self._content(request, offset, size, size, request.flags & CmdFlags.DF)
        elif type_ in (ChunkType.BLOCK_STATUS, ChunkType.BLOCK_STATUS_EXT):
            self._block_status(request, type_, self._buffer.take(chunk.length))
        elif type_ != ChunkType.NONE:
            self._error_chunk(request, type_, self._buffer.take(chunk.length))
        if chunk.flags & ReplyFlags.DONE:
            return self._finish(request)
        return None

    def _claim(self, request: _InFlight, start: int, end: int) -> None:
        """Record that [start, end) is answered; it must not overlap (T-14)."""
        index = bisect.bisect_right(request.starts, start)
        if index and request.ends[index - 1] > start:
            raise ProtocolViolation(f"chunk at {start} overlaps an earlier chunk (T-14)")
        if index < len(request.starts) and request.starts[index] < end:
            raise ProtocolViolation(f"chunk at {start} overlaps an earlier chunk (T-14)")
        request.starts.insert(index, start)
        request.ends.insert(index, end)

    def _content(
        self, request: _InFlight, offset: int, size: int, part: bytes | int, df: int
    ) -> None:
        if offset < request.offset or size > request.end - offset:
            raise ProtocolViolation(
                f"content chunk of {size} bytes at {offset} is outside the request "
                f"({request.length} bytes at {request.offset}) (T-14)"
            )
        if df and request.content_chunks:
            raise ProtocolViolation("more than one content chunk for a DF read (T-16)")
        for error_offset in request.error_offsets:
            if offset <= error_offset < offset + size:
                raise ProtocolViolation("content chunk after an error chunk for the same offset")
        self._claim(request, offset, offset + size)
        request.content_chunks += 1
        request.covered += size
        request.pieces.append((offset, part))

    def _block_status(self, request: _InFlight, type_: int, payload: bytes) -> None:
        extents: list[Extent]
        if type_ == ChunkType.BLOCK_STATUS_EXT:
            context_id, count = w.BLOCK_STATUS_EXT_HEAD.unpack(payload[:8])
            body = memoryview(payload)[8:]
            if count != len(body) // 16:
                raise ProtocolViolation(
                    f"BLOCK_STATUS_EXT says {count} descriptors but carries {len(body) // 16}"
                )
            extents = [Extent(n, f) for n, f in w.EXTENT_EXT.iter_unpack(body)]
        else:
            (context_id,) = w.U32.unpack(payload[:4])
            extents = [Extent(n, f) for n, f in w.EXTENT.iter_unpack(memoryview(payload)[4:])]
        if self.info is None or context_id not in self.info.meta_contexts.values():
            raise ProtocolViolation(f"BLOCK_STATUS for context id {context_id}, never selected")
        if context_id in request.extents:
            raise ProtocolViolation(f"two BLOCK_STATUS chunks for context id {context_id} (T-17)")
        if any(e.length == 0 for e in extents):
            raise ProtocolViolation("a BLOCK_STATUS descriptor of length 0 (T-17)")
        if request.flags & CmdFlags.REQ_ONE:
            if len(extents) != 1 or extents[0].length > request.length:
                raise ProtocolViolation(
                    "a REQ_ONE BLOCK_STATUS reply must have one descriptor within the request"
                )
        elif sum(e.length for e in extents[:-1]) >= request.length:
            raise ProtocolViolation("BLOCK_STATUS descriptors run past the request (T-17)")
        request.extents[context_id] = tuple(extents)

    def _error_chunk(self, request: _InFlight, type_: int, payload: bytes) -> None:
        errno, message_length = w.ERROR_HEAD.unpack(payload[:6])
        if errno == 0:
            raise ProtocolViolation("an error chunk with error 0 (T-14)")
        tail = 8 if type_ == ChunkType.ERROR_OFFSET else 0
        if message_length > len(payload) - 6 - tail or message_length > MAX_STRING:
            raise ProtocolViolation("an error chunk's message runs past its payload")
        message = _text(payload[6 : 6 + message_length])
        if type_ == ChunkType.ERROR_OFFSET:
            (offset,) = w.U64.unpack(payload[6 + message_length : 14 + message_length])
            if not request.offset <= offset < request.end:
                raise ProtocolViolation(f"ERROR_OFFSET {offset} is outside the request")
            # Content may come before an error at the same offset, not after.
            request.error_offsets.append(offset)
            detail = f"at offset {offset}"
            message = f"{message} ({detail})" if message else detail
        request.errors.append(nbd_error(errno, message))

    def _finish(self, request: _InFlight) -> ReplyReceived:
        del self._in_flight[request.cookie]
        if request.errors:
            return ReplyReceived(Reply(request.cookie, request.command, error=request.errors[0]))
        if request.command == Cmd.READ:
            if request.covered != request.length:
                raise ProtocolViolation(
                    f"a successful READ reply covers {request.covered} of "
                    f"{request.length} bytes (T-15)"
                )
            return ReplyReceived(
                Reply(request.cookie, request.command, data=self._assemble(request))
            )
        if request.command == Cmd.BLOCK_STATUS and not request.has_payload:
            assert self.info is not None
            missing = [
                name
                for name, context_id in self.info.meta_contexts.items()
                if context_id not in request.extents
            ]
            if missing:
                raise ProtocolViolation(f"BLOCK_STATUS reply lacks context(s) {missing} (T-17)")
        return ReplyReceived(Reply(request.cookie, request.command, extents=request.extents))

    @staticmethod
    def _assemble(request: _InFlight) -> bytes:
        """The READ data from its content chunks; holes are zeroes."""
        if len(request.pieces) == 1:
            part = request.pieces[0][1]
            return bytes(part) if isinstance(part, int) else part
        out = bytearray(request.length)
        for offset, part in request.pieces:
            if not isinstance(part, int):
                start = offset - request.offset
                out[start : start + len(part)] = part
        return bytes(out)
