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
import fcntl
import os
import socket
import termios
from array import array
from typing import Any, Callable, Sequence, Union, cast

from twisted.internet import main as _main

__all__ = ["PayloadReceiver", "Piece", "PipedPayload", "PipedRead", "ReplyWriter"]

#: What a reply is made of: header bytes, and payload views where possible.
Piece = Union[bytes, memoryview, bytearray]

#: At most this many buffers go into one sendmsg (Linux's IOV_MAX is 1024).
_MAX_IOV = 512

_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)

#: How large the pipes are that payloads are spliced into (see
#: L{PayloadReceiver.start_pipe}), and so the largest payload taken that
#: way: Linux's limit for unprivileged processes (C{fs.pipe-max-size}).
PIPE_SIZE = 1024 * 1024

_PAGE_MASK = (os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096) - 1

#: READs of at least this size (and at most L{PIPE_SIZE}) are offered to
#: devices that can splice them (L{ReplyWriter.piped_read}). Measured with
#: fio on a page-cached file (random reads at QD16 unless said): 16 KiB
#: reads 28% slower spliced (the extra system calls cost more than the
#: copy), 32 KiB within noise, 64 KiB 10% faster (and the 64 KiB
#: read/write mix 15-20%), 256 KiB and 1 MiB (sequential, QD8) 11-35%.
PIPE_READ_MIN = 64 * 1024

#: At most this many pipes per connection, in use or kept for reuse: each
#: is two file descriptors, and while a device still moves a payload out of
#: one, the next payload needs another. Past that, payloads go to buffers.
PIPES_MAX = 4

_SPLICE: Callable[..., int] | None = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)
_F_SETPIPE_SZ: int = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _as_bytes(pieces: Sequence[Piece]) -> list[bytes]:
    return [p if type(p) is bytes else bytes(p) for p in pieces]


def _new_pipe() -> tuple[int, int] | None:
    """
    A new non-blocking pipe (read end, write end) of L{PIPE_SIZE} bytes.

    @return: the pipe; C{None} when out of descriptors (try again later).
    @raise PermissionError: the kernel will not make a pipe that large here
        (over C{fs.pipe-max-size} or the per-user pipe memory): do not ask
        again.
    """
    try:
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = fcntl.fcntl(write, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        # Over the per-user limit on pipe memory (EPERM), say.
        size = 0
    if size < PIPE_SIZE:
        os.close(read)
        os.close(write)
        raise PermissionError("no pipes of PIPE_SIZE bytes here")
    return (read, write)


def _drain(source: int, length: int) -> bytes:
    """
    Read the C{length} bytes waiting in the pipe C{source}, as one bytes
    object; fewer only if the pipe holds fewer (it should not).
    """
    chunks = []
    while length:
        try:
            chunk = os.read(source, length)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class PipedRead:
    """
    A READ's payload waiting in the reply writer's pipe (see
    L{ReplyWriter.piped_read}), sent with C{splice} as the last piece of a
    L{ReplyWriter.write}.

    @ivar pipe: the pipe (read end, write end).
    @ivar length: how many bytes it holds.
    """

    __slots__ = ("pipe", "length")

    def __init__(self, pipe: tuple[int, int], length: int) -> None:
        self.pipe = pipe
        self.length = length

    def __len__(self) -> int:
        return self.length


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
            and hasattr(transport, "_writeDisconnected")
            and hasattr(sock, "sendmsg")
        )
        self._socket: socket.socket | None = sock if self.direct else None
        #: With TLS on the socket (L{twisted_nbd._tls_socket.SocketTLS}),
        #: replies go through it instead.
        self.tls: Any = None
        #: Whether READ payloads can be spliced to the socket (L{piped_read}).
        self.splice = self.direct and _SPLICE is not None
        #: How many spliced payloads the socket could not take at once, so
        #: that what was left in the pipe was read out and queued instead.
        self.splice_fallbacks = 0
        self._pipe: tuple[int, int] | None = None

    def stop_direct(self) -> None:
        """
        Write through the transport from now on (it is switching to TLS,
        whose bytes must not bypass it).
        """
        self.direct = False
        self._socket = None
        self.splice = False
        self.close()

    def close(self) -> None:
        """Close the pipe, if any (the connection is going away)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])

    def piped_read(
        self, read_to_pipe: Callable[[int, int, int], int], offset: int, length: int
    ) -> PipedRead | None:
        """
        Have a device put the C{length} bytes at C{offset} in this writer's
        pipe (C{read_to_pipe}: L{twisted_nbd.interfaces.IPipeRead}), to be
        sent as the last piece of the next L{write}, which must come before
        anything else uses the pipe or writes to those bytes.

        The page cache's pages go through the pipe to the socket by
        reference: no copy in the server at all, where reading into a
        buffer and sending it is two (one into the buffer, one into the
        socket).

        @return: the payload, or C{None}: the device declined or moved only
            part (the pipe is then emptied), or splicing is not possible here.
        """
        if (offset & _PAGE_MASK) + length > PIPE_SIZE:
            # The pipe takes at most one page per slot: an unaligned 1 MiB
            # spans a page more than its slots.
            return None
        pipe = self._pipe
        if pipe is None:
            if not self.splice:
                return None
            try:
                pipe = self._pipe = _new_pipe()
            except PermissionError:
                self.splice = False
                return None
            if pipe is None:
                return None
        try:
            moved = read_to_pipe(pipe[1], offset, length)
        except Exception:
            # It should not raise; what it may have moved must not be sent
            # ahead of the next payload.
            moved = -1
        if moved == length:
            return PipedRead(pipe, length)
        if moved:
            # Part of it (or unknown): a new pipe is cheaper than reading
            # this one out.
            self.close()
        return None

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

    def direct_socket(self) -> socket.socket | None:
        """
        The socket, when a reply may be sent straight to it now (no TLS,
        nothing queued in the transport): the caller sends with C{sendmsg}
        and gives what the kernel did not take to L{queue}, and must ask
        again after that.
        """
        if self.tls is None and self._socket is not None and self._idle():
            return self._socket
        return None

    def queue(self, pieces: Sequence[Piece], sent: int) -> None:
        """
        Queue in the transport (copied: the caller may reuse its buffers)
        what is left of C{pieces} after the first C{sent} bytes, which were
        sent straight to the L{direct_socket}; C{0} after an error, which
        the transport then finds on its next write.
        """
        self.transport.writeSequence(_unsent(pieces, sent))

    def write(self, message: Sequence[Piece | PipedRead]) -> None:
        """
        Write the pieces of C{message} as one message, in order after
        everything written before; a L{PipedRead} may come last.
        """
        if not message:
            return
        # A spliced READ payload comes last (see piped_read).
        if type(message[-1]) is PipedRead:
            self._write_piped(message)
            return
        pieces = cast(Sequence[Piece], message)
        tls = self.tls
        if tls is not None:
            if not self._idle():
                self.transport.writeSequence(_as_bytes(pieces))
                return
            sent = tls.send_now(pieces)
            if sent < sum(map(len, pieces)):
                self.transport.writeSequence(_unsent(pieces, sent))
            return
        sock = self._socket
        t = self.transport
        # _idle, inline: this runs for every batch of replies.
        if (
            sock is None
            or not t.connected
            or t.disconnecting
            or t._tempDataLen
            or len(t.dataBuffer) != t.offset
            or t._writeDisconnected
        ):
            t.writeSequence(_as_bytes(pieces))
            return
        unsent = _send(sock, pieces, 0)
        if unsent is not None:
            t.writeSequence(unsent)

    def _write_piped(self, pieces: Sequence[Any]) -> None:
        """
        L{write} for pieces whose last is a L{PipedRead}: the others with
        C{MSG_MORE}, then the pipe spliced to the socket. Whatever the
        socket does not take at once, and everything when the transport
        has bytes queued, goes to the transport (read out of the pipe: the
        one copy the direct way saves), so the pipe is empty on return.
        """
        piped: PipedRead = pieces[-1]
        source = piped.pipe[0]
        head = pieces[:-1]
        sock = self._socket
        if sock is None or not self._idle():
            self.transport.writeSequence(_as_bytes(head) + [_drain(source, piped.length)])
            return
        unsent = _send(sock, head, socket.MSG_MORE)
        if unsent is not None:
            self.splice_fallbacks += 1
            self.transport.writeSequence(unsent + [_drain(source, piped.length)])
            return
        splice = _SPLICE
        assert splice is not None
        fd = sock.fileno()
        left = piped.length
        while left:
            try:
                count = splice(source, fd, left, flags=_SPLICE_FLAGS)
            except OSError:
                # The socket is full (or failed: the transport finds out
                # on its own write, as in write).
                break
            if not count:
                break
            left -= count
        if left:
            self.splice_fallbacks += 1
            self.transport.writeSequence([_drain(source, left)])


def _send(sock: socket.socket, pieces: Sequence[Piece], flags: int) -> list[bytes] | None:
    """
    Send C{pieces} with C{sendmsg} (C{flags}), as many per call as Linux
    takes.

    @return: C{None} once all went; else what the kernel did not take, as
        copies (the caller may reuse its buffers once this returns), for
        the transport to queue: all that is left after an error other than
        a full socket, so that the transport finds the error on its next
        write and closes the connection its usual way.
    """
    rest = pieces
    while rest:
        batch = rest[:_MAX_IOV] if len(rest) > _MAX_IOV else rest
        try:
            sent = sock.sendmsg(batch, (), flags)
        except OSError as e:
            if e.errno not in _RETRY:
                return _as_bytes(rest)
            sent = 0
        if sent < sum(map(len, batch)):
            return _unsent(rest, sent)
        rest = rest[len(batch) :]
    return None


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


class PipedPayload:
    """
    A WRITE's payload that waits in a pipe (see
    L{PayloadReceiver.start_pipe}) for the device to move it to its file
    (L{twisted_nbd.interfaces.IPipeWrite}).

    @ivar pipe: the pipe (read end, write end).
    @ivar source: its read end.
    """

    __slots__ = ("pipe", "source", "_length")

    def __init__(self, pipe: tuple[int, int], length: int) -> None:
        self.pipe = pipe
        self.source = pipe[0]
        self._length = length

    def __len__(self) -> int:
        return self._length


class PayloadReceiver:
    """
    Receives a known number of bytes from a Twisted TCP or Unix transport
    without Twisted's C{doRead}: straight into a buffer of the caller's
    (C{recv_into}), instead of as 64 KiB C{bytes} objects that would then
    be joined, which for a 1 MiB WRITE is one copy (and sixteen
    allocations) less; or into a pipe (C{splice}, which moves the socket's
    pages without copying them) for a device that then moves them to its
    file with one copy in the kernel (L{start_pipe}).

    While it receives, the transport's C{doRead} is replaced on the
    instance; it is put back when all has arrived or the connection is
    lost. Pausing the transport pauses this too, as usual.

    @ivar possible: whether this transport allows it at all.
    @ivar received: how many bytes it has received, ever (data arriving here
        never reaches C{dataReceived}, so the idle timeout watches this).
    @ivar pipes_possible: whether payloads can be spliced into pipes here
        (cleared for good when the kernel refuses a pipe of L{PIPE_SIZE}).
    @ivar pipe_fallbacks: how many spliced payloads went on into a buffer
        because their pipe ran out of slots.
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
        # What fills a buffer: the socket's recv_into, or TLS's (use_tls).
        self._recv_into: Callable[[memoryview], int] | None = (
            self._socket.recv_into if self._socket is not None else None
        )
        # The transport's own doRead while this one stands in for it: the
        # class's (None), or the one TLS on the socket put on the instance.
        self._saved_read: Any = None
        self._view: memoryview | None = None
        self._position = 0
        self._done: Callable[[], None] | None = None
        self.received = 0
        # Splicing: the pipe being filled and how much is still to come, the
        # pipes kept for reuse, how many exist, and what to call when the
        # pipe runs out of slots.
        self._pipe: tuple[int, int] | None = None
        self._remaining = 0
        self._spare_pipes: list[tuple[int, int]] = []
        self._pipes = 0
        self._full: Callable[[int], None] | None = None
        self.pipes_possible = self.possible and _SPLICE is not None
        self.pipe_fallbacks = 0

    @property
    def active(self) -> bool:
        """Whether a buffer or a pipe is being filled."""
        return self._view is not None or self._pipe is not None

    @property
    def piping(self) -> bool:
        """Whether a pipe is being filled."""
        return self._pipe is not None

    def use_tls(self, recv_into: Callable[[memoryview], int]) -> None:
        """
        The socket now carries TLS (L{twisted_nbd._tls_socket.SocketTLS}):
        fill buffers with C{recv_into}, which decrypts what has arrived into
        a buffer (at most one record's worth a call; C{BlockingIOError} when
        there is nothing yet), and splice nothing (a pipe would get the
        encrypted bytes).
        """
        self._recv_into = recv_into
        self.pipes_possible = False

    def start(self, view: memoryview, done: Callable[[], None]) -> None:
        """
        Fill C{view} from the socket; call C{done} once it is full.

        @raise RuntimeError: this transport does not allow it, or a buffer
            is already being filled.
        """
        if not self.possible or self.active:
            raise RuntimeError("cannot receive straight into a buffer here")
        self._view, self._position, self._done = view, 0, done
        self._stand_in(self._do_read)

    def _stand_in(self, read: Callable[[], Any]) -> None:
        """Have the reactor call C{read} instead of the transport's C{doRead}."""
        transport = self.transport
        self._saved_read = transport.__dict__.get("doRead")
        transport.doRead = read

    def _put_back(self) -> None:
        """Give the transport its own C{doRead} back."""
        transport = self.transport
        if self._saved_read is not None:
            transport.doRead = self._saved_read
            self._saved_read = None
        else:
            transport.__dict__.pop("doRead", None)

    def pipe(self) -> tuple[int, int] | None:
        """
        An empty pipe (read end, write end) of L{PIPE_SIZE} bytes to splice
        a payload into; or C{None}: there are L{PIPES_MAX} already, or
        splicing is not possible here.
        """
        if self._spare_pipes:
            return self._spare_pipes.pop()
        if not self.pipes_possible or self._pipes >= PIPES_MAX:
            return None
        try:
            pipe = _new_pipe()
        except PermissionError:
            self.pipes_possible = False
            return None
        if pipe is None:
            return None  # out of descriptors: a buffer will do
        self._pipes += 1
        return pipe

    def pipe_free(self) -> bool:
        """Whether L{pipe} would give a pipe now."""
        return bool(self._spare_pipes) or (self.pipes_possible and self._pipes < PIPES_MAX)

    def return_pipe(self, pipe: tuple[int, int], emptied: bool = False) -> None:
        """
        Take back a pipe that L{pipe} gave: kept for reuse if it is empty
        (C{emptied} says it is: its payload all went where it should; else
        it is checked, since a device that failed may have left bytes in
        it), else closed.
        """
        if self.pipes_possible:
            waiting = array("i", [0])
            if not emptied:
                try:
                    fcntl.ioctl(pipe[0], termios.FIONREAD, waiting)
                except OSError:
                    waiting[0] = 1
            if not waiting[0]:
                self._spare_pipes.append(pipe)
                return
        self._pipes -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def waiting(self) -> int:
        """How many bytes the socket holds unread now (0 if it cannot say)."""
        sock = self._socket
        if sock is None:
            return 0
        waiting = array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting)
        except OSError:
            return 0
        return waiting[0]

    def take(self, size: int) -> bytes:
        """
        Up to C{size} bytes from the socket, without waiting.

        @raise OSError: nothing there yet (C{BlockingIOError}), or the
            socket failed.
        """
        sock = self._socket
        if sock is None:
            raise BlockingIOError(errno.EAGAIN, "no socket")
        return sock.recv(size, socket.MSG_DONTWAIT)

    def receive_waiting(self, view: memoryview) -> None:
        """
        Fill C{view} with bytes that the socket holds already (see
        L{waiting}), at once.

        @raise OSError: the socket failed or held less than it said; the
            connection is lost, and C{view} holds part of the bytes.
        """
        sock = self._socket
        if sock is None:
            raise BlockingIOError(errno.EAGAIN, "no socket")
        position, size = 0, len(view)
        while position < size:
            count = sock.recv_into(view[position:], size - position, socket.MSG_DONTWAIT)
            if not count:
                raise ConnectionError("the peer closed the connection mid-payload")
            position += count
        self.received += size

    def splice_waiting(self, length: int) -> PipedPayload | bytearray | None:
        """
        Take C{length} bytes that the socket holds already (see L{waiting})
        at once: spliced into a pipe, or, should the pipe run out of slots
        first (see L{start_pipe}), all of them in a buffer.

        @return: the pipe's payload or the buffer; C{None} if no pipe can
            be had (then nothing was taken).
        @raise OSError: the socket failed or held less than it said; what
            was taken is lost, and so is the connection.
        """
        sock = self._socket
        splice = _SPLICE
        if sock is None or splice is None or self.active:
            return None
        pipe = self.pipe()
        if pipe is None:
            return None
        fd = sock.fileno()
        moved = 0
        try:
            while moved < length:
                count = splice(fd, pipe[1], length - moved, flags=_SPLICE_FLAGS)
                if not count:
                    raise ConnectionError("the peer closed the connection mid-payload")
                moved += count
        except BlockingIOError:
            # Out of slots (the bytes are there): take them all into a buffer,
            # what the pipe holds first, then the rest from the socket.
            self.pipe_fallbacks += 1
            buffer = bytearray(length)
            view = memoryview(buffer)
            try:
                position = 0
                while position < moved:
                    position += os.readv(pipe[0], [view[position:moved]])
                self.receive_waiting(view[moved:])
            finally:
                view.release()
                self.return_pipe(pipe)
            self.received += moved
            return buffer
        except BaseException:
            self.return_pipe(pipe)
            raise
        self.received += length
        return PipedPayload(pipe, length)

    def start_pipe(
        self,
        pipe: tuple[int, int],
        length: int,
        done: Callable[[], None],
        full: Callable[[int], None],
    ) -> None:
        """
        Splice C{length} bytes from the socket into C{pipe} (after what it
        holds already); call C{done} once they are all there.

        A pipe holds one piece of socket buffer per slot, and a peer that
        sends in small pieces can fill its slots before its bytes. Then
        C{full} is called with how many bytes are still to come; it takes
        what the pipe holds and receives the rest another way (L{start}).

        @raise RuntimeError: splicing is not possible here, or something is
            being received already.
        """
        if not self.pipes_possible or self.active:
            raise RuntimeError("cannot splice into a pipe here")
        self._pipe, self._remaining, self._done, self._full = pipe, length, done, full
        self._stand_in(self._do_splice)

    def stop(self) -> None:
        """
        Stop filling (the connection is going away): C{done} is not called;
        the pipe being filled, if any, and the spare ones are closed, and
        no more are made.
        """
        if self._view is not None:
            self._view.release()
            self._view = None
            self._done = None
            self._put_back()
        self.pipes_possible = False
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            self._done = self._full = None
            self._put_back()
            self.return_pipe(pipe)
        spare, self._spare_pipes = self._spare_pipes, []
        for pipe in spare:
            self.return_pipe(pipe)

    def _finished(self) -> Callable[[], None]:
        """Stop receiving; what to call now that all has arrived."""
        done = self._done
        self._view = None
        self._pipe = None
        self._done = self._full = None
        self._put_back()
        assert done is not None
        return done

    def _do_splice(self) -> Any:
        pipe = self._pipe
        sock = self._socket
        splice = _SPLICE
        assert pipe is not None and sock is not None and splice is not None
        fd = sock.fileno()
        moved = 0
        while self._remaining:
            try:
                count = splice(fd, pipe[1], self._remaining, flags=_SPLICE_FLAGS)
            except OSError as e:
                if e.errno not in _RETRY:
                    self.stop()
                    return _main.CONNECTION_LOST
                # Nothing more has arrived (wait for it); or the pipe is out
                # of slots while the socket holds more, which would have the
                # reactor call this again and again. The reactor calls this
                # when the socket is readable, so only a call that moved
                # nothing needs to ask which.
                if not moved and self.waiting():
                    self.pipe_fallbacks += 1
                    full, remaining = self._full, self._remaining
                    self._finished()
                    assert full is not None
                    full(remaining)
                return None
            if not count:
                self.stop()
                return _main.CONNECTION_DONE
            self._remaining -= count
            self.received += count
            moved += count
        self._finished()()
        return None

    def _do_read(self) -> Any:
        view = self._view
        recv_into = self._recv_into
        assert view is not None and recv_into is not None
        size = len(view)
        # Take all that has arrived, not one piece per turn of the reactor.
        while self._position < size:
            try:
                count = recv_into(view[self._position :])
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
            self._finished()()
        return None
