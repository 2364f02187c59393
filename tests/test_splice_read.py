"""
Tests for spliced READs: a large READ from a page-cached file goes from the
page cache through a pipe to the socket without a copy in the server
(L{twisted_nbd.interfaces.IPipeRead}, L{ReplyWriter.piped_read}), and each
case where that cannot be done (a page not cached, no cachestat, a file that
shrank, a full socket, bytes queued in the transport, TLS) falls back to a
copy with the same bytes in the same order.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
from typing import Any, cast
from unittest import SkipTest

from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import builders as b
from tests.test_transport import (
    AllowingGuard,
    FakeTCPTransport,
    PollingTransport,
    drain,
    socket_pair,
    waiting,
)
from twisted_nbd import _transport
from twisted_nbd import _wire as w
from twisted_nbd._transport import (
    PIPE_READ_MIN,
    PIPE_SIZE,
    PipedRead,
    ReplyWriter,
    _drain,
    _new_pipe,
)
from twisted_nbd.backends.file import FileBlockDevice, cached_pages
from twisted_nbd.client import connect
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import IPipeRead
from twisted_nbd.protocol import _NOT_TAKEN, _TAKEN, NBDServerFactory, NBDServerProtocol

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB


def splice_or_skip() -> None:
    """Skip where the kernel has no splice or no cachestat (Linux 6.5+)."""
    if not hasattr(os, "splice"):
        raise SkipTest("splice is Linux's")
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        cached_pages(fd, 0, 1)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM):
            raise SkipTest(f"no cachestat here: {e}") from e
    finally:
        os.close(fd)


def dense_file(case: SynchronousTestCase, size: int = SIZE) -> tuple[str, bytes]:
    """
    A file of C{size} random bytes, every block allocated and, having just
    been written, in the page cache.

    @return: its path and its bytes.
    """
    data = random.Random(size).randbytes(size)
    path = case.mktemp()
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def new_pipe(case: SynchronousTestCase) -> tuple[int, int]:
    """An empty non-blocking pipe of L{PIPE_SIZE} bytes, closed after the test."""
    pipe = _new_pipe()
    assert pipe is not None
    case.addCleanup(os.close, pipe[0])
    case.addCleanup(os.close, pipe[1])
    return pipe


class ReadToPipeTests(SynchronousTestCase):
    """L{FileBlockDevice.read_to_pipe} (L{IPipeRead})."""

    def setUp(self) -> None:
        splice_or_skip()
        self.path, self.data = dense_file(self)
        self.device = FileBlockDevice(self.path)
        self.addCleanup(self.device.close)
        self.assertFalse(self.device._maybe_sparse)
        self.pipe = new_pipe(self)

    def test_provides(self) -> None:
        self.assertTrue(IPipeRead.providedBy(self.device))

    def test_cached_range_moved(self) -> None:
        """
        A cached range, pages only partly covered at both ends, is moved
        whole: the pipe holds exactly those bytes.
        """
        offset, length = 3 * 4096 + 5, 300 * KiB + 7
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], offset, length), length)
        self.assertEqual(_drain(self.pipe[0], length), self.data[offset : offset + length])
        self.assertEqual(waiting(self.pipe[0]), 0)

    def test_whole_pipe(self) -> None:
        """As much as the pipe holds (1 MiB) in one call."""
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], MiB, PIPE_SIZE), PIPE_SIZE)
        self.assertEqual(_drain(self.pipe[0], PIPE_SIZE), self.data[MiB : MiB + PIPE_SIZE])

    def test_page_not_cached(self) -> None:
        """
        One page of the range missing from the page cache: declined (a
        splice would wait for the disk), nothing moved. The pages counted
        are those of the range, partial ones at either end included.
        """
        asked: list[tuple[int, int]] = []

        def one_short(fd: int, offset: int, length: int) -> int:
            asked.append((offset, length))
            return cached_pages(fd, offset, length) - 1

        self.device._cached_pages = one_short
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 4095, 128 * KiB), 0)
        self.assertEqual(asked, [(4095, 128 * KiB)])
        self.assertEqual(waiting(self.pipe[0]), 0)
        # The real count (33 pages here) is enough.
        self.device._cached_pages = cached_pages
        self.assertEqual(cached_pages(self.device._fd, 4095, 128 * KiB), 33)
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 4095, 128 * KiB), 128 * KiB)

    def test_evicted(self) -> None:
        """A range really dropped from the page cache is declined."""
        fd = self.device._fd
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached_pages(fd, 2 * MiB, MiB):
            raise SkipTest("the kernel kept the pages cached")
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 2 * MiB, MiB), 0)
        self.assertEqual(waiting(self.pipe[0]), 0)

    def test_no_cachestat(self) -> None:
        """Without cachestat (an older kernel): declined, and never asked again."""
        calls: list[int] = []

        def missing(fd: int, offset: int, length: int) -> int:
            calls.append(offset)
            raise OSError(errno.ENOSYS, "no cachestat")

        self.device._cached_pages = missing
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 0, 128 * KiB), 0)
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 0, 128 * KiB), 0)
        self.assertEqual(calls, [0])

    def test_sparse(self) -> None:
        """A file that may have holes: declined (the server may answer sparsely)."""
        self.device._maybe_sparse = True
        self.device._cached_pages = cast(Any, None)  # never called
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 0, 128 * KiB), 0)

    def test_past_the_end(self) -> None:
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], SIZE - 4096, 8192), 0)

    def test_file_shrank(self) -> None:
        """
        The file ends early (it shrank after the server checked the range):
        the bytes there are moved and counted, so the server can tell.
        """
        os.truncate(self.path, SIZE - 64 * KiB)
        self.device._cached_pages = lambda fd, offset, length: 1 << 30
        moved = self.device.read_to_pipe(self.pipe[1], SIZE - 128 * KiB, 128 * KiB)
        self.assertEqual(moved, 64 * KiB)

    def test_splice_refused(self) -> None:
        """A file system that cannot splice: declined, and never tried again."""
        calls: list[int] = []

        def refuse(*args: Any, **kwargs: Any) -> int:
            calls.append(1)
            raise OSError(errno.EINVAL, "no splice here")

        self.device._splice = refuse
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 0, 128 * KiB), 0)
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 0, 128 * KiB), 0)
        self.assertEqual(calls, [1])

    def test_pipe_full(self) -> None:
        """
        A pipe that is not empty (a server's bug) never blocks the call:
        what fits is moved and counted.
        """
        os.write(self.pipe[1], b"x" * (PIPE_SIZE - 64 * KiB))
        moved = self.device.read_to_pipe(self.pipe[1], 0, 128 * KiB)
        self.assertLess(moved, 128 * KiB)

    def test_closing(self) -> None:
        self.device.close()
        self.assertEqual(self.device.read_to_pipe(self.pipe[1], 0, 128 * KiB), 0)


class PipedReplyTests(SynchronousTestCase):
    """
    L{ReplyWriter.piped_read} and L{ReplyWriter.write} with a L{PipedRead}
    last: spliced to the socket when it can be, else read out of the pipe
    and queued, always whole and in order, the pipe empty afterwards.
    """

    def setUp(self) -> None:
        splice_or_skip()
        self.ours, self.theirs = socket_pair(self)
        self.transport = FakeTCPTransport(self.ours)
        self.writer = ReplyWriter(self.transport)
        self.addCleanup(self.writer.close)
        path, self.data = dense_file(self)
        self.fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, self.fd)

    def fill(self, sink: int, offset: int, length: int) -> int:
        """A device's read_to_pipe: splice straight from the file."""
        return os.splice(self.fd, sink, length, offset_src=offset)

    def piped(self, offset: int, length: int) -> PipedRead:
        piped = self.writer.piped_read(self.fill, offset, length)
        assert isinstance(piped, PipedRead)
        self.assertEqual(len(piped), length)
        return piped

    def received(self) -> bytes:
        """What the client gets: what reached the socket, then what was queued."""
        return drain(self.theirs) + b"".join(self.transport.queued)

    def assertEmptyPipe(self, piped: PipedRead) -> None:  # noqa: N802 - trial's style
        self.assertEqual(waiting(piped.pipe[0]), 0)

    def test_spliced(self) -> None:
        """With room in the socket, all of it goes there; nothing is queued."""
        self.assertTrue(self.writer.splice)
        piped = self.piped(4096, 64 * KiB)
        self.writer.write([b"head", b"more", piped])
        self.assertEqual(self.transport.queued, [])
        self.assertEqual(self.writer.splice_fallbacks, 0)
        self.assertEqual(drain(self.theirs), b"headmore" + self.data[4096 : 4096 + 64 * KiB])
        self.assertEmptyPipe(piped)
        # The pipe is reused.
        again = self.piped(0, 64 * KiB)
        self.assertEqual(again.pipe, piped.pipe)
        self.writer.write([again])
        self.assertEqual(drain(self.theirs), self.data[: 64 * KiB])

    def test_socket_full(self) -> None:
        """
        The socket takes part of the payload: the rest is read out of the
        pipe and queued, behind what was sent.
        """
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        piped = self.piped(0, MiB)
        self.writer.write([b"H" * 16, piped])
        self.assertTrue(self.transport.queued)
        self.assertEqual(self.writer.splice_fallbacks, 1)
        self.assertEmptyPipe(piped)
        self.assertEqual(self.received(), b"H" * 16 + self.data[:MiB])

    def test_head_not_sent(self) -> None:
        """
        The socket cannot take even the pieces before the payload: those
        and the payload are queued, in order.
        """
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        junk = b""
        while True:
            try:
                sent = self.ours.send(b"j" * 4096)
            except BlockingIOError:
                break
            junk += b"j" * sent
        piped = self.piped(0, 128 * KiB)
        self.writer.write([b"head" * 1000, piped])
        self.assertEqual(self.writer.splice_fallbacks, 1)
        self.assertEmptyPipe(piped)
        self.assertEqual(self.received(), junk + b"head" * 1000 + self.data[: 128 * KiB])

    def test_queued_first(self) -> None:
        """
        Bytes already queued in the transport: the reply queues behind them,
        payload read out of the pipe, so nothing overtakes.
        """
        self.transport._tempDataLen = 1
        piped = self.piped(0, 64 * KiB)
        self.writer.write([memoryview(b"head"), piped])
        self.assertEqual(self.transport.queued, [b"head", self.data[: 64 * KiB]])
        self.assertEqual(drain(self.theirs), b"")
        self.assertEmptyPipe(piped)

    def test_peer_gone(self) -> None:
        """A send error: the data goes to the transport, which finds the error itself."""
        self.theirs.close()
        piped = self.piped(0, 64 * KiB)
        self.writer.write([b"head", piped])
        self.assertEqual(b"".join(self.transport.queued), b"head" + self.data[: 64 * KiB])
        self.assertEmptyPipe(piped)

    def test_splice_fails(self) -> None:
        """
        The splice to the socket fails (the header went): the payload is
        queued after it.
        """

        def fail(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.EPIPE, "broken")

        piped = self.piped(0, 64 * KiB)
        self.patch(_transport, "_SPLICE", fail)
        self.writer.write([b"head", piped])
        self.assertEqual(self.writer.splice_fallbacks, 1)
        self.assertEqual(self.received(), b"head" + self.data[: 64 * KiB])

    def test_declined(self) -> None:
        """A device that moves nothing: C{None}, the pipe kept."""
        self.assertIsNone(self.writer.piped_read(lambda sink, offset, length: 0, 0, 64 * KiB))
        pipe = self.writer._pipe
        self.assertIsNotNone(pipe)
        self.assertEqual(self.piped(0, 64 * KiB).pipe, pipe)

    def test_partly_moved(self) -> None:
        """
        A device that moves part: C{None}, and that pipe is closed, so the
        next payload starts in an empty one.
        """

        def half(sink: int, offset: int, length: int) -> int:
            return self.fill(sink, offset, length // 2)

        self.assertIsNone(self.writer.piped_read(half, 0, 64 * KiB))
        self.assertIsNone(self.writer._pipe)
        piped = self.piped(MiB, 64 * KiB)
        self.writer.write([piped])
        self.assertEqual(drain(self.theirs), self.data[MiB : MiB + 64 * KiB])

    def test_device_raises(self) -> None:
        """
        A device that raises (against the interface) after moving some
        bytes: C{None}, and that pipe is closed, never sent from.
        """

        def broken(sink: int, offset: int, length: int) -> int:
            self.fill(sink, offset, 4096)
            raise RuntimeError("oops")

        self.assertIsNone(self.writer.piped_read(broken, 0, 64 * KiB))
        self.assertIsNone(self.writer._pipe)
        self.writer.write([self.piped(0, 64 * KiB)])
        self.assertEqual(drain(self.theirs), self.data[: 64 * KiB])

    def test_too_large(self) -> None:
        """
        More pages than the pipe has slots are never offered to the device:
        more than 1 MiB, or 1 MiB that does not start on a page.
        """
        self.assertIsNone(self.writer.piped_read(cast(Any, None), 0, PIPE_SIZE + 1))
        self.assertIsNone(self.writer.piped_read(cast(Any, None), 512, PIPE_SIZE))
        self.assertIsNotNone(self.writer.piped_read(self.fill, 4096, PIPE_SIZE))

    def test_no_large_pipes(self) -> None:
        """The kernel refuses pipes of PIPE_SIZE: no splicing on this connection."""

        def refuse() -> Any:
            raise PermissionError("over the pipe memory limit")

        self.patch(_transport, "_new_pipe", refuse)
        self.assertIsNone(self.writer.piped_read(self.fill, 0, 64 * KiB))
        self.assertFalse(self.writer.splice)

    def test_out_of_descriptors(self) -> None:
        """No descriptors for a pipe now: not this time, but later again."""
        self.patch(_transport, "_new_pipe", lambda: None)
        self.assertIsNone(self.writer.piped_read(self.fill, 0, 64 * KiB))
        self.assertTrue(self.writer.splice)

    def test_not_a_socket(self) -> None:
        """TLS and fakes: no splicing."""
        writer = ReplyWriter(StringTransport())
        self.assertFalse(writer.splice)
        self.assertIsNone(writer.piped_read(self.fill, 0, 64 * KiB))

    def test_stop_direct(self) -> None:
        """Switching to TLS closes the pipe and ends splicing."""
        pipe = self.piped(0, 64 * KiB).pipe
        drain_bytes = _drain(pipe[0], 64 * KiB)
        self.assertEqual(drain_bytes, self.data[: 64 * KiB])
        self.writer.stop_direct()
        self.assertFalse(self.writer.splice)
        self.assertRaises(OSError, os.fstat, pipe[0])
        self.assertRaises(OSError, os.fstat, pipe[1])
        self.assertIsNone(self.writer.piped_read(self.fill, 0, 64 * KiB))

    def test_close(self) -> None:
        """C{close} closes the pipe; twice is harmless."""
        pipe = self.piped(0, 64 * KiB).pipe
        self.writer.close()
        self.writer.close()
        self.assertRaises(OSError, os.fstat, pipe[0])


class QueueingTransport(PollingTransport):
    """A L{PollingTransport} that queues what it is given, as Twisted's does."""

    writeSequence = FakeTCPTransport.writeSequence  # noqa: N815 - Twisted's name

    def loseConnection(self) -> None:  # noqa: N802
        pass


class SplicedServerTests(SynchronousTestCase):
    """
    The server splices large plain READs from a file (L{NBDServerProtocol._simple}
    and L{NBDServerProtocol._lone_read}), and serves them the usual way when
    the device declines.
    """

    def setUp(self) -> None:
        splice_or_skip()
        path, self.data = dense_file(self)
        self.device = FileBlockDevice(path)
        self.addCleanup(self.device.close)
        # Writes inline whatever the machine's state (this test has no pool).
        self.device._write_nowait = False
        self.device._dirty = cast(Any, AllowingGuard())
        self.device._now = lambda: 0.0
        self.moved: list[tuple[int, int, int]] = []
        real = self.device.read_to_pipe

        def spy(sink: int, offset: int, length: int) -> int:
            moved = real(sink, offset, length)
            self.moved.append((offset, length, moved))
            return moved

        self.device.read_to_pipe = spy  # type: ignore[method-assign]
        self.ours, self.theirs = socket_pair(self)

    def serve(self, structured: bool = False) -> NBDServerProtocol:
        factory = NBDServerFactory(ExportRegistry.of([Export("", self.device)]), poll_max=0)
        proto = factory.buildProtocol(None)
        assert isinstance(proto, NBDServerProtocol)
        self.transport = QueueingTransport(self.ours)
        proto.makeConnection(self.transport)
        hello = b.client_flags()
        if structured:
            hello += b.option(w.Opt.STRUCTURED_REPLY)
        proto.dataReceived(hello + b.go())
        drain(self.theirs)
        self.addCleanup(proto.connectionLost)
        return proto

    def received(self) -> bytes:
        out = drain(self.theirs) + b"".join(self.transport.queued)
        self.transport.queued = []
        self.transport._tempDataLen = 0
        return out

    def simple_reads(self, data: bytes, *reads: tuple[int, int, int]) -> None:
        """C{data} holds, in order, simple replies to C{reads} (cookie, offset, length)."""
        pos = 0
        for cookie, offset, length in reads:
            magic, error, got = struct.unpack_from(">IIQ", data, pos)
            self.assertEqual((magic, error, got), (w.SIMPLE_REPLY_MAGIC, 0, cookie))
            pos += 16
            self.assertEqual(data[pos : pos + length], self.data[offset : offset + length])
            pos += length
        self.assertEqual(pos, len(data))

    def test_simple_replies(self) -> None:
        """
        T-08: READs of 64 KiB (unaligned) and 1 MiB in one batch, spliced;
        a READ below L{PIPE_READ_MIN} between them is copied as before.
        """
        proto = self.serve()
        reads = [(1, 4097, 64 * KiB), (2, 0, PIPE_READ_MIN - 1), (3, MiB, MiB)]
        proto.dataReceived(b"".join(b.read(*r) for r in reads))
        self.simple_reads(self.received(), *reads)
        self.assertEqual(self.moved, [(4097, 64 * KiB, 64 * KiB), (MiB, MiB, MiB)])

    def test_structured_replies(self) -> None:
        """T-08: with structured replies, one OFFSET_DATA chunk with the DONE flag."""
        proto = self.serve(structured=True)
        proto.dataReceived(b.read(7, 2 * MiB + 512, 200 * KiB))
        chunks = b.parse_chunks(self.received())
        self.assertEqual(len(chunks), 1)
        flags, type_, cookie, payload = chunks[0]
        self.assertEqual((flags, type_, cookie), (w.ReplyFlags.DONE, w.ChunkType.OFFSET_DATA, 7))
        self.assertEqual(payload[:8], struct.pack(">Q", 2 * MiB + 512))
        self.assertEqual(payload[8:], self.data[2 * MiB + 512 : 2 * MiB + 512 + 200 * KiB])
        self.assertEqual(len(self.moved), 1)

    def test_declined(self) -> None:
        """A page not cached: the READ is read into a buffer at once instead."""
        proto = self.serve()
        self.device._cached_pages = lambda fd, offset, length: 0
        proto.dataReceived(b.read(1, 0, 128 * KiB))
        self.simple_reads(self.received(), (1, 0, 128 * KiB))
        self.assertEqual(self.moved, [(0, 128 * KiB, 0)])

    def test_in_order_with_writes(self) -> None:
        """
        WRITEs around spliced READs: every reply in request order, and each
        READ sees the WRITEs the client sent (and had answered) before it.
        """
        proto = self.serve()
        new = os.urandom(64 * KiB)
        proto.dataReceived(b.write(1, 0, new) + b.read(2, 0, 128 * KiB))
        self.data = new + self.data[64 * KiB :]
        data = self.received()
        self.assertEqual(b.parse_simple_replies(data[:16]), [(0, 1)])
        self.simple_reads(data[16:], (2, 0, 128 * KiB))
        proto.dataReceived(b.read(3, MiB, 64 * KiB) + b.write(4, 2 * MiB, b"w" * 4096))
        data = self.received()
        self.simple_reads(data[:-16], (3, MiB, 64 * KiB))
        self.assertEqual(b.parse_simple_replies(data[-16:]), [(0, 4)])
        self.assertEqual(len(self.moved), 2)

    def test_socket_full(self) -> None:
        """
        Replies the socket cannot take are queued in the transport; later
        READs queue behind them, read out of the pipe, in order.
        """
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        proto = self.serve()
        reads = [(1, 0, MiB), (2, MiB, 64 * KiB), (3, 2 * MiB, MiB)]
        proto.dataReceived(b"".join(b.read(*r) for r in reads))
        assert proto._writer is not None
        self.assertGreaterEqual(proto._writer.splice_fallbacks, 1)
        self.simple_reads(self.received(), *reads)

    def test_lone_read(self) -> None:
        """A lone large READ taken while polling is spliced too."""
        proto = self.serve()
        self.assertIs(proto._lone_read(b.read(5, 3 * MiB, 256 * KiB)), _TAKEN)
        self.simple_reads(self.received(), (5, 3 * MiB, 256 * KiB))
        self.assertEqual(self.moved, [(3 * MiB, 256 * KiB, 256 * KiB)])

    def test_lone_read_declined(self) -> None:
        """A lone READ the device will not splice is read into a buffer."""
        proto = self.serve()
        self.device._cached_pages = lambda fd, offset, length: 0
        self.assertIsNot(proto._lone_read(b.read(5, 0, 64 * KiB)), _NOT_TAKEN)
        self.simple_reads(self.received(), (5, 0, 64 * KiB))
        self.assertEqual(self.moved, [(0, 64 * KiB, 0)])

    def test_not_under_tls(self) -> None:
        """Once the writer goes through TLS, READs are not offered for splicing."""
        proto = self.serve()
        assert proto._writer is not None
        proto._writer.stop_direct()
        proto._simple_kit = None
        proto.dataReceived(b.read(1, 0, 128 * KiB))
        self.simple_reads(self.received(), (1, 0, 128 * KiB))
        self.assertEqual(self.moved, [])

    def test_closed_closes_pipe(self) -> None:
        """The connection's end closes its pipe."""
        proto = self.serve()
        proto.dataReceived(b.read(1, 0, 128 * KiB))
        assert proto._writer is not None
        pipe = proto._writer._pipe
        assert pipe is not None
        proto.connectionLost()
        self.assertIsNone(proto._writer._pipe)
        self.assertRaises(OSError, os.fstat, pipe[0])

    def test_flushed_after_close(self) -> None:
        """
        A spliced reply that can no longer be sent (the connection closed
        under it) is dropped with its pipe, never left in it.
        """
        proto = self.serve()
        writer = proto._writer
        assert writer is not None
        piped = writer.piped_read(self.device.read_to_pipe, 0, 64 * KiB)
        assert piped is not None
        proto._out.append(cast(Any, piped))
        proto._closed = True
        proto._flush_out()
        self.assertIsNone(writer._pipe)
        self.assertRaises(OSError, os.fstat, piped.pipe[0])


class SplicedTCPTests(TestCase):
    """
    Over real TCP through the reactor, with Twisted's own transport: READs
    of every size land intact, many at once (so the socket fills and the
    fallbacks run), with and without extended headers.
    """

    timeout = 60

    async def test_reads(self) -> None:
        from twisted.internet import reactor

        splice_or_skip()
        path, data = dense_file(self, 16 * MiB)
        device = FileBlockDevice(path)
        self.addCleanup(device.close)
        moved: list[int] = []
        real = device.read_to_pipe

        def spy(sink: int, offset: int, length: int) -> int:
            count = real(sink, offset, length)
            moved.append(count)
            return count

        device.read_to_pipe = spy  # type: ignore[method-assign]
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]))
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.shutdown)
        rng = random.Random(7)
        for extended in (False, True):
            client = await connect(
                reactor, f"tcp:127.0.0.1:{port.getHost().port}", extended_headers=extended
            )
            # Page-aligned and not: an unaligned 1 MiB spans one page more
            # than the pipe's slots, so it is never offered.
            ranges = [
                (
                    rng.randrange(15 * MiB) & ~(4095 * (i % 2)),
                    rng.choice((64 * KiB, 300 * KiB, MiB)),
                )
                for i in range(48)
            ]
            got = await gatherResults([client.read(offset, length) for offset, length in ranges])
            for (offset, length), value in zip(ranges, got, strict=True):
                self.assertEqual(value, data[offset : offset + length])
            await client.disconnect()
        self.assertIn(MiB, moved)
        # Offered only what fits the pipe: nothing moved in part.
        self.assertEqual([count for count in moved if count not in (64 * KiB, 300 * KiB, MiB)], [])
