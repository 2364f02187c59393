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
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.interop.helpers import LOOPBACK, NBDServer, require_tool
from twisted_nbd.client import NBDClient, NBDHandshakeError, connect, list_exports
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB
CMD_READ = 0
EINVAL = 22
REP_ERR_UNKNOWN = 0x80000006

_E = TypeVar("_E", bound=BaseException)


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
    server: NBDServer

    def command(self, workdir: Path) -> Callable[[int], list[str]]:
        raise NotImplementedError

    def setUp(self) -> None:
        case: Any = self
        workdir = Path(tempfile.mkdtemp(prefix="nbd-client-interop-"))
        case.addCleanup(shutil.rmtree, workdir, True)
        self.server = NBDServer([], workdir, command=self.command(workdir))
        case.addCleanup(self.server.stop)
        self.server.start()

    async def open(self, **kwargs: Any) -> NBDClient:
        return await connect(reactor, self.server.endpoint, self.export_name, **kwargs)

    def assert_fallback(self, client: NBDClient) -> None:
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
        self.assert_fallback(client)
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
            connect(reactor, self.server.endpoint, "no-such-export"),
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
