"""
An C{async def} backend and a filter, each with the plugin that names it.

BlockStore keeps 4 KiB blocks in a dict, as an object store would, behind
coroutines (a real one would await a network client there). ProtectFilter
refuses to change the first bytes of the device, as nbdkit's protect
filter does. Installed as entry points, they serve from the command line::

    twistd -n nbd --backend blockstore:size=1G --filter protect:size=1M
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred, fail

from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDevice, BlockDeviceFilter
from twisted_nbd.errors import Errno, NBDError
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.registry import SIZE, BackendPlugin, FilterPlugin, Key

BLOCK = 4096


class BlockStore(BlockDevice):
    """A device of 4 KiB blocks in a dict; missing blocks read as zeroes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: dict[int, bytearray] = {}

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        out = bytearray()
        for at in range(offset - offset % BLOCK, offset + length, BLOCK):
            out += self.blocks.get(at // BLOCK, bytes(BLOCK))
        start = offset % BLOCK
        return bytes(out[start : start + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:  # type: ignore[override]
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            index, start = divmod(offset + done, BLOCK)
            piece = min(BLOCK - start, len(view) - done)
            block = self.blocks.setdefault(index, bytearray(BLOCK))
            block[start : start + piece] = view[done : done + piece]
            done += piece


class ProtectFilter(BlockDeviceFilter):
    """Refuses writes, trims and zeroing that touch the first C{size} bytes."""

    def __init__(self, inner: IBlockDevice, size: int) -> None:
        super().__init__(inner)
        self.protected = size

    def _check(self, offset: int) -> Deferred[None] | None:
        if offset < self.protected:
            return fail(NBDError(Errno.EPERM, "this range is protected"))
        return None

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        return self._check(offset) or super().write(offset, data, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return self._check(offset) or super().trim(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> Deferred[None]:
        return self._check(offset) or super().write_zeroes(offset, length, fua, may_trim, fast)


def open_blockstore(values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return BlockStore(values["size"])


def wrap_protect(
    inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext
) -> IBlockDevice:
    return ProtectFilter(inner, values["size"])


backend = BackendPlugin(
    "blockstore", "4 KiB blocks in a dict", (Key("size", SIZE, help="its size"),), open_blockstore
)
protect = FilterPlugin(
    "protect", "refuse changes to the start", (Key("size", SIZE, help="how much"),), wrap_protect
)
