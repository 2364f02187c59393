"""
The C{http} backend against twisted.web servers on 127.0.0.1, in this
process: a static file (C{twisted.web.static.File} serves ranges), and
resources that misbehave on purpose: one that drops the connection in the
middle of a body, one that ignores ranges, one that fails with 404, 500 or
503, one that never answers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File

from twisted_nbd.backends.http import (
    HTTPBlockDevice,
    HTTPOptions,
    open_http,
    plugin,
    probe_blocking,
    size_from_head,
    size_from_range_probe,
)
from twisted_nbd.errors import Errno, NBDError
from twisted_nbd.interfaces import Extent, IBlockDevice
from twisted_nbd.registry import PluginError, parse_ref, registry
from twisted_nbd.testing import BlockDeviceConformanceMixin

reactor: Any = global_reactor

KiB = 1024
MiB = 1024 * KiB
#: Fast retries, so the failure tests take milliseconds.
FAST = HTTPOptions(retries=2, timeout=5.0, backoff=0.01, connections=4)


class Counting(Site):
    """A site that counts the TCP connections it accepted."""

    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class Dropping(Resource):
    """
    Serves C{data} with ranges, but the first C{drops} requests get a 206
    and half their body, and then the connection is aborted.
    """

    isLeaf = True

    def __init__(self, data: bytes, drops: int) -> None:
        super().__init__()
        self.data = data
        self.drops = drops
        self.seen = 0

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-length", str(len(self.data)).encode())
        return b""

    def render_GET(self, request: Request) -> Any:
        self.seen += 1
        spec = (request.getHeader(b"range") or b"").decode().removeprefix("bytes=")
        first, last = (int(x) for x in spec.split("-"))
        body = self.data[first : last + 1]
        request.setResponseCode(206)
        request.setHeader(b"content-range", f"bytes {first}-{last}/{len(self.data)}".encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        if self.seen > 1 and self.drops > 0:  # the open's probe goes through
            self.drops -= 1
            request.write(body[: len(body) // 2])
            transport: Any = request.channel.transport
            transport.abortConnection()
            return NOT_DONE_YET
        return body


class WholeFile(Resource):
    """Ignores Range: always 200 and the whole file (an old or odd server)."""

    isLeaf = True

    def __init__(self, data: bytes, accept_ranges: bytes | None = None) -> None:
        super().__init__()
        self.data = data
        self.accept_ranges = accept_ranges

    def render_GET(self, request: Request) -> bytes:
        if self.accept_ranges is not None:
            request.setHeader(b"accept-ranges", self.accept_ranges)
        return self.data

    render_HEAD = render_GET


class Failing(Resource):
    """
    Serves C{data} through a C{File} until told to fail: then answers with
    C{status} (and a short page) the next C{times} requests.
    """

    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.file = File(str(path))
        self.file.isLeaf = True
        self.status = 0
        self.times = 0
        self.seen = 0

    def render(self, request: Request) -> Any:
        self.seen += 1
        if self.times > 0:
            self.times -= 1
            request.setResponseCode(self.status)
            return f"<h1>error {self.status}: the disk is on holiday</h1>".encode()
        return self.file.render(request)


class Silent(Resource):
    """Never answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


class ServerMixin:
    """Start twisted.web sites on 127.0.0.1 for the test; stopped after it."""

    def serve(self, resource: Resource) -> tuple[str, Counting]:
        case: Any = self
        site = Counting(resource)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        case.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/disk.img", site

    def image(self, data: bytes) -> Path:
        case: Any = self
        directory = Path(tempfile.mkdtemp(prefix="nbd-http-"))
        case.addCleanup(shutil.rmtree, directory, True)
        path = directory / "disk.img"
        path.write_bytes(data)
        return path

    def serve_file(self, data: bytes) -> tuple[str, Counting]:
        path = self.image(data)
        root = Resource()
        root.putChild(b"disk.img", File(str(path)))
        return self.serve(root)

    async def open(self, url: str, options: HTTPOptions = FAST, **kw: Any) -> HTTPBlockDevice:
        case: Any = self
        device = await open_http(reactor, url, options, **kw)
        case.addCleanup(device.close)
        return device

    def capture_log(self) -> list[str]:
        case: Any = self
        lines: list[str] = []

        def observer(event: LogEvent) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
        case.addCleanup(globalLogPublisher.removeObserver, observer)
        return lines


class HTTPConformanceTests(ServerMixin, BlockDeviceConformanceMixin, TestCase):
    """The conformance tests (the read-only ones apply) on a file of zeroes."""

    def make_device(self, size: int) -> Deferred[IBlockDevice]:
        url, _ = self.serve_file(bytes(size))
        return open_http(reactor, url, FAST)  # type: ignore[return-value]


class HTTPBackendTests(ServerMixin, TestCase):
    async def test_reads_ranges(self) -> None:
        """Reads anywhere return the file's bytes; the size comes from the server."""
        data = os.urandom(3 * MiB + 17)
        url, _ = self.serve_file(data)
        device = await self.open(url)
        self.assertEqual(device.size, len(data))
        self.assertFalse(device.capabilities.can_write)
        for offset, length in [(0, 1), (1, 4095), (MiB - 3, 2 * MiB), (len(data) - 5, 5)]:
            self.assertEqual(await device.read(offset, length), data[offset : offset + length])

    async def test_read_past_end_refused(self) -> None:
        """A read past the size fails with EINVAL and sends nothing."""
        url, site = self.serve_file(bytes(8192))
        device = await self.open(url)
        sent = device.requests
        for offset, length in [(8192, 1), (8000, 193), (-1, 2)]:
            with self.assertRaises(NBDError) as caught:
                await device.read(offset, length)
            self.assertEqual(caught.exception.errno, Errno.EINVAL)
        self.assertEqual(device.requests, sent)

    async def test_writes_refused(self) -> None:
        """Writes, trims and zeroing fail with EPERM."""
        url, _ = self.serve_file(bytes(8192))
        device = await self.open(url)
        for d in (device.write(0, b"x"), device.trim(0, 1), device.write_zeroes(0, 1)):
            with self.assertRaises(NBDError) as caught:
                await d
            self.assertEqual(caught.exception.errno, Errno.EPERM)

    async def test_block_status_all_data(self) -> None:
        """Block status says everything is data, up to the end."""
        url, _ = self.serve_file(bytes(10000))
        device = await self.open(url)
        self.assertTrue(device.capabilities.can_extents)
        self.assertEqual(list(await device.block_status(0, 10000)), [Extent(10000, 0)])
        self.assertEqual(list(await device.block_status(9000, 50000)), [Extent(1000, 0)])

    async def test_size_key(self) -> None:
        """size= serves a prefix; more than the server has is refused at open."""
        data = os.urandom(64 * KiB)
        url, _ = self.serve_file(data)
        device = await self.open(url, size=4096)
        self.assertEqual(device.size, 4096)
        self.assertEqual(await device.read(4000, 96), data[4000:4096])
        with self.assertRaises(ValueError) as caught:
            await self.open(url, size=128 * KiB)
        self.assertIn("more than the 65536 bytes", str(caught.exception))

    async def test_connections_reused(self) -> None:
        """Many reads, one after the other, share one persistent connection."""
        url, site = self.serve_file(os.urandom(MiB))
        device = await self.open(url)
        before = site.connections
        for i in range(20):
            await device.read(i * 4096, 4096)
        self.assertEqual(site.connections - before, 1)
        self.assertEqual(device.requests, 20)

    async def test_concurrency_bounded(self) -> None:
        """No more than C{connections} requests are in flight at once."""
        url, site = self.serve_file(os.urandom(MiB))
        device = await self.open(url, HTTPOptions(connections=2, backoff=0.01))
        before = site.connections
        from twisted.internet.defer import gatherResults

        await gatherResults([device.read(i * 4096, 4096) for i in range(16)])
        self.assertLessEqual(site.connections - before, 2)

    async def test_no_range_support_refused(self) -> None:
        """A server that answers a range with 200 and the whole file is refused at open."""
        url, _ = self.serve(WholeFile(bytes(4096)))
        with self.assertRaises(ValueError) as caught:
            await self.open(url)
        message = str(caught.exception)
        self.assertIn("does not support Range requests", message)
        self.assertIn("200 instead of 206", message)
        self.assertIn("no Accept-Ranges header", message)

    async def test_accept_ranges_none_refused(self) -> None:
        """C{Accept-Ranges: none} is refused at open too."""
        url, _ = self.serve(WholeFile(bytes(4096), accept_ranges=b"none"))
        with self.assertRaises(ValueError) as caught:
            await self.open(url)
        self.assertIn("Accept-Ranges: none", str(caught.exception))

    async def test_not_found_at_open(self) -> None:
        """A URL that is not there fails the open, naming the status."""
        url, _ = self.serve_file(bytes(4096))
        with self.assertRaises(ValueError) as caught:
            await self.open(url.replace("disk.img", "nothing.img"))
        self.assertIn("HTTP 404", str(caught.exception))

    async def test_dropped_connections_retried(self) -> None:
        """Connections dropped in the middle of a body are retried on new ones."""
        data = os.urandom(256 * KiB)
        resource = Dropping(data, drops=2)
        url, site = self.serve(resource)
        device = await self.open(url)
        self.assertEqual(await device.read(1000, 100 * KiB), data[1000 : 1000 + 100 * KiB])
        self.assertEqual(device.retried, 2)
        self.assertEqual(resource.drops, 0)
        # And the next read works at once, on a kept connection.
        self.assertEqual(await device.read(0, 10), data[:10])
        self.assertEqual(device.retried, 2)

    async def test_dropped_too_often_eio(self) -> None:
        """When every attempt is dropped, the read fails with EIO after the retries."""
        lines = self.capture_log()
        resource = Dropping(os.urandom(64 * KiB), drops=100)
        url, _ = self.serve(resource)
        device = await self.open(url)
        with self.assertRaises(NBDError) as caught:
            await device.read(0, 32 * KiB)
        self.assertEqual(caught.exception.errno, Errno.EIO)
        self.assertEqual(device.requests, 1 + FAST.retries)
        self.assertIn(f"after {1 + FAST.retries} attempts", caught.exception.message)
        self.assertTrue([line for line in lines if "after 3 attempts" in line], lines)

    async def _failing(self, status: int, times: int) -> tuple[HTTPBlockDevice, Failing]:
        resource = Failing(self.image(os.urandom(64 * KiB)))
        url, _ = self.serve(resource)
        device = await self.open(url)
        resource.status, resource.times = status, times
        return device, resource

    async def test_not_found_eio(self) -> None:
        """404 during reads: EIO at once (no retry), reason logged."""
        lines = self.capture_log()
        device, resource = await self._failing(404, 100)
        with self.assertRaises(NBDError) as caught:
            await device.read(0, 4096)
        self.assertEqual(caught.exception.errno, Errno.EIO)
        self.assertIn("HTTP 404", caught.exception.message)
        self.assertIn("on holiday", caught.exception.message)
        self.assertEqual(device.requests, 1)
        self.assertTrue([line for line in lines if "HTTP 404" in line], lines)

    async def test_server_error_retried_then_eio(self) -> None:
        """500 is retried C{retries} times, then EIO with the reason logged."""
        lines = self.capture_log()
        device, resource = await self._failing(500, 100)
        with self.assertRaises(NBDError) as caught:
            await device.read(0, 4096)
        self.assertEqual(caught.exception.errno, Errno.EIO)
        self.assertIn("HTTP 500", caught.exception.message)
        self.assertEqual(device.requests, 1 + FAST.retries)
        self.assertTrue([line for line in lines if "HTTP 500" in line and "after" in line])

    async def test_unavailable_then_served(self) -> None:
        """503 once, then the data: the read succeeds."""
        device, resource = await self._failing(503, 1)
        data = await device.read(100, 1000)
        self.assertEqual(len(data), 1000)
        self.assertEqual(device.retried, 1)

    async def test_timeout(self) -> None:
        """A server that never answers: each attempt times out, then EIO."""
        silent = Silent()
        url, _ = self.serve(silent)
        device = HTTPBlockDevice(reactor, url, 4096, HTTPOptions(retries=1, timeout=0.2))
        self.addCleanup(device.close)
        with self.assertRaises(NBDError) as caught:
            await device.read(0, 512)
        self.assertEqual(caught.exception.errno, Errno.EIO)
        self.assertIn("TimeoutError", caught.exception.message)
        self.assertEqual(len(silent.pending), 2)

    async def test_blocking_probe(self) -> None:
        """
        The registry's opener probes with blocking requests (here in a
        thread, since this process also serves): same size, same refusal.
        """
        url, _ = self.serve_file(bytes(12345))
        size = await deferToThread(probe_blocking, url, FAST, None)
        self.assertEqual(size, 12345)
        bad, _ = self.serve(WholeFile(bytes(100)))
        with self.assertRaises(ValueError) as caught:
            await deferToThread(probe_blocking, bad, FAST, None)
        self.assertIn("does not support Range requests", str(caught.exception))
        missing = url.replace("disk.img", "none")
        with self.assertRaises(ValueError) as caught:
            await deferToThread(probe_blocking, missing, FAST, None)
        self.assertIn("HTTP 404", str(caught.exception))


class HTTPSTests(ServerMixin, TestCase):
    """HTTPS, with a CA made for the test (tests/tlsfiles.py)."""

    def serve_tls(self, data: bytes) -> tuple[str, Path]:
        from twisted.internet import ssl

        from tests.tlsfiles import make_certificates

        path = self.image(data)
        certs = make_certificates(path.parent / "pki")
        pem = (certs / "server-key.pem").read_bytes() + (certs / "server-cert.pem").read_bytes()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        root = Resource()
        root.putChild(b"disk.img", File(str(path)))
        port = reactor.listenSSL(0, Site(root), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"https://127.0.0.1:{port.getHost().port}/disk.img", certs / "ca-cert.pem"

    async def test_https(self) -> None:
        """Reads over HTTPS, the server's certificate checked against ca=."""
        data = os.urandom(128 * KiB)
        url, ca = self.serve_tls(data)
        options = HTTPOptions(retries=0, timeout=5.0, ca=str(ca))
        device = await self.open(url, options)
        self.assertEqual(await device.read(1000, 50000), data[1000:51000])
        self.assertEqual(await deferToThread(probe_blocking, url, options, None), len(data))

    async def test_https_unknown_ca(self) -> None:
        """Without the test's CA, the server's certificate is refused at open."""
        url, _ = self.serve_tls(bytes(4096))
        with self.assertRaises(ValueError) as caught:
            await self.open(url, HTTPOptions(retries=0, timeout=5.0))
        self.assertIn("failed after 1 attempts", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            await deferToThread(probe_blocking, url, HTTPOptions(retries=0, timeout=5.0))
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(caught.exception))


class ProbeTests(TestCase):
    """The answers to the probes, read without a network."""

    def test_head(self) -> None:
        url = "http://h/x"
        self.assertEqual(size_from_head(url, 200, {"content-length": "42"}), 42)
        self.assertIsNone(size_from_head(url, 200, {}))
        self.assertIsNone(size_from_head(url, 405, {}))
        self.assertIsNone(size_from_head(url, 403, {}))
        self.assertRaises(ValueError, size_from_head, url, 200, {"accept-ranges": "none"})

    def test_range_probe(self) -> None:
        url = "http://h/x"
        self.assertEqual(size_from_range_probe(url, 206, {"content-range": "bytes 0-0/99"}), 99)
        self.assertIsNone(size_from_range_probe(url, 206, {"content-range": "bytes 0-0/*"}))
        self.assertEqual(size_from_range_probe(url, 416, {"content-range": "bytes */0"}), 0)
        self.assertRaises(ValueError, size_from_range_probe, url, 206, {})
        self.assertRaises(ValueError, size_from_range_probe, url, 200, {})
        self.assertRaises(ValueError, size_from_range_probe, url, 500, {})


class RegistryTests(TestCase):
    def test_keys(self) -> None:
        """The keys parse from the command line's form."""
        ref = parse_ref("http:url=https://example.com/a.img,size=1M,retries=5,timeout=2s")
        found, values = registry.resolve("backend", ref)
        self.assertIs(found, plugin)
        self.assertEqual(values["url"], "https://example.com/a.img")
        self.assertEqual((values["size"], values["retries"], values["timeout"]), (MiB, 5, 2.0))
        self.assertEqual((values["connections"], values["backoff"]), (8, 0.1))

    def test_bad_url(self) -> None:
        """A URL that is not http(s) is a one-line error naming the key."""
        with self.assertRaises(PluginError) as caught:
            registry.resolve("backend", parse_ref("http:url=ftp://example.com/a"))
        self.assertIn("url:", str(caught.exception))

    def test_config_file(self) -> None:
        """The backend in a TOML config file, as a table."""
        from twisted_nbd.config import load_config

        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        path = directory / "nbd.toml"
        path.write_text(
            '[[export]]\nname = "web"\n'
            'backend = { name = "http", url = "http://127.0.0.1:1/a.img", retries = 1 }\n'
        )
        config = load_config(str(path))
        [spec] = config.exports
        assert spec.backend_ref is not None
        self.assertEqual(spec.backend_ref.name, "http")
        _, values = registry.resolve("backend", spec.backend_ref)
        self.assertEqual(values["retries"], 1)
