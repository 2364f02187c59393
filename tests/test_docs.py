# -*- test-case-name: tests.test_docs -*-
"""
The examples of the documentation run, and the pages show them as they are.

Each example under C{docs/examples/} builds a service tree from a reactor
and a listening endpoint; here it is built on a free loopback port,
started, used by the Twisted client, and stopped.

A page shows an example file with a marker line right before the code
block: C{<!-- example: docs/examples/NAME.py -->} when the block is the
whole file, C{<!-- excerpt: docs/examples/NAME.py -->} when it is a run of
whole lines from it. L{PagesTests} checks every marker.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from docs.examples import embed_options, embed_pieces, embed_service, observer
from tests.test_compose import bound_port
from twisted_nbd.client import NBDClient, connect
from twisted_nbd.constants import Errno
from twisted_nbd.events import ReadRequest
from twisted_nbd.observers import ConnectionInfo
from twisted_nbd.service import BlockDeviceService, NBDService

REPO = Path(__file__).resolve().parents[1]
LISTEN = "tcp:0:interface=127.0.0.1"
MiB = 1 << 20

#: The examples shown whole, each with the page that shows it.
SHOWN_WHOLE = {
    "docs/examples/embed_service.py": "docs/usage.md",
    "docs/examples/embed_options.py": "docs/usage.md",
    "docs/examples/embed_pieces.py": "docs/usage.md",
    "docs/examples/observer.py": "docs/usage.md",
}

_MARKER = re.compile(r"^<!-- (?:example|excerpt):", re.MULTILINE)
_MARKED_BLOCK = re.compile(
    r"^<!-- (example|excerpt): (\S+) -->\n```[a-z]*\n(.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def listeners(service: IService) -> list[StreamServerEndpointService]:
    """The listening services anywhere in a service tree."""
    if isinstance(service, StreamServerEndpointService):
        return [service]
    found: list[StreamServerEndpointService] = []
    if isinstance(service, MultiService):
        for child in service:
            found.extend(listeners(child))
    return found


class ExampleTests(TestCase):
    """Every example's service tree serves a real client on loopback."""

    async def start(self, service: IService) -> str:
        """
        Start C{service}, stopping it when the test ends if the test does
        not.

        @return: the client endpoint of its one listener.
        """
        service.startService()

        def stop() -> Deferred[None] | None:
            return service.stopService() if service.running else None

        self.addCleanup(stop)
        [listener] = listeners(service)
        port = await bound_port(listener)
        return f"tcp:127.0.0.1:{port}"

    async def write_and_read(self, endpoint: str, name: str = "") -> NBDClient:
        """Write a block to export C{name}, read it back, and disconnect."""
        client = await connect(reactor, endpoint, name)
        block = bytes(range(256)) * 16
        await client.write(4096, block)
        await client.flush()
        self.assertEqual(await client.read(4096, len(block)), block)
        await client.disconnect()
        return client

    async def stop(self, service: IService) -> None:
        """Stop C{service}: it stops listening, drains, and closes its devices."""
        await service.stopService()
        self.assertFalse(service.running)

    async def test_embed_service(self) -> None:
        """build(Config(...)) serves both exports; the empty name is the default one."""
        service = embed_service.make_service(reactor, LISTEN)
        self.assertIsInstance(service, NBDService)
        endpoint = await self.start(service)
        client = await self.write_and_read(endpoint)
        self.assertEqual((client.export_name, client.size), ("disk", 64 * MiB))
        iso = await connect(reactor, endpoint, "iso")
        self.assertTrue(iso.read_only)
        self.assertEqual(await iso.read(0, 512), bytes(512))
        await iso.disconnect()
        self.assertEqual(service.factory.max_queue_depth, 32)
        self.assertEqual(service.shutdown_timeout, 5.0)
        await self.stop(service)

    async def test_embed_options(self) -> None:
        """Options and makeService serve what the arguments say."""
        service = embed_options.make_service(reactor, LISTEN)
        endpoint = await self.start(service)
        client = await self.write_and_read(endpoint, "disk")
        self.assertEqual(client.size, 64 * MiB)
        await self.stop(service)

    def test_embed_options_usage_error(self) -> None:
        """Wrong arguments raise UsageError before anything is built."""
        with self.assertRaises(UsageError):
            embed_options.make_service(reactor, LISTEN, ["--memory", "64 MB"])

    async def test_embed_pieces(self) -> None:
        """
        The hand-built tree serves its exports and closes its devices when
        stopped.
        """
        service = embed_pieces.make_service(reactor, LISTEN)
        [devices] = [child for child in service if isinstance(child, BlockDeviceService)]
        self.assertEqual(devices.name, "device")
        endpoint = await self.start(service)
        client = await self.write_and_read(endpoint)
        self.assertEqual(client.export_name, "scratch")
        iso = await connect(reactor, endpoint, "iso")
        self.assertTrue(iso.read_only)
        self.assertEqual(iso.description, "read-only")
        await iso.disconnect()
        await self.stop(service)
        self.assertFalse(devices.running)

    async def test_observer(self) -> None:
        """The observer counts every request it is told of."""
        stats = observer.RequestStats()
        service = observer.make_service(reactor, LISTEN, stats)
        endpoint = await self.start(service)
        await self.write_and_read(endpoint, "disk")
        await self.stop(service)
        self.assertEqual(stats.finished, {"WRITE": 1, "FLUSH": 1, "READ": 1})
        self.assertEqual(stats.failed, {})
        self.assertGreaterEqual(stats.seconds, 0.0)

    def test_observer_failure(self) -> None:
        """A failed request is counted as failed too."""
        stats = observer.RequestStats()
        connection = ConnectionInfo(peer="127.0.0.1:5000", started=0.0)
        stats.request_finished(connection, ReadRequest(1, 0, 512, 0), int(Errno.EIO), 0.5)
        self.assertEqual(stats.failed, {"READ": 1})
        self.assertEqual(stats.seconds, 0.5)


class PagesTests(SynchronousTestCase):
    """The pages show the example files as they are."""

    def marked_blocks(self) -> list[tuple[str, str, str, str]]:
        """
        Every marked code block: (page, kind, example path, block text).
        A marker must be followed at once by a code block.
        """
        found = []
        pages = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
        for page in pages:
            text = page.read_text(encoding="utf-8")
            blocks = _MARKED_BLOCK.findall(text)
            self.assertEqual(
                len(blocks), len(_MARKER.findall(text)), f"{page}: a marker without its block"
            )
            for kind, path, block in blocks:
                found.append((str(page.relative_to(REPO)), kind, path, block))
        return found

    def test_blocks_match_files(self) -> None:
        """A marked block is the whole example file, or a run of its lines."""
        blocks = self.marked_blocks()
        self.assertTrue(blocks, "no marked code blocks found")
        for page, kind, path, block in blocks:
            source = (REPO / path).read_text(encoding="utf-8")
            if kind == "example":
                self.assertEqual(block, source, f"{page}: the block for {path} differs")
            else:
                lines, shown = source.splitlines(), block.splitlines()
                self.assertTrue(shown, f"{page}: an empty excerpt of {path}")
                runs = (
                    lines[start : start + len(shown)]
                    for start in range(len(lines) - len(shown) + 1)
                )
                self.assertIn(shown, list(runs), f"{page}: the excerpt of {path} differs")

    def test_examples_shown(self) -> None:
        """Each example is shown whole on its page."""
        shown = {(page, path) for page, kind, path, _ in self.marked_blocks() if kind == "example"}
        for path, page in SHOWN_WHOLE.items():
            self.assertIn((page, path), shown, f"{page} does not show {path}")
