"""
Tests for L{twisted_nbd.metrics} and the HTTP pages of L{twisted_nbd.ops}:
the observer's counts over a L{StringTransport}, the sums across workers,
the Prometheus text, and C{/health}, C{/ready} and C{/metrics}.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from tests import builders as b
from twisted_nbd._wire import Errno
from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.metrics import (
    BUCKETS,
    MetricsObserver,
    NBDCollector,
    WorkerMetrics,
    merge,
    slots_snapshot,
)
from twisted_nbd.observers import IFlowObserver, IServerObserver
from twisted_nbd.ops import MetricsPage, OpsService, StatusPage, attach
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.service import build
from twisted_nbd.testing import ControllableBlockDevice

SIZE = 1 << 20


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of C{registry}'s text exposition, by name and sorted labels."""
    text = generate_latest(registry).decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def registry_of(*snapshots: dict[str, Any]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NBDCollector(lambda: list(snapshots)))
    return registry


class ObserverTests(SynchronousTestCase):
    """L{MetricsObserver} counts what the protocol tells it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.device = ControllableBlockDevice(SIZE)
        self.metrics = MetricsObserver(self.clock.seconds)
        registry = ExportRegistry.of([Export("disk", self.device)])
        self.factory = NBDServerFactory(
            registry, observers=[self.metrics], reactor=self.clock, max_queue_depth=2
        )
        self.metrics.slots = self.factory.slots
        proto = self.factory.buildProtocol(None)
        assert proto is not None
        self.proto = proto
        self.proto.makeConnection(StringTransport())

    def value(self, name: str, **labels: str) -> float:
        registry = registry_of(self.metrics.snapshot())
        return samples(registry).get((name, tuple(sorted(labels.items()))), 0.0)

    def test_interfaces(self) -> None:
        """It is an observer of requests and of flow control."""
        self.assertTrue(verifyObject(IServerObserver, self.metrics))
        self.assertTrue(verifyObject(IFlowObserver, self.metrics))

    def test_requests(self) -> None:
        """
        Requests by export, command and outcome (ok or the errno name),
        bytes of successful READs and WRITEs, in-flight gauges while they
        run, and their latency in the histogram's buckets.
        """
        self.assertEqual(self.value("nbd_connections_open"), 1)
        self.assertEqual(self.value("nbd_connections_negotiating"), 1)
        self.proto.dataReceived(b.client_flags() + b.go("disk"))
        self.assertEqual(self.value("nbd_connections_negotiating"), 0)
        self.assertEqual(self.value("nbd_export_connections", export="disk"), 1)
        self.proto.dataReceived(b.write(1, 0, b"x" * 512) + b.read(2, 512, 4096))
        self.assertEqual(self.value("nbd_requests_in_flight", export="disk"), 2)
        self.assertEqual(self.value("nbd_request_bytes_in_flight", export="disk"), 512 + 4096)
        self.clock.advance(0.003)
        self.device.take("write").succeed(None)
        self.clock.advance(2)
        self.device.take("read").fail(NBDError(Errno.EIO, "bad sector"))
        # A READ past the end never reaches the device: EINVAL, counted too.
        self.proto.dataReceived(b.read(3, SIZE, 512))
        self.assertEqual(self.value("nbd_requests_in_flight", export="disk"), 0)
        self.assertEqual(self.value("nbd_request_bytes_in_flight", export="disk"), 0)
        self.assertEqual(
            self.value("nbd_requests_total", export="disk", command="WRITE", outcome="ok"), 1
        )
        self.assertEqual(
            self.value("nbd_requests_total", export="disk", command="READ", outcome="EIO"), 1
        )
        self.assertEqual(
            self.value("nbd_requests_total", export="disk", command="READ", outcome="EINVAL"), 1
        )
        self.assertEqual(self.value("nbd_written_bytes_total", export="disk"), 512)
        self.assertEqual(self.value("nbd_read_bytes_total", export="disk"), 0)
        write = {"export": "disk", "command": "WRITE"}
        self.assertEqual(self.value("nbd_request_duration_seconds_bucket", le="0.0025", **write), 0)
        self.assertEqual(self.value("nbd_request_duration_seconds_bucket", le="0.005", **write), 1)
        self.assertEqual(self.value("nbd_request_duration_seconds_count", **write), 1)
        self.assertAlmostEqual(self.value("nbd_request_duration_seconds_sum", **write), 0.003)
        read = {"export": "disk", "command": "READ"}
        self.assertEqual(self.value("nbd_request_duration_seconds_bucket", le="1.0", **read), 0)
        self.assertEqual(self.value("nbd_request_duration_seconds_bucket", le="2.5", **read), 1)
        self.assertEqual(self.value("nbd_request_duration_seconds_bucket", le="+Inf", **read), 1)
        self.proto.connectionLost()
        self.assertEqual(self.value("nbd_connections_open"), 0)
        self.assertEqual(self.value("nbd_export_connections", export="disk"), 0)
        self.assertEqual(self.value("nbd_connections_total"), 1)

    def test_paused(self) -> None:
        """
        Time with reading paused by flow control (the queue depth here)
        counts, including a pause still under way and one that ends with
        the connection.
        """
        self.proto.dataReceived(b.client_flags() + b.go("disk"))
        self.proto.dataReceived(b.read(1, 0, 512) + b.read(2, 0, 512))
        self.clock.advance(1.5)
        self.assertEqual(self.value("nbd_reading_paused_seconds_total", export="disk"), 1.5)
        self.device.take("read").succeed(b"\0" * 512)
        self.clock.advance(10)
        self.assertEqual(self.value("nbd_reading_paused_seconds_total", export="disk"), 1.5)
        self.proto.dataReceived(b.read(3, 0, 512))
        self.clock.advance(0.5)
        self.proto.connectionLost()
        self.clock.advance(10)
        self.assertEqual(self.value("nbd_reading_paused_seconds_total", export="disk"), 2.0)

    def test_refused_connections(self) -> None:
        """Connections refused by the limits are counted by reason."""
        from twisted_nbd.limits import Limits

        factory = NBDServerFactory(
            ExportRegistry.of([Export("disk", self.device)]),
            reactor=self.clock,
            limits=Limits(max_connections=1),
        )
        metrics = MetricsObserver(self.clock.seconds)
        metrics.slots = factory.slots
        factory.add_observer(metrics)
        first = factory.buildProtocol(None)
        assert first is not None
        first.makeConnection(StringTransport())
        self.assertIsNone(factory.buildProtocol(None))
        self.assertIsNone(factory.buildProtocol(None))
        found = samples(registry_of(metrics.snapshot()))
        self.assertEqual(
            found["nbd_connections_refused_total", (("reason", "max-connections"),)], 2
        )


class MergeTests(SynchronousTestCase):
    """Snapshots of several workers add up; a dead worker's counters stay."""

    def snapshot(self, written: int, open: int) -> dict[str, Any]:
        return {
            "connections": [[3]],
            "open": [[open]],
            "written_bytes": [["disk", written]],
            "requests": [["disk", "WRITE", "ok", 2]],
            "latency": [["disk", "WRITE", [1] + [0] * len(BUCKETS) + [0.5]]],
        }

    def test_merge(self) -> None:
        """Rows with the same labels are summed, histograms bucket by bucket."""
        merged = merge([self.snapshot(10, 1), self.snapshot(5, 2)])
        self.assertEqual(merged["written_bytes"], [["disk", 15]])
        self.assertEqual(merged["open"], [[3]])
        self.assertEqual(merged["requests"], [["disk", "WRITE", "ok", 4]])
        [[_, _, latency]] = merged["latency"]
        self.assertEqual(latency[0], 2)
        self.assertEqual(latency[-1], 1.0)
        self.assertNotIn("open", merge([self.snapshot(1, 1)], gauges=False))

    def test_worker_dies(self) -> None:
        """
        When a worker exits its counters stay in the totals and its gauges
        go; its successor starts from zero, so nothing goes backwards.
        """
        aggregate = WorkerMetrics()
        one, two, three = object(), object(), object()
        aggregate.update(one, self.snapshot(100, 1))
        aggregate.update(two, self.snapshot(50, 1))
        aggregate.update(two, "not a snapshot")
        before = samples(registry_of(*aggregate.snapshots()))
        self.assertEqual(before["nbd_written_bytes_total", (("export", "disk"),)], 150)
        self.assertEqual(before["nbd_connections_open", ()], 2)
        aggregate.retire(one)
        aggregate.update(three, self.snapshot(0, 0))
        after = samples(registry_of(*aggregate.snapshots()))
        self.assertEqual(after["nbd_written_bytes_total", (("export", "disk"),)], 150)
        self.assertEqual(after["nbd_connections_total", ()], 9)
        self.assertEqual(after["nbd_connections_open", ()], 1)

    def test_local(self) -> None:
        """The supervisor's own refusals are added."""
        from twisted_nbd.limits import ConnectionSlots

        slots = ConnectionSlots()
        slots.refuse("allow", "192.0.2.1")
        aggregate = WorkerMetrics()
        aggregate.local = lambda: slots_snapshot(slots)
        found = samples(registry_of(*aggregate.snapshots()))
        self.assertEqual(found["nbd_connections_refused_total", (("reason", "allow"),)], 1)


def get(resource: Any, accept: bytes | None = None) -> tuple[int, bytes, Any]:
    request: Any = DummyRequest([])
    request.method = b"GET"
    request.content = BytesIO()
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    body = resource.render(request)
    return request.responseCode or 200, body, request


class PagesTests(SynchronousTestCase):
    """C{/metrics}, C{/health} and C{/ready}, and the service that serves them."""

    def test_status(self) -> None:
        """200 C{ok}, or 503 with the reason."""
        self.assertEqual(get(StatusPage(lambda: None))[:2], (200, b"ok\n"))
        self.assertEqual(get(StatusPage(lambda: "draining"))[:2], (503, b"draining\n"))

    def test_metrics_formats(self) -> None:
        """Prometheus text by default, OpenMetrics when asked for."""
        page = MetricsPage(registry_of(MetricsObserver().snapshot()))
        code, body, request = get(page)
        self.assertEqual(code, 200)
        self.assertIn(b"nbd_connections_total 0.0", body)
        [kind] = request.responseHeaders.getRawHeaders(b"content-type")
        self.assertTrue(kind.startswith(b"text/plain"), kind)
        code, body, request = get(page, accept=b"application/openmetrics-text")
        [kind] = request.responseHeaders.getRawHeaders(b"content-type")
        self.assertTrue(kind.startswith(b"application/openmetrics-text"), kind)
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_ready_and_draining(self) -> None:
        """
        The service around a server built by L{build} is ready once started
        and listening, and answers 503 while the server drains (the HTTP
        endpoint stops only after it).
        """
        reactor = MemoryReactorClock()
        server = build(
            Config([ExportSpec(name="a", memory=SIZE)], listen=("tcp:0:interface=127.0.0.1",)),
            reactor,
        )
        top = attach(server, None, reactor, metrics="tcp:0:interface=127.0.0.1")
        assert isinstance(top, OpsService)
        self.assertEqual(top.ready(), "starting")
        top.startService()
        self.assertIsNone(top.ready())
        self.assertEqual(len(reactor.tcpServers), 2)
        # A connection in flight keeps the server draining.
        factory = server.factory
        proto = factory.buildProtocol(None)
        assert proto is not None
        proto.makeConnection(StringTransport())
        proto.dataReceived(b.client_flags() + b.go("a"))
        exports = server.registry.exports
        saved = dict(exports)
        exports.clear()
        self.assertEqual(top.ready(), "no exports")
        exports.update(saved)
        stopped = top.stopService()
        self.assertEqual(top.ready(), "draining")
        self.assertNoResult(stopped)
        proto.connectionLost()
        reactor.advance(0)
        self.successResultOf(stopped)


class DocsTests(SynchronousTestCase):
    """docs/metrics.md lists every metric, and only those."""

    def test_every_metric_documented(self) -> None:
        import re
        from pathlib import Path

        page = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
        documented = set(re.findall(r"^\| `(nbd_[a-z_]+)` \|", page, re.MULTILINE))
        exposed = set()
        for family in NBDCollector(lambda: []).collect():
            exposed.add(family.name + ("_total" if family.type == "counter" else ""))
        self.assertEqual(documented, exposed)
