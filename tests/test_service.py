"""
Tests for L{twisted_nbd.service}: building a server from a L{Config}
without any command line, the backend registry, and per-connection layers.
"""

from __future__ import annotations

import os
from typing import cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests import builders as b
from twisted_nbd.backends import BACKENDS, OpenContext, open_backend
from twisted_nbd.backends.file import FileBlockDevice
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.backends.ram import MAPPED_MAX, MappedMemoryDevice
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.config import Config, ConfigError, ExportSpec, SpecError
from twisted_nbd.exports import ConnectionContext, Export, ExportRegistry
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.observers import ServerObserver
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.service import BlockDeviceService, NBDService, build, open_exports
from twisted_nbd.testing import ControllableBlockDevice

MiB = 1 << 20


class BuildTests(SynchronousTestCase):
    """L{build} turns a L{Config} into a service tree, with no command line involved."""

    def test_tree(self) -> None:
        """A device service named "device", then one listener per endpoint."""
        reactor = MemoryReactorClock()
        config = Config(
            [ExportSpec(name="a", memory=MiB), ExportSpec(name="b", memory=2 * MiB)],
            default="b",
            listen=("tcp:0:interface=127.0.0.1", "unix:" + self.mktemp()),
            max_queue_depth=7,
            max_bytes_in_flight=MiB,
        )
        service = build(config, reactor)
        self.assertIsInstance(service, NBDService)
        children = list(service)
        self.assertEqual(children[0].name, "device")
        self.assertIsInstance(children[0], BlockDeviceService)
        self.assertEqual([type(child) for child in children[1:]], [StreamServerEndpointService] * 2)
        factory = service.factory
        self.assertEqual((factory.max_queue_depth, factory.max_bytes_in_flight), (7, MiB))
        self.assertEqual(service.registry.exports["b"], service.registry.lookup(""))
        self.assertEqual(service.registry.exports["a"].size, MiB)

    def test_observers(self) -> None:
        """Observers given to build reach every connection."""
        observer = ServerObserver()
        service = build(
            Config([ExportSpec(memory=MiB)]), MemoryReactorClock(), observers=[observer]
        )
        proto = service.factory.buildProtocol(None)
        assert proto is not None
        self.assertEqual(proto._observers, (observer,))

    def test_listens_on_start(self) -> None:
        """Nothing listens until the tree starts; then every endpoint does."""
        reactor = MemoryReactorClock()
        service = build(
            Config([ExportSpec(memory=MiB)], listen=("tcp:10809:interface=127.0.0.1",)), reactor
        )
        self.assertEqual(reactor.tcpServers, [])
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (10809, "127.0.0.1"))
        self.assertIs(factory, service.factory)


class BuildCheckTests(SynchronousTestCase):
    """L{build} checks a L{Config} made by code as the command line would."""

    def test_no_exports(self) -> None:
        self.assertRaises(ConfigError, build, Config([]), MemoryReactorClock())

    def test_bad_spec(self) -> None:
        """An export that cannot be served is refused before anything opens."""
        with self.assertRaises(SpecError) as caught:
            build(Config([ExportSpec(memory=MiB, image="/x")]), MemoryReactorClock())
        self.assertEqual(caught.exception.setting, "export")
        self.assertRaises(
            SpecError, build, Config([ExportSpec(image=self.mktemp())]), MemoryReactorClock()
        )

    def test_duplicates_and_default(self) -> None:
        specs = [ExportSpec(name="a", memory=MiB), ExportSpec(name="a", memory=MiB)]
        self.assertRaises(ConfigError, build, Config(specs), MemoryReactorClock())
        config = Config([ExportSpec(name="a", memory=MiB)], default="b")
        self.assertRaises(ConfigError, build, config, MemoryReactorClock())

    def test_bad_endpoint_opens_nothing(self) -> None:
        """A listen string that does not parse is refused before any image is created."""
        path = self.mktemp()
        config = Config([ExportSpec(image=path, size=MiB)], listen=("nonsense:1",))
        self.assertRaises(ConfigError, build, config, MemoryReactorClock())
        self.assertFalse(os.path.exists(path))

    def test_devices_found_by_type(self) -> None:
        """
        In a tree built by hand, the device service closes after the
        connections drain whatever its name.
        """
        device = ControllableBlockDevice(MiB)
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]))
        top = NBDService(factory, MemoryReactorClock(), 0)
        devices = BlockDeviceService([device])
        devices.setName("storage")
        devices.setServiceParent(top)
        self.assertTrue(top._is_devices(devices))
        top.startService()
        self.successResultOf(top.stopService())
        self.assertTrue(device.closed)


class BackendRegistryTests(SynchronousTestCase):
    """Backends are opened by name from one table."""

    def test_names(self) -> None:
        """The built-in backends are there by name."""
        self.assertEqual(set(BACKENDS), {"file", "memory"})
        self.assertEqual(ExportSpec(memory=1).backend, "memory")
        self.assertEqual(ExportSpec(image="/x").backend, "file")

    def test_memory(self) -> None:
        """
        A memory spec opens a RAM disk of its size in shared memory, and
        needs no pool; one too big to map is a sparse dict of pages.
        """
        context = OpenContext(MemoryReactorClock(), 4)
        device = open_backend(ExportSpec(memory=3 * MiB), context)
        self.addCleanup(device.close)
        self.assertIsInstance(device, MappedMemoryDevice)
        self.assertEqual(device.size, 3 * MiB)
        self.assertIsNone(context.pool)
        huge = open_backend(ExportSpec(memory=MAPPED_MAX + 1), context)
        self.assertIsInstance(huge, MemoryBlockDevice)

    def test_file(self) -> None:
        """A file spec creates the sparse image and opens it on the shared pool."""
        path = self.mktemp()
        context = OpenContext(MemoryReactorClock(), 4)
        device = open_backend(ExportSpec(image=path, size=MiB), context)
        self.addCleanup(device.close)
        self.assertIsInstance(device, FileBlockDevice)
        self.assertEqual(os.path.getsize(path), MiB)
        self.assertIsNotNone(context.pool)
        assert context.pool is not None
        self.assertEqual(context.pool.max, 4)

    def test_added_backend(self) -> None:
        """A new entry in the table is used by open_exports like the built-in ones."""
        opened: list[ExportSpec] = []

        def open_zero(spec: ExportSpec, context: OpenContext) -> IBlockDevice:
            opened.append(spec)
            return MemoryBlockDevice(512)

        original = BACKENDS["memory"]
        BACKENDS["memory"] = open_zero
        self.addCleanup(BACKENDS.__setitem__, "memory", original)
        registry, service = open_exports(Config([ExportSpec(memory=1)]), MemoryReactorClock())
        self.assertEqual(len(opened), 1)
        self.assertEqual(registry.exports[""].size, 512)
        self.assertIsNone(service.pool)


class _Layer(BlockDeviceFilter):
    """A per-connection layer that records its context and its closing."""

    def __init__(self, inner: IBlockDevice, context: ConnectionContext) -> None:
        super().__init__(inner)
        self.context = context
        self.closed = False

    def close(self) -> Deferred[None]:
        # A per-connection layer releases only itself, never the shared device.
        self.closed = True
        return succeed(None)


class ConnectionLayerTests(SynchronousTestCase):
    """An export can wrap its shared device per connection."""

    def test_attach_and_close(self) -> None:
        """
        Each connection gets its own layer over the shared device, with the
        connection's context; closing the connection closes the layer only.
        """
        device = ControllableBlockDevice(MiB)
        made: list[_Layer] = []

        def layer(inner: IBlockDevice, context: ConnectionContext) -> IBlockDevice:
            made.append(_Layer(inner, context))
            return made[-1]

        registry = ExportRegistry.of([Export("disk", device, connection_layers=(layer,))])
        factory = NBDServerFactory(registry)
        protos = []
        for _ in range(2):
            proto = factory.buildProtocol(None)
            assert proto is not None
            proto.makeConnection(StringTransport())
            proto.dataReceived(b.client_flags() + b.go("disk"))
            protos.append(proto)
        self.assertEqual(len(made), 2)
        self.assertIsNot(made[0], made[1])
        self.assertEqual(made[0].context.export_name, "disk")
        self.assertEqual(made[0].context.peer, "192.168.1.1:54321")
        protos[0].dataReceived(b.read(1, 0, 512))
        self.assertEqual(device.take("read").args, {"offset": 0, "length": 512})
        protos[0].connectionLost()
        self.assertEqual([m.closed for m in made], [True, False])
        self.assertFalse(device.closed)


class WorkersConfigTests(SynchronousTestCase):
    """What --workers accepts."""

    def test_check(self) -> None:
        from twisted_nbd.workers import check_workers

        check_workers(Config([ExportSpec(memory=MiB)], workers=4))
        self.assertRaises(ConfigError, check_workers, Config([ExportSpec(memory=MiB)], workers=0))
        huge = Config([ExportSpec(memory=MAPPED_MAX + 1)], workers=2)
        self.assertRaises(ConfigError, check_workers, huge)
        check_workers(Config([ExportSpec(memory=MAPPED_MAX + 1)], workers=1))

    def test_no_observers_with_workers(self) -> None:
        """Observers live in one process: build() refuses them with workers."""
        config = Config([ExportSpec(memory=MiB)], workers=2)
        self.assertRaises(
            ConfigError, build, config, MemoryReactorClock(), observers=[ServerObserver()]
        )

    def test_supervisor_tree(self) -> None:
        """With workers, build() makes a supervisor: devices, the pool, the listeners."""
        from twisted_nbd.workers import SupervisorService, WorkerPool

        config = Config([ExportSpec(memory=MiB)], workers=3)
        service = build(config, MemoryReactorClock())
        self.assertIsInstance(service, SupervisorService)
        children = list(service)
        self.assertEqual(children[0].name, "device")
        self.assertIsInstance(children[1], WorkerPool)
        self.assertEqual(len(cast(SupervisorService, service).pool.workers), 3)
        self.assertIsInstance(children[2], StreamServerEndpointService)
        cast(BlockDeviceService, children[0]).devices[0].close()
