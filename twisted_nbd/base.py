# -*- test-case-name: tests.test_base -*-
"""
Base classes that make backends and filters short to write.

  - L{BlockDevice}: implement C{read} and C{write} (returning Deferreds);
    everything else has a correct default.
  - L{ThreadedBlockDevice}: implement blocking C{pread}/C{pwrite}/C{sync};
    they run in a thread pool and the Deferreds are made for you.
  - L{BlockDeviceFilter}: wraps another device and forwards every call;
    override only what the filter changes.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from zope.interface import alsoProvides, implementer

from twisted_nbd._batch import BatchingRunner, linger_for, threads
from twisted_nbd._wire import Errno
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import (
    Capabilities,
    Extent,
    IBlockDevice,
    IBufferRead,
    ISparseRead,
    Segment,
)

__all__ = ["BlockDevice", "BlockDeviceFilter", "ThreadedBlockDevice"]

_T = TypeVar("_T")

#: How many zero bytes the default write_zeroes writes at a time.
_ZERO_CHUNK = 1024 * 1024


@implementer(IBlockDevice)
class BlockDevice:
    """
    A backend with sensible defaults: subclasses set C{size} and implement
    L{read} and L{write}.

    The defaults: C{flush} and C{cache} do nothing, C{trim} does nothing
    (always allowed), C{write_zeroes} writes zeroes in 1 MiB pieces (and
    refuses C{fast} ones, as the protocol asks), C{block_status} reports
    everything as allocated data, C{close} does nothing. C{capabilities}
    says so: no fast zero, no extents, no cache.

    @ivar size: the device's size in bytes.
    """

    size: int = 0
    capabilities: Capabilities = Capabilities(
        can_fast_zero=False, can_cache=False, can_extents=False
    )

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """Fire with C{length} bytes at C{offset}; subclasses implement this."""
        raise NotImplementedError

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        """Store C{data} at C{offset}; subclasses that can write implement this."""
        raise NotImplementedError

    def flush(self) -> Deferred[None]:
        return succeed(None)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return succeed(None)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        if fast:
            # Writing zeroes is no faster than writing data: say so at once.
            return fail(NBDError(Errno.ENOTSUP, "zeroing is not faster than writing"))
        return Deferred.fromCoroutine(self._write_zeroes(offset, length, fua))

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        zeroes = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            piece = min(end - offset, len(zeroes))
            last = offset + piece == end
            await self.write(offset, zeroes[:piece], fua and last)
            offset += piece

    def cache(self, offset: int, length: int) -> Deferred[None]:
        return succeed(None)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        return succeed([Extent(length, 0)])

    def close(self) -> Deferred[None]:
        return succeed(None)


class ThreadedBlockDevice(BlockDevice):
    """
    A backend written with blocking calls: subclasses implement L{pread},
    L{pwrite} and optionally L{sync}; each runs in C{threadpool} so the
    reactor never waits for the storage.

    @param reactor: the reactor to deliver results on (the global one when
        C{None}, looked up at call time).
    @param threadpool: where the blocking calls run (the reactor's own pool
        when C{None}).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._runner: BatchingRunner | None = None

    def pread(self, offset: int, length: int) -> bytes:
        """Return C{length} bytes at C{offset}; runs in a thread."""
        raise NotImplementedError

    def pwrite(self, offset: int, data: bytes) -> None:
        """Store C{data} at C{offset}; runs in a thread."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make completed writes durable; runs in a thread."""

    def _in_thread(self, f: Callable[[], _T]) -> Deferred[_T]:
        # Batched like the file backend's: several calls share one pool hand-off.
        if self._runner is None:
            reactor, pool = threads(self._reactor, self._threadpool)
            self._runner = BatchingRunner(reactor, pool, pool.max, linger_for(pool))
        return self._runner.run(f)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self._in_thread(lambda: self.pread(offset, length))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        def job() -> None:
            self.pwrite(offset, data)
            if fua:
                self.sync()

        return self._in_thread(job)

    def flush(self) -> Deferred[None]:
        return self._in_thread(self.sync)


@implementer(IBlockDevice)
class BlockDeviceFilter:
    """
    A device that wraps another and forwards every call to it. Subclass it
    and override what the filter changes; filters stack in any order.

    Optional companions of the wrapped device stay visible through the
    filter: if C{inner} provides L{ISparseRead}, so does the filter, and
    its C{read_sparse} goes to C{inner} - unless the subclass changes
    C{read} or C{block_status} without changing C{read_sparse} too, since
    then C{inner}'s answer would bypass the filter. (The server then falls
    back to C{block_status} and C{read} through the filter, which is
    always correct.) L{IBufferRead} likewise, unless the subclass changes
    C{read} without changing C{read_buffer}.

    @ivar inner: the wrapped device.
    """

    def __init__(self, inner: IBlockDevice) -> None:
        self.inner = inner
        if ISparseRead.providedBy(inner) and self._forwards_sparse_reads():
            alsoProvides(self, ISparseRead)
        if IBufferRead.providedBy(inner) and self._forwards_buffer_reads():
            alsoProvides(self, IBufferRead)

    def _forwards_buffer_reads(self) -> bool:
        """Whether C{read_buffer} agrees with this filter's C{read}."""
        cls = type(self)
        return (
            cls.read_buffer is not BlockDeviceFilter.read_buffer
            or cls.read is BlockDeviceFilter.read
        )

    def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        """
        Forward a read of the device's memory (L{IBufferRead}) to C{inner};
        only offered when C{inner} provides it.
        """
        data: bytes | memoryview = IBufferRead(self.inner).read_buffer(offset, length)
        return data

    def _forwards_sparse_reads(self) -> bool:
        """Whether C{read_sparse} agrees with this filter's C{read} and C{block_status}."""
        cls = type(self)
        if cls.read_sparse is not BlockDeviceFilter.read_sparse:
            return True
        return (
            cls.read is BlockDeviceFilter.read
            and cls.block_status is BlockDeviceFilter.block_status
        )

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        """
        Forward a sparse read (L{ISparseRead}) to C{inner}; only offered when
        C{inner} provides it.
        """
        d: Deferred[Sequence[Segment]] = ISparseRead(self.inner).read_sparse(offset, length)
        return d

    @property
    def size(self) -> int:
        return int(self.inner.size)

    @property
    def capabilities(self) -> Capabilities:
        caps: Capabilities = self.inner.capabilities
        return caps

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        d: Deferred[bytes] = self.inner.read(offset, length)
        return d

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        d: Deferred[None] = self.inner.write(offset, data, fua)
        return d

    def flush(self) -> Deferred[None]:
        d: Deferred[None] = self.inner.flush()
        return d

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        d: Deferred[None] = self.inner.trim(offset, length, fua)
        return d

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        d: Deferred[None] = self.inner.write_zeroes(offset, length, fua, may_trim, fast)
        return d

    def cache(self, offset: int, length: int) -> Deferred[None]:
        d: Deferred[None] = self.inner.cache(offset, length)
        return d

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        d: Deferred[Sequence[Extent]] = self.inner.block_status(offset, length)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self.inner.close()
        return d
