# -*- test-case-name: tests.test_backends -*-
"""
The interfaces that storage backends and filters implement.

Every operation returns a L{Deferred}; a backend may fire it before returning
(the memory backend does) or later (the file backend runs its system calls in
a thread pool). Failures that should reach the client with a particular NBD
error number are L{twisted_nbd.errors.NBDError}; any other exception is
logged by the server and sent to the client as C{EIO}.

The server validates every request before calling a backend: offsets and
lengths are within C{size}, aligned to C{capabilities.min_block}, no write
reaches a device whose capabilities say it cannot write, and so on. Backends
need not check again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = [
    "Capabilities",
    "Extent",
    "IBlockDevice",
    "IBufferRead",
    "IBufferWrite",
    "IImmediateIO",
    "IPipeRead",
    "IPipeWrite",
    "ISparseRead",
    "STATE_HOLE",
    "STATE_ZERO",
    "Segment",
]

#: C{base:allocation} status bit: the range is not allocated.
STATE_HOLE = 1
#: C{base:allocation} status bit: the range reads as zeroes.
STATE_ZERO = 2


@dataclass(frozen=True)
class Capabilities:
    """
    What a block device can do, decided once when it is opened (like
    nbdkit's C{can_*} callbacks). The server advertises exactly these.

    @ivar can_write: writes are possible; C{False} makes the export read-only.
    @ivar can_flush: C{flush} makes acknowledged writes durable.
    @ivar can_fua: C{fua=True} makes a single write durable before it returns.
    @ivar can_trim: C{trim} may discard data.
    @ivar can_zero: C{write_zeroes} is supported and WRITE_ZEROES is
        advertised.
    @ivar can_fast_zero: C{write_zeroes(fast=True)} can tell quickly
        whether zeroing is cheap, failing with C{ENOTSUP} when it is not.
    @ivar can_cache: C{cache} does something useful (prefetch).
    @ivar can_extents: C{block_status} reports holes and zeroes.
    @ivar can_multi_conn: every connection sees one shared state, so a
        flush on any connection covers writes acknowledged on all of them.
    @ivar rotational: a hint that the storage behaves like a spinning disk.
    @ivar min_block: the smallest addressable unit (power of two).
    @ivar preferred_block: the preferred I/O size (power of two).
    @ivar max_block: the largest payload of one request.
    """

    can_write: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = False
    can_extents: bool = False
    can_multi_conn: bool = True
    rotational: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class Extent:
    """
    A run of bytes with one C{base:allocation} status.

    @ivar length: the number of bytes, greater than zero.
    @ivar flags: a combination of L{STATE_HOLE} and L{STATE_ZERO}.
    """

    length: int
    flags: int


#: A piece of a sparse read: C{(offset, data)} for bytes that were read, or
#: C{(offset, length)} for a run that reads as zeroes.
Segment = tuple[int, "bytes | int"]


class IBlockDevice(Interface):
    """
    A fixed-size array of bytes that can be read and written at any offset.

    Offsets and lengths passed in are always within C{size}; C{length} may be
    zero only for C{read} (the server answers other zero-length requests
    itself).
    """

    size = Attribute("The size of the device in bytes (an C{int}).")
    capabilities = Attribute("A L{Capabilities} describing the device.")

    def read(offset: int, length: int) -> "Deferred[bytes]":
        """
        Read C{length} bytes at C{offset}.

        @return: a Deferred that fires with exactly C{length} bytes, or
            fails with L{NBDError}.
        """

    def write(offset: int, data: bytes, fua: bool = False) -> "Deferred[None]":
        """
        Write C{data} at C{offset}. With C{fua}, the data is durable when the
        Deferred fires. C{data} may be any bytes-like object (C{bytes},
        C{bytearray}, C{memoryview}); nothing changes it until the Deferred
        has fired, and after that the server may reuse its memory: a device
        that keeps the bytes (a cache) must copy them.

        @return: a Deferred that fires with C{None} once the data would be
            returned by a later C{read}, or fails with L{NBDError}
            (C{ENOSPC} when out of space).
        """

    def flush() -> "Deferred[None]":
        """
        Make every write that has already completed durable.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}.
        """

    def trim(offset: int, length: int, fua: bool = False) -> "Deferred[None]":
        """
        Discard a range: afterwards its contents are unspecified until
        rewritten. Doing nothing is a valid implementation.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}.
        """

    def write_zeroes(
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> "Deferred[None]":
        """
        Make a range read back as zeroes. With C{may_trim} false the range
        stays allocated (NBD_CMD_FLAG_NO_HOLE). With C{fast}, fail at once
        with C{NBDError(ENOTSUP)} unless zeroing is much faster than
        writing, leaving the data untouched.

        @return: a Deferred that fires with C{None}, or fails with
            L{NBDError}.
        """

    def cache(offset: int, length: int) -> "Deferred[None]":
        """
        Hint that a range will be read soon.

        @return: a Deferred that fires with C{None}; a failure changes
            nothing that follows.
        """

    def block_status(offset: int, length: int) -> "Deferred[Sequence[Extent]]":
        """
        Describe the allocation of the bytes from C{offset}.

        @return: a Deferred that fires with one or more consecutive
            L{Extent}s starting at C{offset}; together they may cover less
            than C{length} (at least one byte) or run past it, and a single
            extent may be longer than 4 GiB (the server cuts extents to what
            the wire can carry). A range reported with L{STATE_ZERO} must
            read as zeroes. Fails with L{NBDError}.
        """

    def close() -> "Deferred[None]":
        """
        Release the device's resources. Requests still running may finish
        first; calling C{close} twice is harmless. C{close} does not imply
        C{flush}: only acknowledged FLUSH and FUA promise durability.

        @return: a Deferred that fires with C{None} once the resources are
            released.
        """


class ISparseRead(Interface):
    """
    An optional companion of L{IBlockDevice} for devices that know where
    their zeroes are. With structured replies the server sends zero runs as
    OFFSET_HOLE chunks instead of bytes; a device that provides this does
    the lookup and the reads in one call (one thread pool trip for the file
    backend) instead of the server calling C{block_status} then C{read}.
    """

    def read_sparse(offset: int, length: int) -> "Deferred[Sequence[Segment]]":
        """
        Read C{length} bytes at C{offset}, describing zero runs instead of
        returning them.

        @return: a Deferred that fires with consecutive segments covering
            exactly the range, each C{(offset, data)} or C{(offset,
            zero_run_length)} (see L{twisted_nbd.extents.plan_sparse_read}),
            or fails with L{NBDError}. A device that also provides
            L{IBufferRead} may give views of its memory as data, valid
            (as there) only until control returns to the reactor.
        """


class IBufferRead(Interface):
    """
    An optional companion of L{IBlockDevice} for devices that hold their
    bytes in memory (the RAM disk): the server sends a READ's reply straight
    from the device's memory instead of from a copy.
    """

    def read_buffer(offset: int, length: int) -> "bytes | memoryview":
        """
        Return C{length} bytes at C{offset} at once (no Deferred), or raise
        L{NBDError}. The result may be a view of the device's memory: it is
        valid only until control returns to the reactor, since a later write
        changes it; the server writes it to the socket before then, or
        copies what the socket did not take.
        """


class IBufferWrite(Interface):
    """
    An optional companion of L{IBlockDevice} for devices that hold their
    bytes in one piece of memory (the RAM disk): the server receives a large
    WRITE's payload from the socket straight into the device's memory,
    instead of into a buffer that is then copied there.
    """

    def write_buffer(offset: int, length: int) -> "memoryview | None":
        """
        A writable view of the C{length} bytes at C{offset} (a range the
        server has checked), for the server to fill with a WRITE's payload;
        or C{None} to decline (the server then calls L{IBlockDevice.write}).

        From this call on the range counts as written: later reads must
        return whatever the view holds. The server acknowledges the WRITE
        only once it has filled the view. If the client goes away halfway
        through the payload, the range is left part new and part old, as a
        disk losing power in the middle of a write leaves it: the spec
        promises nothing about a write that was never acknowledged. The
        server releases the view when it is done with it.
        """


class IPipeWrite(Interface):
    """
    An optional companion of L{IBlockDevice} for devices over a file
    descriptor (a file or block device): the server splices a large WRITE's
    payload from the socket into a pipe, which moves the socket's pages
    without copying them, and the device moves it from the pipe to its file
    with C{splice}, one copy in the kernel. Received into a buffer and then
    written, the payload would be copied twice.

    The server only does this once the whole payload is in the pipe, and
    in the request's turn, exactly where it would call L{IBlockDevice.write}:
    a WRITE is all-or-nothing as usual.
    """

    def write_from_pipe(source: int, offset: int, length: int, fua: bool) -> "Deferred[None]":
        """
        Move the C{length} bytes waiting in the pipe C{source} (all of them
        there already) to C{offset} (a range the server has checked); with
        C{fua}, make them durable first, as L{IBlockDevice.write} does.

        The pipe is the server's: the device must not use it once the
        Deferred has fired (or after failing at once). The server reuses it
        if the call succeeded and closes it otherwise, so a failure may
        leave bytes in it.

        @return: a Deferred that fires with C{None} once all has moved, or
            fails with L{NBDError}.
        """


class IPipeRead(Interface):
    """
    An optional companion of L{IBlockDevice} for devices over a file
    descriptor (a page-cached file): the server has the device splice a
    large READ's bytes into a pipe, which takes the page cache's pages by
    reference, and splices the pipe to the socket: no copy in the server
    at all, where L{IImmediateIO.read_now} and sending the buffer make two.

    The server offers READs from C{twisted_nbd._transport.PIPE_READ_MIN}
    (64 KiB) to the pipe's size (1 MiB), in the reactor thread, when the
    connection has a plain socket (not TLS) and no observers. The device
    must decline whatever it cannot move at once (C{splice} from a file
    has no non-blocking mode: a page not in the cache would be read from
    disk).
    """

    def read_to_pipe(sink: int, offset: int, length: int) -> int:
        """
        Move the C{length} bytes at C{offset} (a range the server has
        checked) into the pipe C{sink}, which is empty and holds at least
        C{length} bytes, if that can be done at once; raise nothing.

        A range that may hold holes should be declined: the server sends
        what it splices as one piece of data, where it would have answered
        a sparse range with holes (L{ISparseRead}).

        @return: how many bytes were moved. Anything but C{length} is a
            refusal: the server empties the pipe and reads the usual way
            (L{IImmediateIO.read_now}, then L{IBlockDevice.read}).
        """


class IImmediateIO(Interface):
    """
    An optional companion of L{IBlockDevice} for devices that can often
    answer without waiting (a page-cached file, memory): the server tries
    these first, in the reactor thread, and uses the Deferred-returning
    methods only when they decline. Each call must return quickly and never
    block; declining costs little, so decline whenever in doubt.
    """

    def read_now(offset: int, length: int) -> "bytes | bytearray | None":
        """
        Return the C{length} bytes at C{offset} if they can be had at once,
        else C{None} (the server then calls L{IBlockDevice.read}). The
        result is the caller's: the device does not change it later.
        """

    def write_now(offset: int, data: "bytes | memoryview") -> int:
        """
        Write what can be written at once of C{data} (a write without FUA)
        at C{offset}, from its start, without waiting; return how many
        bytes that was, from 0 (the server then calls L{IBlockDevice.write}
        for all of it) to C{len(data)}; for less, the server writes the
        rest with L{IBlockDevice.write}. C{data} is valid only during the
        call. Raise nothing: a write that fails here is left to
        L{IBlockDevice.write}, which reports the error.
        """
