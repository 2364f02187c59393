"""
The C{rbd} backend against a real throwaway Ceph cluster
(L{tests.interop.ceph}): the device conformance tests in-process, then the
server (C{twistd -n nbd --backend rbd:...}) with nbdcopy, qemu-img and
libnbd: a 256 MiB round trip, durability across C{kill -9} after FLUSH,
and two servers on one image.

Outside CI, the tests skip when Ceph is not installed; in CI (C{CI=true})
that fails them. One cluster serves the whole test process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.interop.ceph import CephCluster, require_ceph
from tests.interop.helpers import (
    NBDServer,
    make_tempdir,
    require_tool,
    run_libnbd,
    run_tool,
    start_server,
    wait_until,
)
from twisted_nbd.errors import Errno, NBDError
from twisted_nbd.interfaces import STATE_HOLE, IBlockDevice
from twisted_nbd.registry import registry
from twisted_nbd.testing import BlockDeviceConformanceMixin

MiB = 1024 * 1024
#: How long one client run may take (the machine may be busy).
TIMEOUT = 120.0


def _rbd_module() -> Any:
    from twisted_nbd._ceph import import_rbd

    return import_rbd()


def new_image(
    case: SynchronousTestCase, cluster: CephCluster, size: int, prefix: str, remove: bool = True
) -> str:
    """
    Create a fresh image in pool C{rbd}, removed when C{case} ends unless
    told not to; its name.
    """
    rbd = _rbd_module()
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    ioctx = cluster.rados().open_ioctx("rbd")
    case.addCleanup(ioctx.close)
    rbd.RBD().create(ioctx, name, size)

    def remove_image() -> None:
        try:
            try:
                rbd.RBD().remove(ioctx, name)
            except rbd.ImageHasSnapshots:
                with rbd.Image(ioctx, name) as image:
                    for snap in list(image.list_snaps()):
                        image.remove_snap(snap["name"])
                rbd.RBD().remove(ioctx, name)
        except rbd.ImageBusy:
            # Someone still has it open; the cluster is thrown away anyway.
            pass

    if remove:
        case.addCleanup(remove_image)
    return name


def backend_arg(cluster: CephCluster, image: str, *extra: str) -> str:
    """The C{--backend} value that serves C{image}."""
    keys = [f"image={image}", "pool=rbd", f"conf={cluster.conf}", f"keyring={cluster.keyring}"]
    return "rbd:" + ",".join(keys + list(extra))


class RBDConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """The device conformance tests on an RBD image, through librbd's aio calls."""

    timeout = 120

    def make_device(self, size: int) -> Deferred[IBlockDevice]:
        from twisted_nbd.backends.rbd import RBDOptions, open_rbd

        cluster = require_ceph()
        name = new_image(self, cluster, size, "conformance")
        options = RBDOptions(
            image=name, pool="rbd", conf=str(cluster.conf), keyring=str(cluster.keyring)
        )
        opened = open_rbd(options, reactor, reactor.getThreadPool())  # type: ignore[attr-defined]
        return opened  # type: ignore[return-value]


class RBDDeviceTests(TestCase):
    """What the conformance tests do not cover: zeroing edges, holes, snapshots, errors."""

    timeout = 120

    async def _device(self, size: int = 16 * MiB, **keys: Any) -> Any:
        from twisted_nbd.backends.rbd import RBDOptions, open_rbd

        cluster = require_ceph()
        name = keys.pop("image", None) or new_image(self, cluster, size, "device")
        options = RBDOptions(
            image=name, conf=str(cluster.conf), keyring=str(cluster.keyring), **keys
        )
        device = await open_rbd(options, reactor, reactor.getThreadPool())  # type: ignore[attr-defined]
        self.addCleanup(device.close)
        return device

    def test_small_write_zeroes_are_exact(self) -> Deferred[None]:
        """
        Zeroing a few bytes inside written data zeroes exactly them, although
        librbd ignores discards smaller than its granularity (gotcha 2);
        trimming them is only advisory and never changes the neighbours.
        """

        async def run() -> None:
            device = await self._device()
            data = bytes(range(256)) * 1024  # 256 KiB
            await device.write(0, data)
            await device.write_zeroes(100, 10)
            await device.write_zeroes(70_000, 3, may_trim=False)
            await device.trim(200, 1000)
            got = await device.read(0, len(data))
            expected = bytearray(data)
            expected[100:110] = bytes(10)
            expected[70_000:70_003] = bytes(3)
            self.assertEqual(got[:200], bytes(expected[:200]))
            self.assertEqual(got[1200:], bytes(expected[1200:]))

        return ensureDeferred(run())

    def test_block_status_holes(self) -> Deferred[None]:
        """
        Block status reports written ranges as data and the rest, unwritten
        or zeroed with holes allowed over whole objects, as holes.
        """

        async def run() -> None:
            device = await self._device(32 * MiB)
            await device.write(4 * MiB, b"x" * MiB)
            await device.write(12 * MiB, b"y" * 8 * MiB)
            await device.write_zeroes(12 * MiB, 4 * MiB)  # a whole object
            extents = await device.block_status(0, device.size)
            spans, at = [], 0
            for extent in extents:
                spans.append((at, extent.length, bool(extent.flags & STATE_HOLE)))
                at += extent.length
            self.assertEqual(at, device.size)
            self.assertEqual(
                spans,
                [
                    (0, 4 * MiB, True),
                    (4 * MiB, MiB, False),
                    (5 * MiB, 11 * MiB, True),
                    (16 * MiB, 4 * MiB, False),
                    (20 * MiB, 12 * MiB, True),
                ],
            )

        return ensureDeferred(run())

    def test_snapshot_is_read_only(self) -> Deferred[None]:
        """
        C{snapshot=} serves the snapshot's contents, read-only, while the
        image goes on changing.
        """

        async def run() -> None:
            cluster = require_ceph()
            name = new_image(self, cluster, 8 * MiB, "snap")
            device = await self._device(image=name)
            await device.write(0, b"before" * 100)
            rbd = _rbd_module()
            ioctx = cluster.rados().open_ioctx("rbd")
            self.addCleanup(ioctx.close)

            def snap() -> None:
                image = rbd.Image(ioctx, name)
                try:
                    image.create_snap("s1")
                finally:
                    image.close()

            pool = reactor.getThreadPool()  # type: ignore[attr-defined]
            await deferToThreadPool(reactor, pool, snap)  # type: ignore[arg-type]
            await device.write(0, b"after!" * 100)
            snapshot = await self._device(image=name, snapshot="s1")
            self.assertFalse(snapshot.capabilities.can_write)
            self.assertEqual(await snapshot.read(0, 600), b"before" * 100)
            self.assertEqual(await device.read(0, 600), b"after!" * 100)

        return ensureDeferred(run())

    def test_close_waits_for_requests(self) -> Deferred[None]:
        """
        Closing while a read, a write and a block status (in a thread) are
        in flight lets them finish first; later requests fail with
        ESHUTDOWN.
        """

        async def run() -> None:
            from twisted_nbd.backends.rbd import RBDOptions, open_rbd

            cluster = require_ceph()
            name = new_image(self, cluster, 8 * MiB, "close")
            options = RBDOptions(image=name, conf=str(cluster.conf), keyring=str(cluster.keyring))
            pool = reactor.getThreadPool()  # type: ignore[attr-defined]
            device = await open_rbd(options, reactor, pool)
            write = device.write(0, b"w" * MiB)
            read = device.read(4 * MiB, MiB)
            status = device.block_status(0, device.size)
            closed = device.close()
            self.assertFalse(closed.called)
            await write
            self.assertEqual(await read, bytes(MiB))
            self.assertTrue(await status)
            await closed
            with self.assertRaises(NBDError) as caught:
                await device.read(0, 1)
            self.assertEqual(caught.exception.errno, Errno.ESHUTDOWN)
            await device.close()  # twice is harmless

        return ensureDeferred(run())

    def test_namespace(self) -> Deferred[None]:
        """C{namespace=} opens the image of that name in that RADOS namespace only."""

        async def run() -> None:
            cluster = require_ceph()
            rbd = _rbd_module()
            ioctx = cluster.rados().open_ioctx("rbd")
            self.addCleanup(ioctx.close)
            namespace = f"ns-{uuid.uuid4().hex[:8]}"
            rbd.RBD().namespace_create(ioctx, namespace)
            ioctx.set_namespace(namespace)
            rbd.RBD().create(ioctx, "inside", 4 * MiB)
            self.addCleanup(rbd.RBD().remove, ioctx, "inside")
            device = await self._device(image="inside", namespace=namespace)
            self.assertEqual(device.size, 4 * MiB)
            await device.write(MiB, b"namespaced")
            self.assertEqual(await device.read(MiB, 10), b"namespaced")
            with self.assertRaises(OSError):
                await self._device(image="inside")  # not in the default namespace

        return ensureDeferred(run())

    def test_op_timeout(self) -> Deferred[None]:
        """
        With C{op-timeout}, a read the OSD does not answer (it is stopped
        with SIGSTOP) fails with EIO instead of hanging, and the device
        works again once the OSD does.
        """

        async def run() -> None:
            device = await self._device(op_timeout=1.0)
            await device.write(0, b"t" * 4096)
            osd = require_ceph().pid("osd.0")
            os.kill(osd, signal.SIGSTOP)
            try:
                # SIGSTOP takes effect thread by thread, not at once.
                wait_until(lambda: _all_stopped(osd), 10.0, "the OSD stopped")
                with self.assertRaises(NBDError) as caught:
                    await device.read(0, 4096)
            finally:
                os.kill(osd, signal.SIGCONT)
            self.assertEqual(caught.exception.errno, Errno.EIO)
            self.assertEqual(await device.read(0, 4096), b"t" * 4096)

        return ensureDeferred(run())

    def test_missing_image(self) -> Deferred[None]:
        """Opening an image that does not exist fails with an OSError naming it."""

        async def run() -> None:
            with self.assertRaises(OSError) as caught:
                await self._device(image="no-such-image")
            self.assertIn("rbd/no-such-image", str(caught.exception))

        return ensureDeferred(run())

    def test_plugin_open_errors(self) -> None:
        """
        Opened by name, as the server does while it is built, a missing
        image or pool fails with an OSError that says which (the server
        then exits with that line).
        """
        from twisted_nbd.backends import OpenContext
        from twisted_nbd.registry import parse_ref

        cluster = require_ceph()
        context = OpenContext(reactor)
        where = f"conf={cluster.conf},keyring={cluster.keyring}"
        for keys, expected in [
            ("image=no-such-image", "rbd/no-such-image"),
            ("image=x,pool=no-such-pool", "no-such-pool"),
        ]:
            ref = parse_ref(f"rbd:{keys},{where}", "backend")
            with self.assertRaises(OSError) as caught:
                registry.open_backend(ref, context)
            self.assertIn(expected, str(caught.exception))

    def test_plugin_keys(self) -> None:
        """The registry knows C{rbd}; a bad key is refused before connecting."""
        from twisted_nbd.registry import PluginError, parse_ref

        self.assertIn("rbd", registry.names("backend"))
        with self.assertRaises(PluginError):
            registry.resolve("backend", parse_ref("rbd:pool=rbd"))
        with self.assertRaises(PluginError):
            registry.resolve("backend", parse_ref("rbd:image=x,user=a,id=b"))


# ------------------------------------------------------------ through the server

#: Write, flush, read: sys.argv = [uri_a, uri_b, seed]. Writes through A
#: and reads through B, then the other way round.
TWO_SERVERS_SCRIPT = """
import json, random, sys, nbd
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1]); b.connect_uri(sys.argv[2])
rng = random.Random(int(sys.argv[3]))
result = {"multi_conn": [a.can_multi_conn(), b.can_multi_conn()]}
one = rng.randbytes(1 << 20)
a.pwrite(one, 3 << 20); a.flush()
result["a_to_b"] = b.pread(1 << 20, 3 << 20) == one
two = rng.randbytes(123457)
b.pwrite(two, (3 << 20) + 1000); b.flush()
result["b_to_a"] = a.pread(len(two), (3 << 20) + 1000) == two
three = rng.randbytes(4096)
a.pwrite(three, 0); a.flush()
result["a_to_b_again"] = b.pread(4096, 0) == three
a.shutdown(); b.shutdown()
print(json.dumps(result))
"""

#: sys.argv = [uri, mode, seed]: "write" writes 4 MiB here and there and
#: flushes; "check" reads it back. Prints the sha256 of what it wrote/read.
DURABLE_SCRIPT = """
import hashlib, json, random, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rng = random.Random(int(sys.argv[3]))
where = [(0, 4096), (5 << 20, 1 << 20), (9 << 20, 777), (12 << 20, 3 << 20)]
spots = [(o, rng.randbytes(n)) for o, n in where]
digest = hashlib.sha256()
for offset, data in spots:
    if sys.argv[2] == "write":
        h.pwrite(data, offset)
        digest.update(data)
    else:
        digest.update(h.pread(len(data), offset))
if sys.argv[2] == "write":
    h.flush()
expected = hashlib.sha256(b"".join(d for _, d in spots)).hexdigest()
print(json.dumps({"sha256": digest.hexdigest(), "expected": expected}))
"""


def _scratch(case: SynchronousTestCase, needed: int) -> Path:
    """
    A fresh directory for C{needed} bytes of scratch files, removed when
    C{case} ends: in /dev/shm when it has room (no disk I/O to wait for on
    a busy machine), else in the temporary directory.
    """
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return make_tempdir(case)
    if shm.f_bavail * shm.f_frsize < 2 * needed:
        return make_tempdir(case)
    path = Path(tempfile.mkdtemp(prefix="nbd-rbd-", dir="/dev/shm"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def _all_stopped(pid: int) -> bool:
    """Whether every thread of process C{pid} is stopped (state T)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        if stat[stat.rindex(")") + 2] not in "Tt":
            return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


class RBDServerTests(SynchronousTestCase):
    """The server serving RBD images to real clients."""

    def _serve(self, cluster: CephCluster, image: str, *extra: str) -> NBDServer:
        return start_server(self, "--backend", backend_arg(cluster, image, *extra))

    def test_nbdcopy_round_trip(self) -> None:
        """
        256 MiB of random data copied into an RBD image with nbdcopy (4
        connections) and back out come back with the same sha256.
        """
        nbdcopy = require_tool("nbdcopy")
        cluster = require_ceph()
        size = 256 * MiB
        image = new_image(self, cluster, size, "copy")
        tmp = _scratch(self, 2 * size)
        source, target = tmp / "source.raw", tmp / "target.raw"
        digest = hashlib.sha256()
        with open(source, "wb") as f:
            for _ in range(size // (16 * MiB)):
                chunk = os.urandom(16 * MiB)
                digest.update(chunk)
                f.write(chunk)
        server = self._serve(cluster, image)
        run_tool([nbdcopy, "--connections=4", str(source), server.uri], timeout=TIMEOUT)
        run_tool([nbdcopy, "--connections=4", server.uri, str(target)], timeout=TIMEOUT)
        self.assertEqual(target.stat().st_size, size)
        self.assertEqual(_sha256(target), digest.hexdigest())

    def test_qemu_img_convert(self) -> None:
        """
        qemu-img converts a sparse image into the served RBD image
        (zeroing what it does not write), and qemu-img compare, reading it
        back through the server, finds them identical.
        """
        qemu_img = require_tool("qemu-img")
        cluster = require_ceph()
        size = 32 * MiB
        image = new_image(self, cluster, size, "qemu")
        tmp = _scratch(self, 2 * size)
        source = tmp / "source.raw"
        with open(source, "wb") as f:
            f.truncate(size)
            for offset in (0, 5 * MiB + 123, 17 * MiB, size - 4096):
                f.seek(offset)
                f.write(os.urandom(300_000 if offset < size - 4096 else 4096))
        server = self._serve(cluster, image)
        # Garbage first, so that the zeroes qemu-img leaves to the target matter.
        garbage = tmp / "garbage.raw"
        garbage.write_bytes(os.urandom(size))
        run_tool([require_tool("nbdcopy"), str(garbage), server.uri], timeout=TIMEOUT)
        run_tool(
            [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.uri],
            timeout=TIMEOUT,
        )
        run_tool(
            [qemu_img, "compare", "-f", "raw", "-F", "raw", str(source), server.uri],
            timeout=TIMEOUT,
        )

    def test_kill9_after_flush_loses_nothing(self) -> None:
        """
        Data written and flushed survives the server being killed with
        SIGKILL: another server on the same image reads it back.
        """
        cluster = require_ceph()
        # Not removed: librbd would first wait (about 30 s) for the killed
        # server's exclusive lock, until its watch times out.
        image = new_image(self, cluster, 16 * MiB, "kill9", remove=False)
        first = self._serve(cluster, image)
        wrote = run_libnbd(DURABLE_SCRIPT, first.uri, "write", "11", timeout=TIMEOUT)
        self.assertEqual(wrote["sha256"], wrote["expected"])
        first.kill9()
        second = self._serve(cluster, image)
        read = run_libnbd(DURABLE_SCRIPT, second.uri, "check", "11", timeout=TIMEOUT)
        self.assertEqual(read["sha256"], wrote["expected"])

    def test_two_servers_one_image(self) -> None:
        """
        Two servers in front of one image serve the same data: what one
        acknowledged and flushed, the other reads, both ways (the
        exclusive lock moves between them); both advertise multi-conn.
        """
        cluster = require_ceph()
        image = new_image(self, cluster, 16 * MiB, "two")
        # Started side by side: each takes a second or two to connect.
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda _: self._serve(cluster, image), range(2))
        result = run_libnbd(TWO_SERVERS_SCRIPT, a.uri, b.uri, "5", timeout=TIMEOUT)
        self.assertEqual(
            result,
            {"multi_conn": [True, True], "a_to_b": True, "b_to_a": True, "a_to_b_again": True},
        )
