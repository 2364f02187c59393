# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd nbd} application: command-line options and the service tree.

C{twistd -n nbd --memory 1G} or C{twistd -n nbd --image disk.img} parse
L{Options}, then L{makeService} builds::

    MultiService
     +- BlockDeviceService "device"  (owns the device and its I/O thread pool)
     +- StreamServerEndpointService  (one per --listen, all sharing one factory)

Every mistake on the command line, including an image that cannot be opened,
is found while parsing and raised as L{usage.UsageError}, which twistd prints
as one line instead of a traceback.

The reactor is never imported at module level: twistd installs the reactor
the user chose after importing plugins, and L{makeService} takes a reactor
for tests and for embedding.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, cast

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.config import (
    MAX_SIZE,
    Config,
    ConfigError,
    ExportSpec,
    load_config,
    parse_size,
)
from twisted_nbd.exports import MAX_STRING, Export, ExportRegistry
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.protocol import NBDServerFactory

__all__ = [
    "BlockDeviceService",
    "NBDService",
    "openExports",
    "DEFAULT_LISTEN",
    "MAX_SIZE",
    "Options",
    "makeService",
    "parse_size",
]

#: Where the server listens when no C{--listen} is given: the IANA NBD port.
DEFAULT_LISTEN = "tcp:10809"

_log = Logger()

#: The most threads the I/O pool of file-backed exports starts.
IO_THREADS = 8

_EXAMPLES = """
Endpoints for --listen (quote them in a shell):
  tcp:10809                          every IPv4 interface, port 10809
  tcp:10809:interface=127.0.0.1      loopback only
  tcp6:10809:interface=\\:\\:          every IPv6 (and usually IPv4) interface
  unix:/run/nbd.sock                 a Unix socket (nbd+unix:///?socket=/run/nbd.sock)
  systemd:domain=INET6:index=0       a socket passed by systemd socket activation

Examples:
  twistd -n nbd --memory 1G
  twistd -n nbd --image disk.img --size 10G --name disk
  twistd -n nbd --image /dev/vg0/vm1 --read-only --listen tcp:10809:interface=127.0.0.1
  nbdinfo nbd://127.0.0.1
  qemu-img info nbd://127.0.0.1:10809
"""


def _checkString(option: str, text: str) -> None:
    """
    Refuse a name or description that the protocol cannot carry.

    @raise usage.UsageError: C{text} is too long or contains a NUL.
    """
    if len(text.encode("utf-8")) > MAX_STRING:
        raise usage.UsageError(f"--{option} is longer than {MAX_STRING} bytes (UTF-8)")
    if "\0" in text:
        raise usage.UsageError(f"--{option} must not contain a NUL character")


def _checkEndpoint(description: str) -> None:
    """
    Parse C{description} as a server endpoint without listening on it.

    Parsers keep the reactor they are given and only use it in C{listen},
    so none is needed here; the service built by L{makeService} parses the
    string again with the real reactor.

    @raise usage.UsageError: the description cannot be parsed.
    """
    try:
        endpoints.serverFromString(cast(Any, None), description)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise usage.UsageError(
            f"--listen {description!r} is not a server endpoint ({reason}); "
            "try tcp:10809, tcp6:10809:interface=\\:\\:1 or unix:/run/nbd.sock"
        ) from None


#: Options that describe a single export, which --config replaces.
_SINGLE_EXPORT_OPTIONS = (
    "image",
    "memory",
    "size",
    "name",
    "description",
    "read-only",
    "min-block",
    "preferred-block",
    "max-block",
)


class Options(usage.Options):
    """
    The options of C{twistd nbd}.

    After parsing, C{self.config} is the L{Config} to serve (from
    C{--config}, or one export built from the other options),
    C{self["max-queue-depth"]} and C{self["max-bytes-in-flight"]} are
    C{int}s, and C{self["listen"]} is a non-empty list of endpoint
    descriptions. For a single export, C{self["size"]} and
    C{self["memory"]} are C{int}s or C{None} and C{self["image"]} is an
    absolute path or C{None}.
    """

    config: Config

    longdesc = (
        "Serve block devices over the Network Block Device protocol (NBD): an image "
        "file or block device (--image) or a RAM disk (--memory), or several exports "
        "described in a TOML file (--config). Clients asking for the "
        "empty export name get the default export. SIZE is a number of "
        "bytes with an optional K, M, G, T or P suffix (or KiB, MiB, ...), all powers of "
        "1024: 512, 64K, 512M, 1G, 2T. --listen takes a Twisted server endpoint string "
        "and may be repeated."
    )

    optFlags = [
        ["read-only", "r", "Serve the device read-only: every write is refused with EPERM."],
    ]

    optParameters = [
        [
            "image",
            "i",
            None,
            "Serve the file or block device at PATH. It must exist unless --size is given.",
        ],
        [
            "size",
            "s",
            None,
            "With --image, create PATH as a sparse file of SIZE bytes if it does not exist "
            "(an existing PATH must already have this size).",
        ],
        ["memory", "m", None, "Serve a sparse RAM disk of SIZE bytes instead of an image."],
        ["name", None, None, "The export's name [default: empty]."],
        ["description", None, None, "A description of the export, shown by nbdinfo."],
        [
            "config",
            "c",
            None,
            "Serve the exports described in this TOML file instead (see docs/usage.md); "
            "it cannot be combined with the single-export options.",
        ],
        [
            "min-block",
            None,
            None,
            "Minimum block SIZE clients must align to: a power of two up to 64K [default: 1].",
        ],
        [
            "preferred-block",
            None,
            None,
            "Preferred block SIZE advertised to clients, a power of two [default: 4K].",
        ],
        [
            "max-block",
            None,
            None,
            "Largest payload of one READ or WRITE [default: 32M].",
        ],
        [
            "max-queue-depth",
            None,
            "64",
            "Stop reading a connection's requests while this many are in flight (at least 1).",
        ],
        [
            "shutdown-timeout",
            None,
            "10",
            "On stop, give requests in flight this many SECONDS to finish before "
            "dropping their connections.",
        ],
        [
            "max-bytes-in-flight",
            None,
            "64M",
            "Stop reading a connection's requests while their payloads in flight reach SIZE.",
        ],
    ]

    compData = usage.Completions(optActions={"image": usage.CompleteFiles()})

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted server endpoint; repeat for more. [default: tcp:10809]"""
        self["listen"].append(description)

    opt_l = opt_listen

    def getUsage(self, width: int | None = None) -> str:
        """
        The usage text, followed by examples kept as they are written
        (Twisted rewraps C{longdesc} into one paragraph).
        """
        return usage.Options.getUsage(self, width) + _EXAMPLES

    def postOptions(self) -> None:
        """
        Check the options together, convert sizes and numbers, and make sure
        every image can be opened (or created).

        @raise usage.UsageError: with a one-line explanation.
        """
        self["max-bytes-in-flight"] = self._size("max-bytes-in-flight")
        self["max-queue-depth"] = self._count("max-queue-depth")
        try:
            self["shutdown-timeout"] = float(self["shutdown-timeout"])
        except ValueError:
            raise usage.UsageError(
                f"--shutdown-timeout: {self['shutdown-timeout']!r} is not a number of seconds"
            ) from None
        if not 0 <= self["shutdown-timeout"] < float("inf"):
            raise usage.UsageError("--shutdown-timeout must be zero or more seconds")
        if self["config"] is not None:
            self.config = self._fromFile(self["config"])
        else:
            self.config = self._fromOptions()

        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        seen: set[str] = set()
        for description in self["listen"]:
            if description in seen:
                raise usage.UsageError(f"--listen {description!r} is given twice")
            seen.add(description)
            _checkEndpoint(description)

    def _fromFile(self, path: str) -> Config:
        """Load C{--config}, which describes every export by itself."""
        single = [option for option in _SINGLE_EXPORT_OPTIONS if self[option] not in (None, False)]
        if single:
            raise usage.UsageError(
                f"--config describes the exports; --{single[0]} belongs in its [[export]] tables"
            )
        try:
            return load_config(path)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _fromOptions(self) -> Config:
        """Build the one export the command line describes."""
        image, memory = self["image"], self["memory"]
        if image is None and memory is None:
            raise usage.UsageError(
                "nothing to serve: give --image PATH (an image file), --memory SIZE "
                "(a RAM disk) or --config FILE (several exports)"
            )
        if image is not None and memory is not None:
            raise usage.UsageError("--image and --memory cannot be used together")
        if memory is not None and self["size"] is not None:
            raise usage.UsageError("--size only applies to --image; --memory takes its own size")
        for option in ("size", "memory", "min-block", "preferred-block", "max-block"):
            self[option] = self._size(option)
        for option in ("name", "description"):
            if self[option] is None:
                self[option] = ""
            _checkString(option, self[option])
        if image is not None:
            if image == "":
                raise usage.UsageError("--image needs a path")
            image = self["image"] = os.path.abspath(image)
        spec = ExportSpec(
            name=self["name"],
            description=self["description"],
            read_only=self["read-only"],
            image=image,
            size=self["size"],
            memory=self["memory"],
            min_block=self["min-block"],
            preferred_block=self["preferred-block"],
            max_block=self["max-block"],
        )
        try:
            spec.check_block_sizes()
        except ValueError as e:
            raise usage.UsageError(f"--min-block/--preferred-block/--max-block: {e}") from None
        try:
            spec.check_image(size_hint="add --size SIZE", read_only_hint="add --read-only")
        except ValueError as e:
            raise usage.UsageError(f"--image {e}") from None
        return Config([spec], default=spec.name)

    def _size(self, option: str) -> int | None:
        """
        Parse the size given for C{option}, if any.

        @raise usage.UsageError: it is not a valid size.
        """
        value = self[option]
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            raise usage.UsageError(f"--{option}: {e}") from None

    def _count(self, option: str) -> int:
        """
        Parse the positive whole number given for C{option}.

        @raise usage.UsageError: it is not one.
        """
        value = self[option]
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(value.strip())
            except ValueError:
                raise usage.UsageError(f"--{option}: {value!r} is not a whole number") from None
        if number < 1:
            raise usage.UsageError(f"--{option} must be at least 1, not {number}")
        return number


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

        def stopPool(result: object) -> None:
            if self.pool is not None and self.pool.started:
                self.pool.stop()
            for ok, value in cast("list[tuple[bool, Any]]", result):
                if not ok:
                    _log.failure("Closing a block device failed", value)

        return closed.addCallback(stopPool)


def openExports(
    config: Config, reactor: Any, max_threads: int = IO_THREADS
) -> tuple[ExportRegistry, BlockDeviceService]:
    """
    Open the devices a L{Config} describes, creating sparse images where a
    size asks for one.

    @return: the registry of exports, and the service that owns the devices
        and their thread pool (not yet started).
    @raise OSError: an image could not be created or opened after all; the
        devices already opened are closed.
    """
    pool: ThreadPool | None = None
    devices: list[IBlockDevice] = []
    exports: list[Export] = []
    try:
        for spec in config.exports:
            device: IBlockDevice
            if spec.memory is not None:
                device = MemoryBlockDevice(spec.memory)
            else:
                assert spec.image is not None
                if spec.size is not None:
                    create_image(spec.image, spec.size)
                if pool is None:
                    pool = ThreadPool(minthreads=1, maxthreads=max_threads, name="nbd-io")
                device = FileBlockDevice(
                    spec.image, read_only=spec.read_only, reactor=reactor, threadpool=pool
                )
            devices.append(device)
            exports.append(
                Export(
                    spec.name,
                    device,
                    description=spec.description,
                    read_only=spec.read_only,
                    min_block=spec.min_block,
                    preferred_block=spec.preferred_block,
                    max_block=spec.max_block,
                )
            )
        registry = ExportRegistry.of(exports, config.default)
    except BaseException:
        for device in devices:
            device.close()
        raise
    return registry, BlockDeviceService(devices, pool)


class NBDService(MultiService):
    """
    The service tree of an NBD server: the device service (named
    C{"device"}) and the listeners. Stopping it is ordered so that no
    request is cut short: stop listening, shut the connections down
    gracefully (C-07: requests in flight finish, new ones get ESHUTDOWN)
    for at most C{shutdown_timeout} seconds, and only then close the
    devices.

    @ivar factory: the L{NBDServerFactory} every listener uses.
    """

    def __init__(self, factory: NBDServerFactory, reactor: Any, shutdown_timeout: float) -> None:
        MultiService.__init__(self)
        self.factory = factory
        self._reactor = reactor
        self.shutdown_timeout = shutdown_timeout

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, drain the connections, then close the devices.

        @return: a Deferred that fires once all of that is done.
        """
        Service.stopService(self)
        children = list(self)
        devices = [child for child in children if child.name == "device"]
        listeners = [child for child in children if child.name != "device"]
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


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build the service tree for parsed L{Options}.

    Opening the devices happens here, before twistd drops privileges
    (C{--uid}); images are created first where a size asks for it.

    @param reactor: the reactor to listen with and to deliver the thread
        pool's results to; the global reactor if C{None}.
    @return: a L{MultiService} whose first child, named C{"device"}, is the
        L{BlockDeviceService}, followed by one
        L{StreamServerEndpointService
        <twisted.application.internet.StreamServerEndpointService>} per
        C{--listen}.
    @raise OSError: an image could not be created or opened after all.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor

    registry, deviceService = openExports(
        options.config, reactor, min(IO_THREADS, options["max-queue-depth"])
    )
    factory = NBDServerFactory(
        registry,
        max_queue_depth=options["max-queue-depth"],
        max_bytes_in_flight=options["max-bytes-in-flight"],
    )
    top = NBDService(factory, reactor, options["shutdown-timeout"])
    # Typed as a plain Service: mypy sees the inherited methods as Twisted's.
    owner: Service = deviceService
    owner.setName("device")
    owner.setServiceParent(top)
    for description in options["listen"]:
        strports.service(description, factory, reactor=reactor).setServiceParent(top)
    return top
