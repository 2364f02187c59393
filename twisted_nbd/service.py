# -*- test-case-name: tests.test_service -*-
"""
Assembly: from a L{Config} to a running tree of Twisted services.

L{build} is the one place a server is put together. C{twistd nbd}
(L{twisted_nbd.tap}) calls it with what the command line says, an
application embeds the result in its own C{MultiService}, and a worker
process can build the same tree from the same L{Config}::

    NBDService (a MultiService)
     +- BlockDeviceService "device"  (owns the devices and their I/O thread pool)
     +- StreamServerEndpointService  (one per listen endpoint, all sharing one factory)

Backends are opened by name through L{twisted_nbd.backends.open_backend},
and wrapped in the export's filters (L{with_filters}).
Observers (L{twisted_nbd.observers.IServerObserver}) passed to L{build}
see every connection and request.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, cast

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from twisted_nbd._connection import ServerConfiguration
from twisted_nbd.backends import OpenContext, open_backend
from twisted_nbd.config import Config, ConfigError, ExportSpec, check_config
from twisted_nbd.exports import ConnectionContext, ConnectionLayer, Export, ExportRegistry
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.observers import IServerObserver
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.registry import FilterPlugin
from twisted_nbd.tls import TLSError

__all__ = [
    "IO_THREADS",
    "BlockDeviceService",
    "NBDService",
    "build",
    "connection_layers",
    "make_factory",
    "open_exports",
    "with_filters",
]

_log = Logger()

#: The most threads the I/O pool of file-backed exports starts.
IO_THREADS = 8


class BlockDeviceService(Service):
    """
    Owns the served block devices, and the thread pool their blocking calls
    run in if they need one: starts the pool with the service, and on stop
    closes every device (each waits for its requests still running) and
    then stops the pool.

    A stopped service cannot be started again: its devices are closed.

    @ivar devices: the L{IBlockDevice}s.
    @ivar pool: their L{ThreadPool}, or C{None}.
    """

    def __init__(self, devices: Sequence[IBlockDevice], pool: ThreadPool | None = None) -> None:
        self.devices = list(devices)
        self.pool = pool

    def startService(self) -> None:
        """
        Start the thread pool. This runs after twistd has daemonized (a fork
        would lose the threads) and dropped privileges.
        """
        if self.pool is not None and not self.pool.started:
            self.pool.start()
        Service.startService(self)

    def stopService(self) -> Deferred[None]:
        """
        Close the devices, then stop the pool.

        @return: a Deferred that fires once all are done.
        """
        Service.stopService(self)
        closed = DeferredList(
            [maybeDeferred(device.close) for device in self.devices], consumeErrors=True
        )

        def stop_pool(result: object) -> None:
            if self.pool is not None and self.pool.started:
                self.pool.stop()
            for ok, value in cast("list[tuple[bool, Any]]", result):
                if not ok:
                    _log.failure("Closing a block device failed", value)

        return closed.addCallback(stop_pool)


def export_of(
    spec: ExportSpec, device: IBlockDevice, layers: tuple[ConnectionLayer, ...] = ()
) -> Export:
    """The L{Export} that serves C{device} as C{spec} says, with per-connection C{layers}."""
    return Export(
        spec.name,
        device,
        description=spec.description,
        read_only=spec.read_only,
        min_block=spec.min_block,
        preferred_block=spec.preferred_block,
        max_block=spec.max_block,
        connection_layers=layers,
        tls_required=spec.tls_required,
        allowed_dns=spec.tls_allow_dn,
    )


def make_factory(
    config: Config,
    registry: ExportRegistry,
    reactor: Any,
    observers: Iterable[IServerObserver] = (),
) -> NBDServerFactory:
    """
    The factory that serves C{registry} as C{config} says (its limits and
    TLS); a worker process makes its own the same way.

    @raise ConfigError: the TLS files do not load.
    """
    tls = config.tls
    if config.verbose:
        from twisted_nbd.logs import RequestLog

        observers = [*observers, RequestLog()]
    try:
        creator = tls.server_creator() if tls.mode != "off" else None
    except TLSError as e:
        raise ConfigError(str(e)) from None
    return NBDServerFactory(
        registry,
        max_queue_depth=config.max_queue_depth,
        max_bytes_in_flight=config.max_bytes_in_flight,
        observers=observers,
        reactor=reactor,
        poll_max=config.poll_max,
        limits=config.limits,
        config=ServerConfiguration(tls=tls.mode),
        tls=creator,
        tls_allow_dns=tls.allow_dns,
    )


def connection_layers(spec: ExportSpec, context: OpenContext) -> tuple[ConnectionLayer, ...]:
    """
    The per-connection layers of C{spec}'s filters that are made per
    connection (C{rate:per=connection}), innermost first, as
    L{Export.connection_layers} wants them.
    """
    if not spec.filters:
        return ()
    from twisted_nbd.registry import registry

    per_connection, _ = registry.split(spec.filters)
    layers: list[ConnectionLayer] = []
    for plugin, values in reversed(per_connection):

        def layer(
            device: IBlockDevice,
            connection: ConnectionContext,
            plugin: FilterPlugin = plugin,
            values: dict[str, Any] = values,
        ) -> IBlockDevice:
            return plugin.wrap(device, values, context)

        layers.append(layer)
    return tuple(layers)


def with_filters(spec: ExportSpec, device: IBlockDevice, context: OpenContext) -> IBlockDevice:
    """
    C{device} wrapped in C{spec}'s filters, the first outermost; each is
    made once per export and shared by its connections.

    @raise twisted_nbd.registry.PluginError: a filter is wrong (the specification
        was checked, so only a filter that fails to open).
    """
    if not spec.filters:
        return device
    from twisted_nbd.registry import registry

    context.read_only = spec.read_only
    _, per_export = registry.split(spec.filters)
    return registry.wrap(device, per_export, context)


def open_exports(
    config: Config, reactor: Any, max_threads: int = IO_THREADS
) -> tuple[ExportRegistry, BlockDeviceService]:
    """
    Open the devices a L{Config} describes, creating sparse images where a
    size asks for one. This blocks briefly (opening files): call it while
    setting up, before the reactor runs.

    @return: the registry of exports, and the service that owns the devices
        and their thread pool (not yet started).
    @raise OSError: a device could not be created or opened after all; the
        devices already opened are closed.
    """
    context = OpenContext(reactor, max_threads)
    devices: list[IBlockDevice] = []
    exports: list[Export] = []
    try:
        for spec in config.exports:
            context.read_only = spec.read_only
            device = open_backend(spec, context)
            devices.append(device)
            device = devices[-1] = with_filters(spec, device, context)
            exports.append(export_of(spec, device, connection_layers(spec, context)))
        registry = ExportRegistry.of(exports, config.default)
    except BaseException:
        for device in devices:
            device.close()
        raise
    return registry, BlockDeviceService(devices, context.pool)


class NBDService(MultiService):
    """
    The service tree of an NBD server: the device service (named
    C{"device"}) and the listeners. Stopping it is ordered so that no
    request is cut short: stop listening, shut the connections down
    gracefully (C-07: requests in flight finish, new ones get ESHUTDOWN)
    for at most C{shutdown_timeout} seconds, and only then close the
    devices.

    @ivar factory: the L{NBDServerFactory} every listener uses.
    @ivar registry: the exports it serves.
    @ivar devices: the service that owns the devices, once added: the child
        that is a L{BlockDeviceService} (or, in a tree built by hand, the
        child named C{"device"}).
    """

    def __init__(self, factory: NBDServerFactory, reactor: Any, shutdown_timeout: float) -> None:
        MultiService.__init__(self)
        self.factory = factory
        self.registry = factory.registry
        self._reactor = reactor
        self.shutdown_timeout = shutdown_timeout

    def _is_devices(self, child: Any) -> bool:
        return isinstance(child, BlockDeviceService) or child.name == "device"

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, drain the connections, then close the devices.

        @return: a Deferred that fires once all of that is done.
        """
        Service.stopService(self)
        children = list(self)
        devices = [child for child in children if self._is_devices(child)]
        listeners = [child for child in children if not self._is_devices(child)]
        stopped = DeferredList(
            [maybeDeferred(child.stopService) for child in reversed(listeners)],
            consumeErrors=True,
        )
        stopped.addCallback(lambda _: self.factory.shutdown(self.shutdown_timeout, self._reactor))
        stopped.addCallback(
            lambda _: DeferredList(
                [maybeDeferred(child.stopService) for child in devices], consumeErrors=True
            )
        )
        return stopped.addCallback(lambda _: None)


def build(
    config: Config,
    reactor: Any = None,
    observers: Iterable[IServerObserver] = (),
) -> NBDService:
    # With config.workers > 1 the tree is a twisted_nbd.workers.SupervisorService.
    """
    Build the service tree that serves C{config}: open its devices, make
    the factory, and add one listener per endpoint. Nothing listens until
    the tree is started.

    Opening the devices happens here, before twistd drops privileges
    (C{--uid}); images are created first where a size asks for it.

    @param reactor: the reactor to listen with and to deliver the thread
        pool's results to; the global reactor if C{None}.
    @param observers: told of every connection and request.
    @return: an L{NBDService} whose first child, named C{"device"}, is the
        L{BlockDeviceService}, followed by one
        L{StreamServerEndpointService
        <twisted.application.internet.StreamServerEndpointService>} per
        endpoint in C{config.listen}.
    @raise ConfigError: C{config} cannot be served (no exports, a bad
        default, an endpoint that does not parse).
    @raise SpecError: an export cannot be served (the same checks as the
        command line and the config file make).
    @raise OSError: a device could not be created or opened after all.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor

    check_config(config)
    if config.workers > 1 and observers:
        raise ConfigError("observers see only their own process: they cannot watch workers")
    # Parse the endpoints before opening anything, so a bad one leaks nothing.
    for description in config.listen:
        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise ConfigError(f"{description!r} is not a server endpoint: {e}") from None
    if config.workers > 1:
        from twisted_nbd.workers import build_supervisor

        return build_supervisor(config, reactor)  # type: ignore[return-value]
    registry, device_service = open_exports(
        config, reactor, min(IO_THREADS, config.max_queue_depth)
    )
    factory = make_factory(config, registry, reactor, observers)
    top = NBDService(factory, reactor, config.shutdown_timeout)
    # Typed as a plain Service: mypy sees the inherited methods as Twisted's.
    owner: Service = device_service
    owner.setName("device")
    owner.setServiceParent(top)
    for description in config.listen:
        strports.service(description, factory, reactor=reactor).setServiceParent(top)
    return top
