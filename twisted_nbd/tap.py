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
import re
import stat
from typing import Any, cast

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.exports import MAX_STRING, Export, ExportRegistry
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.protocol import NBDServerFactory

__all__ = [
    "BlockDeviceService",
    "DEFAULT_LISTEN",
    "MAX_SIZE",
    "Options",
    "makeService",
    "parse_size",
]

#: Where the server listens when no C{--listen} is given: the IANA NBD port.
DEFAULT_LISTEN = "tcp:10809"

#: The largest size accepted: offsets are signed 64-bit numbers in most
#: clients (qemu, the Linux kernel), so nothing larger is usable.
MAX_SIZE = 2**63 - 1

#: The most threads the I/O pool of a file-backed export starts.
IO_THREADS = 8

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "p": 1 << 50,
    "pib": 1 << 50,
}
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
_AMBIGUOUS_UNITS = frozenset({"kb", "mb", "gb", "tb", "pb"})
_SIZE = re.compile(r"([+-]?[0-9]+)\s*([a-z]*)")


def parse_size(text: str) -> int:
    """
    Parse a size such as C{512}, C{64K}, C{512M}, C{1G}, C{2T} or C{10GiB}.

    Suffixes are powers of 1024 and case-insensitive (C{k}, C{K} and C{KiB}
    are all 1024); C{KB}, C{MB}, ... are refused because they are read as
    powers of 1000 elsewhere.

    @return: the size in bytes, at least 1 and at most L{MAX_SIZE}.
    @raise ValueError: C{text} is not a size, or is zero, negative or too
        large; the message is one line meant for the user.
    """
    cleaned = text.strip().lower()
    match = _SIZE.fullmatch(cleaned)
    if match is None or (match.group(2) not in _UNITS and match.group(2) not in _AMBIGUOUS_UNITS):
        raise ValueError(
            f"{text!r} is not a size: write a number of bytes with an optional "
            "K, M, G, T or P suffix (powers of 1024), e.g. 512M or 1G"
        )
    number, unit = int(match.group(1)), match.group(2)
    if unit in _AMBIGUOUS_UNITS:
        plain = unit[0].upper()
        raise ValueError(
            f"{text!r} is ambiguous: write {number}{plain} or {number}{plain}iB (powers of 1024)"
        )
    if number <= 0:
        raise ValueError(f"{text!r} is not a usable size: it must be greater than zero")
    size = number * _UNITS[unit]
    if size > MAX_SIZE:
        raise ValueError(f"{text!r} is too large: the limit is {MAX_SIZE} bytes (8 EiB - 1)")
    return size


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


def _checkImage(path: str, readOnly: bool) -> int | None:
    """
    Check that the server will be able to open C{path} the way it needs.

    @return: the size of the existing file or block device, or C{None} if
        nothing exists at C{path}.
    @raise usage.UsageError: C{path} exists but cannot be served.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise usage.UsageError(f"--image {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise usage.UsageError(f"--image {path} is a directory, not an image file")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise usage.UsageError(f"--image {path} is neither a regular file nor a block device")
    flags = (os.O_RDONLY if readOnly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if readOnly:
            raise usage.UsageError(f"--image {path} cannot be read: {e.strerror}") from None
        raise usage.UsageError(
            f"--image {path} cannot be opened for writing: {e.strerror} "
            "(add --read-only to serve it read-only)"
        ) from None
    try:
        if stat.S_ISBLK(mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return os.fstat(fd).st_size
    except OSError as e:
        raise usage.UsageError(f"--image {path}: cannot find its size: {e.strerror}") from None
    finally:
        os.close(fd)


class Options(usage.Options):
    """
    The options of C{twistd nbd}.

    After parsing, C{self["size"]}, C{self["memory"]},
    C{self["max-queue-depth"]} and C{self["max-bytes-in-flight"]} are
    C{int}s (the first two may be C{None}), C{self["image"]} is an absolute
    path or C{None}, and C{self["listen"]} is a non-empty list of endpoint
    descriptions.
    """

    longdesc = (
        "Serve one block device over the Network Block Device protocol (NBD): an image "
        "file or block device (--image) or a RAM disk (--memory). Clients asking for the "
        "empty export name get it, as do those asking for --name. SIZE is a number of "
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
            "max-queue-depth",
            None,
            "64",
            "Stop reading a connection's requests while this many are in flight (at least 1).",
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
        the image can be opened (or created).

        @raise usage.UsageError: with a one-line explanation.
        """
        image, memory = self["image"], self["memory"]
        if image is None and memory is None:
            raise usage.UsageError(
                "nothing to serve: give --image PATH (an image file) or --memory SIZE (a RAM disk)"
            )
        if image is not None and memory is not None:
            raise usage.UsageError("--image and --memory cannot be used together")
        if memory is not None and self["size"] is not None:
            raise usage.UsageError("--size only applies to --image; --memory takes its own size")

        self["size"] = self._size("size")
        self["memory"] = self._size("memory")
        self["max-bytes-in-flight"] = self._size("max-bytes-in-flight")
        self["max-queue-depth"] = self._count("max-queue-depth")

        for option in ("name", "description"):
            if self[option] is None:
                self[option] = ""
        _checkString("name", self["name"])
        _checkString("description", self["description"])

        if image is not None:
            if image == "":
                raise usage.UsageError("--image needs a path")
            image = self["image"] = os.path.abspath(image)
            existing = _checkImage(image, self["read-only"])
            size = self["size"]
            if existing is None and size is None:
                raise usage.UsageError(
                    f"--image {image} does not exist (add --size SIZE to create a sparse image)"
                )
            if existing is None:
                parent = os.path.dirname(image)
                if not os.path.isdir(parent):
                    raise usage.UsageError(
                        f"--image {image} cannot be created: {parent} is not a directory"
                    )
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise usage.UsageError(
                        f"--image {image} cannot be created: {parent} is not writable"
                    )
            elif size is not None and size != existing:
                raise usage.UsageError(
                    f"--image {image} already exists with {existing} bytes, not {size} "
                    "(drop --size to serve it as it is)"
                )

        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        seen: set[str] = set()
        for description in self["listen"]:
            if description in seen:
                raise usage.UsageError(f"--listen {description!r} is given twice")
            seen.add(description)
            _checkEndpoint(description)

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
    Owns a block device, and the thread pool its blocking calls run in if it
    has one: starts the pool with the service, and on stop closes the
    device (which waits for the requests still running) and then stops the
    pool.

    A stopped service cannot be started again: its device is closed.

    @ivar device: the L{IBlockDevice}.
    @ivar pool: the device's L{ThreadPool}, or C{None}.
    """

    def __init__(self, device: IBlockDevice, pool: ThreadPool | None = None) -> None:
        self.device = device
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
        Close the device, then stop the pool.

        @return: a Deferred that fires once both are done.
        """
        Service.stopService(self)
        closed: Deferred[None] = maybeDeferred(self.device.close)

        def stopPool(result: None | Failure) -> None | Failure:
            if self.pool is not None and self.pool.started:
                self.pool.stop()
            return result

        closed.addBoth(stopPool)
        return closed


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build the service tree for parsed L{Options}.

    Opening the device happens here, before twistd drops privileges
    (C{--uid}); the image is created first if C{--size} asked for it.

    @param reactor: the reactor to listen with and to deliver the thread
        pool's results to; the global reactor if C{None}.
    @return: a L{MultiService} whose first child, named C{"device"}, is the
        L{BlockDeviceService}, followed by one
        L{StreamServerEndpointService
        <twisted.application.internet.StreamServerEndpointService>} per
        C{--listen}.
    @raise OSError: the image could not be created or opened after all.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor

    top = MultiService()
    device: IBlockDevice
    pool: ThreadPool | None = None
    if options["memory"] is not None:
        device = MemoryBlockDevice(options["memory"])
    else:
        if options["size"] is not None:
            create_image(options["image"], options["size"])
        maxThreads = min(IO_THREADS, options["max-queue-depth"])
        pool = ThreadPool(minthreads=1, maxthreads=maxThreads, name="nbd-io")
        device = FileBlockDevice(
            options["image"], read_only=options["read-only"], reactor=reactor, threadpool=pool
        )
    deviceService: Service = BlockDeviceService(device, pool)
    deviceService.setName("device")
    deviceService.setServiceParent(top)

    try:
        export = Export(
            options["name"],
            device,
            description=options["description"],
            read_only=options["read-only"],
        )
        factory = NBDServerFactory(
            ExportRegistry.of([export]),
            max_queue_depth=options["max-queue-depth"],
            max_bytes_in_flight=options["max-bytes-in-flight"],
        )
        for description in options["listen"]:
            strports.service(description, factory, reactor=reactor).setServiceParent(top)
    except BaseException:
        device.close()
        raise
    return top
