"""
Tests for L{twisted_nbd.tap}: option parsing, the service tree, and how
C{twistd nbd} reports mistakes.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase as _TrialTestCase

from twisted_nbd.backends.file import FileBlockDevice
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import MAX_STRING
from twisted_nbd.limits import Limits
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.service import BlockDeviceService, NBDService
from twisted_nbd.tap import (
    DEFAULT_LISTEN,
    MAX_SIZE,
    Options,
    makeService,
    parse_size,
)
from twisted_nbd.testing import ControllableBlockDevice

REPO = Path(__file__).resolve().parent.parent

#: Run twistd with this interpreter; twisted.scripts.twistd has no __main__.
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]

#: Only a guard against a hung child; nothing here depends on speed.
SUBPROCESS_TIMEOUT = 120

MiB = 1024 * 1024

#: Every option of C{twistd nbd}; the usage text must document each.
ALL_OPTIONS = [
    "--image",
    "--size",
    "--memory",
    "--name",
    "--description",
    "--read-only",
    "--listen",
    "--max-queue-depth",
    "--max-bytes-in-flight",
    "--shutdown-timeout",
    "--config",
    "--min-block",
    "--preferred-block",
    "--max-block",
    "--workers",
    "--poll-max",
    "--handshake-timeout",
    "--idle-timeout",
    "--max-connections",
    "--max-negotiating",
    "--allow",
]

GOOD_SIZES = [
    ("1", 1),
    ("512", 512),
    ("512B", 512),
    ("4k", 4096),
    ("4K", 4096),
    ("4KiB", 4096),
    ("512M", 512 * MiB),
    ("512MiB", 512 * MiB),
    ("512mib", 512 * MiB),
    ("1G", 1 << 30),
    ("1GiB", 1 << 30),
    ("1g", 1 << 30),
    ("2T", 2 << 40),
    ("2TiB", 2 << 40),
    ("1P", 1 << 50),
    (" 10 G ", 10 << 30),
    ("8191P", 8191 << 50),
]

BAD_SIZES = [
    ("", "is not a size"),
    ("G", "is not a size"),
    ("abc", "is not a size"),
    ("1.5G", "is not a size"),
    ("1X", "is not a size"),
    ("0x10", "is not a size"),
    ("1 G B", "is not a size"),
    ("0", "greater than zero"),
    ("0G", "greater than zero"),
    ("-1", "greater than zero"),
    ("-5G", "greater than zero"),
    ("1GB", "ambiguous"),
    ("10mb", "ambiguous"),
    ("8192P", "too large"),
    (str(2**63), "too large"),
]


class TestCase(_TrialTestCase):
    """
    A trial test case whose L{mktemp} paths live in a fresh system temporary
    directory, removed after the test, whatever directory pytest runs in.
    """

    def mktemp(self) -> str:
        """Return a path that does not exist yet, in a new private directory."""
        base = tempfile.mkdtemp(prefix="twisted-nbd-test-")
        self.addCleanup(shutil.rmtree, base, True)
        return os.path.join(base, "temp")


def parse(*argv: str) -> Options:
    """Parse C{argv} with a fresh L{Options} and return it."""
    options = Options()
    options.parseOptions(list(argv))
    return options


def run_twistd(*argv: str, cwd: str) -> subprocess.CompletedProcess[str]:
    """
    Run twistd from this interpreter with the repository importable, and
    return the finished process with its output as text.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*TWISTD, *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


class ParseSizeTests(TestCase):
    """
    Tests for L{parse_size}.
    """

    def test_good_sizes(self) -> None:
        """
        Plain numbers are bytes; K, M, G, T and P (any case, with or without
        iB) are powers of 1024; surrounding spaces are ignored.
        """
        for text, expected in GOOD_SIZES:
            self.assertEqual(parse_size(text), expected, text)

    def test_largest(self) -> None:
        """
        L{MAX_SIZE} itself is accepted, one byte more is not.
        """
        self.assertEqual(parse_size(str(MAX_SIZE)), MAX_SIZE)
        self.assertRaises(ValueError, parse_size, str(MAX_SIZE + 1))

    def test_bad_sizes(self) -> None:
        """
        Garbage, fractions, zero, negative numbers, decimal units and sizes
        past L{MAX_SIZE} raise L{ValueError} with a one-line explanation
        that quotes the input.
        """
        for text, reason in BAD_SIZES:
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_size(text)
            message = str(caught.exception)
            self.assertIn(reason, message, text)
            self.assertIn(repr(text), message)
            self.assertNotIn("\n", message)


class OptionsTests(TestCase):
    """
    Tests for L{Options}: what each option does.
    """

    def image(self, size: int = MiB) -> str:
        """Create a file of C{size} bytes and return its path."""
        path: str = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def test_defaults(self) -> None:
        """
        With only C{--memory}, everything else has its documented default.
        """
        options = parse("--memory", "1M")
        self.assertEqual(options["memory"], MiB)
        self.assertIsNone(options["image"])
        self.assertIsNone(options["size"])
        self.assertEqual(options["name"], "")
        self.assertEqual(options["description"], "")
        self.assertFalse(options["read-only"])
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(DEFAULT_LISTEN, "tcp:10809")
        self.assertEqual(options["max-queue-depth"], 64)
        self.assertEqual(options["max-bytes-in-flight"], 8 * MiB)

    def test_memory(self) -> None:
        """
        C{--memory} and C{-m} take a size.
        """
        self.assertEqual(parse("--memory", "2G")["memory"], 2 << 30)
        self.assertEqual(parse("-m", "16M")["memory"], 16 * MiB)

    def test_image_existing(self) -> None:
        """
        C{--image} accepts an existing file and stores its absolute path.
        """
        path = self.image()
        options = parse("--image", os.path.relpath(path))
        self.assertEqual(options["image"], os.path.abspath(path))
        self.assertIsNone(options["memory"])
        self.assertEqual(parse("-i", path)["image"], os.path.abspath(path))

    def test_image_size_missing_file(self) -> None:
        """
        C{--size} with an image that does not exist yet is accepted; parsing
        does not create the file.
        """
        path = self.mktemp()
        options = parse("--image", path, "--size", "10G")
        self.assertEqual(options["size"], 10 << 30)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(parse("-i", path, "-s", "1M")["size"], MiB)

    def test_image_size_matching(self) -> None:
        """
        C{--size} with an existing image of that very size is accepted, so
        the same command line works again after the first run.
        """
        path = self.image(4 * MiB)
        self.assertEqual(parse("--image", path, "--size", "4M")["size"], 4 * MiB)

    def test_name_and_description(self) -> None:
        """
        C{--name} and C{--description} are kept as given.
        """
        options = parse("--memory", "1M", "--name", "disk", "--description", "a test disk")
        self.assertEqual(options["name"], "disk")
        self.assertEqual(options["description"], "a test disk")

    def test_read_only(self) -> None:
        """
        C{--read-only} and C{-r} set the flag.
        """
        self.assertTrue(parse("--memory", "1M", "--read-only")["read-only"])
        self.assertTrue(parse("--memory", "1M", "-r")["read-only"])

    def test_read_only_image(self) -> None:
        """
        With C{--read-only}, an image that can only be read is accepted.
        """
        path = self.image()
        os.chmod(path, 0o444)
        self.assertTrue(parse("--image", path, "--read-only")["read-only"])

    def test_listen_repeated(self) -> None:
        """
        C{--listen} (or C{-l}) may be repeated; the endpoints are kept in
        order and replace the default.
        """
        options = parse(
            "--memory",
            "1M",
            "--listen",
            "tcp:10809:interface=127.0.0.1",
            "-l",
            "tcp6:10809:interface=\\:\\:1",
            "--listen",
            "unix:/tmp/nbd.sock",
        )
        self.assertEqual(
            options["listen"],
            ["tcp:10809:interface=127.0.0.1", "tcp6:10809:interface=\\:\\:1", "unix:/tmp/nbd.sock"],
        )

    def test_limits(self) -> None:
        """
        C{--max-queue-depth} takes a whole number, C{--max-bytes-in-flight}
        a size.
        """
        options = parse("--memory", "1M", "--max-queue-depth", "8", "--max-bytes-in-flight", "1M")
        self.assertEqual(options["max-queue-depth"], 8)
        self.assertEqual(options["max-bytes-in-flight"], MiB)

    def test_sizes_everywhere(self) -> None:
        """
        Every size option understands the same forms as L{parse_size}.
        """
        path = self.mktemp()
        for text, expected in GOOD_SIZES:
            self.assertEqual(parse("--memory", text)["memory"], expected, text)
            self.assertEqual(parse("--image", path, "--size", text)["size"], expected, text)
            options = parse("--memory", "1M", "--max-bytes-in-flight", text)
            self.assertEqual(options["max-bytes-in-flight"], expected, text)

    def test_help_mentions_every_option(self) -> None:
        """
        The usage text documents every option and gives examples.
        """
        text = str(Options())
        for option in ALL_OPTIONS:
            self.assertIn(option, text)
        self.assertIn("Examples:", text)
        self.assertIn("twistd -n nbd --memory 1G", text)
        self.assertIn("[default: tcp:10809]", text)


class UsageErrorMixin(_TrialTestCase):
    """Checks that parsing fails with a one-line L{UsageError}."""

    def assert_usage_error(self, argv: list[str], *fragments: str) -> str:
        """
        Parsing C{argv} raises L{UsageError} whose message is one line and
        contains every fragment.

        @return: the message.
        """
        with self.assertRaises(UsageError, msg=repr(argv)) as caught:
            parse(*argv)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message, repr(argv))
        return message


class BadUsageTests(UsageErrorMixin, TestCase):
    """
    Every mistake raises L{UsageError} with a clear one-line message while
    parsing, so twistd reports it without a traceback.
    """

    def test_nothing_to_serve(self) -> None:
        """
        Neither C{--image} nor C{--memory} is an error that names both.
        """
        self.assert_usage_error([], "--image", "--memory")
        self.assert_usage_error(["--name", "x"], "--image", "--memory")

    def test_image_and_memory(self) -> None:
        """
        C{--image} and C{--memory} together are refused.
        """
        self.assert_usage_error(["--image", self.mktemp(), "--memory", "1M"], "together")

    def test_size_with_memory(self) -> None:
        """
        C{--size} belongs to C{--image} only.
        """
        self.assert_usage_error(["--memory", "1M", "--size", "1M"], "--size")

    def test_bad_sizes(self) -> None:
        """
        A bad size for any size option names the option and the reason.
        """
        for text, reason in BAD_SIZES:
            self.assert_usage_error(["--memory", text], "--memory", reason)
            self.assert_usage_error(["--image", self.mktemp(), "--size", text], "--size", reason)
            self.assert_usage_error(
                ["--memory", "1M", "--max-bytes-in-flight", text], "--max-bytes-in-flight", reason
            )

    def test_bad_queue_depth(self) -> None:
        """
        C{--max-queue-depth} must be a whole number of at least 1.
        """
        for text in ["0", "-1"]:
            self.assert_usage_error(["--memory", "1M", "--max-queue-depth", text], "at least 1")
        for text in ["", "x", "1.5", "4K"]:
            self.assert_usage_error(
                ["--memory", "1M", "--max-queue-depth", text], "not a whole number"
            )

    def test_image_missing(self) -> None:
        """
        An image that does not exist, without C{--size}, is an error that
        suggests C{--size}.
        """
        path = os.path.abspath(self.mktemp())
        self.assert_usage_error(["--image", path], path, "does not exist", "--size")

    def test_image_empty_path(self) -> None:
        """
        An empty C{--image} is refused.
        """
        self.assert_usage_error(["--image", ""], "--image")

    def test_image_directory(self) -> None:
        """
        A directory is not an image, with or without C{--read-only}.
        """
        path = self.mktemp()
        os.mkdir(path)
        self.assert_usage_error(["--image", path], "is a directory")
        self.assert_usage_error(["--image", path, "--read-only"], "is a directory")

    def test_image_not_a_file(self) -> None:
        """
        A FIFO is neither a regular file nor a block device (and opening it
        would block).
        """
        path = self.mktemp()
        os.mkfifo(path)
        self.assert_usage_error(["--image", path], "neither a regular file nor a block device")

    def test_image_unreadable(self) -> None:
        """
        An image whose permissions forbid reading is refused, naming the
        reason.
        """
        if os.geteuid() != 0:
            path = self.mktemp()
            Path(path).write_bytes(b"\0" * 512)
            os.chmod(path, 0)
            self.assert_usage_error(["--image", path, "--read-only"], "cannot be read")
            return
        # Root reads anything because it has CAP_DAC_OVERRIDE (and
        # CAP_DAC_READ_SEARCH): check in a child process that has them dropped
        # (util-linux's setpriv), so real permissions apply, not a simulation.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            self.fail("setpriv (util-linux) is needed to test permissions as root")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "unreadable.img")
        Path(path).write_bytes(b"\0" * 512)
        os.chmod(path, 0)
        code = (
            "import sys\n"
            "from twisted.python.usage import UsageError\n"
            "from twisted_nbd.tap import Options\n"
            "try:\n"
            "    Options().parseOptions(['--image', sys.argv[1], '--read-only'])\n"
            "except UsageError as e:\n"
            "    print(e)\n"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        result = subprocess.run(
            [
                setpriv,
                "--bounding-set",
                "-dac_override,-dac_read_search",
                "--",
                sys.executable,
                "-c",
                code,
                path,
            ],
            env=env,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("cannot be read", result.stdout)

    def test_image_open_fails(self) -> None:
        """
        An image the system refuses to open is refused: for reading, and for
        writing with a hint about C{--read-only}. (The refusal is simulated so
        that the test also means something when run as root.)
        """
        path = self.mktemp()
        Path(path).write_bytes(b"\0" * 512)
        real_open = os.open

        def refusing_open(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if name == os.path.abspath(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
            return real_open(name, flags, *args, **kwargs)

        self.patch(os, "open", refusing_open)
        self.assert_usage_error(["--image", path], "cannot be opened for writing", "--read-only")
        self.assert_usage_error(["--image", path, "--read-only"], "cannot be read")

    def test_image_size_mismatch(self) -> None:
        """
        An existing image whose size differs from C{--size} is refused
        rather than silently resized or served at the wrong size.
        """
        path = self.mktemp()
        Path(path).write_bytes(b"\0" * 512)
        self.assert_usage_error(["--image", path, "--size", "1M"], "already exists", "512")

    def test_image_parent_missing(self) -> None:
        """
        With C{--size}, an image whose directory does not exist cannot be
        created.
        """
        path = os.path.join(self.mktemp(), "disk.img")
        self.assert_usage_error(["--image", path, "--size", "1M"], "cannot be created")

    def test_name_checks(self) -> None:
        """
        Names and descriptions longer than the protocol allows, or holding a
        NUL, are refused.
        """
        too_long = "x" * (MAX_STRING + 1)
        self.assert_usage_error(["--memory", "1M", "--name", too_long], "--name", str(MAX_STRING))
        self.assert_usage_error(["--memory", "1M", "--description", too_long], "--description")
        self.assert_usage_error(["--memory", "1M", "--name", "a\0b"], "NUL")
        parse("--memory", "1M", "--name", "x" * MAX_STRING)

    def test_bad_endpoints(self) -> None:
        """
        A C{--listen} that is not a server endpoint is refused, quoting it.
        """
        for description in [
            "bogus:1",
            "tcp:abc",
            "tcp:1:bogus=2",
            "tcp6:port=notaport",
            "systemd:domain=INET:index=0",
            "",
        ]:
            self.assert_usage_error(
                ["--memory", "1M", "--listen", description], "--listen", repr(description)
            )

    def test_duplicate_endpoint(self) -> None:
        """
        The same endpoint twice is refused (the second could never listen).
        """
        self.assert_usage_error(
            ["--memory", "1M", "--listen", "tcp:1", "--listen", "tcp:1"], "twice"
        )

    def test_unknown_option(self) -> None:
        """
        Unknown options are usage errors too.
        """
        with self.assertRaises(UsageError):
            parse("--memory", "1M", "--no-such-option")


class _SlowClosingDevice(ControllableBlockDevice):
    """
    A device whose C{close} returns a Deferred the test fires by hand.
    """

    def __init__(self) -> None:
        super().__init__(MiB)
        self.closing: Deferred[None] | None = None

    def close(self) -> Deferred[None]:
        self.closing = Deferred()
        return self.closing


class MakeServiceTests(TestCase):
    """
    Tests for L{makeService} and L{BlockDeviceService}.
    """

    def build(self, *argv: str) -> tuple[MultiService, MemoryReactorClock]:
        """
        Parse C{argv} and build the service with a memory reactor.
        """
        reactor = MemoryReactorClock()
        return makeService(parse(*argv), reactor=reactor), reactor

    def listeners(self, service: MultiService) -> list[StreamServerEndpointService]:
        """The listening services among C{service}'s children."""
        return [s for s in service if isinstance(s, StreamServerEndpointService)]

    def test_memory_tree(self) -> None:
        """
        The service is a L{MultiService}: first the device service, named
        C{"device"}, then one listener per C{--listen}, all sharing one
        L{NBDServerFactory}.
        """
        service, _ = self.build(
            "--memory", "1M", "--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0"
        )
        self.assertIsInstance(service, MultiService)
        children = list(service)
        self.assertEqual(len(children), 3)
        self.assertIs(children[0], service.getServiceNamed("device"))
        self.assertIsInstance(children[0], BlockDeviceService)
        listeners = self.listeners(service)
        self.assertEqual(len(listeners), 2)
        self.assertIsInstance(listeners[0].factory, NBDServerFactory)
        self.assertIs(listeners[0].factory, listeners[1].factory)

    def test_export(self) -> None:
        """
        The factory serves one export, the default, with the name,
        description, read-only flag and limits from the options.
        """
        service, _ = self.build(
            "--memory",
            "2M",
            "--name",
            "disk",
            "--description",
            "a disk",
            "--read-only",
            "--max-queue-depth",
            "5",
            "--max-bytes-in-flight",
            "3M",
        )
        factory = self.listeners(service)[0].factory
        assert isinstance(factory, NBDServerFactory)
        self.assertEqual(factory.max_queue_depth, 5)
        self.assertEqual(factory.max_bytes_in_flight, 3 * MiB)
        registry = factory.registry
        self.assertEqual(len(registry), 1)
        export = registry.lookup("")
        assert export is not None
        self.assertIs(registry.lookup("disk"), export)
        self.assertEqual(export.name, "disk")
        self.assertEqual(export.description, "a disk")
        self.assertTrue(export.read_only)
        self.assertEqual(export.size, 2 * MiB)
        self.assertFalse(export.capabilities.can_write)
        self.assertIsInstance(export.device, MappedMemoryDevice)

    def test_listens(self) -> None:
        """
        Starting the service listens on every endpoint with the given
        reactor; the default is port 10809 on every interface.
        """
        service, reactor = self.build("--memory", "1M")
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(reactor.tcpServers), 1)
        port, factory, _, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (10809, ""))
        self.assertIsInstance(factory, NBDServerFactory)

        service, reactor = self.build(
            "--memory", "1M", "--listen", "tcp:1234:interface=127.0.0.1", "--listen", "unix:x.sock"
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(s[0], s[3]) for s in reactor.tcpServers], [(1234, "127.0.0.1")])
        self.assertEqual([s[0] for s in reactor.unixServers], ["x.sock"])

    def test_image_created(self) -> Deferred[Any]:
        """
        With C{--size}, the missing image is created as a sparse file of
        that size and served through a L{FileBlockDevice} and a thread pool
        that runs while the service runs; stopping the service closes the
        device and stops the pool.
        """
        path = self.mktemp()
        service, reactor = self.build(
            "--image", path, "--size", "1G", "--listen", "tcp:0:interface=127.0.0.1"
        )
        self.assertEqual(os.stat(path).st_size, 1 << 30)
        self.assertLess(os.stat(path).st_blocks * 512, 1 << 30)

        device_service = service.getServiceNamed("device")
        assert isinstance(device_service, BlockDeviceService)
        device = device_service.devices[0]
        self.assertIsInstance(device, FileBlockDevice)
        self.assertEqual(device.size, 1 << 30)
        pool = device_service.pool
        assert pool is not None
        self.assertEqual(pool.name, "nbd-io")
        self.assertFalse(pool.started)

        service.startService()
        self.assertTrue(pool.started)
        self.successResultOf(service.stopService())
        self.assertFalse(pool.started)
        # The device is closed: requests fail with ESHUTDOWN.
        read: Deferred[Any] = device.read(0, 1)
        return self.assertFailure(read, NBDError)

    def test_image_read_only(self) -> None:
        """
        C{--read-only} opens the image read-only.
        """
        path = self.mktemp()
        Path(path).write_bytes(b"\0" * 4096)
        os.chmod(path, 0o444)
        service, _ = self.build("--image", path, "--read-only")
        device_service = service.getServiceNamed("device")
        assert isinstance(device_service, BlockDeviceService)
        self.addCleanup(device_service.devices[0].close)
        self.assertFalse(device_service.devices[0].capabilities.can_write)

    def test_memory_has_no_pool(self) -> None:
        """
        A memory device needs no thread pool.
        """
        service, _ = self.build("--memory", "1M")
        device_service = service.getServiceNamed("device")
        assert isinstance(device_service, BlockDeviceService)
        self.assertIsNone(device_service.pool)

    def test_stop_closes_device(self) -> None:
        """
        Stopping the service closes the device.
        """
        device = ControllableBlockDevice(MiB)
        service = BlockDeviceService([device])
        service.startService()
        self.successResultOf(service.stopService())
        self.assertTrue(device.closed)
        self.assertFalse(service.running)

    def test_pool_stops_after_close(self) -> None:
        """
        The pool keeps running until the device has closed, since closing
        waits for requests that run in the pool.
        """
        device = _SlowClosingDevice()
        pool = ThreadPool(minthreads=0, maxthreads=1, name="test")
        service = BlockDeviceService([device], pool)
        self.assertTrue(IService.providedBy(service))
        service.startService()
        self.addCleanup(lambda: pool.stop() if pool.started else None)
        self.assertTrue(pool.started)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertTrue(pool.started)
        assert device.closing is not None
        device.closing.callback(None)
        self.successResultOf(stopped)
        self.assertFalse(pool.started)

    def test_no_reactor_import(self) -> None:
        """
        Importing L{twisted_nbd.tap} does not import (and so install) the
        global reactor; twistd installs the one the user chose later.
        """
        code = "import sys, twisted_nbd.tap; print('twisted.internet.reactor' in sys.modules)"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
        )
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "False"), result.stderr)


class TwistdTests(TestCase):
    """
    C{twistd nbd} run for real, in a child process.
    """

    def assert_one_line_error(
        self, result: subprocess.CompletedProcess[str], fragment: str
    ) -> None:
        """
        twistd failed, said why in exactly one line (its last), and printed
        no traceback.
        """
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if fragment in line]
        self.assertEqual(len(lines), 1, output)
        self.assertEqual(output.strip().splitlines()[-1], lines[0])

    def test_nonexistent_image(self) -> None:
        """
        C{twistd -n nbd --image /nonexistent} exits non-zero with one line
        saying the image does not exist.
        """
        result = run_twistd("-n", "nbd", "--image", "/nonexistent", cwd=self.mktemp_dir())
        self.assert_one_line_error(result, "/nonexistent does not exist")

    def test_bad_size(self) -> None:
        """
        A bad size is reported the same way.
        """
        result = run_twistd("-n", "nbd", "--memory", "lots", cwd=self.mktemp_dir())
        self.assert_one_line_error(result, "'lots' is not a size")

    def test_bad_endpoint(self) -> None:
        """
        A bad endpoint is reported the same way.
        """
        result = run_twistd(
            "-n", "nbd", "--memory", "1M", "--listen", "tcp:nope", cwd=self.mktemp_dir()
        )
        self.assert_one_line_error(result, "'tcp:nope' is not a server endpoint")

    def test_help(self) -> None:
        """
        C{twistd nbd --help} succeeds and documents every option.
        """
        result = run_twistd("nbd", "--help", cwd=self.mktemp_dir())
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for option in ALL_OPTIONS:
            self.assertIn(option, result.stdout)
        self.assertIn("Examples:", result.stdout)

    def test_bad_config(self) -> None:
        """
        A config file with a mistake is reported in one line naming the
        file and the line.
        """
        cwd = self.mktemp_dir()
        path = os.path.join(cwd, "exports.toml")
        with open(path, "w") as f:
            f.write('[[export]]\nname = "a"\nimage = "missing.raw"\n')
        result = run_twistd("-n", "nbd", "--config", path, cwd=cwd)
        self.assert_one_line_error(result, f"{path}:3: export 'a': ")

    def mktemp_dir(self) -> str:
        """Make and return a new empty directory to run twistd in."""
        path: str = self.mktemp()
        os.mkdir(path)
        return path


class ConfigOptionTests(TestCase):
    """
    C{--config} (several exports from a TOML file) and the block size
    options.
    """

    def write_config(self, text: str) -> str:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "exports.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_config_exports(self) -> None:
        """
        Every export of the file is served by one factory, the default one
        for the empty name.
        """
        path = self.write_config(
            'default = "b"\n'
            '[[export]]\nname = "a"\nmemory = "1M"\ndescription = "first"\n'
            '[[export]]\nname = "b"\nimage = "b.raw"\nsize = "2M"\nread-only = false\n'
        )
        options = parse("--config", path, "--listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual([spec.name for spec in options.config.exports], ["a", "b"])
        service = makeService(options, MemoryReactorClock())
        device_service = service.getServiceNamed("device")
        assert isinstance(device_service, BlockDeviceService)
        for device in device_service.devices:
            self.addCleanup(device.close)
        listener = list(service)[1]
        assert isinstance(listener, StreamServerEndpointService)
        factory = listener.factory
        assert isinstance(factory, NBDServerFactory)
        registry = factory.registry
        self.assertEqual(sorted(e.name for e in registry), ["a", "b"])
        default = registry.lookup("")
        assert default is not None
        self.assertEqual((default.name, default.size), ("b", 2 * MiB))
        self.assertTrue(os.path.exists(os.path.join(os.path.dirname(path), "b.raw")))

    def test_config_excludes_single_export_options(self) -> None:
        """
        --config cannot be combined with options describing one export.
        """
        path = self.write_config('[[export]]\nname = "a"\nmemory = "1M"\n')
        for extra in (["--memory", "1M"], ["--read-only"], ["--name", "x"], ["--min-block", "512"]):
            with self.assertRaises(UsageError) as caught:
                parse("--config", path, *extra)
            self.assertIn(extra[0], str(caught.exception))

    def test_bad_config_file(self) -> None:
        """
        A config mistake becomes a one-line usage error naming file and line.
        """
        path = self.write_config('[[export]]\nname = "a"\nmemory = "lots"\n')
        with self.assertRaises(UsageError) as caught:
            parse("--config", path)
        self.assertIn(f"{path}:3:", str(caught.exception))

    def test_block_sizes(self) -> None:
        """
        --min-block, --preferred-block and --max-block reach the export.
        """
        options = parse(
            "--memory", "1M", "--min-block", "512", "--preferred-block", "8K", "--max-block", "1M"
        )
        [spec] = options.config.exports
        self.assertEqual((spec.min_block, spec.preferred_block, spec.max_block), (512, 8192, MiB))
        service = makeService(options, MemoryReactorClock())
        listener = list(service)[1]
        assert isinstance(listener, StreamServerEndpointService)
        assert isinstance(listener.factory, NBDServerFactory)
        export = listener.factory.registry.lookup("")
        assert export is not None
        caps = export.capabilities
        self.assertEqual((caps.min_block, caps.preferred_block, caps.max_block), (512, 8192, MiB))

    def test_bad_block_sizes(self) -> None:
        """
        Block sizes that break the protocol's rules are usage errors.
        """
        for argv in (["--min-block", "3000"], ["--preferred-block", "256"], ["--max-block", "1K"]):
            with self.assertRaises(UsageError) as caught:
                parse("--memory", "1M", *argv)
            self.assertIn("--min-block/--preferred-block/--max-block", str(caught.exception))


class ShutdownOrderTests(TestCase):
    """
    Stopping the service tree stops listening, drains the connections, and
    only then closes the devices (C-07).
    """

    def test_devices_close_after_connections(self) -> None:
        """
        The device service stops only once every connection is gone.
        """
        clock = MemoryReactorClock()
        options = parse("--memory", "1M", "--listen", "tcp:0:interface=127.0.0.1")
        service = makeService(options, clock)
        assert isinstance(service, NBDService)
        service.startService()
        proto = service.factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        stopped = service.stopService()
        self.assertTrue(transport.disconnecting)
        self.assertTrue(service.getServiceNamed("device").running)
        self.assertNoResult(stopped)
        proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertFalse(service.getServiceNamed("device").running)

    def test_shutdown_timeout_option(self) -> None:
        """
        --shutdown-timeout takes seconds; nonsense is a usage error.
        """
        self.assertEqual(parse("--memory", "1M")["shutdown-timeout"], 10.0)
        self.assertEqual(
            parse("--memory", "1M", "--shutdown-timeout", "2.5")["shutdown-timeout"], 2.5
        )
        for bad in ("soon", "-1", "nan", "inf"):
            with self.assertRaises(UsageError):
                parse("--memory", "1M", "--shutdown-timeout", bad)


class PerformanceOptionsTests(TestCase):
    """--workers and --poll-max."""

    def test_workers(self) -> None:
        self.assertEqual(parse("--memory", "1M").config.workers, 1)
        self.assertEqual(parse("--memory", "1M", "--workers", "4").config.workers, 4)
        for text in ("0", "-1", "x"):
            self.assertRaises(UsageError, parse, "--memory", "1M", "--workers", text)

    def test_poll_max(self) -> None:
        """Microseconds on the command line, seconds in the Config; 0 turns it off."""
        self.assertAlmostEqual(parse("--memory", "1M").config.poll_max, 100e-6)
        self.assertEqual(parse("--memory", "1M", "--poll-max", "0").config.poll_max, 0)
        self.assertAlmostEqual(parse("--memory", "1M", "--poll-max", "250").config.poll_max, 250e-6)
        for text in ("-1", "20000", "soon"):
            self.assertRaises(UsageError, parse, "--memory", "1M", "--poll-max", text)


class TLSOptionsTests(UsageErrorMixin, TestCase):
    """The --tls options: what they build, and one-line usage errors."""

    def setUp(self) -> None:
        from tests.tlsfiles import make_certificates

        self.pki = make_certificates(Path(tempfile.mkdtemp(prefix="nbd-tap-tls-")))
        self.addCleanup(shutil.rmtree, self.pki, True)

    def test_certificates_directory(self) -> None:
        """--tls-certificates alone turns TLS on with the directory's three files."""
        tls = parse("--memory", "1M", "--tls-certificates", str(self.pki)).config.tls
        self.assertEqual(tls.mode, "on")
        self.assertEqual(tls.cert, str(self.pki / "server-cert.pem"))
        self.assertEqual(tls.key, str(self.pki / "server-key.pem"))
        self.assertEqual(tls.ca, str(self.pki / "ca-cert.pem"))

    def test_require_verify_allow(self) -> None:
        """--tls require, --tls-verify-peer and --tls-allow-dn (repeated) are kept."""
        tls = parse(
            "--memory", "1M", "--tls", "require", "--tls-certificates", str(self.pki),
            "--tls-verify-peer", "--tls-allow-dn", "CN=a,*", "--tls-allow-dn", "CN=b,*",
        ).config.tls  # fmt: skip
        self.assertEqual(tls.mode, "require")
        self.assertTrue(tls.verify_peer)
        self.assertEqual(tls.allow_dns, ("CN=a,*", "CN=b,*"))

    def test_psk_file(self) -> None:
        """--tls-psk alone turns TLS on with pre-shared keys and no certificate."""
        from tests.tlsfiles import make_psk_file

        keys = self.pki / "keys.psk"
        make_psk_file(keys)
        tls = parse("--memory", "1M", "--tls-psk", str(keys)).config.tls
        self.assertEqual((tls.mode, tls.psk_file, tls.cert), ("on", str(keys), None))

    def test_bad_psk_file(self) -> None:
        """A malformed PSK file is a usage error naming the file and line."""
        keys = self.pki / "bad.psk"
        keys.write_text("alice:nothex\n")
        self.assert_usage_error(["--memory", "1M", "--tls-psk", str(keys)], "--tls-psk", "bad.psk")

    def test_off_by_default(self) -> None:
        """Without TLS options, TLS is off."""
        self.assertEqual(parse("--memory", "1M").config.tls.mode, "off")

    def test_bad_mode(self) -> None:
        self.assert_usage_error(["--memory", "1M", "--tls", "maybe"], "--tls", "require")

    def test_require_without_certificates(self) -> None:
        self.assert_usage_error(["--memory", "1M", "--tls", "require"], "certificate")

    def test_missing_certificate_file(self) -> None:
        self.assert_usage_error(
            ["--memory", "1M", "--tls-cert", "/nonexistent.pem", "--tls-key", "/none.pem"],
            "/nonexistent.pem",
        )

    def test_not_a_certificate(self) -> None:
        """A file that is not PEM fails at start-up, not at the first client."""
        bad = self.pki / "bad.pem"
        bad.write_text("not a certificate\n")
        self.assert_usage_error(
            [
                "--memory",
                "1M",
                "--tls-cert",
                str(bad),
                "--tls-key",
                str(self.pki / "server-key.pem"),
            ],
            "does not load",
        )

    def test_verify_without_ca(self) -> None:
        cert, key = self.pki / "server-cert.pem", self.pki / "server-key.pem"
        self.assert_usage_error(
            ["--memory", "1M", "--tls-cert", str(cert), "--tls-key", str(key), "--tls-verify-peer"],
            "--tls-ca",
        )

    def test_allow_dn_without_verify(self) -> None:
        self.assert_usage_error(
            ["--memory", "1M", "--tls-certificates", str(self.pki), "--tls-allow-dn", "CN=a"],
            "--tls-verify-peer",
        )

    def test_tls_options_with_tls_off(self) -> None:
        self.assert_usage_error(
            ["--memory", "1M", "--tls", "off", "--tls-certificates", str(self.pki)],
            "--tls-certificates",
        )


class LimitOptionsTests(TestCase):
    """--handshake-timeout, --idle-timeout, --max-connections, --max-negotiating, --allow."""

    def test_defaults(self) -> None:
        """Without options, the safe defaults of L{Limits}."""
        self.assertEqual(parse("--memory", "1M").config.limits, Limits())

    def test_values(self) -> None:
        options = parse(
            "--memory",
            "1M",
            "--handshake-timeout",
            "2.5",
            "--idle-timeout",
            "60",
            "--max-connections",
            "5",
            "--max-negotiating",
            "0",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "2001:db8::/32",
        )
        self.assertEqual(
            options.config.limits,
            Limits(2.5, 60.0, 5, 0, ("10.0.0.0/8", "2001:db8::/32")),
        )

    def test_mistakes(self) -> None:
        """Each mistake is a one-line usage error naming the option."""
        for argv, fragment in [
            (["--handshake-timeout", "soon"], "--handshake-timeout: 'soon' is not a number"),
            (["--handshake-timeout", "-1"], "--handshake-timeout must be zero"),
            (["--idle-timeout", "inf"], "--idle-timeout must be zero"),
            (["--max-connections", "-1"], "--max-connections must be at least 0"),
            (["--max-negotiating", "many"], "--max-negotiating: 'many' is not a whole number"),
            (["--allow", "10.1.2.3/8"], "--allow: '10.1.2.3/8' has host bits set"),
            (["--allow", "localhost"], "--allow: 'localhost' is not an address or network"),
        ]:
            with self.assertRaises(UsageError, msg=repr(argv)) as caught:
                parse("--memory", "1M", *argv)
            self.assertIn(fragment, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_config_file_then_command_line(self) -> None:
        """
        A [limits] table in --config applies; an option given on the command
        line wins over it, one setting at a time.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "exports.toml")
        with open(path, "w") as f:
            f.write(
                '[[export]]\nname = "a"\nmemory = "1M"\n'
                '[limits]\nmax-connections = 7\nidle-timeout = 30\nallow = ["10.0.0.0/8"]\n'
            )
        limits = parse("--config", path).config.limits
        self.assertEqual(
            limits, Limits(idle_timeout=30.0, max_connections=7, allow=("10.0.0.0/8",))
        )
        limits = parse("--config", path, "--max-connections", "9", "--allow", "::1").config.limits
        self.assertEqual(limits, Limits(idle_timeout=30.0, max_connections=9, allow=("::1/128",)))

    def test_factory_gets_them(self) -> None:
        """The service's factory applies the parsed limits."""
        options = parse("--memory", "1M", "--max-connections", "3", "--listen", "tcp:0")
        service = makeService(options, MemoryReactorClock())
        [factory] = {s.factory for s in service if isinstance(s, StreamServerEndpointService)}
        assert isinstance(factory, NBDServerFactory)
        self.assertEqual(factory.limits, Limits(max_connections=3))
