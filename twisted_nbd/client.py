# -*- test-case-name: tests.test_client -*-
"""
An NBD client on Twisted.

L{connect} opens an export and returns an L{NBDClient}, whose methods each
send one request and return a L{Deferred} for its reply; any number may be
in flight at once. L{list_exports} asks a server for its exports.

    client = await connect(reactor, "tcp:127.0.0.1:10809", "disk")  # a Deferred
    await client.write(0, b"hello")
    data = await client.read(0, 5)
    await client.disconnect()

The protocol rules live in the sans-I/O L{ClientConnection}
(L{twisted_nbd._client_connection}); this module does the I/O and keeps
the Deferreds.

Errors:
  - the server failed a request: L{NBDError}, with the NBD C{errno} and the
    server's message, if it sent one;
  - the server broke the protocol: L{ProtocolViolation}; the connection is
    dropped and every request in flight fails with it;
  - the connection was lost: L{ConnectionLost} for every request in flight;
    requests made after L{NBDClient.disconnect} or the loss fail with
    L{ConnectionDone};
  - a request a polite client must not send (past the end, a command or
    flag the server did not advertise): L{ValueError}, and nothing is sent.
    L{NBDClient.request} sends anything.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from twisted_nbd._client_connection import (
    NEED_DATA,
    AbortAcknowledged,
    BlockSize,
    ClientConfiguration,
    ClientConnection,
    ClientEvent,
    ExportInfo,
    ExportsListed,
    HandshakeComplete,
    HandshakeRefused,
    NBDHandshakeError,
    Phase,
    Reply,
    ReplyReceived,
    TLSStarting,
)
from twisted_nbd._wire import BASE_ALLOCATION, MAX_U32, Cmd, CmdFlags, Errno, TxFlags
from twisted_nbd.errors import NBDError, ProtocolViolation
from twisted_nbd.interfaces import Extent
from twisted_nbd.tls import TLSClientSettings

__all__ = [
    "BlockSize",
    "ClientConfiguration",
    "ExportInfo",
    "NBDClient",
    "NBDClientProtocol",
    "NBDError",
    "NBDHandshakeError",
    "ProtocolViolation",
    "Reply",
    "TLSClientSettings",
    "connect",
    "list_exports",
]


class NBDClientProtocol(Protocol):
    """
    The Twisted side of one client connection: feeds what arrives to a
    L{ClientConnection}, writes what it queues, and fires a Deferred per
    request.

    @ivar handshake: fires with the L{ExportInfo} once transmission starts
        (or, in listing mode, with the export list once the connection
        closes); fails with L{NBDHandshakeError}, L{ProtocolViolation} or
        L{ConnectionLost}. Cancelling it drops the connection.
    @ivar info: the L{ExportInfo}, once known.
    """

    def __init__(self, connection: ClientConnection, tls: Any = None) -> None:
        self._conn = connection
        # What transport.startTLS takes (see twisted_nbd.tls.TLSClientSettings).
        self._tls = tls
        self.handshake: Deferred[Any] = Deferred(self._cancel_handshake)
        self.info: ExportInfo | None = None
        self._requests: dict[int, Deferred[Reply]] = {}
        self._exports: list[tuple[str, str]] | None = None
        self._handshake_error: Exception | None = None
        self._closed_waiters: list[Deferred[None]] = []
        # Why requests fail from now on (None while the connection is usable).
        self._closed_reason: Exception | None = None
        self._disconnecting = False
        self._disc_sent = False
        self._lost = False

    # ------------------------------------------------------------ IProtocol

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # Requests are small and latency matters more than packet count.
            self.transport.setTcpNoDelay(True)
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        self._conn.receive_data(data)
        while not self._lost:
            try:
                event = self._conn.next_event()
            except ProtocolViolation as e:
                self._violation(e)
                return
            self._flush()
            if event is NEED_DATA:
                break
            self._dispatch(event)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._closed_reason is None:
            self._closed_reason = ConnectionLost(
                f"the connection to the NBD server was lost: {reason.getErrorMessage()}"
            )
        failure = self._closed_reason
        if not self.handshake.called:
            if self._exports is not None:
                self.handshake.callback(self._exports)
            elif self._handshake_error is not None:
                self.handshake.errback(self._handshake_error)
            else:
                self.handshake.errback(failure)
        requests, self._requests = self._requests, {}
        for d in requests.values():
            if not d.called:
                d.errback(failure)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # ------------------------------------------------------------ events

    def _dispatch(self, event: ClientEvent) -> None:
        if isinstance(event, ReplyReceived):
            self._reply(event.reply)
        elif isinstance(event, HandshakeComplete):
            self.info = event.info
            self.handshake.callback(event.info)
        elif isinstance(event, ExportsListed):
            # The result is delivered when the connection closes after ABORT.
            self._exports = list(event.exports)
        elif isinstance(event, HandshakeRefused):
            self._handshake_error = event.error
            if self._conn.phase is Phase.CLOSED:
                self._close()
        elif isinstance(event, TLSStarting):
            transport: Any = self.transport
            if self._tls is None:
                self._violation(ProtocolViolation("STARTTLS was accepted but no TLS is set up"))
                return
            transport.startTLS(self._tls)
            self._conn.tls_started()
            self._flush()
        else:
            assert isinstance(event, AbortAcknowledged)
            self._close()

    def _reply(self, reply: Reply) -> None:
        d = self._requests.pop(reply.cookie, None)
        if d is not None and not d.called:  # it may have been cancelled
            if reply.error is not None:
                d.errback(reply.error)
            else:
                d.callback(reply)
        if reply.error is not None and reply.error.errno == Errno.ESHUTDOWN:
            # The server is going away: the client must soft-disconnect (C-07).
            self._start_disconnect()
        self._maybe_send_disc()

    def _violation(self, error: ProtocolViolation) -> None:
        """The server broke the protocol: drop it, and fail everything with why."""
        self._closed_reason = error
        if not self.handshake.called:
            self._handshake_error = error
        self._abort()

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out and self.transport is not None and not self._lost:
            self.transport.writeSequence(out)

    def _close(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.loseConnection()

    def _abort(self) -> None:
        if self.transport is not None and not self._lost:
            cast(ITCPTransport, self.transport).abortConnection()

    def _cancel_handshake(self, d: Deferred[Any]) -> None:
        self._closed_reason = ConnectionDone("the handshake was cancelled")
        self._abort()

    # ------------------------------------------------------------ requests

    def send(self, send: Callable[[], int]) -> Deferred[Reply]:
        """
        Queue a request with C{send} (a call on the L{ClientConnection} that
        returns the cookie) and write it.

        @return: a Deferred that fires with the L{Reply}, or fails with
            L{NBDError} (the server's error), L{ProtocolViolation},
            L{ConnectionLost}, L{ConnectionDone} (after L{disconnect}), or
            L{ValueError} (the request cannot be encoded).
        """
        unusable = self.unusable()
        if unusable is not None:
            return fail(unusable)
        try:
            cookie = send()
        except ValueError as e:
            return fail(e)
        d: Deferred[Reply] = Deferred()
        self._requests[cookie] = d
        self._flush()
        return d

    def send_disconnect(self, send: Callable[[], int]) -> Deferred[Reply]:
        """
        Queue an NBD_CMD_DISC with C{send} and write it at once, whatever is
        in flight; leave the closing to the server, which must first answer
        every request in flight (C-06).

        @return: a Deferred that fires with a L{Reply} without data when the
            connection has closed.
        """
        unusable = self.unusable()
        if unusable is not None:
            return fail(unusable)
        try:
            cookie = send()
        except ValueError as e:
            return fail(e)
        self._disconnecting = self._disc_sent = True
        self._flush()
        closed: Deferred[None] = Deferred()
        self._closed_waiters.append(closed)
        return closed.addCallback(lambda _: Reply(cookie, Cmd.DISC))

    def when_closed(self) -> Deferred[None]:
        """
        A Deferred that fires with C{None} once the connection has closed,
        for whatever reason (at once if it has already), so that a user
        such as a proxy learns of a lost idle connection.
        """
        d: Deferred[None] = Deferred()
        if self._lost:
            d.callback(None)
        else:
            self._closed_waiters.append(d)
        return d

    def unusable(self) -> Exception | None:
        """Why no request can be sent any more, or C{None} if one can."""
        if self._closed_reason is not None or self._lost:
            return self._closed_reason or ConnectionDone("the connection is closed")
        if self._disconnecting:
            return ConnectionDone("disconnect() was called")
        return None

    def disconnect(self) -> Deferred[None]:
        """
        Send NBD_CMD_DISC once every request in flight has its reply, then
        close the connection.

        @return: a Deferred that fires with C{None} when the connection has
            closed.
        """
        d: Deferred[None] = Deferred()
        if self._lost:
            d.callback(None)
            return d
        self._closed_waiters.append(d)
        self._start_disconnect()
        self._maybe_send_disc()
        return d

    def _start_disconnect(self) -> None:
        self._disconnecting = True

    def _maybe_send_disc(self) -> None:
        if not self._disconnecting or self._disc_sent or self._requests or self._lost:
            return
        self._disc_sent = True
        self._closed_reason = ConnectionDone("disconnect() was called")
        self._conn.disconnect()
        self._flush()
        self._close()


class NBDClient:
    """
    An open NBD export. Every request method returns a L{Deferred}; many may
    be in flight at once, and their replies may come in any order.

    A method whose request a polite client must not send (the range is past
    the end of the export or not aligned to its minimum block size, a READ
    or WRITE is over the maximum payload, the server did not advertise the
    command or flag) fails with L{ValueError} and sends nothing; use
    L{request} to send such requests anyway.

    Every Deferred fails with L{NBDError} if the server reports an error,
    with L{ProtocolViolation} if the server broke the protocol (the
    connection is then dropped), with L{ConnectionLost} if the connection
    goes away before the reply, and with L{ConnectionDone} if it is made
    after L{disconnect}.

    @ivar size: the export's size in bytes.
    @ivar export_name: its canonical name, or the name asked for.
    @ivar description: its description, or C{""}.
    @ivar transmission_flags: the server's L{TxFlags}.
    @ivar block_size: C{(minimum, preferred, maximum)} in bytes.
    @ivar structured_replies: structured replies are on.
    @ivar extended_headers: extended headers (64-bit lengths) are on.
    @ivar meta_contexts: the selected meta contexts' names and ids.
    """

    def __init__(self, protocol: NBDClientProtocol, connection: ClientConnection) -> None:
        info = protocol.info
        assert info is not None
        self.protocol = protocol
        self._conn = connection
        self.info = info
        self.size = info.size
        self.export_name = info.name
        self.description = info.description
        self.transmission_flags = info.transmission_flags
        self.block_size = info.block_size
        self.structured_replies = info.structured_replies
        self.extended_headers = info.extended_headers
        self.meta_contexts: Mapping[str, int] = info.meta_contexts
        self._context_names = {i: name for name, i in info.meta_contexts.items()}

    def __repr__(self) -> str:
        return (
            f"<NBDClient export={self.export_name!r} size={self.size} "
            f"flags={self.transmission_flags:#x} extended_headers={self.extended_headers}>"
        )

    def _flag(self, flag: TxFlags) -> bool:
        return bool(self.transmission_flags & flag)

    @property
    def read_only(self) -> bool:
        """The server refuses writes."""
        return self._flag(TxFlags.READ_ONLY)

    @property
    def can_flush(self) -> bool:
        """The server supports L{flush}."""
        return self._flag(TxFlags.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        """The server supports C{fua=True}."""
        return self._flag(TxFlags.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        """The server supports L{trim}."""
        return self._flag(TxFlags.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        """The server supports L{zero}."""
        return self._flag(TxFlags.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        """The server supports L{zero} with C{fast=True}."""
        return self._flag(TxFlags.SEND_FAST_ZERO)

    @property
    def can_cache(self) -> bool:
        """The server says it understands L{cache}."""
        return self._flag(TxFlags.SEND_CACHE)

    @property
    def can_df(self) -> bool:
        """The server supports L{read} with C{df=True}."""
        return self._flag(TxFlags.SEND_DF)

    @property
    def can_multi_conn(self) -> bool:
        """Flushes on one connection cover writes on every connection."""
        return self._flag(TxFlags.CAN_MULTI_CONN)

    @property
    def in_flight(self) -> int:
        """The number of requests sent and not yet answered."""
        return self._conn.in_flight

    # ------------------------------------------------------------ requests

    def request(
        self, command: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> Deferred[Reply]:
        """
        Send any request, unchecked: unknown commands and flags, ranges past
        the end. The header carries C{command}, C{flags}, C{offset} and
        C{length} exactly as given (with extended headers, a WRITE needs
        C{PAYLOAD_LEN} in C{flags} and C{len(payload)} as C{length}); the
        C{payload} follows it unchanged. A READ's reply is expected to carry
        C{length} bytes.

        An NBD_CMD_DISC goes out at once, even with requests in flight (which
        the server must still answer), and its Deferred fires with a L{Reply}
        when the server closes the connection; nothing may be sent after it.

        @return: a Deferred that fires with the L{Reply} (its C{data} for a
            READ, its C{extents} by context id for a BLOCK_STATUS), or fails
            with L{NBDError} carrying the server's errno, or
            L{ValueError} if the fields do not fit the header.
        """
        conn = self._conn

        def send() -> int:
            return conn.send_request(command, offset, length, flags, payload)

        if command == Cmd.DISC:
            return self.protocol.send_disconnect(send)
        return self.protocol.send(send)

    def _refusal(self, command: int, offset: int, length: int, flags: int = 0) -> Exception | None:
        """Why a polite client must not send this request, or C{None}."""
        unusable = self.protocol.unusable()
        if unusable is not None:
            return unusable
        try:
            self._conn.validate(command, offset, length, flags)
        except ValueError as e:
            return e
        return None

    def read(self, offset: int, length: int, df: bool = False) -> Deferred[bytes]:
        """
        Read C{length} bytes at C{offset}; with C{df}, ask the server not to
        fragment the reply (it may refuse with C{EOVERFLOW}).

        @return: a Deferred that fires with exactly C{length} bytes (holes
            read as zeroes), or fails as described in the class docstring.
        """
        flags = CmdFlags.DF if df else 0
        refused = self._refusal(Cmd.READ, offset, length, flags)
        if refused is not None:
            return fail(refused)
        if length == 0:
            return succeed(b"")
        d = self.request(Cmd.READ, offset, length, flags)
        return d.addCallback(_data)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        """
        Write C{data} at C{offset}; with C{fua}, the reply waits until the data
        is durable. The payload is written after the header, not copied onto
        it.

        @return: a Deferred that fires with C{None} once the server has
            written the data, or fails as described in the class docstring
            (C{EPERM} on a read-only export, C{ENOSPC} when out of space).
        """
        flags = CmdFlags.FUA if fua else 0
        refused = self._refusal(Cmd.WRITE, offset, len(data), flags)
        if refused is not None:
            return fail(refused)
        if not data:
            return succeed(None)
        conn = self._conn
        d = self.protocol.send(lambda: conn.write_request(offset, data, int(flags)))
        return d.addCallback(_none)

    def flush(self) -> Deferred[None]:
        """
        Make every write that has already been answered durable.

        @return: a Deferred that fires with C{None}, or fails as described in
            the class docstring.
        """
        return self._simple(Cmd.FLUSH, 0, 0, 0)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        """
        Tell the server it may discard C{length} bytes at C{offset}; their
        contents are undefined until written again.

        @return: a Deferred that fires with C{None}, or fails as described in
            the class docstring.
        """
        return self._simple(Cmd.TRIM, offset, length, CmdFlags.FUA if fua else 0)

    def zero(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        no_hole: bool = False,
        fast: bool = False,
    ) -> Deferred[None]:
        """
        Make C{length} bytes at C{offset} read as zeroes (NBD_CMD_WRITE_ZEROES).
        With C{no_hole} the range stays allocated; with C{fast} the server
        fails at once with C{ENOTSUP} unless zeroing is faster than writing.

        @return: a Deferred that fires with C{None}, or fails as described in
            the class docstring.
        """
        flags = (
            (CmdFlags.FUA if fua else 0)
            | (CmdFlags.NO_HOLE if no_hole else 0)
            | (CmdFlags.FAST_ZERO if fast else 0)
        )
        return self._simple(Cmd.WRITE_ZEROES, offset, length, flags)

    def cache(self, offset: int, length: int) -> Deferred[None]:
        """
        Hint that C{length} bytes at C{offset} will be read soon. Servers
        that did not advertise it may refuse with C{EINVAL}.

        @return: a Deferred that fires with C{None}, or fails as described in
            the class docstring.
        """
        return self._simple(Cmd.CACHE, offset, length, 0)

    def block_status(
        self, offset: int, length: int, req_one: bool = False
    ) -> Deferred[dict[str, list[Extent]]]:
        """
        Ask how C{length} bytes from C{offset} are allocated, in every
        selected meta context. The extents are consecutive from C{offset};
        they may cover less than C{length} or run past it. Without extended
        headers a C{length} over 4 GiB is shortened (it is only a hint).

        @param req_one: ask for a single extent per context.
        @return: a Deferred that fires with a dict from context name (for
            example C{"base:allocation"}) to a list of L{Extent}s (for
            C{base:allocation} their C{flags} hold L{STATE_HOLE} and
            L{STATE_ZERO}), or fails as described in the class docstring.
        """
        # A compact request carries 32 bits; longer ones are shortened (the
        # length is only a hint, and the server may answer less).
        if not self.extended_headers and length > MAX_U32:
            minimum = max(self.block_size.minimum, 1)
            length = MAX_U32 - MAX_U32 % minimum
        flags = CmdFlags.REQ_ONE if req_one else 0
        refused = self._refusal(Cmd.BLOCK_STATUS, offset, length, flags)
        if refused is not None:
            return fail(refused)
        if length == 0:
            return fail(ValueError("BLOCK_STATUS of zero bytes"))
        names = self._context_names

        def by_name(reply: Reply) -> dict[str, list[Extent]]:
            return {names[i]: list(extents) for i, extents in reply.extents.items()}

        return self.request(Cmd.BLOCK_STATUS, offset, length, flags).addCallback(by_name)

    def _simple(self, command: int, offset: int, length: int, flags: int) -> Deferred[None]:
        refused = self._refusal(command, offset, length, flags)
        if refused is not None:
            return fail(refused)
        if length == 0 and command != Cmd.FLUSH:
            return succeed(None)
        return self.request(command, offset, length, flags).addCallback(_none)

    def when_closed(self) -> Deferred[None]:
        """
        A Deferred that fires with C{None} once the connection has closed,
        for whatever reason (at once if it has already).
        """
        return self.protocol.when_closed()

    def disconnect(self) -> Deferred[None]:
        """
        Disconnect politely: wait for every request in flight, send
        NBD_CMD_DISC, and close. Requests made afterwards fail with
        L{ConnectionDone}.

        @return: a Deferred that fires with C{None} when the connection has
            closed.
        """
        return self.protocol.disconnect()


def _data(reply: Reply) -> bytes:
    assert reply.data is not None
    return reply.data


def _none(reply: Reply) -> None:
    return None


def _endpoint(reactor: Any, endpoint: IStreamClientEndpoint | str) -> IStreamClientEndpoint:
    if isinstance(endpoint, str):
        return clientFromString(reactor, endpoint)  # type: ignore[no-any-return]
    return endpoint


def connect(
    reactor: Any,
    endpoint: IStreamClientEndpoint | str,
    export_name: str = "",
    *,
    structured_replies: bool = True,
    meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
    extended_headers: bool = True,
    tls: TLSClientSettings | None = None,
) -> Deferred[NBDClient]:
    """
    Connect to an NBD server and open an export.

    The handshake asks for extended headers (if C{extended_headers}), else
    structured replies (if C{structured_replies}; extended headers are only
    tried together with them), falling back when the server refuses; then
    selects C{meta_contexts} if structured replies are on, and opens the
    export with NBD_OPT_GO, or NBD_OPT_EXPORT_NAME if the server does not
    know GO.

    @param reactor: the reactor, for string endpoints.
    @param endpoint: where the server is: an endpoint, or a client endpoint
        string such as C{"tcp:127.0.0.1:10809"} or C{"unix:/run/nbd.sock"}.
    @param export_name: the export to open; C{""} is the server's default.
    @param tls: switch to TLS first with NBD_OPT_STARTTLS (x509 or PSK, see
        L{TLSClientSettings}); plaintext if C{None}.
    @return: a Deferred that fires with an L{NBDClient}, or fails with
        L{NBDHandshakeError} if the server refuses the export,
        L{ProtocolViolation} if it breaks the protocol, L{ConnectionLost}
        if it closes the connection (as servers do to an unknown export
        asked for with NBD_OPT_EXPORT_NAME), L{ValueError} if the name is
        too long, or the endpoint's connection error. Cancelling it drops
        the connection.
    """
    try:
        config = ClientConfiguration(
            export_name,
            structured_replies=structured_replies,
            meta_contexts=meta_contexts,
            extended_headers=extended_headers,
            tls="off" if tls is None else ("require" if tls.require else "allow"),
        )
        creator = tls.client_creator() if tls is not None else None
    except ValueError as e:
        return fail(e)
    return Deferred.fromCoroutine(_open(reactor, endpoint, config, creator))


async def _open(
    reactor: Any,
    endpoint: IStreamClientEndpoint | str,
    config: ClientConfiguration,
    tls: Any = None,
) -> NBDClient:
    conn = ClientConnection(config)
    proto = NBDClientProtocol(conn, tls)
    await connectProtocol(_endpoint(reactor, endpoint), proto)
    await proto.handshake
    return NBDClient(proto, conn)


def list_exports(
    reactor: Any, endpoint: IStreamClientEndpoint | str, tls: TLSClientSettings | None = None
) -> Deferred[list[tuple[str, str]]]:
    """
    Ask a server for its exports with NBD_OPT_LIST, then end the session
    with NBD_OPT_ABORT.

    @param reactor: the reactor, for string endpoints.
    @param endpoint: where the server is (see L{connect}).
    @return: a Deferred that fires with the C{(name, description)} pairs,
        once the connection has closed, or fails with L{NBDHandshakeError}
        if the server refuses to list, L{ProtocolViolation} or
        L{ConnectionLost}.
    """
    try:
        creator = tls.client_creator() if tls is not None else None
    except ValueError as e:
        return fail(e)
    mode = "off" if tls is None else ("require" if tls.require else "allow")
    return Deferred.fromCoroutine(_list(reactor, endpoint, mode, creator))


async def _list(
    reactor: Any, endpoint: IStreamClientEndpoint | str, mode: str, tls: Any
) -> list[tuple[str, str]]:
    config = ClientConfiguration(list_exports=True, tls=mode)
    proto = NBDClientProtocol(ClientConnection(config), tls)
    await connectProtocol(_endpoint(reactor, endpoint), proto)
    exports: list[tuple[str, str]] = await proto.handshake
    return exports
