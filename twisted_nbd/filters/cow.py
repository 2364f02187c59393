# -*- test-case-name: tests.test_filters -*-
"""
The C{cow} filter: copy-on-write. Writes, trims and zeroing go to an
overlay (a sparse temporary file, or memory); the device below is never
written. Reads take each block from wherever its newest contents are, and
block status reports the overlay's holes and data where it holds the
block and the device's elsewhere. As in nbdkit 1.44 and later, there is
one overlay per export, shared by every connection to it, so what one
client writes the others read. The overlay is thrown away with the export.

The overlay is kept in blocks of C{block-size} bytes (64 KiB by default).
A block is either still the device's or wholly the overlay's: a write that
covers part of a block first copies the block up from the device (once,
however many requests want it at the same time). An untouched range costs
a map lookup: reads, sparse reads and reads from memory go straight to the
device below, with no extra Deferred.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping, Sequence, cast

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.python.failure import Failure

from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.backends.file import FileBlockDevice
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.errors import NBDError
from twisted_nbd.filters._util import clip_extents
from twisted_nbd.interfaces import (
    Capabilities,
    Extent,
    IBlockDevice,
    ISparseRead,
    Segment,
)
from twisted_nbd.registry import PATH, SIZE, FilterPlugin, Key, choice

__all__ = ["CopyOnWriteFilter", "plugin", "temporary_file_overlay"]

_BASE, _OVERLAY = 0, 1


def temporary_file_overlay(size: int, context: OpenContext, directory: str | None) -> IBlockDevice:
    """
    A sparse file of C{size} bytes in C{directory} (the system's temporary
    directory if C{None}), deleted at once so that nothing is left behind
    whatever happens to the server.

    @raise OSError: it cannot be created.
    """
    fd, path = tempfile.mkstemp(prefix="nbd-cow-", dir=directory)
    try:
        os.ftruncate(fd, size)
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    return FileBlockDevice(path, fd=fd, reactor=context.reactor, threadpool=context.threadpool())


class CopyOnWriteFilter(BlockDeviceFilter):
    """
    Keeps every change to C{inner} in C{overlay}, a device of the same size
    that reads as zeroes at first.

    @ivar block_size: the unit of copying up.
    """

    def __init__(
        self, inner: IBlockDevice, overlay: IBlockDevice, block_size: int = 64 * 1024
    ) -> None:
        """@raise ValueError: C{block_size} does not suit the device below."""
        super().__init__(inner)
        caps: Capabilities = inner.capabilities
        if block_size & (block_size - 1) or block_size % caps.min_block:
            raise ValueError(
                f"block-size: {block_size} must be a power of two and a multiple of "
                f"{caps.min_block}"
            )
        if block_size > caps.max_block:
            raise ValueError(f"block-size: {block_size} is more than the {caps.max_block} below")
        self.overlay = overlay
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        self._size = int(inner.size)
        self._map = bytearray((self._size + block_size - 1) >> self._shift)
        # Whether any block is the overlay's yet: until then every read goes
        # straight down without looking at the map.
        self._touched = False
        # Blocks being copied up, with who waits for each.
        self._copying: dict[int, list[Deferred[None]]] = {}
        self._capabilities = Capabilities(
            can_write=True,
            can_flush=True,
            can_fua=True,
            can_trim=True,
            can_zero=True,
            can_fast_zero=False,
            can_cache=caps.can_cache,
            can_extents=True,
            # One overlay for every connection of the export.
            can_multi_conn=True,
            rotational=caps.rotational,
            min_block=caps.min_block,
            preferred_block=caps.preferred_block,
            max_block=caps.max_block,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # The map.

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The first and last block of a range (C{length} at least 1)."""
        return offset >> self._shift, (offset + max(length, 1) - 1) >> self._shift

    def _untouched(self, offset: int, length: int) -> bool:
        first, last = self._blocks(offset, length)
        return self._map.find(_OVERLAY, first, last + 1) == -1

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, IBlockDevice]]:
        """C{(offset, length, device)} for the runs of blocks in one place."""
        runs = []
        end = offset + length
        position = offset
        while position < end:
            index = position >> self._shift
            state = self._map[index]
            following = self._map.find(1 - state, index, (end - 1 >> self._shift) + 1)
            stop = end if following == -1 else min(end, following << self._shift)
            runs.append((position, stop - position, self.overlay if state else self.inner))
            position = stop
        return runs

    # Reading.

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if not self._touched or self._untouched(offset, length):
            d: Deferred[bytes] = self.inner.read(offset, length)
            return d
        reads = [device.read(at, run) for at, run, device in self._runs(offset, length)]
        return gatherResults(reads, consumeErrors=True).addCallbacks(
            lambda pieces: b"".join(pieces), _first_error
        )

    def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        read_buffer = self._inner_read_buffer
        assert read_buffer is not None  # only offered when the device below has it
        if self._touched and not self._untouched(offset, length):
            # The server falls back to read.
            raise NBDError(Errno.EIO, "the overlay holds part of this range")
        return read_buffer(offset, length)

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        if not self._touched or self._untouched(offset, length):
            return super().read_sparse(offset, length)
        reads = []
        for at, run, device in self._runs(offset, length):
            if ISparseRead.providedBy(device):
                reads.append(device.read_sparse(at, run))
            else:
                reads.append(device.read(at, run).addCallback(_whole, at))
        return gatherResults(reads, consumeErrors=True).addCallbacks(
            lambda parts: [segment for part in parts for segment in part], _first_error
        )

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        at, run, device = self._runs(offset, max(length, 1))[0]
        d: Deferred[Sequence[Extent]] = device.block_status(at, run)
        if run >= length and device is self.inner:
            return d
        # The answer must not run into blocks whose contents are elsewhere.
        return d.addCallback(clip_extents, run)

    def cache(self, offset: int, length: int) -> Deferred[None]:
        if self._untouched(offset, length):
            d: Deferred[None] = self.inner.cache(offset, length)
            return d
        return succeed(None)

    # Writing.

    def _copy_up(self, index: int) -> Deferred[None]:
        """
        Make block C{index} the overlay's, copying its contents from below
        unless that is done already or under way.

        @return: a Deferred that fires once it is the overlay's.
        """
        if self._map[index] == _OVERLAY:
            return succeed(None)
        waiting = self._copying.get(index)
        if waiting is not None:
            d: Deferred[None] = Deferred()
            waiting.append(d)
            return d
        self._copying[index] = []
        start = index << self._shift
        length = min(self.block_size, self._size - start)
        copied = self.inner.read(start, length)
        copied.addCallback(lambda data: self.overlay.write(start, data))

        def done(result: object) -> object:
            if not isinstance(result, Failure):
                self._map[index] = _OVERLAY
            for waiter in self._copying.pop(index):
                if self._map[index] == _OVERLAY:
                    waiter.callback(None)
                else:
                    waiter.errback(NBDError(Errno.EIO, "copying a block to the overlay failed"))
            return result

        return cast("Deferred[None]", copied.addBoth(done))

    def _claim(self, offset: int, length: int) -> Deferred[None] | None:
        """
        Make every block the range touches the overlay's: those it covers
        whole at once (their old contents do not matter), the one or two it
        covers in part by copying them up first.

        @return: C{None} if that is done, or a Deferred that fires when it is.
        """
        first, last = self._blocks(offset, length)
        if self._map.find(_BASE, first, last + 1) == -1:
            return None
        self._touched = True
        end = offset + length
        waits = []
        for index in range(first, last + 1):
            if self._map[index] == _OVERLAY:
                continue
            start = index << self._shift
            whole = offset <= start and min(start + self.block_size, self._size) <= end
            if whole and index not in self._copying:
                self._map[index] = _OVERLAY
            else:
                waits.append(self._copy_up(index))
        if not waits:
            return None
        return gatherResults(waits, consumeErrors=True).addCallbacks(lambda _: None, _first_error)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        claimed = self._claim(offset, len(data))
        if claimed is None:
            d: Deferred[None] = self.overlay.write(offset, data)
            return d
        # The payload's memory may be reused once we return: keep a copy.
        data = bytes(data)
        return claimed.addCallback(lambda _: self.overlay.write(offset, data))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        if fast:
            return fail(NBDError(Errno.ENOTSUP, "zeroing may need copying up"))
        claimed = self._claim(offset, length)
        if claimed is None:
            d: Deferred[None] = self.overlay.write_zeroes(offset, length, False, may_trim)
            return d
        return claimed.addCallback(
            lambda _: self.overlay.write_zeroes(offset, length, False, may_trim)
        )

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        # Trimmed bytes read back as zeroes: correct, and the overlay stays sparse.
        return self.write_zeroes(offset, length, may_trim=True)

    def flush(self) -> Deferred[None]:
        # The overlay is thrown away with the export: nothing to make durable.
        return succeed(None)

    def close(self) -> Deferred[None]:
        closed = gatherResults([self.overlay.close(), self.inner.close()], consumeErrors=True)
        return closed.addCallbacks(lambda _: None, _first_error)


def _whole(data: bytes, at: int) -> list[Segment]:
    """A read's data as the one segment of a sparse read."""
    return [(at, data)]


def _first_error(failure: Any) -> Any:
    """The first failure of a gatherResults, unwrapped."""
    return failure.value.subFailure


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    size = int(inner.size)
    overlay: IBlockDevice
    if values["overlay"] == "memory":
        overlay = MemoryBlockDevice(size)
    else:
        overlay = temporary_file_overlay(size, context, values["dir"])
    try:
        return CopyOnWriteFilter(inner, overlay, values["block-size"])
    except ValueError:
        overlay.close()
        raise


plugin = FilterPlugin(
    name="cow",
    help="copy-on-write: changes go to a throw-away overlay, the device below is never written",
    keys=(
        Key("overlay", choice("file", "memory"), "file", "keep the overlay in a file or memory"),
        Key("dir", PATH, None, "the overlay file's directory [default: $TMPDIR or /tmp]"),
        Key("block-size", SIZE, 64 * 1024, "the unit copied up from below"),
    ),
    wrap=_wrap,
    per_process=False,
)
