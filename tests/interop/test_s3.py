"""
The C{s3} backend against a real S3 gateway: Ceph's radosgw on 127.0.0.1,
from the throwaway cluster of L{tests.interop.ceph} (no mock). The device
itself passes the conformance tests and keeps every byte of concurrent
partial writes to one object; through C{twistd -n nbd}, nbdcopy copies 256
MiB in and out unchanged, C{qemu-img convert} writes and reads it, and a
server killed with SIGKILL after FLUSH loses nothing.

Each test works under its own prefix in one bucket, so they share the
cluster without seeing each other's objects.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

import pytest
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.interop.ceph import S3Credentials, require_ceph
from tests.interop.helpers import (
    make_tempdir,
    require_tool,
    run_libnbd,
    run_tool,
    start_server,
)
from twisted_nbd.backends import OpenContext
from twisted_nbd.backends.s3 import S3Config, S3Device, Signer, TreqTransport, plugin
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO, Extent, IBlockDevice
from twisted_nbd.registry import PluginRef, registry
from twisted_nbd.testing import BlockDeviceConformanceMixin

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * 1024
HOLE = STATE_HOLE | STATE_ZERO
#: The bucket every test uses (created on first use).
BUCKET = "twisted-nbd-tests"
TIMEOUT = 120.0


def gateway() -> S3Credentials:
    """radosgw of the shared test cluster (started on first use)."""
    return require_ceph().require_s3()


def open_device(
    case: TestCase, s3: S3Credentials, prefix: str, **config: Any
) -> Deferred[S3Device]:
    """Open an image under C{prefix} in L{BUCKET}, closed when the test ends."""
    signer = Signer(s3.endpoint, BUCKET, Credentials(s3.access_key, s3.secret_key), s3.region)
    transport = TreqTransport(reactor, signer, max_requests=8, retries=2, timeout=30)
    opened = S3Device.open(
        transport, S3Config(BUCKET, prefix, create=True, **config), closer=transport.close
    )

    def opened_ok(device: S3Device) -> S3Device:
        case.addCleanup(device.close)
        return device

    def failed(reason: Any) -> Any:
        transport.close()
        return reason

    return opened.addCallbacks(opened_ok, failed)


def new_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/"


class RadosgwConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """The conformance tests, on 1 MiB objects in radosgw."""

    def setUp(self) -> None:
        self.s3 = gateway()

    def make_device(self, size: int) -> Deferred[IBlockDevice]:
        signer = Signer(
            self.s3.endpoint, BUCKET, Credentials(self.s3.access_key, self.s3.secret_key), "x"
        )
        transport = TreqTransport(reactor, signer, max_requests=8, retries=2, timeout=30)
        config = S3Config(BUCKET, new_prefix(), size=size, object_size=MiB, create=True)
        opened = S3Device.open(transport, config, closer=transport.close)
        return opened.addCallback(lambda device: cast(IBlockDevice, device))


class RadosgwTests(TestCase):
    """What the fake cannot show: radosgw's own answers."""

    def setUp(self) -> None:
        self.s3 = gateway()

    async def test_concurrent_partial_writes(self) -> None:
        """
        16 writes to different parts of one 1 MiB object, all sent at once
        (each a read-modify-write of the whole object): every byte of each
        is there afterwards, read back by a second device.
        """
        prefix = new_prefix()
        device = await open_device(self, self.s3, prefix, size=2 * MiB, object_size=MiB)
        piece, step = 50 * KiB, 64 * KiB
        writes = [device.write(i * step + 7, bytes([i + 1]) * piece) for i in range(16)]
        await gatherResults(writes)
        other = await open_device(self, self.s3, prefix)
        data = await other.read(0, 2 * MiB)
        for i in range(16):
            start = i * step + 7
            self.assertEqual(data[start : start + piece], bytes([i + 1]) * piece, f"write {i}")
            self.assertEqual(data[start + piece : start + step], bytes(step - piece))

    async def test_sparse(self) -> None:
        """
        A new image reads as zeroes and stores nothing; zeroing whole
        objects deletes them; a second device lists what exists.
        """
        prefix = new_prefix()
        device = await open_device(self, self.s3, prefix, size=64 * MiB, object_size=MiB)
        self.assertEqual(await device.read(5 * MiB - 10, 2 * MiB), bytes(2 * MiB))
        self.assertEqual(list(await device.block_status(0, 64 * MiB)), [Extent(64 * MiB, HOLE)])
        await device.write(MiB, b"a" * 3 * MiB)
        await device.write(40 * MiB + 5, b"b")
        await device.write_zeroes(2 * MiB, MiB)
        await device.write_zeroes(40 * MiB, 100)  # part of an object: still there
        expected = [
            Extent(MiB, HOLE),
            Extent(MiB, 0),
            Extent(MiB, HOLE),
            Extent(MiB, 0),
            Extent(36 * MiB, HOLE),
            Extent(MiB, 0),
            Extent(23 * MiB, HOLE),
        ]
        self.assertEqual(list(await device.block_status(0, 64 * MiB)), expected)
        other = await open_device(self, self.s3, prefix)
        other.list_page = 2  # pages with radosgw's own continuation tokens
        self.assertEqual(list(await other.block_status(0, 64 * MiB)), expected)
        self.assertEqual(other.listed_pages, 2)  # 3 data objects and the metadata
        self.assertEqual(await other.read(40 * MiB, MiB), bytes(MiB))
        self.assertEqual(await other.read(MiB, MiB), b"a" * MiB)

    async def test_wrong_secret(self) -> None:
        """A bad signature is EIO for the client, not zeroes."""
        from twisted_nbd.errors import NBDError

        prefix = new_prefix()
        await open_device(self, self.s3, prefix, size=MiB)
        signer = Signer(self.s3.endpoint, BUCKET, Credentials(self.s3.access_key, "wrong"), "x")
        transport = TreqTransport(reactor, signer, retries=0)
        self.addCleanup(transport.close)
        device = S3Device(transport, S3Config(BUCKET, prefix), _info(MiB))
        with self.assertRaises(NBDError) as caught:
            await device.read(0, 10)
        self.assertIn("403", str(caught.exception))
        self.flushLoggedErrors()


def _info(size: int) -> Any:
    from twisted_nbd.backends.s3 import DEFAULT_OBJECT_SIZE, ImageInfo

    return ImageInfo(size, DEFAULT_OBJECT_SIZE)


def backend(s3: S3Credentials, prefix: str, *extra: str) -> str:
    keys = [
        f"endpoint={s3.endpoint}",
        f"bucket={BUCKET}",
        f"prefix={prefix}",
        f"access-key={s3.access_key}",
        f"secret-key={s3.secret_key}",
        "create=true",
        *extra,
    ]
    return "s3:" + ",".join(keys)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def image_blocks(size: int, patches: Sequence[tuple[int, int, int]] = ()) -> Iterator[bytes]:
    """
    The 4 MiB blocks of a test image: random data (one random block, each
    copy starting with its own number, so a block in the wrong place shows)
    with a zero run of whole objects in the middle, then C{patches}
    (offset, length, byte) applied. Made again, it is the same, so the
    expected sha256 needs no copy of the image.
    """
    block = 4 * MiB
    base = random.Random(size).randbytes(block)  # the same for the same size
    for at in range(0, size, block):
        if size // 4 <= at < size // 2:
            data = bytearray(block)
        else:
            data = bytearray(base)
            data[:16] = (at + 1).to_bytes(16, "big")
        for offset, length, byte in patches:
            start, end = max(offset, at), min(offset + length, at + block)
            if start < end:
                data[start - at : end - at] = bytes([byte]) * (end - start)
        yield bytes(data)


def random_image(path: Path, size: int) -> str:
    """Write L{image_blocks} to C{path}; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for data in image_blocks(size):
            f.write(data)
            digest.update(data)
    return digest.hexdigest()


#: Partial writes (offset, length, byte) made after the nbdcopy upload, before FLUSH.
PATCHES = [(123, 300_000, 1), (4 * MiB - 1000, 5000, 2), (100 * MiB + 7, 1, 3)]


class ServerTests(SynchronousTestCase):
    """C{twistd -n nbd --backend s3:...} with real clients."""

    def setUp(self) -> None:
        self.s3 = gateway()
        self.tmp = make_tempdir(self)

    def test_nbdcopy_round_trip_and_kill(self) -> None:
        """
        nbdcopy copies 256 MiB in (4 MiB requests, then FLUSH); a few
        partial writes follow, then FLUSH; the server is killed with
        SIGKILL and started again on the same prefix (its size from the
        metadata object); nbdcopy copies the 256 MiB out: nothing acknowledged
        before the FLUSH is lost, and the sha256 is the expected one.
        """
        nbdcopy = require_tool("nbdcopy")
        size = 256 * MiB
        prefix = new_prefix()
        image = self.tmp / "up.img"
        random_image(image, size)
        server = start_server(self, "--backend", backend(self.s3, prefix, f"size={size}"))
        copy = [nbdcopy, "--request-size=4194304", "--requests=8"]
        run_tool([*copy, "--flush", str(image), server.uri], timeout=TIMEOUT)
        script = """
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for offset, length, byte in json.loads(sys.argv[2]):
    h.pwrite(bytes([byte]) * length, offset)
h.flush()
print(json.dumps("flushed"))
"""
        self.assertEqual(run_libnbd(script, server.uri, json.dumps(PATCHES)), "flushed")
        server.kill9()
        image.unlink()
        digest = hashlib.sha256()
        for data in image_blocks(size, PATCHES):
            digest.update(data)
        again = start_server(self, "--backend", backend(self.s3, prefix))
        run_tool([*copy, again.uri, str(self.tmp / "down.img")], timeout=TIMEOUT)
        self.assertEqual(file_sha256(self.tmp / "down.img"), digest.hexdigest())

    def test_qemu_img_convert(self) -> None:
        """qemu-img convert writes an image through the server and reads it back."""
        qemu_img = require_tool("qemu-img")
        size = 32 * MiB
        prefix = new_prefix()
        digest = random_image(self.tmp / "src.img", size)
        server = start_server(self, "--backend", backend(self.s3, prefix, f"size={size}"))
        convert = [qemu_img, "convert", "-f", "raw", "-O", "raw"]
        run_tool([*convert, "-n", str(self.tmp / "src.img"), server.uri], timeout=TIMEOUT)
        run_tool([*convert, server.uri, str(self.tmp / "out.img")], timeout=TIMEOUT)
        self.assertEqual(file_sha256(self.tmp / "out.img"), digest)


class PluginOpenTests(TestCase):
    """The plugin's blocking open, in this process, against radosgw."""

    def setUp(self) -> None:
        self.s3 = gateway()

    def values(self, prefix: str, **more: Any) -> dict[str, Any]:
        keys = [
            ("endpoint", self.s3.endpoint),
            ("bucket", BUCKET),
            ("prefix", prefix),
            ("access-key", self.s3.access_key),
            ("secret-key", self.s3.secret_key),
            ("create", "true"),
            *((k.replace("_", "-"), str(v)) for k, v in more.items()),
        ]
        return registry.resolve("backend", PluginRef("s3", tuple(keys)))[1]

    async def test_create_and_reopen(self) -> None:
        """
        Without size= and no image, the open fails saying so; with it, the
        image is made; reopened, it has that size and its data.
        """
        prefix = new_prefix()
        with self.assertRaises(ValueError) as caught:
            plugin.open(self.values(prefix), OpenContext(reactor))
        self.assertIn("give size= to create one", str(caught.exception))
        device = plugin.open(self.values(prefix, size="3M", object_size="1M"), OpenContext(reactor))
        self.addCleanup(device.close)
        await device.write(MiB - 2, b"abcd")
        again = plugin.open(self.values(prefix), OpenContext(reactor))
        self.addCleanup(again.close)
        self.assertEqual(again.size, 3 * MiB)
        self.assertEqual(await again.read(MiB - 3, 6), b"\0abcd\0")
        with self.assertRaises(ValueError) as caught:
            plugin.open(self.values(prefix, size="4M"), OpenContext(reactor))
        self.assertIn("not size=4194304", str(caught.exception))

    def test_unreachable(self) -> None:
        """No gateway at the endpoint: OSError naming it, after the retries."""
        values = self.values(new_prefix(), retries=1)
        values["endpoint"] = "http://127.0.0.1:1"
        with self.assertRaises(OSError) as caught:
            plugin.open(values, OpenContext(reactor))
        self.assertIn("after 2 attempts", str(caught.exception))
