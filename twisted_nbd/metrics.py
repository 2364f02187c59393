# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics of an NBD server (C{twistd nbd --metrics ENDPOINT}).

L{MetricsObserver} is an L{IServerObserver} (and L{IFlowObserver}): it
counts connections, requests by command and outcome, bytes, latencies,
what is in flight and how long reading was paused by flow control, per
export, in plain Python numbers. L{snapshot <MetricsObserver.snapshot>}
turns them into JSON-able data; L{NBDCollector} turns one or more
snapshots (summed) into Prometheus metric families for a
C{prometheus_client.CollectorRegistry} of the server's own (never the
global one, so two servers in one process do not mix).

With C{--workers N} each worker keeps its own observer and sends its
snapshot to the supervisor over the control channel (once a second when
something changed, and when a connection closes); L{WorkerMetrics} in the
supervisor keeps the last snapshot of each worker and, when a worker
exits, folds its counters into a retired total so that no counter ever
goes backwards. A scrape therefore sees each worker as it was at most a
second ago. Gauges (open connections, requests in flight) of a worker
that died are dropped with it.

Every metric is listed in docs/metrics.md.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from zope.interface import implementer

from twisted_nbd._wire import Cmd, Errno
from twisted_nbd.observers import ConnectionInfo, IFlowObserver, IServerObserver, ServerObserver

__all__ = [
    "BUCKETS",
    "MetricsObserver",
    "NBDCollector",
    "WorkerMetrics",
    "merge",
    "slots_snapshot",
]

#: Upper bounds (seconds) of the request latency histogram's buckets.
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)

#: The counters (summed across workers and kept when a worker dies), and
#: the gauges (summed across live workers only), of a snapshot: name to
#: label names.
_COUNTERS: dict[str, tuple[str, ...]] = {
    "connections": (),
    "refused": ("reason",),
    "dropped": ("reason",),
    "requests": ("export", "command", "outcome"),
    "read_bytes": ("export",),
    "written_bytes": ("export",),
    "paused_seconds": ("export",),
}
_GAUGES: dict[str, tuple[str, ...]] = {
    "open": (),
    "negotiating": (),
    "export_connections": ("export",),
    "in_flight": ("export",),
    "bytes_in_flight": ("export",),
}


#: The label values of commands and outcomes, looked up once (an enum
#: lookup per request would cost more than all the counting).
_COMMAND_NAMES: dict[int, str] = {int(c): c.name for c in Cmd}
_OUTCOMES: dict[int, str] = {0: "ok", **{int(e): e.name for e in Errno}}


def _command_name(command: int) -> str:
    name = _COMMAND_NAMES.get(command)
    return name if name is not None else str(command)


def _outcome(errno: int) -> str:
    name = _OUTCOMES.get(errno)
    return name if name is not None else f"errno{errno}"


@implementer(IServerObserver, IFlowObserver)
class MetricsObserver(ServerObserver):
    """
    Counts what happens on a server's connections (see the module
    docstring). Every method runs in the reactor thread and does a few
    dictionary updates.

    @ivar slots: the factory's L{twisted_nbd.limits.ConnectionSlots}, whose
        refusals and drops are counted there (a refused connection never
        reaches an observer); set it after making the factory.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.slots: Any = None
        self.connections = 0
        self.open = 0
        self.chosen = 0
        self.export_connections: Counter[str] = Counter()
        # The per-request tables are plain dicts keyed by numbers (names are
        # looked up when a snapshot is taken): this runs on every request.
        # (export, command, errno) -> count
        self.requests: dict[tuple[str, int, int], int] = {}
        self.read_bytes: dict[str, int] = {}
        self.written_bytes: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.bytes_in_flight: dict[str, int] = {}
        self.paused_seconds: dict[str, float] = {}
        # (export, command) -> per-bucket counts (the last one: +Inf), then the sum.
        self.latency: dict[tuple[str, int], list[float]] = {}
        self._paused_since: dict[int, tuple[str, float]] = {}
        #: Bumped on every change, so a reporter can tell whether to send.
        self.version = 0

    # IServerObserver

    def connection_made(self, connection: ConnectionInfo) -> None:
        self.version += 1
        self.connections += 1
        self.open += 1

    def export_chosen(self, connection: ConnectionInfo, name: str) -> None:
        self.version += 1
        self.chosen += 1
        self.export_connections[name] += 1

    def connection_lost(self, connection: ConnectionInfo, reason: str) -> None:
        self.version += 1
        self.open -= 1
        if connection.export is not None:
            self.chosen -= 1
            self.export_connections[connection.export] -= 1
        self._end_pause(connection)

    def request_started(self, connection: ConnectionInfo, request: Any) -> None:
        self.version += 1
        export = connection.export or ""
        in_flight = self.in_flight
        in_flight[export] = in_flight.get(export, 0) + 1
        command = request.command
        if command == _READ or command == _WRITE:
            held = self.bytes_in_flight
            held[export] = held.get(export, 0) + request.length

    def request_finished(
        self, connection: ConnectionInfo, request: Any, errno: int, elapsed: float
    ) -> None:
        self.version += 1
        export = connection.export or ""
        command = request.command
        in_flight = self.in_flight
        in_flight[export] = in_flight.get(export, 0) - 1
        if command == _READ or command == _WRITE:
            length = request.length
            held = self.bytes_in_flight
            held[export] = held.get(export, 0) - length
            if not errno:
                done = self.read_bytes if command == _READ else self.written_bytes
                done[export] = done.get(export, 0) + length
        key = (export, command, errno)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self.latency.get((export, command))
        if histogram is None:
            histogram = self.latency[export, command] = [0.0] * (len(BUCKETS) + 2)
        histogram[bisect_left(BUCKETS, elapsed)] += 1
        histogram[-1] += elapsed

    def request_refused(
        self, connection: ConnectionInfo, cookie: int, command: int, errno: int, reason: str
    ) -> None:
        self.version += 1
        key = (connection.export or "", command, errno)
        self.requests[key] = self.requests.get(key, 0) + 1

    # IFlowObserver

    def reading_paused(self, connection: ConnectionInfo) -> None:
        self._paused_since[connection.id] = (connection.export or "", self._clock())

    def reading_resumed(self, connection: ConnectionInfo) -> None:
        self._end_pause(connection)

    def _end_pause(self, connection: ConnectionInfo) -> None:
        paused = self._paused_since.pop(connection.id, None)
        if paused is not None:
            self.version += 1
            export, since = paused
            self.paused_seconds[export] = self.paused_seconds.get(export, 0.0) + max(
                0.0, self._clock() - since
            )

    # Reporting

    def snapshot(self) -> dict[str, Any]:
        """
        The numbers as JSON-able data: each metric a list of rows, the label
        values followed by the value (see L{merge}). Pauses still under way
        count up to now.
        """
        paused = dict(self.paused_seconds)
        now = self._clock()
        for export, since in self._paused_since.values():
            paused[export] = paused.get(export, 0.0) + max(0.0, now - since)
        slots = self.slots
        refused: Counter[str] = slots.refused if slots is not None else Counter()
        dropped: Counter[str] = slots.dropped if slots is not None else Counter()

        def rows(table: Any) -> list[list[Any]]:
            return [[*(k if isinstance(k, tuple) else (k,)), v] for k, v in table.items()]

        return {
            "connections": [[self.connections]],
            "open": [[self.open]],
            "negotiating": [[self.open - self.chosen]],
            "export_connections": rows(self.export_connections),
            "refused": rows(refused),
            "dropped": rows(dropped),
            "requests": [
                [export, _command_name(command), _outcome(errno), count]
                for (export, command, errno), count in self.requests.items()
            ],
            "read_bytes": rows(self.read_bytes),
            "written_bytes": rows(self.written_bytes),
            "in_flight": rows(self.in_flight),
            "bytes_in_flight": rows(self.bytes_in_flight),
            "paused_seconds": rows(paused),
            "latency": [
                [export, _command_name(command), list(values)]
                for (export, command), values in self.latency.items()
            ],
        }


def merge(snapshots: Iterable[dict[str, Any]], gauges: bool = True) -> dict[str, Any]:
    """
    Sum snapshots (of L{MetricsObserver.snapshot}) row by row, matching
    rows by their labels.

    @param gauges: include the gauges; C{False} keeps only what must never
        go backwards (counters and histograms).
    @return: a snapshot.
    """
    names = dict(_COUNTERS, **(_GAUGES if gauges else {}))
    tables: dict[str, dict[tuple[Any, ...], float]] = {name: {} for name in names}
    latency: dict[tuple[str, str], list[float]] = {}
    for snapshot in snapshots:
        for name in names:
            table = tables[name]
            for row in snapshot.get(name, ()):
                key = tuple(row[:-1])
                table[key] = table.get(key, 0) + row[-1]
        for export, command, values in snapshot.get("latency", ()):
            into = latency.setdefault((export, command), [0.0] * (len(BUCKETS) + 2))
            for i, value in enumerate(values[: len(into)]):
                into[i] += value
    result: dict[str, Any] = {
        name: [[*key, value] for key, value in table.items()] for name, table in tables.items()
    }
    result["latency"] = [[*key, values] for key, values in latency.items()]
    return result


class WorkerMetrics:
    """
    The supervisor's view of its workers' metrics (see the module
    docstring): the last snapshot of each live worker, and the counters of
    those that exited.
    """

    def __init__(self) -> None:
        self._live: dict[object, dict[str, Any]] = {}
        self._retired: dict[str, Any] = merge([])
        #: The supervisor's own snapshot source (its refusals), if any.
        self.local: Callable[[], dict[str, Any]] | None = None

    def update(self, worker: object, snapshot: object) -> None:
        """C{worker} reported C{snapshot}; anything but a dict is ignored."""
        if isinstance(snapshot, dict):
            self._live[worker] = snapshot

    def retire(self, worker: object) -> None:
        """C{worker} exited: keep its counters, forget its gauges."""
        last = self._live.pop(worker, None)
        if last is not None:
            self._retired = merge([self._retired, last], gauges=False)

    def snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot to sum for a scrape."""
        found = [self._retired, *self._live.values()]
        if self.local is not None:
            found.append(self.local())
        return found


class NBDCollector:
    """
    A C{prometheus_client} collector of the snapshots C{source} returns,
    summed (see docs/metrics.md for the metrics).
    """

    def __init__(self, source: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        # Describing by collecting would call the source at registration;
        # nothing needs the descriptions early.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        data = merge(self._source())

        def family(kind: Any, name: str, help: str, key: str) -> Any:
            labels = _COUNTERS.get(key, _GAUGES.get(key, ()))
            metric = kind(name, help, labels=list(labels))
            for row in data[key]:
                metric.add_metric([str(v) for v in row[:-1]], row[-1])
            return metric

        yield family(CounterMetricFamily, "nbd_connections", "Connections accepted.", "connections")
        yield family(GaugeMetricFamily, "nbd_connections_open", "Connections open.", "open")
        yield family(
            GaugeMetricFamily,
            "nbd_connections_negotiating",
            "Open connections that have not chosen an export yet.",
            "negotiating",
        )
        yield family(
            GaugeMetricFamily,
            "nbd_export_connections",
            "Open connections using each export.",
            "export_connections",
        )
        yield family(
            CounterMetricFamily,
            "nbd_connections_refused",
            "Connections refused before the greeting, by the limit that refused them.",
            "refused",
        )
        yield family(
            CounterMetricFamily,
            "nbd_connections_dropped",
            "Connections closed by a timeout (handshake-timeout, idle-timeout).",
            "dropped",
        )
        yield family(
            CounterMetricFamily,
            "nbd_requests",
            "Requests answered, by export, command and outcome (ok or the errno sent).",
            "requests",
        )
        yield family(
            CounterMetricFamily,
            "nbd_read_bytes",
            "Bytes returned by successful READs.",
            "read_bytes",
        )
        yield family(
            CounterMetricFamily,
            "nbd_written_bytes",
            "Bytes stored by successful WRITEs.",
            "written_bytes",
        )
        yield family(
            GaugeMetricFamily,
            "nbd_requests_in_flight",
            "Requests handed to the backend and not yet answered.",
            "in_flight",
        )
        yield family(
            GaugeMetricFamily,
            "nbd_request_bytes_in_flight",
            "READ and WRITE payload bytes of the requests in flight.",
            "bytes_in_flight",
        )
        yield family(
            CounterMetricFamily,
            "nbd_reading_paused_seconds",
            "Seconds connections spent not being read because of flow control.",
            "paused_seconds",
        )
        latency = HistogramMetricFamily(
            "nbd_request_duration_seconds",
            "Seconds from handing a request to the backend to sending its reply.",
            labels=["export", "command"],
        )
        bounds = [repr(b) for b in BUCKETS] + ["+Inf"]
        for export, command, values in data["latency"]:
            cumulative = 0.0
            buckets = []
            for bound, count in zip(bounds, values[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([export, command], buckets, sum_value=values[-1])
        yield latency


def slots_snapshot(slots: Any) -> dict[str, Any]:
    """A snapshot of a L{twisted_nbd.limits.ConnectionSlots}' refusals and drops alone."""
    return {
        "refused": [[k, v] for k, v in slots.refused.items()],
        "dropped": [[k, v] for k, v in slots.dropped.items()],
    }
