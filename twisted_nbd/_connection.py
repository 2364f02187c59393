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
the negotiated features (one L{Negotiated} record), the validation of every
request against the export (L{check_request}, which the client shares), and
the draining of payloads that must be skipped (T-05).

Options are dispatched from a table (L{ServerConnection._OPTIONS}); every
policy decision that can refuse an option (the server is shutting down, and
later TLS requirements) is made in one place, L{ServerConnection._gate},
before the option's handler runs. Settings come in a
L{ServerConfiguration}, as h2 takes an C{H2Configuration}.

Rule ids (H-, T-, C-) refer to the protocol digest the tests cite.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from dataclasses import replace as _replace
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol, Sequence, Union, cast

from twisted_nbd import _wire as w
from twisted_nbd._buffer import _NeedData
from twisted_nbd._kernel import (
    NEED_DATA,
    Negotiated,
    Phase,
    SansIOConnection,
    TransmissionRules,
    check_request,
)
from twisted_nbd._wire import Cmd, CmdFlags, Errno, Opt, Rep, TxFlags
from twisted_nbd.errors import ProtocolViolation
from twisted_nbd.events import (
    Aborted,
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    Event,
    ExportChosen,
    FlushRequest,
    OptionRejected,
    ReadRequest,
    Request,
    RequestRejected,
    StartTLS,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)
from twisted_nbd.exports import Export
from twisted_nbd.extents import plan_sparse_read
from twisted_nbd.interfaces import Capabilities, Extent
from twisted_nbd.tls import TLSMode

__all__ = [
    "BASE_ALLOCATION_ID",
    "NEED_DATA",
    "Aborted",
    "BlockStatusRequest",
    "CacheRequest",
    "DisconnectRequest",
    "Event",
    "ExportCatalog",
    "ExportChosen",
    "FlushRequest",
    "OptionRejected",
    "Phase",
    "ReadRequest",
    "Request",
    "RequestRejected",
    "ServerConfiguration",
    "ServerConnection",
    "StartTLS",
    "TLSMode",
    "TrimRequest",
    "WriteRequest",
    "WriteZeroesRequest",
    "plan_sparse_read",
    "transmission_flags",
]

#: The id of C{base:allocation} in SET_META_CONTEXT replies and BLOCK_STATUS chunks.
BASE_ALLOCATION_ID = 1

#: The version of L{ServerConnection.handover_state}'s format.
HANDOVER_VERSION = 1


def _rules_json(rules: TransmissionRules) -> dict[str, object]:
    """What of L{TransmissionRules} a client relies on, as JSON."""
    return {
        "size": rules.size,
        "mask": rules.mask,
        "max_payload": rules.max_payload,
        "block_status": rules.block_status,
        "extended": rules.extended,
    }


class ExportCatalog(Protocol):
    """What a connection needs to know of the exports (an L{ExportRegistry} is one)."""

    def lookup(self, name: str) -> Export | None:
        """The export a client means by C{name} (the empty name is the default), or C{None}."""

    def __iter__(self) -> Iterator[Export]:
        """Every export, for NBD_OPT_LIST."""


@dataclass(frozen=True)
class ServerConfiguration:
    """
    How a server connection behaves; one is shared by every connection.

    @ivar handshake_flags: what the greeting offers (fixed newstyle and no
        zeroes).
    @ivar max_option_data: option payloads longer than this are drained
        unread and refused with ERR_TOO_BIG (H-06).
    @ivar structured_replies: offer structured replies (NBD_OPT_STRUCTURED_REPLY).
    @ivar extended_headers: offer extended headers (NBD_OPT_EXTENDED_HEADERS).
    @ivar tls: whether STARTTLS is refused (C{"off"}), offered
        (C{"on"}: plaintext is allowed, except for exports that require
        TLS) or required before anything else (C{"require"}). The caller
        does the TLS itself when it sees L{StartTLS}.
    @ivar max_options: a client that sends more options than this in one
        handshake is dropped (a client needs a handful; an endless stream
        of them only ties up a slot).
    """

    handshake_flags: int = int(w.HandshakeFlags.FIXED_NEWSTYLE | w.HandshakeFlags.NO_ZEROES)
    max_option_data: int = w.MAX_OPTION_DATA
    structured_replies: bool = True
    extended_headers: bool = True
    tls: TLSMode = "off"
    max_options: int = 1000


class _OptionError(Exception):
    """Raised inside option handling: reply C{reply} with C{reason}."""

    def __init__(self, reply: Rep, reason: str) -> None:
        super().__init__(reply, reason)
        self.reply = reply
        self.reason = reason


def transmission_flags(caps: Capabilities, structured_replies: bool) -> int:
    """The transmission flags that advertise C{caps} (an export's, read-only applied)."""
    flags = TxFlags.HAS_FLAGS
    if not caps.can_write:
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
    if structured_replies:
        # H-20: DF only once structured replies are on; every READ reply is one chunk.
        flags |= TxFlags.SEND_DF
    if caps.can_multi_conn:
        flags |= TxFlags.CAN_MULTI_CONN
    if caps.can_cache:
        flags |= TxFlags.SEND_CACHE
    return int(flags)


_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)
_READ = int(Cmd.READ)
_FLUSH = int(Cmd.FLUSH)
_TRIM = int(Cmd.TRIM)
_CACHE = int(Cmd.CACHE)
_WRITE_ZEROES = int(Cmd.WRITE_ZEROES)
_FUA, _NO_HOLE = int(CmdFlags.FUA), int(CmdFlags.NO_HOLE)
_REQ_ONE, _FAST_ZERO = int(CmdFlags.REQ_ONE), int(CmdFlags.FAST_ZERO)
_PAYLOAD_LEN = int(CmdFlags.PAYLOAD_LEN)
_DONE = int(w.ReplyFlags.DONE)
_OFFSET_DATA = int(w.ChunkType.OFFSET_DATA)
_OFFSET_HOLE = int(w.ChunkType.OFFSET_HOLE)

_OptionHandler = Callable[["ServerConnection", int, bytes], Union[Event, None]]


class ServerConnection(SansIOConnection[Event]):
    """
    The server side of one NBD connection, without I/O.

    @param exports: the exports a client may choose from (the empty name is
        the default export).
    @param config: the L{ServerConfiguration}; the defaults if C{None}.

    @ivar export: the export in transmission, once chosen.
    @ivar tx_flags: its transmission flags, once chosen.
    @ivar rules: its L{TransmissionRules}, once chosen.
    @ivar shutting_down: the server is shutting down (see L{shutdown}).
    @ivar tls_peer_dn: the subject of the client's TLS certificate, once
        TLS is up and if it sent one (see L{tls_established}).
    """

    def __init__(self, exports: ExportCatalog, config: ServerConfiguration | None = None) -> None:
        super().__init__(Phase.CLIENT_FLAGS)
        self._exports = exports
        self.config = config if config is not None else ServerConfiguration()
        self.export: Export | None = None
        self.shutting_down = False
        self.tls_peer_dn: str | None = None
        self._options_seen = 0
        self.tx_flags = 0
        self.rules: TransmissionRules | None = None
        # An option or write header waiting for its data.
        self._pending_option: w.OptionHeader | None = None
        self._pending_write: w.RequestHeader | None = None
        # A WRITE's payload received by the caller (see payload_received).
        self._received_payload: bytes | bytearray | memoryview | None = None
        # Copies of what transmission needs on every request (see _enter_transmission).
        self._fast = False
        self._lone_read_parser: Callable[[bytes], tuple[int, int, int, int] | None] | None = None
        self._lone_write_parser: Callable[[bytes], tuple[int, int, int, int] | None] | None = None
        self._fast_write = False
        self._extended = False
        self._structured = False
        self._header_size = w.request_size(False)
        #: The success reply without data, C{(cookie, offset) -> bytes}, and
        #: (for the caller's tight loop, see take_simple) what precedes a
        #: READ's data, C{(cookie, offset, length) -> bytes}, in this mode.
        self.encode_ok = w.ok_reply_encoder(False, False)
        self.encode_read_head = w.read_reply_head_encoder(False, False)
        self._request_struct = w.REQUEST
        self._send(w.encode_greeting(self.config.handshake_flags))

    def shutdown(self) -> None:
        """
        The server is shutting down: from now on every option but ABORT gets
        ERR_SHUTDOWN (H-19) and every request ESHUTDOWN (C-07).
        """
        self.shutting_down = True

    def _step(self) -> Event | _NeedData | None:
        """One parsing step; C{None} means go round again."""
        if self.phase is Phase.TRANSMISSION:
            return self._request()
        if self.phase is Phase.OPTIONS:
            return self._option()
        return self._client_flags()

    # ------------------------------------------------------------ handshake

    def _client_flags(self) -> _NeedData | None:
        raw = self._take(w.CLIENT_FLAGS_SIZE)
        if raw is NEED_DATA:
            return NEED_DATA
        flags = w.decode_client_flags(raw)
        offered = self.config.handshake_flags
        # The client flags mirror the handshake flags bit for bit (H-02).
        if flags & ~(w.KNOWN_CLIENT_FLAGS & offered):
            raise ProtocolViolation(f"client flags {flags:#x} set bits we did not offer (H-02)")
        self.negotiated = Negotiated(
            fixed_newstyle=bool(flags & w.ClientFlags.C_FIXED_NEWSTYLE),
            no_zeroes=bool(flags & w.ClientFlags.C_NO_ZEROES),
        )
        self.phase = Phase.OPTIONS
        return None

    def _option(self) -> Event | _NeedData | None:
        header = self._pending_option
        if header is None:
            raw = self._take(w.OPTION_HEADER_SIZE)
            if raw is NEED_DATA:
                return NEED_DATA
            try:
                header = w.decode_option_header(raw)
            except w.WireError as e:
                raise ProtocolViolation(str(e)) from None
            if not self.negotiated.fixed_newstyle and header.option != Opt.EXPORT_NAME:
                raise ProtocolViolation(
                    f"option {header.option} without fixed newstyle, which allows only EXPORT_NAME"
                )
            self._options_seen += 1
            if self._options_seen > self.config.max_options:
                raise ProtocolViolation(
                    f"more than {self.config.max_options} options in one handshake"
                )
            limit = self.config.max_option_data
            if header.length > limit:
                # Never buffer it (H-06): throw it away as it arrives.
                self._discard = header.length
                if header.option == Opt.EXPORT_NAME:
                    raise ProtocolViolation("NBD_OPT_EXPORT_NAME data is too long")
                return self._option_error(
                    header.option,
                    Rep.ERR_TOO_BIG if header.option in w.KNOWN_OPTIONS else Rep.ERR_UNSUP,
                    f"option data of {header.length} bytes is over {limit}",
                )
            self._pending_option = header
        if len(self._buffer) < header.length:
            return NEED_DATA
        self._pending_option = None
        data = self._buffer.take(header.length)
        option = header.option
        try:
            self._gate(option)
            handler = self._OPTIONS.get(option, ServerConnection._opt_unsupported)
            return handler(self, option, data)
        except _OptionError as e:
            return self._option_error(option, e.reply, e.reason)
        except w.WireError as e:
            # Lengths inside the data that disagree with it (H-11) and the like.
            if option == Opt.EXPORT_NAME:
                raise ProtocolViolation(f"NBD_OPT_EXPORT_NAME: {e}") from None
            return self._option_error(option, Rep.ERR_INVALID, str(e))

    def _gate(self, option: int) -> None:
        """
        The policy gate every option passes before its handler runs: the one
        place that decides whether the server takes options at all right now.

        @raise _OptionError: the option is refused; with this reply.
        @raise ProtocolViolation: it is refused and cannot be answered
            (NBD_OPT_EXPORT_NAME has no error reply, H-09).
        """
        if self.shutting_down and option != Opt.ABORT:
            if option == Opt.EXPORT_NAME:
                raise ProtocolViolation("NBD_OPT_EXPORT_NAME while the server shuts down")
            raise _OptionError(Rep.ERR_SHUTDOWN, "the server is shutting down (H-19)")
        if (
            self.config.tls == "require"
            and not self.negotiated.tls
            and option not in (Opt.STARTTLS, Opt.ABORT)
        ):
            if option == Opt.EXPORT_NAME:
                raise ProtocolViolation("NBD_OPT_EXPORT_NAME before STARTTLS (S-03)")
            raise _OptionError(
                Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first (S-03)"
            )

    def _lookup(self, name: str) -> Export | None:
        """The export C{name} means for this connection, or C{None}."""
        export = self._exports.lookup(name)
        if export is not None and not self._visible(export):
            return None
        return export

    def _visible(self, export: Export) -> bool:
        """
        Whether this connection may see C{export}: an export that requires
        TLS is hidden from a plaintext connection, and one with a list of
        allowed client certificates from a connection whose certificate's
        subject matches none of them.
        """
        if export.tls_required and not self.negotiated.tls:
            return False
        return export.allows_peer(self.tls_peer_dn)

    def _lookup_for_go(self, name: str) -> Export:
        """
        The export INFO and GO mean by C{name}.

        @raise _OptionError: ERR_TLS_REQD for an export that requires TLS
            before TLS is up (S-04), ERR_POLICY for one the client's
            certificate is not allowed to use, ERR_UNKNOWN otherwise.
        """
        export = self._exports.lookup(name)
        if export is not None:
            if export.tls_required and not self.negotiated.tls:
                raise _OptionError(
                    Rep.ERR_TLS_REQD, f"export {name!r} requires TLS: send NBD_OPT_STARTTLS (S-04)"
                )
            if not export.allows_peer(self.tls_peer_dn):
                raise _OptionError(
                    Rep.ERR_POLICY,
                    f"export {name!r} is not allowed for client certificate "
                    f"{self.tls_peer_dn or '(none)'}",
                )
            return export
        raise _OptionError(Rep.ERR_UNKNOWN, f"there is no export named {name!r}")

    def _listed(self) -> list[Export]:
        """The exports NBD_OPT_LIST shows this connection."""
        return [export for export in self._exports if self._visible(export)]

    def _reply(self, option: int, reply: Rep, data: bytes = b"") -> None:
        self._send(w.encode_option_reply(option, reply, data))

    def _option_error(self, option: int, reply: Rep, reason: str) -> OptionRejected:
        self._reply(option, reply, w.encode_message(reason))
        return OptionRejected(option, reply, reason)

    # ------------------------------------------------------------ option handlers

    def _opt_unsupported(self, option: int, data: bytes) -> Event | None:
        raise _OptionError(Rep.ERR_UNSUP, f"option {w.option_name(option)} is not supported (H-04)")

    @staticmethod
    def _no_data(option: int, data: bytes) -> None:
        if data:
            raise _OptionError(Rep.ERR_INVALID, f"{w.option_name(option)} takes no data (H-07)")

    def _opt_export_name(self, option: int, data: bytes) -> Event | None:
        if self.negotiated.extended_headers:
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME name is not UTF-8") from None
        try:
            export = self._lookup_for_go(name)
        except _OptionError as e:
            # H-09, S-04: EXPORT_NAME cannot be answered with an error, only a close.
            raise ProtocolViolation(f"NBD_OPT_EXPORT_NAME refused: {e.reason}") from None
        self._enter_transmission(export)
        self._send(
            w.encode_export_name_reply(export.size, self.tx_flags, self.negotiated.no_zeroes)
        )
        return ExportChosen(export)

    def _opt_abort(self, option: int, data: bytes) -> Event | None:
        # H-08: ACK whatever data came with it, then the client closes.
        self._reply(option, Rep.ACK)
        self.phase = Phase.CLOSED
        return Aborted()

    def _opt_list(self, option: int, data: bytes) -> Event | None:
        self._no_data(option, data)
        for export in self._listed():
            self._reply(option, Rep.SERVER, w.encode_server(export.name, export.description))
        self._reply(option, Rep.ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> Event | None:
        self._no_data(option, data)
        if self.config.tls == "off":
            raise _OptionError(Rep.ERR_POLICY, "TLS is not configured on this server (S-02)")
        if self.negotiated.tls:
            raise _OptionError(Rep.ERR_INVALID, "TLS is already on (S-05)")
        if len(self._buffer):
            # S-07: the client did not wait for our ACK. Whatever it sent is
            # neither options (they would be plaintext after STARTTLS) nor
            # TLS we could trust to be from the handshake: hard close.
            raise ProtocolViolation(
                "bytes sent after NBD_OPT_STARTTLS before its reply and the TLS handshake (S-07)"
            )
        self._reply(option, Rep.ACK)
        # S-06: everything negotiated in plaintext is forgotten.
        self.negotiated = self.negotiated.after_starttls()
        return StartTLS()

    def tls_established(self, peer_dn: str | None) -> None:
        """
        The caller's TLS handshake has finished; C{peer_dn} is the subject
        of the client's certificate (RFC 4514), if it sent one. Exports
        that allow only some certificates are judged by it.
        """
        self.tls_peer_dn = peer_dn

    def _opt_info_or_go(self, option: int, data: bytes) -> Event | None:
        request = w.decode_info_request(data)
        # H-13: no INFO replies before an error; the connection stays usable.
        export = self._lookup_for_go(request.name)
        caps = export.capabilities
        tx_flags = transmission_flags(caps, self.negotiated.structured_replies)
        self._reply(option, Rep.INFO, w.encode_info_export(export.size, tx_flags))
        if w.Info.NAME in request.infos:
            self._reply(option, Rep.INFO, w.encode_info_text(w.Info.NAME, export.name))
        if w.Info.DESCRIPTION in request.infos and export.description:
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

    def _opt_structured_reply(self, option: int, data: bytes) -> Event | None:
        self._no_data(option, data)
        if not self.config.structured_replies:
            raise _OptionError(Rep.ERR_UNSUP, "structured replies are turned off on this server")
        if self.negotiated.extended_headers:
            raise _OptionError(
                Rep.ERR_EXT_HEADER_REQD, "extended headers are on; they imply structured replies"
            )
        if self.negotiated.structured_replies:
            raise _OptionError(Rep.ERR_INVALID, "structured replies are already on (H-17)")
        self.negotiated = _replace(self.negotiated, structured_replies=True)
        self._reply(option, Rep.ACK)
        return None

    def _opt_extended_headers(self, option: int, data: bytes) -> Event | None:
        self._no_data(option, data)
        if not self.config.extended_headers:
            raise _OptionError(Rep.ERR_UNSUP, "extended headers are turned off on this server")
        if self.negotiated.extended_headers:
            raise _OptionError(Rep.ERR_INVALID, "extended headers are already on (H-17)")
        # They take precedence over structured replies and imply them.
        self.negotiated = _replace(self.negotiated, extended_headers=True, structured_replies=True)
        self._reply(option, Rep.ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> Event | None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            # SET replaces the selection even when it fails.
            self.negotiated = _replace(self.negotiated, meta_export=None, meta_contexts={})
        request = w.decode_meta_context_request(data)
        if not self.negotiated.structured_replies:
            raise _OptionError(
                Rep.ERR_INVALID, "meta contexts need structured replies to be negotiated first"
            )
        queries = request.queries
        for query in queries:
            if ":" not in query or query.startswith(":"):
                raise _OptionError(Rep.ERR_INVALID, f"query {query!r} has no namespace (H-16)")
        export = self._lookup(request.name)
        if export is None:
            raise _OptionError(Rep.ERR_UNKNOWN, f"there is no export named {request.name!r}")
        available = [w.BASE_ALLOCATION] if export.capabilities.can_extents else []
        if setting:
            chosen = [c for c in available if c in queries]
        elif not queries:
            chosen = available
        else:
            chosen = [c for c in available if c in queries or w.BASE_NAMESPACE in queries]
        for context in chosen:
            context_id = BASE_ALLOCATION_ID if setting else 0
            self._reply(option, Rep.META_CONTEXT, w.encode_meta_context(context_id, context))
        self._reply(option, Rep.ACK)
        if setting:
            self.negotiated = _replace(
                self.negotiated,
                meta_export=request.name,
                meta_contexts={c: BASE_ALLOCATION_ID for c in chosen},
            )
        return None

    #: The option handlers, by option number; anything else gets ERR_UNSUP.
    _OPTIONS: ClassVar[dict[int, _OptionHandler]] = {
        Opt.EXPORT_NAME: _opt_export_name,
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.INFO: _opt_info_or_go,
        Opt.GO: _opt_info_or_go,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
        Opt.EXTENDED_HEADERS: _opt_extended_headers,
    }

    def _enter_transmission(self, export: Export) -> None:
        self.export = export
        caps = export.capabilities
        negotiated = self.negotiated
        self.tx_flags = transmission_flags(caps, negotiated.structured_replies)
        self.phase = Phase.TRANSMISSION
        self.rules = TransmissionRules.make(
            size=export.size,
            tx_flags=self.tx_flags,
            min_block=caps.min_block,
            max_payload=caps.max_block,
            block_status=bool(
                negotiated.meta_contexts
                and negotiated.meta_export is not None
                and self._lookup(negotiated.meta_export) is export
            ),
            extended=negotiated.extended_headers,
        )
        self._extended = negotiated.extended_headers
        self._structured = negotiated.structured_replies
        self._header_size = w.request_size(self._extended)
        self.encode_ok = w.ok_reply_encoder(self._structured, self._extended)
        # What the fast path of _request accepts without asking check_request:
        # a READ or WRITE whose flags are allowed (PAYLOAD_LEN aside), in
        # bounds, aligned and not over the maximum payload. Anything else,
        # including what is valid but unusual (an unaligned tail), takes the
        # full path. The test suite checks the two agree.
        rules = self.rules
        payload_len = _PAYLOAD_LEN if self._extended else 0
        self._fast_read_refused = ~(rules.allowed[_READ] & ~payload_len)
        write_flags = rules.allowed.get(_WRITE)
        self._fast_write = write_flags is not None
        self._fast_write_refused = ~(write_flags or 0)
        self._fast_write_needs = payload_len
        self._fast_size = rules.size
        self._fast_max = rules.max_payload
        self._fast_mask = rules.mask
        self._request_magic = w.EXTENDED_REQUEST_MAGIC if self._extended else w.REQUEST_MAGIC
        self._request_struct = w.EXTENDED_REQUEST if self._extended else w.REQUEST
        self.encode_read_head = w.read_reply_head_encoder(self._structured, self._extended)
        self._fast = True

    # ------------------------------------------------------------ live restart

    def at_request_boundary(self) -> bool:
        """
        Whether the connection is in transmission between two requests: no
        WRITE waits for the rest of its payload and no payload is being
        thrown away, so what is buffered starts with a request header (or
        is empty). Only then can the connection go to another process (see
        L{twisted_nbd.restart}).
        """
        return (
            self.phase is Phase.TRANSMISSION
            and self._pending_write is None
            and self._received_payload is None
            and not self._discard
        )

    def drained(self) -> bool:
        """
        Whether L{next_event} could only say L{NEED_DATA}: at a request
        boundary (see L{at_request_boundary}) with nothing buffered. Cheaper
        than asking it, which a server does after every batch of requests.
        """
        return (
            not self._buffer._length
            and self.phase is Phase.TRANSMISSION
            and self._pending_write is None
            and self._received_payload is None
            and not self._discard
        )

    def handover_state(self) -> dict[str, object]:
        """
        What another process needs to go on with this connection: what was
        negotiated, the export, what the client was told of it (flags, size,
        block sizes), and the bytes received and not parsed yet. It is
        plain JSON.

        @raise ValueError: the connection is not at a request boundary.
        """
        if not self.at_request_boundary() or self.export is None or self.rules is None:
            raise ValueError("the connection is not between two requests in transmission")
        buffered = self._buffer.take(len(self._buffer))
        # The state is read, not taken: the connection may stay here after all.
        self._buffer.append(buffered)
        n = self.negotiated
        rules = self.rules
        return {
            "version": HANDOVER_VERSION,
            "export": self.export.name,
            "negotiated": {
                "fixed_newstyle": n.fixed_newstyle,
                "no_zeroes": n.no_zeroes,
                "structured_replies": n.structured_replies,
                "extended_headers": n.extended_headers,
                "meta_export": n.meta_export,
                "meta_contexts": dict(n.meta_contexts),
                "tls": n.tls,
            },
            "tx_flags": self.tx_flags,
            "rules": _rules_json(rules),
            "buffered": base64.b64encode(buffered).decode("ascii"),
        }

    @classmethod
    def resume(
        cls,
        exports: ExportCatalog,
        config: ServerConfiguration | None,
        state: Mapping[str, Any],
    ) -> ServerConnection:
        """
        A connection in transmission from the L{handover_state} of one in
        another process: no greeting is sent, and the buffered bytes are
        parsed first.

        @raise ValueError: the state is malformed, or this server's export
            of that name would not behave as the client was told (another
            size, other flags or block sizes, no meta context where one was
            selected): the connection must stay where it is.
        """
        try:
            if state["version"] != HANDOVER_VERSION:
                raise ValueError(f"handover state version {state['version']!r} is not ours")
            name = state["export"]
            negotiated = Negotiated(**state["negotiated"])
            tx_flags = int(state["tx_flags"])
            rules = dict(state["rules"])
            buffered = base64.b64decode(state["buffered"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise ValueError(f"malformed handover state: {e}") from None
        if negotiated.tls:
            raise ValueError("a TLS connection cannot change process")
        conn = cls(exports, config)
        conn._outbox.clear()  # the client had its greeting long ago
        conn.negotiated = negotiated
        export = exports.lookup(name)
        if export is None or export.name != name or not conn._visible(export):
            raise ValueError(f"there is no export named {name!r} here")
        conn._enter_transmission(export)
        assert conn.rules is not None
        if conn.tx_flags != tx_flags or _rules_json(conn.rules) != rules:
            raise ValueError(
                f"export {name!r} differs here from what the client was told: "
                f"{_rules_json(conn.rules)}, flags {conn.tx_flags:#x}, not {rules}, "
                f"flags {tx_flags:#x}"
            )
        conn.receive_data(buffered)
        return conn

    # ------------------------------------------------------------ transmission

    def _request(self) -> Event | _NeedData | None:
        header = self._pending_write
        if header is None:
            fields = w.take_request(self._buffer, self._extended)
            if fields is None:
                return NEED_DATA
            magic, flags, command, cookie, offset, length = fields
            if (
                magic == self._request_magic
                and self._fast
                and not self.shutting_down
                and offset <= self._fast_size
                and length <= self._fast_size - offset
                and length <= self._fast_max
                and not (offset | length) & self._fast_mask
            ):
                # The common case, decided on plain ints (see _enter_transmission).
                if command == _READ and not flags & self._fast_read_refused:
                    return ReadRequest(cookie, offset, length, flags)
                if (
                    command == _WRITE
                    and self._fast_write
                    and length
                    and not flags & self._fast_write_refused
                    and flags & self._fast_write_needs == self._fast_write_needs
                ):
                    # The raw fields serve as the header: a RequestHeader is
                    # the same tuple with names.
                    pending = cast(w.RequestHeader, fields)
                    self._pending_write = pending
                    return self._write_payload(pending)
            header = w.RequestHeader._make(fields)
            extended = self._extended
            try:
                w.check_request_magic(header, extended)
            except w.WireError as e:
                raise ProtocolViolation(str(e)) from None
            command = header.type
            if extended:
                # Extended headers: a payload follows exactly when PAYLOAD_LEN is set.
                has_payload = bool(header.flags & _PAYLOAD_LEN)
                assert self.rules is not None
                if has_payload and header.length > self.rules.max_payload:
                    raise ProtocolViolation(
                        f"payload of {header.length} bytes is over the maximum "
                        f"{self.rules.max_payload} (extended headers say: hard close)"
                    )
            else:
                has_payload = command == _WRITE
            if has_payload != (command == _WRITE):
                # Only with extended headers can these disagree; say so before
                # anything else, since the length field means something else.
                rejection: RequestRejected | None = self._reject(
                    header,
                    Errno.EINVAL,
                    "WRITE must carry PAYLOAD_LEN"
                    if command == _WRITE
                    else f"command {command} takes no payload",
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
                self._send(self._ok(header.cookie, header.offset))  # T-09
                return None
            self._pending_write = header
        return self._write_payload(header)

    def _write_payload(self, header: w.RequestHeader) -> Event | _NeedData:
        """The WRITE once its payload has all arrived."""
        # By index: header may be the plain tuple of fields (see _request).
        length = header[5]
        data = self._received_payload
        if data is not None:
            self._received_payload = None
        elif len(self._buffer) < length:
            return NEED_DATA
        else:
            # A view, not a copy, when the payload lies in one received chunk.
            data = self._buffer.take_view(length)
        self._pending_write = None
        return WriteRequest(header[3], header[4], data, bool(header[1] & _FUA))

    def next_event(self) -> Event | _NeedData:
        """
        Parse what is buffered up to the next event (see
        L{SansIOConnection.next_event}); requests in transmission take the
        shortest way.
        """
        if self.phase is Phase.TRANSMISSION and not self._discard:
            try:
                event = self._request()
            except ProtocolViolation:
                self.phase = Phase.CLOSED
                raise
            if event is not None:
                return event
        return super().next_event()

    def take_lone_read(self, data: bytes) -> tuple[int, int, int, int] | None:
        """
        When C{data}, just received, is exactly one plain READ request and
        nothing is buffered before it, take it (as L{take_simple} would have
        after L{receive_data}) without buffering it; otherwise take nothing
        and return C{None}, and the caller passes C{data} to L{receive_data}
        as usual. A client at queue depth 1 sends just that, once per round
        trip.

        @return: C{(flags, cookie, offset, length)}.
        """
        if not self.lone_reads_ready():
            return None
        return self.lone_read_parser()(data)

    def take_lone_write(self, header: bytes) -> tuple[int, int, int, int] | None:
        """
        When C{header}, just received, is exactly the header of one plain
        WRITE and nothing is buffered before it, take it, leaving its
        payload to the caller (who serves the WRITE with it, as if
        L{take_simple} had given both); otherwise take nothing and return
        C{None}, and the caller passes C{header} to L{receive_data} as
        usual.

        @return: C{(flags, cookie, offset, length)}.
        """
        if not self.lone_reads_ready():
            return None
        return self.lone_write_parser()(header)

    def lone_reads_ready(self) -> bool:
        """
        Whether L{take_lone_read} may take requests now: in transmission,
        nothing buffered, nothing half received, not shutting down. Only
        this object's own methods change that (L{receive_data} and the
        events it leads to, L{start_shutdown}), so a caller that passes
        what it receives to L{lone_read_parser} alone for as long as that
        takes it need not ask again in between.
        """
        return not (
            self._buffer._length
            or not self._fast
            or self._pending_write is not None
            or self._discard
            or self.shutting_down
            or self.phase is not Phase.TRANSMISSION
        )

    def lone_read_parser(self) -> Callable[[bytes], tuple[int, int, int, int] | None]:
        """
        A function that takes what was just received when it is exactly one
        plain READ that the fast path of L{next_event} accepts, returning
        C{(flags, cookie, offset, length)}, and C{None} for anything else
        (then the caller passes the bytes to L{receive_data}). Only for use
        while L{lone_reads_ready}; the same for the rest of the connection.
        """
        parser = self._lone_read_parser
        if parser is None:
            parser = self._lone_parser(_READ, self._fast_read_refused, 0, True)
            if self._fast:
                self._lone_read_parser = parser
        return parser

    @property
    def header_size(self) -> int:
        """How many bytes a request's header takes on this connection now."""
        return self._header_size

    def lone_write_parser(self) -> Callable[[bytes], tuple[int, int, int, int] | None]:
        """
        Like L{lone_read_parser}, for one plain WRITE's header on its own
        (the caller receives its payload itself, then serves the WRITE
        without passing its bytes here): C{(flags, cookie, offset, length)}
        if it is one that the fast path of L{next_event} accepts, else
        C{None} (then the caller passes the bytes to L{receive_data}).
        Only for use while L{lone_reads_ready}.
        """
        parser = self._lone_write_parser
        if parser is None:
            # No command matches -1: WRITEs are not for the fast path here.
            command = _WRITE if self._fast_write else -1
            parser = self._lone_parser(
                command, self._fast_write_refused, self._fast_write_needs, False
            )
            if self._fast:
                self._lone_write_parser = parser
        return parser

    def _lone_parser(
        self, wanted: int, refused: int, needs: int, empty: bool
    ) -> Callable[[bytes], tuple[int, int, int, int] | None]:
        """
        A parser for L{lone_read_parser} or L{lone_write_parser}: one
        request header of command C{wanted}, none of the C{refused} flags,
        all of the C{needs} ones, of length 0 only if C{empty}, and what
        the fast path of L{next_event} checks.
        """
        # Everything the checks need, as the closure's own variables: this
        # runs once per request of a client at queue depth 1.
        size, unpack = self._header_size, self._request_struct.unpack
        request_magic = self._request_magic
        export_size, most, mask = self._fast_size, self._fast_max, self._fast_mask

        def parse(data: bytes) -> tuple[int, int, int, int] | None:
            if len(data) != size:
                return None
            magic, flags, command, cookie, offset, length = unpack(data)
            if (
                command != wanted
                or flags & refused
                or flags & needs != needs
                or not (length or empty)
                # The same checks as take_simple's and _request's fast path.
                or magic != request_magic
                or offset > export_size
                or length > export_size - offset
                or length > most
                or (offset | length) & mask
            ):
                return None
            return flags, cookie, offset, length

        return parse

    def take_simple(self) -> tuple[int, int, int, int, int, memoryview | None] | None:
        """
        Take the next request if it is a plain READ or WRITE that lies
        whole in the first buffered chunk and needs no more checking than
        the fast path of L{next_event} gives it; otherwise take nothing and
        return C{None} (then L{next_event} deals with what comes next).

        This is L{next_event} for the server's tight loop over pipelined
        requests: no event object, no copy of a WRITE's payload.

        @return: C{(command, flags, cookie, offset, length, payload)}, the
            payload a view of the received bytes for a WRITE, else C{None}.
        """
        if (
            not self._fast
            or self._pending_write is not None
            or self._discard
            or self.shutting_down
            or self.phase is not Phase.TRANSMISSION
        ):
            return None
        # ReceiveBuffer.front and consume_front, inline: this runs for
        # every request under load.
        buffer = self._buffer
        if not buffer._length:
            return None
        chunks = buffer._chunks
        chunk = chunks[0]
        position = buffer._offset
        size = self._header_size
        available = len(chunk) - position
        if available < size:
            return None
        magic, flags, command, cookie, offset, length = self._request_struct.unpack_from(
            chunk, position
        )
        if (
            magic != self._request_magic
            or offset > self._fast_size
            or length > self._fast_size - offset
            or length > self._fast_max
            or (offset | length) & self._fast_mask
        ):
            return None
        if command == _READ:
            if flags & self._fast_read_refused:
                return None
            if available == size:
                chunks.popleft()
                buffer._offset = 0
            else:
                buffer._offset = position + size
            buffer._length -= size
            return command, flags, cookie, offset, length, None
        if (
            command == _WRITE
            and self._fast_write
            and length
            and available >= size + length
            and not flags & self._fast_write_refused
            and flags & self._fast_write_needs == self._fast_write_needs
        ):
            start = position + size
            if available == size + length:
                chunks.popleft()
                buffer._offset = 0
            else:
                buffer._offset = start + length
            buffer._length -= size + length
            return command, flags, cookie, offset, length, memoryview(chunk)[start : start + length]
        return None

    # ------------------------------------------------------------ payloads received by the caller

    def payload_wanted(self) -> int:
        """
        How many bytes of a WRITE's payload are still to come beyond those
        buffered; 0 when no WRITE waits for its payload. A caller that can
        receive them straight into a buffer of its own (saving a copy of a
        large payload) calls L{take_payload_into} then L{payload_received}.
        """
        header = self._pending_write
        if header is None or self._received_payload is not None:
            return 0
        # By index: header may be the plain tuple of fields (see _request).
        return max(0, header[5] - len(self._buffer))

    def payload_length(self) -> int:
        """The whole length of the payload L{payload_wanted} speaks of."""
        header = self._pending_write
        return 0 if header is None else header[5]

    def payload_request(self) -> tuple[int, int, bool]:
        """
        The offset, length and FUA flag of the WRITE whose payload
        L{payload_wanted} speaks of (already checked against the rules).

        @raise ValueError: no WRITE is waiting for its payload.
        """
        header = self._pending_write
        if header is None:
            raise ValueError("no WRITE waits for its payload")
        return header[4], header[5], bool(header[1] & _FUA)

    def take_payload_into(self, view: memoryview) -> int:
        """
        Move the part of the waiting WRITE's payload already buffered into
        the start of C{view} (as long as the payload).

        @return: how many bytes were moved.
        """
        return self._buffer.take_into(view)

    def payload_received(self, data: bytes | bytearray | memoryview) -> None:
        """
        The caller has the waiting WRITE's whole payload: L{next_event}
        returns the WRITE with C{data}.

        @raise ValueError: no WRITE is waiting, or C{data} is not its length.
        """
        header = self._pending_write
        if header is None or len(data) != header[5]:
            raise ValueError("no WRITE waits for a payload of this length")
        self._received_payload = data

    def _reject(self, header: w.RequestHeader, errno: Errno, reason: str) -> RequestRejected:
        is_read = header.type == _READ
        self._outbox.extend(self._error(header.cookie, header.offset, errno, reason, is_read))
        return RequestRejected(
            header.cookie, header.type, errno, reason, header.offset, header.length
        )

    def _validate(self, h: w.RequestHeader) -> RequestRejected | None:
        """
        Check a request against the rules (L{check_request}, shared with the
        client) and the server's own state; the rejection if any.
        """
        rules = self.rules
        assert rules is not None
        if self.shutting_down and h.type in rules.allowed:
            # C-07: what this export supports at all still gets its usual answer.
            return self._reject(h, Errno.ESHUTDOWN, "the server is shutting down (C-07)")
        refusal = check_request(rules, h.type, h.flags, h.offset, h.length)
        if refusal is None:
            return None
        return self._reject(h, refusal[0], refusal[1])

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
            self._send(self._ok(h.cookie, h.offset))
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
        return self.encode_ok(cookie, offset)

    def _error(
        self, cookie: int, offset: int, errno: int, message: str, is_read: bool
    ) -> list[bytes]:
        if self._structured:
            payload = w.encode_error_payload(errno, message)
            head = w.encode_chunk_header(
                _DONE, w.ChunkType.ERROR, cookie, len(payload), offset, self._extended
            )
            return [head, payload]
        # T-12: a failed READ carries no data in a simple reply.
        return [w.encode_simple_reply(errno, cookie)]

    def reply_ok(self, request: Request) -> list[bytes]:
        """The bytes of a success reply without data (anything but READ)."""
        return [self.encode_ok(request.cookie, request.offset)]

    def reply_read(self, request: ReadRequest, data: bytes) -> list[bytes]:
        """
        The bytes of a successful READ reply carrying C{data}, which must be
        exactly C{request.length} bytes.
        """
        if not self._structured:
            return [w.encode_simple_reply(0, request.cookie), data]
        if not data:
            return [self._ok(request.cookie, request.offset)]
        head = w.encode_chunk_header(
            _DONE, _OFFSET_DATA, request.cookie, 8 + len(data), request.offset, self._extended
        )
        return [head, w.encode_offset_data_head(request.offset), data]

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
        cookie, at, extended = request.cookie, request.offset, self._extended
        for index, (offset, part) in enumerate(segments):
            flags = _DONE if index == last else 0
            if isinstance(part, int):
                payload = w.encode_offset_hole(offset, part)
                out.append(
                    w.encode_chunk_header(flags, _OFFSET_HOLE, cookie, len(payload), at, extended)
                )
                out.append(payload)
            else:
                out.append(
                    w.encode_chunk_header(flags, _OFFSET_DATA, cookie, 8 + len(part), at, extended)
                )
                out.append(w.encode_offset_data_head(offset))
                out.append(part)
        return out

    def reply_error(self, request: Request, errno: int, message: str = "") -> list[bytes]:
        """The bytes of an error reply to C{request}."""
        return self._error(
            request.cookie,
            request.offset,
            errno,
            message,
            request.command == _READ,
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
        extended = self._extended
        # Compact replies carry 32-bit lengths; extended ones 64-bit.
        limit = w.MAX_U64 if extended else w.MAX_EXTENT_32
        out: list[tuple[int, int]] = []
        for extent in extents:
            if pos >= end or pos >= size or len(out) >= w.MAX_EXTENTS:
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
        payload = w.encode_block_status(BASE_ALLOCATION_ID, out, extended)
        chunk_type = w.ChunkType.BLOCK_STATUS_EXT if extended else w.ChunkType.BLOCK_STATUS
        head = w.encode_chunk_header(
            _DONE, chunk_type, request.cookie, len(payload), request.offset, extended
        )
        return [head, payload]
