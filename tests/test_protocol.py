# -*- test-case-name: tests.test_protocol -*-
"""
Tests for L{twisted_nbd.protocol}: flow control, ordering, FLUSH, DISC and
connection loss, with C{StringTransport} and a L{ControllableBlockDevice}.
"""

from __future__ import annotations

import struct
from typing import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests import builders as b
from tests.test_connection import GREETING, after_go
from twisted_nbd._wire import ChunkType, Cmd, CmdFlags, Errno, Opt, Rep
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import Extent, ISparseRead, Segment
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol
from twisted_nbd.testing import ControllableBlockDevice

SIZE = 64 << 20


class Harness:
    """A protocol on a StringTransport, past GO, over a controllable device."""

    def __init__(
        self,
        depth: int = 4,
        cap: int = 64 << 20,
        structured: bool = False,
        read_only: bool = False,
        served: object = None,
    ) -> None:
        """
        @param served: what the export serves (a filter over C{self.device},
            say); C{self.device} itself if C{None}.
        """
        self.device = ControllableBlockDevice(SIZE)
        registry = ExportRegistry.of(
            [Export("", served or self.device, read_only=read_only)]  # type: ignore[arg-type]
        )
        factory = NBDServerFactory(registry, max_queue_depth=depth, max_bytes_in_flight=cap)
        proto = factory.buildProtocol(None)
        assert proto is not None
        self.proto = proto
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        hello = b.client_flags()
        if structured:
            hello += b.option(Opt.STRUCTURED_REPLY)
        self.proto.dataReceived(hello + b.go())
        assert after_go(self.transport.value()) == b""
        self.transport.clear()

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def replies(self) -> list[tuple[int, int]]:
        """Payload-less simple replies written so far (and clear them)."""
        out = b.parse_simple_replies(self.transport.value())
        self.transport.clear()
        return out


class ProducerTests(SynchronousTestCase):
    """The protocol is a push producer on its own transport."""

    def test_registers_as_streaming_producer(self) -> None:
        """The protocol registers itself as a streaming producer on connect."""
        h = Harness()
        self.assertIs(h.transport.producer, h.proto)
        self.assertTrue(h.transport.streaming)
        self.assertTrue(verifyObject(IPushProducer, h.proto))

    def test_greeting(self) -> None:
        """The greeting goes out as soon as the connection is made (H-01)."""
        proto = NBDServerFactory(ExportRegistry()).buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), GREETING)

    def test_tcp_nodelay_C10(self) -> None:
        """C-10: on TCP, Nagle's algorithm is turned off so small replies go at once."""

        @implementer(ITCPTransport)
        class TCPTransport(StringTransport):
            nodelay = False
            keepalive = False

            def setTcpNoDelay(self, enabled: bool) -> None:
                self.nodelay = enabled

            def getTcpNoDelay(self) -> bool:
                return self.nodelay

            def setTcpKeepAlive(self, enabled: bool) -> None:
                self.keepalive = enabled

            def getTcpKeepAlive(self) -> bool:
                return self.keepalive

            def loseWriteConnection(self) -> None:
                self.loseConnection()

        transport = TCPTransport()
        proto = NBDServerFactory(ExportRegistry()).buildProtocol(None)
        assert proto is not None
        proto.makeConnection(transport)
        self.assertTrue(transport.nodelay)

    def test_pauses_exactly_at_queue_depth(self) -> None:
        """Reading pauses when the queue depth is reached, and resumes after one finishes."""
        h = Harness(depth=4)
        h.send(b"".join(b.read(i, i * 512, 512) for i in range(10)))
        self.assertEqual(len(h.device.calls), 4)
        self.assertEqual(h.transport.producerState, "paused")
        h.device.take("read").succeed(b"a" * 512)
        self.assertEqual(len(h.device.calls), 4)
        self.assertEqual(h.transport.producerState, "paused")
        self.assertEqual(h.proto.in_flight, 4)
        while h.device.calls:
            h.device.take("read").succeed(b"a" * 512)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.proto.in_flight, 0)

    def test_pauses_at_byte_cap(self) -> None:
        """Reading pauses when the bytes in flight reach the cap."""
        h = Harness(depth=100, cap=1 << 20)
        h.send(b"".join(b.read(i, 0, 512 << 10) for i in range(5)))
        self.assertEqual(len(h.device.calls), 2)
        self.assertEqual(h.proto.bytes_in_flight, 1 << 20)
        self.assertEqual(h.transport.producerState, "paused")
        h.device.take().succeed(b"x" * (512 << 10))
        self.assertEqual(len(h.device.calls), 2)

    def test_write_payloads_count_against_cap(self) -> None:
        """WRITE payloads held for the backend count as bytes in flight."""
        h = Harness(depth=100, cap=100 << 10)
        h.send(b"".join(b.write(i, 0, b"w" * (64 << 10)) for i in range(3)))
        self.assertEqual(len(h.device.calls), 2)
        self.assertEqual(h.transport.producerState, "paused")

    def test_transport_pause_stops_work(self) -> None:
        """A transport that pauses us stops reading and starting backend work."""
        h = Harness()
        h.proto.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        h.send(b.read(1, 0, 512))
        self.assertEqual(h.device.calls, [])
        h.proto.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.device.take("read").args, {"offset": 0, "length": 512})

    def test_pause_resume_idempotent(self) -> None:
        """Repeated pause and resume calls are harmless."""
        h = Harness()
        h.proto.pauseProducing()
        h.proto.pauseProducing()
        h.proto.resumeProducing()
        h.proto.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")

    def test_synchronous_backend_respects_depth(self) -> None:
        """A backend that answers at once never lets more than the depth run, and
        the reply to each request is written from inside the parse loop."""
        h = Harness(depth=2)
        seen = []

        def read(offset: int, length: int) -> Deferred[bytes]:
            seen.append(h.proto.in_flight)
            return succeed(b"r" * length)

        h.device.read = read  # type: ignore[method-assign]
        h.send(b"".join(b.read(i, 0, 8) for i in range(50)))
        self.assertEqual(len(seen), 50)
        self.assertLessEqual(max(seen), 2)
        self.assertEqual(len(h.transport.value()), 50 * (16 + 8))
        self.assertEqual(h.transport.producerState, "producing")


class OrderingTests(SynchronousTestCase):
    """Replies, FLUSH and errors."""

    def test_replies_in_completion_order(self) -> None:
        """Replies go out in the order requests finish, not the order they came (C-01)."""
        h = Harness()
        h.send(b.write(1, 0, b"a") + b.write(2, 1, b"b") + b.write(3, 2, b"c"))
        first, second, third = h.device.calls
        second.succeed()
        third.succeed()
        first.succeed()
        self.assertEqual(h.replies(), [(0, 2), (0, 3), (0, 1)])

    def test_read_reply_carries_data(self) -> None:
        """A simple READ reply is the header then exactly the data, cookie echoed (T-02)."""
        h = Harness()
        h.send(b.read(0xABCDEF, 100, 5))
        h.device.take("read").succeed(b"hello")
        self.assertEqual(
            h.transport.value(), struct.pack(">IIQ", 0x67446698, 0, 0xABCDEF) + b"hello"
        )

    def test_flush_waits_for_writes_C02(self) -> None:
        """C-02: FLUSH reaches the backend only after the writes before it finished,
        and is answered only when the backend's flush is done."""
        h = Harness()
        h.send(b.write(1, 0, b"a") + b.request(Cmd.FLUSH, 2))
        write = h.device.take("write")
        self.assertEqual(h.device.calls, [])
        write.succeed()
        self.assertEqual(h.replies(), [(0, 1)])
        flush = h.device.take("flush")
        self.assertEqual(h.replies(), [])
        flush.succeed()
        self.assertEqual(h.replies(), [(0, 2)])

    def test_flush_after_acknowledged_write_C02(self) -> None:
        """C-02: with no write pending, FLUSH goes straight to the backend."""
        h = Harness()
        h.send(b.write(1, 0, b"a"))
        h.device.take("write").succeed()
        h.send(b.request(Cmd.FLUSH, 2))
        h.device.take("flush").succeed()
        self.assertEqual(h.replies(), [(0, 1), (0, 2)])

    def test_flush_after_failed_write(self) -> None:
        """A failed write does not keep a later FLUSH waiting."""
        h = Harness()
        h.send(b.write(1, 0, b"a") + b.request(Cmd.FLUSH, 2))
        h.device.take("write").fail(NBDError(Errno.ENOSPC))
        h.device.take("flush").succeed()
        self.assertEqual(h.replies(), [(Errno.ENOSPC, 1), (0, 2)])

    def test_fua_passed_to_backend_C03(self) -> None:
        """C-03: FUA reaches the backend with the write."""
        h = Harness()
        h.send(b.write(1, 0, b"a", CmdFlags.FUA))
        self.assertTrue(h.device.take("write").args["fua"])

    def test_nbd_error_errno(self) -> None:
        """A backend's NBDError reaches the client with its errno."""
        h = Harness()
        h.send(b.request(Cmd.TRIM, 1, 0, 512))
        h.device.take("trim").fail(NBDError(Errno.ENOSPC, "full"))
        self.assertEqual(h.replies(), [(Errno.ENOSPC, 1)])

    def test_unexpected_error_is_eio_and_logged(self) -> None:
        """Any other backend exception becomes EIO and is logged."""
        h = Harness()
        h.send(b.read(1, 0, 512))
        h.device.take("read").fail(ZeroDivisionError())
        self.assertEqual(h.replies(), [(Errno.EIO, 1)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_short_read_is_an_error(self) -> None:
        """A backend that returns the wrong number of bytes gets EIO, not a corrupt reply."""
        h = Harness()
        h.send(b.read(1, 0, 512))
        h.device.take("read").succeed(b"short")
        self.assertEqual(h.replies(), [(Errno.EIO, 1)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_structured_read_error(self) -> None:
        """With structured replies a failed READ gets an ERROR chunk with a message."""
        h = Harness(structured=True)
        h.send(b.read(7, 0, 512))
        h.device.take("read").fail(NBDError(Errno.EIO, "disk on fire"))
        [(flags, typ, cookie, payload)] = b.parse_chunks(h.transport.value())
        self.assertEqual((flags, typ, cookie), (1, 0x8001, 7))
        self.assertEqual(payload[6:], b"disk on fire")

    def test_rejection_logged(self) -> None:
        """A refused request is answered at once and never reaches the backend."""
        h = Harness(read_only=True)
        h.send(b.write(1, 0, b"abc") + b.read(2, 0, 3))
        self.assertEqual(h.replies(), [(Errno.EPERM, 1)])
        self.assertEqual(h.device.take("read").args, {"offset": 0, "length": 3})


class DisconnectTests(SynchronousTestCase):
    """DISC, protocol violations and connection loss."""

    def test_disc_drains_C06(self) -> None:
        """C-06: DISC stops reading, lets in-flight requests finish, then closes."""
        h = Harness()
        h.send(b.read(1, 0, 1) + b.read(2, 0, 1) + b.request(Cmd.DISC, 3) + b.read(4, 0, 1))
        self.assertEqual(h.transport.producerState, "paused")
        first, second = h.device.take("read"), h.device.take("read")
        self.assertEqual(h.device.calls, [])
        self.assertFalse(h.transport.disconnecting)
        second.succeed(b"2")
        self.assertFalse(h.transport.disconnecting)
        first.succeed(b"1")
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.device.calls, [])
        self.assertEqual(len(h.transport.value()), 2 * 17)

    def test_disc_idle_closes_at_once(self) -> None:
        """DISC with nothing in flight closes the connection at once."""
        h = Harness()
        h.send(b.request(Cmd.DISC, 1))
        self.assertTrue(h.transport.disconnecting)

    def test_close_unregisters_producer_C06(self) -> None:
        """C-06: the protocol stops being the transport's producer before closing,
        even while the transport has it paused, or a real transport would resume
        it instead of closing once its buffer drained."""
        h = Harness()
        h.send(b.read(1, 0, 1) + b.request(Cmd.DISC, 2))
        h.proto.pauseProducing()
        h.device.take("read").succeed(b"x")
        self.assertIsNone(h.transport.producer)
        self.assertTrue(h.transport.disconnecting)

    def test_abort_acks_then_closes_H08(self) -> None:
        """H-08: ABORT is acknowledged, then the server closes."""
        proto = NBDServerFactory(
            ExportRegistry.of([Export("", ControllableBlockDevice(512))])
        ).buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        transport.clear()
        proto.dataReceived(b.client_flags() + b.option(Opt.ABORT))
        self.assertEqual(b.parse_option_replies(transport.value()), [(Opt.ABORT, 1, b"")])
        self.assertTrue(transport.disconnecting)

    def test_violation_aborts_T01(self) -> None:
        """T-01: a bad request magic aborts the connection."""
        h = Harness()
        h.send(b.request(Cmd.READ, 1, 0, 1, magic=0xDEADBEEF))
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.device.calls, [])

    def test_nothing_written_after_connection_lost(self) -> None:
        """Results that arrive after connectionLost write nothing and log no errors."""
        h = Harness()
        h.send(b.read(1, 0, 4) + b.write(2, 0, b"x") + b.read(3, 0, 4))
        h.proto.connectionLost(Failure(ConnectionDone()))
        h.transport.clear()
        h.device.take("read").succeed(b"late")
        h.device.take("write").fail(NBDError(Errno.EIO))
        h.device.take("read").fail(RuntimeError("late failure"))
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.proto.in_flight, 0)
        self.flushLoggedErrors(RuntimeError)

    def test_data_after_connection_lost_ignored(self) -> None:
        """Bytes delivered after connectionLost start no backend work."""
        h = Harness()
        h.proto.connectionLost(Failure(ConnectionDone()))
        h.send(b.read(1, 0, 4))
        self.assertEqual(h.device.calls, [])

    def test_factory_rejects_bad_limits(self) -> None:
        """Queue depth and byte cap must be positive."""
        self.assertRaises(ValueError, NBDServerProtocol, ExportRegistry(), 0)


class SparseReadTests(SynchronousTestCase):
    """Structured READs send zero runs as OFFSET_HOLE chunks."""

    def test_holes_become_hole_chunks(self) -> None:
        """A large READ asks block_status first and reads only the data runs."""
        h = Harness(structured=True)
        h.send(b.read(5, 0, 256 << 10))
        h.device.take("block_status").succeed([Extent(64 << 10, 0), Extent(1 << 20, 3)])
        read = h.device.take("read")
        self.assertEqual(read.args, {"offset": 0, "length": 64 << 10})
        read.succeed(b"d" * (64 << 10))
        chunks = b.parse_chunks(h.transport.value())
        self.assertEqual(
            [(flags, typ, cookie) for flags, typ, cookie, _ in chunks],
            [(0, ChunkType.OFFSET_DATA, 5), (1, ChunkType.OFFSET_HOLE, 5)],
        )
        self.assertEqual(chunks[1][3], struct.pack(">QI", 64 << 10, 192 << 10))

    def test_df_reads_whole(self) -> None:
        """With DF the READ is one data chunk, holes included (T-16)."""
        h = Harness(structured=True)
        h.send(b.read(5, 0, 256 << 10, CmdFlags.DF))
        h.device.take("read").succeed(bytes(256 << 10))
        [(flags, typ, _, _)] = b.parse_chunks(h.transport.value())
        self.assertEqual((flags, typ), (1, ChunkType.OFFSET_DATA))

    def test_small_reads_skip_block_status(self) -> None:
        """Small reads go straight to the backend."""
        h = Harness(structured=True)
        h.send(b.read(5, 0, 4096))
        self.assertEqual(h.device.take().method, "read")

    def test_failed_data_read(self) -> None:
        """A data run that fails gives one ERROR chunk with the backend's errno."""
        h = Harness(structured=True)
        h.send(b.read(5, 0, 256 << 10))
        h.device.take("block_status").succeed([Extent(64 << 10, 0)])
        h.device.take("read").fail(NBDError(Errno.EIO, "bad sector"))
        [(flags, typ, cookie, payload)] = b.parse_chunks(h.transport.value())
        self.assertEqual((flags, typ, cookie), (1, ChunkType.ERROR, 5))
        self.assertEqual(payload[6:], b"bad sector")


class ShutdownTests(SynchronousTestCase):
    """Graceful shutdown of connections and of the factory (C-07)."""

    def test_drains_then_closes_C07(self) -> None:
        """C-07: requests in flight finish, new ones get ESHUTDOWN, then the connection
        closes and the shutdown Deferred fires when it is lost."""
        h = Harness()
        h.send(b.read(1, 0, 4))
        done = h.proto.shutdown()
        h.send(b.read(2, 0, 4))
        self.assertEqual(h.replies(), [(Errno.ESHUTDOWN, 2)])
        self.assertFalse(h.transport.disconnecting)
        h.device.take("read").succeed(b"data")
        self.assertTrue(h.transport.disconnecting)
        self.assertNoResult(done)
        h.proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)

    def test_factory_shutdown_timeout(self) -> None:
        """Connections still busy when the timeout passes are dropped."""
        h = Harness()
        factory = h.proto.factory
        assert isinstance(factory, NBDServerFactory)
        self.assertEqual(factory.connections, {h.proto})
        h.send(b.read(1, 0, 4))
        clock = Clock()
        done = factory.shutdown(timeout=5, clock=clock)
        clock.advance(4)
        self.assertFalse(h.transport.disconnecting)
        clock.advance(1)
        self.assertTrue(h.transport.disconnecting)
        h.proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(factory.connections, set())
        self.flushLoggedErrors()

    def test_idle_connections_close_at_once(self) -> None:
        """An idle connection closes as soon as shutdown starts, and its deadline is
        cancelled once every connection is gone."""
        h = Harness()
        factory = h.proto.factory
        assert isinstance(factory, NBDServerFactory)
        clock = Clock()
        done = factory.shutdown(timeout=5, clock=clock)
        self.assertTrue(h.transport.disconnecting)
        h.proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_late_connection_shut_down(self) -> None:
        """A connection made after shutdown began is refused at the first option (H-19)."""
        h = Harness()
        factory = h.proto.factory
        assert isinstance(factory, NBDServerFactory)
        factory.shutdown()
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        transport.clear()
        proto.dataReceived(b.client_flags() + b.go())
        self.assertEqual(b.parse_option_replies(transport.value())[0][1], Rep.ERR_SHUTDOWN)


@implementer(ISparseRead)
class SparseDevice(ControllableBlockDevice):
    """A controllable device that also answers read_sparse."""

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        return self._record("read_sparse", offset=offset, length=length)


class ISparseReadTests(SynchronousTestCase):
    """A device that provides ISparseRead answers large structured READs in one call."""

    def harness(self) -> Harness:
        h = Harness(structured=True)
        device = SparseDevice(SIZE)
        h.device = device
        h.proto._device = device
        return h

    def test_one_call(self) -> None:
        """read_sparse replaces block_status + read; its segments become chunks."""
        h = self.harness()
        h.send(b.read(5, 0, 256 << 10))
        h.device.take("read_sparse").succeed([(0, b"d" * 4096), (4096, (252 << 10))])
        chunks = b.parse_chunks(h.transport.value())
        self.assertEqual(
            [(flags, typ) for flags, typ, _, _ in chunks],
            [(0, ChunkType.OFFSET_DATA), (1, ChunkType.OFFSET_HOLE)],
        )

    def test_bad_segments_are_eio(self) -> None:
        """Segments that do not cover the read exactly become EIO, not a bad reply."""
        for segments in (
            [(0, b"d" * 4096)],
            [(0, 4096), (8192, (248 << 10))],
            [(0, 0), (0, 256 << 10)],
        ):
            h = self.harness()
            h.send(b.read(5, 0, 256 << 10))
            h.device.take("read_sparse").succeed(segments)
            [(flags, typ, _, payload)] = b.parse_chunks(h.transport.value())
            self.assertEqual((flags, typ), (1, ChunkType.ERROR))
            self.assertEqual(struct.unpack(">I", payload[:4])[0], Errno.EIO)
        self.flushLoggedErrors(RuntimeError)


class _WriteCounter(BlockDeviceFilter):
    """A filter that changes nothing a read sees: it counts writes."""

    writes = 0

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        self.writes += 1
        return super().write(offset, data, fua)


class _Inverter(BlockDeviceFilter):
    """A filter that changes what reads return, and so must not pass read_sparse on."""

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self.inner.read(offset, length).addCallback(lambda d: bytes(255 - c for c in d))


class FilterTransparencyTests(SynchronousTestCase):
    """
    Optional companions of a device (ISparseRead) survive wrapping in
    filters, so a filter does not silently turn the one-trip sparse read
    off; a filter that changes reads does not let the inner device answer
    behind its back.
    """

    def serve(self, wrap: type[BlockDeviceFilter], layers: int = 1) -> tuple[Harness, object]:
        device = SparseDevice(SIZE)
        served: object = device
        for _ in range(layers):
            served = wrap(served)  # type: ignore[arg-type]
        h = Harness(structured=True, served=served)
        h.device = device
        return h, served

    def test_sparse_read_through_a_filter(self) -> None:
        """A READ through a pass-through filter is one read_sparse call on the device."""
        h, served = self.serve(_WriteCounter)
        self.assertTrue(ISparseRead.providedBy(served))
        h.send(b.read(5, 0, 256 << 10))
        call = h.device.take("read_sparse")
        self.assertEqual(call.args, {"offset": 0, "length": 256 << 10})
        call.succeed([(0, 256 << 10)])
        [(flags, typ, _, _)] = b.parse_chunks(h.transport.value())
        self.assertEqual((flags, typ), (1, ChunkType.OFFSET_HOLE))

    def test_sparse_read_through_a_stack(self) -> None:
        """Three filters deep, the device still gets one read_sparse call."""
        h, served = self.serve(_WriteCounter, layers=3)
        self.assertTrue(ISparseRead.providedBy(served))
        h.send(b.read(5, 0, 256 << 10))
        h.device.take("read_sparse").succeed([(0, b"x" * (256 << 10))])
        self.assertEqual(h.device.calls, [])

    def test_filter_that_changes_reads(self) -> None:
        """
        A filter overriding read hides ISparseRead: the server asks for block
        status and reads through the filter, so the filter's data is what the
        client gets.
        """
        h, served = self.serve(_Inverter)
        self.assertFalse(ISparseRead.providedBy(served))
        h.send(b.read(5, 0, 256 << 10))
        h.device.take("block_status").succeed([Extent(256 << 10, 0)])
        h.device.take("read").succeed(b"\x00" * (256 << 10))
        [(flags, typ, _, payload)] = b.parse_chunks(h.transport.value())
        self.assertEqual((flags, typ), (1, ChunkType.OFFSET_DATA))
        self.assertEqual(payload[8:], b"\xff" * (256 << 10))

    def test_device_without_sparse_read(self) -> None:
        """A filter over a device without ISparseRead does not claim to provide it."""
        self.assertFalse(ISparseRead.providedBy(_WriteCounter(ControllableBlockDevice(SIZE))))
