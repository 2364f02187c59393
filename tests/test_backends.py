# -*- test-case-name: tests.test_backends -*-
"""
Tests for L{twisted_nbd.backends}: the conformance tests run against the
memory and file backends, and what is particular to each.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Any, Callable, Sequence, cast
from unittest import SkipTest

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from twisted_nbd._wire import Errno
from twisted_nbd.backends import file as file_module
from twisted_nbd.backends.file import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    INLINE_COOLDOWN,
    INLINE_COOLDOWN_FACTOR,
    INLINE_COOLDOWN_MAX,
    INLINE_WRITE_MAX,
    MAX_EXTENTS,
    NOWAIT_READ_MAX,
    SLOW_INLINE_WRITE,
    SWITCHES_CHECK_MIN,
    ZERO_CHUNK,
    DirtyPageGuard,
    FileBlockDevice,
    create_image,
)
from twisted_nbd.backends.memory import DEFAULT_CAPABILITIES, MemoryBlockDevice
from twisted_nbd.backends.memory import MAX_EXTENTS as MEMORY_MAX_EXTENTS
from twisted_nbd.errors import NBDError, errno_from_os_error
from twisted_nbd.interfaces import (
    STATE_HOLE,
    STATE_ZERO,
    Capabilities,
    Extent,
    IBlockDevice,
    ISparseRead,
)
from twisted_nbd.testing import BlockDeviceConformanceMixin

KiB = 1024
MiB = 1024 * 1024
TiB = 1024**4
HOLE = STATE_HOLE | STATE_ZERO


def pattern(length: int, seed: int = 0) -> bytes:
    """Nonzero bytes that differ from one offset to the next."""
    return bytes((seed + i) % 251 + 1 for i in range(251)) * (length // 251) + bytes(
        (seed + i) % 251 + 1 for i in range(length % 251)
    )


def temp_directory(case: SynchronousTestCase) -> str:
    """
    A new directory, removed when the test ends.

    Not C{case.mktemp()}: that is relative to the working directory, which
    is trial's C{_trial_temp} but the repository itself under pytest.
    """
    directory = tempfile.mkdtemp(prefix="twisted-nbd-test-")
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def holes_work(directory: str) -> bool:
    """
    Whether the file system under C{directory} punches holes and reports
    them with C{SEEK_DATA}, so tests can insist on exact extents where it
    does.
    """
    path = os.path.join(directory, "probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.pwrite(fd, b"x" * (2 * MiB), 0)
        os.fsync(fd)
        try:
            file_module._fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MiB)
            return os.lseek(fd, 0, os.SEEK_DATA) == MiB
        except OSError:
            return False
    finally:
        os.close(fd)
        os.unlink(path)


class MemoryConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """
    The memory backend passes the conformance tests, reporting allocation
    exactly.
    """

    exact_allocation = True

    def make_device(self, size: int) -> IBlockDevice:
        return MemoryBlockDevice(size)


class MemorySmallPageConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """
    With pages smaller than the test ranges, the memory backend still passes
    the conformance tests.
    """

    exact_allocation = True

    def make_device(self, size: int) -> IBlockDevice:
        return MemoryBlockDevice(size, page_size=4 * KiB)


class MemoryBlockDeviceTests(SynchronousTestCase):
    """
    Tests for L{MemoryBlockDevice} beyond the conformance tests.
    """

    def status(self, device: MemoryBlockDevice, offset: int, length: int) -> list[Extent]:
        """The extents C{block_status} fires with at once."""
        extents: Sequence[Extent] = self.successResultOf(device.block_status(offset, length))
        return list(extents)

    def test_sparse(self) -> None:
        """
        A 1 TiB device costs nothing until written, and a few small writes
        far apart allocate one page each.
        """
        device = MemoryBlockDevice(TiB)
        self.assertEqual(device.page_count, 0)
        for offset in (0, TiB // 2 + 5, TiB - 3):
            self.successResultOf(device.write(offset, b"abc"))
        self.assertEqual(device.page_count, 3)
        self.assertEqual(self.successResultOf(device.read(TiB - 3, 3)), b"abc")
        self.assertEqual(self.successResultOf(device.read(TiB // 2, 9)), b"\0" * 5 + b"abc\0")
        self.assertEqual(device.page_count, 3)

    def test_reads_allocate_nothing(self) -> None:
        """Reading and asking for block status allocate no pages."""
        device = MemoryBlockDevice(TiB)
        self.assertEqual(self.successResultOf(device.read(TiB - MiB, MiB)), bytes(MiB))
        self.successResultOf(device.block_status(0, TiB))
        self.successResultOf(device.cache(0, TiB))
        self.assertEqual(device.page_count, 0)

    def test_block_status_huge_sparse_device(self) -> None:
        """
        Block status over a huge device with a few pages describes them
        exactly, without walking every page number.
        """
        page = 64 * KiB
        device = MemoryBlockDevice(TiB, page_size=page)
        self.successResultOf(device.write(3 * page + 1, b"x"))
        self.successResultOf(device.write(TiB - 1, b"y"))
        extents = self.successResultOf(device.block_status(0, TiB))
        self.assertEqual(
            list(extents),
            [
                Extent(3 * page, HOLE),
                Extent(page, 0),
                Extent(TiB - 5 * page, HOLE),
                Extent(page, 0),
            ],
        )

    def test_block_status_merges(self) -> None:
        """Neighbouring pages with the same status make one extent."""
        device = MemoryBlockDevice(MiB, page_size=4 * KiB)
        self.successResultOf(device.write(8 * KiB, bytes(12 * KiB)))
        extents = self.successResultOf(device.block_status(0, MiB))
        self.assertEqual(
            list(extents),
            [Extent(8 * KiB, HOLE), Extent(12 * KiB, 0), Extent(MiB - 20 * KiB, HOLE)],
        )

    def test_block_status_stops_at_requested_end(self) -> None:
        """Extents stop at the end of the request, even inside a page."""
        device = MemoryBlockDevice(MiB)
        self.successResultOf(device.write(0, b"x"))
        self.assertEqual(self.status(device, 10, 100), [Extent(100, 0)])
        self.assertEqual(self.status(device, MiB - 7, 5), [Extent(5, HOLE)])

    def test_block_status_clamped_to_size(self) -> None:
        """
        On a device whose size is not a whole number of pages, the last
        extent ends at the size.
        """
        device = MemoryBlockDevice(64 * KiB + 10)
        self.successResultOf(device.write(64 * KiB + 9, b"z"))
        self.assertEqual(
            self.status(device, 60 * KiB, 4 * KiB + 10),
            [Extent(4 * KiB, HOLE), Extent(10, 0)],
        )

    def test_block_status_capped(self) -> None:
        """
        On a badly fragmented device, block status stops after
        L{MEMORY_MAX_EXTENTS} extents, which still start at the offset.
        """
        device = MemoryBlockDevice(4 * MiB, page_size=512)
        for index in range(0, 8192, 2):
            self.successResultOf(device.write(index * 512, b"d"))
        extents = self.status(device, 0, 4 * MiB)
        self.assertEqual(len(extents), MEMORY_MAX_EXTENTS)
        self.assertEqual(extents[:3], [Extent(512, 0), Extent(512, HOLE), Extent(512, 0)])

    def test_zeroing_frees_pages(self) -> None:
        """
        Trimming or zeroing whole pages frees them; zeroing part of a page
        frees it only once the whole page is zero.
        """
        page = 64 * KiB
        device = MemoryBlockDevice(MiB, page_size=page)
        self.successResultOf(device.write(0, pattern(4 * page)))
        self.assertEqual(device.page_count, 4)
        self.successResultOf(device.trim(0, page))
        self.successResultOf(device.write_zeroes(page, page))
        self.assertEqual(device.page_count, 2)
        self.successResultOf(device.write_zeroes(2 * page, 100))
        self.assertEqual(device.page_count, 2)
        self.successResultOf(device.trim(2 * page + 100, page - 100))
        self.assertEqual(device.page_count, 1)
        self.assertEqual(self.successResultOf(device.read(0, 3 * page)), bytes(3 * page))

    def test_no_hole_allocates(self) -> None:
        """
        Zeroing without permission to trim keeps pages, and allocates
        absent ones, as NO_HOLE asks.
        """
        page = 64 * KiB
        device = MemoryBlockDevice(MiB, page_size=page)
        self.successResultOf(device.write(0, pattern(page)))
        self.successResultOf(device.write_zeroes(0, 2 * page, may_trim=False))
        self.assertEqual(device.page_count, 2)
        self.assertEqual(self.successResultOf(device.read(0, 2 * page)), bytes(2 * page))
        extents = self.successResultOf(device.block_status(0, 2 * page))
        # Allocated (no HOLE bit) and known to read as zeroes.
        self.assertEqual(list(extents), [Extent(2 * page, STATE_ZERO)])

    def test_fast_zero_succeeds(self) -> None:
        """Zeroing memory is always fast, so a fast zero never fails."""
        device = MemoryBlockDevice(MiB)
        self.successResultOf(device.write(0, pattern(MiB)))
        self.successResultOf(device.write_zeroes(5, MiB - 10, fast=True, may_trim=False))
        self.successResultOf(device.write_zeroes(5, MiB - 10, fast=True))
        self.assertEqual(
            self.successResultOf(device.read(0, MiB)),
            pattern(MiB)[:5] + bytes(MiB - 10) + pattern(MiB)[-5:],
        )

    def test_read_is_a_copy(self) -> None:
        """What a read returned does not change when the device is written."""
        device = MemoryBlockDevice(MiB)
        self.successResultOf(device.write(0, b"before"))
        data = self.successResultOf(device.read(0, 6))
        self.successResultOf(device.write(0, b"after!"))
        self.assertEqual(bytes(data), b"before")

    def test_write_accepts_bytes_like_objects(self) -> None:
        """A write accepts any bytes-like object, such as a memoryview."""
        device = MemoryBlockDevice(MiB)
        self.successResultOf(device.write(3, cast(bytes, memoryview(b"xyz"))))
        self.successResultOf(device.write(6, cast(bytes, bytearray(b"uvw"))))
        self.assertEqual(self.successResultOf(device.read(3, 6)), b"xyzuvw")

    def test_capabilities(self) -> None:
        """
        By default a memory device can do everything, zeroing fast; other
        capabilities can be given.
        """
        device = MemoryBlockDevice(MiB)
        self.assertEqual(device.capabilities, DEFAULT_CAPABILITIES)
        caps = device.capabilities
        self.assertTrue(caps.can_fast_zero and caps.can_cache and caps.can_extents)
        self.assertTrue(caps.can_multi_conn and caps.can_write and caps.can_zero)
        read_only = Capabilities(can_write=False)
        self.assertIs(MemoryBlockDevice(MiB, read_only).capabilities, read_only)

    def test_invalid_arguments(self) -> None:
        """A negative size or a page size that is not positive is refused."""
        self.assertRaises(ValueError, MemoryBlockDevice, -1)
        self.assertRaises(ValueError, MemoryBlockDevice, MiB, page_size=0)

    def test_empty_device(self) -> None:
        """A device of no bytes reads no bytes."""
        device = MemoryBlockDevice(0)
        self.assertEqual(self.successResultOf(device.read(0, 0)), b"")

    def test_close_releases_memory(self) -> None:
        """Closing drops every page, and closing again is harmless."""
        device = MemoryBlockDevice(MiB)
        self.successResultOf(device.write(0, pattern(MiB)))
        self.assertIsNone(self.successResultOf(device.close()))
        self.assertEqual(device.page_count, 0)
        self.assertIsNone(self.successResultOf(device.close()))

    def test_errors_fail_the_deferred(self) -> None:
        """A bug inside an operation fails its Deferred instead of raising."""
        device = MemoryBlockDevice(MiB)
        failure = self.failureResultOf(device.write(0, cast(bytes, object())), TypeError)
        self.assertIsInstance(failure.value, TypeError)


class FileConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """
    The file backend passes the conformance tests, with its own thread pool.
    """

    def setUp(self) -> None:
        self.directory = temp_directory(self)
        self.threadpool = ThreadPool(minthreads=0, maxthreads=4, name="test_backends")
        self.threadpool.start()
        self.addCleanup(self.threadpool.stop)

    def make_device(self, size: int) -> IBlockDevice:
        path = os.path.join(self.directory, f"disk{len(os.listdir(self.directory))}.img")
        create_image(path, size)
        return FileBlockDevice(path, threadpool=self.threadpool)


class FakeThreadPool:
    """
    Enough of a L{ThreadPool} for L{deferToThreadPool}: it keeps each job
    until the test runs it, so a test decides when a "thread" finishes.
    """

    #: Threads a real pool would run at most (the batching runner reads it).
    max = 8

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, object], None], f: Callable[..., object], *a: Any
    ) -> None:
        def job() -> None:
            try:
                result = f(*a)
            except BaseException as e:
                from twisted.python.failure import Failure

                on_result(False, Failure(e))
            else:
                on_result(True, result)

        self.jobs.append(job)

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


class ImmediateReactor:
    """A reactor whose C{callFromThread} runs the call at once."""

    def callFromThread(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class FileBlockDeviceTests(TestCase):
    """
    Tests for L{FileBlockDevice} beyond the conformance tests.
    """

    def setUp(self) -> None:
        self.directory = temp_directory(self)
        self.path = os.path.join(self.directory, "disk.img")

    def open(self, size: int = 4 * MiB, **kwargs: Any) -> FileBlockDevice:
        """Create an image if there is none and open it, closing it later."""
        create_image(self.path, size)
        device = FileBlockDevice(self.path, **kwargs)
        self.addCleanup(device.close)
        return device

    def open_controlled(
        self, size: int = 4 * MiB, nowait: bool = False, inline: bool = False
    ) -> tuple[FileBlockDevice, FakeThreadPool]:
        """
        Open a device whose pool jobs run only when the test says. Reads
        from the page cache in the calling thread are off unless C{nowait},
        and writes in the calling thread unless C{inline}, so requests take
        the pool path these tests control.
        """
        pool = FakeThreadPool()
        device = self.open(
            size,
            reactor=cast(IReactorFromThreads, ImmediateReactor()),
            threadpool=cast(ThreadPool, pool),
        )
        device._nowait = nowait
        device._inline_writes = inline
        return device, pool

    # Writes done in the calling thread when they cannot wait on the disk.

    def inline_device(self, dirty_ok: bool = True) -> tuple[FileBlockDevice, FakeThreadPool]:
        """A device that writes inline, with the kernel far from throttling (or not)."""
        device, pool = self.open_controlled(nowait=True, inline=True)
        device._write_nowait = False  # ext4's case: the checks decide
        guard = DirtyPageGuard()
        guard.allows = lambda: dirty_ok  # type: ignore[method-assign]
        device._dirty = guard
        return device, pool

    def test_inline_write(self) -> None:
        """A small page-aligned write is done at once, with no pool job."""
        device, pool = self.inline_device()
        d = device.write(4096, b"a" * 4096)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(pool.jobs, [])
        with open(self.path, "rb") as f:
            f.seek(4096)
            self.assertEqual(f.read(4096), b"a" * 4096)

    def test_inline_write_needs_cached_edges(self) -> None:
        """
        A write that covers a page in part goes inline only if that page is
        cached; otherwise the kernel would read it from disk first, so the
        pool does it.
        """
        device, pool = self.inline_device()
        probes: list[int] = []

        def not_cached(fd: int, buffers: list[bytearray], offset: int, flags: int) -> int:
            probes.append(offset)
            raise BlockingIOError(errno.EAGAIN, "would block")

        self.patch(device, "_preadv", not_cached)
        d = device.write(100, b"b" * 10)
        self.assertEqual(probes, [0])
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(110)[100:], b"b" * 10)

    def test_inline_write_when_dirty(self) -> None:
        """Near the kernel's dirty limits, writes go to the pool."""
        device, pool = self.inline_device(dirty_ok=False)
        d = device.write(0, b"c" * 4096)
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))

    def test_fua_write_not_inline(self) -> None:
        """A FUA write needs fdatasync, which may block: always the pool."""
        device, pool = self.inline_device()
        d = device.write(0, b"d" * 4096, fua=True)
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))

    def test_large_write_not_inline(self) -> None:
        """Writes over INLINE_WRITE_MAX go to the pool."""
        device, pool = self.inline_device()
        d = device.write(0, bytes(INLINE_WRITE_MAX + 4096))
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))

    def test_slow_inline_write(self) -> None:
        """One slow inline write sends the next ones to the pool for a while."""
        device, pool = self.inline_device()
        now = [100.0]
        device._now = lambda: now[0]
        real = device._pwrite

        def slow(fd: int, data: memoryview, offset: int) -> int:
            now[0] += SLOW_INLINE_WRITE * 2
            return real(fd, data, offset)

        self.patch(device, "_pwrite", slow)
        self.successResultOf(device.write(0, b"e" * 4096))
        d = device.write(4096, b"f" * 4096)
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))
        now[0] += INLINE_COOLDOWN + 1
        self.successResultOf(device.write(8192, b"g" * 4096))
        self.assertEqual(pool.jobs, [])

    def test_long_wait_longer_cooldown(self) -> None:
        """
        The pool keeps the writes for INLINE_COOLDOWN_FACTOR times as long
        as the slow one took (so inline writes hold the reactor up a small
        share of the time at most), within bounds.
        """
        device, pool = self.inline_device()
        now = [100.0]
        device._now = lambda: now[0]
        real = device._pwrite
        took = [0.1]

        def slow(fd: int, data: memoryview, offset: int) -> int:
            now[0] += took[0]
            return real(fd, data, offset)

        self.patch(device, "_pwrite", slow)
        self.successResultOf(device.write(0, b"e" * 4096))
        took[0] = 0.0
        now[0] += 0.1 * INLINE_COOLDOWN_FACTOR - 0.05
        d = device.write(4096, b"f" * 4096)
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))
        now[0] += 0.2
        self.successResultOf(device.write(8192, b"g" * 4096))
        self.assertEqual(pool.jobs, [])
        # A very long one: at most INLINE_COOLDOWN_MAX.
        took[0] = 60.0
        self.successResultOf(device.write(0, b"h" * 4096))
        took[0] = 0.0
        now[0] += INLINE_COOLDOWN_MAX + 0.1
        self.successResultOf(device.write(0, b"i" * 4096))

    def slow_clock(self, device: FileBlockDevice, slept: bool) -> list[int]:
        """
        Every write through C{device} takes twice L{SLOW_INLINE_WRITE} by
        the clock, and sleeps in the kernel (a voluntary context switch) if
        C{slept}; the returned list counts the switch counter's reads.
        """
        now = [100.0]
        device._now = lambda: now[0]
        switches = [0]
        reads = [0]

        def counted() -> int:
            reads[0] += 1
            return switches[0]

        device._switches = counted
        real_pwrite, real_splice = device._pwrite, device._splice

        def slow_pwrite(fd: int, data: memoryview, offset: int) -> int:
            now[0] += SLOW_INLINE_WRITE * 2
            switches[0] += slept
            return real_pwrite(fd, data, offset)

        def slow_splice(*args: Any, **kwargs: Any) -> int:
            now[0] += SLOW_INLINE_WRITE * 2
            switches[0] += slept
            return real_splice(*args, **kwargs)

        self.patch(device, "_pwrite", slow_pwrite)
        self.patch(device, "_splice", slow_splice)
        return reads

    def test_preempted_inline_write(self) -> None:
        """
        A large inline write that is slow without ever sleeping had its CPU
        taken (steal, another task), not the disk's wait: inline writes go
        on, and it is counted. One that slept turns them off, as ever.
        """
        device, pool = self.inline_device()
        reads = self.slow_clock(device, slept=False)
        size = SWITCHES_CHECK_MIN
        self.successResultOf(device.write(0, b"e" * size))
        self.successResultOf(device.write(size, b"f" * size))
        self.assertEqual((device.preempted_writes, reads[0], pool.jobs), (2, 4, []))
        device, pool = self.inline_device()
        self.slow_clock(device, slept=True)
        self.successResultOf(device.write(0, b"e" * size))
        d = device.write(size, b"f" * size)
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))
        self.assertEqual(device.preempted_writes, 0)

    def test_small_inline_write_not_counted(self) -> None:
        """
        Below L{SWITCHES_CHECK_MIN} the switches are not counted (the two
        calls would cost as much as the write): slow means slow.
        """
        device, pool = self.inline_device()
        reads = self.slow_clock(device, slept=False)
        self.successResultOf(device.write(0, b"e" * 4096))
        d = device.write(4096, b"f" * 4096)
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))
        self.assertEqual((device.preempted_writes, reads[0]), (0, 0))

    def test_inline_write_error(self) -> None:
        """An inline write that fails fails its Deferred with the mapped errno."""
        device, pool = self.inline_device()

        def full(fd: int, data: memoryview, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(device, "_pwrite", full)
        error = self.failureResultOf(device.write(0, b"h" * 4096), NBDError).value
        self.assertEqual(error.errno, Errno.ENOSPC)
        self.assertIn("offset 0", str(error))

    # Payloads moved from a pipe (IPipeWrite).

    def piped(self, data: bytes) -> int:
        """A pipe holding C{data}; its read end, both ends closed later."""
        read, write = os.pipe2(os.O_NONBLOCK)
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        fcntl.fcntl(write, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1024 * 1024)
        self.assertEqual(os.write(write, data), len(data))
        return read

    def left_in(self, pipe: int) -> int:
        try:
            return len(os.read(pipe, 2 * MiB))
        except BlockingIOError:
            return 0

    def test_pipe_write_inline(self) -> None:
        """
        A payload in a pipe moves to the file at once where a buffered write
        may be done inline: no pool job, the pipe emptied, the bytes around
        unchanged.
        """
        device, pool = self.inline_device()
        data = os.urandom(MiB)
        pipe = self.piped(data)
        self.assertIsNone(self.successResultOf(device.write_from_pipe(pipe, 4096, MiB, False)))
        self.assertEqual(pool.jobs, [])
        self.assertEqual(self.left_in(pipe), 0)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(4096 + MiB + 4096), bytes(4096) + data + bytes(4096))

    def test_pipe_write_in_pool(self) -> None:
        """
        Near the kernel's dirty limits, with FUA (which also syncs), or with
        inline writes off, the pool does the move.
        """
        synced: list[int] = []
        self.patch(file_module, "_fdatasync", synced.append)
        for dirty_ok, fua, inline in [
            (False, False, True),
            (True, True, True),
            (True, False, False),
        ]:
            device, pool = self.inline_device(dirty_ok=dirty_ok)
            device._inline_writes = inline
            data = os.urandom(256 * 1024)
            pipe = self.piped(data)
            d = device.write_from_pipe(pipe, 0, len(data), fua)
            self.assertNoResult(d)
            self.assertIsNone(self.run_(pool, d))
            self.assertEqual(self.left_in(pipe), 0)
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(len(data)), data)
        self.assertEqual(len(synced), 1)

    def test_pipe_write_preempted(self) -> None:
        """
        A move that is slow without sleeping leaves inline moves on; one
        that slept sends the next to the pool.
        """
        for slept in (False, True):
            device, pool = self.inline_device()
            self.slow_clock(device, slept)
            for offset in (0, MiB):
                data = os.urandom(256 * 1024)
                d = device.write_from_pipe(self.piped(data), offset, len(data), False)
                if slept and offset:
                    self.assertNoResult(d)
                    self.run_(pool, d)
            self.successResultOf(d)
            self.assertEqual(device.preempted_writes, 0 if slept else 2)
            self.assertEqual(len(pool.jobs), 0)

    def test_pipe_write_error(self) -> None:
        """A move that fails fails the Deferred with the mapped errno, inline or in the pool."""
        device, pool = self.inline_device()

        def full(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(device, "_splice", full)
        pipe = self.piped(b"x" * 4096)
        error = self.failureResultOf(device.write_from_pipe(pipe, 0, 4096, False), NBDError)
        self.assertEqual(error.value.errno, Errno.ENOSPC)
        self.assertIn("offset 0", str(error.value))
        d = device.write_from_pipe(pipe, 8192, 4096, True)
        pool.run_all()
        self.assertEqual(self.failureResultOf(d, NBDError).value.errno, Errno.ENOSPC)

    def test_pipe_runs_dry(self) -> None:
        """A pipe holding less than it should fails the write rather than wait or spin."""
        device, pool = self.inline_device()
        pipe = self.piped(b"y" * 4096)
        self.failureResultOf(device.write_from_pipe(pipe, 0, 8192, False), NBDError)

    def test_nowait_write(self) -> None:
        """
        Where the kernel takes RWF_NOWAIT for buffered writes, it decides:
        written at once, or (EAGAIN) in the pool; where it does not, the
        device falls back to its own checks.
        """
        device, pool = self.inline_device()
        device._write_nowait = True
        calls: list[int] = []

        def nowait(fd: int, buffers: list[Any], offset: int, flags: int) -> int:
            calls.append(offset)
            if offset == 0:
                return os.pwrite(fd, buffers[0], offset)
            if offset == 4096:
                raise BlockingIOError(errno.EAGAIN, "would block")
            raise OSError(errno.EOPNOTSUPP, "not for buffered writes")

        self.patch(device, "_pwritev", nowait)
        self.successResultOf(device.write(0, b"i" * 4096))
        d = device.write(4096, b"j" * 4096)
        self.assertNoResult(d)
        self.assertIsNone(self.run_(pool, d))
        self.successResultOf(device.write(8192, b"k" * 4096))
        self.assertFalse(device._write_nowait)
        self.assertEqual(calls, [0, 4096, 8192])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(12288), b"i" * 4096 + b"j" * 4096 + b"k" * 4096)

    # Reads served from the page cache without the pool.

    def test_cached_read_skips_pool(self) -> None:
        """A small read of cached data is answered at once, with no pool job."""
        device, pool = self.open_controlled(nowait=True)
        with open(self.path, "r+b") as f:
            f.write(pattern(10000))
        d = device.read(1, 9000)
        self.assertEqual(pool.jobs, [])
        self.assertEqual(self.successResultOf(d), pattern(10000)[1:9001])

    def test_uncached_read_uses_pool(self) -> None:
        """When the kernel would block (EAGAIN), the read goes to the pool."""
        device, pool = self.open_controlled(nowait=True)

        def would_block(fd: int, buffers: list[bytearray], offset: int, flags: int) -> int:
            raise BlockingIOError(errno.EAGAIN, "would block")

        self.patch(device, "_preadv", would_block)
        d = device.read(0, 4096)
        self.assertNoResult(d)
        self.assertEqual(self.run_(pool, d), bytes(4096))
        self.assertTrue(device._nowait)

    def test_partly_cached_read_uses_pool(self) -> None:
        """A short non-blocking read is thrown away and the pool reads it all."""
        device, pool = self.open_controlled(nowait=True)
        self.patch(device, "_preadv", lambda fd, buffers, offset, flags: 100)
        d = device.read(0, 4096)
        self.assertNoResult(d)
        self.assertEqual(self.run_(pool, d), bytes(4096))

    def test_nowait_unsupported(self) -> None:
        """Where RWF_NOWAIT is not supported, the device stops trying it."""
        device, pool = self.open_controlled(nowait=True)

        def unsupported(fd: int, buffers: list[bytearray], offset: int, flags: int) -> int:
            raise OSError(errno.EOPNOTSUPP, "not supported")

        self.patch(device, "_preadv", unsupported)
        self.assertEqual(self.run_(pool, device.read(0, 16)), bytes(16))
        self.assertFalse(device._nowait)

    def test_large_read_uses_pool(self) -> None:
        """Reads over NOWAIT_READ_MAX always go to the pool."""
        device, pool = self.open_controlled(nowait=True)
        d = device.read(0, NOWAIT_READ_MAX + 1)
        self.assertNoResult(d)
        self.assertEqual(self.run_(pool, d), bytes(NOWAIT_READ_MAX + 1))

    def run_(self, pool: FakeThreadPool, d: Deferred[Any]) -> Any:
        """Run the pool's jobs and return what C{d} fired with."""
        pool.run_all()
        return self.successResultOf(d)

    def run_failure(self, pool: FakeThreadPool, d: Deferred[Any]) -> NBDError:
        """Run the pool's jobs and return the L{NBDError} C{d} failed with."""
        pool.run_all()
        return cast(NBDError, self.failureResultOf(d, NBDError).value)

    # Opening.

    def test_provides_i_block_device(self) -> None:
        """A file device provides L{IBlockDevice}."""
        self.assertTrue(verifyObject(IBlockDevice, self.open()))

    def test_size_from_file(self) -> None:
        """The size is the file's size when it was opened."""
        with open(self.path, "wb") as f:
            f.write(b"x" * 12345)
        self.assertEqual(self.open().size, 12345)

    def test_read_write_capabilities(self) -> None:
        """
        A writable file device opens the file for reading and writing and
        can do everything, multi-conn included.
        """
        device = self.open()
        self.assertEqual(fcntl.fcntl(device._fd, fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDWR)
        caps = device.capabilities
        for name in ("can_write", "can_flush", "can_fua", "can_trim", "can_zero", "can_cache"):
            self.assertTrue(getattr(caps, name), name)
        self.assertTrue(caps.can_extents and caps.can_multi_conn)
        self.assertEqual(caps.can_fast_zero, sys.platform.startswith("linux"))

    def test_read_only(self) -> None:
        """
        A read-only file device opens the file read-only and advertises no
        way of changing it.
        """
        device = self.open(read_only=True)
        self.assertEqual(fcntl.fcntl(device._fd, fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDONLY)
        caps = device.capabilities
        for name in ("can_write", "can_fua", "can_trim", "can_zero", "can_fast_zero"):
            self.assertFalse(getattr(caps, name), name)

    def test_read_only_opens_unwritable_file(self) -> None:
        """
        A file that cannot be written can be served read-only, but opening
        it for writing raises an L{OSError} naming the file.
        """
        create_image(self.path, MiB)
        os.chmod(self.path, 0o444)
        if os.geteuid() == 0:
            # Root may write to any file: refuse the way the kernel would.
            real_open = os.open

            def open(path: str, flags: int, *args: Any) -> int:
                if flags & os.O_ACCMODE != os.O_RDONLY:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
                return real_open(path, flags, *args)

            self.patch(os, "open", open)
        error = self.assertRaises(PermissionError, FileBlockDevice, self.path)
        self.assertIn(self.path, str(error))
        self.assertIn("writing", str(error))
        device = FileBlockDevice(self.path, read_only=True)
        self.addCleanup(device.close)
        self.assertFalse(device.capabilities.can_write)

    def test_open_missing(self) -> None:
        """Opening a file that does not exist raises an error naming it."""
        error = self.assertRaises(FileNotFoundError, FileBlockDevice, self.path)
        self.assertEqual(error.errno, errno.ENOENT)
        self.assertIn(self.path, str(error))

    def test_open_directory(self) -> None:
        """A directory is neither a file nor a block device."""
        error = self.assertRaises(OSError, FileBlockDevice, self.directory, read_only=True)
        self.assertEqual(error.errno, errno.EINVAL)

    def test_block_device_size_from_end(self) -> None:
        """The size of a block device is found by seeking to its end."""
        with open(self.path, "wb") as f:
            f.write(b"x" * 5000)
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.patch(os, "fstat", lambda fd: self.fail("fstat used for a block device"))
        self.assertEqual(file_module._device_size(fd, stat.S_IFBLK | 0o600), 5000)

    def test_library_does_not_import_reactor(self) -> None:
        """Importing the backends does not install the global reactor."""
        code = (
            "import sys, twisted_nbd.backends.file, twisted_nbd.backends.memory\n"
            "print('twisted.internet.reactor' in sys.modules)"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        output = subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(output.strip(), "False")

    async def test_default_thread_pool(self) -> None:
        """Without a reactor or pool, the global reactor's pool is used."""
        device = self.open()
        await device.write(5, b"hello")
        self.assertEqual(await device.read(3, 9), b"\0\0hello\0\0")

    def test_no_thread_pool(self) -> None:
        """
        A reactor that has no thread pool, and no pool given, fails each
        request's Deferred rather than raising.
        """
        device = self.open(reactor=cast(IReactorFromThreads, ImmediateReactor()))
        self.failureResultOf(device.flush(), TypeError)
        # Reads of cached data need no pool at all; others fail the same way.
        device._nowait = False
        self.failureResultOf(device.read(0, 1), TypeError)

    def test_durability(self) -> None:
        """
        FUA writes, trims and zeroes, and flushes, call C{fdatasync} after
        their work, in the same job; other requests do not.
        """
        device, pool = self.open_controlled()
        synced: list[str] = []
        self.patch(file_module, "_fdatasync", lambda fd: synced.append("sync"))

        def pwrite(fd: int, data: memoryview, offset: int) -> int:
            synced.append("write")
            return os.pwrite(fd, data, offset)

        self.patch(device, "_pwrite", pwrite)
        self.run_(pool, device.write(0, b"x"))
        self.assertEqual(synced, ["write"])
        self.run_(pool, device.write(0, b"x", fua=True))
        self.assertEqual(synced, ["write", "write", "sync"])
        del synced[:]
        self.run_(pool, device.trim(0, 4096))
        self.run_(pool, device.write_zeroes(0, 4096))
        self.run_(pool, device.read(0, 1))
        self.run_(pool, device.block_status(0, 1))
        self.run_(pool, device.cache(0, 1))
        self.assertEqual(synced, [])
        self.run_(pool, device.trim(0, 4096, fua=True))
        self.run_(pool, device.write_zeroes(0, 4096, fua=True))
        self.run_(pool, device.flush())
        self.assertEqual(synced, ["sync", "sync", "sync"])

    # create_image.

    def test_create_image(self) -> None:
        """C{create_image} makes a sparse file of the given size."""
        self.assertTrue(create_image(self.path, 64 * MiB))
        info = os.stat(self.path)
        self.assertEqual(info.st_size, 64 * MiB)
        self.assertLess(info.st_blocks * 512, MiB)

    def test_create_image_keeps_existing(self) -> None:
        """C{create_image} neither overwrites nor resizes an existing file."""
        with open(self.path, "wb") as f:
            f.write(b"precious")
        self.assertFalse(create_image(self.path, MiB))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"precious")

    def test_create_image_negative(self) -> None:
        """A negative size is refused and nothing is created."""
        self.assertRaises(ValueError, create_image, self.path, -1)
        self.assertFalse(os.path.exists(self.path))

    def test_create_image_too_big(self) -> None:
        """If the size cannot be set, no file is left behind."""

        def too_big(fd: int, size: int) -> None:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

        self.patch(os, "ftruncate", too_big)
        error = self.assertRaises(OSError, create_image, self.path, 2**62)
        self.assertEqual(error.errno, errno.EFBIG)
        self.assertFalse(os.path.exists(self.path))

    # Reading and writing.

    def test_short_reads(self) -> None:
        """A read that the kernel answers in pieces is completed."""
        device, pool = self.open_controlled()
        with open(self.path, "r+b") as f:
            f.write(pattern(10000))
        calls = []

        def short_pread(fd: int, length: int, offset: int) -> bytes:
            calls.append((length, offset))
            return os.pread(fd, min(length, 999), offset)

        self.patch(device, "_pread", short_pread)
        self.assertEqual(self.run_(pool, device.read(1, 9000)), pattern(10000)[1:9001])
        self.assertEqual(len(calls), 10)
        self.assertEqual(calls[1], (9000 - 999, 1000))

    def test_read_past_shrunken_end(self) -> None:
        """
        If the file shrinks under the device, what lies past its new end
        reads as zeroes.
        """
        device, pool = self.open_controlled()
        self.run_(pool, device.write(0, pattern(8192)))
        os.truncate(self.path, 4096)
        self.assertEqual(
            self.run_(pool, device.read(4000, 8192)), pattern(4096)[4000:] + bytes(8096)
        )

    def test_short_writes(self) -> None:
        """A write that the kernel takes in pieces is completed."""
        device, pool = self.open_controlled()
        calls = []

        def short_pwrite(fd: int, data: memoryview, offset: int) -> int:
            calls.append(offset)
            return os.pwrite(fd, data[:1000], offset)

        self.patch(device, "_pwrite", short_pwrite)
        self.run_(pool, device.write(7, pattern(4500)))
        self.assertEqual(calls, [7, 1007, 2007, 3007, 4007])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(4507), bytes(7) + pattern(4500))

    def test_write_without_progress(self) -> None:
        """A write that makes no progress fails with C{EIO} instead of spinning."""
        device, pool = self.open_controlled()
        self.patch(device, "_pwrite", lambda fd, data, offset: 0)
        self.assertEqual(self.run_failure(pool, device.write(0, b"x")).errno, Errno.EIO)

    def test_write_no_space(self) -> None:
        """
        A full file system fails the write with C{ENOSPC}, saying what
        failed where.
        """
        device, pool = self.open_controlled()

        def full(fd: int, data: memoryview, offset: int) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(device, "_pwrite", full)
        error = self.run_failure(pool, device.write(4096, b"x"))
        self.assertEqual(error.errno, Errno.ENOSPC)
        self.assertIn("write at offset 4096", error.message)
        self.assertIn(os.strerror(errno.ENOSPC), error.message)

    def test_read_io_error(self) -> None:
        """A failing disk fails the read with C{EIO}."""
        device, pool = self.open_controlled()

        def broken(fd: int, length: int, offset: int) -> bytes:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(device, "_pread", broken)
        error = self.run_failure(pool, device.read(512, 512))
        self.assertEqual(error.errno, Errno.EIO)
        self.assertIn("read at offset 512", error.message)

    def test_unknown_error_is_eio(self) -> None:
        """An errno the protocol has no name for becomes C{EIO}."""
        device, pool = self.open_controlled()

        def odd(fd: int, length: int, offset: int) -> bytes:
            raise OSError(errno.EBADMSG, os.strerror(errno.EBADMSG))

        self.patch(device, "_pread", odd)
        self.assertEqual(self.run_failure(pool, device.read(0, 1)).errno, Errno.EIO)

    def test_errno_mapping(self) -> None:
        """Host errors that the protocol can express keep their meaning."""
        for host, wire in [
            (errno.ENOSPC, Errno.ENOSPC),
            (errno.EDQUOT, Errno.ENOSPC),
            (errno.EIO, Errno.EIO),
            (errno.EROFS, Errno.EPERM),
            (errno.EBADMSG, Errno.EIO),
        ]:
            self.assertEqual(errno_from_os_error(OSError(host, "x")), wire, errno.errorcode[host])

    # Discarding and zeroing, with fallocate under the test's control.

    def fake_fallocate(
        self, unsupported: set[int], failure: int | None = None, pretend: bool = False
    ) -> list[int]:
        """
        Replace C{fallocate}: modes in C{unsupported} fail with
        C{EOPNOTSUPP}, every mode fails with C{failure} if given, and the
        others really run (or, with C{pretend}, succeed doing nothing, as
        if every mode worked whatever the file system).

        @return: the list to which the modes tried are appended.
        """
        real = file_module._fallocate
        tried: list[int] = []

        def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
            tried.append(mode)
            if failure is not None:
                raise OSError(failure, os.strerror(failure))
            if mode in unsupported:
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            if not pretend:
                real(fd, mode, offset, length)

        self.patch(file_module, "_fallocate", fallocate)
        return tried

    def filled(self) -> tuple[FileBlockDevice, FakeThreadPool]:
        """A controlled device whose first 4 MiB hold a pattern."""
        device, pool = self.open_controlled(8 * MiB)
        self.run_(pool, device.write(0, pattern(4 * MiB)))
        return device, pool

    def contents(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def test_fast_zero_unsupported(self) -> None:
        """
        Where no C{fallocate} mode works, a fast zero fails with C{ENOTSUP}
        and changes nothing, while a normal one writes zeroes in bounded
        chunks.
        """
        device, pool = self.filled()
        tried = self.fake_fallocate(
            {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}
        )
        for may_trim in (True, False):
            error = self.run_failure(
                pool, device.write_zeroes(MiB, 2 * MiB, may_trim=may_trim, fast=True)
            )
            self.assertEqual(error.errno, Errno.ENOTSUP)
        self.assertEqual(self.contents(0, 4 * MiB), pattern(4 * MiB))
        self.assertTrue(tried)

        writes: list[int] = []

        def pwrite(fd: int, data: memoryview, offset: int) -> int:
            writes.append(len(data))
            return os.pwrite(fd, data, offset)

        self.patch(device, "_pwrite", pwrite)
        self.run_(pool, device.write_zeroes(MiB + 1, 2 * MiB + 5, may_trim=False))
        self.assertEqual(max(writes), ZERO_CHUNK)
        self.assertEqual(sum(writes), 2 * MiB + 5)
        self.assertEqual(
            self.contents(0, 4 * MiB),
            pattern(4 * MiB)[: MiB + 1] + bytes(2 * MiB + 5) + pattern(4 * MiB)[3 * MiB + 6 :],
        )

    def test_trim_unsupported(self) -> None:
        """Where holes cannot be punched, trim succeeds and does nothing."""
        device, pool = self.filled()
        self.fake_fallocate({FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE})
        self.assertIsNone(self.run_(pool, device.trim(0, MiB)))
        self.assertEqual(self.contents(0, MiB), pattern(MiB))

    def test_unsupported_mode_remembered(self) -> None:
        """A mode found unsupported is not tried again."""
        device, pool = self.filled()
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        tried = self.fake_fallocate({punch})
        self.run_(pool, device.trim(0, MiB))
        self.run_(pool, device.trim(0, MiB))
        self.assertEqual(tried, [punch])

    def test_no_hole_without_zero_range(self) -> None:
        """
        Without zero-range, zeroing with NO_HOLE punches a hole and
        allocates it again, never leaving a plain hole behind on purpose.
        """
        device, pool = self.filled()
        tried = self.fake_fallocate({FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE})
        self.run_(pool, device.write_zeroes(MiB, MiB, may_trim=False))
        self.assertEqual(
            tried,
            [
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                FALLOC_FL_KEEP_SIZE,
            ],
        )
        original = pattern(4 * MiB)
        self.assertEqual(
            self.contents(MiB - 1, MiB + 2),
            original[MiB - 1 : MiB] + bytes(MiB) + original[2 * MiB : 2 * MiB + 1],
        )

    def test_may_trim_prefers_punching(self) -> None:
        """Zeroing that may trim punches a hole first."""
        device, pool = self.filled()
        tried = self.fake_fallocate(set(), pretend=True)
        self.run_(pool, device.write_zeroes(0, MiB, may_trim=True))
        self.run_(pool, device.write_zeroes(MiB, MiB, may_trim=False))
        self.assertEqual(
            tried,
            [
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
            ],
        )

    def test_fallocate_failure(self) -> None:
        """A real failure of C{fallocate} fails the request with its errno."""
        device, pool = self.filled()
        self.fake_fallocate(set(), failure=errno.EIO)
        error = self.run_failure(pool, device.write_zeroes(0, MiB))
        self.assertEqual(error.errno, Errno.EIO)
        self.assertIn("write_zeroes at offset 0", error.message)
        self.assertEqual(self.run_failure(pool, device.trim(0, MiB)).errno, Errno.EIO)

    # Block status against the file system.

    def lseek_extents(self, size: int) -> list[Extent]:
        """Walk a file's holes and data with C{lseek}, independently."""
        extents = []
        fd = os.open(self.path, os.O_RDONLY)
        try:
            position = 0
            while position < size:
                try:
                    data = os.lseek(fd, position, os.SEEK_DATA)
                except OSError as e:
                    self.assertEqual(e.errno, errno.ENXIO)
                    data = size
                if data > position:
                    extents.append(Extent(data - position, HOLE))
                    position = data
                else:
                    end = os.lseek(fd, position, os.SEEK_HOLE)
                    extents.append(Extent(end - position, 0))
                    position = end
        finally:
            os.close(fd)
        return extents

    async def test_block_status_matches_lseek(self) -> None:
        """
        Block status over a file with a hole in the middle says what
        C{lseek} says, and on file systems with holes, that is exactly the
        hole.
        """
        create_image(self.path, 4 * MiB)
        fd = os.open(self.path, os.O_WRONLY)
        os.pwrite(fd, pattern(MiB), 0)
        os.pwrite(fd, pattern(MiB), 3 * MiB)
        os.close(fd)
        device = self.open()
        extents = list(await device.block_status(0, device.size))
        self.assertEqual(extents, self.lseek_extents(device.size))
        if holes_work(self.directory):
            self.assertEqual(extents, [Extent(MiB, 0), Extent(2 * MiB, HOLE), Extent(MiB, 0)])
        # Inside the hole, a short request gets exactly what it asked for.
        extents = list(await device.block_status(MiB + 5, 100))
        position, reality = 0, -1
        for extent in self.lseek_extents(device.size):
            if position <= MiB + 5 < position + extent.length:
                reality = extent.flags
            position += extent.length
        self.assertEqual(extents, [Extent(100, reality)])

    async def test_trim_punches_hole(self) -> None:
        """
        On a file system that punches holes, trim and zeroing with may-trim
        free the blocks and block status reports the holes.
        """
        if not holes_work(self.directory):
            raise SkipTest("this file system does not punch holes")
        device = self.open()
        await device.write(0, pattern(4 * MiB))
        await device.flush()
        before = os.stat(self.path).st_blocks
        await device.trim(MiB, MiB)
        await device.write_zeroes(3 * MiB, MiB, may_trim=True)
        self.assertLessEqual(os.stat(self.path).st_blocks, before - 2 * MiB // 512)
        extents = list(await device.block_status(0, device.size))
        self.assertEqual(
            extents, [Extent(MiB, 0), Extent(MiB, HOLE), Extent(MiB, 0), Extent(MiB, HOLE)]
        )

    async def test_zero_range_stays_allocated(self) -> None:
        """
        Zeroing with NO_HOLE keeps the blocks allocated (whatever block
        status says: ext4 reports unwritten extents as holes).
        """
        if not holes_work(self.directory):
            raise SkipTest("this file system does not punch holes")
        device = self.open()
        await device.write(0, pattern(2 * MiB))
        await device.flush()
        before = os.stat(self.path).st_blocks
        await device.write_zeroes(0, 2 * MiB, may_trim=False)
        self.assertGreaterEqual(os.stat(self.path).st_blocks, before)
        self.assertEqual(await device.read(0, 2 * MiB), bytes(2 * MiB))

    async def test_block_status_capped(self) -> None:
        """
        Block status over a badly fragmented file stops after
        L{MAX_EXTENTS} extents.
        """
        if not holes_work(self.directory):
            raise SkipTest("this file system does not punch holes")
        size = 2 * (MAX_EXTENTS + 10) * 4 * KiB
        create_image(self.path, size)
        fd = os.open(self.path, os.O_WRONLY)
        for offset in range(0, size, 8 * KiB):
            os.pwrite(fd, b"d" * 4 * KiB, offset)
        os.close(fd)
        device = self.open()
        extents = list(await device.block_status(0, size))
        self.assertEqual(len(extents), MAX_EXTENTS)
        self.assertEqual(extents[:2], [Extent(4 * KiB, 0), Extent(4 * KiB, HOLE)])

    async def test_block_status_clamped_when_file_grew(self) -> None:
        """
        If the file grows after it was opened, block status still stops at
        the device's size.
        """
        device = self.open(MiB)
        with open(self.path, "ab") as f:
            f.write(pattern(MiB))
        extents = list(await device.block_status(MiB - 10, 10))
        self.assertEqual(sum(e.length for e in extents), 10)

    async def test_block_status_hole_to_end(self) -> None:
        """A hole that reaches the end of the file (C{ENXIO}) is one extent."""
        device = self.open(MiB)
        self.assertEqual(list(await device.block_status(0, MiB)), [Extent(MiB, HOLE)])

    # Closing.

    def test_close_waits_for_requests(self) -> None:
        """
        Closing while a request runs in the pool waits for it before closing
        the descriptor, whose number could otherwise be reused under the
        request.
        """
        device, pool = self.open_controlled()
        fd = device._fd
        reading = device.read(0, 10)
        closing = device.close()
        self.assertNoResult(closing)
        os.fstat(fd)  # still open
        pool.run_all()
        self.assertEqual(self.successResultOf(reading), bytes(10))
        self.assertIsNone(self.successResultOf(closing))
        error = self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(error.errno, errno.EBADF)

    def test_requests_after_close(self) -> None:
        """Requests after close fail with C{ESHUTDOWN}; closing again is harmless."""
        device, pool = self.open_controlled()
        self.assertIsNone(self.successResultOf(device.close()))
        error = self.failureResultOf(device.read(0, 1), NBDError).value
        self.assertEqual(cast(NBDError, error).errno, Errno.ESHUTDOWN)
        self.assertIsNone(self.successResultOf(device.close()))
        self.assertEqual(pool.jobs, [])


class MemoryHugeRangeTests(SynchronousTestCase):
    """
    Zeroing and trimming a memory device cost what is allocated, not the
    length: they run in the reactor thread, so a huge request must not stall
    the server (it once took minutes for 2^62 bytes).
    """

    SIZE = 2**63 - 4096

    def test_trim_huge_range(self) -> None:
        """Trimming 2^62 bytes drops the pages inside and keeps the others."""
        device = MemoryBlockDevice(self.SIZE)
        for offset in (0, 1 << 40, 1 << 61, (1 << 62) + 5, self.SIZE - 10):
            self.successResultOf(device.write(offset, b"data"))
        self.successResultOf(device.trim(1, 1 << 62))
        self.assertEqual(device.page_count, 3)
        self.assertEqual(self.successResultOf(device.read(0, 4)), b"d\0\0\0")
        self.assertEqual(self.successResultOf(device.read((1 << 62) + 5, 4)), b"data")
        self.assertEqual(self.successResultOf(device.read(1 << 40, 4)), bytes(4))

    def test_zero_huge_range(self) -> None:
        """Zeroing with may_trim over 2^62 bytes of an empty device allocates nothing."""
        device = MemoryBlockDevice(self.SIZE)
        self.successResultOf(device.write_zeroes(0, 1 << 62))
        self.assertEqual(device.page_count, 0)

    def test_no_hole_huge_range_refused(self) -> None:
        """A NO_HOLE zeroing that would allocate more than MAX_ALLOCATION fails with
        ENOSPC and changes nothing."""
        device = MemoryBlockDevice(self.SIZE)
        self.successResultOf(device.write(100, b"keep"))
        failure = self.failureResultOf(device.write_zeroes(0, 1 << 62, may_trim=False), NBDError)
        self.assertEqual(failure.value.errno, Errno.ENOSPC)
        self.assertEqual(self.successResultOf(device.read(100, 4)), b"keep")


class SparseReadMixin:
    """
    L{ISparseRead}: the segments of a sparse read cover the range in order
    and, with holes expanded to zeroes, equal a plain read.
    """

    def make_sparse_device(self, size: int) -> IBlockDevice:
        raise NotImplementedError

    async def test_read_sparse_matches_read(self) -> None:
        """Data runs hold the bytes; zero runs are long holes; both add up to read()."""
        device = self.make_sparse_device(4 * MiB)
        self.addCleanup(device.close)  # type: ignore[attr-defined]
        await device.write(5000, pattern(3000))
        await device.write(3 * MiB, pattern(100, seed=7))
        segments = await ISparseRead(device).read_sparse(1000, 3 * MiB)
        position, rebuilt = 1000, b""
        for at, part in segments:
            assert at == position, (at, position)
            if isinstance(part, int):
                assert part >= 4096, part
                rebuilt += bytes(part)
                position += part
            else:
                rebuilt += part
                position += len(part)
        assert position == 1000 + 3 * MiB
        assert rebuilt == await device.read(1000, 3 * MiB)
        assert any(isinstance(part, int) for _, part in segments), segments


class MemorySparseReadTests(SparseReadMixin, TestCase):
    """read_sparse on the memory backend."""

    def make_sparse_device(self, size: int) -> IBlockDevice:
        device = MemoryBlockDevice(size)
        assert ISparseRead.providedBy(device)
        return device


class FileSparseReadTests(SparseReadMixin, TestCase):
    """read_sparse on the file backend, in one pool job."""

    def make_sparse_device(self, size: int) -> IBlockDevice:
        path = os.path.join(temp_directory(self), "sparse.img")
        create_image(path, size)
        device = FileBlockDevice(path)
        assert ISparseRead.providedBy(device)
        return device


class MemoryZeroStatusTests(SynchronousTestCase):
    """Allocated pages known to be zero report STATE_ZERO (not HOLE)."""

    def test_no_hole_zero_reports_zero(self) -> None:
        """NO_HOLE zeroing leaves allocated zero pages: STATE_ZERO until written."""
        device = MemoryBlockDevice(1 * MiB)
        self.successResultOf(device.write(0, pattern(256 * KiB)))
        self.successResultOf(device.write_zeroes(0, 256 * KiB, may_trim=False))
        self.assertEqual(
            self.successResultOf(device.block_status(0, 1 * MiB)),
            [Extent(256 * KiB, STATE_ZERO), Extent(768 * KiB, HOLE)],
        )
        self.successResultOf(device.write(100, b"x"))
        self.assertEqual(
            self.successResultOf(device.block_status(0, 256 * KiB)),
            [Extent(64 * KiB, 0), Extent(192 * KiB, STATE_ZERO)],
        )
        self.successResultOf(device.trim(0, 128 * KiB))
        self.assertEqual(
            self.successResultOf(device.block_status(0, 256 * KiB)),
            [Extent(128 * KiB, HOLE), Extent(128 * KiB, STATE_ZERO)],
        )


class DirtyPageGuardTests(SynchronousTestCase):
    """L{DirtyPageGuard} reads the kernel's dirty page counts and limits."""

    def guard(
        self, dirty_kib: int, writeback_kib: int, available_kib: int, **sysctl: int
    ) -> DirtyPageGuard:
        directory = temp_directory(self)
        meminfo = os.path.join(directory, "meminfo")
        with open(meminfo, "w") as f:
            f.write(
                f"MemTotal:       {available_kib * 2} kB\n"
                f"MemAvailable:   {available_kib} kB\n"
                f"Dirty:          {dirty_kib} kB\n"
                f"Writeback:      {writeback_kib} kB\n"
            )
        settings = {"dirty_background_bytes": 0, "dirty_background_ratio": 10}
        settings.update(sysctl)
        for name, value in settings.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(f"{value}\n")
        self.now = 0.0
        return DirtyPageGuard(lambda: self.now, meminfo, directory)

    def test_far_from_limits(self) -> None:
        """Below the background limit (10% of available memory here), writes may go inline."""
        self.assertTrue(self.guard(1000, 0, 1_000_000).allows())
        self.assertTrue(self.guard(99_000, 0, 1_000_000).allows())

    def test_near_limits(self) -> None:
        """Dirty plus writeback pages at the background limit stop inline writes."""
        self.assertFalse(self.guard(60_000, 40_000, 1_000_000).allows())

    def test_bytes_setting(self) -> None:
        """dirty_background_bytes, when set, is the limit instead of the ratio."""
        self.assertFalse(
            self.guard(1100, 0, 1_000_000, dirty_background_bytes=1024 * 1024).allows()
        )
        self.assertTrue(self.guard(900, 0, 1_000_000, dirty_background_bytes=1024 * 1024).allows())

    def test_sampled_lazily(self) -> None:
        """The counts are read at most every INTERVAL seconds."""
        guard = self.guard(1000, 0, 1_000_000)
        self.assertTrue(guard.allows())
        os.unlink(guard._meminfo)
        self.assertTrue(guard.allows())
        self.now += DirtyPageGuard.INTERVAL
        self.assertFalse(guard.allows())

    def test_unreadable(self) -> None:
        """Without the kernel's counts (not Linux), writes never go inline."""
        self.assertFalse(DirtyPageGuard(meminfo="/nonexistent/meminfo").allows())


class DenseFileTests(SynchronousTestCase):
    """
    A file with every byte allocated has no holes to look for: sparse reads
    skip SEEK_DATA/SEEK_HOLE until a trim or zeroing may have made some.
    """

    def test_dense_file_skips_lookup(self) -> None:
        path = os.path.join(temp_directory(self), "dense.img")
        with open(path, "wb") as f:
            f.write(pattern(4 * MiB))
            f.flush()
            os.fsync(f.fileno())
        device = FileBlockDevice(path, reactor=cast(IReactorFromThreads, ImmediateReactor()))
        pool = FakeThreadPool()
        device._threadpool = cast(ThreadPool, pool)
        self.addCleanup(device.close)
        self.assertFalse(device._maybe_sparse)
        seeks: list[int] = []
        real_lseek = os.lseek

        def lseek(fd: int, position: int, how: int) -> int:
            seeks.append(how)
            return real_lseek(fd, position, how)

        self.patch(os, "lseek", lseek)
        d = device.read_sparse(0, 2 * MiB)
        pool.run_all()
        self.assertEqual(self.successResultOf(d), [(0, pattern(4 * MiB)[: 2 * MiB])])
        self.assertEqual(seeks, [])
        trimmed = device.trim(MiB, MiB)
        pool.run_all()
        self.successResultOf(trimmed)
        self.assertTrue(device._maybe_sparse)
        d = device.read_sparse(0, 2 * MiB)
        pool.run_all()
        segments = self.successResultOf(d)
        self.assertTrue(seeks)
        self.assertEqual(segments[0], (0, pattern(4 * MiB)[:MiB]))
