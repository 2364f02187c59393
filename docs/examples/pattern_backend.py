"""
An example backend and an example filter for twisted-nbd.

PatternDevice is a read-only device whose every 8-byte word holds its own
offset, big-endian (like nbdkit's "pattern" plugin): handy for testing
clients, it costs no memory whatever its size. CountingFilter wraps any
device and counts the requests that reach it.

Serve it:  python3 docs/examples/pattern_backend.py tcp:10809:interface=127.0.0.1
Then:      nbdinfo nbd://127.0.0.1   or   qemu-io -r -f raw -c 'read -v 0 32' nbd://127.0.0.1
"""

from __future__ import annotations

import struct
import sys
from collections import Counter
from dataclasses import replace

from twisted.internet.defer import Deferred, succeed

from twisted_nbd.base import BlockDevice, BlockDeviceFilter
from twisted_nbd.interfaces import IBlockDevice


class PatternDevice(BlockDevice):
    """A read-only device whose 8-byte words hold their own offsets."""

    def __init__(self, size: int) -> None:
        self.size = size
        # Decided once, like nbdkit's can_* callbacks: nothing can be written.
        self.capabilities = replace(BlockDevice.capabilities, can_write=False)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        first = offset - offset % 8
        words = range(first, offset + length, 8)
        data = b"".join(struct.pack(">Q", word) for word in words)
        start = offset - first
        return succeed(data[start : start + length])


class CountingFilter(BlockDeviceFilter):
    """Counts the reads and writes that pass through to the inner device."""

    def __init__(self, inner: IBlockDevice) -> None:
        super().__init__(inner)
        self.counts: Counter[str] = Counter()

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        self.counts["read"] += 1
        return super().read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        self.counts["write"] += 1
        return super().write(offset, data, fua)


def main(listen: str) -> None:
    from twisted.internet import endpoints, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from twisted_nbd.exports import Export, ExportRegistry
    from twisted_nbd.protocol import NBDServerFactory

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    device = CountingFilter(PatternDevice(1 << 30))
    registry = ExportRegistry.of([Export("pattern", device, "offsets, 8 bytes at a time")])
    endpoints.serverFromString(reactor, listen).listen(NBDServerFactory(registry))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tcp:10809:interface=127.0.0.1")
