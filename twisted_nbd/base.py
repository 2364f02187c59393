# -*- test-case-name: tests.test_base -*-
"""
Base classes that make backends and filters short to write.

  - L{BlockDevice}: implement C{read} (and C{write} if it can write),
    returning Deferreds, plain values, or written with C{async def};
    everything else has a correct default, and the C{capabilities} follow
    from which methods the class defines.
  - L{ThreadedBlockDevice}: implement blocking C{pread}/C{pwrite}/C{sync};
    they run in a thread pool and the Deferreds are made for you
    (L{ThreadedBlockDevice.in_thread} runs any other blocking call).
  - L{BlockDeviceFilter}: wraps another device and forwards every call;
    override only what the filter changes (methods may be C{async def}).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence, TypeVar

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

__all__ = [
    "BlockDevice",
    "BlockDeviceFilter",
    "OperationFilter",
    "ThreadedBlockDevice",
    "as_deferred",
    "derive_capabilities",
]

_T = TypeVar("_T")

#: How many zero bytes the default write_zeroes writes at a time.
_ZERO_CHUNK = 1024 * 1024


#: The methods of L{IBlockDevice}.
OPERATIONS = ("read", "write", "flush", "trim", "write_zeroes", "cache", "block_status", "close")


def as_deferred(result: Any) -> Deferred[Any]:
    """
    A Deferred for what a backend method returned: a Deferred as it is, a
    coroutine run with L{Deferred.fromCoroutine}, any other value already
    fired.
    """
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return succeed(result)


def _returning_deferreds(f: Callable[..., Any]) -> Callable[..., Deferred[Any]]:
    """Wrap a backend method so it returns a Deferred whatever it returned or raised."""

    @functools.wraps(f)
    def method(*args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            return fail()
        return as_deferred(result)

    method.__nbd_adapted__ = True  # type: ignore[attr-defined]
    return method


def _running_coroutines(f: Callable[..., Any]) -> Callable[..., Deferred[Any]]:
    """Wrap an C{async def} method so it returns a Deferred."""

    @functools.wraps(f)
    def method(*args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    method.__nbd_adapted__ = True  # type: ignore[attr-defined]
    return method


def _adapt_methods(cls: type, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Wrap the L{IBlockDevice} methods C{cls} itself defines (once each)."""
    for name in OPERATIONS:
        f = cls.__dict__.get(name)
        if callable(f) and not getattr(f, "__nbd_adapted__", False):
            setattr(cls, name, wrap(f))


def derive_capabilities(cls: type, base: type) -> Capabilities:
    """
    Safe capabilities for a L{BlockDevice} subclass, from which methods it
    defines beyond C{base}'s, as nbdkit decides its defaults from the
    callbacks a plugin has:

      - C{can_write}: it defines C{write} (or C{pwrite});
      - C{can_flush} and C{can_fua}: it writes and defines C{flush} (or
        C{sync}); a FUA write is then a write and a flush unless the class
        says C{handles_fua = True};
      - C{can_trim}: it defines C{trim};
      - C{can_zero}: it writes (the default C{write_zeroes} writes zeroes);
      - C{can_fast_zero}: never by default (say so explicitly);
      - C{can_cache}: it defines C{cache};
      - C{can_extents}: it defines C{block_status};
      - C{can_multi_conn}: true, since one device object serves every
        connection of an export (a class with per-connection state says
        otherwise).
    """

    def defines(*names: str) -> bool:
        return any(getattr(cls, n, None) is not getattr(base, n, None) for n in names)

    can_write = defines("write", "pwrite")
    can_flush = can_write and defines("flush", "sync")
    return Capabilities(
        can_write=can_write,
        can_flush=can_flush,
        can_fua=can_flush,
        can_trim=can_write and defines("trim"),
        can_zero=can_write,
        can_fast_zero=False,
        can_cache=defines("cache"),
        can_extents=defines("block_status"),
        can_multi_conn=True,
    )


@implementer(IBlockDevice)
class BlockDevice:
    """
    A backend with sensible defaults: subclasses set C{size} and implement
    L{read} and L{write}.

    Methods may return a Deferred, a plain value, or be written with
    C{async def}: a subclass's methods are wrapped so that callers always
    get a Deferred (an exception becomes a failed one).

    The defaults: C{flush} and C{cache} do nothing, C{trim} does nothing,
    C{write_zeroes} writes zeroes in 1 MiB pieces (and refuses C{fast}
    ones, as the protocol asks), C{block_status} reports everything as
    allocated data, C{close} does nothing. Unless a subclass sets
    C{capabilities} itself, they follow from the methods it defines (see
    L{derive_capabilities}): no C{write}, read-only; no C{trim}, no TRIM;
    and so on.

    @ivar size: the device's size in bytes.
    @cvar handles_fua: C{write} honours C{fua} itself; when false (the
        default) a FUA write is a plain write followed by C{flush}.
    """

    size: int = 0
    capabilities: Capabilities = Capabilities(
        can_fast_zero=False, can_cache=False, can_extents=False
    )
    handles_fua: bool = False
    _capabilities_derived: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own_write = cls.__dict__.get("write")
        _adapt_methods(cls, _returning_deferreds)
        if own_write is not None and not cls.handles_fua:
            write = cls.__dict__["write"]

            def write_fua(
                self: BlockDevice, offset: int, data: bytes, fua: bool = False
            ) -> Deferred[None]:
                d: Deferred[None] = write(self, offset, data, False)
                if fua:
                    d.addCallback(lambda _: self.flush())
                return d

            write_fua.__nbd_adapted__ = True  # type: ignore[attr-defined]
            functools.update_wrapper(write_fua, write)
            cls.write = write_fua  # type: ignore[method-assign]
        # Capabilities someone wrote (in this class or a parent) win over derived ones.
        written = any(
            "capabilities" in vars(c) and not vars(c).get("_capabilities_derived")
            for c in cls.__mro__[: cls.__mro__.index(BlockDevice)]
        )
        if not written:
            threaded = globals().get("ThreadedBlockDevice")
            base = threaded if threaded is not None and issubclass(cls, threaded) else BlockDevice
            cls.capabilities = derive_capabilities(cls, base)
            cls._capabilities_derived = True

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

    handles_fua = True

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

    def in_thread(self, f: Callable[[], _T]) -> Deferred[_T]:
        """
        Run the blocking C{f} in the thread pool.

        @return: a Deferred that fires with what C{f} returns, or fails with
            what it raises.
        """
        # Batched like the file backend's: several calls share one pool hand-off.
        if self._runner is None:
            reactor, pool = threads(self._reactor, self._threadpool)
            self._runner = BatchingRunner(reactor, pool, pool.max, linger_for(pool))
        return self._runner.run(f)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self.in_thread(lambda: self.pread(offset, length))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        def job() -> None:
            self.pwrite(offset, data)
            if fua:
                self.sync()

        return self.in_thread(job)

    def flush(self) -> Deferred[None]:
        return self.in_thread(self.sync)


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

    Methods a subclass writes with C{async def} are run with
    L{Deferred.fromCoroutine}; others must return Deferreds (the common
    path of a filter that changes nothing costs no extra Deferred).

    @ivar inner: the wrapped device.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in (*OPERATIONS, "read_sparse"):
            f = cls.__dict__.get(name)
            if inspect.iscoroutinefunction(f):
                setattr(cls, name, _running_coroutines(f))

    def __init__(self, inner: IBlockDevice) -> None:
        self.inner = inner
        # The inner companions' methods, looked up once: adapting on every
        # call (IBufferRead(inner)) costs more than the read it forwards.
        self._inner_read_sparse: Callable[[int, int], Deferred[Sequence[Segment]]] | None = None
        self._inner_read_buffer: Callable[[int, int], bytes | memoryview] | None = None
        if ISparseRead.providedBy(inner):
            self._inner_read_sparse = inner.read_sparse
            if self._forwards_sparse_reads():
                alsoProvides(self, ISparseRead)
        if IBufferRead.providedBy(inner):
            self._inner_read_buffer = inner.read_buffer
            if self._forwards_buffer_reads():
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
        read_buffer = self._inner_read_buffer
        if read_buffer is None:
            raise NBDError(Errno.ENOTSUP, "the device below cannot be read from memory")
        return read_buffer(offset, length)

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
        read_sparse = self._inner_read_sparse
        if read_sparse is None:
            return fail(NBDError(Errno.ENOTSUP, "the device below has no sparse reads"))
        return read_sparse(offset, length)

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


class OperationFilter(BlockDeviceFilter):
    """
    A filter that treats every operation alike: each call reaches
    L{around} with the operation's name (C{"read"}, C{"write"}, C{"flush"},
    C{"trim"}, C{"zero"}, C{"cache"}, C{"extents"}) and a function that
    makes the call on the device below. A fault injector or a delay is
    then one method (see the C{error} and C{delay} filters).
    """

    def around(self, op: str, call: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """
        Run C{call} (the operation C{op} on the device below) as this
        filter sees fit; the default just runs it.

        @return: a Deferred that fires with what C{call}'s fires with, or
            fails as this filter decides.
        """
        return call()

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self.around("read", lambda: self.inner.read(offset, length))

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        forward = super().read_sparse
        return self.around("read", lambda: forward(offset, length))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        return self.around("write", lambda: self.inner.write(offset, data, fua))

    def flush(self) -> Deferred[None]:
        return self.around("flush", lambda: self.inner.flush())

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return self.around("trim", lambda: self.inner.trim(offset, length, fua))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        return self.around(
            "zero", lambda: self.inner.write_zeroes(offset, length, fua, may_trim, fast)
        )

    def cache(self, offset: int, length: int) -> Deferred[None]:
        return self.around("cache", lambda: self.inner.cache(offset, length))

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        return self.around("extents", lambda: self.inner.block_status(offset, length))
