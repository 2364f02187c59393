# -*- test-case-name: tests.test_filters -*-
"""
The C{cache} filter: keep recently read blocks in memory (least recently
used first out, up to C{size} bytes), so that reading them again does not
reach the device below. Writes go through to the device at once
(write-through) and drop the blocks they touch from the cache, so the
cache never holds anything the device does not.

A read fills the cache only if no write, trim or zeroing started or was
running while it was under way: its data might otherwise be older than
what the device holds by the time it arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, succeed

from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.registry import SIZE, FilterPlugin, Key

__all__ = ["CacheFilter", "plugin"]


class CacheFilter(BlockDeviceFilter):
    """
    An LRU read cache of C{limit} bytes in blocks of C{block_size}.

    @ivar hits: reads answered from the cache.
    @ivar misses: reads that went to the device below.
    """

    def __init__(self, inner: IBlockDevice, limit: int, block_size: int = 64 * 1024) -> None:
        """@raise ValueError: C{block_size} does not suit the device below."""
        super().__init__(inner)
        caps = inner.capabilities
        if block_size & (block_size - 1) or block_size % caps.min_block:
            raise ValueError(
                f"block-size: {block_size} must be a power of two and a multiple of "
                f"{caps.min_block}"
            )
        self._block = block_size
        self._shift = block_size.bit_length() - 1
        self._max_blocks = max(limit // block_size, 1)
        self._max_read = caps.max_block
        self._size = int(inner.size)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        # Changes started, and changes running: reads compare them (see the module).
        self._changes = 0
        self._changing = 0
        self.hits = 0
        self.misses = 0

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if length == 0:
            return succeed(b"")
        first, last = offset >> self._shift, (offset + length - 1) >> self._shift
        blocks = self._blocks
        if all(index in blocks for index in range(first, last + 1)):
            self.hits += 1
            for index in range(first, last + 1):
                blocks.move_to_end(index)
            data = b"".join(blocks[index] for index in range(first, last + 1))
            start = offset - (first << self._shift)
            return succeed(data[start : start + length])
        start = first << self._shift
        stop = min((last + 1) << self._shift, self._size)
        if stop - start > self._max_read or last - first + 1 > self._max_blocks:
            # Too big to cache, or to read whole blocks of at once.
            self.misses += 1
            d: Deferred[bytes] = self.inner.read(offset, length)
            return d
        self.misses += 1
        changes = self._changes
        d = self.inner.read(start, stop - start)

        def fill(data: bytes) -> bytes:
            data = bytes(data)
            if self._changes == changes and not self._changing:
                for index in range(first, last + 1):
                    at = (index - first) << self._shift
                    blocks[index] = data[at : at + self._block]
                    blocks.move_to_end(index)
                while len(blocks) > self._max_blocks:
                    blocks.popitem(last=False)
            begin = offset - start
            return data[begin : begin + length]

        return d.addCallback(fill)

    def _change(
        self, offset: int, length: int, call: Callable[[], Deferred[None]]
    ) -> Deferred[None]:
        """Run a change, dropping the blocks it touches before and after."""
        self._changes += 1
        self._changing += 1
        self._drop(offset, length)

        def done(result: object) -> object:
            self._changing -= 1
            self._drop(offset, length)
            return result

        return call().addBoth(done)

    def _drop(self, offset: int, length: int) -> None:
        if not self._blocks or length == 0:
            return
        first, last = offset >> self._shift, (offset + length - 1) >> self._shift
        if last - first < len(self._blocks):
            for index in range(first, last + 1):
                self._blocks.pop(index, None)
        else:
            for index in [i for i in self._blocks if first <= i <= last]:
                del self._blocks[index]

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        return self._change(offset, len(data), lambda: self.inner.write(offset, data, fua))

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return self._change(offset, length, lambda: self.inner.trim(offset, length, fua))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        return self._change(
            offset, length, lambda: self.inner.write_zeroes(offset, length, fua, may_trim, fast)
        )

    def close(self) -> Deferred[None]:
        self._blocks.clear()
        return super().close()


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return CacheFilter(inner, values["size"], values["block-size"])


plugin = FilterPlugin(
    name="cache",
    help="an LRU read cache in memory, with writes going through at once",
    keys=(
        Key("size", SIZE, 64 * 1024 * 1024, "the most memory the cache holds"),
        Key("block-size", SIZE, 64 * 1024, "the unit it caches"),
    ),
    wrap=_wrap,
    per_process=False,
)
