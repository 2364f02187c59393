# -*- test-case-name: tests.interop.test_remote_backends -*-
"""
The remote backends against real peers, each started by the test on
127.0.0.1:

  - C{nbd}: the proxy to nbdkit's memory plugin (the conformance tests,
    plaintext over TCP and a Unix socket, x509 and PSK TLS) and to
    qemu-nbd (what it advertises passes through; a remote killed with
    SIGKILL and started again on the same port is reconnected to, and the
    data it had flushed is all there);
  - C{http}: C{twistd web} (twisted.web's static file server, in its own
    process) serving an image;
  - both through the whole server (C{twistd -n nbd --backend ...}) with
    nbdcopy (sha256 equal) and C{qemu-img convert}.

The end-to-end copies move C{NBD_REMOTE_MIB} MiB (default 8); setting it
also runs the round trip through the proxy to qemu-nbd, and the issue's
256 MiB round trips are C{NBD_REMOTE_MIB=256}. A missing tool skips, or with
C{CI=true} fails.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.interop.helpers import (
    LOOPBACK,
    NBDServer,
    free_port,
    make_image,
    make_tempdir,
    require_tool,
    run_tool,
    start_server,
)
from tests.tlsfiles import make_certificates, make_psk_file
from twisted_nbd.backends.nbd import (
    NBDProxyDevice,
    open_nbd,
    probe_blocking,
    target_from_values,
)
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.testing import BlockDeviceConformanceMixin

pytestmark = pytest.mark.interop
reactor: Any = global_reactor

KiB = 1024
MiB = 1024 * KiB
#: How much the end-to-end copies move; setting it also runs the long variants.
COPY_MIB = int(os.environ.get("NBD_REMOTE_MIB", "8"))
LONG = "NBD_REMOTE_MIB" in os.environ


def nbdkit(*args: str) -> Callable[[int], list[str]]:
    """nbdkit on 127.0.0.1 with C{args} (plugin and options)."""
    path = require_tool("nbdkit")
    return lambda port: [path, "-f", "--exit-with-parent", "-p", str(port), "-i", LOOPBACK, *args]


def qemu_nbd(image: Path) -> Callable[[int], list[str]]:
    """qemu-nbd serving a raw image as export "disk", writeback cache off."""
    path = require_tool("qemu-nbd")
    return lambda port: [
        path, "-f", "raw", "-b", LOOPBACK, "-p", str(port), "-x", "disk", "--persistent",
        "--shared=8", "--discard=unmap", "--cache=none", "--aio=threads", str(image),
    ]  # fmt: skip


def peer(case: TestCase, command: Callable[[int], list[str]], **kw: Any) -> NBDServer:
    """Start another NBD server for C{case}; stopped when it ends."""
    server = NBDServer([], make_tempdir(case), command=command, **kw)
    case.addCleanup(server.stop)
    server.start()
    return server


async def proxy(case: TestCase, values: dict[str, Any], **kw: Any) -> NBDProxyDevice:
    kw.setdefault("backoff", 0.02)
    kw.setdefault("timeout", 20.0)
    device = await open_nbd(reactor, target_from_values(values), **kw)
    case.addCleanup(device.close)
    return device


async def turn(seconds: float = 0.01) -> None:
    await deferLater(reactor, seconds, lambda: None)


class NbdkitConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """The conformance tests through the proxy to nbdkit's memory plugin."""

    timeout = 60

    async def _make(self, size: int) -> IBlockDevice:
        server = peer(self, nbdkit("memory", str(size)))
        return await proxy(self, {"uri": f"nbd://{LOOPBACK}:{server.port}/"})

    def make_device(self, size: int) -> Deferred[IBlockDevice]:
        return Deferred.fromCoroutine(self._make(size))


class NbdPeerTests(TestCase):
    timeout = 120

    async def test_nbdkit_passes_through(self) -> None:
        """nbdkit's flags reach the proxy, a pool of 4 works, over TCP and a Unix socket."""
        server = peer(self, nbdkit("memory", "8M"))
        device = await proxy(self, {"host": LOOPBACK, "port": server.port}, connections=4)
        caps = device.capabilities
        self.assertEqual(device.size, 8 * MiB)
        for name in ("can_write", "can_flush", "can_fua", "can_trim", "can_zero"):
            self.assertTrue(getattr(caps, name), name)
        for name in ("can_fast_zero", "can_cache", "can_extents", "can_multi_conn"):
            self.assertTrue(getattr(caps, name), name)
        data = os.urandom(MiB)
        await device.write(MiB, data, fua=True)
        self.assertEqual(await device.read(MiB, MiB), data)
        sock = make_tempdir(self) / "nbdkit.sock"
        path = require_tool("nbdkit")
        process = subprocess.Popen(
            [path, "-f", "--exit-with-parent", "-U", str(sock), "memory", "1M"],
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(stop_process, process)
        for _ in range(1000):  # bounded: 10 s
            if sock.exists():
                break
            time.sleep(0.01)
        else:
            self.fail("nbdkit did not make its socket")
        device = await proxy(self, {"uri": f"nbd+unix:///?socket={sock}"})
        await device.write(0, b"unix")
        self.assertEqual(await device.read(0, 4), b"unix")

    async def test_qemu_nbd(self) -> None:
        """qemu-nbd: what it advertises passes through; I/O and block status work."""
        image = make_image(make_tempdir(self) / "disk.raw", 8 * MiB)
        server = peer(self, qemu_nbd(image))
        from twisted_nbd.client import connect

        direct = await connect(reactor, server.endpoint, "disk")
        await direct.disconnect()
        device = await proxy(self, {"uri": f"nbd://{LOOPBACK}:{server.port}/disk"})
        caps = device.capabilities
        self.assertEqual(
            (caps.can_trim, caps.can_zero, caps.can_fast_zero, caps.can_cache, caps.can_multi_conn),
            (
                direct.can_trim,
                direct.can_zero,
                direct.can_fast_zero,
                direct.can_cache,
                direct.can_multi_conn,
            ),
        )
        self.assertEqual(
            (caps.min_block, caps.preferred_block, caps.max_block), tuple(direct.block_size)
        )
        await device.write(4096, b"q" * 4096)
        await device.flush()
        [first, *_] = await device.block_status(4096, 4096)
        self.assertEqual(first.flags, 0)
        [hole, *_] = await device.block_status(4 * MiB, MiB)
        self.assertTrue(hole.flags & 2)
        self.assertEqual(image.read_bytes()[4096:8192], b"q" * 4096)

    async def test_remote_restarted(self) -> None:
        """
        qemu-nbd is killed with SIGKILL and started again on the same port:
        a read issued while it is down waits and then succeeds, and every
        flushed write is there.
        """
        image = make_image(make_tempdir(self) / "disk.raw", 8 * MiB)
        command = qemu_nbd(image)
        server = peer(self, command)
        device = await proxy(self, {"uri": f"nbd://{LOOPBACK}:{server.port}/disk"})
        data = os.urandom(2 * MiB)
        await device.write(MiB, data)
        await device.flush()
        server.kill9()
        read = device.read(MiB, 2 * MiB)
        for _ in range(500):  # the proxy sees the loss and starts reconnecting
            if not device._ready():
                break
            await turn()
        self.assertFalse(read.called)
        again = peer(self, command, port=server.port)
        self.assertEqual(await read, data)
        self.assertGreaterEqual(device.reconnects, 1)
        await device.write(0, b"after")
        await device.flush()
        again.stop()
        self.assertEqual(image.read_bytes()[:5], b"after")

    async def _tls(self, tls_option: str, values: dict[str, Any]) -> None:
        server = peer(self, nbdkit("--tls=require", tls_option, "memory", "4M"))
        values = {"uri": f"nbds://{LOOPBACK}:{server.port}/", **values}
        # The registry's blocking probe (in a thread: this process runs the reactor).
        info = await deferToThread(probe_blocking, target_from_values(values), 20.0)
        self.assertEqual(info.size, 4 * MiB)
        device = await proxy(self, values)
        data = os.urandom(256 * KiB)
        await device.write(KiB, data)
        self.assertEqual(await device.read(KiB, len(data)), data)
        plain = {"uri": f"nbd://{LOOPBACK}:{server.port}/"}
        with self.assertRaises(ValueError):
            await deferToThread(probe_blocking, target_from_values(plain), 20.0)

    async def test_tls_certificates(self) -> None:
        """nbds:// with a certificates directory, to nbdkit --tls=require."""
        certs = make_certificates(make_tempdir(self) / "pki")
        await self._tls(f"--tls-certificates={certs}", {"tls-certificates": str(certs)})

    async def test_tls_psk(self) -> None:
        """nbds:// with a PSK file, to nbdkit --tls-psk."""
        keys = make_tempdir(self) / "keys.psk"
        make_psk_file(keys)
        await self._tls(f"--tls-psk={keys}", {"tls-psk-file": str(keys), "tls-username": "alice"})

    async def test_tls_wrong_ca(self) -> None:
        """A remote whose certificate is not signed by our CA is refused at open."""
        certs = make_certificates(make_tempdir(self) / "pki")
        other = make_certificates(make_tempdir(self) / "other", ca_cn="another CA")
        server = peer(self, nbdkit("--tls=require", f"--tls-certificates={certs}", "memory", "1M"))
        values = {"uri": f"nbds://{LOOPBACK}:{server.port}/", "tls-certificates": str(other)}
        with self.assertRaises(ValueError) as caught:
            await deferToThread(probe_blocking, target_from_values(values), 20.0)
        self.assertIn("TLS", str(caught.exception))


# ---------------------------------------------------------------- through the server


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def random_file(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return path


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Kill a helper process and reap it."""
    process.kill()
    process.wait(15)


def start_web(case: TestCase, directory: Path) -> str:
    """
    A twisted.web static file server (L{tests.interop.webserver}, in its
    own process) serving C{directory} on 127.0.0.1; its base URL.
    """
    root = Path(__file__).resolve().parents[2]
    log = directory.parent / "web.log"
    for _ in range(5):
        port = free_port()
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.interop.webserver", str(port), str(directory)],
                cwd=root, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        case.addCleanup(stop_process, process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                return f"http://{LOOPBACK}:{port}"
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"the web server did not start:\n{log.read_text()}")


class ThroughServerTests(TestCase):
    """C{twistd -n nbd --backend http:...} and C{--backend nbd:...} with nbdcopy and qemu-img."""

    timeout = 600

    def copy_out(self, uri: str, work: Path, source: Path) -> None:
        """nbdcopy and qemu-img convert the export to files equal to C{source}."""
        nbdcopy = require_tool("nbdcopy")
        qemu_img = require_tool("qemu-img")
        started = time.monotonic()
        run_tool([nbdcopy, uri, str(work / "copy.img")], timeout=300)
        took = time.monotonic() - started
        print(f"nbdcopy {COPY_MIB} MiB out of {uri}: {took:.2f} s ({COPY_MIB / took:.1f} MiB/s)")
        digest = sha256(work / "copy.img")
        self.assertEqual(digest, sha256(source))
        print(f"sha256 of the copy and of the source: {digest}")
        run_tool([qemu_img, "convert", "-f", "raw", "-O", "qcow2", uri, str(work / "c.qcow2")])
        run_tool(
            [qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(work / "c.qcow2"), str(source)]
        )

    def test_http(self) -> None:
        """A file served by twisted.web, read through the http backend."""
        work = make_tempdir(self)
        (work / "www").mkdir()
        source = random_file(work / "www" / "disk.img", COPY_MIB)
        base = start_web(self, work / "www")
        server = start_server(self, "--backend", f"http:url={base}/disk.img,retries=2")
        self.copy_out(server.uri, work, source)

    def test_nbd_nbdkit(self) -> None:
        """Written and read back through the proxy to nbdkit (a pool of 4)."""
        self._round_trip(peer(self, nbdkit("memory", f"{COPY_MIB}M")), ",connections=4")

    def test_nbd_qemu_nbd(self) -> None:
        """Written and read back through the proxy to qemu-nbd."""
        image = make_image(make_tempdir(self) / "remote.raw", COPY_MIB * MiB)
        self._round_trip(peer(self, qemu_nbd(image)), "", "disk")

    def _round_trip(self, remote: NBDServer, extra: str, export: str = "") -> None:
        nbdcopy = require_tool("nbdcopy")
        work = make_tempdir(self)
        source = random_file(work / "source.img", COPY_MIB)
        uri = f"nbd://{LOOPBACK}:{remote.port}/{export}"
        server = start_server(self, "--backend", f"nbd:uri={uri}{extra}")
        started = time.monotonic()
        run_tool([nbdcopy, str(source), server.uri], timeout=300)
        took = time.monotonic() - started
        print(f"nbdcopy {COPY_MIB} MiB into {uri} via the proxy: {took:.2f} s")
        self.copy_out(server.uri, work, source)
