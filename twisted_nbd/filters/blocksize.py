# -*- test-case-name: tests.test_filters -*-
"""
The C{blocksize} filter: serve a device with a large minimum block size or
a small maximum request to clients that send anything (like nbdkit's
blocksize filter). Requests are split into pieces of at most C{max} bytes
and widened to multiples of C{min}: an unaligned write reads the blocks at
its ends, changes them and writes them back (one such write at a time, so
two never undo each other); unaligned trims skip the partial blocks, which
trimming allows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed

from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import Capabilities, Extent, IBlockDevice
from twisted_nbd.registry import SIZE, FilterPlugin, Key

__all__ = ["BlockSizeFilter", "plugin"]


class BlockSizeFilter(BlockDeviceFilter):
    """Serves C{inner} byte by byte, in requests of any size up to 32 MiB."""

    def __init__(
        self, inner: IBlockDevice, minimum: int | None = None, maximum: int | None = None
    ) -> None:
        """@raise ValueError: the sizes do not suit the device below."""
        super().__init__(inner)
        caps: Capabilities = inner.capabilities
        self._min = minimum or caps.min_block
        self._max = maximum or caps.max_block
        if self._min & (self._min - 1) or self._min % caps.min_block:
            raise ValueError(f"min: {self._min} is not a power of two multiple of {caps.min_block}")
        if self._max % self._min or self._max > caps.max_block:
            raise ValueError(
                f"max: {self._max} must be a multiple of min {self._min} and at most "
                f"{caps.max_block}"
            )
        self._size = int(inner.size)
        if self._size % self._min:
            raise ValueError(f"the size below ({self._size}) is not a multiple of {self._min}")
        self._capabilities = replace(
            caps,
            min_block=1,
            preferred_block=max(caps.preferred_block, self._min, 512),
            max_block=max(32 * 1024 * 1024, caps.preferred_block),
            can_fast_zero=False,
        )
        self._lock = DeferredLock()

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _widen(self, offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % self._min
        end = -(-(offset + length) // self._min) * self._min
        return start, end

    async def _read_aligned(self, start: int, end: int) -> bytes:
        pieces = []
        for at in range(start, end, self._max):
            pieces.append(bytes(await self.inner.read(at, min(self._max, end - at))))
        return b"".join(pieces)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        start, end = self._widen(offset, length)
        if (start, end) == (offset, offset + length) and length <= self._max:
            d: Deferred[bytes] = self.inner.read(offset, length)
            return d

        async def read() -> bytes:
            data = await self._read_aligned(start, end)
            return data[offset - start : offset - start + length]

        return Deferred.fromCoroutine(read())

    async def _write_aligned(self, start: int, data: bytes, fua: bool) -> None:
        for at in range(0, len(data), self._max):
            piece = data[at : at + self._max]
            await self.inner.write(start + at, piece, fua and at + len(piece) == len(data))

    async def _modify(self, offset: int, data: bytes, fua: bool) -> None:
        start, end = self._widen(offset, len(data))
        head = await self.inner.read(start, self._min) if start < offset else b""
        tail_at = end - self._min
        tail = b""
        if end > offset + len(data):
            tail = await self.inner.read(tail_at, self._min)
        buffer = bytearray(end - start)
        if head:
            buffer[: self._min] = head
        if tail:
            buffer[tail_at - start :] = tail
        buffer[offset - start : offset - start + len(data)] = data
        await self._write_aligned(start, bytes(buffer), fua)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        start, end = self._widen(offset, len(data))
        aligned = (start, end) == (offset, offset + len(data))
        if aligned and len(data) <= self._max and not self._lock.locked:
            d: Deferred[None] = self.inner.write(offset, data, fua)
            return d
        kept = bytes(data)  # it may wait: the server may reuse the payload's memory
        return self._lock.run(lambda: Deferred.fromCoroutine(self._modify(offset, kept, fua)))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        if fast:
            return fail(NBDError(Errno.ENOTSUP, "zeroing may need read-modify-write"))

        async def zero() -> None:
            start, end = self._widen(offset, length)
            inner_start = offset if offset == start else start + self._min
            inner_end = offset + length if offset + length == end else end - self._min
            if inner_start >= inner_end:
                await self._modify(offset, bytes(length), fua)
                return
            if offset < inner_start:
                await self._modify(offset, bytes(inner_start - offset), False)
            if inner_end < offset + length:
                await self._modify(inner_end, bytes(offset + length - inner_end), False)
            await self.inner.write_zeroes(inner_start, inner_end - inner_start, fua, may_trim)

        return self._lock.run(lambda: Deferred.fromCoroutine(zero()))

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        start = -(-offset // self._min) * self._min
        end = (offset + length) // self._min * self._min
        if start >= end:
            return succeed(None)
        return self._lock.run(lambda: self.inner.trim(start, end - start, fua))

    def cache(self, offset: int, length: int) -> Deferred[None]:
        start, end = self._widen(offset, length)
        d: Deferred[None] = self.inner.cache(start, end - start)
        return d

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        start, end = self._widen(offset, length)
        skip = offset - start

        def cut(extents: Sequence[Extent]) -> Sequence[Extent]:
            # Drop the bytes before offset; the block they share with it
            # gets the first extent's status, which covers it.
            result = []
            left = skip
            for extent in extents:
                if left >= extent.length:
                    left -= extent.length
                    continue
                result.append(Extent(extent.length - left, extent.flags) if left else extent)
                left = 0
            return result or [Extent(min(self._min, self._size - offset), 0)]

        d: Deferred[Sequence[Extent]] = self.inner.block_status(start, end - start)
        return d.addCallback(cut) if skip else d


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return BlockSizeFilter(inner, values["min"], values["max"])


plugin = FilterPlugin(
    name="blocksize",
    help="accept any alignment and size, splitting and aligning for the device below",
    keys=(
        Key("min", SIZE, None, "the block size below [default: what it advertises]"),
        Key("max", SIZE, None, "the largest request below [default: what it advertises]"),
    ),
    wrap=_wrap,
)
