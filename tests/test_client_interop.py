# -*- test-case-name: tests.test_client_interop -*-
"""
The twisted-nbd client against other servers: nbdkit's memory plugin and
qemu-nbd serving a sparse raw image, each started as a subprocess on a free
port on 127.0.0.1.

Debian 12 ships nbdkit 1.32 and qemu-nbd 7.2, neither of which knows
extended headers: the client must fall back to structured replies.

A missing tool skips its tests, except with C{CI=true}, where it fails them.
Every wait is bounded, and every process is killed when its test ends.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from twisted_nbd.client import NBDClient, NBDHandshakeError, connect, list_exports
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO

pytestmark = pytest.mark.interop

LOOPBACK = "127.0.0.1"
MiB = 1 << 20
SIZE = 64 * MiB
#: How long a server may take to accept connections.
START_TIMEOUT = 20.0
#: How long it may take to exit after SIGTERM (then SIGKILL).
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 5
CMD_READ = 0
EINVAL = 22
REP_ERR_UNKNOWN = 0x80000006

_E = TypeVar("_E", bound=BaseException)


def _missing(what: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{what} is missing, and CI=true requires it")
    raise unittest.SkipTest(f"{what} is not installed")


def require_tool(name: str) -> str:
    """The path of C{name}; skip (or, in CI, fail) if it is not installed."""
    path = shutil.which(name)
    if path is None:
        _missing(f"the {name!r} program")
    return path


def tool_version(argv: list[str]) -> tuple[int, ...] | None:
    """The first C{X.Y[.Z]} in a program's C{--version} output."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=15, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", done.stdout + done.stderr)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        if not more:
            raise ConnectionError("closed")
        data += more
    return data


def nbd_ready(port: int) -> bool:
    """
    Whether an NBD server answers on C{port}: read its greeting, then leave
    politely with NBD_OPT_ABORT so it has nothing to complain about.
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2) as s:
            magic, second, flags = struct.unpack(">QQH", _recv_exactly(s, 18))
            if magic != 0x4E42444D41474943 or second != 0x49484156454F5054:
                raise AssertionError(f"port {port} does not greet like NBD")
            s.sendall(struct.pack(">I", flags & 3) + struct.pack(">QII", second, 2, 0))
            try:
                _recv_exactly(s, 20)
            except (OSError, ConnectionError):
                pass  # some servers close without the ACK
            return True
    except (OSError, ConnectionError):
        return False


class ServerProcess:
    """An NBD server subprocess on a free loopback port."""

    def __init__(self, command: Callable[[int], list[str]], workdir: Path) -> None:
        self.command = command
        self.log_path = workdir / "server.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait (bounded) until it accepts NBD connections."""
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self.command(self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # exited: maybe the port was taken meanwhile; try another
                if nbd_ready(self.port):
                    return
                time.sleep(0.05)
            else:
                self.stop()
                raise AssertionError(
                    f"{self.command(self.port)} did not listen within {START_TIMEOUT} s\n"
                    f"{self.log()}"
                )
        raise AssertionError(f"the server would not start:\n{self.log()}")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    @property
    def endpoint(self) -> str:
        return f"tcp:{LOOPBACK}:{self.port}"


async def failure_of(d: Deferred[Any], kind: type[_E]) -> _E:
    """Await C{d}, which must fail with C{kind}; the exception."""
    try:
        result = await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}, got the result {result!r}")


class InteropMixin:
    """
    The same checks against any server; subclasses say how to start it, the
    export's name, and from which version on it knows extended headers.
    """

    export_name = ""
    #: The first version with extended headers, and the version command.
    extended_since: tuple[int, ...] = ()
    version_command: list[str] = []
    server: ServerProcess

    def command(self, workdir: Path) -> Callable[[int], list[str]]:
        raise NotImplementedError

    def setUp(self) -> None:
        case: Any = self
        workdir = Path(tempfile.mkdtemp(prefix="nbd-client-interop-"))
        case.addCleanup(shutil.rmtree, workdir, True)
        self.server = ServerProcess(self.command(workdir), workdir)
        case.addCleanup(self.server.stop)
        self.server.start()

    async def open(self, **kwargs: Any) -> NBDClient:
        return await connect(reactor, self.server.endpoint, self.export_name, **kwargs)

    def assertFallback(self, client: NBDClient) -> None:
        """Old servers refuse extended headers: the client uses structured replies."""
        case: Any = self
        case.assertTrue(client.structured_replies)
        version = tool_version(self.version_command)
        if version is not None and version < self.extended_since:
            case.assertFalse(client.extended_headers)

    async def test_negotiate_write_read_flush(self) -> None:
        """Negotiation (falling back from extended headers), then I/O, then DISC."""
        case: Any = self
        client = await self.open()
        self.assertFallback(client)
        case.assertEqual(client.size, SIZE)
        case.assertIn("base:allocation", client.meta_contexts)
        case.assertFalse(client.read_only)
        blocks = {i: os.urandom(64 * 1024) for i in range(16)}
        await gatherResults([client.write(i * MiB, data) for i, data in blocks.items()])
        reads = await gatherResults([client.read(i * MiB, 64 * 1024) for i in blocks])
        case.assertEqual(reads, list(blocks.values()))
        if client.can_flush:
            await client.flush()
        if client.can_fua:
            await client.write(0, b"fua" * 100, fua=True)
            case.assertEqual(await client.read(0, 300), b"fua" * 100)
        if client.can_zero:
            await client.zero(MiB, 64 * 1024)
            case.assertEqual(await client.read(MiB, 64 * 1024), bytes(64 * 1024))
        if client.can_trim:
            await client.trim(2 * MiB, 64 * 1024)
        if client.can_df:
            case.assertEqual(await client.read(3 * MiB, 4096, df=True), blocks[3][:4096])
        await client.disconnect()

    async def test_block_status_sparse(self) -> None:
        """A never-written area is a hole that reads as zeroes; a written one is data."""
        case: Any = self
        client = await self.open()
        await client.write(0, b"\xaa" * 65536)
        tail = SIZE - 32 * MiB
        status = await client.block_status(32 * MiB, tail)
        [extent, *_] = status["base:allocation"]
        case.assertEqual(extent.flags & (STATE_HOLE | STATE_ZERO), STATE_HOLE | STATE_ZERO)
        case.assertLessEqual(extent.length, tail)
        case.assertEqual(await client.read(32 * MiB, 4096), bytes(4096))
        status = await client.block_status(0, 65536, req_one=True)
        [written] = status["base:allocation"]
        case.assertEqual(written.flags & STATE_ZERO, 0)
        await client.disconnect()

    async def test_simple_replies(self) -> None:
        """structured_replies=False: simple replies still carry the data."""
        case: Any = self
        client = await self.open(structured_replies=False)
        case.assertFalse(client.structured_replies or client.extended_headers)
        await client.write(4096, b"simple")
        case.assertEqual(await client.read(4096, 6), b"simple")
        await client.disconnect()

    async def test_error_errno(self) -> None:
        """An out-of-range read sent with request() fails with EINVAL."""
        case: Any = self
        for structured in (True, False):
            client = await self.open(structured_replies=structured)
            error = await failure_of(client.request(CMD_READ, SIZE, 4096), NBDError)
            case.assertEqual(error.errno, EINVAL)
            case.assertEqual(await client.read(0, 4), await client.read(0, 4))
            await client.disconnect()

    async def test_list_and_unknown_export(self) -> None:
        """NBD_OPT_LIST shows the export; an unknown one is refused with ERR_UNKNOWN."""
        case: Any = self
        exports = await list_exports(reactor, self.server.endpoint)
        case.assertIn(self.export_name, [name for name, _ in exports])
        error = await failure_of(
            Deferred.fromCoroutine(connect(reactor, self.server.endpoint, "no-such-export")),
            NBDHandshakeError,
        )
        case.assertEqual(error.reply, REP_ERR_UNKNOWN)


class NbdkitTests(InteropMixin, TestCase):
    """nbdkit's memory plugin (64 MiB)."""

    timeout = 120
    export_name = ""
    extended_since = (1, 36)

    def command(self, workdir: Path) -> Callable[[int], list[str]]:
        nbdkit = require_tool("nbdkit")
        self.version_command = [nbdkit, "--version"]
        return lambda port: [
            nbdkit,
            "-f",
            "--exit-with-parent",
            "-p",
            str(port),
            "-i",
            LOOPBACK,
            "memory",
            "64M",
        ]

    async def test_list_and_unknown_export(self) -> None:
        """
        nbdkit lists its one export under the empty name and, unlike qemu-nbd,
        serves it whatever name a client asks for (the memory plugin ignores
        names), so there is no unknown export to be refused.
        """
        exports = await list_exports(reactor, self.server.endpoint)
        self.assertEqual([name for name, _ in exports], [""])
        client = await connect(reactor, self.server.endpoint, "any-name")
        self.assertEqual(client.size, SIZE)
        await client.disconnect()


class QemuNbdTests(InteropMixin, TestCase):
    """qemu-nbd serving a sparse 64 MiB raw image under the name "disk"."""

    timeout = 120
    export_name = "disk"
    extended_since = (8, 2)

    def command(self, workdir: Path) -> Callable[[int], list[str]]:
        qemu_nbd = require_tool("qemu-nbd")
        self.version_command = [qemu_nbd, "--version"]
        image = workdir / "image.raw"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        return lambda port: [
            qemu_nbd,
            "-f",
            "raw",
            "-b",
            LOOPBACK,
            "-p",
            str(port),
            "-x",
            self.export_name,
            "--persistent",
            "--shared=8",
            "--discard=unmap",
            str(image),
        ]
