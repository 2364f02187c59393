"""
Tests for L{twisted_nbd.backends.ram.MappedMemoryDevice}, the RAM disk in
shared memory.
"""

from __future__ import annotations

import os
from typing import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests import builders as b
from twisted_nbd._wire import Errno, Opt
from twisted_nbd.backends.ram import CHUNK, MAX_ALLOCATION, MappedMemoryDevice
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import (
    STATE_HOLE,
    STATE_ZERO,
    Extent,
    IBlockDevice,
    IBufferRead,
    ISparseRead,
)
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.testing import BlockDeviceConformanceMixin

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
HOLE = STATE_HOLE | STATE_ZERO


def allocated(device: MappedMemoryDevice) -> int:
    """Bytes of memory the disk's data file holds."""
    return os.fstat(device.share()[0]).st_blocks * 512


class MappedConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """The RAM disk passes the conformance tests, reporting allocation exactly."""

    exact_allocation = True

    def make_device(self, size: int) -> IBlockDevice:
        return MappedMemoryDevice(size)


class MappedMemoryTests(SynchronousTestCase):
    """Beyond the conformance tests: sparseness, zero-copy reads, sharing."""

    def device(self, size: int = 16 * MiB) -> MappedMemoryDevice:
        device = MappedMemoryDevice(size)
        self.addCleanup(device.close)
        return device

    def status(self, device: MappedMemoryDevice, offset: int, length: int) -> list[Extent]:
        extents: Sequence[Extent] = self.successResultOf(device.block_status(offset, length))
        return list(extents)

    def test_interfaces(self) -> None:
        device = self.device()
        for interface in (IBlockDevice, ISparseRead, IBufferRead):
            self.assertTrue(verifyObject(interface, device))

    def test_sparse(self) -> None:
        """A 1 TiB disk costs nothing until written; writes take about what they cover."""
        device = self.device(1 << 40)
        self.assertEqual(allocated(device), 0)
        for offset in (0, (1 << 39) + 5, (1 << 40) - 3):
            self.successResultOf(device.write(offset, b"abc"))
        self.assertLessEqual(allocated(device), 3 * 2 * 4 * KiB)
        self.assertEqual(self.successResultOf(device.read((1 << 40) - 3, 3)), b"abc")
        self.assertEqual(self.successResultOf(device.read(1 << 39, 9)), b"\0" * 5 + b"abc\0")

    def test_reads_allocate_nothing(self) -> None:
        """Reading holes, sparse reads and block status allocate no memory."""
        device = self.device(1 << 40)
        self.assertEqual(self.successResultOf(device.read(5 * GiB, MiB)), bytes(MiB))
        self.assertEqual(bytes(device.read_buffer(7 * GiB + 5, 3 * CHUNK)), bytes(3 * CHUNK))
        self.successResultOf(device.read_sparse(0, 4 * MiB))
        self.successResultOf(device.block_status(0, 1 << 40))
        self.assertEqual(allocated(device), 0)

    def test_read_buffer_is_a_view(self) -> None:
        """
        Data is handed out as a view of the disk, without a copy; a range
        with holes is assembled; read() always gives a copy.
        """
        device = self.device()
        self.successResultOf(device.write(CHUNK - 10, b"x" * 20))
        view = device.read_buffer(CHUNK - 10, 20)
        self.assertIsInstance(view, memoryview)
        self.assertEqual(bytes(view), b"x" * 20)
        self.successResultOf(device.write(CHUNK - 10, b"y"))
        self.assertEqual(bytes(view)[:1], b"y")  # a view: it sees the write
        del view
        mixed = device.read_buffer(0, 3 * CHUNK)
        self.assertIsInstance(mixed, bytes)
        self.assertEqual(mixed[CHUNK - 10 : CHUNK + 10], b"y" + b"x" * 19)
        copy = self.successResultOf(device.read(CHUNK - 10, 20))
        self.successResultOf(device.write(CHUNK - 10, b"z"))
        self.assertEqual(copy[:1], b"y")

    def test_block_status(self) -> None:
        """Holes, data and allocated zeroes, merged, at chunk granularity."""
        device = self.device(8 * CHUNK)
        self.successResultOf(device.write(CHUNK + 1, b"d"))
        self.successResultOf(device.write_zeroes(3 * CHUNK, 2 * CHUNK, may_trim=False))
        self.assertEqual(
            self.status(device, 0, 8 * CHUNK),
            [
                Extent(CHUNK, HOLE),
                Extent(CHUNK, 0),
                Extent(CHUNK, HOLE),
                Extent(2 * CHUNK, STATE_ZERO),
                Extent(3 * CHUNK, HOLE),
            ],
        )
        self.assertEqual(self.status(device, CHUNK + 7, 10), [Extent(10, 0)])

    def test_trim_frees(self) -> None:
        """Trimming whole chunks gives their memory back; partly trimmed ones are zeroed."""
        device = self.device()
        self.successResultOf(device.write(0, b"\1" * (4 * CHUNK)))
        before = allocated(device)
        self.assertGreaterEqual(before, 4 * CHUNK)
        self.successResultOf(device.trim(CHUNK // 2, 3 * CHUNK))
        self.assertLessEqual(allocated(device), before - 2 * CHUNK)
        data = self.successResultOf(device.read(0, 4 * CHUNK))
        self.assertEqual(data, b"\1" * (CHUNK // 2) + bytes(3 * CHUNK) + b"\1" * (CHUNK // 2))
        self.assertEqual([e.flags for e in self.status(device, 0, 4 * CHUNK)], [0, HOLE, 0])

    def test_partial_trims_free_a_chunk(self) -> None:
        """A chunk zeroed in two partial trims becomes a hole again."""
        device = self.device()
        self.successResultOf(device.write(0, b"\1" * CHUNK))
        self.successResultOf(device.trim(0, CHUNK // 2))
        self.successResultOf(device.trim(CHUNK // 2, CHUNK // 2 + 1))
        self.assertEqual(self.status(device, 0, CHUNK), [Extent(CHUNK, HOLE)])

    def test_no_hole_allocates(self) -> None:
        """NO_HOLE zeroing allocates the memory, so later writes cannot fail for it."""
        device = self.device()
        self.successResultOf(device.write_zeroes(0, 8 * CHUNK, may_trim=False))
        self.assertGreaterEqual(allocated(device), 8 * CHUNK)
        self.assertEqual(self.status(device, 0, 8 * CHUNK), [Extent(8 * CHUNK, STATE_ZERO)])

    def test_no_hole_huge_range_refused(self) -> None:
        """Keeping more than MAX_ALLOCATION allocated at once is refused, untouched."""
        device = self.device(4 * MAX_ALLOCATION)
        failure = self.failureResultOf(
            device.write_zeroes(0, 2 * MAX_ALLOCATION, may_trim=False), NBDError
        )
        self.assertEqual(failure.value.errno, Errno.ENOSPC)
        self.assertEqual(allocated(device), 0)

    def test_trim_huge_range(self) -> None:
        """Trimming most of a 1 TiB disk is quick and frees what was there."""
        device = self.device(1 << 40)
        self.successResultOf(device.write(1 << 38, b"x" * MiB))
        self.successResultOf(device.trim(0, (1 << 40) - 4096))
        self.assertEqual(allocated(device), 0)
        self.assertEqual(self.status(device, 0, 1 << 40), [Extent(1 << 40, HOLE)])

    def test_unaligned_size(self) -> None:
        """A size that is no multiple of a chunk: the tail behaves as a whole chunk."""
        device = self.device(CHUNK + 100)
        self.successResultOf(device.write(CHUNK + 90, b"t" * 10))
        self.assertEqual(self.successResultOf(device.read(CHUNK + 90, 10)), b"t" * 10)
        self.successResultOf(device.trim(CHUNK, 100))
        self.assertEqual(self.status(device, 0, CHUNK + 100), [Extent(CHUNK + 100, HOLE)])

    def test_shared(self) -> None:
        """Another device over the shared memory files sees every write (multi-conn)."""
        first = self.device()
        data_fd, map_fd = first.share()
        second = MappedMemoryDevice(16 * MiB, fds=(os.dup(data_fd), os.dup(map_fd)))
        self.addCleanup(second.close)
        self.successResultOf(first.write(5 * MiB, b"hello"))
        self.assertEqual(self.successResultOf(second.read(5 * MiB, 5)), b"hello")
        self.successResultOf(second.trim(5 * MiB - 5 * MiB % CHUNK, CHUNK))
        self.assertEqual(self.successResultOf(first.read(5 * MiB, 5)), bytes(5))
        self.assertTrue(self.successResultOf(first.block_status(5 * MiB, 5))[0].flags & STATE_HOLE)

    def test_empty(self) -> None:
        """A zero-byte disk works."""
        device = self.device(0)
        self.assertEqual(self.successResultOf(device.read(0, 0)), b"")

    def test_invalid_size(self) -> None:
        self.assertRaises(ValueError, MappedMemoryDevice, -1)
        self.assertRaises(ValueError, MappedMemoryDevice, (1 << 40) + 1)

    def test_close_twice(self) -> None:
        device = MappedMemoryDevice(MiB)
        self.successResultOf(device.close())
        self.successResultOf(device.close())


class ZeroCopyServingTests(SynchronousTestCase):
    """The server sends READ replies from the disk's memory, and in the right order."""

    def serve(self, device: IBlockDevice) -> tuple[object, StringTransport]:
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]))
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b.client_flags() + b.go())
        transport.clear()
        return proto, transport

    def test_read_then_write_in_one_batch(self) -> None:
        """
        A READ answered from the disk's memory, then a WRITE to the same
        place in the same burst: the READ's reply carries the old data.
        """
        device = MappedMemoryDevice(MiB)
        self.addCleanup(device.close)
        self.successResultOf(device.write(0, b"old!" * 1024))
        proto, transport = self.serve(device)
        proto.dataReceived(b.read(1, 0, 4096) + b.write(2, 0, b"new!" * 1024))  # type: ignore[attr-defined]
        value = transport.value()
        self.assertEqual(value[16 : 16 + 4096], b"old!" * 1024)
        self.assertEqual(b.parse_simple_replies(value[16 + 4096 :]), [(0, 2)])

    def test_through_a_filter(self) -> None:
        """A pass-through filter keeps IBufferRead; one that changes reads does not."""
        device = MappedMemoryDevice(MiB)
        self.addCleanup(device.close)
        self.assertTrue(IBufferRead.providedBy(BlockDeviceFilter(device)))

        class Changing(BlockDeviceFilter):
            def read(self, offset: int, length: int) -> Deferred[bytes]:
                return super().read(offset, length)

        self.assertFalse(IBufferRead.providedBy(Changing(device)))

    def test_structured_sparse_read(self) -> None:
        """A large structured READ of data and holes is answered exactly."""
        device = MappedMemoryDevice(MiB)
        self.addCleanup(device.close)
        self.successResultOf(device.write(2 * CHUNK, b"d" * CHUNK))
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]))
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b.client_flags() + b.option(Opt.STRUCTURED_REPLY) + b.go())
        transport.clear()
        proto.dataReceived(b.read(9, 0, 5 * CHUNK))
        chunks = b.parse_chunks(transport.value())
        self.assertEqual([typ for _, typ, _, _ in chunks], [2, 1, 2])
        self.assertEqual(chunks[1][3][8:], b"d" * CHUNK)
