# -*- test-case-name: tests.test_connection -*-
"""
The sans-I/O server side of one NBD connection.

Bytes go in with L{ServerConnection.receive_data}; events come out, one at a
time, from L{ServerConnection.next_event}; bytes to send wait in
L{ServerConnection.data_to_send}. Replies to requests are encoded by the
C{reply_*} methods. There are no sockets, Deferreds or logging here: the
caller (L{twisted_nbd.protocol}) does the I/O, calls the backend, and logs
the reasons carried by L{RequestRejected} and L{OptionRejected}.

The connection owns everything the protocol specification says: the phase,
the negotiated features, the validation of every request against the export
(T-rules), and the draining of payloads that must be skipped (T-05).
Rule ids (H-, T-, C-) refer to the protocol digest the tests cite.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

from twisted_nbd import _wire as w
from twisted_nbd._buffer import NEED_DATA, ReceiveBuffer, _NeedData
from twisted_nbd._wire import Cmd, CmdFlags, Errno, Opt, Rep, TxFlags
from twisted_nbd.errors import ProtocolViolation
from twisted_nbd.exports import MAX_STRING, Export
from twisted_nbd.extents import plan_sparse_read
from twisted_nbd.interfaces import Capabilities, Extent

__all__ = [
    "NEED_DATA",
    "Aborted",
    "BlockStatusRequest",
    "CacheRequest",
    "DisconnectRequest",
    "Event",
    "ExportChosen",
    "FlushRequest",
    "OptionRejected",
    "ReadRequest",
    "Request",
    "RequestRejected",
    "ServerConnection",
    "TrimRequest",
    "WriteRequest",
    "WriteZeroesRequest",
    "plan_sparse_read",
]

#: The largest option payload we read into memory; larger ones are drained
#: and refused (H-06). Names and queries are at most 4096 bytes each.
MAX_OPTION_DATA = 64 * 1024
#: The meta context this server knows.
BASE_ALLOCATION = "base:allocation"
#: Its id in SET_META_CONTEXT replies and BLOCK_STATUS chunks.
BASE_ALLOCATION_ID = 1
#: The longest extent length a 32-bit descriptor can carry while staying a
#: multiple of every legal minimum block size (up to 64 KiB).
MAX_EXTENT_32 = 0x1_0000_0000 - 0x1_0000
#: At most this many descriptors in one BLOCK_STATUS chunk (T-17).
MAX_EXTENTS = 1 << 20




class Phase(enum.Enum):
    """Where the connection is."""

    CLIENT_FLAGS = "client flags"
    OPTIONS = "option haggling"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """The handshake is over: transmission on C{export} starts."""

    export: Export


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT; its ACK is queued. Close after sending it."""


@dataclass(frozen=True, slots=True)
class OptionRejected:
    """An option got an error reply (already queued); C{reason} says why."""

    option: int
    reply: Rep
    reason: str


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request got an error reply (already queued); C{reason} says why."""

    cookie: int
    command: int
    errno: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class DisconnectRequest:
    """NBD_CMD_DISC: finish what is in flight, then close (C-06)."""


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """NBD_CMD_READ of C{length} bytes at C{offset}."""

    cookie: int
    offset: int
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """NBD_CMD_WRITE of C{data} at C{offset}."""

    cookie: int
    offset: int
    data: bytes = field(repr=False)
    fua: bool

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """NBD_CMD_FLUSH."""

    cookie: int


@dataclass(frozen=True, slots=True)
class TrimRequest:
    """NBD_CMD_TRIM."""

    cookie: int
    offset: int
    length: int
    fua: bool


@dataclass(frozen=True, slots=True)
class WriteZeroesRequest:
    """NBD_CMD_WRITE_ZEROES."""

    cookie: int
    offset: int
    length: int
    fua: bool
    may_trim: bool
    fast: bool


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """NBD_CMD_CACHE."""

    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatusRequest:
    """NBD_CMD_BLOCK_STATUS for the selected C{base:allocation} context."""

    cookie: int
    offset: int
    length: int
    req_one: bool


Request = Union[
    ReadRequest,
    WriteRequest,
    FlushRequest,
    TrimRequest,
    WriteZeroesRequest,
    CacheRequest,
    BlockStatusRequest,
]

Event = Union[
    ExportChosen,
    Aborted,
    OptionRejected,
    RequestRejected,
    DisconnectRequest,
    ReadRequest,
    WriteRequest,
    FlushRequest,
    TrimRequest,
    WriteZeroesRequest,
    CacheRequest,
    BlockStatusRequest,
]


class _OptionError(Exception):
    """Raised inside option parsing: reply C{reply} with C{reason}."""

    def __init__(self, reply: Rep, reason: str) -> None:
        super().__init__(reply, reason)
        self.reply = reply
        self.reason = reason


class _Reader:
    """Bounds-checked reading of an option's data (H-11: never past its end)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        return int.from_bytes(self.bytes(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.bytes(4), "big")

    def bytes(self, count: int) -> bytes:
        if count > len(self.data) - self.pos:
            raise _OptionError(Rep.ERR_INVALID, "option data is shorter than its lengths say")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def string(self, count: int) -> str:
        if count > MAX_STRING:
            raise _OptionError(Rep.ERR_INVALID, f"string of {count} bytes exceeds {MAX_STRING}")
        try:
            return self.bytes(count).decode("utf-8")
        except UnicodeDecodeError:
            raise _OptionError(Rep.ERR_INVALID, "string is not valid UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _OptionError(Rep.ERR_INVALID, "option data is longer than its lengths say")


_WRITING = frozenset({int(Cmd.WRITE), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES)})
# Plain-int copies of the constants the per-request path uses.
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_TRIM, _CACHE, _WRITE_ZEROES = int(Cmd.TRIM), int(Cmd.CACHE), int(Cmd.WRITE_ZEROES)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FUA, _NO_HOLE, _DF = int(CmdFlags.FUA), int(CmdFlags.NO_HOLE), int(CmdFlags.DF)
_REQ_ONE, _FAST_ZERO = int(CmdFlags.REQ_ONE), int(CmdFlags.FAST_ZERO)
_PAYLOAD_LEN = int(CmdFlags.PAYLOAD_LEN)
_READ_ONLY = int(TxFlags.READ_ONLY)
_KNOWN_OPTIONS = frozenset(int(o) for o in Opt)


class ServerConnection:
    """
    The server side of one NBD connection, without I/O.

    @param lookup: finds the export a client names (the empty name is the
        default export); C{None} when there is none.
    @param exports: lists the exports NBD_OPT_LIST shows.
    """

    def __init__(
        self,
        lookup: Callable[[str], Export | None],
        exports: Callable[[], Iterable[Export]],
    ) -> None:
        self._lookup = lookup
        self._list = exports
        self._buffer = ReceiveBuffer()
        self._outbox: list[bytes] = []
        self.phase = Phase.CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured_replies = False
        self.extended_headers = False
        # (export name, selected context names) from the last SET_META_CONTEXT.
        self._meta: tuple[str, tuple[str, ...]] | None = None
        self.export: Export | None = None
        self.shutting_down = False
        self._caps = Capabilities()
        self.tx_flags = 0
        # Set by _enter_transmission for _validate.
        self._allowed: dict[int, int] = {}
        self._size = 0
        self._max_block = 0
        self._mask = 0
        self._block_status_ok = False
        # Bytes of payload still to be thrown away (T-05, H-04).
        self._discard = 0
        # An option or write header waiting for its data.
        self._pending_option: w.OptionHeader | None = None
        self._pending_write: w.RequestHeader | None = None
        self._outbox.append(
            w.encode_greeting(w.HandshakeFlags.FIXED_NEWSTYLE | w.HandshakeFlags.NO_ZEROES)
        )

    # ------------------------------------------------------------ I/O API

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes received from the client; nothing is parsed yet."""
        if self.phase is Phase.CLOSED:
            # After DISC or ABORT anything more is a client error: never act on it (C-06).
            return
        self._buffer.append(data)

    def shutdown(self) -> None:
        """
        The server is shutting down: from now on every option but ABORT gets
        ERR_SHUTDOWN (H-19) and every request ESHUTDOWN (C-07).
        """
        self.shutting_down = True

    def data_to_send(self) -> list[bytes]:
        """Take the bytes queued by the handshake and by rejected requests."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | _NeedData:
        """
        Parse what is buffered up to the next event.

        @return: the next event, or L{NEED_DATA} when the buffered bytes do
            not hold one.
        @raise ProtocolViolation: the client broke the protocol so that the
            connection must be dropped (the phase is then C{CLOSED}).
        """
        try:
            while self.phase is not Phase.CLOSED:
                if self._discard:
                    self._discard -= self._buffer.skip(self._discard)
                    if self._discard:
                        return NEED_DATA
                    continue
                event = self._step()
                if event is not None:
                    return event
        except ProtocolViolation:
            self.phase = Phase.CLOSED
            raise
        return NEED_DATA

    def _step(self) -> Event | _NeedData | None:
        """One parsing step; C{None} means go round again."""
        if self.phase is Phase.CLIENT_FLAGS:
            return self._client_flags()
        if self.phase is Phase.OPTIONS:
            return self._option()
        return self._request()

    # ------------------------------------------------------------ handshake

    def _client_flags(self) -> _NeedData | None:
        if len(self._buffer) < 4:
            return NEED_DATA
        (flags,) = w.CLIENT_FLAGS.unpack(self._buffer.take(4))
        # Plain ints: IntFlag's ~ only complements within the members it knows.
        known = int(w.ClientFlags.C_FIXED_NEWSTYLE | w.ClientFlags.C_NO_ZEROES)
        if flags & ~known:
            raise ProtocolViolation(f"client flags {flags:#x} set bits we did not offer (H-02)")
        self.fixed_newstyle = bool(flags & w.ClientFlags.C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & w.ClientFlags.C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return None

    def _option(self) -> Event | _NeedData | None:
        header = self._pending_option
        if header is None:
            if len(self._buffer) < w.OPTION_HEADER.size:
                return NEED_DATA
            magic, header = w.decode_option_header(self._buffer.take(w.OPTION_HEADER.size))
            if magic != w.IHAVEOPT:
                raise ProtocolViolation(f"option magic {magic:#x} is not IHAVEOPT (H-03)")
            if not self.fixed_newstyle and header.option != Opt.EXPORT_NAME:
                raise ProtocolViolation(
                    f"option {header.option} without fixed newstyle, which allows only EXPORT_NAME"
                )
            if header.length > MAX_OPTION_DATA:
                # Never buffer it (H-06): throw it away as it arrives.
                self._discard = header.length
                if header.option == Opt.EXPORT_NAME:
                    raise ProtocolViolation("NBD_OPT_EXPORT_NAME data is too long")
                return self._option_error(
                    header.option,
                    Rep.ERR_TOO_BIG if header.option in _KNOWN_OPTIONS else Rep.ERR_UNSUP,
                    f"option data of {header.length} bytes is over {MAX_OPTION_DATA}",
                )
            self._pending_option = header
        if len(self._buffer) < header.length:
            return NEED_DATA
        self._pending_option = None
        data = self._buffer.take(header.length)
        try:
            return self._handle_option(header.option, data)
        except _OptionError as e:
            return self._option_error(header.option, e.reply, e.reason)

    def _reply(self, option: int, reply: Rep, data: bytes = b"") -> None:
        self._outbox.append(w.encode_option_reply(option, reply, data))

    def _option_error(self, option: int, reply: Rep, reason: str) -> OptionRejected:
        self._reply(option, reply, reason.encode("utf-8")[:MAX_STRING])
        return OptionRejected(option, reply, reason)

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if self.shutting_down and option != Opt.ABORT:
            if option == Opt.EXPORT_NAME:
                raise ProtocolViolation("NBD_OPT_EXPORT_NAME while the server shuts down")
            raise _OptionError(Rep.ERR_SHUTDOWN, "the server is shutting down (H-19)")
        if option == Opt.EXPORT_NAME:
            return self._export_name(data)
        if option == Opt.ABORT:
            # H-08: ACK whatever data came with it, then the client closes.
            self._reply(option, Rep.ACK)
            self.phase = Phase.CLOSED
            return Aborted()
        if option == Opt.LIST:
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data (H-07)")
            for export in self._list():
                self._reply(option, Rep.SERVER, w.encode_server(export.name, export.description))
            self._reply(option, Rep.ACK)
            return None
        if option in (Opt.INFO, Opt.GO):
            return self._info_or_go(option, data)
        if option == Opt.STRUCTURED_REPLY:
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data (H-07)")
            if self.extended_headers:
                raise _OptionError(
                    Rep.ERR_EXT_HEADER_REQD,
                    "extended headers are on; they imply structured replies",
                )
            if self.structured_replies:
                raise _OptionError(Rep.ERR_INVALID, "structured replies are already on (H-17)")
            self.structured_replies = True
            self._reply(option, Rep.ACK)
            return None
        if option == Opt.EXTENDED_HEADERS:
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data (H-07)")
            if self.extended_headers:
                raise _OptionError(Rep.ERR_INVALID, "extended headers are already on (H-17)")
            # They take precedence over structured replies and imply them.
            self.extended_headers = True
            self.structured_replies = True
            self._reply(option, Rep.ACK)
            return None
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        if option == Opt.STARTTLS:
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data (H-07)")
            raise _OptionError(Rep.ERR_POLICY, "TLS is not configured on this server (S-02)")
        name = Opt(option).name if option in _KNOWN_OPTIONS else str(option)
        raise _OptionError(Rep.ERR_UNSUP, f"option {name} is not supported (H-04)")

    def _export_name(self, data: bytes) -> ExportChosen:
        if self.extended_headers:
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME name is not UTF-8") from None
        export = self._lookup(name)
        if export is None:
            # H-09: EXPORT_NAME cannot be answered with an error, only a close.
            raise ProtocolViolation(f"unknown export {name!r} requested with NBD_OPT_EXPORT_NAME")
        self._enter_transmission(export)
        self._outbox.append(w.encode_export_name_reply(export.size, self.tx_flags, self.no_zeroes))
        return ExportChosen(export)

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        reader = _Reader(data)
        name = reader.string(reader.u32())
        count = reader.u16()
        requests = [reader.u16() for _ in range(count)]
        reader.end()
        export = self._lookup(name)
        if export is None:
            # H-13: no INFO replies before the error; the connection stays usable.
            raise _OptionError(Rep.ERR_UNKNOWN, f"there is no export named {name!r}")
        caps = export.capabilities
        tx_flags = self._tx_flags(caps, export.read_only)
        self._reply(option, Rep.INFO, w.encode_info_export(export.size, tx_flags))
        if w.Info.NAME in requests:
            self._reply(option, Rep.INFO, w.encode_info_text(w.Info.NAME, export.name))
        if w.Info.DESCRIPTION in requests and export.description:
            self._reply(
                option, Rep.INFO, w.encode_info_text(w.Info.DESCRIPTION, export.description)
            )
        # Block sizes go out even unasked, so clients that honour them can (H-15: we
        # never demand that they ask).
        self._reply(
            option,
            Rep.INFO,
            w.encode_info_block_size(caps.min_block, caps.preferred_block, caps.max_block),
        )
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._enter_transmission(export)
            return ExportChosen(export)
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            # SET replaces the selection even when it fails.
            self._meta = None
        reader = _Reader(data)
        name = reader.string(reader.u32())
        count = reader.u32()
        queries = [reader.string(reader.u32()) for _ in range(count)]
        reader.end()
        if not self.structured_replies:
            raise _OptionError(
                Rep.ERR_INVALID, "meta contexts need structured replies to be negotiated first"
            )
        for query in queries:
            if ":" not in query or query.startswith(":"):
                raise _OptionError(Rep.ERR_INVALID, f"query {query!r} has no namespace (H-16)")
        export = self._lookup(name)
        if export is None:
            raise _OptionError(Rep.ERR_UNKNOWN, f"there is no export named {name!r}")
        available = [BASE_ALLOCATION] if export.capabilities.can_extents else []
        if setting:
            chosen = [c for c in available if c in queries]
        elif not queries:
            chosen = available
        else:
            chosen = [c for c in available if c in queries or "base:" in queries]
        for context in chosen:
            context_id = BASE_ALLOCATION_ID if setting else 0
            self._reply(option, Rep.META_CONTEXT, w.encode_meta_context(context_id, context))
        self._reply(option, Rep.ACK)
        if setting:
            self._meta = (name, tuple(chosen))

    def _tx_flags(self, caps: Capabilities, read_only: bool) -> int:
        flags = TxFlags.HAS_FLAGS
        if not caps.can_write or read_only:
            flags |= TxFlags.READ_ONLY
        if caps.can_flush:
            flags |= TxFlags.SEND_FLUSH
        if caps.can_fua and caps.can_write:
            flags |= TxFlags.SEND_FUA
        if caps.rotational:
            flags |= TxFlags.ROTATIONAL
        if caps.can_trim and caps.can_write:
            flags |= TxFlags.SEND_TRIM
        if caps.can_zero and caps.can_write:
            flags |= TxFlags.SEND_WRITE_ZEROES
            if caps.can_fast_zero:
                flags |= TxFlags.SEND_FAST_ZERO
        if self.structured_replies:
            # H-20: DF only once structured replies are on; every READ reply is one chunk.
            flags |= TxFlags.SEND_DF
        if caps.can_multi_conn:
            flags |= TxFlags.CAN_MULTI_CONN
        if caps.can_cache:
            flags |= TxFlags.SEND_CACHE
        return int(flags)

    def _enter_transmission(self, export: Export) -> None:
        self.export = export
        caps = self._caps = export.capabilities
        tx = self.tx_flags = self._tx_flags(caps, export.read_only)
        self.phase = Phase.TRANSMISSION
        # Tables for _validate, which runs for every request: the flags each
        # command accepts here, as plain ints (IntFlag arithmetic is slow, and
        # its ~ only complements within the members it knows).
        optional = [(tx & TxFlags.SEND_FUA, _FUA), (tx & TxFlags.SEND_DF, _DF)]
        optional.append((tx & TxFlags.SEND_FAST_ZERO, _FAST_ZERO))
        refused = sum(flag for advertised, flag in optional if not advertised)
        extra = int(CmdFlags.PAYLOAD_LEN) if self.extended_headers else 0
        supported: dict[int, bool] = {
            Cmd.READ: True,
            Cmd.WRITE: not tx & _READ_ONLY,
            Cmd.FLUSH: caps.can_flush,
            Cmd.TRIM: bool(tx & TxFlags.SEND_TRIM),
            Cmd.CACHE: True,
            Cmd.WRITE_ZEROES: bool(tx & TxFlags.SEND_WRITE_ZEROES),
            Cmd.BLOCK_STATUS: True,
        }
        self._allowed = {
            int(command): (int(flags) & ~refused) | extra
            for command, flags in w.COMMAND_FLAGS.items()
            if supported[command]
        }
        self._size = export.size
        self._max_block = caps.max_block
        self._mask = caps.min_block - 1
        self._block_status_ok = bool(
            self._meta is not None and self._meta[1] and self._lookup(self._meta[0]) is export
        )

    # ------------------------------------------------------------ transmission

    def _request(self) -> Event | _NeedData | None:
        header = self._pending_write
        if header is None:
            size = w.EXTENDED_REQUEST.size if self.extended_headers else w.REQUEST.size
            if len(self._buffer) < size:
                return NEED_DATA
            header = w.decode_request(self._buffer.take(size), self.extended_headers)
            expected = w.EXTENDED_REQUEST_MAGIC if self.extended_headers else w.REQUEST_MAGIC
            if header.magic != expected:
                raise ProtocolViolation(f"request magic {header.magic:#x} is wrong (T-01)")
            if self.extended_headers:
                # Extended headers: a payload follows exactly when PAYLOAD_LEN is set.
                has_payload = bool(header.flags & _PAYLOAD_LEN)
                if has_payload and header.length > self._caps.max_block:
                    raise ProtocolViolation(
                        f"payload of {header.length} bytes is over the maximum "
                        f"{self._caps.max_block} (extended headers say: hard close)"
                    )
            else:
                has_payload = header.type == _WRITE
            if has_payload != (header.type == _WRITE):
                # Only with extended headers can these disagree; say so before
                # anything else, since the length field means something else.
                rejection: RequestRejected | None = self._reject(
                    header,
                    Errno.EINVAL,
                    "WRITE must carry PAYLOAD_LEN"
                    if header.type == Cmd.WRITE
                    else f"command {header.type} takes no payload",
                )
            else:
                rejection = self._validate(header)
            if not has_payload:
                return rejection if rejection is not None else self._make_request(header)
            if rejection is not None:
                # T-05: the payload is on the wire whatever we think of it.
                self._discard = header.length
                return rejection
            if header.length == 0:
                self._outbox.append(self._ok(header.cookie, header.offset))  # T-09
                return None
            self._pending_write = header
        if len(self._buffer) < header.length:
            return NEED_DATA
        self._pending_write = None
        return WriteRequest(
            header.cookie,
            header.offset,
            self._buffer.take(header.length),
            bool(header.flags & _FUA),
        )

    def _reject(self, header: w.RequestHeader, errno: Errno, reason: str) -> RequestRejected:
        is_read = header.type == Cmd.READ
        self._outbox.extend(self._error(header.cookie, header.offset, errno, reason, is_read))
        return RequestRejected(header.cookie, header.type, errno, reason)

    def _validate(self, h: w.RequestHeader) -> RequestRejected | None:
        """
        Check a request against the rules and the export; the rejection if
        any. This runs for every request, so it works on plain ints and the
        tables L{_enter_transmission} made; names are looked up only to
        explain a rejection.
        """
        command = h.type
        if command == _DISC:
            # DISC gets no reply, so there is nothing to reject: just stop.
            return None
        allowed = self._allowed.get(command)
        if allowed is None:
            return self._reject_unsupported(h)
        if self.shutting_down:
            return self._reject(h, Errno.ESHUTDOWN, "the server is shutting down (C-07)")
        if h.flags & ~allowed:
            return self._reject(
                h,
                Errno.EINVAL,
                f"flags {h.flags:#x} are not valid for {Cmd(command).name} (T-04)",
            )
        offset, length = h.offset, h.length
        if command == _FLUSH:
            if offset or length:
                return self._reject(h, Errno.EINVAL, "FLUSH must have zero offset and length")
            return None
        if command == _BLOCK_STATUS and not self._block_status_ok:
            return self._reject(
                h, Errno.EINVAL, "BLOCK_STATUS without a selected meta context (T-17)"
            )
        size = self._size
        if offset > size or length > size - offset:
            errno = Errno.ENOSPC if command in (_WRITE, _WRITE_ZEROES) else Errno.EINVAL
            return self._reject(
                h,
                errno,
                f"{Cmd(command).name} of {length} bytes at {offset} is beyond the "
                f"export size {size} (T-06)",
            )
        if length > self._max_block and command in (_READ, _WRITE):
            return self._reject(
                h,
                Errno.EINVAL,
                f"{Cmd(command).name} of {length} bytes is over the maximum payload "
                f"{self._max_block} (T-10)",
            )
        mask = self._mask
        if (offset & mask or length & mask) and not (
            # The tail of an export whose size is not a multiple of min_block.
            offset + length == size and not offset & mask
        ):
            return self._reject(
                h,
                Errno.EINVAL,
                f"{Cmd(command).name} at {offset} of {length} bytes is not aligned to the "
                f"minimum block size {mask + 1} (T-07)",
            )
        if command == _BLOCK_STATUS and length == 0:
            return self._reject(h, Errno.EINVAL, "BLOCK_STATUS of zero bytes")
        return None

    def _reject_unsupported(self, h: w.RequestHeader) -> RequestRejected:
        """Refuse a command this export does not take, saying why."""
        try:
            name = Cmd(h.type).name
        except ValueError:
            return self._reject(h, Errno.EINVAL, f"unknown command {h.type} (T-03)")
        if h.type in _WRITING and self.tx_flags & _READ_ONLY:
            return self._reject(h, Errno.EPERM, f"{name} on a read-only export (T-08)")
        return self._reject(h, Errno.EINVAL, f"{name} is not supported on this export (T-03)")

    def _make_request(self, h: w.RequestHeader) -> Event | None:
        command, flags = h.type, h.flags
        if command == _READ:
            return ReadRequest(h.cookie, h.offset, h.length, flags)
        if command == _DISC:
            self.phase = Phase.CLOSED
            return DisconnectRequest()
        if command == _FLUSH:
            return FlushRequest(h.cookie)
        if h.length == 0:
            # T-09: nothing to do; say so at once rather than bother the backend.
            self._outbox.append(self._ok(h.cookie, h.offset))
            return None
        fua = bool(flags & _FUA)
        if command == _TRIM:
            return TrimRequest(h.cookie, h.offset, h.length, fua)
        if command == _WRITE_ZEROES:
            return WriteZeroesRequest(
                h.cookie,
                h.offset,
                h.length,
                fua,
                may_trim=not flags & _NO_HOLE,
                fast=bool(flags & _FAST_ZERO),
            )
        if command == _CACHE:
            return CacheRequest(h.cookie, h.offset, h.length)
        return BlockStatusRequest(h.cookie, h.offset, h.length, bool(flags & _REQ_ONE))

    # ------------------------------------------------------------ replies

    def _ok(self, cookie: int, offset: int) -> bytes:
        if self.structured_replies:
            return w.encode_chunk_header(
                w.ReplyFlags.DONE, w.ChunkType.NONE, cookie, 0, offset, self.extended_headers
            )
        return w.encode_simple_reply(0, cookie)

    def _error(
        self, cookie: int, offset: int, errno: int, message: str, is_read: bool
    ) -> list[bytes]:
        if self.structured_replies:
            payload = w.encode_error_payload(errno, message)
            head = w.encode_chunk_header(
                w.ReplyFlags.DONE,
                w.ChunkType.ERROR,
                cookie,
                len(payload),
                offset,
                self.extended_headers,
            )
            return [head, payload]
        # T-12: a failed READ carries no data in a simple reply.
        return [w.encode_simple_reply(errno, cookie)]

    def reply_ok(self, request: Request) -> list[bytes]:
        """The bytes of a success reply without data (anything but READ)."""
        return [self._ok(request.cookie, getattr(request, "offset", 0))]

    def reply_read(self, request: ReadRequest, data: bytes) -> list[bytes]:
        """
        The bytes of a successful READ reply carrying C{data}, which must be
        exactly C{request.length} bytes.
        """
        if not self.structured_replies:
            return [w.encode_simple_reply(0, request.cookie), data]
        if not data:
            return [self._ok(request.cookie, request.offset)]
        head = w.encode_chunk_header(
            w.ReplyFlags.DONE,
            w.ChunkType.OFFSET_DATA,
            request.cookie,
            8 + len(data),
            request.offset,
            self.extended_headers,
        )
        return [head, w.U64.pack(request.offset), data]

    def reply_read_sparse(
        self, request: ReadRequest, segments: Sequence[tuple[int, bytes | int]]
    ) -> list[bytes]:
        """
        The bytes of a successful structured READ reply made of OFFSET_DATA
        chunks for C{(offset, data)} segments and OFFSET_HOLE chunks for
        C{(offset, hole_length)} ones (T-14/T-15). The segments must be
        consecutive and cover the request; the last chunk carries DONE.
        """
        out: list[bytes] = []
        last = len(segments) - 1
        for index, (offset, part) in enumerate(segments):
            flags = w.ReplyFlags.DONE if index == last else 0
            if isinstance(part, int):
                payload = w.OFFSET_HOLE.pack(offset, part)
                out.append(
                    w.encode_chunk_header(
                        flags,
                        w.ChunkType.OFFSET_HOLE,
                        request.cookie,
                        len(payload),
                        request.offset,
                        self.extended_headers,
                    )
                )
                out.append(payload)
            else:
                out.append(
                    w.encode_chunk_header(
                        flags,
                        w.ChunkType.OFFSET_DATA,
                        request.cookie,
                        8 + len(part),
                        request.offset,
                        self.extended_headers,
                    )
                )
                out.append(w.U64.pack(offset))
                out.append(part)
        return out

    def reply_error(self, request: Request, errno: int, message: str = "") -> list[bytes]:
        """The bytes of an error reply to C{request}."""
        return self._error(
            request.cookie,
            getattr(request, "offset", 0),
            errno,
            message,
            isinstance(request, ReadRequest),
        )

    def reply_block_status(
        self, request: BlockStatusRequest, extents: Sequence[Extent]
    ) -> list[bytes]:
        """
        The bytes of a BLOCK_STATUS reply. The extents are clamped to the
        request and the export (T-17): consecutive, none empty, none longer
        than 32 bits allow, at most one with REQ_ONE, none past the end.
        """
        size = self.export.size if self.export is not None else 0
        end = request.offset + request.length
        pos = request.offset
        # Compact replies carry 32-bit lengths; extended ones 64-bit.
        limit = (1 << 64) - 1 if self.extended_headers else MAX_EXTENT_32
        out: list[tuple[int, int]] = []
        for extent in extents:
            if pos >= end or pos >= size or len(out) >= MAX_EXTENTS:
                break
            length = min(extent.length, size - pos, limit)
            if request.req_one:
                length = min(length, request.length)
            if length <= 0:
                break
            flags = extent.flags & 3
            if out and out[-1][1] == flags and out[-1][0] + length <= limit:
                out[-1] = (out[-1][0] + length, flags)
            else:
                out.append((length, flags))
            pos += length
            if request.req_one or length < extent.length:
                # Cut short: what follows in the backend's list would start at
                # the wrong offset, so end here (returning less is allowed).
                break
        if not out:
            # A backend that said nothing: status 0 ("allocated, not known to be zero")
            # is always a truthful answer.
            out.append((min(request.length, limit), 0))
        if self.extended_headers:
            chunk_type = w.ChunkType.BLOCK_STATUS_EXT
            payload = w.BLOCK_STATUS_EXT_HEAD.pack(BASE_ALLOCATION_ID, len(out)) + b"".join(
                w.EXTENT_EXT.pack(length, flags) for length, flags in out
            )
        else:
            chunk_type = w.ChunkType.BLOCK_STATUS
            payload = w.U32.pack(BASE_ALLOCATION_ID) + b"".join(
                w.EXTENT.pack(length, flags) for length, flags in out
            )
        head = w.encode_chunk_header(
            w.ReplyFlags.DONE,
            chunk_type,
            request.cookie,
            len(payload),
            request.offset,
            self.extended_headers,
        )
        return [head, payload]
