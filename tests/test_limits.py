# -*- test-case-name: tests.test_limits -*-
"""
Tests for L{twisted_nbd.limits} and its hooks in the protocol, the factory
and the worker supervisor: the handshake deadline, the connection caps and
their slots, C{--allow}, the idle timeout, and rate-limited logging. Time
is a L{MemoryReactorClock}; connections are C{StringTransport}s. Rule ids
refer to the protocol digest in the shared docs.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests import builders as b
from twisted_nbd._wire import Cmd, Opt, Rep
from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.limits import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_NEGOTIATING,
    Limits,
    RateLimitedLog,
    parse_network,
    peer_ip,
)
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol
from twisted_nbd.testing import ControllableBlockDevice
from twisted_nbd.worker import _Counter
from twisted_nbd.workers import WorkerPool, _HandoffFactory, _Worker

SIZE = 1 << 20
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
ELSEWHERE = IPv4Address("TCP", "192.0.2.9", 40000)


def collect_log(case: SynchronousTestCase) -> list[dict[str, Any]]:
    """The project's log events from now on, for the rest of C{case}."""
    events: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("twisted_nbd."):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def texts(events: list[dict[str, Any]]) -> list[str]:
    """The warnings among C{events}, as text."""
    return [formatEvent(event) for event in events if event["log_level"] >= LogLevel.warn]


def advance(clock: MemoryReactorClock, seconds: float) -> None:
    """
    Let C{seconds} pass a second at a time: the fake clock runs what falls
    due only at the end of each step, so a timer that schedules itself
    again needs steps shorter than its period.
    """
    whole = int(seconds)
    for _ in range(whole):
        clock.advance(1)
    clock.advance(seconds - whole)


class Server:
    """A factory on a fake reactor, and the connections made to it."""

    def __init__(self, limits: Limits | None = None, device: Any = None) -> None:
        self.clock = MemoryReactorClock()
        self.device = device if device is not None else ControllableBlockDevice(SIZE)
        registry = ExportRegistry.of([Export("", self.device)])
        self.factory = NBDServerFactory(registry, reactor=self.clock, limits=limits)

    def connect(self, address: object = LOOPBACK) -> tuple[NBDServerProtocol, StringTransport]:
        """A connection from C{address}; it must be admitted."""
        proto = self.factory.buildProtocol(address)
        assert proto is not None, f"{address} was refused"
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def negotiated(self) -> tuple[NBDServerProtocol, StringTransport]:
        """A connection past NBD_OPT_GO."""
        proto, transport = self.connect()
        proto.dataReceived(b.client_flags() + b.go())
        assert proto._device is not None, transport.value()
        transport.clear()
        return proto, transport

    def counts(self) -> tuple[int, int]:
        return self.factory.connection_count, self.factory.negotiating_count


def lose(proto: NBDServerProtocol, reason: type[Exception] = ConnectionDone) -> None:
    """What the reactor does once a transport is closed."""
    proto.connectionLost(Failure(reason()))


class LimitsSettingTests(SynchronousTestCase):
    """The L{Limits} value: defaults, checks, networks."""

    def test_defaults(self) -> None:
        """Safe defaults: a 10 s deadline, caps, no idle timeout, everyone allowed."""
        limits = Limits()
        self.assertEqual(limits.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT)
        self.assertEqual(DEFAULT_HANDSHAKE_TIMEOUT, 10.0)
        self.assertEqual(limits.max_connections, DEFAULT_MAX_CONNECTIONS)
        self.assertEqual(limits.max_negotiating, DEFAULT_MAX_NEGOTIATING)
        self.assertEqual(limits.idle_timeout, 0)
        self.assertEqual(limits.allow, ())
        self.assertEqual(Config([ExportSpec(memory=SIZE)]).limits, limits)

    def test_bad_values(self) -> None:
        """Out-of-range settings are refused with a one-line reason."""
        for kwargs in (
            {"handshake_timeout": -1},
            {"handshake_timeout": float("nan")},
            {"idle_timeout": float("inf")},
            {"max_connections": -1},
            {"max_negotiating": 1.5},
            {"max_connections": True},
            {"allow": ("10.0.0.1/8",)},
            {"allow": ("somewhere",)},
        ):
            error = self.assertRaises(ValueError, Limits, **kwargs)
            self.assertNotIn("\n", str(error), kwargs)

    def test_parse_network(self) -> None:
        """CIDRs and single addresses, IPv4 and IPv6; host bits set are a mistake."""
        self.assertEqual(str(parse_network("10.0.0.0/8")), "10.0.0.0/8")
        self.assertEqual(str(parse_network(" 192.0.2.7 ")), "192.0.2.7/32")
        self.assertEqual(str(parse_network("fd00::/8")), "fd00::/8")
        self.assertEqual(str(parse_network("::1")), "::1/128")
        error = self.assertRaises(ValueError, parse_network, "10.1.2.3/8")
        self.assertIn("did you mean 10.0.0.0/8", str(error))
        self.assertRaises(ValueError, parse_network, "10.0.0.0/33")
        self.assertRaises(ValueError, parse_network, "example.com")

    def test_peer_ip(self) -> None:
        """IPv4-mapped IPv6 peers are their IPv4 address; Unix peers have none."""
        self.assertEqual(str(peer_ip(IPv6Address("TCP", "::ffff:192.0.2.9", 1))), "192.0.2.9")
        self.assertEqual(str(peer_ip(IPv6Address("TCP", "fe80::1%eth0", 1))), "fe80::1")
        self.assertIsNone(peer_ip(UNIXAddress(b"/run/nbd.sock")))

    def test_allows(self) -> None:
        """The allow-list matches IPv4, IPv6 and IPv4-mapped peers; Unix peers always pass."""
        limits = Limits(allow=("127.0.0.0/8", "2001:db8::/32"))
        self.assertTrue(limits.allows(LOOPBACK))
        self.assertFalse(limits.allows(ELSEWHERE))
        self.assertTrue(limits.allows(IPv6Address("TCP", "2001:db8::5", 1)))
        self.assertFalse(limits.allows(IPv6Address("TCP", "2001:db9::5", 1)))
        self.assertTrue(limits.allows(IPv6Address("TCP", "::ffff:127.0.0.1", 1)))
        self.assertFalse(limits.allows(IPv6Address("TCP", "::ffff:192.0.2.9", 1)))
        self.assertTrue(limits.allows(UNIXAddress(None)))
        self.assertTrue(Limits().allows(ELSEWHERE))

    def test_json_round_trip(self) -> None:
        """What the supervisor sends a worker comes back equal."""
        limits = Limits(5.0, 60.0, 7, 3, ("10.0.0.0/8", "::1"))
        self.assertEqual(Limits.from_json(limits.to_json()), limits)
        self.assertEqual(limits.to_json()["allow"], ["10.0.0.0/8", "::1/128"])


class RateLimitedLogTests(SynchronousTestCase):
    """A flood of one kind of warning is one line, then one line with its count."""

    def test_summary_at_interval_end(self) -> None:
        """
        The first is logged at once; the rest of the interval are counted and
        summed up when it ends; the next one after that is logged at once.
        """
        clock = MemoryReactorClock()
        logger = Logger(namespace="twisted_nbd.test")
        events = collect_log(self)
        log = RateLimitedLog(logger, clock.seconds, interval=10, reactor=clock)
        for i in range(50):
            clock.advance(0.1)
            log.warn("flood", "floods", "Refused {peer}", peer=f"client {i}")
        log.warn("other", "others", "Something else")
        self.assertEqual(texts(events), ["Refused client 0", "Something else"])
        clock.advance(5.2)
        self.assertEqual(
            texts(events)[2:], ["49 more floods in the last 10s, not logged one by one"]
        )
        self.assertEqual(clock.getDelayedCalls(), [])
        log.warn("flood", "floods", "Refused {peer}", peer="client 50")
        self.assertEqual(texts(events)[3:], ["Refused client 50"])
        self.assertEqual(log.counts, {"flood": 51, "other": 1})

    def test_without_reactor(self) -> None:
        """With no reactor to end the interval, the next line carries the count."""
        now = [0.0]
        logger = Logger(namespace="twisted_nbd.test")
        events = collect_log(self)
        log = RateLimitedLog(logger, lambda: now[0], interval=10)
        for i in range(3):
            log.warn("flood", "floods", "Refused {peer}", peer=f"client {i}")
        now[0] = 10
        log.warn("flood", "floods", "Refused {peer}", peer="client 3")
        self.assertEqual(
            texts(events),
            ["Refused client 0", "Refused client 3 (2 more floods not logged in the last 10s)"],
        )


class HandshakeDeadlineTests(SynchronousTestCase):
    """A client must reach transmission within the handshake timeout."""

    def test_silent_client_dropped(self) -> None:
        """
        A client that says nothing is dropped (hard close, H-18: a denial
        of service) at the deadline, not before; the reason is logged and
        its slots are free again.
        """
        server = Server(Limits(handshake_timeout=10))
        events = collect_log(self)
        proto, transport = server.connect()
        self.assertEqual(server.counts(), (1, 1))
        server.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        server.clock.advance(0.1)
        self.assertTrue(transport.disconnected, "not aborted")
        self.assertEqual(
            texts(events),
            ["Dropping client 127.0.0.1:40000: no export chosen within 10s (--handshake-timeout)"],
        )
        lose(proto, ConnectionLost)
        self.assertEqual(server.counts(), (0, 0))
        self.assertEqual(server.factory.slots.dropped, {"handshake-timeout": 1})
        self.assertEqual(proto._lost_reason, "handshake timeout")

    def test_busy_negotiation_is_no_excuse(self) -> None:
        """
        The deadline runs from the connection to the export being chosen,
        whatever happens in between: a client that keeps sending options
        (each answered) is dropped all the same.
        """
        server = Server(Limits(handshake_timeout=10))
        proto, transport = server.connect()
        proto.dataReceived(b.client_flags())
        for _ in range(9):
            server.clock.advance(1)
            transport.clear()
            proto.dataReceived(b.option(Opt.LIST))
            self.assertEqual(b.parse_option_replies(transport.value())[-1][1], Rep.ACK)
        self.assertFalse(transport.disconnecting)
        server.clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_cancelled_by_go(self) -> None:
        """Choosing an export stops the deadline: nothing is left scheduled."""
        server = Server(Limits(handshake_timeout=10))
        proto, transport = server.negotiated()
        self.assertEqual(server.clock.getDelayedCalls(), [])
        self.assertEqual(server.counts(), (1, 0))
        advance(server.clock, 1000)
        self.assertFalse(transport.disconnecting)

    def test_cancelled_by_export_name(self) -> None:
        """NBD_OPT_EXPORT_NAME ends the handshake too (H-10)."""
        server = Server(Limits(handshake_timeout=10))
        proto, transport = server.connect()
        proto.dataReceived(b.client_flags() + b.option(Opt.EXPORT_NAME))
        self.assertEqual(server.clock.getDelayedCalls(), [])
        self.assertEqual(server.counts(), (1, 0))

    def test_cancelled_by_connection_lost(self) -> None:
        """A client that leaves before the deadline leaves no timer behind."""
        server = Server(Limits(handshake_timeout=10))
        proto, transport = server.connect()
        self.assertEqual(len(server.clock.getDelayedCalls()), 1)
        lose(proto)
        self.assertEqual(server.clock.getDelayedCalls(), [])
        self.assertEqual(server.counts(), (0, 0))

    def test_zero_means_none(self) -> None:
        """C{handshake_timeout=0} schedules nothing."""
        server = Server(Limits(handshake_timeout=0))
        server.connect()
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_no_reactor_no_timers(self) -> None:
        """
        A factory without a reactor has no clock for deadlines, but still
        counts and caps.
        """
        registry = ExportRegistry.of([Export("", ControllableBlockDevice(SIZE))])
        factory = NBDServerFactory(registry, limits=Limits(max_connections=1))
        proto = factory.buildProtocol(LOOPBACK)
        assert proto is not None
        proto.makeConnection(StringTransport())
        self.assertEqual(factory.connection_count, 1)
        self.assertIsNone(factory.buildProtocol(LOOPBACK))


class SlotTests(SynchronousTestCase):
    """
    The counts of open and negotiating connections go back to zero after
    every kind of disconnect (nbd-server leaked them: its issue 126).
    """

    def setUp(self) -> None:
        self.server = Server(Limits(handshake_timeout=10))

    def assert_freed(self, proto: NBDServerProtocol, reason: type[Exception]) -> None:
        lose(proto, reason)
        self.assertEqual(self.server.counts(), (0, 0))
        # A second connectionLost (a bug elsewhere) must not count twice.
        lose(proto, reason)
        self.assertEqual(self.server.counts(), (0, 0))
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def test_clean_close(self) -> None:
        """NBD_CMD_DISC (C-06): the server closes, the slot is freed."""
        proto, transport = self.server.negotiated()
        proto.dataReceived(b.request(Cmd.DISC))
        self.assertTrue(transport.disconnecting)
        self.assert_freed(proto, ConnectionDone)

    def test_option_abort(self) -> None:
        """NBD_OPT_ABORT while negotiating (H-08) frees both slots."""
        proto, transport = self.server.connect()
        proto.dataReceived(b.client_flags() + b.option(Opt.ABORT))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.server.counts(), (1, 1))
        self.assert_freed(proto, ConnectionDone)

    def test_protocol_violation(self) -> None:
        """Client flags with an unknown bit (H-02): dropped, slots freed."""
        proto, transport = self.server.connect()
        proto.dataReceived(struct.pack(">I", 0x80))
        self.assertTrue(transport.disconnected)
        self.assert_freed(proto, ConnectionLost)

    def test_violation_in_transmission(self) -> None:
        """A bad request magic (T-01) after GO."""
        proto, transport = self.server.negotiated()
        proto.dataReceived(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
        self.assertTrue(transport.disconnected)
        self.assert_freed(proto, ConnectionLost)

    def test_timeout(self) -> None:
        proto, transport = self.server.connect()
        self.server.clock.advance(10)
        self.assertTrue(transport.disconnected)
        self.assert_freed(proto, ConnectionLost)

    def test_server_abort(self) -> None:
        """The server drops a connection with requests in flight (shutdown timeout)."""
        proto, transport = self.server.negotiated()
        proto.dataReceived(b.read(1, 0, 512))
        proto.abort()
        self.assertTrue(transport.disconnected)
        self.assert_freed(proto, ConnectionLost)

    def test_client_vanishes_mid_request(self) -> None:
        """The connection breaks with a request in flight; its late result is dropped."""
        proto, transport = self.server.negotiated()
        proto.dataReceived(b.read(1, 0, 512))
        self.assert_freed(proto, ConnectionLost)
        self.server.device.take("read").succeed(bytes(512))
        self.assertEqual(transport.value(), b"")

    def test_client_vanishes_mid_handshake(self) -> None:
        """Half an option, then the connection breaks."""
        proto, transport = self.server.connect()
        proto.dataReceived(b.client_flags() + b.go()[:7])
        self.assert_freed(proto, ConnectionLost)

    def test_refused_takes_no_slot(self) -> None:
        """A connection refused over a cap never counts."""
        server = Server(Limits(max_connections=1))
        proto, _ = server.connect()
        self.assertIsNone(server.factory.buildProtocol(LOOPBACK))
        self.assertEqual(server.counts(), (1, 1))
        lose(proto)
        self.assertEqual(server.counts(), (0, 0))


class CapTests(SynchronousTestCase):
    """--max-connections and --max-negotiating refuse before the greeting."""

    def test_max_connections(self) -> None:
        """
        Over the cap, buildProtocol makes no protocol (Twisted then closes
        the socket at once, with no greeting); a freed slot admits the next.
        """
        server = Server(Limits(max_connections=2, max_negotiating=0))
        events = collect_log(self)
        first, _ = server.negotiated()
        second, _ = server.connect()
        self.assertIsNone(server.factory.buildProtocol(LOOPBACK))
        self.assertEqual(server.factory.slots.refused, {"max-connections": 1})
        self.assertEqual(
            texts(events),
            ["Refused 127.0.0.1:40000: 2 connections are open (--max-connections)"],
        )
        lose(first)
        third, transport = server.connect()
        self.assertTrue(transport.value().startswith(b"NBDMAGIC"))

    def test_max_negotiating(self) -> None:
        """
        Only connections still negotiating count: once one chooses an
        export, another may negotiate.
        """
        server = Server(Limits(max_connections=0, max_negotiating=1))
        first, transport = server.connect()
        self.assertIsNone(server.factory.buildProtocol(LOOPBACK))
        self.assertEqual(server.factory.slots.refused, {"max-negotiating": 1})
        first.dataReceived(b.client_flags() + b.go())
        second, _ = server.connect()
        self.assertEqual(server.counts(), (2, 1))

    def test_zero_is_no_cap(self) -> None:
        server = Server(Limits(max_connections=0, max_negotiating=0, handshake_timeout=0))
        for _ in range(2000):
            server.connect()
        self.assertEqual(server.counts(), (2000, 2000))

    def test_refusals_rate_limited(self) -> None:
        """A flood over the cap is one log line per 10 s, with the count of the rest."""
        server = Server(Limits(max_connections=1, handshake_timeout=0))
        events = collect_log(self)
        server.connect()
        for _ in range(500):
            self.assertIsNone(server.factory.buildProtocol(LOOPBACK))
        self.assertEqual(len(texts(events)), 1)
        server.clock.advance(10)
        self.assertEqual(
            texts(events)[1:],
            [
                "499 more connections refused by --max-connections in the last 10s,"
                " not logged one by one"
            ],
        )
        self.assertIsNone(server.factory.buildProtocol(ELSEWHERE))
        self.assertEqual(len(texts(events)), 3)
        self.assertEqual(server.factory.slots.refused, {"max-connections": 501})


class AllowTests(SynchronousTestCase):
    """--allow is checked in buildProtocol, before the greeting."""

    def setUp(self) -> None:
        self.server = Server(Limits(allow=("127.0.0.0/8", "2001:db8::/32")))

    def test_refused(self) -> None:
        events = collect_log(self)
        self.assertIsNone(self.server.factory.buildProtocol(ELSEWHERE))
        self.assertIsNone(
            self.server.factory.buildProtocol(IPv6Address("TCP", "::ffff:192.0.2.9", 5))
        )
        self.assertEqual(self.server.factory.slots.refused, {"allow": 2})
        self.assertEqual(texts(events), ["Refused 192.0.2.9:40000: not in --allow"])
        self.assertEqual(self.server.counts(), (0, 0))

    def test_admitted(self) -> None:
        for address in (
            LOOPBACK,
            IPv6Address("TCP", "::ffff:127.0.0.1", 5),
            IPv6Address("TCP", "2001:db8::1", 5),
            UNIXAddress(b"/run/nbd.sock"),
        ):
            proto, transport = self.server.connect(address)
            self.assertTrue(transport.value().startswith(b"NBDMAGIC"), address)
        self.assertEqual(self.server.factory.slots.refused, {})


class IdleTimeoutTests(SynchronousTestCase):
    """
    --idle-timeout: operator policy beyond the spec (C-08 says the server
    never times out idle clients, so it is off by default).
    """

    def test_off_by_default(self) -> None:
        server = Server()
        proto, transport = server.negotiated()
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_idle_closed_gracefully(self) -> None:
        """
        A connection with nothing in flight and nothing received for the
        timeout is closed gracefully (FIN after its replies, not an abort),
        not before, and at most a quarter timeout after.
        """
        server = Server(Limits(idle_timeout=100))
        events = collect_log(self)
        proto, transport = server.negotiated()
        advance(server.clock, 99)
        self.assertFalse(transport.disconnecting)
        advance(server.clock, 26)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "aborted instead of closed")
        self.assertEqual(
            texts(events), ["Closing client 127.0.0.1:40000: idle for 100s (--idle-timeout)"]
        )
        lose(proto)
        self.assertEqual(server.counts(), (0, 0))
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_activity_keeps_it_open(self) -> None:
        """Requests more often than the timeout keep the connection."""
        server = Server(Limits(idle_timeout=100))
        proto, transport = server.negotiated()
        for cookie in range(20):
            advance(server.clock, 60)
            proto.dataReceived(b.read(cookie, 0, 512))
            server.device.take("read").succeed(bytes(512))
        self.assertFalse(transport.disconnecting)

    def test_request_in_flight_is_not_idle(self) -> None:
        """
        A request the backend takes long over keeps the connection; idleness
        counts from when it finished.
        """
        server = Server(Limits(idle_timeout=100))
        proto, transport = server.negotiated()
        proto.dataReceived(b.read(1, 0, 512))
        advance(server.clock, 1000)
        self.assertFalse(transport.disconnecting)
        server.device.take("read").succeed(bytes(512))
        advance(server.clock, 99)
        self.assertFalse(transport.disconnecting)
        advance(server.clock, 26)
        self.assertTrue(transport.disconnecting)

    def test_not_while_negotiating(self) -> None:
        """The idle timeout starts with transmission; before, the deadline rules."""
        server = Server(Limits(idle_timeout=5, handshake_timeout=0))
        proto, transport = server.connect()
        advance(server.clock, 100)
        self.assertFalse(transport.disconnecting)


class WorkerLimitTests(SynchronousTestCase):
    """Under --workers the supervisor applies the limits to the whole server."""

    def pool(self, limits: Limits) -> WorkerPool:
        config = Config([ExportSpec(memory=SIZE)], workers=2, limits=limits)
        pool = WorkerPool(config, [], MemoryReactorClock())
        for index in range(2):
            pool.workers[index] = _Worker(index, started=0.0, ready=True)
        return pool

    def test_caps_count_every_worker(self) -> None:
        """
        The caps compare with the sum of every worker's reports plus the
        connections handed out and not yet reported.
        """
        pool = self.pool(Limits(max_connections=10, max_negotiating=4))
        a, b_ = pool.workers
        assert a is not None and b_ is not None
        pool._message(a, {"connections": 5, "negotiating": 1})
        pool._message(b_, {"connections": 4, "negotiating": 2})
        self.assertEqual((pool.connection_count, pool.negotiating_count), (9, 3))
        self.assertTrue(pool.admit(LOOPBACK))
        b_.handed[1] = object()
        self.assertEqual((pool.connection_count, pool.negotiating_count), (10, 4))
        self.assertFalse(pool.admit(LOOPBACK))
        self.assertEqual(pool.slots.refused, {"max-connections": 1})
        pool._message(a, {"connections": 4, "negotiating": 1})
        self.assertFalse(pool.admit(LOOPBACK))
        self.assertEqual(pool.slots.refused, {"max-connections": 1, "max-negotiating": 1})

    def test_allow_before_hand_off(self) -> None:
        """A refused peer is never handed to a worker: no protocol is built."""
        pool = self.pool(Limits(allow=("127.0.0.1",)))
        factory = _HandoffFactory(pool)
        self.assertIsNone(factory.buildProtocol(ELSEWHERE))
        self.assertIsNotNone(factory.buildProtocol(LOOPBACK))
        self.assertEqual(pool.slots.refused, {"allow": 1})

    def test_worker_reports_counts(self) -> None:
        """A worker tells the supervisor both counts whenever either changes."""
        sent: list[dict[str, int]] = []

        class Control:
            def send(self, message: dict[str, int]) -> None:
                sent.append(message)

        counter = _Counter()
        server = Server(Limits())
        server.factory.add_observer(counter)
        counter.factory = server.factory
        counter.control = Control()  # type: ignore[assignment]
        proto, _ = server.connect()
        proto.dataReceived(b.client_flags() + b.go())
        lose(proto)
        self.assertEqual(
            sent,
            [
                {"connections": 1, "negotiating": 1},
                {"connections": 1, "negotiating": 0},
                {"connections": 0, "negotiating": 0},
            ],
        )
