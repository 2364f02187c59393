# -*- test-case-name: tests.interop.test_rbd -*-
"""
The C{rbd} backend: a Ceph RBD image, through librbd's asynchronous calls.

    twistd -n nbd --backend rbd:pool=rbd,image=disk,conf=/etc/ceph/ceph.conf

Reads, writes, discards, zeroing and flushes are librbd C{aio_*} calls: they
return at once, librbd runs them on its own threads, and their completion
callbacks (on a librbd thread, never the reactor's) hand the result to the
reactor with C{callFromThread}. Those callbacks never raise: an exception
there would vanish inside librbd. Only the calls librbd has no asynchronous
form of (connecting, opening and closing, C{diff_iterate} for block status)
run in the reactor's thread pool.

Durability: a librbd write completes when every replica of its objects has
it (the OSDs acknowledge only then); with librbd's cache off (the default
here, key C{cache}) FLUSH has nothing left to do but is still sent, and FUA
is a write followed by a flush. Coherence between several servers on one
image (scale-out): with the cache off, a read anywhere sees
every write that any server has acknowledged, since RADOS is strongly
consistent per object. See docs/backend-rbd.md for the exclusive-lock
feature and what it costs when several servers write.
"""

from __future__ import annotations

import errno as _errno
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from twisted_nbd._ceph import CephBindingsMissingError, import_rados, import_rbd
from twisted_nbd._wire import Errno
from twisted_nbd.errors import NBDError, errno_from_os_error
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO, Capabilities, Extent, IBlockDevice
from twisted_nbd.registry import BOOL, DURATION, PATH, STRING, BackendPlugin, Key

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from twisted_nbd.backends import OpenContext

__all__ = [
    "BLOCK_STATUS_SPAN",
    "MAX_EXTENTS",
    "RBDBlockDevice",
    "RBDOptions",
    "open_rbd",
    "open_rbd_blocking",
    "plugin",
]

_T = TypeVar("_T")
_log = Logger()

#: C{block_status} looks at most this many bytes at a time (the interface
#: lets it answer for less than asked): C{diff_iterate} asks the OSDs about
#: every object in the range, 4 MiB each by default.
BLOCK_STATUS_SPAN = 256 * 1024 * 1024
#: ... and stops after this many extents.
MAX_EXTENTS = 1024
_HOLE = STATE_HOLE | STATE_ZERO


@dataclass(frozen=True)
class RBDOptions:
    """
    Where the image is and how to reach it.

    @ivar image: the image's name.
    @ivar pool: its pool.
    @ivar namespace: its RADOS namespace within the pool (C{""}: none).
    @ivar snapshot: serve this snapshot of it, read-only (C{""}: the image).
    @ivar conf: the C{ceph.conf} to read (C{""}: librados's default search:
        C{$CEPH_CONF}, C{/etc/ceph/ceph.conf}, ...).
    @ivar user: the Ceph user without C{client.} (C{""}: librados's default,
        C{admin}).
    @ivar keyring: the keyring file (C{""}: what C{conf} says).
    @ivar read_only: open the image read-only (no exclusive lock taken).
    @ivar cache: keep librbd's write-back cache on (faster small writes;
        then other servers on the same image may read stale data).
    @ivar timeout: seconds to wait for the monitors when connecting
        (rounded up to whole seconds, as Ceph takes them).
    @ivar op_timeout: seconds after which an I/O the OSDs do not answer
        fails with EIO (0: wait for ever, librados's default; rounded up).
    """

    image: str
    pool: str = "rbd"
    namespace: str = ""
    snapshot: str = ""
    conf: str = ""
    user: str = ""
    keyring: str = ""
    read_only: bool = False
    cache: bool = False
    timeout: float = 30.0
    op_timeout: float = 0.0

    def describe(self) -> str:
        """C{pool/[namespace/]image[@snapshot]}, for messages."""
        where = f"{self.pool}/{self.namespace + '/' if self.namespace else ''}{self.image}"
        return where + (f"@{self.snapshot}" if self.snapshot else "")


def _rados_error_errno(error: BaseException) -> int:
    """The errno a rados/rbd exception carries (they subclass OSError in 16.2), or EIO."""
    code = getattr(error, "errno", None)
    return abs(code) if isinstance(code, int) and code else _errno.EIO


def _nbd_error(code: int, what: str) -> NBDError:
    """The NBDError for a librbd result C{-code} of C{what}."""
    text = _errno.errorcode.get(code, str(code))
    return NBDError(errno_from_os_error(OSError(code, text)), f"{what}: {text}")


class _Handles:
    """The open librados cluster handle, pool context and image; closed in reverse."""

    def __init__(self, cluster: Any, ioctx: Any, image: Any) -> None:
        self.cluster = cluster
        self.ioctx = ioctx
        self.image = image

    def close(self) -> None:
        """Close the image, the pool context and the connection (blocks)."""
        for closer in (self.image.close, self.ioctx.close, self.cluster.shutdown):
            try:
                closer()
            except Exception:
                _log.failure("Closing an rbd image")


def _connect(options: RBDOptions) -> _Handles:
    """
    Connect to the cluster and open the image. This blocks: run it in a
    thread, or while the server is being built.

    @raise OSError: the cluster cannot be reached, or the image opened
        (C{rados}/C{rbd} errors are C{OSError}s), with a reason that names it.
    @raise CephBindingsMissingError: Ceph's Python bindings are missing.
    """
    rbd = import_rbd()
    rados = import_rados()

    conf = {
        # The cache would let two servers on one image disagree (see the
        # module docstring); librbd's own default is on.
        "rbd_cache": "true" if options.cache else "false",
        # Ceph takes whole seconds here.
        "client_mount_timeout": str(math.ceil(options.timeout)),
        "rados_mon_op_timeout": str(math.ceil(options.timeout)),
        "rados_osd_op_timeout": str(math.ceil(options.op_timeout)),
    }
    if options.keyring:
        conf["keyring"] = options.keyring
    try:
        cluster = rados.Rados(
            conffile=options.conf or None, rados_id=options.user or None, conf=conf
        )
    except rados.Error as e:
        raise OSError(
            _rados_error_errno(e),
            f"cannot read the Ceph configuration {options.conf or '(default)'}: {e}",
        ) from e
    where = options.describe()
    try:
        try:
            cluster.connect(timeout=max(1, math.ceil(options.timeout)))
        except rados.Error as e:
            raise OSError(
                _rados_error_errno(e),
                f"cannot connect to the Ceph cluster ({options.conf or 'default ceph.conf'}, "
                f"user {options.user or 'admin'}): {e}",
            ) from e
        try:
            ioctx = cluster.open_ioctx(options.pool)
        except rados.Error as e:
            raise OSError(_rados_error_errno(e), f"cannot open pool {options.pool!r}: {e}") from e
    except BaseException:
        cluster.shutdown()
        raise
    try:
        if options.namespace:
            ioctx.set_namespace(options.namespace)
        image = rbd.Image(
            ioctx,
            options.image,
            snapshot=options.snapshot or None,
            read_only=options.read_only or bool(options.snapshot),
        )
    except Exception as e:
        ioctx.close()
        cluster.shutdown()
        raise OSError(_rados_error_errno(e), f"cannot open rbd image {where}: {e}") from e
    return _Handles(cluster, ioctx, image)


def open_rbd_blocking(options: RBDOptions, reactor: Any, threadpool: ThreadPool) -> RBDBlockDevice:
    """
    Open the image now, blocking for as long as that takes (bounded by
    C{options.timeout} for reaching the monitors): for use while the
    server is built, before the reactor runs.

    @raise OSError: it could not be opened (the reason names the step).
    @raise CephBindingsMissingError: Ceph's Python bindings are missing.
    """
    return RBDBlockDevice(_connect(options), options, reactor, threadpool)


def open_rbd(options: RBDOptions, reactor: Any, threadpool: ThreadPool) -> Deferred[RBDBlockDevice]:
    """
    Open the image from a running reactor: connecting and opening run in
    C{threadpool} (which must be started).

    @return: a Deferred that fires with the L{RBDBlockDevice}, or fails
        with C{OSError} or L{CephBindingsMissingError}.
    """
    d = deferToThreadPool(reactor, threadpool, _connect, options)
    return d.addCallback(lambda handles: RBDBlockDevice(handles, options, reactor, threadpool))


class _Op:
    """
    One librbd request in flight: its Deferred, and what must stay alive
    until librbd is done with it (librbd may write straight from the
    caller's buffer, so the bytes are referenced here, not only by the
    binding).
    """

    __slots__ = ("completion", "data", "deferred", "length", "what")

    def __init__(self, what: str, length: int = 0, data: bytes | None = None) -> None:
        self.what = what
        self.length = length
        self.data = data
        self.completion: Any = None
        self.deferred: Deferred[Any] = Deferred()


@implementer(IBlockDevice)
class RBDBlockDevice:
    """
    An RBD image as a block device (made by L{open_rbd} or
    L{open_rbd_blocking}). All connections to the export share this one
    librbd image handle, so a flush on any covers the writes of all
    (multi-conn safe).

    @ivar size: the image's (or snapshot's) size when it was opened.
    @ivar options: what was opened.
    """

    def __init__(
        self, handles: _Handles, options: RBDOptions, reactor: Any, threadpool: ThreadPool
    ) -> None:
        self._handles = handles
        self._image = handles.image
        self._reactor = reactor
        self._pool = threadpool
        self.options = options
        self.size: int = self._image.size()
        read_only = options.read_only or bool(options.snapshot)
        self.capabilities = Capabilities(
            can_write=not read_only,
            can_flush=True,
            can_fua=not read_only,
            can_trim=not read_only,
            can_zero=not read_only,
            can_fast_zero=not read_only,
            can_cache=False,
            can_extents=True,
            can_multi_conn=True,
            rotational=False,
            min_block=1,
            preferred_block=4096,
            max_block=32 * 1024 * 1024,
        )
        rbd = import_rbd()
        self._thick = rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        self._in_flight: set[_Op] = set()
        self._drained: list[Deferred[None]] = []
        self._closing = False
        self._released = False
        self._close_waiters: list[Deferred[None]] = []

    # ------------------------------------------------------------ aio plumbing

    def _complete(self, op: _Op, completion: Any, data: Any = None) -> None:
        """
        librbd's completion callback, on a librbd thread. It must not raise
        (the exception would be lost inside librbd, gotcha 4): it only hands
        the result to the reactor.
        """
        try:
            try:
                result: Any = completion.get_return_value()
            except BaseException as e:  # pragma: no cover - defensive
                result = e
            self._reactor.callFromThread(self._deliver, op, result, data)
        except BaseException:  # pragma: no cover - the reactor is gone: nobody waits
            pass

    def _deliver(self, op: _Op, result: Any, data: Any) -> None:
        """In the reactor thread: fire the request's Deferred."""
        self._in_flight.discard(op)
        op.completion = None
        op.data = None
        d = op.deferred
        if isinstance(result, BaseException):
            d.errback(NBDError(Errno.EIO, f"rbd {op.what}: {result}"))
        elif result < 0:
            d.errback(_nbd_error(-result, f"rbd {op.what} on {self.options.describe()}"))
        elif op.what == "read":
            # Reads complete with the byte count (writes with 0: gotcha 3).
            if data is None or len(data) != op.length:
                got = None if data is None else len(data)
                d.errback(NBDError(Errno.EIO, f"rbd read: {got} bytes, not {op.length}"))
            else:
                d.callback(data)
        else:
            d.callback(None)
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        """Tell L{close} when nothing is in flight any more."""
        if not self._in_flight and self._drained:
            waiting, self._drained = self._drained, []
            for waiter in waiting:
                waiter.callback(None)

    def _submit(self, op: _Op, start: Callable[[Callable[..., None]], Any]) -> Deferred[Any]:
        """Start an aio call, C{start(oncomplete)}; the request's Deferred."""
        if self._closing:
            return fail(NBDError(Errno.ESHUTDOWN, "the rbd image is closed"))

        def oncomplete(completion: Any, data: Any = None) -> None:
            self._complete(op, completion, data)

        try:
            op.completion = start(oncomplete)
        except Exception as e:
            # librbd refused it at once (an argument out of range, ...).
            return fail(_nbd_error(_rados_error_errno(e), f"rbd {op.what}: {e}"))
        self._in_flight.add(op)
        return op.deferred

    def _then_flush(self, d: Deferred[None], fua: bool) -> Deferred[None]:
        if not fua:
            return d
        return d.addCallback(lambda _: self.flush())

    # ------------------------------------------------------------ IBlockDevice

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """
        Read with C{aio_read}.

        @return: a Deferred that fires with C{length} bytes, or fails with
            L{NBDError} (EIO, or the OSD's error mapped).
        """
        if length == 0:
            return succeed(b"")
        op = _Op("read", length)
        return self._submit(op, lambda done: self._image.aio_read(offset, length, done))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        """
        Write with C{aio_write}; with C{fua}, then flush.

        @return: a Deferred that fires with C{None} once every replica has
            the data, or fails with L{NBDError} (ENOSPC when the cluster is
            full, EPERM when read-only).
        """
        # The binding wants bytes; the server may reuse a bytearray or
        # memoryview's memory once this fires, and _Op keeps the copy alive.
        payload = data if type(data) is bytes else bytes(data)
        op = _Op("write", len(payload), payload)
        d = self._submit(op, lambda done: self._image.aio_write(payload, offset, done))
        return self._then_flush(d, fua)

    def flush(self) -> Deferred[None]:
        """
        C{aio_flush}: every write completed before is durable.

        @return: a Deferred that fires with C{None}, or fails with L{NBDError}.
        """
        return self._submit(_Op("flush"), lambda done: self._image.aio_flush(done))

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        """
        C{aio_discard}. Advisory: librbd leaves alone pieces smaller than
        its discard granularity (64 KiB by default) or not aligned to it.

        @return: a Deferred that fires with C{None}, or fails with L{NBDError}.
        """
        op = _Op("discard")
        d = self._submit(op, lambda done: self._image.aio_discard(offset, length, done))
        return self._then_flush(d, fua)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        """
        C{aio_write_zeroes}: exact to the byte, whatever the discard
        granularity (librbd zeroes the unaligned edges). Whole objects are
        deleted when C{may_trim}; without it (NO_HOLE) librbd writes the
        zeroes (thick provisioning), which is no faster than a write, so
        C{fast} then fails with ENOTSUP.

        @return: a Deferred that fires with C{None}, or fails with L{NBDError}.
        """
        if fast and not may_trim:
            return fail(NBDError(Errno.ENOTSUP, "zeroing without holes is not fast on rbd"))
        flags = 0 if may_trim else self._thick
        op = _Op("write_zeroes")
        d = self._submit(
            op, lambda done: self._image.aio_write_zeroes(offset, length, done, zero_flags=flags)
        )
        return self._then_flush(d, fua)

    def cache(self, offset: int, length: int) -> Deferred[None]:
        """Nothing to prefetch into (the cache is off).

        @return: a Deferred that has fired with C{None}.
        """
        return succeed(None)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        """
        Allocation from C{diff_iterate} (against the image's creation, parent
        included), in the thread pool: a range librbd reports is data, the
        rest is a hole that reads as zeroes. At most L{BLOCK_STATUS_SPAN}
        bytes are looked at.

        @return: a Deferred that fires with the extents from C{offset}, or
            fails with L{NBDError}.
        """
        if self._closing:
            return fail(NBDError(Errno.ESHUTDOWN, "the rbd image is closed"))
        span = min(length, BLOCK_STATUS_SPAN, self.size - offset)
        # Counted as in flight, so that close waits for it before closing
        # the image under the thread that uses it.
        op = _Op("block_status")
        self._in_flight.add(op)
        d = deferToThreadPool(self._reactor, self._pool, self._extents, offset, span)

        def done(result: Any) -> Any:
            self._in_flight.discard(op)
            self._maybe_drained()
            return result

        def failed(failure: Any) -> Any:
            if failure.check(NBDError):
                return failure
            error = failure.value
            return fail(_nbd_error(_rados_error_errno(error), f"rbd block status: {error}"))

        return d.addBoth(done).addErrback(failed)

    def _extents(self, offset: int, length: int) -> list[Extent]:
        """In a thread: the extents of C{[offset, offset + length)}."""
        end = offset + length
        extents: list[Extent] = []
        position = offset

        def found(start: int, size: int, exists: bool) -> int:
            nonlocal position
            stop = min(start + size, end)
            start = max(start, position)
            if stop <= start:
                return 0
            if start > position:
                extents.append(Extent(start - position, _HOLE))
            # exists is false only for ranges zeroed since a snapshot.
            extents.append(Extent(stop - start, 0 if exists else _HOLE))
            position = stop
            # A negative return stops the iteration (the binding raises
            # then, which _extents catches below).
            return -_errno.ECANCELED if len(extents) >= MAX_EXTENTS else 0

        try:
            self._image.diff_iterate(offset, length, None, found, include_parent=True)
        except Exception as e:
            if len(extents) < MAX_EXTENTS:
                raise
            _log.debug("block status stopped after {n} extents ({e})", n=len(extents), e=e)
        if not extents or position < end and len(extents) < MAX_EXTENTS:
            extents.append(Extent(end - position, _HOLE))
        # Neighbours with equal flags merge (librbd reports object by object).
        merged: list[Extent] = []
        for extent in extents:
            if merged and merged[-1].flags == extent.flags:
                merged[-1] = Extent(merged[-1].length + extent.length, extent.flags)
            else:
                merged.append(extent)
        return merged

    def close(self) -> Deferred[None]:
        """
        Wait for the requests in flight, then close the image, the pool
        context and the connection (in the thread pool if it runs). Does
        not flush: with the cache off there is nothing to flush, and with it
        on, librbd flushes when the image is closed.

        @return: a Deferred that fires with C{None} when all is released
            (at once if it was already).
        """
        if self._released:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        if self._closing:
            return waiter
        self._closing = True
        drained: Deferred[None] = Deferred()
        if self._in_flight:
            self._drained.append(drained)
        else:
            drained.callback(None)

        def release(_: object) -> Deferred[None] | None:
            if self._pool.started:
                return deferToThreadPool(self._reactor, self._pool, self._handles.close)
            # Not serving (the server is being built, or failed to be):
            # blocking briefly is fine then.
            self._handles.close()
            return None

        def released(result: object) -> None:
            self._released = True
            waiting, self._close_waiters = self._close_waiters, []
            for each in waiting:
                each.callback(None)

        drained.addCallback(release)
        drained.addErrback(lambda f: _log.failure("Closing rbd image", f))
        drained.addCallback(released)
        return waiter


# ------------------------------------------------------------ the plugin


def _options(values: Mapping[str, Any], read_only: bool = False) -> RBDOptions:
    user = values["user"] or values["id"] or ""
    return RBDOptions(
        image=values["image"],
        pool=values["pool"],
        namespace=values["namespace"],
        snapshot=values["snapshot"],
        conf=values["conf"],
        user=user,
        keyring=values["keyring"],
        read_only=read_only,
        cache=values["cache"],
        timeout=values["timeout"],
        op_timeout=values["op-timeout"],
    )


def _check(values: Mapping[str, Any]) -> None:
    if not values["image"]:
        raise ValueError("image: the image's name is empty")
    if values["user"] and values["id"] and values["user"] != values["id"]:
        raise ValueError("id: give the Ceph user once (id and user are the same key)")
    if values["timeout"] <= 0:
        raise ValueError("timeout: must be more than 0 seconds")
    try:
        import_rbd()
    except CephBindingsMissingError as e:
        raise ValueError(f"image: {e}") from None


def _open(values: Mapping[str, Any], context: OpenContext) -> RBDBlockDevice:
    return open_rbd_blocking(
        _options(values, context.read_only), context.reactor, context.threadpool()
    )


#: C{--backend rbd:image=NAME[,pool=rbd,conf=PATH,user=NAME,keyring=PATH,...]}.
plugin = BackendPlugin(
    name="rbd",
    help="a Ceph RBD image, through librbd's asynchronous I/O (python3-rbd)",
    keys=(
        Key("image", STRING, help="the image's name"),
        Key("pool", STRING, "rbd", "the pool that holds it"),
        Key("namespace", STRING, "", "its RADOS namespace in the pool", shown="none"),
        Key("snapshot", STRING, "", "serve this snapshot, read-only", shown="none"),
        Key("conf", PATH, "", "the ceph.conf to read", shown="$CEPH_CONF or /etc/ceph/ceph.conf"),
        Key("user", STRING, "", "the Ceph user, without 'client.'", shown="admin"),
        Key("id", STRING, "", "the same as user (as rbd --id and qemu say)", shown="admin"),
        Key("keyring", PATH, "", "the keyring file", shown="what conf says"),
        Key("cache", BOOL, False, "librbd's cache (then other servers may read stale data)"),
        Key("timeout", DURATION, 30.0, "how long to wait for the monitors when connecting"),
        Key("op-timeout", DURATION, 0.0, "fail I/O the OSDs do not answer in time", "never"),
    ),
    open=_open,
    check=_check,
)
