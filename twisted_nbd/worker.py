# -*- test-case-name: tests.test_workers -*-
"""
A worker process of C{twistd nbd --workers N}; see L{twisted_nbd.workers}.

Started by the supervisor as C{python -m twisted_nbd.worker --index N}, with
its settings as JSON on standard input, its control socket on descriptor 3
and the shared devices' descriptors after it. It serves the connections the
supervisor hands it, logs to standard output (the supervisor relays it),
drains and exits on SIGTERM, and exits as well if the supervisor goes away.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from typing import Any, Sequence, cast

from twisted.application.service import Service
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import FileLogObserver, Logger, eventAsJSON, globalLogBeginner
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_nbd._process import tune_allocator
from twisted_nbd.backends import OpenContext
from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.exports import ExportRegistry
from twisted_nbd.limits import Limits
from twisted_nbd.metrics import MetricsObserver
from twisted_nbd.observers import ConnectionInfo, ServerObserver
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.service import (
    IO_THREADS,
    BlockDeviceService,
    NBDService,
    connection_layers,
    export_of,
    make_factory,
    with_filters,
)
from twisted_nbd.tls import TLSSettings
from twisted_nbd.workers import CONTROL_FD, _OneProtocolFactory, shared_device

__all__ = ["main"]

#: After draining, the longest a worker waits for its last metrics report to
#: reach the supervisor.
STOP_FLUSH = 2.0

_log = Logger()


@implementer(IFileDescriptorReceiver)
class WorkerControl(LineReceiver):
    """The worker's end of the control socket: adopts the connections it is given."""

    delimiter = b"\n"

    def __init__(self, reactor: Any, factory: NBDServerFactory, lost: Any) -> None:
        self.reactor = reactor
        self.factory = factory
        self._lost = lost
        self._fds: list[int] = []
        self.closed = False
        #: Answers the supervisor's admin requests (see
        #: L{twisted_nbd.admin_workers.WorkerExports.answer}).
        self.answer: Any = None

    def fileDescriptorReceived(self, descriptor: int) -> None:  # noqa: N802 - Twisted's name
        self._fds.append(descriptor)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - LineReceiver's name
        try:
            message = json.loads(line)
            if isinstance(message, dict) and "request" in message:
                self._request(message)
                return
            connection_id = message["connection"]
            family = int(message["family"])
        except (ValueError, KeyError, TypeError):
            _log.warn("Bad control message {line!r}", line=line)
            return
        if not self._fds:
            _log.warn("Control message {line!r} without a descriptor", line=line)
            return
        fd = self._fds.pop(0)
        try:
            self.reactor.adoptStreamConnection(fd, family, self.factory)
        except Exception:
            _log.failure("Could not adopt connection {id}", id=connection_id)
        finally:
            os.close(fd)
        self.send({"adopted": connection_id})

    def _request(self, message: dict[str, Any]) -> None:
        count = message.get("fds", 0)
        if not isinstance(count, int) or count > len(self._fds):
            _log.warn("Admin request {line!r} without its descriptors", line=message)
            return
        fds, self._fds = self._fds[:count], self._fds[count:]
        answer: dict[str, Any]
        if self.answer is None:
            for fd in fds:
                os.close(fd)
            answer = {"error": "this worker takes no admin requests"}
        else:
            answer = self.answer(message, fds)
        self.send({**answer, "answer": message["request"]})

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.sendLine(json.dumps(message).encode("utf-8"))  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._lost()


class _MetricsReport:
    """
    Sends the worker's metrics snapshot to the supervisor (see
    L{twisted_nbd.metrics}): every L{INTERVAL} seconds if anything changed,
    and soon after a connection closes, so totals are complete as soon as
    a client has gone.
    """

    INTERVAL = 1.0

    def __init__(self, reactor: Any, metrics: MetricsObserver, control: WorkerControl) -> None:
        self.reactor = reactor
        self.metrics = metrics
        self.control = control
        self._sent = -1
        self._soon: Any = None

    def start(self) -> _MetricsReport:
        LoopingCall(self.send).start(self.INTERVAL, now=False).addErrback(
            lambda f: _log.failure("Metrics reports stopped", f)
        )
        return self

    def soon(self) -> None:
        if self._soon is None or not self._soon.active():
            self._soon = self.reactor.callLater(0, self.send)

    def send(self) -> None:
        if self.metrics.version != self._sent:
            self._sent = self.metrics.version
            self.control.send({"metrics": self.metrics.snapshot()})


class _Counter(ServerObserver):
    """
    Tells the supervisor how many connections this worker has, and how many
    of them are still negotiating (the factory counts them before telling
    its observers).
    """

    def __init__(self) -> None:
        self.factory: NBDServerFactory | None = None
        self.control: WorkerControl | None = None
        self.report: _MetricsReport | None = None

    def _tell(self) -> None:
        if self.control is not None and self.factory is not None:
            self.control.send(
                {
                    "connections": self.factory.connection_count,
                    "negotiating": self.factory.negotiating_count,
                }
            )

    def connection_made(self, connection: ConnectionInfo) -> None:
        self._tell()

    def export_chosen(self, connection: ConnectionInfo, name: str) -> None:
        self._tell()

    def connection_lost(self, connection: ConnectionInfo, reason: str) -> None:
        self._tell()
        if self.report is not None:
            self.report.soon()


def _format(event: dict[str, Any]) -> str | None:
    # One JSON object a line: the supervisor publishes the event again with
    # its fields (see twisted_nbd.logs), not just its text.
    return eventAsJSON(event) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker until it is told to stop; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m twisted_nbd.worker")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    tune_allocator()
    settings = json.load(sys.stdin)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stdout, _format)], redirectStandardIO=False
    )
    specs = [ExportSpec.from_json(spec) for spec in settings["exports"]]
    config = Config(
        specs,
        default=settings["default"],
        listen=(),
        max_queue_depth=settings["max_queue_depth"],
        max_bytes_in_flight=settings["max_bytes_in_flight"],
        shutdown_timeout=settings["shutdown_timeout"],
        poll_max=settings["poll_max"],
        tls=TLSSettings(**{**settings["tls"], "allow_dns": tuple(settings["tls"]["allow_dns"])}),
        limits=Limits.from_json(settings["limits"]),
        verbose=settings.get("verbose", False),
    )
    context = OpenContext(reactor, min(IO_THREADS, config.max_queue_depth))
    devices = []
    exports = []
    for spec in specs:
        # The filters are stacked here, in each worker, over the shared device;
        # check_workers allowed only those whose state may be per process.
        device = with_filters(
            spec, shared_device(spec, settings["shared"][spec.name], context), context
        )
        devices.append(device)
        exports.append(export_of(spec, device, connection_layers(spec, context)))
    registry = ExportRegistry.of(exports, config.default)
    counter = _Counter()
    metrics = MetricsObserver(reactor.seconds) if settings.get("metrics") else None
    factory = make_factory(config, registry, reactor, [counter, *([metrics] if metrics else [])])
    counter.factory = factory
    top = NBDService(factory, reactor, config.shutdown_timeout)
    device_service: Service = BlockDeviceService(devices, context.pool)
    device_service.setName("device")
    device_service.setServiceParent(top)
    from twisted_nbd.admin_workers import WorkerExports

    exports_manager = WorkerExports(
        top, config, reactor, context, track=bool(settings.get("admin"))
    )

    stopping: list[bool] = []
    drained: list[bool] = []

    def end() -> None:
        if reactor.running:
            reactor.stop()

    def stop() -> None:
        if stopping:
            if drained:
                end()  # the control socket closed: the last report is out
            return
        stopping.append(True)
        _log.info("Worker {index} stopping", index=args.index)

        def stopped(_: object) -> None:
            drained.append(True)
            if counter.report is not None and not control.closed:
                # The last counts, after the drain; closing the control
                # socket writes them out first, and its loss ends the worker.
                counter.report.send()
                cast(Any, control.transport).loseConnection()
                reactor.callLater(STOP_FLUSH, end)
            else:
                end()

        top.stopService().addBoth(stopped)

    control = WorkerControl(reactor, factory, stop)
    control.answer = exports_manager.answer
    counter.control = control
    if metrics is not None:
        metrics.slots = factory.slots
        counter.report = _MetricsReport(reactor, metrics, control).start()
    cast(Service, top).startService()
    reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX, _OneProtocolFactory(control))
    os.close(CONTROL_FD)
    # The supervisor decides when to stop: Ctrl-C in a terminal reaches the
    # whole process group, and a worker that left at once would cut its
    # requests short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(stop))
    control.send({"ready": True})
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
