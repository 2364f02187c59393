"""
Tests for L{twisted_nbd.observers}: what an observer is told, in unit tests
over a L{StringTransport} and with a real C{nbdcopy} against a server built
in this process by L{twisted_nbd.service.build}.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests import builders as b
from tests.interop.helpers import require_tool
from tests.test_compose import bound_port
from twisted_nbd._wire import Cmd, Errno, Opt, Rep
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.errors import NBDError
from twisted_nbd.events import Request
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.observers import ConnectionInfo, IServerObserver, ServerObserver
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.service import NBDService, build
from twisted_nbd.testing import ControllableBlockDevice

SIZE = 1 << 20
MiB = 1 << 20


class Recorder(ServerObserver):
    """Remembers every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def connection_made(self, connection: ConnectionInfo) -> None:
        self.calls.append(("made", connection.peer))

    def connection_lost(self, connection: ConnectionInfo, reason: str) -> None:
        self.calls.append(("lost", reason))

    def export_chosen(self, connection: ConnectionInfo, name: str) -> None:
        self.calls.append(("export", name))

    def option_refused(
        self, connection: ConnectionInfo, option: int, reply: int, reason: str
    ) -> None:
        self.calls.append(("option refused", option, reply))

    def request_started(self, connection: ConnectionInfo, request: Request) -> None:
        self.calls.append(("started", request.command, request.offset, request.length))

    def request_finished(
        self, connection: ConnectionInfo, request: Request, errno: int, elapsed: float
    ) -> None:
        self.calls.append(("finished", request.command, errno, elapsed))

    def request_refused(
        self, connection: ConnectionInfo, cookie: int, command: int, errno: int, reason: str
    ) -> None:
        self.calls.append(("refused", command, errno))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == kind]


class Broken(ServerObserver):
    """An observer whose every call raises."""

    def request_started(self, connection: ConnectionInfo, request: Request) -> None:
        raise RuntimeError("observer bug")

    def request_finished(
        self, connection: ConnectionInfo, request: Request, errno: int, elapsed: float
    ) -> None:
        raise RuntimeError("observer bug")


class ObserverUnitTests(SynchronousTestCase):
    """Observers see connections and requests, timed by the factory's clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.device = ControllableBlockDevice(SIZE)
        self.recorder = Recorder()
        registry = ExportRegistry.of([Export("disk", self.device)])
        self.factory = NBDServerFactory(registry, observers=[self.recorder], reactor=self.clock)
        proto = self.factory.buildProtocol(None)
        assert proto is not None
        self.proto = proto
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_interface(self) -> None:
        """The no-op base class provides the interface."""
        self.assertTrue(verifyObject(IServerObserver, ServerObserver()))

    def test_connection_and_requests(self) -> None:
        """
        Made, export chosen, each request started and finished with its errno
        and elapsed time by the clock, and lost, in that order.
        """
        self.proto.dataReceived(b.client_flags() + b.go("disk"))
        self.proto.dataReceived(b.write(1, 0, b"x" * 512) + b.read(2, 512, 512))
        self.clock.advance(0.25)
        self.device.take("write").succeed(None)
        self.clock.advance(0.5)
        self.device.take("read").fail(NBDError(Errno.EIO, "bad sector"))
        self.proto.connectionLost()
        self.assertEqual(
            self.recorder.calls,
            [
                ("made", "192.168.1.1:54321"),
                ("export", "disk"),
                ("started", Cmd.WRITE, 0, 512),
                ("started", Cmd.READ, 512, 512),
                ("finished", Cmd.WRITE, 0, 0.25),
                ("finished", Cmd.READ, Errno.EIO, 0.75),
                ("lost", "closed"),
            ],
        )
        self.flushLoggedErrors()

    def test_refusals(self) -> None:
        """Refused options and requests are reported with their reply and errno."""
        self.proto.dataReceived(
            b.client_flags() + b.option(Opt.STARTTLS) + b.go("nope") + b.go("disk")
        )
        self.proto.dataReceived(b.read(1, SIZE, 512))
        self.assertEqual(
            self.recorder.of("option refused"),
            [
                ("option refused", Opt.STARTTLS, Rep.ERR_POLICY),
                ("option refused", Opt.GO, Rep.ERR_UNKNOWN),
            ],
        )
        self.assertEqual(self.recorder.of("refused"), [("refused", Cmd.READ, Errno.EINVAL)])
        self.assertEqual(self.recorder.of("started"), [])

    def test_violation_reason(self) -> None:
        """A connection dropped for a protocol violation says so when it is lost."""
        self.proto.dataReceived(b.client_flags() + b.go("disk"))
        self.proto.dataReceived(b"\0" * 28)
        self.proto.connectionLost()
        [(_, reason)] = self.recorder.of("lost")
        self.assertIn("protocol violation", reason)

    def test_broken_observer(self) -> None:
        """An observer that raises is logged; the request is answered anyway."""
        self.factory.add_observer(Broken())
        proto = self.factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b.client_flags() + b.go("disk"))
        transport.clear()
        proto.dataReceived(b.request(Cmd.FLUSH, 3))
        self.device.take("flush").succeed(None)
        self.assertEqual(b.parse_simple_replies(transport.value()), [(0, 3)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_no_observers_no_clock(self) -> None:
        """Without observers, the per-request path never reads the clock."""
        reads: list[float] = []

        def clock() -> float:
            reads.append(1.0)
            return 1.0

        registry = ExportRegistry.of([Export("disk", self.device)])
        factory = NBDServerFactory(registry)
        factory._clock = clock
        proto = factory.buildProtocol(None)
        assert proto is not None
        proto.makeConnection(StringTransport())
        before = len(reads)
        proto.dataReceived(b.client_flags() + b.go("disk") + b.request(Cmd.FLUSH, 1))
        self.device.take("flush").succeed(None)
        self.assertEqual(len(reads), before)


class _FailAt(BlockDeviceFilter):
    """Fails WRITEs that touch one offset with EIO."""

    at = 3 * MiB

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        if offset <= self.at < offset + len(data):
            d: Deferred[None] = Deferred()
            d.errback(NBDError(Errno.EIO, "injected"))
            return d
        return super().write(offset, data, fua)


@pytest.mark.interop
class NbdcopyObserverTests(TestCase):
    """
    An observer on a server built with L{build} sees every request of a real
    C{nbdcopy}, with its errno.
    """

    timeout = 120

    async def serve(self, recorder: Recorder, failing: bool = False) -> tuple[NBDService, int]:
        from twisted.internet import reactor

        config = Config(
            [ExportSpec(name="disk", memory=8 * MiB)],
            listen=("tcp:0:interface=127.0.0.1",),
        )
        service = build(config, reactor, observers=[recorder])
        if failing:
            export = service.registry.exports["disk"]
            service.registry.exports["disk"] = Export("disk", _FailAt(export.device))
        service.startService()
        self.addCleanup(service.stopService)
        [listener] = [s for s in service if isinstance(s, StreamServerEndpointService)]
        return service, await bound_port(listener)

    async def nbdcopy(self, *args: str) -> tuple[bytes, int]:
        from twisted.internet import reactor

        out, err, code = await getProcessOutputAndValue(
            require_tool("nbdcopy"), args, env=dict(os.environ), reactor=reactor
        )
        return out + err, code

    async def test_every_request_of_an_upload_and_download(self) -> None:
        """
        nbdcopy up then down: the observer sees WRITEs covering the whole
        image and READs covering it again, every request finished with errno
        0, as many finished as started.
        """
        recorder = Recorder()
        _, port = await self.serve(recorder)
        source = self.mktemp()
        data = os.urandom(8 * MiB)
        with open(source, "wb") as f:
            f.write(data)
        uri = f"nbd://127.0.0.1:{port}/disk"
        output, code = await self.nbdcopy("--connections=2", source, uri)
        self.assertEqual(code, 0, output)
        copy = self.mktemp()
        output, code = await self.nbdcopy(uri, copy)
        self.assertEqual(code, 0, output)
        with open(copy, "rb") as f:
            self.assertEqual(f.read(), data)
        started = recorder.of("started")
        finished = recorder.of("finished")
        self.assertEqual(len(started), len(finished))
        self.assertEqual({errno for _, _, errno, _ in finished}, {0})
        written = sum(length for _, cmd, _, length in started if cmd == Cmd.WRITE)
        read = sum(length for _, cmd, _, length in started if cmd == Cmd.READ)
        self.assertEqual(written, 8 * MiB)
        # nbdcopy may skip holes it learns of from block status; random data has none.
        self.assertEqual(read, 8 * MiB)
        # Two upload connections (nbdcopy may open one more to probe), one download.
        self.assertGreaterEqual(len(recorder.of("made")), 3)

    async def test_errno_of_a_failing_request(self) -> None:
        """A WRITE the backend fails is reported finished with EIO; nbdcopy fails."""
        recorder = Recorder()
        _, port = await self.serve(recorder, failing=True)
        source = self.mktemp()
        with open(source, "wb") as f:
            f.write(os.urandom(8 * MiB))
        output, code = await self.nbdcopy(source, f"nbd://127.0.0.1:{port}/disk")
        self.assertNotEqual(code, 0, output)
        failed = [call for call in recorder.of("finished") if call[2]]
        self.assertTrue(failed)
        self.assertEqual({(cmd, errno) for _, cmd, errno, _ in failed}, {(Cmd.WRITE, Errno.EIO)})
        self.flushLoggedErrors()
