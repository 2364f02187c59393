"""
The C{nbd} backend (a proxy through L{twisted_nbd.client}) against a
twisted-nbd server in this process, on 127.0.0.1: the conformance tests,
URIs and keys, the connection pool, and what happens to requests when the
remote's connections are dropped (reads are sent again, writes fail with
EIO, the next FLUSH owns up to possibly lost writes). The same backend
against nbdkit and qemu-nbd, with TLS and a restarted remote, is in
C{tests/interop/test_nbd_backend.py}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.backends.nbd import (
    NBDProxyDevice,
    NBDTarget,
    RemoteShape,
    open_nbd,
    parse_uri,
    plugin,
    probe_blocking,
    target_from_values,
)
from twisted_nbd.errors import Errno, NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.interfaces import Capabilities, IBlockDevice
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.registry import PluginError, parse_ref, registry
from twisted_nbd.testing import BlockDeviceConformanceMixin, ControllableBlockDevice

reactor: Any = global_reactor

KiB = 1024
MiB = 1024 * KiB


class Remote:
    """A twisted-nbd server on 127.0.0.1 serving C{device} as "disk"; it can drop its clients."""

    def __init__(self, case: TestCase, device: IBlockDevice) -> None:
        self.device = device
        self.protocols: list[Any] = []
        factory = NBDServerFactory(ExportRegistry.of([Export("disk", device)]), reactor=reactor)
        build = factory.buildProtocol

        def record(addr: Any) -> Any:
            protocol = build(addr)
            self.protocols.append(protocol)
            return protocol

        factory.buildProtocol = record  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)
        self.target = NBDTarget(host="127.0.0.1", port=self.port.getHost().port, export="disk")

    def drop(self) -> None:
        """Cut every connection at once, as a crashed remote would."""
        for protocol in self.protocols:
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()


async def proxy(case: TestCase, remote: Remote, **kw: Any) -> NBDProxyDevice:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    device = await open_nbd(reactor, remote.target, **kw)
    case.addCleanup(device.close)
    return device


class ProxyConformanceTests(BlockDeviceConformanceMixin, TestCase):
    """The conformance tests through the proxy to a sparse memory device."""

    exact_allocation = True

    async def _make(self, size: int) -> IBlockDevice:
        return await proxy(self, Remote(self, MemoryBlockDevice(size)))

    def make_device(self, size: int) -> Deferred[IBlockDevice]:
        return Deferred.fromCoroutine(self._make(size))


class PassThroughTests(TestCase):
    async def test_capabilities_passed_on(self) -> None:
        """What the remote advertises, block sizes included, is what the proxy has."""
        caps = Capabilities(
            can_trim=False,
            can_fast_zero=True,
            can_cache=True,
            can_extents=True,
            can_multi_conn=False,
            rotational=True,
            min_block=512,
            preferred_block=8192,
            max_block=1 * MiB,
        )
        remote = Remote(self, ControllableBlockDevice(64 * MiB, caps))
        device = await proxy(self, remote)
        self.assertEqual(device.size, 64 * MiB)
        self.assertEqual(device.capabilities, caps)

    async def test_read_only_passed_on(self) -> None:
        """A read-only remote makes a read-only proxy."""
        caps = Capabilities(can_write=False, can_flush=False, can_fua=False, can_trim=False)
        remote = Remote(self, ControllableBlockDevice(MiB, caps))
        device = await proxy(self, remote)
        self.assertFalse(device.capabilities.can_write)
        self.assertFalse(device.capabilities.can_zero)

    async def test_pool_needs_multi_conn(self) -> None:
        """More than one connection to a remote without multi-conn is refused."""
        caps = Capabilities(can_multi_conn=False)
        remote = Remote(self, ControllableBlockDevice(MiB, caps))
        with self.assertRaises(ValueError) as caught:
            await proxy(self, remote, connections=2)
        self.assertIn("multi-conn", str(caught.exception))

    async def test_pool_spreads_requests(self) -> None:
        """With four connections, requests in flight go to all four."""
        remote = Remote(self, ControllableBlockDevice(MiB))
        device = await proxy(self, remote, connections=4)
        for _ in range(5000):  # bounded: a few seconds at most
            if len(device._ready()) == 4:
                break
            await deferLaterZero()
        else:
            self.fail("the pool did not connect")
        reads = [device.read(i * 4096, 4096) for i in range(8)]
        backend: Any = remote.device
        for _ in range(5000):
            if len(backend.calls) == 8:
                break
            await deferLaterZero()
        else:
            self.fail(f"the reads did not reach the remote: {backend.calls}")
        for call in list(backend.calls):
            call.succeed(bytes([call.args["offset"] // 4096]) * 4096)
        results = await gatherResults(reads)
        self.assertEqual([r[0] for r in results], list(range(8)))
        busy = [s for s in device._slots if s.client is not None]
        self.assertEqual(len(busy), 4)
        self.assertEqual(len(remote.protocols), 4)

    async def test_pool_concurrent_io(self) -> None:
        """Concurrent writes and reads through a pool of three land where aimed."""
        device = await proxy(self, Remote(self, MemoryBlockDevice(4 * MiB)), connections=3)
        chunks = [bytes([i + 1]) * 64 * KiB for i in range(32)]
        await gatherResults([device.write(i * 64 * KiB, c) for i, c in enumerate(chunks)])
        await device.flush()
        reads = await gatherResults([device.read(i * 64 * KiB, 64 * KiB) for i in range(32)])
        self.assertEqual(reads, chunks)

    async def test_blocking_probe(self) -> None:
        """The registry's blocking probe sees what a Twisted client sees."""
        remote = Remote(self, MemoryBlockDevice(3 * MiB))
        info = await deferToThread(probe_blocking, remote.target, 5.0)
        self.assertEqual(info.size, 3 * MiB)
        shape = RemoteShape.of(info)
        self.assertTrue(shape.extents)
        self.assertTrue(shape.capabilities().can_write)
        bad = NBDTarget(host="127.0.0.1", port=remote.target.port, export="nope")
        with self.assertRaises(ValueError) as caught:
            await deferToThread(probe_blocking, bad, 5.0)
        self.assertIn("refused the export", str(caught.exception))


async def deferLaterZero() -> None:  # noqa: N802 - reads like deferLater
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.001, lambda: None)


class ReconnectTests(TestCase):
    """The remote drops its connections while requests are in flight."""

    async def _held(self) -> tuple[Remote, NBDProxyDevice, Any]:
        backend = ControllableBlockDevice(4 * MiB)
        remote = Remote(self, backend)
        device = await proxy(self, remote)
        return remote, device, backend

    async def _wait_reconnected(self, device: NBDProxyDevice, count: int = 1) -> None:
        for _ in range(2000):
            if device.reconnects >= count and device._ready():
                return
            await deferLaterZero()
        self.fail("the proxy did not reconnect")

    async def _wait_calls(self, backend: Any, count: int) -> None:
        for _ in range(2000):
            if len(backend.calls) >= count:
                return
            await deferLaterZero()
        self.fail(f"{count} calls never reached the remote: {backend.calls}")

    async def test_read_retried_once(self) -> None:
        """A READ in flight when the connection drops is sent again on a new one."""
        remote, device, backend = await self._held()
        read = device.read(4096, 10)
        await self._wait_calls(backend, 1)
        backend.take("read")  # never answered: the connection goes first
        remote.drop()
        await self._wait_calls(backend, 1)
        backend.take("read").succeed(b"0123456789")
        self.assertEqual(await read, b"0123456789")
        self.assertEqual((device.retried, device.reconnects), (1, 1))

    async def test_read_fails_when_lost_twice(self) -> None:
        """A READ whose retry is lost too fails with EIO."""
        remote, device, backend = await self._held()
        read = device.read(0, 10)
        for _ in range(2):
            await self._wait_calls(backend, 1)
            backend.take("read")
            remote.drop()
        with self.assertRaises(NBDError) as caught:
            await read
        self.assertEqual(caught.exception.errno, Errno.EIO)
        self.assertIn("was lost", caught.exception.message)

    async def test_write_in_flight_fails(self) -> None:
        """A WRITE in flight when the connection drops fails with EIO, and is not resent."""
        remote, device, backend = await self._held()
        write = device.write(0, b"x" * 512)
        await self._wait_calls(backend, 1)
        backend.take("write")
        remote.drop()
        with self.assertRaises(NBDError) as caught:
            await write
        self.assertEqual(caught.exception.errno, Errno.EIO)
        # The next request waits for the reconnection and goes through.
        read = device.read(0, 4)
        await self._wait_calls(backend, 1)
        backend.take("read").succeed(b"abcd")
        self.assertEqual(await read, b"abcd")
        self.assertEqual(backend.calls, [])

    async def test_flush_after_lost_writes_fails(self) -> None:
        """
        Writes acknowledged but not flushed, on a connection that was then
        lost, may be gone: the next FLUSH says so with EIO, the one after
        succeeds.
        """
        remote, device, backend = await self._held()
        write = device.write(0, b"y" * 512)
        await self._wait_calls(backend, 1)
        backend.take("write").succeed(None)
        await write
        remote.drop()
        await self._wait_reconnected(device)
        with self.assertRaises(NBDError) as caught:
            await device.flush()
        self.assertEqual(caught.exception.errno, Errno.EIO)
        flush = device.flush()
        await self._wait_calls(backend, 1)
        backend.take("flush").succeed(None)
        await flush

    async def test_flushed_writes_do_not_fail_flush(self) -> None:
        """Writes that a FLUSH covered are safe: a later loss does not fail FLUSH."""
        remote, device, backend = await self._held()
        write = device.write(0, b"z" * 512)
        await self._wait_calls(backend, 1)
        backend.take("write").succeed(None)
        await write
        flush = device.flush()
        await self._wait_calls(backend, 1)
        backend.take("flush").succeed(None)
        await flush
        remote.drop()
        await self._wait_reconnected(device)
        flush = device.flush()
        await self._wait_calls(backend, 1)
        backend.take("flush").succeed(None)
        await flush

    async def test_waiting_is_bounded(self) -> None:
        """With the remote gone for good, new requests fail with EIO after C{timeout}."""
        remote, device, backend = await self._held()
        device.timeout = 0.3
        await remote.port.stopListening()
        remote.drop()
        with self.assertRaises(NBDError) as caught:
            await device.read(0, 10)
        self.assertEqual(caught.exception.errno, Errno.EIO)
        self.assertIn("no connection to the remote within 0.3 s", caught.exception.message)

    async def test_remote_errors_passed_on(self) -> None:
        """An error the remote answers (ENOSPC) reaches the client as it is."""
        remote, device, backend = await self._held()
        write = device.write(0, b"q")
        await self._wait_calls(backend, 1)
        backend.take("write").fail(NBDError(Errno.ENOSPC, "full"))
        with self.assertRaises(NBDError) as caught:
            await write
        self.assertEqual(caught.exception.errno, Errno.ENOSPC)


class URITests(SynchronousTestCase):
    def test_tcp(self) -> None:
        self.assertEqual(
            parse_uri("nbd://example.com/disk"),
            {"host": "example.com", "port": 10809, "export": "disk", "tls": "off"},
        )
        found = parse_uri("nbds://127.0.0.1:1234/a%20b?tls-certificates=/pki")
        self.assertEqual(
            (found["host"], found["port"], found["export"], found["tls"]),
            ("127.0.0.1", 1234, "a b", "require"),
        )
        self.assertEqual(found["tls-certificates"], "/pki")
        self.assertEqual(parse_uri("nbd://[::1]:99")["host"], "::1")
        self.assertEqual(parse_uri("nbd://h")["export"], "")

    def test_unix(self) -> None:
        found = parse_uri("nbd+unix:///disk?socket=/run/nbd.sock")
        self.assertEqual((found["socket"], found["export"]), ("/run/nbd.sock", "disk"))
        self.assertRaises(ValueError, parse_uri, "nbd+unix:///disk")
        self.assertRaises(ValueError, parse_uri, "nbd+unix://host/disk?socket=/s")

    def test_bad(self) -> None:
        for uri in ("http://h/x", "nbd:///x", "nbd://h/x?colour=red", "nbd+vsock://1/x"):
            self.assertRaises(ValueError, parse_uri, uri)

    def test_keys(self) -> None:
        """Separate keys, and keys that add to a URI."""
        target = target_from_values({"host": "h", "port": 5, "export": "e"})
        self.assertEqual((target.host, target.port, target.export, target.tls), ("h", 5, "e", None))
        target = target_from_values({"uri": "nbd+unix:///e?socket=/s"})
        self.assertEqual(
            (target.socket, target.export, str(target)), ("/s", "e", "nbd+unix:///e?socket=/s")
        )
        self.assertRaises(ValueError, target_from_values, {"uri": "nbd://h/", "host": "g"})
        self.assertRaises(ValueError, target_from_values, {})

    def test_registry(self) -> None:
        ref = parse_ref("nbd:uri=nbd://127.0.0.1:10810/disk,connections=4,timeout=2s")
        found, values = registry.resolve("backend", ref)
        self.assertIs(found, plugin)
        self.assertEqual((values["connections"], values["timeout"]), (4, 2.0))
        with self.assertRaises(PluginError):
            registry.resolve("backend", parse_ref("nbd:connections=2"))
        with self.assertRaises(PluginError):
            registry.resolve("backend", parse_ref("nbd:uri=http://x/"))

    def test_config_file(self) -> None:
        """The backend in a TOML config file; its paths are relative to the file."""
        import shutil
        import tempfile
        from pathlib import Path

        from twisted_nbd.config import load_config

        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        path = directory / "nbd.toml"
        path.write_text(
            '[[export]]\nname = "remote"\n'
            'backend = { name = "nbd", uri = "nbds://127.0.0.1:10810/disk", '
            'tls-certificates = "pki", connections = 2 }\n'
        )
        [spec] = load_config(str(path)).exports
        assert spec.backend_ref is not None
        _, values = registry.resolve("backend", spec.backend_ref)
        self.assertEqual(values["tls-certificates"], str(directory / "pki"))
        self.assertEqual(values["connections"], 2)
