# -*- test-case-name: tests.test_filters -*-
"""
The C{offset} filter: serve a slice of the device below, from C{offset}
for C{range} bytes (like nbdkit's offset filter), for example one
partition of a disk image.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred

from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.filters._util import clip_extents
from twisted_nbd.interfaces import Extent, IBlockDevice, Segment
from twisted_nbd.registry import SIZE, FilterPlugin, Key

__all__ = ["OffsetFilter", "plugin"]


class OffsetFilter(BlockDeviceFilter):
    """Serves C{length} bytes of C{inner} from C{offset}."""

    def __init__(self, inner: IBlockDevice, offset: int, length: int | None = None) -> None:
        """
        @raise ValueError: the slice is not inside C{inner}, or C{offset} is
            not a multiple of its minimum block size.
        """
        super().__init__(inner)
        inner_size = int(inner.size)
        if offset >= inner_size:
            raise ValueError(
                f"offset: {offset} is not before the end of the {inner_size} bytes below"
            )
        if length is None:
            length = inner_size - offset
        if offset < 0 or length < 0 or offset + length > inner_size:
            raise ValueError(
                f"offset: {offset} + range {length} is outside the {inner_size} bytes below"
            )
        minimum = inner.capabilities.min_block
        if offset % minimum or length % minimum:
            raise ValueError(f"offset: {offset} and range {length} must be multiples of {minimum}")
        self._offset = offset
        self._size = length

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        d: Deferred[bytes] = self.inner.read(offset + self._offset, length)
        return d

    def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        return super().read_buffer(offset + self._offset, length)

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        shift = self._offset

        def back(segments: Sequence[Segment]) -> Sequence[Segment]:
            return [(at - shift, data) for at, data in segments]

        return super().read_sparse(offset + shift, length).addCallback(back)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        d: Deferred[None] = self.inner.write(offset + self._offset, data, fua)
        return d

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        d: Deferred[None] = self.inner.trim(offset + self._offset, length, fua)
        return d

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        d: Deferred[None] = self.inner.write_zeroes(
            offset + self._offset, length, fua, may_trim, fast
        )
        return d

    def cache(self, offset: int, length: int) -> Deferred[None]:
        d: Deferred[None] = self.inner.cache(offset + self._offset, length)
        return d

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        # The extents below may run past the slice's end: cut them there.
        left = self._size - offset
        d: Deferred[Sequence[Extent]] = self.inner.block_status(offset + self._offset, length)
        return d.addCallback(clip_extents, left)


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return OffsetFilter(inner, values["offset"], values["range"])


plugin = FilterPlugin(
    name="offset",
    help="serve a slice of the device below (one partition of a disk, say)",
    keys=(
        Key("offset", SIZE, help="where the slice starts"),
        Key("range", SIZE, None, "how long it is [default: to the end]"),
    ),
    wrap=_wrap,
)
