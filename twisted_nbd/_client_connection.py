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
and how to fall back when the server refuses one: the tables
L{ClientConnection._OPEN_PLAN} and L{ClientConnection._LIST_PLAN}), the
framing of requests, and the checking of every reply chunk against the
request it answers. What may be sent is
decided by the same L{check_request} the server applies. A server that
breaks the protocol makes L{ClientConnection.next_event} raise
L{ProtocolViolation}; the connection cannot be used after that.

Rule ids (H-, T-, C-) refer to the protocol digest the tests cite.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Callable, ClassVar, NamedTuple, Sequence

from twisted_nbd import _wire as w
from twisted_nbd._buffer import _NeedData
from twisted_nbd._client_events import (
    AbortAcknowledged,
    BlockSize,
    ClientEvent,
    ExportInfo,
    ExportsListed,
    HandshakeComplete,
    HandshakeRefused,
    NBDHandshakeError,
    Reply,
    ReplyReceived,
    TLSStarting,
)
from twisted_nbd._kernel import (
    NEED_DATA,
    Negotiated,
    Phase,
    SansIOConnection,
    TransmissionRules,
    check_request,
)
from twisted_nbd._wire import ChunkType, Cmd, CmdFlags, Errno, Opt, Rep, ReplyFlags
from twisted_nbd.errors import NBDError, ProtocolViolation
from twisted_nbd.interfaces import Extent

__all__ = [
    "NEED_DATA",
    "AbortAcknowledged",
    "BlockSize",
    "ClientConfiguration",
    "ClientConnection",
    "ClientEvent",
    "ExportInfo",
    "ExportsListed",
    "HandshakeComplete",
    "HandshakeRefused",
    "NBDHandshakeError",
    "Phase",
    "Reply",
    "ReplyReceived",
    "TLSStarting",
]

#: The block size constraints a server that says nothing is assumed to have
#: (spec section 5).
DEFAULT_BLOCK_SIZE_MIN = 1
DEFAULT_BLOCK_SIZE_PREFERRED = 4096


@dataclass(frozen=True)
class ClientConfiguration:
    """
    What a client connection asks the server for.

    @ivar export_name: the export to open.
    @ivar structured_replies: ask for structured replies.
    @ivar meta_contexts: the meta contexts to select when structured replies
        are on.
    @ivar extended_headers: ask for extended headers first (only together
        with structured replies, which they imply).
    @ivar list_exports: do not open an export: send NBD_OPT_LIST, then
        NBD_OPT_ABORT.
    @ivar tls: C{"off"}: never ask for TLS; C{"require"}: send STARTTLS
        first and give up if the server refuses; C{"allow"}: ask, and go on
        in plaintext if refused (libnbd's C{tls=allow}). The caller does
        the TLS itself when it sees L{TLSStarting}.
    """

    export_name: str = ""
    structured_replies: bool = True
    meta_contexts: Sequence[str] = (w.BASE_ALLOCATION,)
    extended_headers: bool = True
    list_exports: bool = False
    tls: str = "off"

    def __post_init__(self) -> None:
        if isinstance(self.meta_contexts, str):
            raise TypeError("meta_contexts is a sequence of names, not one string")
        object.__setattr__(self, "meta_contexts", tuple(str(c) for c in self.meta_contexts))
        if self.tls not in ("off", "allow", "require"):
            raise ValueError(f"tls must be 'off', 'allow' or 'require', not {self.tls!r}")
        w.encode_string(self.export_name, "the export name")
        for context in self.meta_contexts:
            w.encode_string(context, "a meta context name")


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


def nbd_error(errno: int, message: str) -> NBDError:
    """
    An L{NBDError} for an error number from the wire; unknown numbers are
    treated like C{EINVAL}, as the spec tells clients to (section 2.8).
    """
    if errno in w.KNOWN_ERRNOS:
        return NBDError(errno, message)
    detail = f"unknown error number {errno}"
    return NBDError(Errno.EINVAL, f"{detail}: {message}" if message else detail)


_READ = int(Cmd.READ)
_DISC = int(Cmd.DISC)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_DF = int(CmdFlags.DF)
_REQ_ONE = int(CmdFlags.REQ_ONE)
_DONE = int(ReplyFlags.DONE)


class _Step(NamedTuple):
    """
    One option of the handshake plan.

    @ivar wanted: whether to send it, given what is negotiated so far.
    @ivar data: its payload.
    @ivar reply: handles a non-error reply (several may come for one option).
    @ivar failed: handles an error reply: fall back, or give up.
    """

    option: int
    wanted: Callable[[ClientConnection], bool]
    data: Callable[[ClientConnection], bytes]
    reply: Callable[[ClientConnection, int, bytes], ClientEvent | None]
    failed: Callable[[ClientConnection, int, str], ClientEvent | None]


class ClientConnection(SansIOConnection[ClientEvent]):
    """
    The client side of one NBD connection, without I/O.

    Construct it, send L{data_to_send} once the connection is up, and feed
    it what the server sends. The handshake runs by itself: a
    L{HandshakeComplete} event says transmission has begun (or
    L{ExportsListed} in listing mode, or L{HandshakeRefused}).

    @param config: what to ask for; the defaults (the default export,
        structured replies, extended headers, C{base:allocation}) if
        C{None}.

    @ivar phase: the current L{Phase}.
    @ivar info: the L{ExportInfo} once transmission has started.
    @ivar rules: the L{TransmissionRules} once transmission has started.
    """

    def __init__(self, config: ClientConfiguration | None = None) -> None:
        super().__init__(Phase.GREETING)
        self.config = config if config is not None else ClientConfiguration()
        self.info: ExportInfo | None = None
        self.rules: TransmissionRules | None = None
        # The plan being followed, and where in it we are.
        self._plan = self._LIST_PLAN if self.config.list_exports else self._OPEN_PLAN
        self._position = -1
        self._option: int | None = None
        self._option_header: w.OptionReplyHeader | None = None
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
        self._chunk: w.ChunkHeader | None = None  # a chunk waiting for its payload
        self._simple_read: _InFlight | None = None  # a simple READ reply's data to come

    @property
    def in_flight(self) -> int:
        """The number of requests sent and not yet answered."""
        return len(self._in_flight)

    def _step(self) -> ClientEvent | _NeedData | None:
        if self.phase is Phase.TRANSMISSION:
            return self._reply()
        if self.phase is Phase.OPTIONS or self.phase is Phase.ABORTING:
            return self._option_reply()
        if self.phase is Phase.EXPORT_NAME:
            return self._export_name_reply()
        if self.phase is Phase.STARTING_TLS:
            if len(self._buffer):
                raise ProtocolViolation("data before the TLS handshake (S-07)")
            return NEED_DATA
        return self._greeting()

    # ------------------------------------------------------------ handshake

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._send(w.encode_option(option, data))

    def _greeting(self) -> ClientEvent | _NeedData | None:
        raw = self._take(w.GREETING_SIZE)
        if raw is NEED_DATA:
            return NEED_DATA
        try:
            flags = w.decode_greeting(raw)
        except w.WireError as e:
            raise ProtocolViolation(str(e)) from None
        # Echo exactly the flags we understand and were offered (H-02).
        client = flags & w.KNOWN_CLIENT_FLAGS
        self.negotiated = Negotiated(
            fixed_newstyle=bool(client & w.ClientFlags.C_FIXED_NEWSTYLE),
            no_zeroes=bool(client & w.ClientFlags.C_NO_ZEROES),
        )
        self._send(w.encode_client_flags(client))
        if not self.negotiated.fixed_newstyle:
            # Only NBD_OPT_EXPORT_NAME is possible.
            if self.config.list_exports:
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
        """Send the next option of the plan that is wanted now."""
        plan = self._plan
        while True:
            self._position += 1
            step = plan[self._position]
            if step.wanted(self):
                self._send_option(step.option, step.data(self))
                return

    def _send_export_name(self) -> None:
        self._option = Opt.EXPORT_NAME
        self._send(w.encode_option(Opt.EXPORT_NAME, self.config.export_name.encode("utf-8")))
        self.phase = Phase.EXPORT_NAME

    def _abort_handshake(self, error: NBDHandshakeError) -> HandshakeRefused:
        self._send_option(Opt.ABORT)
        self.phase = Phase.ABORTING
        return HandshakeRefused(error)

    def _option_reply(self) -> ClientEvent | _NeedData | None:
        header = self._option_header
        if header is None:
            raw = self._take(w.OPTION_REPLY_HEADER_SIZE)
            if raw is NEED_DATA:
                return NEED_DATA
            try:
                header = w.decode_option_reply_header(raw)
            except w.WireError as e:
                raise ProtocolViolation(str(e)) from None
            if header.option != self._option:
                raise ProtocolViolation(
                    f"option reply for option {header.option} while waiting for "
                    f"{self._option} (H-05)"
                )
            if header.length > w.MAX_OPTION_REPLY:
                raise ProtocolViolation(f"option reply of {header.length} bytes is too long")
            self._option_header = header
        if len(self._buffer) < header.length:
            return NEED_DATA
        self._option_header = None
        data = self._buffer.take(header.length)
        if self.phase is Phase.ABORTING:
            # Whatever the answer, the session is over.
            self.phase = Phase.CLOSED
            return AbortAcknowledged()
        step = self._plan[self._position]
        try:
            if header.reply & w.REP_ERROR_BIT:
                return step.failed(self, header.reply, w.decode_text(data))
            return step.reply(self, header.reply, data)
        except w.WireError as e:
            raise ProtocolViolation(str(e)) from None

    # ------------------------------------------------------------ the plan's handlers

    @staticmethod
    def _ack(reply: int, data: bytes, option: int) -> None:
        """The only reply an option may get here is a bare ACK."""
        if reply != Rep.ACK:
            raise ProtocolViolation(f"reply type {reply} to {w.option_name(option)}")
        if data:
            raise ProtocolViolation("an NBD_REP_ACK with data")

    def _want_tls(self) -> bool:
        return self.config.tls != "off"

    def _tls_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        self._ack(reply, data, Opt.STARTTLS)
        if len(self._buffer):
            # Bytes after the ACK are TLS, which the caller must decrypt (S-06).
            raise ProtocolViolation("data after the NBD_OPT_STARTTLS reply before TLS (S-07)")
        # S-06: what was negotiated before is forgotten (nothing, here).
        self.negotiated = self.negotiated.after_starttls()
        self.phase = Phase.STARTING_TLS
        return TLSStarting()

    def tls_started(self) -> None:
        """
        The caller has switched its transport to TLS (after L{TLSStarting}):
        go on with the handshake; what is sent from now on goes through TLS.
        """
        if self.phase is not Phase.STARTING_TLS:
            raise RuntimeError("no STARTTLS is waiting for TLS")
        self.phase = Phase.OPTIONS
        self._next_option()

    def _tls_failed(self, reply: int, message: str) -> ClientEvent | None:
        if self.config.tls == "require":
            return self._give_up(reply, message)
        self._next_option()
        return None

    def _want_extended(self) -> bool:
        return self.config.extended_headers and self.config.structured_replies

    def _want_structured(self) -> bool:
        return self.config.structured_replies and not self.negotiated.structured_replies

    def _want_meta(self) -> bool:
        return bool(self.config.meta_contexts) and self.negotiated.structured_replies

    def _always(self) -> bool:
        return True

    def _no_data(self) -> bytes:
        return b""

    def _meta_data(self) -> bytes:
        return w.encode_meta_context_request(self.config.export_name, self.config.meta_contexts)

    def _go_data(self) -> bytes:
        infos = (w.Info.NAME, w.Info.DESCRIPTION, w.Info.BLOCK_SIZE)
        return w.encode_info_request(self.config.export_name, infos)

    def _extended_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        self._ack(reply, data, Opt.EXTENDED_HEADERS)
        self.negotiated = _replace(self.negotiated, structured_replies=True, extended_headers=True)
        self._next_option()
        return None

    def _structured_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        self._ack(reply, data, Opt.STRUCTURED_REPLY)
        self.negotiated = _replace(self.negotiated, structured_replies=True)
        self._next_option()
        return None

    def _fall_back(self, reply: int, message: str) -> ClientEvent | None:
        # EXTENDED_HEADERS refused: try structured replies; those refused:
        # simple replies.
        self._next_option()
        return None

    def _meta_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        if reply == Rep.META_CONTEXT:
            context = w.decode_meta_context(data)
            if context.context_id in self._contexts_selected.values():
                raise ProtocolViolation(f"meta context id {context.context_id} was given twice")
            self._contexts_selected[context.name] = context.context_id
            return None
        self._ack(reply, data, Opt.SET_META_CONTEXT)
        self.negotiated = _replace(
            self.negotiated,
            meta_export=self.config.export_name,
            meta_contexts=dict(self._contexts_selected),
        )
        self._next_option()
        return None

    def _meta_failed(self, reply: int, message: str) -> ClientEvent | None:
        # SET replaces the selection even when it fails: none is selected.
        self._contexts_selected = {}
        self.negotiated = _replace(self.negotiated, meta_export=None, meta_contexts={})
        self._next_option()
        return None

    def _list_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        if reply == Rep.SERVER:
            entry = w.decode_server(data)
            self._exports.append((entry.name, entry.description))
            return None
        self._ack(reply, data, Opt.LIST)
        exports = tuple(self._exports)
        self._send_option(Opt.ABORT)
        self.phase = Phase.ABORTING
        return ExportsListed(exports)

    def _go_reply(self, reply: int, data: bytes) -> ClientEvent | None:
        if reply == Rep.INFO:
            info = w.decode_info(data)
            if isinstance(info, w.InfoExport):
                self._size, self._tx_flags = info.size, info.flags
            elif isinstance(info, w.InfoBlockSize):
                self._block_size = BlockSize(info.minimum, info.preferred, info.maximum)
            elif isinstance(info, w.InfoText):
                if info.info == w.Info.NAME:
                    self._canonical = info.text
                else:
                    self._description = info.text
            # Unknown information types are ignored.
            return None
        self._ack(reply, data, Opt.GO)
        if self._size is None:
            raise ProtocolViolation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT (H-12)")
        return self._start_transmission()

    def _go_failed(self, reply: int, message: str) -> ClientEvent | None:
        if reply == Rep.ERR_UNSUP and not self.negotiated.extended_headers:
            # An old server: the only other way in (a client that negotiated
            # extended headers must not use it, and the server must not say this).
            self._size = None
            self._canonical = None
            self._description = ""
            self._block_size = None
            self._send_export_name()
            return None
        return self._give_up(reply, message)

    def _give_up(self, reply: int, message: str) -> ClientEvent:
        assert self._option is not None
        return self._abort_handshake(NBDHandshakeError(self._option, reply, message))

    #: Opening an export: the options in the order they are tried. Each is
    #: sent if C{wanted} says so when its turn comes; error replies to the
    #: first three fall back to the next, GO falls back to EXPORT_NAME.
    _OPEN_PLAN: ClassVar[tuple[_Step, ...]] = (
        _Step(Opt.STARTTLS, _want_tls, _no_data, _tls_reply, _tls_failed),
        _Step(Opt.EXTENDED_HEADERS, _want_extended, _no_data, _extended_reply, _fall_back),
        _Step(Opt.STRUCTURED_REPLY, _want_structured, _no_data, _structured_reply, _fall_back),
        _Step(Opt.SET_META_CONTEXT, _want_meta, _meta_data, _meta_reply, _meta_failed),
        _Step(Opt.GO, _always, _go_data, _go_reply, _go_failed),
    )
    #: Listing the exports.
    _LIST_PLAN: ClassVar[tuple[_Step, ...]] = (
        _Step(Opt.STARTTLS, _want_tls, _no_data, _tls_reply, _tls_failed),
        _Step(Opt.LIST, _always, _no_data, _list_reply, _give_up),
    )

    def _export_name_reply(self) -> ClientEvent | _NeedData:
        raw = self._take(w.export_name_reply_size(self.negotiated.no_zeroes))
        if raw is NEED_DATA:
            return NEED_DATA
        reply = w.decode_export_name_reply(raw)
        self._size, self._tx_flags = reply.size, reply.flags
        return self._start_transmission()

    def _start_transmission(self) -> HandshakeComplete:
        assert self._size is not None
        block_size = self._block_size or BlockSize(
            DEFAULT_BLOCK_SIZE_MIN, DEFAULT_BLOCK_SIZE_PREFERRED, w.DEFAULT_MAX_PAYLOAD
        )
        negotiated = self.negotiated
        contexts = dict(negotiated.meta_contexts) if negotiated.structured_replies else {}
        self.info = ExportInfo(
            name=self._canonical if self._canonical is not None else self.config.export_name,
            size=self._size,
            transmission_flags=self._tx_flags,
            block_size=block_size,
            description=self._description,
            structured_replies=negotiated.structured_replies,
            extended_headers=negotiated.extended_headers,
            meta_contexts=contexts,
        )
        self.rules = TransmissionRules.make(
            size=self._size,
            tx_flags=self._tx_flags,
            min_block=max(block_size.minimum, 1),
            max_payload=block_size.maximum,
            block_status=bool(contexts),
            extended=negotiated.extended_headers,
        )
        self.phase = Phase.TRANSMISSION
        return HandshakeComplete(self.info)

    # ------------------------------------------------------------ requests

    def validate(self, command: int, offset: int, length: int, flags: int = 0) -> None:
        """
        Check that a request is one a polite client may send: the server
        advertised the command and its flags, and the range lies inside the
        export and obeys its block sizes (L{check_request}, the rules the
        server applies too). L{send_request} does not check; tests use it to
        send what this refuses.

        @raise ValueError: the request is not allowed, with the reason.
        """
        rules = self._require_transmission()
        if command == _DISC:
            raise ValueError("NBD_CMD_DISC is sent by disconnect(), not as a request")
        if offset < 0 or length < 0:
            raise ValueError(f"{w.command_name(command)}: negative offset or length")
        refusal = check_request(rules, command, flags, offset, length)
        if refusal is not None:
            raise ValueError(refusal[1])

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
        extended = self.negotiated.extended_headers
        limit = w.MAX_U64 if extended else w.MAX_U32
        if not 0 <= length <= limit:
            raise ValueError(f"length {length} does not fit the request header")
        if not (0 <= offset <= w.MAX_U64 and 0 <= flags <= w.MAX_U16 and 0 <= command <= w.MAX_U16):
            raise ValueError("offset, flags or command does not fit the request header")
        cookie = self._take_cookie()
        self._send(w.encode_request(flags, command, cookie, offset, length, extended))
        if payload:
            self._send(payload)
        if command == _DISC:
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
        if self.negotiated.extended_headers:
            flags |= CmdFlags.PAYLOAD_LEN
        return self.send_request(Cmd.WRITE, offset, len(data), int(flags), data)

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC; no request may follow it."""
        self.send_request(Cmd.DISC, 0, 0)

    def _require_transmission(self) -> TransmissionRules:
        if self.phase is not Phase.TRANSMISSION or self.rules is None:
            raise ValueError(f"not in transmission but in {self.phase.value}")
        return self.rules

    def _take_cookie(self) -> int:
        cookie = self._next_cookie
        while cookie in self._in_flight:
            cookie = (cookie + 1) & w.MAX_U64
        self._next_cookie = (cookie + 1) & w.MAX_U64
        return cookie

    # ------------------------------------------------------------ replies

    def _reply(self) -> ClientEvent | _NeedData | None:
        if self._simple_read is not None:
            return self._simple_read_data()
        if self._chunk is not None:
            return self._chunk_payload(self._chunk)
        if self._head is None:
            raw = self._take(w.REPLY_PEEK)
            if raw is NEED_DATA:
                return NEED_DATA
            self._head = raw
        magic = w.reply_magic(self._head)
        if magic == w.SIMPLE_REPLY_MAGIC:
            head, self._head = self._head, None
            return self._simple_reply(w.decode_simple_reply(head))
        extended = self.negotiated.extended_headers
        expected = w.EXTENDED_REPLY_MAGIC if extended else w.STRUCTURED_REPLY_MAGIC
        if magic != expected:
            raise ProtocolViolation(f"reply magic {magic:#x} is not valid here")
        if not self.negotiated.structured_replies:
            raise ProtocolViolation("a structured reply chunk without structured replies")
        rest = w.chunk_header_size(extended) - w.REPLY_PEEK
        if len(self._buffer) < rest:
            return NEED_DATA
        raw = self._head + self._buffer.take(rest)
        self._head = None
        self._chunk = self._check_chunk(w.decode_chunk_header(raw, extended))
        return self._chunk_payload(self._chunk)

    def _request_for(self, cookie: int) -> _InFlight:
        request = self._in_flight.get(cookie)
        if request is None:
            raise ProtocolViolation(
                f"a reply for cookie {cookie:#x}, which is not in flight (T-02)"
            )
        return request

    def _simple_reply(self, reply: w.SimpleReply) -> ClientEvent | _NeedData | None:
        request = self._request_for(reply.cookie)
        if self.negotiated.extended_headers:
            raise ProtocolViolation("a simple reply while extended headers are on (T-13)")
        if self.negotiated.structured_replies and request.command == _READ:
            raise ProtocolViolation("a simple reply to a READ with structured replies on (T-13)")
        if request.chunks:
            raise ProtocolViolation("a simple reply after structured chunks for the same cookie")
        if reply.error:
            request.errors.append(nbd_error(reply.error, ""))
            return self._finish(request)
        if request.command == _READ:
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

    def _check_chunk(self, chunk: w.ChunkHeader) -> w.ChunkHeader:
        """Check a chunk header against its request before its payload is read."""
        request = self._request_for(chunk.cookie)
        extended = self.negotiated.extended_headers
        if extended and chunk.offset != request.offset:
            raise ProtocolViolation(
                f"extended reply offset {chunk.offset} is not the request's {request.offset}"
            )
        type_, length, command = chunk.type, chunk.length, request.command
        name = ChunkType(type_).name if type_ in w.KNOWN_CHUNK_TYPES else str(type_)
        if type_ == ChunkType.NONE:
            if length != 0 or not chunk.flags & _DONE:
                raise ProtocolViolation("a NONE chunk must be empty and carry DONE (T-14)")
        elif type_ in (ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE):
            if command != _READ:
                raise ProtocolViolation(f"a {name} chunk in reply to command {command}")
            if type_ == ChunkType.OFFSET_HOLE and length != w.OFFSET_HOLE_SIZE:
                raise ProtocolViolation(f"an OFFSET_HOLE chunk of {length} bytes, not 12 (T-14)")
            head = w.OFFSET_DATA_HEAD_SIZE
            if type_ == ChunkType.OFFSET_DATA and not head < length <= head + request.length:
                raise ProtocolViolation(f"an OFFSET_DATA chunk of {length} bytes (T-14)")
        elif type_ in (ChunkType.BLOCK_STATUS, ChunkType.BLOCK_STATUS_EXT):
            if command != _BLOCK_STATUS:
                raise ProtocolViolation(f"a {name} chunk in reply to command {command}")
            is_ext = type_ == ChunkType.BLOCK_STATUS_EXT
            if is_ext != extended:
                raise ProtocolViolation(
                    f"a {name} chunk with extended headers {'off' if is_ext else 'on'}"
                )
            head, each = (8, 16) if is_ext else (4, 8)
            if length < head + each or (length - head) % each or length > w.MAX_STATUS_CHUNK:
                raise ProtocolViolation(f"a {name} chunk of {length} bytes (T-17)")
        elif type_ & w.CHUNK_ERROR_BIT:
            # ERROR, ERROR_OFFSET and error types we do not know: all errors.
            minimum = 14 if type_ == ChunkType.ERROR_OFFSET else 6
            if not minimum <= length <= w.MAX_ERROR_CHUNK:
                raise ProtocolViolation(f"an error chunk of {length} bytes (T-14)")
        else:
            raise ProtocolViolation(f"unknown chunk type {type_} (a client must hang up)")
        request.chunks += 1
        return chunk

    def _chunk_payload(self, chunk: w.ChunkHeader) -> ClientEvent | _NeedData | None:
        if len(self._buffer) < chunk.length:
            return NEED_DATA
        self._chunk = None
        request = self._in_flight[chunk.cookie]
        type_ = chunk.type
        try:
            if type_ == ChunkType.OFFSET_DATA:
                offset = w.decode_offset_data_head(self._buffer.take(w.OFFSET_DATA_HEAD_SIZE))
                data = self._buffer.take(chunk.length - w.OFFSET_DATA_HEAD_SIZE)
                self._content(request, offset, len(data), data, request.flags & _DF)
            elif type_ == ChunkType.OFFSET_HOLE:
                offset, size = w.decode_offset_hole(self._buffer.take(chunk.length))
                if size == 0:
                    raise ProtocolViolation("an OFFSET_HOLE chunk of size 0 (T-14)")
                self._content(request, offset, size, size, request.flags & _DF)
            elif type_ in (ChunkType.BLOCK_STATUS, ChunkType.BLOCK_STATUS_EXT):
                payload = w.decode_block_status(
                    self._buffer.take(chunk.length), type_ == ChunkType.BLOCK_STATUS_EXT
                )
                self._block_status(request, payload)
            elif type_ != ChunkType.NONE:
                self._error_chunk(request, type_, self._buffer.take(chunk.length))
        except w.WireError as e:
            raise ProtocolViolation(str(e)) from None
        if chunk.flags & _DONE:
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

    def _block_status(self, request: _InFlight, payload: w.BlockStatusPayload) -> None:
        context_id = payload.context_id
        extents = [Extent(length, flags) for length, flags in payload.descriptors]
        if self.info is None or context_id not in self.info.meta_contexts.values():
            raise ProtocolViolation(f"BLOCK_STATUS for context id {context_id}, never selected")
        if context_id in request.extents:
            raise ProtocolViolation(f"two BLOCK_STATUS chunks for context id {context_id} (T-17)")
        if any(e.length == 0 for e in extents):
            raise ProtocolViolation("a BLOCK_STATUS descriptor of length 0 (T-17)")
        if request.flags & _REQ_ONE:
            if len(extents) != 1 or extents[0].length > request.length:
                raise ProtocolViolation(
                    "a REQ_ONE BLOCK_STATUS reply must have one descriptor within the request"
                )
        elif sum(e.length for e in extents[:-1]) >= request.length:
            raise ProtocolViolation("BLOCK_STATUS descriptors run past the request (T-17)")
        request.extents[context_id] = tuple(extents)

    def _error_chunk(self, request: _InFlight, type_: int, payload: bytes) -> None:
        error = w.decode_error_payload(payload, type_ == ChunkType.ERROR_OFFSET)
        message = error.message
        if error.offset is not None:
            offset = error.offset
            if not request.offset <= offset < request.end:
                raise ProtocolViolation(f"ERROR_OFFSET {offset} is outside the request")
            # Content may come before an error at the same offset, not after.
            request.error_offsets.append(offset)
            detail = f"at offset {offset}"
            message = f"{message} ({detail})" if message else detail
        request.errors.append(nbd_error(error.errno, message))

    def _finish(self, request: _InFlight) -> ReplyReceived:
        del self._in_flight[request.cookie]
        if request.errors:
            return ReplyReceived(Reply(request.cookie, request.command, error=request.errors[0]))
        if request.command == _READ:
            if request.covered != request.length:
                raise ProtocolViolation(
                    f"a successful READ reply covers {request.covered} of "
                    f"{request.length} bytes (T-15)"
                )
            return ReplyReceived(
                Reply(request.cookie, request.command, data=self._assemble(request))
            )
        if request.command == _BLOCK_STATUS and not request.has_payload:
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
