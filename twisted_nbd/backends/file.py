# -*- test-case-name: tests.test_backends -*-
"""
A block device backed by a regular file or a host block device.

One file descriptor is opened per export and shared by every connection:
reads and writes use C{pread}/C{pwrite} at explicit offsets, never the
descriptor's file position, so concurrent requests cannot disturb each other,
and one C{fdatasync} covers writes made through any connection (which is
what makes multi-conn safe to advertise).

Every system call that may block runs in a thread pool. Discarding and
zeroing use Linux's C{fallocate} modes (punch hole, zero range) through
C{ctypes}, since the standard library exposes only the plain allocation
mode; allocation is reported with C{lseek}'s C{SEEK_DATA}/C{SEEK_HOLE}.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from zope.interface import implementer

from twisted_nbd._batch import BatchingRunner, linger_for, threads
from twisted_nbd._wire import Errno
from twisted_nbd.errors import NBDError, errno_from_os_error
from twisted_nbd.extents import read_planned
from twisted_nbd.interfaces import (
    STATE_HOLE,
    STATE_ZERO,
    Capabilities,
    Extent,
    IBlockDevice,
    IImmediateIO,
    IPipeRead,
    IPipeWrite,
    ISparseRead,
    Segment,
)

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "FileBlockDevice",
    "MAX_EXTENTS",
    "ZERO_CHUNK",
    "create_image",
]

_T = TypeVar("_T")

#: Linux C{fallocate} modes (from C{<linux/falloc.h>}).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: C{block_status} stops after this many extents, which the interface allows.
MAX_EXTENTS = 1024

#: When zeroes must really be written, they go out this many bytes at a
#: time, so zeroing a huge range never allocates a buffer of its size.
ZERO_CHUNK = 1024 * 1024

_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
_ALLOCATE = FALLOC_FL_KEEP_SIZE
_HOLE = STATE_HOLE | STATE_ZERO

# The errors with which fallocate says "this file system (or kernel, or
# device) cannot do that mode", as opposed to a real I/O failure.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV})

_log = Logger()

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)

_FallocateFunction = Callable[[int, int, int, int], int]
_libc_functions: dict[str, Any] = {}


def _libc_function(
    names: Sequence[str], argtypes: list[Any] | None, restype: Any
) -> Callable[..., int] | None:
    """
    The first of C{names} that libc has, set up with C{argtypes} and
    C{restype}, found on first use (so importing this module costs nothing
    and works where there is none), or C{None} if it has none of them.
    """
    key = names[0]
    if key not in _libc_functions:
        raw = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            for name in names:
                raw = getattr(libc, name, None)
                if raw is not None:
                    break
        except (OSError, AttributeError):
            raw = None
        if raw is not None:
            if argtypes is not None:
                raw.argtypes = argtypes
            raw.restype = restype
        _libc_functions[key] = raw
    return cast("Callable[..., int] | None", _libc_functions[key])


def _libc_fallocate() -> _FallocateFunction | None:
    """libc's C{fallocate} (see L{_libc_function}), or C{None}."""
    # fallocate64 takes 64-bit offsets even on 32-bit builds.
    return _libc_function(
        ("fallocate64", "fallocate"),
        [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64],
        ctypes.c_int,
    )


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """
    Call C{fallocate(2)}.

    @raise OSError: it failed; C{EOPNOTSUPP} if there is no C{fallocate}.
    """
    function = _libc_fallocate()
    if function is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available on this platform")
    while function(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


#: cachestat(2)'s number: the same on every architecture (it came after
#: the tables were unified), Linux 6.5 and later.
_NR_CACHESTAT = 451


def _libc_syscall() -> Callable[..., int] | None:
    """libc's C{syscall} (see L{_libc_function}), for cachestat; C{None} off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    return _libc_function(("syscall",), None, ctypes.c_long)


def cached_pages(fd: int, offset: int, length: int) -> int:
    """
    How many of the pages that hold the C{length} bytes at C{offset} of
    C{fd} are in the page cache (C{cachestat(2)}), counting every page of
    a large folio in the range.

    @raise OSError: the call failed; C{ENOSYS} where there is no
        cachestat (Linux before 6.5, other systems).
    """
    function = _libc_syscall()
    if function is None:
        raise OSError(errno.ENOSYS, "cachestat is not available on this platform")
    span = _CachestatRange(offset, length)
    result = _Cachestat()
    if function(_NR_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(result), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(result.nr_cache)


#: Reads up to this size are tried in the reactor thread first, without
#: blocking (see L{FileBlockDevice._read_no_wait}); larger ones always go to the
#: pool, where copying them does not hold up other connections.
NOWAIT_READ_MAX = 128 * 1024

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

#: In a file without holes, reads up to this size are tried at once
#: (L{FileBlockDevice.read_now}), there being nothing to answer sparsely.
INLINE_READ_MAX = 1024 * 1024

_NONBLOCK: int = getattr(os, "SPLICE_F_NONBLOCK", 2)

#: Writes up to this size are done in the reactor thread when they cannot
#: wait on the disk (see L{FileBlockDevice._write_inline}); larger ones, and
#: FUA writes, go to the pool. A 1 MiB write into the page cache takes a few
#: hundred microseconds, which other connections can wait; buffered writes
#: to one file take its lock in turn anyway, so threads would not run them
#: side by side (measured: 1 MiB writes at QD8 about 17% faster inline).
INLINE_WRITE_MAX = 1024 * 1024
#: An inline write that takes longer than this (seconds) means the kernel
#: made it wait after all (an ext4 journal commit, a page under writeback):
#: inline writes stop for L{INLINE_COOLDOWN_FACTOR} times as long as it took,
#: at least L{INLINE_COOLDOWN} and at most L{INLINE_COOLDOWN_MAX} seconds.
#: So even if every inline write were slow, they would hold the reactor up
#: about 5% of the time at most; and the waits of a few milliseconds that
#: come now and then (1 MiB writes at QD8 saw several in ten seconds) cost
#: a quarter of a second in the pool each, not two seconds (the pool did
#: those writes about 25% slower: 1,793-1,972 IOPS against 2,141-2,666).
SLOW_INLINE_WRITE = 0.002
INLINE_COOLDOWN = 0.25
INLINE_COOLDOWN_FACTOR = 20
INLINE_COOLDOWN_MAX = 10.0
#: Inline writes of at least this many bytes also count the reactor
#: thread's voluntary context switches (one getrusage call before and one
#: after, about 2 microseconds, against 60 or more for the write): a slow
#: write that never slept had its CPU taken (by another task, or by the
#: hypervisor: steal), which the pool would not have helped. On a 2-vCPU
#: VM with steal, 1 MiB writes at QD8 took over 2 ms several times in ten
#: seconds, each time sending writes to the pool for two seconds, where
#: they ran about 25% slower.
SWITCHES_CHECK_MIN = 64 * 1024
#: The page size the kernel caches files in.
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class DirtyPageGuard:
    """
    Says whether a buffered write can be done without the kernel throttling
    it. Linux makes writers wait (C{balance_dirty_pages}) only once dirty
    page cache grows past the midpoint between the background and the
    foreground dirty limits; this allows writes while dirty and writeback
    pages stay under the I{background} limit (with the default ratios, two
    thirds of the way to that point: 5% of the memory away from it).
    C{/proc/meminfo} is read at most every L{INTERVAL} seconds (a read costs
    about 10 microseconds); in between, even writing at 1 GB/s covers only
    100 MB of that distance, and a write that the kernel throttles after
    all is slow, which turns inline writes off for a while (see
    L{SLOW_INLINE_WRITE}). (It used to stop at half the background limit:
    then the benchmark's freshly copied images, 2.2 GB of dirty pages on a
    24 GB machine that the kernel did not even start writing back, kept
    every 1 MiB write in the pool, about 25% slower.)

    @ivar allowed: the answer at the last sample.
    """

    INTERVAL = 0.1

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        meminfo: str = "/proc/meminfo",
        sysctl: str = "/proc/sys/vm",
    ) -> None:
        self._clock = clock
        self._meminfo = meminfo
        self._sysctl = sysctl
        self._next = 0.0
        self.allowed = False

    def _read_int(self, name: str) -> int:
        with open(os.path.join(self._sysctl, name), "rb") as f:
            return int(f.read().strip() or 0)

    def sample(self) -> bool:
        """Read the kernel's dirty page counts now; whether writes may go inline."""
        try:
            with open(self._meminfo, "rb") as f:
                fields = dict(
                    (line.split(b":")[0], int(line.split()[1]) * 1024)
                    for line in f
                    if line.startswith((b"Dirty:", b"Writeback:", b"MemAvailable:"))
                )
            limit = self._read_int("dirty_background_bytes")
            if not limit:
                limit = fields[b"MemAvailable"] * self._read_int("dirty_background_ratio") // 100
            dirty = fields[b"Dirty"] + fields[b"Writeback"]
            self.allowed = dirty < limit
        except (OSError, ValueError, KeyError, IndexError):
            # No /proc (not Linux), or a format we do not know: never inline.
            self.allowed = False
        return self.allowed

    def allows(self) -> bool:
        """Whether a buffered write now will not be throttled (sampled lazily)."""
        now = self._clock()
        if now >= self._next:
            self._next = now + self.INTERVAL
            self.sample()
        return self.allowed


#: One guard for the whole process: the dirty limits are the kernel's.
DIRTY_PAGES = DirtyPageGuard()


_RUSAGE_THREAD: int = getattr(resource, "RUSAGE_THREAD", 1)


def _voluntary_switches() -> int:
    """How often the calling thread has slept in the kernel (-1: unknown)."""
    try:
        return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw
    except (OSError, ValueError):
        return -1


def _no_preadv(fd: int, buffers: list[bytearray], offset: int, flags: int) -> int:
    raise OSError(errno.ENOSYS, "preadv is not available")


def _nbd_error(operation: str, offset: int | None, error: OSError) -> NBDError:
    """The L{NBDError} for a system call that failed: its errno mapped, and where."""
    where = "" if offset is None else f" at offset {offset}"
    return NBDError(errno_from_os_error(error), f"{operation}{where}: {error.strerror or error}")


def _no_splice(*args: Any, **kwargs: Any) -> int:
    raise OSError(errno.ENOSYS, "splice is not available here")


def _no_pwritev(fd: int, buffers: list[Any], offset: int, flags: int) -> int:
    raise OSError(errno.ENOSYS, "pwritev is not available")


def create_image(path: str, size: int) -> bool:
    """
    Create a sparse file of C{size} bytes at C{path} unless something is
    already there; an existing file is left exactly as it is (neither
    overwritten nor resized).

    This blocks; call it while setting up, not from a running server.

    @return: C{True} if the file was created, C{False} if it existed.
    @raise ValueError: C{size} is negative.
    @raise OSError: the file could not be created.
    """
    if size < 0:
        raise ValueError(f"size must not be negative, not {size}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return False
    try:
        os.ftruncate(fd, size)
    except BaseException:
        # Do not leave a file of the wrong size behind for the next attempt
        # to accept as existing.
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return True


def _device_size(fd: int, mode: int) -> int:
    """
    The size of an open file: C{st_size} for a regular file, the position
    of its end for a block device (whose C{st_size} is 0).
    """
    if stat.S_ISBLK(mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return os.fstat(fd).st_size


@implementer(IBlockDevice, ISparseRead, IImmediateIO, IPipeRead, IPipeWrite)
class FileBlockDevice:
    """
    An L{IBlockDevice} over one file descriptor, its blocking calls run in a
    thread pool.

    Every method returns a Deferred that fires in the reactor thread once
    the call has finished in the pool; failures are L{NBDError}s whose
    errno is mapped from the host's with L{errno_from_os_error} and whose
    message names the operation and offset.

    @ivar path: the path that was opened.
    @ivar size: the size in bytes when the file was opened.
    @ivar capabilities: what the device can do.
    @ivar preempted_writes: how many inline writes were slow without
        sleeping, and so did not turn inline writes off (see
        L{SWITCHES_CHECK_MIN}).
    """

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
        fd: int | None = None,
    ) -> None:
        """
        Open C{path} (this blocks briefly; do it while setting up).

        @param read_only: open the file read-only and advertise no writes.
        @param reactor: the reactor that receives results from the pool;
            the global reactor if C{None}, looked up when first needed.
        @param threadpool: the pool to run blocking calls in; C{reactor}'s
            own pool if C{None}. An application would pass one owned by a
            service, so it is started and stopped with the server.
        @param fd: serve this open file descriptor of C{path} instead of
            opening it (a worker process gets the descriptor its supervisor
            opened, see L{share}); the device owns it from now on.
        @raise OSError: the file cannot be opened (for writing, unless
            C{read_only}), or is neither a regular file nor a block device.
        """
        self.path = path
        self._reactor = reactor
        self._threadpool = threadpool
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if fd is None:
            try:
                fd = os.open(path, flags)
            except OSError as e:
                how = "reading" if read_only else "reading and writing"
                raise OSError(e.errno, f"cannot open {path!r} for {how}: {e.strerror}", path) from e
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise OSError(
                    errno.EINVAL, f"{path!r} is neither a regular file nor a block device", path
                )
            self.size = _device_size(fd, mode)
            info = os.fstat(fd)
            block_size = info.st_blksize
            # Whether the file may have holes: if every byte is allocated,
            # sparse reads need not look for them (until a trim or zeroing
            # makes some). Only ever an optimisation: reads are right anyway.
            self._maybe_sparse = stat.S_ISREG(mode) and info.st_blocks * 512 < self.size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        writable = not read_only
        preferred = block_size if block_size > 0 and block_size & (block_size - 1) == 0 else 4096
        self.capabilities = Capabilities(
            can_write=writable,
            can_flush=True,
            can_fua=writable,
            can_trim=writable,
            can_zero=writable,
            can_fast_zero=writable and sys.platform.startswith("linux"),
            can_cache=True,
            can_extents=True,
            can_multi_conn=True,
            preferred_block=preferred,
        )
        # The fallocate modes found not to work here, so later requests skip
        # straight to the fallback. Set from pool threads; a lost update
        # only costs one more failing system call.
        self._unsupported: set[int] = set()
        # Requests running in the pool, and who waits for them to end so the
        # descriptor can be closed: closing it while a thread still uses it
        # could make that thread write into whatever file reuses the number.
        self._pending = 0
        self._closing = False
        self._closed = False
        self._closeWaiters: list[Deferred[None]] = []
        # Made when the first request needs the pool (see _run).
        self._runner: BatchingRunner | None = None
        # The system calls that move data, as attributes so tests can make
        # them return short counts or fail.
        self._pread: Callable[[int, int, int], bytes] = os.pread
        self._preadv: Callable[[int, list[bytearray], int, int], int] = getattr(
            os, "preadv", _no_preadv
        )
        # Whether to try non-blocking reads from the page cache (Linux 4.14+).
        self._nowait = _RWF_NOWAIT != 0
        # Whether to splice READs into pipes (read_to_pipe): needs splice
        # and cachestat (Linux 6.5+); off for good once either fails.
        self._splice_reads = sys.platform.startswith("linux") and hasattr(os, "splice")
        self._cached_pages: Callable[[int, int, int], int] = cached_pages
        self._pwrite: Callable[[int, memoryview, int], int] = os.pwrite
        self._pwritev: Callable[[int, list[Any], int, int], int] = getattr(
            os, "pwritev", _no_pwritev
        )
        self._splice: Callable[..., int] = getattr(os, "splice", _no_splice)
        # Writes in the reactor thread (see _write_inline): whether they are
        # on, whether the kernel takes RWF_NOWAIT for buffered writes here,
        # and until when they are off after a slow one.
        self._inline_writes = sys.platform.startswith("linux")
        self._write_nowait = _RWF_NOWAIT != 0
        self._inline_off_until = 0.0
        self.preempted_writes = 0
        self._dirty = DIRTY_PAGES
        self._now: Callable[[], float] = time.monotonic
        self._switches: Callable[[], int] = _voluntary_switches

    def share(self) -> tuple[int, ...]:
        """
        The file descriptor another process needs to serve this same file
        (pass it to L{FileBlockDevice} there, with C{fd}). Every process
        then shares one page cache, so a FLUSH in any of them covers the
        writes of all (multi-conn).
        """
        return (self._fd,)

    # Running things in the pool.

    def _run(self, operation: str, offset: int | None, job: Callable[[], _T]) -> Deferred[_T]:
        """
        Run C{job} in the pool, turning an L{OSError} into an L{NBDError}
        that says what failed where.
        """
        if self._closing:
            return fail(NBDError(Errno.ESHUTDOWN, f"{operation}: the device is closed"))

        def in_thread() -> _T:
            try:
                return job()
            except OSError as e:
                raise _nbd_error(operation, offset, e) from e

        runner = self._runner
        if runner is None:
            try:
                reactor, threadpool = threads(self._reactor, self._threadpool)
            except BaseException as e:
                # No usable reactor or pool: still answer with a Deferred.
                return fail(e)
            # Several requests share one pool hand-off under load (see _batch).
            runner = self._runner = BatchingRunner(
                reactor, threadpool, threadpool.max, linger_for(threadpool)
            )
        d = runner.run(in_thread)
        self._pending += 1
        d.addBoth(self._finished)
        return d

    def _finished(self, result: _T) -> _T:
        """A request left the pool; close the descriptor if it was the last."""
        self._pending -= 1
        if self._closing and self._pending == 0:
            self._really_close()
        return result

    # The blocking work, run in pool threads.

    def _read_all(self, offset: int, length: int) -> bytes:
        data = self._pread(self._fd, length, offset)
        if len(data) == length:
            return data
        chunks, got = [data], len(data)
        while got < length:
            chunk = self._pread(self._fd, length - got, offset + got)
            if not chunk:
                # End of file: the file shrank since it was opened. The
                # device keeps its size, so what is missing reads as zeroes.
                chunks.append(bytes(length - got))
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _write_all(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        position = 0
        while position < len(view):
            written = self._pwrite(self._fd, view[position:], offset + position)
            if written <= 0:
                # pwrite reports real failures by raising; no progress and no
                # error would otherwise spin here forever.
                raise OSError(errno.EIO, "pwrite wrote nothing")
            position += written

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """
        Try one C{fallocate} mode.

        @return: C{True} if it worked, C{False} if the mode is unsupported.
        @raise OSError: it failed for another reason.
        """
        if mode in self._unsupported:
            return False
        try:
            _fallocate(self._fd, mode, offset, length)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self._unsupported.add(mode)
                return False
            raise
        return True

    def _zero(self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool) -> None:
        # Holes may appear (punched, or extents ext4 reports as holes).
        self._maybe_sparse = True
        done = may_trim and self._try_fallocate(_PUNCH, offset, length)
        if not done:
            done = self._try_fallocate(_ZERO_RANGE, offset, length)
        if not done and not may_trim and self._try_fallocate(_PUNCH, offset, length):
            # No zero-range, but a hole followed by allocation gives the same
            # result (the trick nbdkit's file plugin uses). If allocating is
            # unsupported the range still reads as zeroes, merely sparse.
            self._try_fallocate(_ALLOCATE, offset, length)
            done = True
        if not done:
            if fast:
                # Nothing was written: the client falls back to its own way.
                raise NBDError(Errno.ENOTSUP, "fast zeroing is not supported by this file system")
            zeroes = memoryview(bytes(min(length, ZERO_CHUNK)))
            position = 0
            while position < length:
                chunk = min(length - position, ZERO_CHUNK)
                self._write_all(offset + position, zeroes[:chunk])
                position += chunk
        if fua:
            _fdatasync(self._fd)

    def _block_status(self, offset: int, length: int) -> Sequence[Extent]:
        end = min(offset + max(length, 1), self.size)
        if end <= offset:
            raise NBDError(Errno.EINVAL, f"block status at {offset} is past the end")
        extents: list[Extent] = []
        position = offset
        while position < end and len(extents) < MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    # No data at or after position: a hole to the end.
                    data = end
                elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    # SEEK_DATA unsupported here: report data, which is never
                    # wrong, for the whole rest of the range.
                    extents.append(Extent(end - position, 0))
                    break
                else:
                    raise
            if data > position:
                stop = min(data, end)
                extents.append(Extent(stop - position, _HOLE))
            else:
                stop = min(os.lseek(self._fd, position, os.SEEK_HOLE), end)
                extents.append(Extent(stop - position, 0))
            position = stop
        return extents

    # IBlockDevice.

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """
        Read C{length} bytes at C{offset}, retrying short reads; bytes past
        the end of a file that shrank read as zeroes.

        @return: a Deferred that fires with exactly C{length} bytes, or fails
            with L{NBDError}.
        """
        if length <= NOWAIT_READ_MAX and self._nowait and not self._closing:
            data = self._read_no_wait(offset, length)
            if data is not None:
                return succeed(bytes(data))
        return self._run("read", offset, lambda: self._read_all(offset, length))

    def read_now(self, offset: int, length: int) -> bytearray | None:
        """
        The bytes at C{offset} if the page cache has them all (see
        L{_read_no_wait}; L{IImmediateIO}), in a buffer of their own; else
        C{None}.
        """
        if (
            length > (NOWAIT_READ_MAX if self._maybe_sparse else INLINE_READ_MAX)
            or not self._nowait
            or self._closing
        ):
            return None
        return self._read_no_wait(offset, length)

    def read_to_pipe(self, sink: int, offset: int, length: int) -> int:
        """
        Splice the C{length} bytes at C{offset} into the pipe C{sink}
        (L{IPipeRead}) when the file has no holes (else the server may
        answer sparsely) and the page cache holds every page of the range
        (C{cachestat}: a splice from the file would otherwise wait for the
        disk in the reactor thread).

        A page evicted between the check and the splice is read from disk
        there after all: rare, and bounded by one read of at most the
        pipe's size.

        @return: how many bytes were moved; 0 when declined.
        """
        if (
            self._maybe_sparse
            or not self._splice_reads
            or self._closing
            or offset + length > self.size
        ):
            return 0
        fd = self._fd
        try:
            cached = self._cached_pages(fd, offset, length)
        except OSError:
            # No cachestat here (or it is forbidden): never splice.
            self._splice_reads = False
            return 0
        if cached < (offset + length - 1) // _PAGE - offset // _PAGE + 1:
            return 0
        moved = 0
        splice = self._splice
        try:
            while moved < length:
                # Non-blocking on the pipe's side, should it not be empty.
                count = splice(fd, sink, length - moved, offset_src=offset + moved, flags=_NONBLOCK)
                if count <= 0:
                    break  # the file shrank
                moved += count
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                # This file system cannot splice: stop trying.
                self._splice_reads = False
        return moved

    def write_now(self, offset: int, data: bytes | memoryview) -> int:
        """
        Write C{data} at C{offset} in the reactor thread where that cannot
        wait on the disk (see L{_write_inline}; L{IImmediateIO}).

        @return: how many bytes were written; 0 also when the write failed
            (L{write} then reports why).
        """
        if not self._inline_writes or len(data) > INLINE_WRITE_MAX or self._closing:
            return 0
        try:
            return self._write_inline(offset, data)  # type: ignore[arg-type]
        except OSError:
            return 0

    def _read_no_wait(self, offset: int, length: int) -> bytearray | None:
        """
        Read from the page cache in the reactor thread, if the kernel can
        do it without waiting for the disk (C{preadv2} with C{RWF_NOWAIT},
        which fails with C{EAGAIN} rather than block).

        A thread pool round trip costs tens of microseconds of CPU; copying
        up to L{NOWAIT_READ_MAX} bytes from the page cache costs under 20
        (measured on this project's machines), so cached reads are served
        here and everything else goes to the pool.

        @return: the bytes, or C{None} when the pool must do the read.
        """
        buffer = bytearray(length)
        try:
            got = self._preadv(self._fd, [buffer], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                # Not on this kernel or file system: stop trying.
                self._nowait = False
            return None
        # A short read means part of the range is not cached (or the file
        # shrank): let the pool do the whole read, which handles both.
        return buffer if got == length else None

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        """
        Find the holes with C{SEEK_DATA}/C{SEEK_HOLE} and read the data
        between them, all in one pool job (L{ISparseRead}).

        @return: a Deferred that fires with the segments, or fails with
            L{NBDError}.
        """

        def job() -> Sequence[Segment]:
            if not self._maybe_sparse:
                # Nothing to look for: lseek would only cost time.
                return [(offset, self._read_all(offset, length))]
            extents = self._block_status(offset, length)
            return read_planned(offset, length, extents, self._read_all)

        return self._run("read", offset, job)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        """
        Write C{data} at C{offset}, retrying short writes; with C{fua},
        C{fdatasync} before firing. Small writes that cannot wait on the
        disk are done at once (L{_write_inline}); the rest in the pool.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError} (C{ENOSPC} when the file system is full).
        """
        if not fua and self._inline_writes and len(data) <= INLINE_WRITE_MAX and not self._closing:
            try:
                done = self._write_inline(offset, data)
            except OSError as e:
                return fail(_nbd_error("write", offset, e))
            if done == len(data):
                return succeed(None)
            if done:
                offset, data = offset + done, memoryview(data)[done:]  # type: ignore[assignment]

        def write() -> None:
            self._write_all(offset, data)
            if fua:
                _fdatasync(self._fd)

        return self._run("write", offset, write)

    def _write_inline(self, offset: int, data: bytes) -> int:
        """
        Write to the page cache in the reactor thread, only where that
        cannot wait on the disk. A pool round trip costs tens of
        microseconds of CPU; a 4 KiB buffered write about three. Where the
        kernel supports C{RWF_NOWAIT} for buffered writes (XFS, btrfs), it
        says itself when a write would block. Elsewhere (ext4) a write here
        must pass three checks: the kernel is far from throttling writers
        (L{DirtyPageGuard}); no partly covered page would have to be read
        from disk first (probed with a non-blocking read); and no inline
        write was slow lately: one that takes over L{SLOW_INLINE_WRITE}
        turns them off for a while (see L{SLOW_INLINE_WRITE}).

        @return: how many bytes were written (0: the pool must do it all).
        @raise OSError: the write failed.
        """
        if self._write_nowait:
            try:
                return self._pwritev(self._fd, [data], offset, _RWF_NOWAIT)
            except BlockingIOError:
                return 0
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                # Not for buffered writes on this file system: use the checks.
                self._write_nowait = False
        length = len(data)
        started = self._inline_allowed(offset, offset + length)
        if started is None:
            return 0
        self._write_all(offset, data)
        self._inline_done(*started)
        return length

    def _inline_allowed(self, offset: int, end: int) -> tuple[float, int] | None:
        """
        Whether a buffered write from C{offset} to C{end} may be done in the
        reactor thread without asking the kernel (see L{_write_inline}): if
        so, what L{_inline_done} takes once it is done (the time now, and
        the thread's voluntary context switches for a write of at least
        L{SWITCHES_CHECK_MIN} bytes, else -1); else C{None}.
        """
        now = self._now()
        if now < self._inline_off_until or not self._dirty.allows():
            return None
        if (offset % _PAGE or end % _PAGE) and not self._edges_cached(offset, end):
            return None
        return now, self._switches() if end - offset >= SWITCHES_CHECK_MIN else -1

    def _inline_done(self, now: float, switches: int = -1) -> None:
        """
        An inline write that started at C{now} is done: was it slow? With
        C{switches} (the thread's voluntary context switches when it
        started; -1 if not counted), only a slow write that slept counts.
        """
        took = self._now() - now
        if took > SLOW_INLINE_WRITE:
            if switches >= 0 and self._switches() == switches:
                # Never waited for the kernel: preempted, not blocked.
                self.preempted_writes += 1
                return
            cooldown = min(INLINE_COOLDOWN_MAX, max(INLINE_COOLDOWN, took * INLINE_COOLDOWN_FACTOR))
            self._inline_off_until = now + took + cooldown
            _log.info(
                "A write to {path!r} took {ms:.1f} ms in the reactor thread; writes go to "
                "the thread pool for the next {cooldown} s",
                path=self.path,
                ms=took * 1000,
                cooldown=round(cooldown, 2),
            )

    def write_from_pipe(
        self, source: int, offset: int, length: int, fua: bool = False
    ) -> Deferred[None]:
        """
        Move the C{length} bytes waiting in the pipe C{source} to C{offset}
        with C{splice} (L{IPipeWrite}); with C{fua}, C{fdatasync} after. In
        the reactor thread where a buffered write may be done there (see
        L{_write_inline}: the same checks, except C{RWF_NOWAIT}, which
        C{splice} does not take), else in the pool.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError} (C{ENOSPC} when the file system is full).
        """
        if not fua and self._inline_writes and length <= INLINE_WRITE_MAX and not self._closing:
            started = self._inline_allowed(offset, offset + length)
            if started is not None:
                try:
                    self._splice_all(source, offset, length)
                except OSError as e:
                    return fail(_nbd_error("write", offset, e))
                self._inline_done(*started)
                return succeed(None)

        def write() -> None:
            self._splice_all(source, offset, length)
            if fua:
                _fdatasync(self._fd)

        return self._run("write", offset, write)

    def _splice_all(self, source: int, offset: int, length: int) -> None:
        moved = 0
        while moved < length:
            count = self._splice(source, self._fd, length - moved, offset_dst=offset + moved)
            if count <= 0:
                # The pipe holds less than it should: never spin on it.
                raise OSError(errno.EIO, "the pipe ran dry")
            moved += count

    def _edges_cached(self, offset: int, end: int) -> bool:
        """
        Whether the pages that a write from C{offset} to C{end} covers only
        in part are in the page cache (else writing them means reading them
        from disk first). Pages past the end of the file need no reading.
        """
        if not self._nowait:
            return False
        probe = bytearray(1)
        for start in {offset - offset % _PAGE, end - 1 - (end - 1) % _PAGE}:
            if start >= self.size:
                continue
            try:
                self._preadv(self._fd, [probe], start, _RWF_NOWAIT)
            except OSError:
                return False
        return True

    def flush(self) -> Deferred[None]:
        """
        C{fdatasync} the file, covering writes from every connection.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}.
        """
        return self._run("flush", None, lambda: _fdatasync(self._fd))

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        """
        Punch a hole, keeping the file's size; where the file system cannot,
        do nothing (which the protocol allows).

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}.
        """

        def trim() -> None:
            self._maybe_sparse = True
            self._try_fallocate(_PUNCH, offset, length)
            if fua:
                _fdatasync(self._fd)

        return self._run("trim", offset, trim)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        """
        Make a range read as zeroes: by punching a hole if C{may_trim}, else
        with zero-range (or punch-then-allocate), else by writing zeroes a
        bounded chunk at a time. With C{fast}, only the C{fallocate} ways are
        tried.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}; C{ENOTSUP} for C{fast} when no quick way works, in
            which case nothing was changed.
        """
        return self._run(
            "write_zeroes", offset, lambda: self._zero(offset, length, fua, may_trim, fast)
        )

    def cache(self, offset: int, length: int) -> Deferred[None]:
        """
        Ask the kernel to read the range ahead (C{POSIX_FADV_WILLNEED}).

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}.
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return self._run("cache", offset, lambda: None)
        return self._run(
            "cache", offset, lambda: advise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        )

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        """
        Report holes (C{STATE_HOLE | STATE_ZERO}) and data (C{0}) from
        C{offset} as the file system sees them, never past C{offset +
        length} or the size, and at most L{MAX_EXTENTS} extents.

        Some file systems report ranges zeroed with zero-range (ext4's
        unwritten extents) as holes even though they stay allocated.

        @return: a Deferred that fires with a non-empty list of L{Extent}s,
            or fails with L{NBDError}.
        """
        return self._run("block_status", offset, lambda: self._block_status(offset, length))

    def close(self) -> Deferred[None]:
        """
        Close the file descriptor once the requests already running have
        finished. Later requests fail with C{ESHUTDOWN}; calling it again is
        harmless.

        @return: a Deferred that fires with C{None} once the descriptor is
            closed.
        """
        d: Deferred[None] = Deferred()
        if self._closed:
            d.callback(None)
            return d
        self._closeWaiters.append(d)
        self._closing = True
        if self._pending == 0:
            self._really_close()
        return d

    def _really_close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                os.close(self._fd)
            except OSError:
                # The descriptor is gone either way (Linux never retries a
                # close); nothing a caller could do about it but know.
                _log.failure("Closing {path!r} failed", path=self.path)
        waiters, self._closeWaiters = self._closeWaiters, []
        for waiter in waiters:
            waiter.callback(None)
