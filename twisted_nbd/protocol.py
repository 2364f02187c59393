# -*- test-case-name: tests.test_protocol -*-
"""
The Twisted side of the NBD server: glue between a transport, the sans-I/O
L{ServerConnection}, and the export's L{IBlockDevice}.

Flow control lives here and only here. Reading from the client stops
(C{transport.pauseProducing()}) whenever any of these holds, and resumes when
none does:

  - the requests in flight reach C{max_queue_depth};
  - the bytes in flight (WRITE payloads held, READ replies owed) reach
    C{max_bytes_in_flight};
  - the transport told us to pause because its send buffer is full (we are
    registered on it as a streaming producer, as L{twisted.web.http}'s
    C{HTTPChannel} is), so a client that does not read its replies stops
    being read and its requests stop reaching the backend;
  - the client sent NBD_CMD_DISC.

The parse loop asks the connection for one event at a time and checks these
conditions before each, so the limits hold exactly, even when the backend
answers synchronously and replies are written from inside the loop.

Each kind of event has one handler in L{NBDServerProtocol._DISPATCH}; a
new command is one more entry. Observers
(L{twisted_nbd.observers.IServerObserver}) see connections and requests
come and go; with none, the per-request path does not even read the clock.
Connection limits (L{twisted_nbd.limits}) hook in at four points: the
factory's C{buildProtocol} refuses a connection before the greeting, and a
L{ConnectionGuard} is told of the connection being made, of data arriving,
of the export being chosen and of the connection being lost.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any, Callable, ClassVar, Iterable, Sequence, cast

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, FirstError, gatherResults, maybeDeferred
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_nbd import _tls_socket, logs
from twisted_nbd._connection import (
    NEED_DATA,
    Aborted,
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    ExportChosen,
    FlushRequest,
    OptionRejected,
    Phase,
    ReadRequest,
    Request,
    RequestRejected,
    ServerConfiguration,
    ServerConnection,
    StartTLS,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
    plan_sparse_read,
)
from twisted_nbd._transport import (
    PIPE_READ_MIN,
    PIPE_SIZE,
    PayloadReceiver,
    Piece,
    PipedPayload,
    PipedRead,
    ReplyWriter,
)
from twisted_nbd._wire import CmdFlags, Errno
from twisted_nbd.config import (
    DEFAULT_MAX_BYTES_IN_FLIGHT,
    DEFAULT_MAX_QUEUE_DEPTH,
    DEFAULT_POLL_MAX,
)
from twisted_nbd.errors import NBDError, ProtocolViolation
from twisted_nbd.exports import ConnectionContext, ExportRegistry
from twisted_nbd.interfaces import (
    Extent,
    IBlockDevice,
    IBufferRead,
    IBufferWrite,
    IImmediateIO,
    IPipeRead,
    IPipeWrite,
    ISparseRead,
    Segment,
)
from twisted_nbd.limits import ConnectionGuard, ConnectionSlots, Limits, RateLimitedLog
from twisted_nbd.observers import ConnectionInfo, IFlowObserver, IServerObserver
from twisted_nbd.tls import (
    describe_tls_error,
    dn_allowed,
    peer_psk_identity,
    peer_subject,
    session_description,
)

__all__ = [
    "DEFAULT_MAX_BYTES_IN_FLIGHT",
    "DEFAULT_MAX_QUEUE_DEPTH",
    "NBDServerFactory",
    "NBDServerProtocol",
]


#: How much a TCP or Unix transport reads at once (Twisted's default is 64 KiB):
#: just under 128 KiB, so that the buffer each read allocates stays below
#: glibc's threshold for allocating with mmap (which would cost an mmap, a
#: munmap and page faults per read).
READ_SIZE = 128 * 1024 - 1024
#: WRITE payloads with at least this much still to come are received straight
#: into their final buffer (see PayloadReceiver).
DIRECT_PAYLOAD_MIN = 256 * 1024

#: Below this the poll window is not worth keeping.
POLL_MIN = 5e-6
#: At most this many requests are taken by polling before the reactor runs.
POLL_REQUESTS = 16
#: After this many polls in a row that found nothing, do not poll for the
#: next POLL_REST requests.
POLL_MISSES = 3
POLL_REST = 64
#: What polling reads at most at once (more waits for the next round).
POLL_BUFFER = 128 * 1024 - 1024
#: What a TCP or Unix transport and polling read at once while the client
#: sends mid-sized WRITEs (from MID_WRITE_MIN to DIRECT_PAYLOAD_MIN bytes).
LARGE_READ_SIZE = 512 * 1024
MID_WRITE_MIN = 32 * 1024
#: What they read at once while the client's large WRITEs are spliced into
#: pipes (see _receive_into_pipe): little, so that what comes after a
#: request's header, most of which is payload, is not first copied to
#: Python and then back into the pipe.
PIPE_READ_SIZE = 4096
#: Payloads of at least this many bytes go into pipes for devices that take
#: them from there (IPipeWrite). Measured with fio on a file: 512 KiB WRITEs
#: +25 to 45%, 1 MiB +20%, but 256 KiB ones -10% (the pipe's system calls
#: cost more than the copy they save).
PIPE_PAYLOAD_MIN = 512 * 1024

#: At most this many bytes of payload buffers are kept for reuse per connection.
SPARE_BUFFERS_MAX = 16 * 1024 * 1024

#: Replies gathered inside the parse loop are written once they reach this
#: many bytes, even before the loop ends (WRITEs count their payload: it is
#: work done since the last write). Measured against 256 KiB, alternating,
#: on a RAM disk: the 64 KiB random read/write mix at QD16 34,526-41,851 IOPS
#: against 31,174-34,240 (fewer sendmsg calls, and fewer wake-ups of the
#: client), 256 KiB sequential reads at QD8 12,066-12,171 against 8,087-8,614,
#: 4 KiB reads at QD32 unchanged (32 of them never reach either limit).
_CORK_LIMIT = 1024 * 1024

#: Structured READs of at least this many bytes send zero runs as holes; for
#: smaller ones the extra block_status call would cost more than it saves.
SPARSE_READ_MIN = 256 * 1024

_DF = int(CmdFlags.DF)
_EPOLL: Any = getattr(select, "epoll", type(None))
_EPOLLIN = getattr(select, "EPOLLIN", 1)

#: What L{NBDServerProtocol._lone_read} did with what it was given.
_SERVED, _TAKEN, _NOT_TAKEN = object(), object(), object()

#: What NBDServerProtocol._simple works with (see _make_simple_kit).
_SimpleKit = tuple[
    Callable[[], "tuple[int, int, int, int, int, memoryview | None] | None"],
    Callable[[int, int], bytes],
    Callable[[int, int, int], bytes],
    # (flags, offset, length): a plain READ's data if the device has it at once.
    Callable[[int, int, int], Any],
    "Callable[[int, Any], int] | None",
    ConnectionInfo,
]
#: See NBDServerProtocol._lone_kit.
_LoneKit = tuple[
    Callable[[bytes], "tuple[int, int, int, int] | None"],
    Callable[..., int],
    ReplyWriter,
    _SimpleKit,
]
_FUA = int(CmdFlags.FUA)


#: What L{NBDServerProtocol._sync_value} says of a result not there yet.
_PENDING = object()


def _swallow(failure: Failure) -> None:
    """Mark a failure as handled (it was dealt with elsewhere)."""
    return None


def _first_error(failure: Failure) -> Failure:
    """Unwrap gatherResults' FirstError so the real error picks the errno."""
    if isinstance(failure.value, FirstError):
        return failure.value.subFailure
    return failure


def _check_segments(request: ReadRequest, segments: Sequence[Segment]) -> None:
    """
    Check that a sparse read's segments cover the request exactly, in
    order, none empty (T-14, T-15): a backend's mistake must become an
    error reply, never a malformed one.

    @raise RuntimeError: they do not.
    """
    position = request.offset
    for at, part in segments:
        size = part if isinstance(part, int) else len(part)
        if at != position or size <= 0:
            raise RuntimeError(f"sparse read segment ({at}, {size}) does not follow {position}")
        position += size
    if position != request.offset + request.length:
        raise RuntimeError(f"sparse read segments end at {position}, not at the end of the read")


def describe_address(address: object) -> str:
    """
    An address as people write it: C{127.0.0.1:5000}, C{[::1]:5000},
    C{unix:/run/nbd.sock} (C{unix} for an unnamed client socket).
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return f"unix:{name}" if name else "unix"
    return str(address)


@implementer(IPushProducer, IHandshakeListener)
class NBDServerProtocol(Protocol):
    """
    One NBD connection.

    @ivar in_flight: requests handed to the backend and not yet answered.
    @ivar bytes_in_flight: payload and reply bytes those requests hold.
    @ivar info: what observers know of this connection.
    """

    log = Logger()

    def __init__(
        self,
        registry: ExportRegistry,
        max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH,
        max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
        *,
        config: ServerConfiguration | None = None,
        observers: Sequence[IServerObserver] = (),
        clock: Callable[[], float] = time.monotonic,
        poll_max: float = DEFAULT_POLL_MAX,
        tls: Any = None,
        tls_allow_dns: Sequence[str] = (),
    ) -> None:
        if max_queue_depth < 1 or max_bytes_in_flight < 1:
            raise ValueError("the queue depth and byte limits must be at least 1")
        self.max_queue_depth = max_queue_depth
        self.max_bytes_in_flight = max_bytes_in_flight
        self._conn = ServerConnection(registry, config)
        self._device: IBlockDevice | None = None
        # Per-connection layers of the export's device, closed with the connection.
        self._layers: tuple[IBlockDevice, ...] = ()
        self._observers = tuple(observers)
        # Those that also want to hear of flow control (IFlowObserver).
        self._flow_observers = tuple(o for o in self._observers if IFlowObserver.providedBy(o))
        self._clock = clock
        # A placeholder until connectionMade (id 0: numbers are for connections).
        self.info = ConnectionInfo(peer="?", started=0.0, id=0)
        self.in_flight = 0
        self.bytes_in_flight = 0
        # Writes (and trims, zeroes) not yet finished: FLUSH waits for them.
        self._writes: set[Deferred[None]] = set()
        self._transport_paused = False  # the transport asked us to pause
        self._reading_paused = False  # we paused the transport's reading
        self._disconnecting = False  # DISC or ABORT received: close when idle
        self._closed = False
        self._parsing = False
        self._lost: list[Deferred[None]] = []
        self._lost_reason = "closed"
        # Replies produced inside one run of the parse loop go out together
        # (one sendmsg); see _emit.
        self._writer: ReplyWriter | None = None
        self._receiver: PayloadReceiver | None = None
        self._payload_seen = 0  # the receiver's count when _busy last looked
        # Busy-polling for the next request (see _poll).
        self.poll_max = poll_max
        self._poll_window = 0.0
        self._poll_misses = 0
        self._poll_rest = 0
        self._idle_since = 0.0
        self._now: Callable[[], float] = time.perf_counter
        self._socket: socket.socket | None = None
        # How much to read at once, and which size that is: the larger
        # (True), the usual (False) or the small one (None; see _read_sizes).
        self._read_size = POLL_BUFFER
        self._large_reads: bool | None = False
        # Payload buffers for large WRITEs, kept for reuse, by size.
        self._spare: dict[int, list[bytearray]] = {}
        self._spare_bytes = 0
        self._structured = False
        # The device's IBufferRead.read_buffer, if it has one, and whether
        # replies waiting in _out may be views of its memory.
        self._read_buffer: Callable[[int, int], Any] | None = None
        self._out_views = False
        # Whether _late_requests is reading (it parses, which may close).
        self._late_reading = False
        # The device's IImmediateIO methods, if it has them (see _simple).
        #: See _make_simple_kit; None until needed, and whenever what it
        #: holds changes.
        self._simple_kit: _SimpleKit | None = None
        self._read_now: Callable[[int, int], Any] | None = None
        self._write_now: Callable[[int, Any], int] | None = None
        # The device's IBufferWrite.write_buffer, if it has one, and the view
        # of its memory that the WRITE being parsed was received into.
        self._write_buffer: Callable[[int, int], memoryview | None] | None = None
        self._received_in_place: memoryview | None = None
        # The device's IPipeWrite.write_from_pipe, if it has one, and a
        # payload received into a pipe whose WRITE has not reached it yet.
        self._pipe_write: Callable[[int, int, int, bool], Any] | None = None
        self._piped: PipedPayload | None = None
        # Whether _stream_writes is running (it must not be re-entered).
        self._streaming = False
        # Where in _out the tight loop put views of the device's memory, and
        # the range of the device each shows (see _simple and _flush_views).
        self._view_pieces: list[tuple[int, int, int]] = []
        self._out: list[Piece] = []
        self._out_bytes = 0
        # What transport.startTLS takes (see twisted_nbd.tls), and the
        # subject patterns a client certificate must match.
        self._tls = tls
        self._tls_allow_dns = tuple(tls_allow_dns)
        self._tls_started = False
        self._tls_done = False
        self._socket_tls: _tls_socket.SocketTLS | None = None
        # The factory's limits for this connection (see twisted_nbd.limits).
        self._guard: ConnectionGuard | None = None
        # Live restart (see twisted_nbd.restart): stop at the next request
        # boundary and call _frozen once nothing is in flight; _resumed is
        # set on a connection taken over from another process.
        self._freezing = False
        self._frozen: Callable[[], None] | None = None
        self._resumed = False
        # Per-request log lines without a factory (see _request_log).
        self._own_request_log: RateLimitedLog | None = None

    # ------------------------------------------------------------ IProtocol

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if ITCPTransport.providedBy(transport):
            # C-10: replies are small and latency matters more than packet count.
            transport.setTcpNoDelay(True)
        cast(IConsumer, transport).registerProducer(self, True)
        self._writer = ReplyWriter(transport)
        self._receiver = PayloadReceiver(transport)
        if self._writer.direct:
            self._socket = cast(Any, transport).socket
        if self._writer.direct:
            # Read (and buffer replies) in bigger pieces than Twisted's 64 KiB:
            # fewer system calls and dataReceived calls per request under load.
            cast(Any, transport).bufferSize = READ_SIZE
        self.info = ConnectionInfo(peer=self._peer(), started=self._clock())
        self._simple_kit = None
        logs.connection_opened(self.info)
        factory = self.factory
        if isinstance(factory, NBDServerFactory):
            # Counted before observers hear of it (workers report the counts).
            self._guard = factory.slots.guard(self._limit_expired, self._busy)
        for observer in self._observers:
            self._notify(observer.connection_made, self.info)
        self._flush_outbox()
        if isinstance(factory, NBDServerFactory):
            factory.connections.add(self)
        if self._resumed:
            # Taken over in transmission: attach the export as a GO would
            # have, then parse what the other process had received.
            export = self._conn.export
            assert export is not None
            self._export_chosen(ExportChosen(export))
            self._parse()
        if isinstance(factory, NBDServerFactory) and factory.shutting_down:
            self.shutdown()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        guard = self._guard
        if guard is not None:
            guard.active = True
        poll_max = self.poll_max
        if poll_max:
            # How long the client took to send more after we went idle: a
            # client that answers quickly is worth waiting for (see _poll),
            # unless polling kept finding nothing lately.
            gap = self._now() - self._idle_since
            if self._poll_rest:
                self._poll_rest -= 1
                self._poll_window = 0.0
            elif gap < poll_max:
                self._poll_window = min(poll_max, 2 * gap)
            else:
                self._poll_window = 0.0
        self._conn.receive_data(data)
        self._parse()
        if self._poll_window:
            self._poll()
        if poll_max:
            self._idle_since = self._now()

    def records_received(self, records: Sequence[bytes]) -> None:
        """
        Several TLS records' worth of plaintext at once (from
        L{twisted_nbd._tls_socket.SocketTLS}): parsed together, so the
        replies to the requests in them are written together.
        """
        if self._closed:
            return
        guard = self._guard
        if guard is not None:
            guard.active = True
        receive = self._conn.receive_data
        for data in records:
            receive(data)
        self._parse()

    def _poll(self) -> None:
        """
        Busy-poll the socket for the client's next request for a little
        while, instead of going back to the reactor to sleep.

        A client that sends one request at a time waits for each reply, so
        going to sleep in epoll_wait and being woken again costs each
        request a scheduler round trip; on virtual machines that is tens of
        microseconds. Like QEMU's adaptive polling, this waits actively, but
        only as long as this client has recently taken to answer (the
        window is set by dataReceived from the last gap, at most
        C{poll_max}, and halves each time it expires unused). Every
        L{POLL_REQUESTS} requests it lets the reactor run, unless the
        reactor has nothing else to do (L{_reactor_idle}).
        """
        sock = self._socket
        receiver = self._receiver
        if sock is None or (receiver is not None and receiver.active):
            return
        now = self._now
        window = self._poll_window
        deadline = now() + window
        conn = self._conn
        recv = sock.recv
        size = self._read_size
        # Lone READs are served with what _lone_kit gathers once, for as
        # long as nothing but lone READs happens.
        kit = self._lone_kit()
        rounds = POLL_REQUESTS
        while True:
            while True:
                try:
                    # Straight into a new bytes object, as Twisted's doRead
                    # does: the payloads in it are not copied again in Python
                    # (a try that finds nothing costs a malloc and a free).
                    data = recv(size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if now() >= deadline:
                        self._poll_window = window / 2 if window > POLL_MIN else 0.0
                        self._poll_misses += 1
                        if self._poll_misses >= POLL_MISSES:
                            # This client does not come back while we wait
                            # (one in this very process, say): rest a while.
                            self._poll_misses = 0
                            self._poll_rest = POLL_REST
                        return
                    continue
                except OSError:
                    return
                break
            if not data:
                return  # end of stream: the reactor will see it too
            self._poll_misses = 0
            served = self._lone_read(data, kit) if kit is not None else _NOT_TAKEN
            if served is not _SERVED:
                if served is _TAKEN:
                    # Served the general way: anything may have changed.
                    if self.in_flight or self._transport_paused or self._closed:
                        return
                else:
                    conn.receive_data(data)
                    if not self._lean_step():
                        self._parse()
                    if (
                        self._closed
                        or self._must_wait()
                        or (receiver is not None and receiver.active)
                    ):
                        return
                kit = self._lone_kit()
                size = self._read_size
            rounds -= 1
            if not rounds:
                if not self._reactor_idle():
                    return
                rounds = POLL_REQUESTS
            deadline = now() + window

    def _reactor_idle(self) -> bool:
        """
        Whether the reactor has nothing to do but wait for this connection's
        next request: no other descriptor ready (this socket being writable
        counts: the transport has bytes to send), no timed call due, no call
        from a thread waiting. Asks the epoll reactor's poller without
        waiting (level-triggered, so nothing is lost); any other reactor is
        never taken to be idle.
        """
        reactor = getattr(self.transport, "reactor", None)
        poller = getattr(reactor, "_poller", None)
        if not isinstance(poller, _EPOLL) or self._socket is None:
            return False
        assert reactor is not None
        if getattr(reactor, "threadCallQueue", None):
            return False
        delay = reactor.timeout()
        if delay is not None and delay <= 0:
            return False
        mine = self._socket.fileno()
        for fd, events in poller.poll(0):
            if fd != mine or events & ~_EPOLLIN:
                return False
        return True

    def _lone_kit(self) -> _LoneKit | None:
        """
        What L{_lone_read} serves with, when a lone READ may be served
        straight from what was received now; C{None} otherwise. It stays
        valid for as long as L{_lone_read} returns L{_SERVED}.
        """
        if (
            self.in_flight
            or self._out
            or self._parsing
            or self._transport_paused
            or self._closed
            # _tight_loop_allowed, inline.
            or self._device is None
            or self._observers
            or self._freezing
            or self._disconnecting
        ):
            return None
        conn = self._conn
        writer = self._writer
        if conn.has_data_to_send() or not conn.lone_reads_ready() or writer is None:
            return None
        sock = writer.direct_socket()
        if sock is None:
            return None
        kit = self._simple_kit
        if kit is None:
            kit = self._simple_kit = self._make_simple_kit()
        return (conn.lone_read_parser(), sock.sendmsg, writer, kit)

    def _lone_read(self, data: bytes, kit: _LoneKit | None = None) -> object:
        """
        What the poll loop just received, served at once if it is a lone
        plain READ (L{ServerConnection.lone_read_parser}) that the device
        answers at once: the queue depth 1 case, in fewer steps than even
        L{_lean_step} (the bytes are not buffered, the reply is sent
        straight to the socket as soon as it is made).

        @param kit: from L{_lone_kit}, still valid; by default gathered now.
        @return: L{_SERVED} (so served, and C{kit} is still valid),
            L{_TAKEN} (taken and served or started the general way: look
            again at everything), or L{_NOT_TAKEN} (it is the caller's to
            buffer and parse as usual).
        """
        if kit is None:
            kit = self._lone_kit()
            if kit is None:
                return _NOT_TAKEN
        parse, sendmsg, writer, simple = kit
        fields = parse(data)
        if fields is None:
            return _NOT_TAKEN
        flags, cookie, offset, length = fields
        _, _, read_head, read_at_once, _, info = simple
        value = read_at_once(flags, offset, length)
        if value is None or len(value) != length:
            # Taken, so served the general way, as _simple does.
            self._read(ReadRequest(cookie, offset, length, flags))
            self._parse()
            return _TAKEN
        info.requests += 1
        info.bytes_read += length
        # Sent before control leaves: the view of the device's memory cannot
        # change first (what the kernel does not take is copied).
        pieces = [read_head(cookie, offset, length), value]
        if type(value) is PipedRead:
            writer.write(pieces)
            return _TAKEN
        try:
            sent = sendmsg(pieces)
        except OSError:
            sent = 0
        if sent == len(pieces[0]) + length:
            return _SERVED
        writer.queue(pieces, sent)
        # Queueing may have paused the transport (pauseProducing).
        if self._transport_paused:
            self._update_reading()
        return _TAKEN

    def _lean_step(self) -> bool:
        """
        What the poll loop just received, served by L{_simple} alone when it
        is nothing but plain READs and WRITEs the device answers at once:
        the replies are sent, and L{_parse}'s rounds (an event, the checks
        around it, the reading state) are skipped. A client at queue depth
        1 sends exactly that, one request per round trip.

        @return: whether all of it was served; if not, L{_parse} goes on
            with what is left (having lost nothing).
        """
        if self._parsing or self._out or not self._tight_loop_allowed():
            return False
        self._parsing = True
        try:
            stopped = self._simple()
        finally:
            self._parsing = False
        if stopped or self.in_flight or self._conn.buffered() or self._conn.has_data_to_send():
            return False
        self._flush_out()
        if self._transport_paused:
            self._update_reading()
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._tls_started and not self._tls_done:
            # The client went away or sent something that is not TLS.
            value = reason.value
            self._tls_failed(describe_tls_error(value) if value is not None else "lost")
        # Late backend results are dropped from here on (see _send).
        self._closed = True
        self._simple_kit = None
        if self._writer is not None:
            self._writer.close()
        if self._receiver is not None:
            self._receiver.stop()
            if self._piped is not None:
                # Its WRITE will never run (the queue was full): close its pipe.
                self._receiver.return_pipe(self._piped.pipe)
                self._piped = None
        self._device = None
        layers, self._layers = self._layers, ()
        for layer in layers:
            maybeDeferred(layer.close).addErrback(
                lambda f: self.log.failure("Closing a per-connection layer failed", f)
            )
        factory = self.factory
        if isinstance(factory, NBDServerFactory):
            factory.connections.discard(self)
        if self._guard is not None:
            # Every slot goes back here, whatever closed the connection.
            self._guard.lost()
        for observer in self._observers:
            self._notify(observer.connection_lost, self.info, self._lost_reason)
        logs.connection_closed(self.info, self._lost_reason, self._clock() - self.info.started)
        waiting, self._lost = self._lost, []
        for d in waiting:
            d.callback(None)

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> Deferred[None]:
        """
        The server is shutting down (C-07, H-19): answer what is already
        buffered with ESHUTDOWN (or ERR_SHUTDOWN during option haggling),
        let the requests in flight finish, then close.

        @return: a Deferred that fires once the connection is closed.
        """
        d: Deferred[None] = Deferred()
        if self._closed:
            d.callback(None)
            return d
        self._lost.append(d)
        self._conn.shutdown()
        self._parse()
        if not self._closed:
            self._disconnecting = True
            self._maybe_close()
        return d

    # ------------------------------------------------------------ live restart

    def freeze(self, frozen: Callable[[], None]) -> bool:
        """
        Get ready to move to another process (see L{twisted_nbd.restart}):
        stop reading and taking requests at the next request boundary, let
        the requests in flight finish, then call C{frozen}. The replies may
        still sit in the transport's buffer then.

        @return: C{False}, and nothing changes, if this connection cannot
            move: it is not in transmission, uses TLS (OpenSSL's state does
            not leave the process), is closing, or is already freezing.
        """
        if (
            self._closed
            or self._disconnecting
            or self._freezing
            or self._tls_started
            or self._conn.phase is not Phase.TRANSMISSION
            or self.transport is None
        ):
            return False
        self._freezing = True
        self._frozen = frozen
        self._parse()
        return True

    def _check_frozen(self) -> None:
        receiver = self._receiver
        if (
            self.in_flight == 0
            and self._conn.at_request_boundary()
            and not (receiver is not None and receiver.active)
            and not self._closed
        ):
            frozen, self._frozen = self._frozen, None
            assert frozen is not None
            frozen()

    def thaw(self) -> None:
        """Serve this connection here after all (undoes L{freeze})."""
        self._freezing = False
        self._frozen = None
        self._parse()

    def handover_state(self) -> dict[str, object]:
        """
        The state another process resumes this frozen connection from
        (L{ServerConnection.handover_state}, plus the peer for its logs).
        """
        state = self._conn.handover_state()
        state["peer"] = self.info.peer
        return state

    def resume(self, state: dict[str, Any]) -> None:
        """
        Before C{makeConnection}: go on with a connection another process
        handed over in transmission (see L{ServerConnection.resume}).

        @raise ValueError: it cannot be served here as the client was told.
        """
        old = self._conn
        self._conn = ServerConnection.resume(old._exports, old.config, state)
        self._simple_kit = None
        self._resumed = True

    def detach(self) -> None:
        """
        Another process has this connection now: close this process's copy
        of the socket without shutting the connection down or sending
        anything.
        """
        if self._closed or self.transport is None:
            return
        self._lost_reason = "handed over"
        self._closed = True
        transport = cast(Any, self.transport)
        transport._shouldShutdown = False  # as the workers' supervisor does
        transport.unregisterProducer()
        transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once, whatever is in flight."""
        if not self._closed:
            self._lost_reason = "aborted"
            self._abort()

    # ------------------------------------------------------------ limits

    def _busy(self) -> bool:
        """Whether the connection has work under way (then it is not idle)."""
        if self.in_flight or self._transport_paused or self._disconnecting:
            return True
        # A WRITE payload received straight into its buffer bypasses
        # dataReceived: it is work under way only while bytes keep coming
        # (a client stalled halfway through one is as idle as any other).
        receiver = self._receiver
        if receiver is not None and receiver.active and receiver.received != self._payload_seen:
            self._payload_seen = receiver.received
            return True
        return False

    def _limit_expired(self, kind: str) -> None:
        """
        A deadline of L{twisted_nbd.limits} passed: a client still
        negotiating is dropped (H-18 allows a hard close against a denial of
        service); an idle one is closed gracefully, as after NBD_CMD_DISC.
        """
        if self._closed:
            return
        factory = self.factory
        if not isinstance(factory, NBDServerFactory):
            return
        limits = factory.slots.limits
        if kind == "handshake-timeout":
            factory.slots.drop(
                kind,
                "Dropping client {peer}: no export chosen within {timeout}s (--handshake-timeout)",
                peer=self.info.peer,
                timeout=limits.handshake_timeout,
            )
            self._lost_reason = "handshake timeout"
            self._abort()
        else:
            factory.slots.drop(
                kind,
                "Closing client {peer}: idle for {timeout}s (--idle-timeout)",
                peer=self.info.peer,
                timeout=limits.idle_timeout,
            )
            self._lost_reason = "idle timeout"
            self._disconnecting = True
            self._maybe_close()

    # ------------------------------------------------------------ IPushProducer

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: stop reading and starting work."""
        self._transport_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport drained: read and start work again if under the limits."""
        self._transport_paused = False
        self._parse()

    def stopProducing(self) -> None:
        """The transport is going away."""
        self._closed = True

    # ------------------------------------------------------------ the loop

    def _must_wait(self) -> bool:
        return (
            self._closed
            or (self._freezing and self._conn.at_request_boundary())
            or (self._disconnecting and not self._conn.shutting_down)
            or self._transport_paused
            or self.in_flight >= self.max_queue_depth
            or self.bytes_in_flight >= self.max_bytes_in_flight
        )

    def _parse(self) -> None:
        """Turn buffered bytes into events and act on them while allowed."""
        if self._parsing:
            # Re-entered from a synchronous backend or from transport.write;
            # the outer loop re-checks the limits before every event.
            return
        self._parsing = True
        conn = self._conn
        next_event = conn.next_event
        dispatch = self._DISPATCH
        # The tight loop for plain READs and WRITEs (see _simple); not while
        # observers must hear of every request or the connection is winding down.
        simple = self._tight_loop_allowed()
        try:
            while not (
                self._closed
                or self._transport_paused
                or self.in_flight >= self.max_queue_depth
                or self.bytes_in_flight >= self.max_bytes_in_flight
                or (self._disconnecting and not conn.shutting_down)
                or (self._freezing and conn.at_request_boundary())
            ):
                if simple:
                    if self._simple():
                        continue
                    if conn.drained():
                        # All served: what next_event would find out the long way.
                        if conn.has_data_to_send():
                            self._flush_outbox()
                        break
                try:
                    event = next_event()
                except ProtocolViolation as e:
                    self.log.warn("Dropping client {peer}: {reason}", peer=self.info.peer, reason=e)
                    self._lost_reason = f"protocol violation: {e}"
                    self._flush_outbox()
                    self._abort()
                    return
                if conn.has_data_to_send():
                    self._flush_outbox()
                if event is NEED_DATA:
                    wanted = conn.payload_wanted()
                    if wanted:
                        if wanted >= DIRECT_PAYLOAD_MIN:
                            self._receive_payload()
                        if self._large_reads is None and not self._piping():
                            # Small reads suit spliced payloads only.
                            self._read_sizes(False)
                    break
                dispatch[event.__class__](self, event)
        finally:
            self._parsing = False
        self._flush_out()
        self._update_reading()
        if self._frozen is not None:
            self._check_frozen()

    def _tight_loop_allowed(self) -> bool:
        """
        Whether plain READs and WRITEs may be served by L{_simple}: not
        while observers must hear of every request or the connection is
        winding down.
        """
        return (
            self._device is not None
            and not self._observers
            and not self._freezing
            and not self._disconnecting
        )

    def _receive_payload(self) -> None:
        """
        Receive the rest of a large WRITE payload into a pipe (see
        L{_receive_into_pipe}), or straight into the buffer the device will
        be given (see L{PayloadReceiver}), or into the device's own memory
        (see L{_in_place_view}), then go on.
        """
        receiver = self._receiver
        if receiver is None or not receiver.possible or receiver.active:
            return
        if (
            self._pipe_write is not None
            and receiver.pipes_possible
            and not self._observers
            and self._receive_into_pipe(receiver)
        ):
            return
        conn = self._conn
        in_place = self._in_place_view() if self._write_buffer is not None else None
        if in_place is not None:
            payload: bytearray | memoryview = in_place
            view = in_place
        else:
            payload = self._payload_buffer(conn.payload_length())
            view = memoryview(payload)
        got = conn.take_payload_into(view)

        def received() -> None:
            if in_place is not None:
                # _write knows it by this: nothing left to write.
                self._received_in_place = in_place
            else:
                view.release()
            self._payload_arrived(payload)

        receiver.start(view[got:], received)

    def _payload_arrived(self, payload: Any) -> None:
        """A payload received outside the parser is all there: go on."""
        self._conn.payload_received(payload)
        self._parse()
        self._read_on()

    def _receive_into_pipe(self, receiver: PayloadReceiver) -> bool:
        """
        Splice the rest of the waiting WRITE's payload from the socket into a
        pipe, for the device to move to its file (L{IPipeWrite}): the kernel
        then copies it once, where receiving it into a buffer and writing
        that copies it twice; for 1 MiB WRITEs to a file, a fifth of the
        server's CPU. Not with observers, who may look at a WRITE's data.

        @return: whether it is being done; if not, nothing has changed.
        """
        conn = self._conn
        length = conn.payload_length()
        if not PIPE_PAYLOAD_MIN <= length <= PIPE_SIZE:
            return False
        pipe = receiver.pipe()
        if pipe is None:
            return False
        wanted = conn.payload_wanted()
        # What came with the header goes into the pipe first. It is little
        # (see PIPE_READ_SIZE), and fits: the pipe is empty and holds a
        # whole payload.
        head = bytearray(length - wanted)
        conn.take_payload_into(memoryview(head))
        written = os.write(pipe[1], head) if head else 0

        def received() -> None:
            self._piped = PipedPayload(pipe, length)
            self._payload_arrived(self._piped)

        def full(remaining: int) -> None:
            # The pipe ran out of slots: go on with a payload buffer, holding
            # what the pipe holds (its bytes come first), then what is left of
            # the head, then the rest from the socket.
            payload = self._payload_buffer(length)
            view = memoryview(payload)
            position = 0
            in_pipe = written + wanted - remaining
            while position < in_pipe:
                position += os.readv(pipe[0], [view[position:in_pipe]])
            receiver.return_pipe(pipe)
            view[position : position + len(head) - written] = memoryview(head)[written:]
            position += len(head) - written

            def received_rest() -> None:
                view.release()
                self._payload_arrived(payload)

            # The socket is readable still: the reactor (level-triggered)
            # calls the receiver next.
            receiver.start(view[position:], received_rest)

        if written < len(head):
            # Not seen; but should the pipe take less, nothing is lost.
            full(wanted)
            return True
        receiver.start_pipe(pipe, wanted, received, full)
        if self._large_reads is not None:
            self._read_sizes(None)
        return True

    def _piping(self) -> bool:
        """Whether a payload is being spliced into a pipe."""
        receiver = self._receiver
        return receiver is not None and receiver.piping

    def _read_on(self) -> None:
        """
        After a payload received straight into its buffer: take what the
        client has sent since (the next request, under load) now, instead of
        after another turn of the reactor.
        """
        sock = self._socket
        receiver = self._receiver
        if self._socket_tls is not None and not self._closed and not self._reading_paused:
            # OpenSSL may hold the start of the next record already, where
            # epoll cannot see it.
            self._socket_tls.resume_reading()
            return
        if self._closed or self._reading_paused or (receiver is not None and receiver.active):
            return
        if self._pipe_write is not None or self._write_buffer is not None:
            if self._stream_writes():
                return
            if self._closed or self._reading_paused or (receiver is not None and receiver.active):
                return
        if sock is None:
            return
        try:
            data = sock.recv(self._read_size, socket.MSG_DONTWAIT)
        except OSError:
            return  # nothing yet (or an error, which the reactor will see)
        if data:
            self.dataReceived(data)

    def _stream_writes(self) -> bool:
        """
        Serve large plain WRITEs that have arrived whole straight from the
        socket, one after another: the header taken with one C{recv}, the
        payload spliced into a pipe at once (L{PayloadReceiver.splice_waiting}),
        the WRITE served by L{_write}; no turn of the reactor, no parser
        events and no receiver standing in for C{doRead} in between. A
        client streaming 1 MiB WRITEs to a file keeps several in the socket.

        It stops at anything else (passed to L{dataReceived} as usual), at a
        WRITE not all there yet (its header is passed on the same way, and
        its payload is received as before), at a WRITE that goes on outside
        (the pool), and after L{POLL_REQUESTS} of them unless the reactor
        has nothing else to do (L{_reactor_idle}).

        @return: whether the socket was found empty (nothing to read now).
        """
        receiver = self._receiver
        if (
            self._streaming
            or receiver is None
            or not (receiver.pipes_possible or self._write_buffer is not None)
            or receiver.active
            or self._socket_tls is not None
            or self._parsing
            or self._must_wait()
            or self._reading_paused
            or not self._tight_loop_allowed()
        ):
            return False
        conn = self._conn
        if conn.has_data_to_send() or not conn.lone_reads_ready():
            return False
        parse = conn.lone_write_parser()
        size = conn.header_size
        self._streaming = True
        try:
            return self._stream(receiver, parse, size)
        finally:
            self._streaming = False

    def _stream(
        self,
        receiver: PayloadReceiver,
        parse: Callable[[bytes], tuple[int, int, int, int] | None],
        size: int,
    ) -> bool:
        """The loop of L{_stream_writes}."""
        recv = receiver.take
        guard = self._guard
        rounds = POLL_REQUESTS
        piped = self._pipe_write is not None and receiver.pipes_possible
        lowest = PIPE_PAYLOAD_MIN if piped else DIRECT_PAYLOAD_MIN
        highest = PIPE_SIZE if piped else 1 << 32  # (the parser checks the limit)
        while True:
            if piped and not receiver.pipe_free():
                # All in use by WRITEs in flight: one of them ending reads on.
                return False
            waiting = receiver.waiting()
            if waiting < size:
                return not waiting
            try:
                data = recv(size)
            except OSError:
                return False  # the reactor will see what it is
            fields = parse(data)
            if fields is None or not lowest <= fields[3] <= highest or waiting < size + fields[3]:
                # Not one for here: parsed as if the transport had read it.
                self.dataReceived(data)
                return False
            flags, cookie, offset, length = fields
            payload: Any
            try:
                if piped:
                    payload = receiver.splice_waiting(length)
                else:
                    # Into the device's memory, as _in_place_view's rules allow.
                    payload = self._memory_view(offset, length, bool(flags & _FUA))
                    if payload is not None:
                        receiver.receive_waiting(payload)
                        self._received_in_place = payload
            except OSError as e:
                self.log.warn("Dropping client {peer}: {reason}", peer=self.info.peer, reason=e)
                self._lost_reason = f"receiving a payload failed: {e}"
                self._abort()
                return True
            if payload is None:
                self.dataReceived(data)
                return False
            if guard is not None:
                guard.active = True
            # A pipe's payload, as _receive_into_pipe gives the parser; or
            # the device's memory, as _receive_payload does.
            self._write(WriteRequest(cookie, offset, payload, bool(flags & _FUA)))
            if self._must_wait() or self._out:
                self._flush_out()
                self._update_reading()
                return False
            rounds -= 1
            if not rounds:
                if not self._reactor_idle():
                    return False
                rounds = POLL_REQUESTS

    def _in_place_view(self) -> memoryview | None:
        """
        The device's memory for the waiting WRITE's payload to be received
        into (L{IBufferWrite}), sparing the copy from a payload buffer: for
        a 1 MiB WRITE to a RAM disk, a third of the server's CPU; or
        C{None} to use a payload buffer.

        Only for a plain WRITE (FUA goes through the device's C{write}),
        with no observers (they see requests start before the data lands),
        and with nothing else of this connection in flight (an earlier
        request still running must not see the new bytes). Replies
        gathered so far are sent first (what the socket does not take is
        copied): some may be views of the bytes about to change.
        """
        return self._memory_view(*self._conn.payload_request())

    def _memory_view(self, offset: int, length: int, fua: bool) -> memoryview | None:
        """
        The device's memory for a WRITE's payload, under L{_in_place_view}'s
        rules (for it and for L{_stream_writes}), or C{None}.
        """
        if fua or self._observers or self.in_flight:
            return None
        assert self._write_buffer is not None
        try:
            view = self._write_buffer(offset, length)
        except Exception:
            self.log.failure("write_buffer failed; receiving into a buffer instead")
            return None
        if view is not None:
            self._flush_out()
        return view

    def _update_reading(self) -> None:
        """Pause or resume the transport's reading to match our state."""
        if self._closed or self.transport is None:
            return
        wait = self._must_wait()
        if wait and not self._reading_paused:
            self._reading_paused = True
            cast(IPushProducer, self.transport).pauseProducing()
            for observer in self._flow_observers:
                self._notify(observer.reading_paused, self.info)
        elif not wait and self._reading_paused:
            self._reading_paused = False
            cast(IPushProducer, self.transport).resumeProducing()
            for observer in self._flow_observers:
                self._notify(observer.reading_resumed, self.info)
            if self._socket_tls is not None:
                # OpenSSL may hold records the socket will not announce again.
                self._socket_tls.resume_reading()

    def _flush_outbox(self) -> None:
        out = self._conn.data_to_send()
        if out:
            self._emit(out)

    def _emit(self, pieces: Sequence[Piece], size: int = 0) -> None:
        """
        Write one message (of about C{size} bytes beyond its headers).
        Inside the parse loop messages are gathered and written together when
        it ends (or once they pass L{_CORK_LIMIT} bytes), so a burst of
        pipelined requests costs one system call.
        """
        if self._closed:
            return
        self._out.extend(pieces)
        if self._parsing:
            self._out_bytes += size + 64
            if self._out_bytes < _CORK_LIMIT:
                return
        self._flush_out()

    def _flush_out(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        self._out_bytes = 0
        self._out_views = False
        if self._view_pieces:
            self._view_pieces = []
        if self._writer is None:
            return
        if self._closed:
            # Not sent, so a spliced READ's pipe is not empty.
            self._writer.close()
            return
        self._writer.write(out)

    def _peer(self) -> str:
        try:
            return describe_address(self.transport.getPeer())  # type: ignore[union-attr]
        except Exception:
            return "?"

    def _notify(self, method: Callable[..., None], *args: Any) -> None:
        """Call an observer; one that raises is logged, and nothing else changes."""
        try:
            method(*args)
        except Exception:
            self.log.failure("An observer failed")

    # ------------------------------------------------------------ events

    def _export_chosen(self, event: ExportChosen) -> None:
        export = event.export
        attachment = export.attach(
            ConnectionContext(
                export_name=export.name,
                read_only=export.read_only,
                tls=self.info.tls,
                peer=self.info.peer,
            )
        )
        self._device = attachment.device
        self._simple_kit = None
        self._layers = attachment.layers
        self._structured = self._conn.structured_replies
        device = attachment.device
        self._read_buffer = device.read_buffer if IBufferRead.providedBy(device) else None
        if IBufferWrite.providedBy(device):
            self._write_buffer = device.write_buffer
        if IPipeWrite.providedBy(device):
            self._pipe_write = device.write_from_pipe
        if IImmediateIO.providedBy(device):
            self._read_now = device.read_now
            self._write_now = device.write_now
        self.info.export = export.name
        if self._guard is not None:
            self._guard.export_chosen()
        logs.export_chosen(self.info)
        for observer in self._observers:
            self._notify(observer.export_chosen, self.info, export.name)

    def _request_log(self) -> RateLimitedLog:
        """
        Where per-request lines go: the factory's rate-limited log, so a
        client sending a storm of refused or failing requests does not
        flood the log (each kind is logged once per 10 s, the rest counted).
        """
        factory = self.factory
        if isinstance(factory, NBDServerFactory):
            return factory.request_log
        if self._own_request_log is None:
            self._own_request_log = RateLimitedLog(logs.CONNECTIONS, time.monotonic, level="info")
        return self._own_request_log

    def _request_rejected(self, event: RequestRejected) -> None:
        self.info.errors += 1
        logs.request_refused(self.info, event, self._request_log())
        for observer in self._observers:
            self._notify(
                observer.request_refused,
                self.info,
                event.cookie,
                event.command,
                int(event.errno),
                event.reason,
            )

    def _option_rejected(self, event: OptionRejected) -> None:
        self.log.debug(
            "Refused option {option} from {peer}: {reason}",
            option=event.option,
            peer=self.info.peer,
            reason=event.reason,
        )
        for observer in self._observers:
            self._notify(
                observer.option_refused, self.info, event.option, int(event.reply), event.reason
            )

    def _start_tls(self, event: StartTLS) -> None:
        """
        STARTTLS was accepted and its ACK is queued: send it in plaintext,
        then switch the transport to TLS (S-06). The direct socket paths
        (sendmsg replies, recv_into payloads, splicing, polling) would bypass
        TLS, so they end here; with TLS on the socket, replies are encrypted
        from their pieces and large payloads decrypted into their buffers.
        """
        transport = self.transport
        assert transport is not None and self._tls is not None
        self._flush_outbox()
        self._flush_out()
        if self._writer is not None:
            self._writer.stop_direct()
        receiver = self._receiver
        self._socket = None
        self._tls_started = True
        self.info.tls = True
        context = getattr(self._tls, "context", None)
        if (
            context is not None
            and self._writer is not None
            and self._writer._idle()
            and _tls_socket.possible(transport)
        ):
            # The ACK is in the kernel already: OpenSSL can take the socket
            # over (see twisted_nbd._tls_socket: a third of the CPU per byte).
            self._socket_tls = _tls_socket.SocketTLS(
                transport,
                context,
                self.handshakeCompleted,
                self._tls_failed,
                lambda: not self._reading_paused,
            )
            self._writer.tls = self._socket_tls
            if receiver is not None and receiver.possible:
                # Large payloads are decrypted straight into their buffers.
                receiver.use_tls(self._socket_tls.recv_into)
            return
        if receiver is not None:
            # Twisted's TLS reads the socket itself: the receiver would bypass it.
            receiver.possible = False
        # Twisted sends what is already buffered before the handshake starts.
        cast(Any, transport).startTLS(self._tls)

    def _tls_failed(self, reason: str) -> None:
        """The TLS session on the socket failed (see L{_start_tls})."""
        if self._lost_reason == "closed":
            what = "TLS handshake" if not self._tls_done else "TLS session"
            self._lost_reason = f"{what} failed: {reason}"
            self.log.warn(
                "{what} with {peer} failed: {reason}",
                what=what,
                peer=self.info.peer,
                reason=reason,
            )

    def handshakeCompleted(self) -> None:  # noqa: N802 - IHandshakeListener's name
        """
        The TLS handshake is done: authorise the client's certificate and
        let the connection judge exports by it.
        """
        self._tls_done = True
        handle: Any = (
            self._socket_tls.connection if self._socket_tls is not None else self.transport
        )
        dn = peer_subject(handle)
        if not dn_allowed(dn, self._tls_allow_dns):
            self.log.warn(
                "Dropping client {peer}: certificate {dn} is not allowed (--tls-allow-dn)",
                peer=self.info.peer,
                dn=dn or "(none)",
            )
            self._lost_reason = f"TLS client certificate {dn or '(none)'} not allowed"
            self._abort()
            return
        self._conn.tls_established(dn)
        identity = None if dn else peer_psk_identity(handle)
        self.info.tls_peer = dn or (f"PSK {identity}" if identity else "")
        self.log.info(
            "Client {peer} switched to TLS ({version}){certificate}",
            peer=self.info.peer,
            version=session_description(handle),
            certificate=f", certificate {dn}"
            if dn
            else (f", PSK identity {identity}" if identity else ""),
        )

    def _disconnect(self, event: Aborted | DisconnectRequest) -> None:
        self._disconnecting = True
        self._maybe_close()

    # ------------------------------------------------------------ requests

    def _started(self, request: Request) -> float:
        """Tell the observers a request starts; when it did (0 with no observers)."""
        if not self._observers:
            return 0.0
        started = self._clock()
        for observer in self._observers:
            self._notify(observer.request_started, self.info, request)
        return started

    def _sync_value(self, result: Any) -> Any:
        """
        The value of a device call that is already there and succeeded (a
        plain value, or a Deferred that has fired with one), or L{_PENDING}.
        """
        if type(result) is Deferred:
            if result.called and not result.paused:
                value = result.result
                if not isinstance(value, (Failure, Deferred)):
                    return value
            return _PENDING
        if isinstance(result, (Failure, Deferred)):
            return _PENDING
        return result

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """
        Call a device method; what it returns (a Deferred, or a plain value
        from a device that answers at once), or a L{Failure} if it raised.
        """
        try:
            return method(*args)
        except Exception:
            return Failure()  # type: ignore[no-untyped-call]

    def _await(
        self,
        result: Any,
        request: Request,
        reply: Callable[[NBDServerProtocol, Any, Any], Sequence[Piece]],
        size: int,
        started: float,
    ) -> Deferred[Any] | None:
        """
        Send C{request}'s reply once C{result} is ready: at once if it is a
        plain value or an already-fired Deferred (most requests to a memory
        or a cached file device), else when the Deferred fires. Skipping the
        Deferred machinery for results that are already there saves several
        microseconds per request.

        @return: the Deferred still to fire, or C{None} if the reply is sent.
        """
        self.in_flight += 1
        self.bytes_in_flight += size
        if isinstance(result, Deferred):
            if result.called and not result.paused:
                value = result.result
                if isinstance(value, Failure):
                    # The failure is dealt with here, not left unhandled in the Deferred.
                    result.addErrback(_swallow)
                elif isinstance(value, Deferred):
                    result.addBoth(self._finish, request, reply, size, started)
                    return result
                self._finish(value, request, reply, size, started)
                return None
            # One callback for success and failure alike: every link in a
            # Deferred's chain costs a few microseconds.
            result.addBoth(self._finish, request, reply, size, started)
            return result
        self._finish(result, request, reply, size, started)
        return None

    def _simple(self) -> bool:
        """
        Serve the plain READs and WRITEs at the front of what is buffered in
        one tight loop, as long as the device answers them at once (from
        memory, or the page cache: L{IBufferRead}, L{IImmediateIO}) and the
        connection's limits allow; the usual case under load, where the
        general path (an event object, a Deferred and several calls per
        request) costs several times as much as the work itself. A request
        the device cannot answer at once goes the general way from here;
        anything that is not a plain READ or WRITE is left to L{_parse}.

        @return: whether it stopped for the connection's limits or state
            (else the front is not a plain request: L{_parse} goes on with it).
        """
        kit = self._simple_kit
        if kit is None:
            kit = self._simple_kit = self._make_simple_kit()
        take, encode_ok, read_head, read_at_once, write_now, info = kit
        out = self._out
        while not (
            self._closed
            or self._transport_paused
            or self.in_flight >= self.max_queue_depth
            or self.bytes_in_flight >= self.max_bytes_in_flight
        ):
            simple = take()
            if simple is None:
                return False
            command, flags, cookie, offset, length, payload = simple
            if payload is None:
                data = read_at_once(flags, offset, length)
                if data is None or len(data) != length:
                    self._read(ReadRequest(cookie, offset, length, flags))
                    out = self._out
                    continue
                info.requests += 1
                info.bytes_read += length
                out.append(read_head(cookie, offset, length))
                if type(data) is memoryview:
                    # A view of the device's memory: copied if a WRITE to
                    # these bytes comes before it is sent (see _flush_views).
                    self._view_pieces.append((len(out), offset, offset + length))
                out.append(data)
                if type(data) is PipedRead:
                    # Sent now: the pipe holds the device's pages, which a
                    # later WRITE would change, and is needed for the next.
                    self._flush_out()
                    out = self._out
                    continue
            else:
                if self._view_pieces or self._out_views:
                    self._flush_views(offset, length)
                    out = self._out
                large = MID_WRITE_MIN <= length < DIRECT_PAYLOAD_MIN
                if large is not self._large_reads:
                    self._read_sizes(large)
                done = 0
                if write_now is not None and not flags & _FUA:
                    done = write_now(offset, payload)
                if done != length:
                    self._write(WriteRequest(cookie, offset, payload, bool(flags & _FUA)), done)
                    out = self._out
                    continue
                info.requests += 1
                info.bytes_written += length
                out.append(encode_ok(cookie, offset))
            self._out_bytes += length + 64
            if self._out_bytes >= _CORK_LIMIT:
                self._flush_out()
                out = self._out
        return True

    def _make_simple_kit(self) -> _SimpleKit:
        """
        What L{_simple} works with, gathered once per export: the same for
        every request, and loading it costs as much as serving a READ.
        """
        device = self._device
        assert device is not None
        conn = self._conn
        # READs that the general path answers sparsely (see _sparse_read).
        sparse_min = (
            SPARSE_READ_MIN if self._structured and device.capabilities.can_extents else 1 << 64
        )
        read_buffer = self._read_buffer
        read_now = self._read_now
        writer = self._writer
        # Large READs spliced from the page cache to the socket.
        pipe_read = (
            device.read_to_pipe
            if IPipeRead.providedBy(device) and writer is not None and writer.splice
            else None
        )

        def read_at_once(flags: int, offset: int, length: int) -> Any:
            """
            A plain READ's data if the device has it at once (spliced, a
            view of its memory, bytes); else C{None}, and it goes the
            general way (which may answer it sparsely, or report its error).
            """
            try:
                if pipe_read is not None and length >= PIPE_READ_MIN:
                    # Declined where there are holes, so never a READ the
                    # general path would rather answer sparsely.
                    data = writer.piped_read(pipe_read, offset, length)  # type: ignore[union-attr]
                    if data is not None:
                        return data
                if read_buffer is not None:
                    if length < sparse_min or flags & _DF:
                        return read_buffer(offset, length)
                elif read_now is not None:
                    # The device knows best whether a large READ would be
                    # worth answering sparsely.
                    return read_now(offset, length)
            except Exception:
                pass
            return None

        return (
            conn.take_simple,
            conn.encode_ok,
            conn.encode_read_head,
            read_at_once,
            self._write_now,
            self.info,
        )

    def _read_sizes(self, large: bool | None) -> None:
        """
        Read in larger pieces (C{large}) while the client sends mid-sized
        WRITEs, from L{MID_WRITE_MIN} to L{DIRECT_PAYLOAD_MIN} bytes: a
        64 KiB WRITE then seldom straddles two pieces (which takes the
        general path and a copy to join it); smaller and larger ones read
        best in smaller pieces (buffers over glibc's mmap threshold cost
        system calls, and large payloads are received into their buffers).
        """
        self._large_reads = large
        if self._socket is not None:
            if large is None:
                self._read_size = PIPE_READ_SIZE
                cast(Any, self.transport).bufferSize = PIPE_READ_SIZE
            else:
                self._read_size = LARGE_READ_SIZE if large else POLL_BUFFER
                cast(Any, self.transport).bufferSize = LARGE_READ_SIZE if large else READ_SIZE

    def _read(self, request: ReadRequest) -> None:
        device = self._device
        assert device is not None
        started = self._started(request)
        length = request.length
        # Two additions per request keep the connection's log line honest
        # (see twisted_nbd.logs); cheaper than any observer.
        info = self.info
        info.requests += 1
        info.bytes_read += length
        if (
            self._structured
            and length >= SPARSE_READ_MIN
            and not request.flags & _DF
            and device.capabilities.can_extents
        ):
            if self._read_buffer is not None:
                # Its data segments may be views of the device's memory.
                self._out_views = True
            sparse = self._sparse_read(device, request)
            self._await(sparse, request, NBDServerProtocol._reply_pieces, length, started)
            return
        read_buffer = self._read_buffer
        if read_buffer is not None and not self._observers:
            # Straight from the device's memory (IBufferRead): the reply is
            # written before anything can change it (see _flush_views).
            try:
                data = read_buffer(request.offset, length)
            except Exception:
                data = None
            if data is not None and len(data) == length:
                self._out_views = True
                self._emit(self._conn.reply_read(request, data), length)
                return
        result: Any
        try:
            result = device.read(request.offset, length)
        except Exception:
            result = Failure()  # type: ignore[no-untyped-call]
        if not self._observers:
            # The common case, in few steps: the data is already there.
            data = self._sync_value(result)
            if data is not _PENDING and len(data) == length:
                self._emit(self._conn.reply_read(request, data), length)
                return
        self._await(result, request, NBDServerProtocol._reply_read, length, started)

    def _flush_views(self, offset: int, length: int) -> None:
        """
        Before a request changes the C{length} bytes at C{offset}, make sure
        the replies still gathered that may be views of the device's memory
        carry the data as it was when they were read: copy those of the
        tight loop that show any of those bytes (see L{_simple}; in a random
        mix of READs and WRITEs, hardly any), and write the others, whose
        ranges are not known.
        """
        pieces = self._view_pieces
        if pieces:
            out = self._out
            end = offset + length
            kept = []
            for piece in pieces:
                index, start, stop = piece
                if start < end and offset < stop:
                    out[index] = bytes(out[index])
                else:
                    kept.append(piece)
            self._view_pieces = kept
        if self._out_views:
            self._flush_out()

    def _write(self, request: WriteRequest, done: int = 0) -> None:
        """
        Serve a WRITE; the first C{done} bytes of its payload are already
        written (see L{IImmediateIO.write_now}).
        """
        self._flush_views(request.offset, request.length)
        data = request.data
        # In a pipe, not in memory (see _receive_into_pipe).
        piped = type(cast(Any, data)) is PipedPayload
        if not piped:
            large = MID_WRITE_MIN <= request.length < DIRECT_PAYLOAD_MIN
            if large is not self._large_reads:
                self._read_sizes(large)
        device = self._device
        assert device is not None
        started = self._started(request)
        info = self.info
        info.requests += 1
        info.bytes_written += request.length
        result: Any
        if data is self._received_in_place:
            # Already in the device's memory (see _in_place_view).
            self._received_in_place = None
            data.release()
            self._emit(self._conn.reply_ok(request))
            return
        try:
            if piped:
                self._piped = None
                assert self._pipe_write is not None
                source = cast(PipedPayload, data).source
                result = self._pipe_write(source, request.offset, request.length, request.fua)
            # The payload may be a bytearray (received straight into it);
            # every device accepts bytes-like data (the conformance tests say so).
            elif done:
                rest = memoryview(data)[done:]
                result = device.write(request.offset + done, cast(bytes, rest), request.fua)
            else:
                result = device.write(request.offset, cast(bytes, request.data), request.fua)
        except Exception:
            result = Failure()  # type: ignore[no-untyped-call]
        if not self._observers and self._sync_value(result) is not _PENDING:
            # Succeeded: a pipe is empty now.
            self._payload_done(None, data, True)
            self._emit(self._conn.reply_ok(request))
            return
        pending = self._await(result, request, NBDServerProtocol._reply_ok, request.length, started)
        # The payload's buffer or pipe is ours again once the device is done with it.
        if pending is None:
            self._payload_done(None, data)
        elif piped:
            pending.addBoth(self._piped_done, cast(PipedPayload, data))
        else:
            pending.addBoth(self._payload_done, data)
        self._track_write(pending)

    def _payload_done(self, result: object, payload: object, emptied: bool = False) -> object:
        """
        The device is done with a WRITE's payload: keep a payload buffer for
        reuse (see L{_payload_buffer}); give a pipe back for reuse if it is
        empty (C{emptied}, or checked: a failed move may have left bytes in
        it), else close it.
        """
        if type(payload) is bytearray:
            self._spare_buffer(payload)
        elif type(payload) is PipedPayload:
            receiver = self._receiver
            assert receiver is not None
            receiver.return_pipe(payload.pipe, emptied)
        return result

    def _piped_done(self, result: object, payload: PipedPayload) -> object:
        """
        The device is done with a payload from a pipe, after the WRITE's
        reply: the pipe is free, so large WRITEs waiting whole in the socket
        may be taken again (see L{_stream_writes}).
        """
        self._payload_done(None, payload)
        if not self._streaming:
            self._read_on()
        return result

    def _spare_buffer(self, buffer: bytearray) -> None:
        """Keep a payload buffer (see L{_payload_buffer}) for the next large WRITE."""
        size = len(buffer)
        if size >= DIRECT_PAYLOAD_MIN and self._spare_bytes + size <= SPARE_BUFFERS_MAX:
            self._spare.setdefault(size, []).append(buffer)
            self._spare_bytes += size

    def _payload_buffer(self, size: int) -> bytearray:
        """
        A buffer for a large WRITE payload: a spare one of that size if
        there is one. Reusing them spares allocating, zeroing and
        faulting in a megabyte per request; devices may not keep a WRITE's
        data once they have answered (L{IBlockDevice.write}).
        """
        spares = self._spare.get(size)
        if spares:
            self._spare_bytes -= size
            return spares.pop()
        return bytearray(size)

    def _flush(self, request: FlushRequest) -> None:
        device = self._device
        assert device is not None
        started = self._started(request)
        self.info.requests += 1
        # C-02: every write acknowledged before this FLUSH has finished in the
        # backend; waiting for the ones still running too makes FLUSH cover
        # everything received before it, which is stronger and simple to reason about.
        result: Any
        if self._writes:
            result = DeferredList(list(self._writes), consumeErrors=True).addCallback(
                lambda _: device.flush()
            )
        else:
            result = self._call(device.flush)
        self._await(result, request, NBDServerProtocol._reply_ok, 0, started)

    def _trim(self, request: TrimRequest) -> None:
        self._flush_views(request.offset, request.length)
        device = self._device
        assert device is not None
        started = self._started(request)
        self.info.requests += 1
        result = self._call(device.trim, request.offset, request.length, request.fua)
        self._track_write(self._await(result, request, NBDServerProtocol._reply_ok, 0, started))

    def _write_zeroes(self, request: WriteZeroesRequest) -> None:
        self._flush_views(request.offset, request.length)
        device = self._device
        assert device is not None
        started = self._started(request)
        self.info.requests += 1
        result = self._call(
            device.write_zeroes,
            request.offset,
            request.length,
            request.fua,
            request.may_trim,
            request.fast,
        )
        self._track_write(self._await(result, request, NBDServerProtocol._reply_ok, 0, started))

    def _cache(self, request: CacheRequest) -> None:
        device = self._device
        assert device is not None
        started = self._started(request)
        self.info.requests += 1
        result = self._call(device.cache, request.offset, request.length)
        self._await(result, request, NBDServerProtocol._reply_ok, 0, started)

    def _block_status(self, request: BlockStatusRequest) -> None:
        device = self._device
        assert device is not None
        started = self._started(request)
        self.info.requests += 1
        result = self._call(device.block_status, request.offset, request.length)
        self._await(result, request, NBDServerProtocol._reply_block_status, 0, started)

    #: The handler of every event: the requests, and the rest.
    _DISPATCH: ClassVar[dict[type, Callable[[NBDServerProtocol, Any], None]]] = {
        ReadRequest: _read,
        WriteRequest: _write,
        FlushRequest: _flush,
        TrimRequest: _trim,
        WriteZeroesRequest: _write_zeroes,
        CacheRequest: _cache,
        BlockStatusRequest: _block_status,
        ExportChosen: _export_chosen,
        RequestRejected: _request_rejected,
        OptionRejected: _option_rejected,
        Aborted: _disconnect,
        DisconnectRequest: _disconnect,
        StartTLS: _start_tls,
    }

    # How each kind of result becomes a reply.

    def _reply_ok(self, request: Any, result: object) -> Sequence[Piece]:
        return self._conn.reply_ok(request)

    def _reply_read(self, request: ReadRequest, data: Any) -> Sequence[Piece]:
        if len(data) != request.length:
            raise RuntimeError(f"backend returned {len(data)} bytes for a read of {request.length}")
        return self._conn.reply_read(request, data)

    def _reply_pieces(self, request: ReadRequest, pieces: Sequence[Piece]) -> Sequence[Piece]:
        return pieces

    def _reply_block_status(
        self, request: BlockStatusRequest, extents: Sequence[Extent]
    ) -> Sequence[Piece]:
        return self._conn.reply_block_status(request, extents)

    def _finish(
        self,
        result: object,
        request: Request,
        reply: Callable[[NBDServerProtocol, Any, Any], Sequence[Piece]],
        size: int,
        started: float,
    ) -> None:
        """A request finished in the backend: build its reply and send it."""
        try:
            errno = 0
            pieces: Sequence[Piece]
            if isinstance(result, Failure):
                errno, pieces = self._failed(result, request)
            else:
                try:
                    pieces = reply(self, request, result)
                except Exception:
                    # A reply that cannot be built (a backend breaking its
                    # contract) is an error reply too, so the client hears of it.
                    errno, pieces = self._failed(Failure(), request)  # type: ignore[no-untyped-call]
            self._send(pieces, size)
            if self._observers:
                elapsed = self._clock() - started
                for observer in self._observers:
                    self._notify(observer.request_finished, self.info, request, errno, elapsed)
        except Exception:
            self._bug(Failure())  # type: ignore[no-untyped-call]

    def _sparse_read(self, device: IBlockDevice, request: ReadRequest) -> Deferred[list[bytes]]:
        """
        Read only what is data and describe zero runs as holes (OFFSET_HOLE
        chunks), as qemu-nbd does. A device that provides L{ISparseRead}
        does it in one call; for others, one block_status call, then one
        read per data run, all in flight together.
        """
        offset, length = request.offset, request.length
        segments: Deferred[Sequence[Segment]]
        if ISparseRead.providedBy(device):
            segments = maybeDeferred(device.read_sparse, offset, length)
        else:

            def plan(extents: Sequence[Extent]) -> Deferred[Sequence[Segment]]:
                planned = plan_sparse_read(offset, length, extents)
                reads = [
                    maybeDeferred(device.read, at, run) for at, run, hole in planned if not hole
                ]
                gathered = gatherResults(reads, consumeErrors=True)
                gathered.addErrback(_first_error)

                def assemble(datas: list[bytes]) -> Sequence[Segment]:
                    it = iter(datas)
                    return [(at, run) if hole else (at, next(it)) for at, run, hole in planned]

                return gathered.addCallback(assemble)

            segments = maybeDeferred(device.block_status, offset, length).addCallback(plan)

        def reply(parts: Sequence[Segment]) -> list[bytes]:
            _check_segments(request, parts)
            return self._conn.reply_read_sparse(request, parts)

        return segments.addCallback(reply)

    def _track_write(self, pending: Deferred[Any] | None) -> None:
        """
        Remember a writing request still running in the backend until it
        finishes, for FLUSH (one that already finished needs nothing).
        """
        if pending is None:
            return
        settled: Deferred[None] = Deferred()
        self._writes.add(settled)

        def finished(result: object) -> object:
            self._writes.discard(settled)
            settled.callback(None)
            return result

        pending.addBoth(finished)

    def _failed(self, failure: Failure, request: Request) -> tuple[int, list[bytes]]:
        """
        Turn a backend failure into an error reply (NBDError's errno, else
        EIO).

        @return: the errno and the reply's bytes.
        """
        error = failure.value
        self.info.errors += 1
        if isinstance(error, NBDError):
            errno, message = error.errno, error.message
            logs.request_failed(
                self.info, request, errno, message or "(no reason given)", limit=self._request_log()
            )
        else:
            errno, message = Errno.EIO, "internal error"
            logs.request_failed(self.info, request, errno, f"backend bug: {error!r}", failure)
        return int(errno), self._conn.reply_error(request, errno, message)

    def _send(self, reply: Sequence[Piece], size: int) -> None:
        """Write one finished request's reply and admit more work."""
        self.in_flight -= 1
        self.bytes_in_flight -= size
        if self._closed or self.transport is None:
            return  # nothing is written after connectionLost
        # C-01: each message is written whole, never interleaved with another.
        self._emit(reply, size)
        if self._disconnecting:
            self._maybe_close()
        else:
            self._parse()

    def _bug(self, failure: Failure) -> None:
        self.log.failure("Unexpected error while replying", failure)
        if not self._closed:
            self._lost_reason = "internal error"
            self._abort()

    def _abort(self) -> None:
        """Hard close: drop the connection without waiting for the send buffer."""
        self._closed = True
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def _maybe_close(self) -> None:
        """After DISC or ABORT: close once every reply has been written (C-06)."""
        self._update_reading()
        if self.in_flight == 0 and not self._closed and self.transport is not None:
            if self._conn.shutting_down and self._late_requests():
                return
            self._flush_outbox()
            self._flush_out()
            # A transport with a registered producer never finishes closing: once its
            # buffer drains it resumes the producer instead (see Twisted's
            # FileDescriptor.doWrite), so stop being one first.
            cast(IConsumer, self.transport).unregisterProducer()
            self.transport.loseConnection()

    def _late_requests(self) -> bool:
        """
        The server is shutting down and the last request in flight has
        finished: take what the client sent meanwhile that still waits in
        the socket (reading was paused at the queue limits, say), so those
        requests too are answered, with ESHUTDOWN (C-07), not cut off by
        the close. What arrives after this is cut off (the spec's hard
        close).

        @return: whether closing must wait: a request went in flight after
            all (its end comes back here). A payload still on its way is
            cut off with the rest.
        """
        sock = self._socket
        receiver = self._receiver
        if (
            sock is None
            or self._late_reading
            or self._parsing
            # The socket's next bytes are a payload's, not requests.
            or (receiver is not None and receiver.active)
        ):
            return False
        self._late_reading = True
        try:
            # Bounded: at most 64 reads; a client that keeps sending is cut off.
            for _ in range(64):
                try:
                    data = sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
                except OSError:
                    break
                if not data:
                    break
                self._conn.receive_data(data)
                self._parse()
                if self._closed or getattr(self.transport, "disconnecting", False):
                    return True  # a DISC among them closed it already
                if self.in_flight:
                    return True
                if receiver is not None and receiver.active:
                    break
        finally:
            self._late_reading = False
        return False


class NBDServerFactory(Factory):
    """
    Makes an L{NBDServerProtocol} for each client of the exports in
    C{registry}.

    @param observers: told of every connection and request (see
        L{twisted_nbd.observers}).
    @param reactor: the clock that times requests for the observers
        (C{time.monotonic} if C{None}).
    @param config: how connections behave (L{ServerConfiguration}).
    @param poll_max: the longest a connection busy-polls for its client's
        next request (see L{NBDServerProtocol._poll}), in seconds; 0 never.
    @param tls: what C{transport.startTLS} takes when a client sends
        STARTTLS (L{twisted_nbd.tls.TLSSettings.server_creator}); C{None}
        when C{config.tls} is C{"off"}.
    @param tls_allow_dns: patterns a client certificate's subject must
        match (see L{twisted_nbd.tls.TLSSettings.allow_dns}).
    @param limits: who may connect, how many at once, and the handshake
        and idle timeouts (L{Limits}; the defaults if C{None}). The
        timeouts need C{reactor}: without one there are none.
    @ivar connections: the open connections.
    @ivar slots: the L{ConnectionSlots} that counts them.
    @ivar request_log: the rate-limited log of refused and failed requests.
    """

    protocol = NBDServerProtocol

    def __init__(
        self,
        registry: ExportRegistry,
        *,
        max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH,
        max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
        observers: Iterable[IServerObserver] = (),
        reactor: IReactorTime | None = None,
        config: ServerConfiguration | None = None,
        poll_max: float = DEFAULT_POLL_MAX,
        tls: Any = None,
        tls_allow_dns: Sequence[str] = (),
        limits: Limits | None = None,
    ) -> None:
        self.registry = registry
        self.tls = tls
        self.tls_allow_dns = tuple(tls_allow_dns)
        self.poll_max = poll_max
        self.max_queue_depth = max_queue_depth
        self.max_bytes_in_flight = max_bytes_in_flight
        self.observers: list[IServerObserver] = list(observers)
        self.config = config if config is not None else ServerConfiguration()
        self._clock: Callable[[], float] = (
            reactor.seconds if reactor is not None else time.monotonic
        )
        self.connections: set[NBDServerProtocol] = set()
        self.shutting_down = False
        self.slots = ConnectionSlots(limits, reactor)
        #: Per-request log lines (refused and failed requests), rate-limited
        #: by kind; its C{counts} say how many there were.
        self.request_log = RateLimitedLog(
            logs.CONNECTIONS, self._clock, reactor=reactor, level="info"
        )

    @property
    def limits(self) -> Limits:
        """The L{Limits} this factory applies."""
        return self.slots.limits

    @property
    def connection_count(self) -> int:
        """How many connections are open."""
        return self.slots.connections

    @property
    def negotiating_count(self) -> int:
        """How many open connections have not chosen an export yet."""
        return self.slots.negotiating

    def add_observer(self, observer: IServerObserver) -> None:
        """Tell C{observer} of connections made from now on, and their requests."""
        self.observers.append(observer)

    def shutdown(
        self, timeout: float | None = None, clock: IReactorTime | None = None
    ) -> Deferred[None]:
        """
        Shut every connection down gracefully (see
        L{NBDServerProtocol.shutdown}); connections made later are shut down
        as soon as they are made.

        @param timeout: after this many seconds, drop the connections still
            open, whatever they have in flight; C{None} waits for ever.
        @param clock: what measures C{timeout}.
        @return: a Deferred that fires with C{None} once every connection
            is closed.
        """
        self.shutting_down = True
        closed = DeferredList([proto.shutdown() for proto in list(self.connections)])
        if timeout is None or clock is None:
            return closed.addCallback(lambda _: None)

        def expire() -> None:
            for proto in list(self.connections):
                proto.log.warn(
                    "Dropping client {peer}: still busy {timeout}s after shutdown began",
                    peer=proto.info.peer,
                    timeout=timeout,
                )
                proto.abort()

        deadline = clock.callLater(timeout, expire)

        def done(_: object) -> None:
            if deadline.active():
                deadline.cancel()

        return closed.addCallback(done)

    def buildProtocol(self, addr: object) -> NBDServerProtocol | None:
        # Refused before the greeting: no protocol, so Twisted closes the
        # socket at once and nothing is allocated for it.
        if not self.slots.admit(addr, describe_address(addr)):
            return None
        return self.make_protocol()

    def make_protocol(self) -> NBDServerProtocol:
        """
        A protocol for one connection, without admission control (a
        connection taken over from another process was admitted there).
        """
        proto = NBDServerProtocol(
            self.registry,
            max_queue_depth=self.max_queue_depth,
            max_bytes_in_flight=self.max_bytes_in_flight,
            config=self.config,
            observers=self.observers,
            clock=self._clock,
            poll_max=self.poll_max,
            tls=self.tls,
            tls_allow_dns=self.tls_allow_dns,
        )
        proto.factory = self
        return proto
