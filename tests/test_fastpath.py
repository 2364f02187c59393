"""
The server's tight loop for pipelined plain READs and WRITEs
(L{NBDServerProtocol._simple}, L{ServerConnection.take_simple}) and every
way out of it: a device that cannot answer at once, a partial write, FUA,
a request that is not plain, the queue-depth limit, observers, and READ
replies that are views of a RAM disk changed by a later WRITE in the same
batch. Rule ids are from nbd-protocol.md.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Any, cast
from unittest import SkipTest

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests import builders as b
from tests.test_transport import count_calls
from twisted_nbd import _wire as w
from twisted_nbd import protocol as protocol_module
from twisted_nbd._transport import PIPES_MAX, PayloadReceiver, PipedPayload
from twisted_nbd._wire import Errno
from twisted_nbd.backends.file import DirtyPageGuard, FileBlockDevice, create_image
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import IBlockDevice, IBufferWrite, IImmediateIO, IPipeWrite
from twisted_nbd.observers import ServerObserver
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol
from twisted_nbd.testing import ControllableBlockDevice

SIZE = 1 << 20
MiB = 1 << 20
ADDRESS = IPv4Address("TCP", "127.0.0.1", 1)


@implementer(IBlockDevice, IImmediateIO)
class ImmediateDevice(ControllableBlockDevice):
    """
    A controllable device that also answers at once as told: C{read_now}
    gives C{now_data} (or declines with C{None}), C{write_now} writes
    C{now_written} bytes (C{None}: all of them). Every call is recorded.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.now_data: bytes | None = None
        self.now_written: int | None = None
        self.now_calls: list[tuple[str, int, int]] = []

    def read_now(self, offset: int, length: int) -> bytes | None:
        self.now_calls.append(("read_now", offset, length))
        return self.now_data

    def write_now(self, offset: int, data: Any) -> int:
        self.now_calls.append(("write_now", offset, len(data)))
        return len(data) if self.now_written is None else self.now_written


def serve(
    device: IBlockDevice,
    structured: bool = False,
    extended: bool = False,
    max_queue_depth: int = 16,
    observers: tuple[Any, ...] = (),
    transport: StringTransport | None = None,
) -> tuple[NBDServerProtocol, StringTransport]:
    """A connection to C{device} past NBD_OPT_GO, its output cleared."""
    factory = NBDServerFactory(
        ExportRegistry.of([Export("", device)]),
        reactor=MemoryReactorClock(),
        poll_max=0,
        max_queue_depth=max_queue_depth,
    )
    for observer in observers:
        factory.add_observer(observer)
    proto = factory.buildProtocol(ADDRESS)
    assert proto is not None
    if transport is None:
        transport = StringTransport()
    proto.makeConnection(transport)
    options = b""
    if extended:
        options += b.option(w.Opt.EXTENDED_HEADERS)
    elif structured:
        options += b.option(w.Opt.STRUCTURED_REPLY)
    proto.dataReceived(b.client_flags() + options + b.go())
    assert proto._device is not None, transport.value()
    transport.clear()
    return proto, transport


def simple_replies(data: bytes, lengths: dict[int, int]) -> list[tuple[int, int, bytes]]:
    """
    Split simple replies into (error, cookie, data); C{lengths} gives the
    data length of each successful READ's reply by cookie.
    """
    out = []
    position = 0
    while position < len(data):
        magic, error, cookie = struct.unpack_from(">IIQ", data, position)
        assert magic == w.SIMPLE_REPLY_MAGIC, hex(magic)
        position += 16
        size = 0 if error else lengths.get(cookie, 0)
        out.append((error, cookie, data[position : position + size]))
        position += size
    return out


class RamBatchTests(SynchronousTestCase):
    """A RAM disk (replies straight from its memory) in the tight loop."""

    def setUp(self) -> None:
        self.device = MappedMemoryDevice(SIZE)
        self.addCleanup(self.device.close)

    def test_read_view_then_write_in_one_batch(self) -> None:
        """
        C-01, T-12: a READ answered with a view of the disk and a WRITE of
        the same bytes later in the same batch: the READ's reply carries
        the data as it was when it was read, and a READ after the WRITE
        sees the new data.
        """
        old, new = b"o" * 4096, b"n" * 4096
        self.device.write_now(8192, old)
        proto, transport = serve(self.device)
        proto.dataReceived(b.read(1, 8192, 4096) + b.write(2, 8192, new) + b.read(3, 8192, 4096))
        replies = simple_replies(transport.value(), {1: 4096, 3: 4096})
        self.assertEqual(replies, [(0, 1, old), (0, 2, b""), (0, 3, new)])

    def test_write_elsewhere_in_one_batch(self) -> None:
        """
        C-01: two READs answered with views of the disk, then a WRITE that
        changes the bytes of the second only, in one batch: both replies
        carry the data as it was.
        """
        first, second = b"1" * 4096, b"2" * 4096
        self.device.write_now(0, first)
        self.device.write_now(65536, second)
        proto, transport = serve(self.device)
        proto.dataReceived(
            b.read(1, 0, 4096) + b.read(2, 65536, 4096) + b.write(3, 65536 + 4095, b"n")
        )
        replies = simple_replies(transport.value(), {1: 4096, 2: 4096})
        self.assertEqual(replies, [(0, 1, first), (0, 2, second), (0, 3, b"")])

    def test_only_views_of_changed_bytes_copied(self) -> None:
        """
        Before a change, only the gathered views that show the bytes it
        changes are copied (a READ's reply ending where a WRITE begins is
        not); the others stay views, to be sent without a copy.
        """
        proto, _ = serve(self.device)
        memory = memoryview(bytearray(300))
        proto._out = [b"h", memory[0:10], b"h", memory[100:110], b"h", memory[200:210]]
        proto._view_pieces = [(1, 0, 10), (3, 100, 110), (5, 200, 210)]
        proto._flush_views(10, 90)  # from the end of the first to the start of the second
        self.assertEqual([type(p) for p in proto._out[1::2]], [memoryview] * 3)
        proto._flush_views(109, 92)  # the last byte of the second to the first of the third
        self.assertEqual([type(p) for p in proto._out[1::2]], [memoryview, bytes, bytes])
        self.assertEqual(proto._view_pieces, [(1, 0, 10)])

    def test_counts(self) -> None:
        """The connection's counts (its log line, /connections) include the batch."""
        proto, transport = serve(self.device)
        proto.dataReceived(
            b.write(1, 0, b"x" * 4096) + b.read(2, 0, 8192) + b.write(3, 4096, b"y" * 512)
        )
        self.assertEqual(len(simple_replies(transport.value(), {2: 8192})), 3)
        self.assertEqual(
            (proto.info.requests, proto.info.bytes_read, proto.info.bytes_written),
            (3, 8192, 4608),
        )

    def test_other_requests_between(self) -> None:
        """
        A FLUSH and an out-of-bounds READ in the middle of a batch take the
        general path (the READ gets EINVAL, T-21) and the loop goes on after them.
        """
        proto, transport = serve(self.device)
        proto.dataReceived(
            b.write(1, 0, b"a" * 512)
            + b.request(w.Cmd.FLUSH, 2)
            + b.read(3, SIZE, 512)
            + b.read(4, 0, 512)
        )
        replies = simple_replies(transport.value(), {4: 512})
        self.assertEqual(
            replies,
            [(0, 1, b""), (0, 2, b""), (int(w.Errno.EINVAL), 3, b""), (0, 4, b"a" * 512)],
        )

    def test_request_across_chunks(self) -> None:
        """A WRITE whose payload arrives in pieces is served all the same."""
        proto, transport = serve(self.device)
        message = b.write(1, 0, b"z" * 4096) + b.read(2, 0, 4096)
        for start in range(0, len(message), 1000):
            proto.dataReceived(message[start : start + 1000])
        self.assertEqual(
            simple_replies(transport.value(), {2: 4096}), [(0, 1, b""), (0, 2, b"z" * 4096)]
        )

    def test_structured_read(self) -> None:
        """T-14: with structured replies a READ is one OFFSET_DATA chunk with DONE."""
        self.device.write_now(4096, b"s" * 4096)
        proto, transport = serve(self.device, structured=True)
        proto.dataReceived(b.read(7, 4096, 4096))
        chunks = b.parse_chunks(transport.value())
        self.assertEqual(
            chunks,
            [
                (
                    int(w.ReplyFlags.DONE),
                    int(w.ChunkType.OFFSET_DATA),
                    7,
                    struct.pack(">Q", 4096) + b"s" * 4096,
                )
            ],
        )

    def test_extended_headers(self) -> None:
        """Extended headers: requests and replies of 32 bytes in the loop too."""
        proto, transport = serve(self.device, extended=True)
        proto.dataReceived(
            b.ext_request(w.Cmd.WRITE, 1, 512, 512, int(w.CmdFlags.PAYLOAD_LEN), b"e" * 512)
            + b.ext_request(w.Cmd.READ, 2, 512, 512)
        )
        chunks = b.parse_ext_chunks(transport.value())
        done = int(w.ReplyFlags.DONE)
        self.assertEqual(
            chunks,
            [
                (done, int(w.ChunkType.NONE), 1, 512, b""),
                (done, int(w.ChunkType.OFFSET_DATA), 2, 512, struct.pack(">Q", 512) + b"e" * 512),
            ],
        )

    def test_large_read_is_sparse(self) -> None:
        """
        T-15: a large READ over a hole still goes the sparse way (an
        OFFSET_HOLE chunk), not as a run of zero bytes.
        """
        proto, transport = serve(self.device, structured=True)
        proto.dataReceived(b.read(1, 0, 512 * 1024))
        chunks = b.parse_chunks(transport.value())
        self.assertEqual([c[1] for c in chunks], [int(w.ChunkType.OFFSET_HOLE)])

    def test_observers_see_every_request(self) -> None:
        """With an observer, every request is reported (the general path)."""
        seen: list[int] = []

        class Seen(ServerObserver):
            def request_started(self, info: Any, request: Any) -> None:
                seen.append(request.cookie)

        proto, transport = serve(self.device, observers=(Seen(),))
        proto.dataReceived(b.write(1, 0, b"w" * 512) + b.read(2, 0, 512))
        self.assertEqual(seen, [1, 2])
        self.assertEqual(len(simple_replies(transport.value(), {2: 512})), 2)


class FallbackTests(SynchronousTestCase):
    """What the device cannot do at once goes the general way."""

    def setUp(self) -> None:
        self.device = ImmediateDevice(SIZE)

    def test_read_declined(self) -> None:
        """A READ that read_now declines is passed to read(); its reply waits for it."""
        proto, transport = serve(self.device)
        proto.dataReceived(b.read(1, 4096, 512))
        self.assertEqual(self.device.now_calls, [("read_now", 4096, 512)])
        call = self.device.take("read")
        self.assertEqual(call.args, {"offset": 4096, "length": 512})
        self.assertEqual(transport.value(), b"")
        call.succeed(b"r" * 512)
        self.assertEqual(simple_replies(transport.value(), {1: 512}), [(0, 1, b"r" * 512)])

    def test_read_at_once(self) -> None:
        """A READ that read_now answers never reaches read()."""
        self.device.now_data = b"q" * 512
        proto, transport = serve(self.device)
        proto.dataReceived(b.read(1, 0, 512))
        self.assertEqual(simple_replies(transport.value(), {1: 512}), [(0, 1, b"q" * 512)])
        self.assertEqual(self.device.calls, [])

    def test_read_wrong_length(self) -> None:
        """Data of the wrong length from read_now is not sent: read() is asked."""
        self.device.now_data = b"short"
        proto, transport = serve(self.device)
        proto.dataReceived(b.read(1, 0, 512))
        self.device.take("read").succeed(b"k" * 512)
        self.assertEqual(simple_replies(transport.value(), {1: 512}), [(0, 1, b"k" * 512)])

    def test_write_declined(self) -> None:
        """A WRITE that write_now declines goes to write() whole."""
        self.device.now_written = 0
        proto, transport = serve(self.device)
        proto.dataReceived(b.write(1, 1024, b"d" * 1024))
        call = self.device.take("write")
        self.assertEqual((call.args["offset"], bytes(call.args["data"])), (1024, b"d" * 1024))
        self.assertEqual(transport.value(), b"")
        call.succeed(None)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 1, b"")])

    def test_write_partly_done(self) -> None:
        """
        A WRITE that write_now did in part: write() gets the rest, and the
        reply (to the whole request) waits for it.
        """
        self.device.now_written = 1536
        proto, transport = serve(self.device)
        payload = bytes(range(256)) * 16
        proto.dataReceived(b.write(9, 8192, payload))
        call = self.device.take("write")
        self.assertEqual(
            (call.args["offset"], bytes(call.args["data"])), (8192 + 1536, payload[1536:])
        )
        self.assertEqual(transport.value(), b"")
        call.succeed(None)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 9, b"")])
        self.assertEqual(proto.info.bytes_written, 4096)

    def test_write_failure_reported(self) -> None:
        """A WRITE that write() then fails gets its error (T-17), not OK."""
        self.device.now_written = 0
        proto, transport = serve(self.device)
        proto.dataReceived(b.write(1, 0, b"f" * 512))
        self.device.take("write").fail(NBDError(w.Errno.ENOSPC, "disk full"))
        self.assertEqual(simple_replies(transport.value(), {}), [(int(w.Errno.ENOSPC), 1, b"")])

    def test_fua_not_at_once(self) -> None:
        """C-07: a WRITE with FUA is never done by write_now (it must reach stable storage)."""
        proto, transport = serve(self.device)
        proto.dataReceived(b.write(1, 0, b"u" * 512, flags=int(w.CmdFlags.FUA)))
        self.assertNotIn("write_now", [c[0] for c in self.device.now_calls])
        call = self.device.take("write")
        self.assertTrue(call.args["fua"])

    def test_queue_depth_holds(self) -> None:
        """
        Requests the device cannot answer at once count against the queue
        depth: with 3 allowed, a batch of 6 declined WRITEs puts 3 in the
        device and reading stops until one finishes.
        """
        self.device.now_written = 0
        proto, transport = serve(self.device, max_queue_depth=3)
        proto.dataReceived(b"".join(b.write(i, i * 512, b"q" * 512) for i in range(6)))
        self.assertEqual(len(self.device.calls), 3)
        self.assertEqual(proto.in_flight, 3)
        self.assertEqual(transport.producerState, "paused")
        self.device.take("write").succeed(None)
        self.assertEqual(len(self.device.calls), 3)
        for _ in range(5):
            self.device.take("write").succeed(None)
        self.assertEqual(len(simple_replies(transport.value(), {})), 6)
        self.assertEqual(proto.in_flight, 0)
        self.assertEqual(transport.producerState, "producing")


class WireTests(SynchronousTestCase):
    """The read reply head encoder matches the general encoders."""

    def test_modes(self) -> None:
        for structured, extended in ((False, False), (True, False), (True, True)):
            encode = w.read_reply_head_encoder(structured, extended)
            if not structured:
                expected = w.encode_simple_reply(0, 5)
            else:
                expected = w.encode_chunk_header(
                    int(w.ReplyFlags.DONE),
                    int(w.ChunkType.OFFSET_DATA),
                    5,
                    8 + 4096,
                    12288,
                    extended,
                ) + w.encode_offset_data_head(12288)
            self.assertEqual(encode(5, 12288, 4096), expected, (structured, extended))


class FileReadNowTests(SynchronousTestCase):
    """What the file device answers at once, and what it leaves to the pool."""

    def make(self, data: bytes | None) -> FileBlockDevice:
        """A file device on a new 2 MiB image: all C{data}, or all hole."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "disk.img")
        create_image(path, 2 * MiB)
        if data is not None:
            with open(path, "r+b") as f:
                f.write(data)
        device = FileBlockDevice(path, threadpool=ThreadPool(0, 1))
        self.addCleanup(device._really_close)
        return device

    def test_large_read_without_holes(self) -> None:
        """
        A 1 MiB READ of a file without holes that the page cache holds is
        answered at once (no pool round trip), with the file's bytes.
        """
        data = os.urandom(2 * MiB)
        device = self.make(data)
        got = device.read_now(MiB // 2, MiB)
        if device._nowait:
            # Just written, so cached.
            self.assertEqual(bytes(got or b""), data[MiB // 2 : MiB // 2 + MiB])
        else:
            # This kernel or file system cannot read without blocking.
            self.assertIsNone(got)
        self.assertIsNone(device.read_now(0, MiB + 4096), "over the inline maximum")

    def test_large_read_of_sparse_file(self) -> None:
        """T-15: a large READ of a file with holes is left to the sparse path."""
        device = self.make(None)
        self.assertIsNone(device.read_now(0, 512 * 1024))


class SocketTransport(StringTransport):
    """
    A L{StringTransport} with a socket behind it, so that the server
    receives large WRITE payloads from the socket (its C{PayloadReceiver}
    replaces C{doRead}); L{feed} sends there and calls C{doRead} as a
    reactor would.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=ADDRESS)
        self.socket, self.peer = socket.socketpair()
        self.socket.setblocking(False)

    def doRead(self) -> object:  # noqa: N802 - FileDescriptor's name
        raise AssertionError("doRead is only called while a payload is received directly")

    def feed(self, data: bytes) -> None:
        """Send C{data} through the socket, a piece at a time, reading each."""
        for start in range(0, len(data), 65536):
            assert "doRead" in self.__dict__, "the server is not receiving a payload"
            self.peer.sendall(data[start : start + 65536])
            self.doRead()

    def close_sockets(self) -> None:
        self.socket.close()
        self.peer.close()


@implementer(IBlockDevice, IBufferWrite)
class BufferWriteDevice(ControllableBlockDevice):
    """A controllable device whose memory can take payloads (or decline)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.memory = bytearray(size)
        self.decline = False
        self.buffer_calls: list[tuple[int, int]] = []

    def write_buffer(self, offset: int, length: int) -> memoryview | None:
        self.buffer_calls.append((offset, length))
        return None if self.decline else memoryview(self.memory)[offset : offset + length]


class LargeWriteTestCase(SynchronousTestCase):
    """
    Large WRITEs over a L{SocketTransport}, to a device whose C{write} calls
    are recorded (their lengths in C{writes}).
    """

    def setUp(self) -> None:
        self.transport = SocketTransport()
        self.addCleanup(self.transport.close_sockets)
        self.writes: list[int] = []

    def record_writes(self, device: Any) -> None:
        real = device.write

        def write(offset: int, data: Any, fua: bool = False) -> Any:
            self.writes.append(len(data))
            return real(offset, data, fua)

        device.write = write

    def send_write(
        self, proto: NBDServerProtocol, cookie: int, offset: int, payload: bytes, flags: int = 0
    ) -> None:
        """A WRITE: its header and first 1000 payload bytes, then the rest through the socket."""
        message = b.write(cookie, offset, payload, flags=flags)
        head = len(message) - len(payload) + 1000
        proto.dataReceived(message[:head])
        self.transport.feed(message[head:])


class InPlaceWriteTests(LargeWriteTestCase):
    """
    Large WRITE payloads are received straight into the memory of a device
    that provides L{IBufferWrite} (the RAM disk), and every way out of that.
    """

    def ram(self) -> MappedMemoryDevice:
        device = MappedMemoryDevice(4 * MiB)
        self.addCleanup(device.close)
        self.record_writes(device)
        return device

    def test_received_in_place(self) -> None:
        """
        T-12: a 1 MiB WRITE to a RAM disk lands in its memory without a call
        to C{write}; the bytes around it are unchanged, the chunks it
        touches (some in part) are data, and the reply comes once it is all there.
        """
        device = self.ram()
        proto, transport = serve(device, transport=self.transport)
        payload = os.urandom(MiB)
        offset = 100_000  # not on a chunk boundary at either end
        self.send_write(proto, 7, offset, payload)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 7, b"")])
        self.assertEqual(self.writes, [])
        self.assertEqual(bytes(device.read_buffer(offset, MiB)), payload)
        self.assertEqual(bytes(device.read_buffer(0, offset)), bytes(offset))
        self.assertEqual(bytes(device.read_buffer(offset + MiB, 4096)), bytes(4096))
        extents = self.successResultOf(device.block_status(0, 2 * MiB))
        # Data from the chunk the WRITE starts in to the one it ends in.
        chunk = 64 * 1024
        start, end = offset - offset % chunk, -(-(offset + MiB) // chunk) * chunk
        self.assertEqual(
            [(e.length, e.flags) for e in extents],
            [(start, 3), (end - start, 0), (2 * MiB - end, 3)],
        )
        self.assertEqual(proto.info.bytes_written, MiB)
        self.assertNotIn("doRead", transport.__dict__)
        self.assertIsNone(proto._received_in_place)

    def test_read_before_keeps_old_data(self) -> None:
        """
        C-01: a READ of the same bytes answered just before (its reply a
        view of the disk) carries the data as it was, though the WRITE's
        first bytes arrive in the same chunk.
        """
        device = self.ram()
        old = b"o" * 4096
        device.write_now(0, old)
        proto, transport = serve(device, transport=self.transport)
        payload = b"n" * (512 * 1024)
        message = b.read(1, 0, 4096) + b.write(2, 0, payload)
        head = len(message) - len(payload) + 4096
        proto.dataReceived(message[:head])
        self.transport.feed(message[head:])
        proto.dataReceived(b.read(3, 0, 4096))
        replies = simple_replies(transport.value(), {1: 4096, 3: 4096})
        self.assertEqual(replies, [(0, 1, old), (0, 2, b""), (0, 3, payload[:4096])])
        self.assertEqual(self.writes, [])

    def test_fua_through_write(self) -> None:
        """C-07: a WRITE with FUA goes to C{write} (which makes it durable), not in place."""
        device = self.ram()
        proto, transport = serve(device, transport=self.transport)
        payload = os.urandom(512 * 1024)
        self.send_write(proto, 3, 0, payload, flags=int(w.CmdFlags.FUA))
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 3, b"")])
        self.assertEqual(self.writes, [len(payload)])
        self.assertEqual(bytes(device.read_buffer(0, len(payload))), payload)

    def test_observers_through_write(self) -> None:
        """Observers see a request start before its data lands: no receiving in place."""
        device = self.ram()
        proto, transport = serve(device, transport=self.transport, observers=(ServerObserver(),))
        payload = os.urandom(512 * 1024)
        self.send_write(proto, 3, 0, payload)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 3, b"")])
        self.assertEqual(self.writes, [len(payload)])

    def test_not_while_in_flight(self) -> None:
        """
        While an earlier request is still running (it must not see the new
        bytes), the payload goes into a buffer of the server's.
        """
        device = BufferWriteDevice(4 * MiB)
        proto, transport = serve(device, transport=self.transport)
        proto.dataReceived(b.read(1, 0, 4096))
        payload = os.urandom(512 * 1024)
        self.send_write(proto, 2, 0, payload)
        self.assertEqual(device.buffer_calls, [])
        read = device.take("read")
        write = device.take("write")
        self.assertEqual(bytes(write.args["data"]), payload)
        read.succeed(b"r" * 4096)
        write.succeed(None)
        self.assertEqual(
            simple_replies(transport.value(), {1: 4096}), [(0, 1, b"r" * 4096), (0, 2, b"")]
        )
        self.assertEqual(bytes(device.memory[:16]), bytes(16))

    def test_declined(self) -> None:
        """A device that declines (C{None}) gets the payload through C{write}."""
        device = BufferWriteDevice(4 * MiB)
        device.decline = True
        proto, transport = serve(device, transport=self.transport)
        payload = os.urandom(512 * 1024)
        self.send_write(proto, 2, 4096, payload)
        self.assertEqual(device.buffer_calls, [(4096, len(payload))])
        write = device.take("write")
        self.assertEqual((write.args["offset"], bytes(write.args["data"])), (4096, payload))
        write.succeed(None)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 2, b"")])

    def test_in_place_device(self) -> None:
        """The device's view gets the payload; no C{write} call, and the reply is OK."""
        device = BufferWriteDevice(4 * MiB)
        proto, transport = serve(device, transport=self.transport, extended=True)
        payload = os.urandom(300_000)
        message = b.ext_request(
            w.Cmd.WRITE, 5, 8192, len(payload), int(w.CmdFlags.PAYLOAD_LEN), payload
        )
        head = len(message) - len(payload)
        proto.dataReceived(message[:head])
        self.transport.feed(message[head:])
        self.assertEqual(device.calls, [])
        self.assertEqual(bytes(device.memory[8192 : 8192 + len(payload)]), payload)
        done = int(w.ReplyFlags.DONE)
        self.assertEqual(
            b.parse_ext_chunks(transport.value()), [(done, int(w.ChunkType.NONE), 5, 8192, b"")]
        )

    def test_client_vanishes_mid_payload(self) -> None:
        """
        The client going away halfway through a payload received in place:
        no reply, nothing held (the device closes: no view of its memory is
        left), and the range is part new and part old, as a disk that lost
        power in the middle of a write (the WRITE was never acknowledged).
        """
        device = self.ram()
        device.write_now(0, b"o" * MiB)
        proto, transport = serve(device, transport=self.transport)
        payload = b"n" * MiB
        message = b.write(4, 0, payload)
        head = len(message) - len(payload)
        proto.dataReceived(message[:head])
        self.transport.feed(payload[: 256 * 1024])
        proto.connectionLost(Failure(ConnectionDone("gone")))
        self.assertEqual(transport.value(), b"")
        self.assertNotIn("doRead", transport.__dict__)
        self.assertEqual(bytes(device.read_buffer(0, 256 * 1024)), payload[: 256 * 1024])
        self.assertEqual(bytes(device.read_buffer(256 * 1024, 4096)), b"o" * 4096)
        self.assertIsNone(self.successResultOf(device.close()))


@implementer(IBlockDevice, IPipeWrite)
class PipeWriteDevice(ControllableBlockDevice):
    """
    A controllable device that takes payloads from pipes: each
    C{write_from_pipe} call is recorded, and answered as C{pipe_answer}
    says: C{"move"} reads the payload into C{memory} and succeeds;
    C{"fail"} fails with ENOSPC, leaving the pipe full; C{"wait"} returns a
    Deferred (in C{waiting}) that L{finish} fires after moving the payload.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.memory = bytearray(size)
        self.pipe_answer = "move"
        self.pipe_calls: list[tuple[int, int, bool]] = []
        self.waiting: list[tuple[Deferred[None], int, int, int]] = []

    def move(self, source: int, offset: int, length: int) -> None:
        got = 0
        while got < length:
            piece = os.read(source, length - got)
            self.memory[offset + got : offset + got + len(piece)] = piece
            got += len(piece)

    def write_from_pipe(self, source: int, offset: int, length: int, fua: bool) -> Deferred[None]:
        self.pipe_calls.append((offset, length, fua))
        if self.pipe_answer == "fail":
            return fail(NBDError(Errno.ENOSPC, "full"))
        if self.pipe_answer == "wait":
            d: Deferred[None] = Deferred()
            self.waiting.append((d, source, offset, length))
            return d
        self.move(source, offset, length)
        return succeed(None)

    def finish(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, source, offset, length in waiting:
            self.move(source, offset, length)
            d.callback(None)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class PipeWriteTests(LargeWriteTestCase):
    """
    Large WRITE payloads are spliced from the socket into a pipe for a
    device that provides L{IPipeWrite} (a file), and every way out of that.
    """

    def setUp(self) -> None:
        if not hasattr(os, "splice") or not os.path.isdir("/proc/self/fd"):
            raise SkipTest("splice is Linux's")
        super().setUp()

    def file(self) -> FileBlockDevice:
        """A 4 MiB file device that writes inline, its C{write} calls recorded."""
        path = self.mktemp()
        create_image(path, 4 * MiB)
        device = FileBlockDevice(path)
        self.addCleanup(device.close)
        device._write_nowait = False
        guard = DirtyPageGuard()
        guard.allows = lambda: True  # type: ignore[method-assign]
        device._dirty = guard
        # No write counts as slow (which would send the next to the pool).
        device._now = lambda: 0.0
        self.path = path
        self.record_writes(device)
        return device

    def contents(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def test_file_write_through_pipe(self) -> None:
        """
        T-12: a 1 MiB WRITE to a file is spliced into a pipe and moved to
        the file by the device, with no call to C{write}; the bytes around
        it are unchanged; the next one reuses the pipe.
        """
        device = self.file()
        proto, transport = serve(device, transport=self.transport)
        receiver = proto._receiver
        assert receiver is not None
        first, second = os.urandom(MiB), os.urandom(MiB)
        self.send_write(proto, 1, 4096, first)
        pipes = list(receiver._spare_pipes)
        self.send_write(proto, 2, 4096 + MiB, second)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 1, b""), (0, 2, b"")])
        self.assertEqual(self.writes, [])
        self.assertEqual(
            self.contents(0, 2 * MiB + 8192), bytes(4096) + first + second + bytes(4096)
        )
        self.assertEqual(len(pipes), 1)
        self.assertEqual(receiver._spare_pipes, pipes)
        self.assertEqual(receiver.pipe_fallbacks, 0)
        self.assertEqual(proto.info.bytes_written, 2 * MiB)
        self.assertNotIn("doRead", transport.__dict__)

    def test_pipe_out_of_slots(self) -> None:
        """
        A client sending in small pieces fills the pipe's slots before its
        bytes: the server goes on with a payload buffer, in order (what the
        pipe holds, then the rest), and the WRITE lands through C{write}.
        """
        device = self.file()
        proto, transport = serve(device, transport=self.transport)
        receiver = proto._receiver
        assert receiver is not None
        payload = os.urandom(MiB)
        message = b.write(3, 0, payload)
        head = len(message) - len(payload) + 1000
        proto.dataReceived(message[:head])
        peer = self.transport.peer
        peer.setblocking(False)
        rest = memoryview(message)[head:]
        # Unix-socket buffers of 512 bytes each: one pipe slot each.
        position = 0
        for _ in range(100_000):
            if position == len(rest):
                break
            try:
                position += peer.send(rest[position : position + 512])
            except BlockingIOError:
                transport.doRead()  # type: ignore[attr-defined]
        for _ in range(100):
            if "doRead" not in transport.__dict__:
                break
            transport.doRead()  # type: ignore[attr-defined]
        self.assertEqual(receiver.pipe_fallbacks, 1)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 3, b"")])
        self.assertEqual(self.writes, [MiB])
        self.assertEqual(self.contents(0, MiB), payload)
        # The emptied pipe is kept for the next payload.
        self.assertEqual(len(receiver._spare_pipes), 1)

    def test_client_vanishes_mid_payload(self) -> None:
        """
        The client going away halfway through a spliced payload: no reply,
        the file untouched (unlike a RAM disk's in-place receive, nothing
        is written before the whole payload is there), and no descriptor
        left open.
        """
        device = self.file()
        proto, transport = serve(device, transport=self.transport)
        before = open_fds()
        message = b.write(4, 0, b"n" * MiB)
        proto.dataReceived(message[:1000])
        self.transport.feed(message[1000 : 300 * 1024])
        proto.connectionLost(Failure(ConnectionDone("gone")))
        self.assertEqual(transport.value(), b"")
        self.assertNotIn("doRead", transport.__dict__)
        self.assertEqual(self.contents(0, MiB), bytes(MiB))
        self.assertEqual(open_fds(), before)

    def test_lost_with_payload_waiting(self) -> None:
        """
        A payload received into its pipe while the server may not start
        work (here the transport's send buffer is full), and then the client
        gone before its WRITE started: that pipe is closed too.
        """
        device = PipeWriteDevice(4 * MiB)
        proto, transport = serve(device, transport=self.transport)
        before = open_fds()
        message = b.write(2, 0, os.urandom(512 * 1024))
        proto.dataReceived(message[:1000])
        proto.pauseProducing()
        self.transport.feed(message[1000:])
        self.assertEqual(device.pipe_calls, [])
        self.assertIsNotNone(proto._piped)
        proto.connectionLost(Failure(ConnectionDone("gone")))
        self.assertEqual(device.pipe_calls, [])
        self.assertEqual(open_fds(), before)

    def test_device_fails(self) -> None:
        """
        A device that fails gets its error sent (ENOSPC); the pipe it left
        bytes in is closed, not reused; the next WRITE gets a new one.
        """
        device = PipeWriteDevice(4 * MiB)
        device.pipe_answer = "fail"
        proto, transport = serve(device, transport=self.transport)
        receiver = proto._receiver
        assert receiver is not None
        before = open_fds()
        self.send_write(proto, 5, 0, os.urandom(512 * 1024))
        self.assertEqual(simple_replies(transport.value(), {}), [(int(Errno.ENOSPC), 5, b"")])
        self.assertEqual((receiver._pipes, receiver._spare_pipes, open_fds()), (0, [], before))
        transport.clear()
        device.pipe_answer = "move"
        payload = os.urandom(512 * 1024)
        self.send_write(proto, 6, 0, payload)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 6, b"")])
        self.assertEqual(bytes(device.memory[: len(payload)]), payload)

    def test_pipes_capped(self) -> None:
        """
        While the device still moves payloads out of PIPES_MAX pipes, the
        next payload goes into a buffer and through C{write}; once they are
        done, the pipes are kept for reuse. FUA reaches the device.
        """
        device = PipeWriteDevice(8 * MiB)
        device.pipe_answer = "wait"
        proto, transport = serve(device, transport=self.transport)
        receiver = proto._receiver
        assert receiver is not None
        payloads = [os.urandom(512 * 1024 + 4096) for _ in range(PIPES_MAX + 1)]
        for i, payload in enumerate(payloads):
            flags = int(w.CmdFlags.FUA) if i == 0 else 0
            self.send_write(proto, i, i * MiB, payload, flags=flags)
        self.assertEqual(
            device.pipe_calls,
            [(i * MiB, len(payloads[i]), i == 0) for i in range(PIPES_MAX)],
        )
        write = device.take("write")
        self.assertEqual(
            (write.args["offset"], bytes(write.args["data"])), (PIPES_MAX * MiB, payloads[-1])
        )
        write.succeed(None)
        device.finish()
        self.assertEqual(
            sorted(r[1] for r in simple_replies(transport.value(), {})), list(range(PIPES_MAX + 1))
        )
        for i in range(PIPES_MAX):
            self.assertEqual(
                bytes(device.memory[i * MiB : i * MiB + len(payloads[i])]), payloads[i]
            )
        self.assertEqual((receiver._pipes, len(receiver._spare_pipes)), (PIPES_MAX, PIPES_MAX))

    def test_observers_through_write(self) -> None:
        """With observers (who may look at a WRITE's data), payloads go into buffers."""
        device = self.file()
        proto, transport = serve(device, transport=self.transport, observers=(ServerObserver(),))
        payload = os.urandom(512 * 1024)
        self.send_write(proto, 7, 0, payload)
        self.assertEqual(simple_replies(transport.value(), {}), [(0, 7, b"")])
        self.assertEqual(self.writes, [len(payload)])
        self.assertEqual(self.contents(0, len(payload)), payload)


class StreamTestCase(LargeWriteTestCase):
    """
    Large WRITEs waiting whole in the socket behind one received as usual
    (see L{NBDServerProtocol._stream_writes}), to the device
    L{make_device} gives. Payloads here are 32 KiB (the thresholds are
    lowered to that), so that several fit in a socket pair's buffer.
    """

    SIZE = 32 * 1024
    #: The receiver's method that takes a streamed payload.
    streamed_by = "splice_waiting"

    def make_device(self) -> Any:
        return PipeWriteDevice(16 * MiB)

    def setUp(self) -> None:
        if not hasattr(os, "splice") or not os.path.isdir("/proc/self/fd"):
            raise SkipTest("splice is Linux's")
        super().setUp()
        self.patch(protocol_module, "PIPE_PAYLOAD_MIN", self.SIZE)
        self.patch(protocol_module, "DIRECT_PAYLOAD_MIN", self.SIZE // 2)
        self.device = self.make_device()
        self.proto, self.out = serve(self.device, transport=self.transport)
        receiver = self.proto._receiver
        assert receiver is not None
        self.receiver = receiver
        self.streamed = count_calls(receiver, self.streamed_by)
        self.payloads: dict[int, bytes] = {}

    def message(self, cookie: int, flags: int = 0, length: int = SIZE) -> bytes:
        """A WRITE of a new random payload at C{cookie} MiB."""
        payload = self.payloads[cookie] = os.urandom(length)
        return b.write(cookie, cookie * MiB, payload, flags=flags)

    def start(self, *rest: bytes) -> None:
        """
        WRITE 1: its header and first 1000 bytes through C{dataReceived};
        the rest of it, then C{rest}, into the socket at once; then one
        C{doRead}, as the reactor's, which receives what WRITE 1 lacks.
        """
        first = self.message(1)
        head = len(first) - self.SIZE + 1000
        self.proto.dataReceived(first[:head])
        self.send(first[head:] + b"".join(rest))
        self.transport.doRead()

    def send(self, data: bytes) -> None:
        """Into the socket, all of it, without blocking."""
        self.transport.peer.setblocking(False)
        self.assertEqual(self.transport.peer.send(data), len(data))

    def reactor_reads(self) -> None:
        """What the reactor does when the socket is readable."""
        if "doRead" in self.transport.__dict__:
            self.transport.doRead()
        else:
            # The transport's own doRead.
            self.proto.dataReceived(self.transport.socket.recv(MiB))

    def replies(self) -> list[tuple[int, int, bytes]]:
        return simple_replies(self.out.value(), {})

    def landed(self, *cookies: int) -> None:
        """The payloads of these WRITEs are in the device's memory."""
        for cookie in cookies:
            start = cookie * MiB
            self.assertEqual(
                bytes(self.device.memory[start : start + len(self.payloads[cookie])]),
                self.payloads[cookie],
            )


class StreamWriteTests(StreamTestCase):
    """
    Large WRITEs that wait whole in the socket are taken straight from it,
    one after another (L{NBDServerProtocol._stream_writes}): header by
    header, each payload spliced into a pipe at once; and every way out.
    """

    def test_whole_writes_streamed(self) -> None:
        """
        T-12: three WRITEs waiting whole behind the first are served
        without another turn of the reactor, each payload spliced at once
        into a pipe (the same one, reused); FUA reaches the device.
        """
        fua = int(w.CmdFlags.FUA)
        self.start(self.message(2), self.message(3, fua), self.message(4))
        self.assertEqual(self.replies(), [(0, c, b"") for c in (1, 2, 3, 4)])
        self.assertEqual(
            self.device.pipe_calls,
            [(c * MiB, self.SIZE, c == 3) for c in (1, 2, 3, 4)],
        )
        self.landed(1, 2, 3, 4)
        self.assertEqual(self.streamed, [3])
        self.assertEqual((self.receiver._pipes, len(self.receiver._spare_pipes)), (1, 1))
        self.assertEqual(self.receiver.waiting(), 0)
        self.assertNotIn("doRead", self.transport.__dict__)
        self.assertEqual(self.proto.info.bytes_written, 4 * self.SIZE)

    def test_other_request_passed_on(self) -> None:
        """
        T-12: a request that is not a large plain WRITE ends the stream: it
        is parsed as usual (here a READ, answered when the device answers).
        """
        self.start(self.message(2), b.read(9, 0, 4096), self.message(3))
        self.assertEqual(self.streamed, [1])
        read = self.device.take("read")
        self.assertEqual((read.args["offset"], read.args["length"]), (0, 4096))
        read.succeed(b"r" * 4096)
        replies = simple_replies(self.out.value(), {9: 4096})
        self.assertEqual(replies, [(0, 1, b""), (0, 2, b""), (0, 9, b"r" * 4096)])
        # WRITE 3 waits in the socket for the reactor, and goes the usual way.
        self.out.clear()
        self.reactor_reads()
        write = self.device.take("write")
        self.assertEqual(bytes(write.args["data"]), self.payloads[3])
        write.succeed(None)
        self.assertEqual(self.replies(), [(0, 3, b"")])
        self.landed(1, 2)

    def test_small_write_passed_on(self) -> None:
        """A WRITE below the threshold is parsed as usual, through C{write}."""
        self.record_writes(self.device)
        self.start(self.message(2, length=4096))
        self.assertEqual(self.streamed, [0])
        # Its payload waits in the socket, for the transport's own doRead.
        self.reactor_reads()
        self.device.take("write").succeed(None)
        self.assertEqual(self.replies(), [(0, 1, b""), (0, 2, b"")])
        self.assertEqual(self.writes, [4096])

    def test_write_not_all_there(self) -> None:
        """
        A WRITE whose payload has not all arrived is not taken from the
        socket: its header goes to the parser, and its payload is received
        as before once the rest comes.
        """
        second = self.message(2)
        self.start(second[:5000])
        self.assertEqual(self.streamed, [0])
        self.assertEqual(self.replies(), [(0, 1, b"")])
        self.assertIn("doRead", self.transport.__dict__)
        self.out.clear()
        self.send(second[5000:])
        self.transport.doRead()
        self.assertEqual(self.replies(), [(0, 2, b"")])
        self.landed(1, 2)

    def test_writes_in_flight(self) -> None:
        """
        WRITEs that the device finishes later stay in flight while the
        stream goes on, until every pipe is in use; the rest waits in the
        socket, and is taken as soon as a WRITE ends and frees its pipe.
        """
        self.device.pipe_answer = "wait"
        cookies = range(2, PIPES_MAX + 3)
        self.start(*(self.message(c) for c in cookies))
        self.assertEqual(len(self.device.waiting), PIPES_MAX)
        self.assertEqual(self.streamed, [PIPES_MAX - 1])
        self.assertEqual(self.replies(), [])
        self.assertEqual(self.proto.in_flight, PIPES_MAX)
        self.assertEqual(self.receiver.waiting(), 2 * len(b.write(0, 0, bytes(self.SIZE))))
        self.device.pipe_answer = "move"
        self.device.finish()
        self.assertEqual(sorted(r[1] for r in self.replies()), list(range(1, PIPES_MAX + 3)))
        self.landed(*range(1, PIPES_MAX + 3))
        self.assertEqual(self.proto.in_flight, 0)
        self.assertEqual(self.receiver.waiting(), 0)

    def test_queue_depth(self) -> None:
        """
        The stream stops where the queue depth says, and reading is paused
        (the transport's producer) until the WRITEs in flight end.
        """
        self.proto.max_queue_depth = 2
        self.device.pipe_answer = "wait"
        self.start(self.message(2), self.message(3))
        self.assertEqual((self.proto.in_flight, self.streamed), (2, [1]))
        self.assertEqual(self.transport.producerState, "paused")
        self.device.pipe_answer = "move"
        self.device.finish()
        self.assertEqual(sorted(r[1] for r in self.replies()), [1, 2, 3])
        self.landed(1, 2, 3)

    def test_receiving_fails(self) -> None:
        """A payload the socket cannot give after all drops the client, no pipe left open."""
        before = open_fds()

        def broken(length: int) -> PipedPayload | None:
            raise ConnectionResetError("reset")

        self.receiver.splice_waiting = broken  # type: ignore[method-assign]
        self.start(self.message(2))
        self.assertEqual(self.replies(), [(0, 1, b"")])
        self.assertTrue(self.proto._closed)
        self.assertIn("reset", self.proto._lost_reason or "")
        self.proto.connectionLost(Failure(ConnectionDone("aborted")))
        self.assertEqual(open_fds(), before)


class StreamInPlaceTests(StreamTestCase):
    """
    The same for a device that takes payloads into its memory
    (L{IBufferWrite}, the RAM disk): each streamed payload is received
    straight into it, under L{NBDServerProtocol._in_place_view}'s rules.
    """

    streamed_by = "receive_waiting"

    def make_device(self) -> Any:
        return BufferWriteDevice(16 * MiB)

    def test_whole_writes_streamed(self) -> None:
        """
        T-12: WRITEs waiting whole behind the first land in the device's
        memory without another turn of the reactor or a call to C{write};
        a FUA one (which the device's C{write} must sync) is passed on.
        """
        self.record_writes(self.device)
        fua = int(w.CmdFlags.FUA)
        self.start(self.message(2), self.message(3), self.message(4, fua))
        self.assertEqual(self.replies(), [(0, c, b"") for c in (1, 2, 3)])
        self.assertEqual(self.streamed, [2])
        self.assertEqual(self.writes, [])
        self.landed(1, 2, 3)
        self.assertIsNone(self.proto._received_in_place)
        self.reactor_reads()
        write = self.device.take("write")
        self.assertEqual((bytes(write.args["data"]), write.args["fua"]), (self.payloads[4], True))
        write.succeed(None)
        self.assertEqual(self.replies()[3:], [(0, 4, b"")])

    def test_not_while_in_flight(self) -> None:
        """
        With a request in flight (which must not see the new bytes), a
        WRITE waiting whole is passed on, and lands through C{write}.
        """
        self.record_writes(self.device)
        self.proto.dataReceived(b.read(9, 0, 4096))
        self.start(self.message(2))
        self.assertEqual(self.streamed, [0])
        self.reactor_reads()
        self.assertEqual(self.writes, [self.SIZE, self.SIZE])
        self.device.take("read").succeed(b"r" * 4096)
        for cookie in (1, 2):
            write = self.device.take("write")
            self.assertEqual(bytes(write.args["data"]), self.payloads[cookie])
            write.succeed(None)
        replies = simple_replies(self.out.value(), {9: 4096})
        self.assertEqual(sorted(r[1] for r in replies), [1, 2, 9])


class SpliceWaitingTests(SynchronousTestCase):
    """L{PayloadReceiver.splice_waiting}'s ways out."""

    def setUp(self) -> None:
        if not hasattr(os, "splice") or not os.path.isdir("/proc/self/fd"):
            raise SkipTest("splice is Linux's")
        self.transport = SocketTransport()
        self.addCleanup(self.transport.close_sockets)
        self.receiver = PayloadReceiver(self.transport)
        self.addCleanup(self.receiver.stop)

    def small_pipe(self) -> None:
        """Pipes of one slot: one piece of socket buffer fills them."""
        real = self.receiver.pipe

        def pipe() -> tuple[int, int] | None:
            made = real()
            assert made is not None
            fcntl.fcntl(made[1], 1031, 4096)  # F_SETPIPE_SZ
            return made

        self.receiver.pipe = pipe  # type: ignore[method-assign]

    def test_pipe_out_of_slots(self) -> None:
        """
        Bytes sent in three pieces and a pipe of one slot: all of them come
        back in a buffer, in order (what the pipe took first), and the
        pipe, emptied, is kept.
        """
        self.small_pipe()
        pieces = [os.urandom(1000) for _ in range(3)]
        for piece in pieces:
            self.transport.peer.send(piece)
        got = self.receiver.splice_waiting(3000)
        self.assertIsInstance(got, bytearray)
        self.assertEqual(bytes(cast(bytearray, got)), b"".join(pieces))
        self.assertEqual(self.receiver.pipe_fallbacks, 1)
        self.assertEqual(len(self.receiver._spare_pipes), 1)
        self.assertEqual(self.receiver.received, 3000)

    def test_fewer_bytes_than_said(self) -> None:
        """
        A peer that closed after fewer bytes than asked: an error, and the
        pipe (holding some of them) closed, not kept.
        """
        before = open_fds()
        self.transport.peer.sendall(b"x" * 1000)
        self.transport.peer.shutdown(socket.SHUT_WR)
        self.assertRaises(ConnectionError, self.receiver.splice_waiting, 3000)
        self.assertEqual((self.receiver._pipes, self.receiver._spare_pipes), (0, []))
        self.assertEqual(open_fds(), before)

    def test_all_there(self) -> None:
        """The usual case: one pipe holding the bytes, in order."""
        data = os.urandom(64 * 1024)
        self.transport.peer.sendall(data)
        self.assertEqual(self.receiver.waiting(), len(data))
        got = self.receiver.splice_waiting(len(data))
        self.assertIsInstance(got, PipedPayload)
        payload = cast(PipedPayload, got)
        self.assertEqual(len(payload), len(data))
        out = b""
        while len(out) < len(data):
            out += os.read(payload.source, len(data))
        self.assertEqual(out, data)
        self.receiver.return_pipe(payload.pipe, True)
        self.assertEqual(self.receiver.waiting(), 0)
