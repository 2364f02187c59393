# -*- test-case-name: tests.test_reliability -*-
"""
Reliability in process (issue 10, docs/reliability.md): a storm of refused
or failing requests does not flood the log; a backend that never answers
stalls only its own connection, at its queue depth, and a disconnect frees
the connection; thousands of connect/handshake/disconnect cycles over
loopback TCP leave no file descriptors, threads, delayed calls, Deferreds,
protocols or memory behind.
"""

from __future__ import annotations

import gc
import os
import struct
import threading
import weakref
from typing import Any, cast

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import builders as b
from tests.test_connection import after_go
from twisted_nbd import logs
from twisted_nbd._wire import Errno
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol
from twisted_nbd.testing import ControllableBlockDevice

SIZE = 16 << 20
#: How many cycles the hygiene test runs per pass (bench/hygiene.py runs more).
CYCLES = 1000


def _connect(factory: NBDServerFactory) -> tuple[NBDServerProtocol, StringTransport]:
    """A connection of C{factory} on a StringTransport, past GO."""
    proto = factory.buildProtocol(None)
    assert proto is not None
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b.client_flags() + b.go())
    assert after_go(transport.value()) == b""
    transport.clear()
    return proto, transport


class LogStormTests(SynchronousTestCase):
    """A client sending a storm of refused or failing requests (issue 10, point 5)."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        # Before the factory is made: its rate-limited log takes this logger.
        observer = cast(ILogObserver, self.events.append)
        self.patch(logs, "CONNECTIONS", Logger("twisted_nbd.connections", observer=observer))

    def lines(self, word: str) -> list[str]:
        return [e["log_format"] for e in self.events if word in e["log_format"]]

    def test_refused_requests(self) -> None:
        """
        2000 WRITEs to a read-only export each get EPERM (T-06), but only
        the first is logged; the factory counts them all.
        """
        registry = ExportRegistry.of([Export("", MemoryBlockDevice(SIZE), read_only=True)])
        factory = NBDServerFactory(registry)
        proto, transport = _connect(factory)
        proto.dataReceived(b"".join(b.write(i, 0, b"x" * 512) for i in range(2000)))
        replies = b.parse_simple_replies(transport.value())
        self.assertEqual(len(replies), 2000)
        self.assertEqual({error for error, _ in replies}, {Errno.EPERM})
        self.assertEqual(len(self.lines("Refused {command}")), 1)
        self.assertEqual(factory.request_log.counts["request-refused"], 2000)
        # Informational, as before it was rate-limited: the client's fault.
        levels = {e["log_level"] for e in self.events if "Refused" in e["log_format"]}
        self.assertEqual(levels, {LogLevel.info})

    def test_failed_requests(self) -> None:
        """
        2000 READs the backend fails with EIO each get EIO; one line is
        logged, and a second connection's failure within the interval is
        counted, not logged.
        """
        device = ControllableBlockDevice(SIZE)
        factory = NBDServerFactory(
            ExportRegistry.of([Export("", device)]),
            max_queue_depth=4096,
        )
        protos = [_connect(factory) for _ in range(2)]
        for proto, _ in protos:
            proto.dataReceived(b"".join(b.read(i, 0, 512) for i in range(1000)))
        while device.calls:
            device.take("read").fail(NBDError(Errno.EIO, "injected"))
        for _, transport in protos:
            replies = b.parse_simple_replies(transport.value())
            self.assertEqual([e for e, _ in replies], [Errno.EIO] * 1000)
        self.assertEqual(len(self.lines("failed: {errno}")), 1)
        self.assertEqual(factory.request_log.counts["request-failed"], 2000)

    def test_without_factory(self) -> None:
        """A protocol made without a factory rate-limits on its own."""
        registry = ExportRegistry.of([Export("", MemoryBlockDevice(SIZE), read_only=True)])
        proto = NBDServerProtocol(registry)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b.client_flags() + b.go())
        proto.dataReceived(b"".join(b.write(i, 0, b"x" * 512) for i in range(100)))
        self.assertEqual(len(self.lines("Refused {command}")), 1)


def _quiet_log(case: SynchronousTestCase) -> None:
    """
    Log the server's lines nowhere: before logging begins, Twisted keeps
    recent events (and so their C{log_source}, the protocol) in a buffer,
    which would keep closed connections alive in a test process.
    """
    nowhere = cast(ILogObserver, lambda event: None)
    case.patch(NBDServerProtocol, "log", Logger(observer=nowhere))
    # The connection and request events (twisted_nbd.logs) too: under
    # trial -j each event logged is also a message to the manager process.
    case.patch(logs, "CONNECTIONS", Logger("twisted_nbd.connections", observer=nowhere))
    case.patch(logs, "REQUESTS", Logger("twisted_nbd.requests", observer=nowhere))


class NeverAnsweringBackendTests(SynchronousTestCase):
    """A backend that never fires its Deferreds (issue 10, point 4)."""

    def setUp(self) -> None:
        _quiet_log(self)

    def test_stalls_only_its_connection(self) -> None:
        """
        A connection stops reading at its queue depth (4) while its backend
        calls hang; another connection of the same export is still served;
        disconnecting the stuck one gives its slot back, and once the
        backend lets go of its Deferreds nothing of the connection is left.
        """
        device = ControllableBlockDevice(SIZE)
        factory = NBDServerFactory(
            ExportRegistry.of([Export("", device)]),
            max_queue_depth=4,
        )
        stuck, stuck_transport = _connect(factory)
        stuck.dataReceived(b"".join(b.read(i, i * 4096, 4096) for i in range(64)))
        self.assertEqual(len(device.calls), 4)
        self.assertEqual(stuck.in_flight, 4)
        self.assertEqual(stuck_transport.producerState, "paused")
        hung = list(device.calls)
        del device.calls[:]

        other, other_transport = _connect(factory)
        other.dataReceived(b.read(99, 0, 4096))
        device.take("read").succeed(b"y" * 4096)
        (reply,) = b.parse_simple_replies(other_transport.value()[:16])
        self.assertEqual(reply, (0, 99))
        self.assertEqual(other_transport.value()[16:], b"y" * 4096)
        self.assertEqual(other_transport.producerState, "producing")

        self.assertEqual(factory.connection_count, 2)
        stuck.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.connection_count, 1)
        self.assertNotIn(stuck, factory.connections)
        gone = weakref.ref(stuck)
        del stuck, stuck_transport
        # The hung calls still reference the connection (their callbacks);
        # a backend that gives up on them frees it.
        gc.collect()
        self.assertIsNotNone(gone())
        del hung
        gc.collect()
        self.assertIsNone(gone(), "the disconnected connection is still referenced")

    def test_late_answers_after_disconnect(self) -> None:
        """
        A backend that answers after the client left: nothing is written,
        nothing fails, nothing is left.
        """
        device = ControllableBlockDevice(SIZE)
        factory = NBDServerFactory(ExportRegistry.of([Export("", device)]))
        proto, transport = _connect(factory)
        proto.dataReceived(b.read(1, 0, 4096) + b.write(2, 0, b"z" * 4096))
        proto.connectionLost(Failure(ConnectionDone()))
        device.take("read").succeed(b"y" * 4096)
        device.take("write").succeed(None)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(factory.connection_count, 0)
        gone = weakref.ref(proto)
        del proto, transport
        gc.collect()
        self.assertIsNone(gone())


# ---------------------------------------------------------------- hygiene


def fd_count() -> int:
    """File descriptors this process holds open."""
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def count_objects(*kinds: type) -> dict[str, int]:
    gc.collect()
    counts = dict.fromkeys((k.__name__ for k in kinds), 0)
    for obj in gc.get_objects():
        for kind in kinds:
            if isinstance(obj, kind):
                counts[kind.__name__] += 1
    return counts


def snapshot(reactor: Any, factory: NBDServerFactory) -> dict[str, int]:
    """What a connection could leave behind, counted."""
    # Garbage from earlier tests in this process may hold sockets that the
    # cyclic collector closes: collect it before counting descriptors, not
    # only before counting objects (count_objects), or the first count
    # includes them and the second does not.
    gc.collect()
    return {
        "fds": fd_count(),
        "threads": threading.active_count(),
        "delayed_calls": len(reactor.getDelayedCalls()),
        "connections": factory.connection_count,
        "negotiating": factory.negotiating_count,
        **count_objects(Deferred, NBDServerProtocol),
        "rss_kib": rss_kib(),
    }


class _Batch:
    """
    Counts the cycles of one batch that ended; one Deferred fires when all
    did (the clients hold no Deferreds of their own, so the Deferreds left
    in the process are the server's).
    """

    def __init__(self, size: int) -> None:
        self.left = size
        self.errors: list[str] = []
        self.done: Deferred[list[str]] | None = Deferred()

    def ended(self, error: str | None) -> None:
        if error is not None:
            self.errors.append(error)
        self.left -= 1
        if not self.left and self.done is not None:
            # Let go of it: a closed client may outlive its batch a while.
            done, self.done = self.done, None
            done.callback(self.errors)


class _CycleClient(Protocol):
    """
    Connects, sends client flags, GO, one 4 KiB WRITE, a READ of it and
    DISC at once, and checks the READ's data once the server closes.
    """

    def __init__(self, batch: _Batch, index: int) -> None:
        self.batch = batch
        self.index = index
        self.payload = struct.pack(">Q", index) * 512
        self.received = bytearray()

    def connectionMade(self) -> None:
        assert self.transport is not None
        # Within the first 64 pages, which the warm-up round writes: the
        # memory device's pages are data, not a leak.
        offset = 4096 * (self.index % 64)
        self.transport.write(
            b.client_flags()
            + b.go()
            + b.write(1, offset, self.payload)
            + b.read(2, offset, 4096)
            + b.request(2, 3, 0, 0)  # NBD_CMD_DISC
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            rest = after_go(bytes(self.received))
        except (AssertionError, struct.error):
            rest = b""
        ok = (
            len(rest) == 16 + 16 + 4096
            and b.parse_simple_replies(rest[:16]) == [(0, 1)]
            and b.parse_simple_replies(rest[16:32]) == [(0, 2)]
            and rest[32:] == self.payload
        )
        self.batch.ended(None if ok else f"bad replies: {bytes(self.received[-64:])!r}")


class _CycleFactory(ClientFactory):
    # No "Starting factory" lines: under trial -j each line logged is a
    # message to the manager process, a Deferred until it is answered.
    noisy = False

    def __init__(self, batch: _Batch, index: int) -> None:
        self.batch = batch
        self.index = index

    def buildProtocol(self, addr: object) -> _CycleClient:
        return _CycleClient(self.batch, self.index)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.batch.ended(f"connection failed: {reason.getErrorMessage()}")


async def run_cycles(
    reactor: Any, cycles: int, parallel: int = 20
) -> tuple[dict[str, int], dict[str, int]]:
    """
    Serve a memory export on 127.0.0.1 in this process, run C{cycles}
    connect/handshake/write/read/disconnect cycles, C{parallel} at a time,
    and count what is left before and after (after a warm-up round, so
    one-time allocations are not counted as leaks).

    @return: the counts before and after.
    """
    factory = NBDServerFactory(
        ExportRegistry.of([Export("", MemoryBlockDevice(SIZE))]), reactor=reactor
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        number = port.getHost().port

        async def round_(count: int) -> None:
            for start in range(0, count, parallel):
                indexes = range(start, min(start + parallel, count))
                batch = _Batch(len(indexes))
                for index in indexes:
                    reactor.connectTCP("127.0.0.1", number, _CycleFactory(batch, index))
                assert batch.done is not None
                errors = await batch.done
                if errors:
                    raise AssertionError(errors[0])
            # The server side of the last connections may close a moment
            # after the clients saw the close.
            for _ in range(1000):
                if not factory.connection_count:
                    break
                await _later(reactor, 0.001)

        # Each snapshot is taken from the same point (just after a timer
        # fired), so the Deferreds of this coroutine's own waiting are the
        # same in both.
        await round_(parallel * 5)
        await _later(reactor, 0.01)
        before = snapshot(reactor, factory)
        await round_(cycles)
        await _later(reactor, 0.01)
        after = snapshot(reactor, factory)
    finally:
        await port.stopListening()
    return before, after


def _later(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class HygieneTests(TestCase):
    """Connect/handshake/disconnect cycles leave nothing behind (issue 10, point 6)."""

    def test_cycles(self) -> Deferred[None]:
        """
        1000 cycles over loopback TCP (each: handshake, a 4 KiB WRITE, a
        READ of it checked, DISC): the same file descriptors, threads,
        delayed calls (the handshake deadline is cancelled), open and
        negotiating connections, Deferreds and protocol objects as before,
        and under 8 MiB more resident memory.
        """

        _quiet_log(self)

        async def check() -> None:
            before, after = await run_cycles(global_reactor, CYCLES)
            for key in before:
                if key == "rss_kib":
                    self.assertLess(after[key] - before[key], 8 * 1024, (before, after))
                else:
                    self.assertEqual(after[key], before[key], (key, before, after))

        return ensureDeferred(check())


class CrashSimTests(SynchronousTestCase):
    """
    The simulated power loss of the durability trials
    (C{tests/interop/crashsim}): a write is kept only if a sync that began
    after it finished also ended.
    """

    def test_replay(self) -> None:
        from tests.interop.crashsim.sitecustomize import RECORD, replay

        workdir = self.mktemp()
        os.makedirs(workdir)
        image, journal = os.path.join(workdir, "image"), os.path.join(workdir, "journal")
        records = []

        def record(kind: bytes, ident: int, offset: int = 0, old: bytes = b"") -> None:
            records.append(RECORD.pack(kind, ident, offset, len(old)) + old)

        # Write 1 (a -> b at 0) is done before sync 10 starts and ends: kept.
        record(b"U", 1, 0, b"aaaa")
        record(b"D", 1)
        record(b"S", 10)
        # Write 2 (a -> c at 4) finishes while sync 11 runs: sync 11 does
        # not cover it, and sync 11 never ends anyway.
        record(b"U", 2, 4, b"aaaa")
        record(b"S", 11)
        record(b"D", 2)
        record(b"E", 10)
        # Write 3 (b -> d at 0) is done, but no sync starts after it: undone.
        record(b"U", 3, 0, b"bbbb")
        record(b"D", 3)
        # Write 4 was cut off mid-record by the kill: ignored.
        records.append(RECORD.pack(b"U", 4, 8, 4) + b"a")
        with open(journal, "wb") as f:
            f.write(b"".join(records))
        with open(image, "wb") as f:
            f.write(b"ddddccccaaaa")
        self.assertEqual(replay(image, journal), (2, 1))
        with open(image, "rb") as result:
            self.assertEqual(result.read(), b"bbbbaaaaaaaa")
