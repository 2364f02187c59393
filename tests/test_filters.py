"""
Tests for the built-in filters (L{twisted_nbd.filters}) and the C{pattern}
backend: each passes the conformance tests alone, over a device with
companions (L{IBufferRead}, L{ISparseRead}) and in stacks of two or three,
and each does what it is for.
"""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.backends.memory import DEFAULT_CAPABILITIES, MemoryBlockDevice
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.errors import NBDError
from twisted_nbd.filters import find_filter, stack
from twisted_nbd.filters.blocksize import BlockSizeFilter
from twisted_nbd.filters.cache import CacheFilter
from twisted_nbd.filters.cow import CopyOnWriteFilter, temporary_file_overlay
from twisted_nbd.filters.delay import DelayFilter
from twisted_nbd.filters.error import ErrorFilter
from twisted_nbd.filters.offset import OffsetFilter
from twisted_nbd.filters.rate import RateFilter
from twisted_nbd.filters.readonly import ReadOnlyFilter
from twisted_nbd.filters.stats import StatsFilter
from twisted_nbd.filters.truncate import TruncateFilter
from twisted_nbd.interfaces import STATE_HOLE, IBlockDevice, IBufferRead, ISparseRead
from twisted_nbd.registry import parse_ref, registry
from twisted_nbd.testing import BlockDeviceConformanceMixin, FilterConformanceMixin

KiB = 1024
MiB = 1024 * KiB


def context() -> OpenContext:
    """An opening context on the global reactor, using its thread pool."""
    opened = OpenContext(reactor)
    opened.pool = reactor.getThreadPool()  # type: ignore[attr-defined]
    return opened


def by_name(inner: IBlockDevice, *filters: str) -> IBlockDevice:
    """C{inner} wrapped in filters named as on the command line, first outermost."""
    return registry.wrap(inner, [parse_ref(f, "filter") for f in filters], context())


class MappedInner:
    """Filter over a RAM disk, which provides L{IBufferRead}."""

    def make_inner(self, size: int) -> IBlockDevice:
        return MappedMemoryDevice(size)


# Conformance, filter by filter.


class ReadOnlyConformance(FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "readonly")


class CowMemoryConformance(FilterConformanceMixin, TestCase):
    exact_allocation = True

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "cow:overlay=memory")


class CowFileConformance(FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        directory = self.mktemp()
        os.makedirs(directory, exist_ok=True)
        return by_name(inner, f"cow:overlay=file,dir={directory},block-size=4K")


class CowOverMappedConformance(MappedInner, FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "cow:overlay=memory")


class ErrorConformance(FilterConformanceMixin, TestCase):
    """At rate 0 the error filter changes nothing."""

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "error:rate=0,ops=all")


class DelayConformance(FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "delay:delay=50us,jitter=50us,ops=all,seed=1")


class StatsConformance(MappedInner, FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "stats")


class OffsetConformance(MappedInner, FilterConformanceMixin, TestCase):
    def inner_size(self, size: int) -> int:
        return size + 192 * KiB

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "offset:offset=64K,range=" + str(inner.size - 192 * KiB))


class TruncateShrinkConformance(FilterConformanceMixin, TestCase):
    def inner_size(self, size: int) -> int:
        return size + 5000

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, f"truncate:size={inner.size - 5000}")


class CacheConformance(FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "cache:size=1M,block-size=16K")


class RateConformance(FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "rate:rate=4G")


class BlockSizeConformance(FilterConformanceMixin, TestCase):
    """Byte-addressed requests of any size over a device of 512-byte blocks and 64K requests."""

    device_size = 9 * MiB + 4 * KiB + 512

    def make_inner(self, size: int) -> IBlockDevice:
        caps = replace(DEFAULT_CAPABILITIES, min_block=512, max_block=64 * KiB)
        return MemoryBlockDevice(size, caps)

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "blocksize")


# Stacks.


class StatsOverCowConformance(MappedInner, FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "stats", "cow:overlay=memory")


class CacheOffsetBlockSizeConformance(FilterConformanceMixin, TestCase):
    device_size = 9 * MiB + 4 * KiB + 512

    def inner_size(self, size: int) -> int:
        return size + 4 * KiB

    def make_inner(self, size: int) -> IBlockDevice:
        caps = replace(DEFAULT_CAPABILITIES, min_block=512, max_block=64 * KiB)
        return MemoryBlockDevice(size, caps)

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "cache:size=2M", "offset:offset=4K", "blocksize")


class ErrorDelayCowConformance(FilterConformanceMixin, TestCase):
    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "error:rate=0", "delay:delay=20us", "cow:overlay=memory")


class CowOverReadOnlyConformance(FilterConformanceMixin, TestCase):
    """cow makes a read-only device writable, as nbdkit's does."""

    def make_filter(self, inner: IBlockDevice) -> IBlockDevice:
        return by_name(inner, "cow:overlay=memory", "readonly")


# The pattern backend.


class PatternConformance(BlockDeviceConformanceMixin, TestCase):
    device_size = 9 * MiB + 8

    def make_device(self, size: int) -> IBlockDevice:
        return registry.open_backend(parse_ref(f"pattern:size={size}"), context())

    async def test_new_device_reads_zeroes(self) -> None:
        raise SkipTest("the pattern device holds its pattern, not zeroes")

    async def test_cache(self) -> None:
        raise SkipTest("the pattern device holds its pattern, not zeroes")

    async def test_pattern(self) -> None:
        """Each word holds its offset; capabilities follow from the methods."""
        device = await self._open()
        data = await device.read(13, 20)
        expected = b"".join(struct.pack(">Q", o) for o in range(8, 40, 8))[5:25]
        self.assertEqual(data, expected)
        self.assertFalse(device.capabilities.can_write)
        self.assertFalse(device.capabilities.can_extents)


# What each filter is for.


class ReadOnlyTests(SynchronousTestCase):
    def test_refuses(self) -> None:
        inner = MemoryBlockDevice(MiB)
        device = ReadOnlyFilter(inner)
        self.assertFalse(device.capabilities.can_write)
        self.assertFalse(device.capabilities.can_trim)
        for d in [device.write(0, b"x"), device.trim(0, 1), device.write_zeroes(0, 1)]:
            self.assertEqual(self.failureResultOf(d, NBDError).value.errno, Errno.EPERM)
        self.assertTrue(ISparseRead.providedBy(device))


class CowTests(TestCase):
    def setUp(self) -> None:
        self.base = MemoryBlockDevice(4 * MiB)
        self.successResultOf(self.base.write(0, b"b" * (4 * MiB)))
        self.cow = CopyOnWriteFilter(self.base, MemoryBlockDevice(4 * MiB), 64 * KiB)

    def test_base_never_written(self) -> None:
        """Writes, zeroing and trims change what the filter reads, never the base."""
        cow = self.cow
        self.successResultOf(cow.write(100, b"w" * 1000))
        self.successResultOf(cow.write_zeroes(MiB + 5, 70 * KiB, may_trim=False))
        self.successResultOf(cow.trim(2 * MiB, 128 * KiB))
        self.assertEqual(self.successResultOf(self.base.read(0, 4 * MiB)), b"b" * (4 * MiB))
        expected = bytearray(b"b" * (4 * MiB))
        expected[100:1100] = b"w" * 1000
        expected[MiB + 5 : MiB + 5 + 70 * KiB] = bytes(70 * KiB)
        expected[2 * MiB : 2 * MiB + 128 * KiB] = bytes(128 * KiB)
        self.assertEqual(self.successResultOf(cow.read(0, 4 * MiB)), bytes(expected))
        # Block status: the trimmed blocks are holes of the overlay; the
        # base's data elsewhere.
        extents = self.successResultOf(cow.block_status(2 * MiB, 128 * KiB))
        self.assertEqual(sum(e.length for e in extents), 128 * KiB)
        self.assertTrue(all(e.flags & STATE_HOLE for e in extents))
        extents = self.successResultOf(cow.block_status(3 * MiB, MiB))
        self.assertEqual(extents[0].flags, 0)

    def test_untouched_read_is_inner_deferred(self) -> None:
        """An untouched range is read with the base's own Deferred, no extra."""
        marker: Deferred[bytes] = succeed(b"x")
        self.base.read = lambda offset, length: marker  # type: ignore[method-assign]
        self.assertIs(self.cow.read(0, 1), marker)

    def test_concurrent_copy_up(self) -> None:
        """Two partial writes to one block copy it up once and both land."""
        reads: list[Deferred[Any]] = []
        real = self.base.read

        def slow(offset: int, length: int) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            reads.append(d)
            d.addCallback(lambda _: real(offset, length))
            return d

        self.base.read = slow  # type: ignore[method-assign]
        first = self.cow.write(10, b"1")
        second = self.cow.write(20, b"2")
        whole = self.cow.write(0, b"3" * (64 * KiB) + b"4")  # block 0 whole, block 1 partly
        self.assertEqual(len(reads), 2)  # block 0 once, block 1 once
        for d in reads:
            d.callback(None)
        for d in (first, second, whole):
            self.successResultOf(d)
        self.base.read = real  # type: ignore[method-assign]
        data = self.successResultOf(self.cow.read(0, 64 * KiB + 2))
        # The whole-block write waited for the copy-up, then landed last.
        self.assertEqual(data, b"3" * (64 * KiB) + b"4b")

    def test_shared_by_connections(self) -> None:
        """One filter per export: what one connection writes, another reads."""
        self.assertTrue(self.cow.capabilities.can_multi_conn)

    def test_file_overlay_removed(self) -> Deferred[None]:
        """The overlay file is unlinked at once and closed with the filter."""
        directory = self.mktemp()
        os.mkdir(directory)
        overlay = temporary_file_overlay(MiB, context(), directory)
        self.assertEqual(os.listdir(directory), [])
        return overlay.close()


class ErrorTests(SynchronousTestCase):
    def test_rate_and_seed(self) -> None:
        """A seeded filter fails the same requests each time, at about the rate."""

        def run() -> list[bool]:
            device = ErrorFilter(MemoryBlockDevice(MiB), 0.1, frozenset({"read"}), Errno.ENOSPC, 7)
            results = []
            for _ in range(1000):
                d = device.read(0, 1)
                if d.called and isinstance(d.result, Failure):
                    failure = self.failureResultOf(d, NBDError)
                    self.assertEqual(failure.value.errno, Errno.ENOSPC)
                    results.append(True)
                else:
                    self.successResultOf(d)
                    results.append(False)
            self.assertEqual(device.injected, sum(results))
            self.successResultOf(device.write(0, b"x"))  # writes are not chosen
            return results

        first = run()
        self.assertEqual(first, run())
        self.assertTrue(60 < sum(first) < 140, sum(first))

    def test_no_buffer_reads(self) -> None:
        """Reads through memory would skip the dice: not offered."""
        device = ErrorFilter(MappedMemoryDevice(MiB), 0.5)
        self.assertFalse(IBufferRead.providedBy(device))
        self.assertTrue(ISparseRead.providedBy(device))


class DelayTests(SynchronousTestCase):
    def test_on_the_clock(self) -> None:
        clock = Clock()
        device = DelayFilter(MemoryBlockDevice(MiB), clock, 0.01, ops=frozenset({"write"}))
        self.successResultOf(device.read(0, 1))  # not delayed
        d = device.write(0, b"x")
        self.assertNoResult(d)
        clock.advance(0.009)
        self.assertNoResult(d)
        clock.advance(0.002)
        self.successResultOf(d)


class StatsTests(SynchronousTestCase):
    def test_counts(self) -> None:
        times = iter([0.0, 0.0005, 1.0, 1.003, 2.0, 2.0])
        inner = MappedMemoryDevice(MiB)
        device = StatsFilter(inner, clock=lambda: next(times))
        self.assertTrue(IBufferRead.providedBy(device))
        self.assertTrue(ISparseRead.providedBy(device))
        self.successResultOf(device.write(0, b"abcd"))
        self.failureResultOf(device.read(2 * MiB, 1))  # past the end: fails
        device.read_buffer(0, 4)
        ops = device.stats.operations
        self.assertEqual((ops["write"].count, ops["write"].bytes), (1, 4))
        self.assertEqual((ops["read"].count, ops["read"].errors), (2, 1))
        self.assertEqual(ops["write"].histogram[9], 1)  # 500 us: under 512 us
        self.assertEqual(ops["read"].histogram[12], 1)  # 3 ms: under 4096 us
        self.assertIn("write: 1 requests", device.stats.summary())
        outer = by_name(device, "readonly")
        self.assertIs(find_filter(outer, StatsFilter), device)
        self.assertEqual(stack(outer)[1:], [device, inner])


class SliceTests(SynchronousTestCase):
    def test_offset(self) -> None:
        inner = MemoryBlockDevice(MiB)
        self.successResultOf(inner.write(4096, b"hello"))
        device = OffsetFilter(inner, 4096, 8192)
        self.assertEqual(device.size, 8192)
        self.assertEqual(self.successResultOf(device.read(0, 5)), b"hello")
        extents = self.successResultOf(device.block_status(0, 8192))
        self.assertLessEqual(sum(e.length for e in extents), 8192)
        self.assertRaises(ValueError, OffsetFilter, inner, MiB - 10, 20)

    def test_truncate_grow(self) -> None:
        inner = MemoryBlockDevice(1000)
        self.successResultOf(inner.write(990, b"x" * 10))
        device = TruncateFilter(inner, 3000)
        self.assertEqual(self.successResultOf(device.read(995, 10)), b"xxxxx" + bytes(5))
        self.successResultOf(device.write(995, b"yyyyy" + bytes(100)))
        failure = self.failureResultOf(device.write(995, b"z" * 10), NBDError)
        self.assertEqual(failure.value.errno, Errno.ENOSPC)
        self.assertEqual(self.successResultOf(device.read(990, 10)), b"xxxxxyyyyy")
        (extent,) = self.successResultOf(device.block_status(1000, 2000))
        self.assertTrue(extent.flags & STATE_HOLE)
        self.successResultOf(device.write_zeroes(0, 3000))
        self.assertEqual(self.successResultOf(inner.read(0, 1000)), bytes(1000))


class CacheTests(SynchronousTestCase):
    def test_hits_and_write_through(self) -> None:
        inner = MemoryBlockDevice(MiB)
        device = CacheFilter(inner, 64 * KiB, 16 * KiB)
        self.successResultOf(device.read(0, 100))
        self.successResultOf(device.read(50, 100))
        self.assertEqual((device.hits, device.misses), (1, 1))
        self.successResultOf(device.write(60, b"new"))
        self.assertEqual(self.successResultOf(inner.read(60, 3)), b"new")
        self.assertEqual(self.successResultOf(device.read(60, 3)), b"new")
        # Five blocks in a cache of four: the least recently used goes.
        for i in range(5):
            self.successResultOf(device.read(i * 16 * KiB, 1))
        self.assertEqual(len(device._blocks), 4)

    def test_no_stale_fill(self) -> None:
        """A read that overlaps a write in flight does not fill the cache."""
        inner = MemoryBlockDevice(MiB)
        device = CacheFilter(inner, MiB, 16 * KiB)
        pending: Deferred[bytes] = Deferred()
        real = inner.read
        inner.read = lambda offset, length: pending  # type: ignore[method-assign]
        read = device.read(0, 10)
        inner.read = real  # type: ignore[method-assign]
        self.successResultOf(device.write(0, b"new"))
        pending.callback(bytes(16 * KiB))
        self.assertEqual(self.successResultOf(read), bytes(10))
        self.assertEqual(self.successResultOf(device.read(0, 3)), b"new")


class RateTests(SynchronousTestCase):
    def test_bucket(self) -> None:
        clock = Clock()
        device = RateFilter(MemoryBlockDevice(4 * MiB), clock, MiB, burst=MiB)
        self.successResultOf(device.read(0, MiB))  # the full bucket
        self.successResultOf(device.read(0, MiB))  # empty, not yet in debt: through
        waiting = device.read(0, 10)
        later = device.write(0, b"x" * 10)
        self.assertNoResult(waiting)
        clock.advance(0.5)
        self.assertNoResult(waiting)
        clock.advance(0.5)
        self.successResultOf(waiting)
        self.assertNoResult(later)  # the read left the bucket 10 bytes in debt
        clock.advance(0.001)
        self.successResultOf(later)
        self.successResultOf(device.flush())  # not limited


class BlockSizeTests(SynchronousTestCase):
    def test_split_and_align(self) -> None:
        caps = replace(DEFAULT_CAPABILITIES, min_block=512, max_block=4096)
        inner = MemoryBlockDevice(64 * KiB, caps)
        calls: list[tuple[str, int, int]] = []
        real_read, real_write = inner.read, inner.write

        def read(offset: int, length: int) -> Any:
            calls.append(("read", offset, length))
            return real_read(offset, length)

        def write(offset: int, data: bytes, fua: bool = False) -> Any:
            calls.append(("write", offset, len(data)))
            return real_write(offset, data, fua)

        inner.read, inner.write = read, write  # type: ignore[method-assign]
        device = BlockSizeFilter(inner)
        self.assertEqual(device.capabilities.min_block, 1)
        self.successResultOf(device.write(100, b"x" * 5000))
        for _kind, offset, length in calls:
            self.assertEqual(offset % 512, 0, calls)
            self.assertTrue(0 < length <= 4096 and length % 512 == 0, calls)
        self.assertEqual(self.successResultOf(device.read(99, 5002)), b"\0" + b"x" * 5000 + b"\0")
