"""
Tests for L{twisted_nbd._transport.ReplyWriter}: replies go straight to the
socket when the transport has nothing queued, and to the transport
otherwise, always in order and whole.
"""

from __future__ import annotations

import fcntl
import os
import socket
import termios
from array import array
from typing import Any, cast
from unittest import SkipTest

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import builders as b
from twisted_nbd import _wire as w
from twisted_nbd._buffer import NEED_DATA
from twisted_nbd._transport import PayloadReceiver, ReplyWriter
from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.client import connect
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import (
    _NOT_TAKEN,
    _TAKEN,
    LARGE_READ_SIZE,
    PIPE_READ_SIZE,
    POLL_BUFFER,
    POLL_REQUESTS,
    READ_SIZE,
    NBDServerFactory,
    NBDServerProtocol,
)
from twisted_nbd.testing import ControllableBlockDevice

MiB = 1 << 20
KiB = 1 << 10


class FakeTCPTransport:
    """
    Just the attributes of Twisted's TCP transport that the writer looks at,
    over a real socket; writeSequence records what would have been queued.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.connected = True
        self.disconnecting = False
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self._writeDisconnected = False
        self.queued: list[bytes] = []

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802 - Twisted's name
        for piece in data:
            assert type(piece) is bytes, piece
        self.queued.extend(data)
        self._tempDataLen += sum(len(p) for p in data)


def socket_pair(case: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    """
    A connected socket pair, closed after the test: ours (non-blocking,
    the server's end) and theirs (the client's).
    """
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    case.addCleanup(ours.close)
    case.addCleanup(theirs.close)
    return ours, theirs


def waiting(fd: int) -> int:
    """How many bytes the pipe or socket C{fd} holds for reading."""
    count = array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def count_calls(obj: object, name: str) -> list[int]:
    """
    Count the calls of C{obj}'s method C{name} from now on (it still does
    what it did): the count is the returned list's one item.
    """
    calls = [0]
    real = getattr(obj, name)

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    setattr(obj, name, counted)
    return calls


def drain(sock: socket.socket) -> bytes:
    """Everything readable from C{sock} right now."""
    out = b""
    sock.setblocking(False)
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


class ReplyWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ours, self.theirs = socket_pair(self)
        self.transport = FakeTCPTransport(self.ours)
        self.writer = ReplyWriter(self.transport)

    def test_direct(self) -> None:
        """With nothing queued, the pieces go out at once, in one message, unjoined."""
        self.assertTrue(self.writer.direct)
        payload = bytearray(b"x" * 4096)
        self.writer.write([b"head", memoryview(payload), b"tail"])
        self.assertEqual(self.transport.queued, [])
        self.assertEqual(drain(self.theirs), b"head" + b"x" * 4096 + b"tail")

    def test_queued_first(self) -> None:
        """When the transport holds data, replies queue behind it, as bytes."""
        self.transport._tempDataLen = 1
        self.writer.write([b"a", memoryview(b"b")])
        self.assertEqual(self.transport.queued, [b"a", b"b"])
        self.assertEqual(drain(self.theirs), b"")
        self.transport._tempDataLen = 0
        self.transport.dataBuffer, self.transport.offset = b"pending", 2
        self.writer.write([b"c"])
        self.assertEqual(self.transport.queued, [b"a", b"b", b"c"])

    def test_partial_send(self) -> None:
        """
        What the kernel does not take is queued (copied, so the caller may
        reuse its buffers), and everything arrives in order.
        """
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytearray(range(256)) * 4096  # 1 MiB, more than the socket takes
        self.writer.write([b"H" * 16, memoryview(big), b"T" * 8])
        self.assertTrue(self.transport.queued)
        sent = drain(self.theirs)
        # The caller scribbles over its buffer; what was queued is a copy.
        big[:] = bytes(len(big))
        self.assertEqual(
            sent + b"".join(self.transport.queued), b"H" * 16 + bytes(range(256)) * 4096 + b"T" * 8
        )

    def test_many_pieces(self) -> None:
        """More pieces than one sendmsg takes still go out whole and in order."""
        pieces: list[Any] = [bytes([i % 256]) * 3 for i in range(1500)]
        self.writer.write(pieces)
        received = drain(self.theirs) + b"".join(self.transport.queued)
        self.assertEqual(received, b"".join(pieces))

    def test_closed_socket(self) -> None:
        """A send error hands the data to the transport, which finds the error itself."""
        self.theirs.close()
        self.writer.write([b"x"])
        self.writer.write([b"y"])
        self.assertIn(b"y", b"".join(self.transport.queued))

    def test_not_a_socket(self) -> None:
        """A transport without a socket (TLS, test fakes) gets writeSequence with bytes."""
        transport = StringTransport()
        writer = ReplyWriter(transport)
        self.assertFalse(writer.direct)
        writer.write([b"a", memoryview(b"bc"), bytearray(b"d")])
        self.assertEqual(transport.value(), b"abcd")

    def test_disconnecting(self) -> None:
        """Once the transport is closing, nothing bypasses it."""
        self.transport.disconnecting = True
        self.writer.write([b"late"])
        self.assertEqual(self.transport.queued, [b"late"])
        self.assertEqual(drain(self.theirs), b"")


class FakeReadingTransport(FakeTCPTransport):
    """A transport whose doRead the reactor would call; here the test calls it."""

    def doRead(self) -> Any:  # noqa: N802 - Twisted's name
        raise AssertionError("the payload receiver should have replaced doRead")


class PayloadReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ours, self.theirs = socket_pair(self)
        self.transport = FakeReadingTransport(self.ours)
        self.receiver = PayloadReceiver(self.transport)

    def test_fills_the_buffer(self) -> None:
        """
        The bytes go straight into the buffer, however they arrive; done is
        called once, when it is full, and doRead is the transport's again.
        """
        self.assertTrue(self.receiver.possible)
        buffer = bytearray(10000)
        done: list[bool] = []
        self.receiver.start(memoryview(buffer)[100:], lambda: done.append(True))
        self.assertTrue(self.receiver.active)
        data = os.urandom(9900)
        self.theirs.sendall(data[:5000])
        self.assertIsNone(self.transport.doRead())
        self.assertEqual(done, [])
        self.assertIsNone(self.transport.doRead())  # nothing to read: EAGAIN
        self.theirs.sendall(data[5000:] + b"next request")
        self.assertIsNone(self.transport.doRead())
        self.assertEqual(done, [True])
        self.assertFalse(self.receiver.active)
        self.assertEqual(bytes(buffer[100:]), data)
        self.assertNotIn("doRead", self.transport.__dict__)
        # What follows the payload is left in the socket for the usual doRead.
        self.assertEqual(self.ours.recv(100), b"next request")

    def test_connection_closed(self) -> None:
        """The peer closing mid-payload ends the connection cleanly and restores doRead."""
        self.receiver.start(memoryview(bytearray(100)), lambda: None)
        self.theirs.sendall(b"abc")
        self.theirs.close()
        # One read takes what came and sees the end of the stream behind it.
        result = self.transport.doRead()
        self.assertIsInstance(result, ConnectionDone)
        self.assertFalse(self.receiver.active)
        self.assertNotIn("doRead", self.transport.__dict__)

    def test_stop(self) -> None:
        """stop() gives doRead back without calling done."""
        done: list[bool] = []
        self.receiver.start(memoryview(bytearray(100)), lambda: done.append(True))
        self.receiver.stop()
        self.assertFalse(self.receiver.active)
        self.assertNotIn("doRead", self.transport.__dict__)
        self.assertEqual(done, [])

    def test_not_possible(self) -> None:
        """Transports without a socket (TLS, test fakes) cannot do this."""
        receiver = PayloadReceiver(StringTransport())
        self.assertFalse(receiver.possible)
        self.assertRaises(RuntimeError, receiver.start, memoryview(bytearray(1)), lambda: None)


class LargeWriteTests(TestCase):
    """
    Large WRITEs over a real TCP connection are received straight into their
    buffers and land intact, between small requests on the same connection.
    """

    timeout = 60

    async def test_large_writes(self) -> None:
        from twisted.internet import reactor

        device = MappedMemoryDevice(64 * MiB)
        self.addCleanup(device.close)
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]))
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        # Runs first: waits until every server-side connection has closed.
        self.addCleanup(factory.shutdown)
        started: list[int] = []
        real_start = PayloadReceiver.start

        def spy(receiver: PayloadReceiver, view: memoryview, done: Any) -> None:
            started.append(len(view))
            real_start(receiver, view, done)

        self.patch(PayloadReceiver, "start", spy)
        for extended in (False, True):
            client = await connect(
                reactor, f"tcp:127.0.0.1:{port.getHost().port}", extended_headers=extended
            )
            blobs = {
                0: os.urandom(MiB),
                2 * MiB: os.urandom(4 * MiB + 4096),
                8 * MiB: os.urandom(32 * MiB),
                50 * MiB: b"small",
            }
            requests: list[Deferred[Any]] = [client.write(at, data) for at, data in blobs.items()]
            requests.append(client.read(60 * MiB, 4096))
            await gatherResults(requests)
            for at, data in blobs.items():
                self.assertEqual(await client.read(at, len(data)), data)
            await client.disconnect()
        self.assertTrue(started)
        self.assertLessEqual(max(started), 32 * MiB)


class _SocketServerCase(SynchronousTestCase):
    """
    Tests of a server protocol on one end of a socket pair (C{ours}; the
    client's end is C{theirs}) serving a 1 MiB memory device (C{device}).
    """

    ours: socket.socket
    theirs: socket.socket
    device: MappedMemoryDevice

    def serve(self, poll_max: float) -> NBDServerProtocol:
        """
        @return: the protocol, connected but not yet past the handshake.
        """
        self.ours, self.theirs = socket_pair(self)
        self.device = MappedMemoryDevice(MiB)
        self.addCleanup(self.device.close)
        factory = NBDServerFactory(ExportRegistry.of([Export("", self.device)]), poll_max=poll_max)
        proto = factory.buildProtocol(None)
        assert isinstance(proto, NBDServerProtocol)
        proto.makeConnection(PollingTransport(self.ours))
        return proto


class PollingTests(_SocketServerCase):
    """
    A connection busy-polls for its client's next request for a while
    (L{NBDServerProtocol._poll}) when the client has been answering fast.
    """

    def setUp(self) -> None:
        self.proto = self.serve(poll_max=1e-3)
        self.clock = [0.0]

        def now() -> float:
            # Time passes a little at every look, so polling always ends.
            self.clock[0] += 1e-6
            return self.clock[0]

        self.proto._now = now
        self.proto.dataReceived(b.client_flags() + b.go())
        drain(self.theirs)

    def test_takes_waiting_requests(self) -> None:
        """
        After a quick client, a request already waiting in the socket is
        taken at once by polling, without the reactor.
        """
        self.clock[0] += 50e-6  # the client answered 50 microseconds after we went idle
        self.theirs.sendall(b.read(2, 0, 512))
        self.proto.dataReceived(b.read(1, 0, 512))
        self.assertGreater(self.proto._poll_window, 0)
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[:16]), [(0, 1)])
        self.assertEqual(b.parse_simple_replies(replies[528:544]), [(0, 2)])

    def test_slow_client_not_polled(self) -> None:
        """A client slower than poll_max is not waited for: the reactor is."""
        self.clock[0] += 5e-3
        self.theirs.sendall(b.read(2, 0, 512))
        self.proto.dataReceived(b.read(1, 0, 512))
        self.assertEqual(self.proto._poll_window, 0)
        self.assertEqual(len(drain(self.theirs)), 16 + 512)  # only the first reply
        self.assertEqual(len(self.ours.recv(1000)), 28)  # the second is still waiting

    def test_window_shrinks_unused(self) -> None:
        """A window that expires with nothing to read is halved."""
        self.clock[0] += 50e-6
        calls = [0]

        def later() -> float:
            calls[0] += 1
            self.clock[0] += 60e-6
            return self.clock[0]

        self.proto.dataReceived(b.read(1, 0, 512))
        window = self.proto._poll_window
        self.assertGreater(window, 0)
        self.proto._now = later
        self.proto._poll()
        self.assertEqual(self.proto._poll_window, window / 2)

    def count_parses(self) -> list[int]:
        return count_calls(self.proto, "_parse")

    def test_plain_requests_without_parse(self) -> None:
        """
        Plain READs and WRITEs taken by polling are served by the tight loop
        alone (see _lean_step), without a round of _parse each.
        """
        self.clock[0] += 50e-6
        self.proto.dataReceived(b.read(1, 0, 512))
        self.assertGreater(self.proto._poll_window, 0)
        drain(self.theirs)
        calls = self.count_parses()
        self.theirs.sendall(b.write(2, 4096, b"w" * 512))
        self.proto._poll()
        self.theirs.sendall(b.read(3, 4096, 512))
        self.proto._poll()
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[:16]), [(0, 2)])
        self.assertEqual(b.parse_simple_replies(replies[16:32]), [(0, 3)])
        self.assertEqual(replies[32:], b"w" * 512)
        self.assertEqual(calls[0], 0)

    def count_buffered(self) -> list[int]:
        return count_calls(self.proto._conn, "receive_data")

    def test_lone_read_not_buffered(self) -> None:
        """
        A READ that arrives alone is served straight from what was received
        (see _lone_read): not buffered, no tight loop, no _parse.
        """
        self.device.write_now(8192, b"r" * 512)
        self.clock[0] += 50e-6
        self.proto.dataReceived(b.read(1, 0, 512))
        drain(self.theirs)
        parses, buffered = self.count_parses(), self.count_buffered()
        simple = count_calls(self.proto, "_simple")
        for cookie in (2, 3):
            self.theirs.sendall(b.read(cookie, 8192, 512))
            self.proto._poll()
            replies = drain(self.theirs)
            self.assertEqual(b.parse_simple_replies(replies[:16]), [(0, cookie)])
            self.assertEqual(replies[16:], b"r" * 512)
        self.assertEqual((parses[0], buffered[0], simple[0]), (0, 0, 0))
        self.assertEqual(self.proto.info.requests, 3)
        self.assertEqual(self.proto.info.bytes_read, 3 * 512)

    def test_lone_read_general_way(self) -> None:
        """
        A lone READ the device cannot answer at once goes the general way,
        answered all the same.
        """
        self.device.write_now(0, b"g" * 512)
        self.clock[0] += 50e-6
        self.proto.dataReceived(b.read(1, 0, 512))
        drain(self.theirs)
        asked = []

        def not_now(offset: int, length: int) -> None:
            asked.append((offset, length))
            return None

        self.proto._read_buffer = not_now
        self.proto._simple_kit = None
        self.theirs.sendall(b.read(2, 0, 512))
        self.proto._poll()
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[:16]), [(0, 2)])
        self.assertEqual(replies[16:], b"g" * 512)
        self.assertEqual(asked, [(0, 512), (0, 512)])  # by _lone_read, then by _read

    def test_lone_read_refused(self) -> None:
        """A lone READ past the end is refused by the full path, and the client goes on."""
        self.clock[0] += 50e-6
        self.proto.dataReceived(b.read(1, 0, 512))
        drain(self.theirs)
        self.theirs.sendall(b.read(2, MiB, 512))
        self.proto._poll()
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)), [(22, 2)])
        self.theirs.sendall(b.read(3, 0, 512))
        self.proto._poll()
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)[:16]), [(0, 3)])

    def test_other_requests_parsed(self) -> None:
        """
        Anything else taken by polling (a FLUSH, half a request) goes to
        _parse, and is served as ever.
        """
        self.clock[0] += 50e-6
        self.proto.dataReceived(b.read(1, 0, 512))
        drain(self.theirs)
        calls = self.count_parses()
        self.theirs.sendall(b.request(w.Cmd.FLUSH, 2))
        self.proto._poll()
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)), [(0, 2)])
        self.assertGreater(calls[0], 0)
        before = calls[0]
        request = b.write(3, 0, b"h" * 100)
        self.theirs.sendall(request[:20])
        self.proto._poll()
        self.assertGreater(calls[0], before)
        self.theirs.sendall(request[20:])
        self.proto._poll()
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)), [(0, 3)])
        self.assertEqual(bytes(self.device.read_buffer(0, 100)), b"h" * 100)

    def test_off(self) -> None:
        """poll_max 0 never polls."""
        self.proto.poll_max = 0
        self.theirs.sendall(b.read(2, 0, 512))
        self.proto.dataReceived(b.read(1, 0, 512))
        self.assertEqual(len(drain(self.theirs)), 16 + 512)


class PollRoundsTests(_SocketServerCase):
    """
    Polling serves lone READs one after another (L{NBDServerProtocol._poll}
    with L{NBDServerProtocol._lone_kit}) and lets the reactor run every
    L{POLL_REQUESTS} requests only when it has something to do
    (L{NBDServerProtocol._reactor_idle}).
    """

    def setUp(self) -> None:
        self.proto = self.serve(poll_max=1e-3)
        self.reactor = EPollReactor()
        self.addCleanup(close_reactor, self.reactor)
        cast(Any, self.proto.transport).reactor = self.reactor
        self.clock = [0.0]
        self.proto._now = self.now
        self.proto.dataReceived(b.client_flags() + b.go())
        drain(self.theirs)
        self.device.write_now(0, bytes(range(256)) * 16)
        #: Requests the client still has to send, one per reply.
        self.to_send: list[bytes] = []
        self.answered: list[bytes] = []
        self.idle_asked = count_calls(self.proto, "_reactor_idle")

    def now(self) -> float:
        """
        The clock polling looks at, which is also the client: it sends its
        next request once the last one's reply has arrived, as a client at
        queue depth 1 does.
        """
        self.clock[0] += 1e-6
        if waiting(self.theirs.fileno()) >= 16 + 512:
            self.answered.append(self.theirs.recv(16 + 512))
            if self.to_send:
                self.theirs.sendall(self.to_send.pop(0))
        return self.clock[0]

    def start(self, count: int) -> None:
        """A quick client's first READ, then C{count} more one at a time."""
        self.to_send = [b.read(cookie, 512 * (cookie % 8), 512) for cookie in range(2, count + 2)]
        self.clock[0] += 50e-6
        self.proto.dataReceived(b.read(1, 0, 512))

    def check_answers(self, count: int) -> None:
        self.assertEqual(len(self.answered), count)
        for cookie, reply in enumerate(self.answered, 1):
            self.assertEqual(b.parse_simple_replies(reply[:16]), [(0, cookie)])
            start = 512 * (cookie % 8) if cookie > 1 else 0
            self.assertEqual(reply[16:], (bytes(range(256)) * 16)[start : start + 512])

    def test_idle_reactor_keeps_polling(self) -> None:
        """
        With nothing else for the reactor to do, one turn of polling serves
        all 40 lone READs, asking the reactor every 16.
        """
        self.start(39)
        self.assertEqual(self.to_send, [])
        self.check_answers(40)
        self.assertEqual(self.idle_asked[0], 40 // POLL_REQUESTS)
        self.assertEqual(self.proto.info.requests, 40)

    def test_busy_reactor_gets_its_turn(self) -> None:
        """A timed call that is due ends polling after POLL_REQUESTS requests."""
        self.reactor.callLater(0, lambda: None)
        self.start(39)
        self.assertEqual(self.idle_asked[0], 1)
        # The first READ came through dataReceived; then polling took 16.
        self.assertEqual(len(self.answered), 1 + POLL_REQUESTS)
        self.assertEqual(len(self.to_send), 39 - POLL_REQUESTS - 1)

    def test_reactor_idle(self) -> None:
        """
        Idle is: no other descriptor ready, no timed call due, no call from
        a thread waiting; this connection's own socket being readable does
        not count, its being registered for writing (bytes queued) does.
        """
        idle = NBDServerProtocol._reactor_idle.__get__(self.proto)
        reactor = self.reactor
        self.assertTrue(idle())
        reactor.callLater(10, lambda: None)
        self.assertTrue(idle())
        # Its own socket, readable: still idle.
        ours = cast(Any, Selectable(self.ours))
        reactor.addReader(ours)
        self.addCleanup(reactor.removeAll)
        self.theirs.sendall(b"x")
        self.assertTrue(idle())
        # Registered for writing too (and writable): not idle.
        reactor.addWriter(ours)
        self.assertFalse(idle())
        reactor.removeWriter(ours)
        self.assertTrue(idle())
        # Another descriptor readable.
        other, other_peer = socket_pair(self)
        reactor.addReader(cast(Any, Selectable(other)))
        self.assertTrue(idle())
        other_peer.sendall(b"y")
        self.assertFalse(idle())
        reactor.removeReader(cast(Any, Selectable(other)))
        self.assertTrue(idle())
        # A timed call due.
        reactor.callLater(0, lambda: None)
        self.assertFalse(idle())

    def test_call_from_thread(self) -> None:
        """A call from a thread waiting: not idle."""
        self.reactor.callFromThread(lambda: None)
        self.assertFalse(self.proto._reactor_idle())

    def test_other_reactors_never_idle(self) -> None:
        """Without an epoll reactor (or any reactor) polling stops every 16 requests."""
        cast(Any, self.proto.transport).reactor = object()
        self.assertFalse(self.proto._reactor_idle())
        del cast(Any, self.proto.transport).reactor
        self.assertFalse(self.proto._reactor_idle())

    def test_reply_socket_full(self) -> None:
        """
        A lone READ whose reply the socket cannot take at once: what is left
        is copied to the transport's queue (the device's memory may change
        once control leaves), and polling stops serving lone READs straight
        to the socket until the transport is idle again.
        """
        self.start(0)
        self.check_answers(1)
        filled = 0
        while True:
            try:
                filled += self.ours.send(b"\0" * 65536)
            except BlockingIOError:
                break
        transport = cast(FakeTCPTransport, self.proto.transport)
        # Queued, as Twisted's transport does.
        transport.writeSequence = FakeTCPTransport.writeSequence.__get__(transport)  # type: ignore[method-assign]
        kit = self.proto._lone_kit()
        assert kit is not None
        served = self.proto._lone_read(b.read(7, 1024, 512), kit)
        self.assertIs(served, _TAKEN)
        self.assertEqual(b"".join(transport.queued)[16:], (bytes(range(256)) * 16)[1024:1536])
        self.assertEqual(b.parse_simple_replies(b"".join(transport.queued)[:16]), [(0, 7)])
        self.device.write_now(1024, b"z" * 512)
        self.assertEqual(b"".join(transport.queued)[16:], (bytes(range(256)) * 16)[1024:1536])
        self.assertIsNone(self.proto._lone_kit())
        self.assertIs(self.proto._lone_read(b.read(8, 0, 512)), _NOT_TAKEN)


class CorkTests(_SocketServerCase):
    """
    Replies to requests taken in one parse loop are written together, in
    writes of about L{_CORK_LIMIT} bytes.
    """

    def test_replies_written_together(self) -> None:
        """
        Twenty 64 KiB READs received at once: their replies go out in two
        writes (the first once 1 MiB is gathered), complete and in order.
        """
        proto = self.serve(poll_max=0)
        proto.dataReceived(b.client_flags() + b.go())
        drain(self.theirs)
        data = bytes(range(256)) * (MiB // 256)
        self.device.write_now(0, data)
        transport = cast(FakeTCPTransport, proto.transport)
        # Queued, as Twisted's transport does, when the socket is full.
        transport.writeSequence = FakeTCPTransport.writeSequence.__get__(transport)  # type: ignore[method-assign]
        assert proto._writer is not None
        writes = count_calls(proto._writer, "write")
        reads = [(cookie, 64 * KiB * (cookie % 16), 64 * KiB) for cookie in range(1, 21)]
        proto.dataReceived(b"".join(b.read(*r) for r in reads))
        self.assertEqual(writes[0], 2)
        stream = drain(self.theirs) + b"".join(transport.queued)
        self.assertEqual(len(stream), 20 * (16 + 64 * KiB))
        for i, (cookie, offset, length) in enumerate(reads):
            reply = stream[i * (16 + length) : (i + 1) * (16 + length)]
            self.assertEqual(b.parse_simple_replies(reply[:16]), [(0, cookie)])
            self.assertEqual(reply[16:], data[offset : offset + length])


class Selectable:
    """The least the epoll reactor registers: a descriptor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selectable) and other.fileno() == self.fileno()

    def __hash__(self) -> int:
        return self.fileno()


def close_reactor(reactor: EPollReactor) -> None:
    """Close what an epoll reactor that never ran holds open."""
    reactor.removeAll()
    reactor.removeReader(reactor.waker)
    reactor.waker.connectionLost(None)
    reactor._poller.close()


class DrainedTests(_SocketServerCase):
    """
    When everything buffered has been served, L{NBDServerProtocol._parse}
    stops without asking L{ServerConnection.next_event} to find that out
    (L{ServerConnection.drained}); whenever anything is left, it asks.
    """

    def setUp(self) -> None:
        self.proto = self.serve(poll_max=0)
        self.conn = self.proto._conn
        self.assertFalse(self.conn.drained())  # still haggling over options
        self.proto.dataReceived(b.client_flags() + b.go())
        drain(self.theirs)
        self.events = count_calls(self.conn, "next_event")

    def test_drained(self) -> None:
        """Only at a request boundary with nothing buffered."""
        self.assertTrue(self.conn.drained())
        request = b.write(1, 0, b"d" * 100)
        self.conn.receive_data(request[:20])
        self.assertFalse(self.conn.drained())  # half a header
        self.conn.receive_data(request[20:28])
        self.assertEqual(self.conn.next_event(), NEED_DATA)
        self.assertEqual(self.conn.buffered(), 0)
        self.assertFalse(self.conn.drained())  # a WRITE waits for its payload
        self.conn.receive_data(request[28:])
        self.assertFalse(self.conn.drained())

    def test_served_without_next_event(self) -> None:
        """Plain requests served by the tight loop: no next_event round."""
        self.proto.dataReceived(b.write(1, 0, b"d" * 512) + b.read(2, 0, 512))
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[:16]), [(0, 1)])
        self.assertEqual(b.parse_simple_replies(replies[16:32]), [(0, 2)])
        self.assertEqual(replies[32:], b"d" * 512)
        self.assertEqual(self.events[0], 0)

    def test_rest_goes_to_next_event(self) -> None:
        """A FLUSH after them, or half a request, is still parsed the long way."""
        self.proto.dataReceived(b.read(1, 0, 512) + b.request(w.Cmd.FLUSH, 2))
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[528:]), [(0, 2)])
        self.assertGreater(self.events[0], 0)
        before = self.events[0]
        request = b.write(3, 0, b"h" * 100)
        self.proto.dataReceived(request[:20])
        self.assertGreater(self.events[0], before)
        self.proto.dataReceived(request[20:])
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)), [(0, 3)])
        self.assertEqual(bytes(self.device.read_buffer(0, 100)), b"h" * 100)


class PollingTransport(FakeTCPTransport):
    """What the protocol needs of a TCP transport, over a socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def getPeer(self) -> Any:  # noqa: N802
        return "peer"

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        self.socket.sendall(b"".join(data))


class ReadingTransport(PollingTransport):
    """A L{PollingTransport} whose C{doRead} a payload receiver may stand in for."""

    def doRead(self) -> object:  # noqa: N802 - FileDescriptor's name
        raise AssertionError("only the payload receiver's doRead is expected here")


class ReadOnTests(SynchronousTestCase):
    """
    After a large payload received straight into its buffer, what the client
    sent since (the next request) is taken at once, not after another turn
    of the reactor (L{NBDServerProtocol._read_on}).
    """

    def setUp(self) -> None:
        self.ours, self.theirs = socket_pair(self)

    def serve(self, device: Any) -> tuple[NBDServerProtocol, ReadingTransport]:
        # No busy-polling: only _read_on may read the socket on its own.
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]), poll_max=0)
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = ReadingTransport(self.ours)
        proto.makeConnection(transport)
        proto.dataReceived(b.client_flags() + b.go())
        drain(self.theirs)
        return proto, transport

    def feed(self, transport: ReadingTransport, data: bytes) -> None:
        """Send C{data} in pieces the socket holds, each read by the receiver's doRead."""
        for start in range(0, len(data), 65536):
            assert "doRead" in transport.__dict__, "the payload is not being received"
            self.theirs.sendall(data[start : start + 65536])
            transport.doRead()

    def check(self, device: Any) -> None:
        proto, transport = self.serve(device)
        payload = os.urandom(512 * 1024)
        message = b.write(1, 0, payload)
        head = len(message) - len(payload) + 1000
        proto.dataReceived(message[:head])
        assert proto._receiver is not None and proto._receiver.active
        # The READ comes in the same piece as the payload's last bytes.
        self.feed(transport, message[head:] + b.read(2, 4096, 512))
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[:16]), [(0, 1)])
        self.assertEqual(b.parse_simple_replies(replies[16:32]), [(0, 2)])
        self.assertEqual(replies[32:], payload[4096 : 4096 + 512])
        self.assertNotIn("doRead", transport.__dict__)

    def test_ram(self) -> None:
        """T-12: into the RAM disk itself (IBufferWrite), then the READ behind it."""
        device = MappedMemoryDevice(MiB)
        self.addCleanup(device.close)
        self.check(device)

    def test_buffer(self) -> None:
        """The same through a payload buffer (a device without IBufferWrite)."""
        self.check(MemoryBlockDevice(MiB))

    def test_nothing_waiting(self) -> None:
        """Nothing sent since: nothing happens until the reactor sees more."""
        device = MappedMemoryDevice(MiB)
        self.addCleanup(device.close)
        proto, transport = self.serve(device)
        payload = os.urandom(512 * 1024)
        message = b.write(1, 0, payload)
        proto.dataReceived(message[:100])
        self.feed(transport, message[100:])
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)), [(0, 1)])
        self.assertNotIn("doRead", transport.__dict__)


class AllowingGuard:
    """A dirty-page guard that always allows inline writes."""

    def allows(self) -> bool:
        return True


class ReadSizeTests(SynchronousTestCase):
    """
    The connection reads in larger pieces while its client sends mid-sized
    WRITEs (so that a 64 KiB one seldom straddles two), and in the usual
    ones otherwise (L{NBDServerProtocol._read_sizes}).
    """

    def setUp(self) -> None:
        self.ours, self.theirs = socket_pair(self)
        self.device = MappedMemoryDevice(4 * MiB)
        self.addCleanup(self.device.close)
        factory = NBDServerFactory(ExportRegistry.of([Export("", self.device)]), poll_max=0)
        proto = factory.buildProtocol(None)
        assert proto is not None
        self.proto = proto
        self.transport = ReadingTransport(self.ours)
        proto.makeConnection(self.transport)
        proto.dataReceived(b.client_flags() + b.go())
        drain(self.theirs)

    def sizes(self) -> tuple[int, int]:
        return self.proto._read_size, cast(Any, self.transport).bufferSize

    def test_follows_write_sizes(self) -> None:
        """64 KiB WRITEs: large pieces; 4 KiB ones: the usual; each WRITE lands."""
        small = (POLL_BUFFER, READ_SIZE)
        self.assertEqual(self.sizes(), small)
        self.proto.dataReceived(b.write(1, 0, b"a" * 65536))
        self.assertEqual(self.sizes(), (LARGE_READ_SIZE, LARGE_READ_SIZE))
        # Split across two pieces: the general path notices too.
        message = b.write(2, 65536, b"b" * 65536)
        self.proto.dataReceived(message[:1000])
        self.proto.dataReceived(message[1000:])
        self.assertEqual(self.sizes(), (LARGE_READ_SIZE, LARGE_READ_SIZE))
        self.proto.dataReceived(b.write(3, 65536 * 3, b"c" * 4096))
        self.assertEqual(self.sizes(), small)
        message = b.write(4, 65536 * 2, b"d" * 65536)
        self.proto.dataReceived(message[:1000])
        self.proto.dataReceived(message[1000:])
        self.assertEqual(self.sizes(), (LARGE_READ_SIZE, LARGE_READ_SIZE))
        self.assertEqual(
            b.parse_simple_replies(drain(self.theirs)), [(0, 1), (0, 2), (0, 3), (0, 4)]
        )
        self.assertEqual(bytes(self.device.read_buffer(0, 65536)), b"a" * 65536)
        self.assertEqual(bytes(self.device.read_buffer(65536, 65536)), b"b" * 65536)
        self.assertEqual(bytes(self.device.read_buffer(65536 * 3, 4096)), b"c" * 4096)
        self.assertEqual(bytes(self.device.read_buffer(65536 * 2, 65536)), b"d" * 65536)

    def test_small_while_piping(self) -> None:
        """
        While large WRITEs to a file are spliced into pipes, the connection
        reads little at a time (so payload bytes are not copied to Python
        and back first); a small WRITE puts the usual size back.
        """
        if not hasattr(os, "splice"):
            raise SkipTest("splice is Linux's")
        path = self.mktemp()
        create_image(path, 4 * MiB)
        device = FileBlockDevice(path)
        self.addCleanup(device.close)
        # Writes inline whatever the machine's state (this test has no pool).
        device._write_nowait = False
        device._dirty = cast(Any, AllowingGuard())
        device._now = lambda: 0.0
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]), poll_max=0)
        proto = factory.buildProtocol(None)
        assert proto is not None
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        transport = ReadingTransport(ours)
        proto.makeConnection(transport)
        proto.dataReceived(b.client_flags() + b.go())
        drain(theirs)
        sizes = lambda: (proto._read_size, cast(Any, transport).bufferSize)  # noqa: E731
        payload = os.urandom(MiB)
        message = b.write(1, 0, payload)
        proto.dataReceived(message[:1000])
        self.assertEqual(sizes(), (PIPE_READ_SIZE, PIPE_READ_SIZE))
        for start in range(1000, len(message), 65536):
            theirs.sendall(message[start : start + 65536])
            transport.doRead()
        self.assertNotIn("doRead", transport.__dict__)
        self.assertEqual(sizes(), (PIPE_READ_SIZE, PIPE_READ_SIZE))
        # A payload too small for a pipe: the usual size at once, not 4 KiB
        # pieces for the rest of it.
        middle = b.write(2, MiB, b"m" * (256 * 1024))
        proto.dataReceived(middle[:1000])
        self.assertEqual(sizes(), (POLL_BUFFER, READ_SIZE))
        proto.dataReceived(middle[1000:])
        message = b.write(3, MiB, os.urandom(MiB))
        proto.dataReceived(message[:1000])
        self.assertEqual(sizes(), (PIPE_READ_SIZE, PIPE_READ_SIZE))
        for start in range(1000, len(message), 65536):
            theirs.sendall(message[start : start + 65536])
            transport.doRead()
        proto.dataReceived(b.write(4, 3 * MiB, b"s" * 4096))
        self.assertEqual(sizes(), (POLL_BUFFER, READ_SIZE))
        self.assertEqual(b.parse_simple_replies(drain(theirs)), [(0, 1), (0, 2), (0, 3), (0, 4)])
        with open(path, "rb") as f:
            self.assertEqual(f.read(MiB), payload)


class ClosingTransport(ReadingTransport):
    """A L{ReadingTransport} that records being closed."""

    def loseConnection(self) -> None:  # noqa: N802
        self.disconnecting = True


class LateRequestTests(SynchronousTestCase):
    """
    C-07: when the server shuts down, requests the client sent while
    reading was paused (still in the socket when the last request in flight
    ends) are answered with ESHUTDOWN before the connection closes, not cut
    off (L{NBDServerProtocol._late_requests}).
    """

    def setUp(self) -> None:
        self.ours, self.theirs = socket_pair(self)
        self.device = ControllableBlockDevice(MiB)
        factory = NBDServerFactory(ExportRegistry.of([Export("", self.device)]), poll_max=0)
        proto = factory.buildProtocol(None)
        assert isinstance(proto, NBDServerProtocol)
        self.proto = proto
        self.transport = ClosingTransport(self.ours)
        proto.makeConnection(self.transport)
        proto.dataReceived(b.client_flags() + b.go())
        drain(self.theirs)
        # One READ in flight; the client sends more that the server has not read.
        proto.dataReceived(b.read(1, 0, 4096))
        self.call = self.device.take("read")

    def test_answered_before_closing(self) -> None:
        self.theirs.sendall(b.read(2, 4096, 4096) + b.read(3, 8192, 512))
        self.proto.shutdown()
        self.assertFalse(self.transport.disconnecting)
        self.call.deferred.callback(b"r" * 4096)
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[:16]), [(0, 1)])
        self.assertEqual(replies[16 : 16 + 4096], b"r" * 4096)
        self.assertEqual(
            b.parse_simple_replies(replies[16 + 4096 :]),
            [(w.Errno.ESHUTDOWN, 2), (w.Errno.ESHUTDOWN, 3)],
        )
        self.assertEqual(self.device.calls, [])
        self.assertTrue(self.transport.disconnecting)

    def test_nothing_late(self) -> None:
        """Nothing waiting: the connection closes once the READ is answered."""
        self.proto.shutdown()
        self.call.deferred.callback(b"r" * 4096)
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)[:16]), [(0, 1)])
        self.assertTrue(self.transport.disconnecting)

    def test_disc_among_them(self) -> None:
        """A DISC among the late requests: what came before it is answered, then it closes."""
        self.theirs.sendall(b.read(2, 4096, 4096) + b.request(w.Cmd.DISC, 3))
        self.proto.shutdown()
        self.call.deferred.callback(b"r" * 4096)
        replies = drain(self.theirs)
        self.assertEqual(b.parse_simple_replies(replies[16 + 4096 :]), [(w.Errno.ESHUTDOWN, 2)])
        self.assertTrue(self.transport.disconnecting)

    def test_not_while_receiving_a_payload(self) -> None:
        """
        A large WRITE's payload being received when the READ ends: the
        socket's bytes are the payload's, so none are read as requests;
        the connection closes as before (the WRITE is cut off).
        """
        message = b.write(2, 0, b"p" * (512 * 1024))
        self.proto.dataReceived(message[:4096])
        receiver = self.proto._receiver
        assert receiver is not None
        self.assertTrue(receiver.active)
        self.theirs.sendall(message[4096:65536])
        self.proto.shutdown()
        self.call.deferred.callback(b"r" * 4096)
        self.assertEqual(b.parse_simple_replies(drain(self.theirs)[:16]), [(0, 1)])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(waiting(self.ours.fileno()), 65536 - 4096)
