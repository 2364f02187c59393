# -*- test-case-name: tests.test_base -*-
"""
Tests for L{twisted_nbd.base} and for the example backend of the
"write a backend" page, which is served here to a real client.
"""

from __future__ import annotations

import importlib.util
import struct
import threading
from pathlib import Path
from types import ModuleType

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.interop.helpers import require_libnbd
from twisted_nbd._wire import Errno
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.base import BlockDevice, BlockDeviceFilter, ThreadedBlockDevice
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.testing import BlockDeviceConformanceMixin

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "pattern_backend.py"


def load_example() -> ModuleType:
    """Import the docs page's example module from its file."""
    spec = importlib.util.spec_from_file_location("pattern_backend", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BytearrayDevice(BlockDevice):
    """The smallest useful BlockDevice: read and write over a bytearray."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(bytes(self.data[offset : offset + length]))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        self.data[offset : offset + len(data)] = data
        return succeed(None)


class ThreadedBytearrayDevice(ThreadedBlockDevice):
    """The same with blocking methods run in the reactor's thread pool."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.data = bytearray(size)
        self.lock = threading.Lock()
        self.syncs = 0

    def pread(self, offset: int, length: int) -> bytes:
        with self.lock:
            return bytes(self.data[offset : offset + length])

    def pwrite(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.data[offset : offset + len(data)] = data

    def sync(self) -> None:
        self.syncs += 1


class BlockDeviceTests(BlockDeviceConformanceMixin, TestCase):
    """A BlockDevice with only read and write passes the conformance tests."""

    def make_device(self, size: int) -> IBlockDevice:
        return BytearrayDevice(size)

    def test_fast_zero_refused(self) -> None:
        """The default write_zeroes refuses fast zeroing with ENOTSUP, writing nothing."""
        device = BytearrayDevice(16)
        device.data[:] = b"x" * 16
        failure = self.failureResultOf(device.write_zeroes(0, 16, fast=True), NBDError)
        self.assertEqual(failure.value.errno, Errno.ENOTSUP)
        self.assertEqual(device.data, b"x" * 16)

    def test_zeroes_written_in_pieces(self) -> None:
        """The default write_zeroes writes 1 MiB at a time, FUA on the last piece."""
        device = BytearrayDevice(3 << 20)
        calls: list[tuple[int, int, bool]] = []
        write = device.write

        def spy(offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
            calls.append((offset, len(data), fua))
            return write(offset, data, fua)

        device.write = spy  # type: ignore[method-assign]
        self.successResultOf(device.write_zeroes(100, (2 << 20) + 5, fua=True))
        self.assertEqual(
            calls,
            [(100, 1 << 20, False), (100 + (1 << 20), 1 << 20, False), (100 + (2 << 20), 5, True)],
        )


class ThreadedBlockDeviceTests(BlockDeviceConformanceMixin, TestCase):
    """A ThreadedBlockDevice with blocking methods passes the conformance tests."""

    def make_device(self, size: int) -> IBlockDevice:
        return ThreadedBytearrayDevice(size)

    async def test_fua_syncs(self) -> None:
        """A FUA write and a flush call sync in the thread."""
        device = ThreadedBytearrayDevice(16)
        await device.write(0, b"a", fua=True)
        await device.flush()
        self.assertEqual(device.syncs, 2)


class FilterTests(BlockDeviceConformanceMixin, TestCase):
    """A pass-through filter over the memory backend passes the conformance tests."""

    def make_device(self, size: int) -> IBlockDevice:
        return BlockDeviceFilter(MemoryBlockDevice(size))


class ExampleTests(TestCase):
    """The example on the "write a backend" page works when served."""

    def test_pattern(self) -> None:
        """PatternDevice holds each word's offset and refuses writes."""
        example = load_example()
        device = example.PatternDevice(1 << 20)
        self.assertFalse(device.capabilities.can_write)
        data = self.successResultOf(device.read(13, 20))
        expected = b"".join(struct.pack(">Q", o) for o in range(8, 40, 8))[5:25]
        self.assertEqual(data, expected)

    async def test_served_to_libnbd(self) -> None:
        """The example, wrapped in its filter, serves a real libnbd client on loopback."""
        python = require_libnbd()
        example = load_example()
        device = example.CountingFilter(example.PatternDevice(1 << 30))
        registry = ExportRegistry.of([Export("pattern", device, "example")])
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            NBDServerFactory(registry)
        )
        self.addCleanup(port.stopListening)
        script = (
            "import nbd, sys\n"
            "h = nbd.NBD()\n"
            f"h.connect_uri('nbd://127.0.0.1:{port.getHost().port}/pattern')\n"
            "sys.stdout.write(h.pread(16, (1 << 30) - 16).hex() + ' ')\n"
            "sys.stdout.write(str(h.is_read_only()))\n"
            "h.shutdown()\n"
        )
        out, err, code = await getProcessOutputAndValue(python, ["-c", script], env={})
        self.assertEqual(code, 0, err)
        data, read_only = out.decode().split()
        self.assertEqual(bytes.fromhex(data), struct.pack(">QQ", (1 << 30) - 16, (1 << 30) - 8))
        self.assertEqual(read_only, "True")
        self.assertEqual(device.counts["read"], 1)
