# -*- test-case-name: tests.test_transport -*-
"""
A faster write path for replies on Twisted's TCP and Unix transports.

Twisted's C{FileDescriptor.writeSequence} appends to a buffer and sends on
the reactor's next turn: it registers the socket for writing (an
C{epoll_ctl}), joins the buffered pieces into one C{bytes} (a copy of every
reply, 1 MiB for a 1 MiB READ), sends at most 128 KiB per C{send}, and
unregisters (another C{epoll_ctl}). For a server whose replies are mostly
one 4 KiB block or one big buffer that is measurable in both latency and
throughput.

L{ReplyWriter.write} sends the pieces at once with one C{sendmsg} (a
gathering write: no join, so no copy in Python) when the transport has
nothing queued, and hands only what the kernel did not take to the
transport, which then buffers, retries and applies back-pressure (pausing
its producer) exactly as usual. Ordering is kept because the direct path
is taken only when the transport's buffers are empty.

Other transports (TLS, test fakes, anything without a socket) get a plain
C{writeSequence}, with memoryviews turned into bytes first.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Callable, Sequence, Union

from twisted.internet import main as _main

__all__ = ["PayloadReceiver", "Piece", "ReplyWriter"]

#: What a reply is made of: header bytes, and payload views where possible.
Piece = Union[bytes, memoryview, bytearray]

#: At most this many buffers go into one sendmsg (Linux's IOV_MAX is 1024).
_MAX_IOV = 512

_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)


def _as_bytes(pieces: Sequence[Piece]) -> list[bytes]:
    return [p if type(p) is bytes else bytes(p) for p in pieces]


class ReplyWriter:
    """
    Writes replies to C{transport}, straight to its socket when it can.

    @ivar direct: whether the direct path is possible for this transport.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        sock = getattr(transport, "socket", None)
        # The attributes of twisted.internet.abstract.FileDescriptor that say
        # whether anything is queued; without them, no direct path.
        self.direct = (
            isinstance(sock, socket.socket)
            and hasattr(transport, "dataBuffer")
            and hasattr(transport, "_tempDataLen")
            and hasattr(transport, "offset")
            and hasattr(sock, "sendmsg")
        )
        self._socket: socket.socket | None = sock if self.direct else None
        #: With TLS on the socket (L{twisted_nbd._tls_socket.SocketTLS}),
        #: replies go through it instead.
        self.tls: Any = None

    def stop_direct(self) -> None:
        """
        Write through the transport from now on (it is switching to TLS,
        whose bytes must not bypass it).
        """
        self.direct = False
        self._socket = None

    def _idle(self) -> bool:
        """Nothing is queued in the transport, and it is open for writing."""
        t = self.transport
        return bool(
            t.connected
            and not t.disconnecting
            and not t._tempDataLen
            and len(t.dataBuffer) == t.offset
            and not getattr(t, "_writeDisconnected", False)
        )

    def write(self, pieces: Sequence[Piece]) -> None:
        """
        Write C{pieces} as one message, in order after everything written
        before.
        """
        if not pieces:
            return
        tls = self.tls
        if tls is not None:
            if not self._idle():
                self.transport.writeSequence(_as_bytes(pieces))
                return
            sent = tls.send_now(pieces)
            if sent < sum(len(p) for p in pieces):
                self.transport.writeSequence(_unsent(pieces, sent))
            return
        sock = self._socket
        if sock is None or not self._idle():
            self.transport.writeSequence(_as_bytes(pieces))
            return
        rest: Sequence[Piece] = pieces
        while rest:
            batch = rest[:_MAX_IOV] if len(rest) > _MAX_IOV else rest
            try:
                sent = sock.sendmsg(batch)
            except OSError as e:
                if e.errno not in _RETRY:
                    # Let the transport find the error on its next write and
                    # close the connection its usual way.
                    self.transport.writeSequence(_as_bytes(rest))
                    return
                sent = 0
            total = sum(len(p) for p in batch)
            if sent < total:
                # Queue what the kernel did not take: copies of those bytes
                # only, since the caller may reuse its buffers once we return.
                self.transport.writeSequence(_unsent(rest, sent))
                return
            rest = rest[len(batch) :]


def _unsent(pieces: Sequence[Piece], sent: int) -> list[bytes]:
    """The bytes of C{pieces} after the first C{sent}."""
    out: list[bytes] = []
    for piece in pieces:
        size = len(piece)
        if sent >= size:
            sent -= size
            continue
        if sent:
            out.append(bytes(memoryview(piece)[sent:]))
            sent = 0
        else:
            out.append(piece if type(piece) is bytes else bytes(piece))
    return out


class PayloadReceiver:
    """
    Receives a known number of bytes from a Twisted TCP or Unix transport
    straight into a buffer of the caller's (C{recv_into}), instead of as
    64 KiB C{bytes} objects that would then be joined: for a 1 MiB WRITE
    that is one copy (and sixteen allocations) less.

    While it receives, the transport's C{doRead} is replaced on the
    instance; it is put back when the buffer is full or the connection is
    lost. Pausing the transport pauses this too, as usual.

    @ivar possible: whether this transport allows it at all.
    @ivar received: how many bytes it has received, ever (data arriving here
        never reaches C{dataReceived}, so the idle timeout watches this).
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        sock = getattr(transport, "socket", None)
        self.possible = (
            isinstance(sock, socket.socket)
            and hasattr(sock, "recv_into")
            and callable(getattr(type(transport), "doRead", None))
        )
        self._socket: socket.socket | None = sock if self.possible else None
        self._view: memoryview | None = None
        self._position = 0
        self._done: Callable[[], None] | None = None
        self.received = 0

    @property
    def active(self) -> bool:
        """Whether a buffer is being filled."""
        return self._view is not None

    def start(self, view: memoryview, done: Callable[[], None]) -> None:
        """
        Fill C{view} from the socket; call C{done} once it is full.

        @raise RuntimeError: this transport does not allow it, or a buffer
            is already being filled.
        """
        if not self.possible or self._view is not None:
            raise RuntimeError("cannot receive straight into a buffer here")
        self._view, self._position, self._done = view, 0, done
        self.transport.doRead = self._do_read

    def stop(self) -> None:
        """Stop filling (the connection is going away); C{done} is not called."""
        if self._view is not None:
            self._view.release()
            self._view = None
            self._done = None
            self.transport.__dict__.pop("doRead", None)

    def _do_read(self) -> Any:
        view = self._view
        sock = self._socket
        assert view is not None and sock is not None
        size = len(view)
        # Take all that has arrived, not one piece per turn of the reactor.
        while self._position < size:
            try:
                count = sock.recv_into(view[self._position :])
            except OSError as e:
                if e.errno in _RETRY:
                    return None
                self.stop()
                return _main.CONNECTION_LOST
            if not count:
                self.stop()
                return _main.CONNECTION_DONE
            self._position += count
            self.received += count
        if self._position == size:
            done = self._done
            self._view = None
            self._done = None
            self.transport.__dict__.pop("doRead", None)
            assert done is not None
            done()
        return None
