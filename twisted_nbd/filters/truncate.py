# -*- test-case-name: tests.test_filters -*-
"""
The C{truncate} filter: change the apparent size of the device below
(like nbdkit's truncate filter). Shrunk, the end is out of reach; grown,
the bytes past the real end read as zeroes and show as a hole, writing
zeroes there succeeds, and writing anything else fails with C{ENOSPC}.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

from twisted.internet.defer import Deferred, fail, succeed

from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.errors import NBDError
from twisted_nbd.filters._util import clip_extents
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO, Extent, IBlockDevice
from twisted_nbd.registry import SIZE, FilterPlugin, Key

__all__ = ["TruncateFilter", "plugin"]


class TruncateFilter(BlockDeviceFilter):
    """Serves C{inner} as a device of C{size} bytes."""

    def __init__(self, inner: IBlockDevice, size: int) -> None:
        """@raise ValueError: C{size} is not a multiple of the minimum block size."""
        super().__init__(inner)
        minimum = inner.capabilities.min_block
        if size % minimum:
            raise ValueError(f"size: {size} is not a multiple of the block size {minimum}")
        self._size = size
        self._real = min(int(inner.size), size)

    @property
    def size(self) -> int:
        return self._size

    def _split(self, offset: int, length: int) -> tuple[int, int]:
        """The lengths of C{[offset, offset+length)} below and past the real end."""
        below = max(0, min(offset + length, self._real) - offset)
        return below, length - below

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        below, past = self._split(offset, length)
        if not past:
            d: Deferred[bytes] = self.inner.read(offset, length)
            return d
        if not below:
            return succeed(bytes(length))
        d = self.inner.read(offset, below)
        return d.addCallback(lambda data: bytes(data) + bytes(past))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        below, past = self._split(offset, len(data))
        if past and any(memoryview(data).cast("B")[below:]):
            return fail(NBDError(Errno.ENOSPC, "writing past the end of the device below"))
        if not below:
            return succeed(None)
        piece = cast(bytes, memoryview(data).cast("B")[:below])
        d: Deferred[None] = self.inner.write(offset, piece, fua)
        return d

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        below, _ = self._split(offset, length)
        if not below:
            return succeed(None)
        d: Deferred[None] = self.inner.trim(offset, below, fua)
        return d

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        below, _ = self._split(offset, length)
        if not below:
            return succeed(None)
        d: Deferred[None] = self.inner.write_zeroes(offset, below, fua, may_trim, fast)
        return d

    def cache(self, offset: int, length: int) -> Deferred[None]:
        below, _ = self._split(offset, length)
        if not below:
            return succeed(None)
        d: Deferred[None] = self.inner.cache(offset, below)
        return d

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        below, past = self._split(offset, length)
        if not below:
            return succeed([Extent(past, STATE_HOLE | STATE_ZERO)])
        d: Deferred[Sequence[Extent]] = self.inner.block_status(offset, below)
        return d.addCallback(clip_extents, self._real - offset)


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return TruncateFilter(inner, values["size"])


plugin = FilterPlugin(
    name="truncate",
    help="shrink or grow the apparent size (grown bytes read as zeroes)",
    keys=(Key("size", SIZE, help="the size to serve"),),
    wrap=_wrap,
)
