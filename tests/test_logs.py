"""
Tests for L{twisted_nbd.logs}: the structured events of connections,
errors and (with C{--verbose}) requests, over a L{StringTransport}; the
JSON observer; and C{--verbose} reaching the factory.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, eventFromJSON, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests import builders as b
from twisted_nbd import logs
from twisted_nbd._wire import Cmd, Errno, Opt
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.observers import ConnectionInfo
from twisted_nbd.protocol import NBDServerFactory
from twisted_nbd.service import make_factory
from twisted_nbd.tap import Options
from twisted_nbd.testing import ControllableBlockDevice

SIZE = 1 << 20


def collect(case: SynchronousTestCase) -> list[dict[str, Any]]:
    """The events of L{twisted_nbd.logs} published while C{case} runs."""
    events: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if "nbd_event" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["nbd_event"] == kind]


class ConnectionEventTests(SynchronousTestCase):
    """One event per connection open and close, and per error, with their fields."""

    def setUp(self) -> None:
        self.events = collect(self)
        self.clock = Clock()
        self.clock.advance(1000)
        self.device = ControllableBlockDevice(SIZE)
        registry = ExportRegistry.of([Export("disk", self.device)])
        self.factory = NBDServerFactory(registry, reactor=self.clock)
        self.connect(self.factory)

    def connect(self, factory: NBDServerFactory) -> None:
        proto = factory.buildProtocol(None)
        assert proto is not None
        self.proto = proto
        self.proto.makeConnection(StringTransport())

    def test_open_and_close(self) -> None:
        """
        The open event names the client; the close event adds the export,
        the counts of requests and bytes, the duration by the factory's
        clock and the reason; both are readable text.
        """
        [opened] = of(self.events, "connection-open")
        self.assertEqual(opened["peer"], "192.168.1.1:54321")
        self.assertEqual(opened["log_namespace"], "twisted_nbd.connections")
        connection = opened["connection"]
        self.proto.dataReceived(b.client_flags() + b.go("disk"))
        [chosen] = of(self.events, "export-chosen")
        self.assertEqual((chosen["export"], chosen["connection"]), ("disk", connection))
        self.assertIn("uses export 'disk'", formatEvent(chosen))
        self.proto.dataReceived(
            b.write(1, 0, b"x" * 4096)
            + b.read(2, 0, 512)
            + b.read(3, 512, 1024)
            + b.request(Cmd.FLUSH, 4)
        )
        self.device.take("write").succeed(None)
        self.device.take("read").succeed(bytes(512))
        self.device.take("read").fail(NBDError(Errno.EIO, "bad sector"))
        self.device.take("flush").succeed(None)
        self.clock.advance(2.5)
        self.proto.connectionLost()
        [closed] = of(self.events, "connection-close")
        expected = {
            "connection": connection,
            "peer": "192.168.1.1:54321",
            "export": "disk",
            "tls_peer": "",
            "requests": 4,
            "bytes_read": 1536,
            "bytes_written": 4096,
            "duration": 2.5,
            "reason": "closed",
        }
        self.assertEqual({k: closed[k] for k in expected}, expected)
        self.assertEqual(closed["errors"], 1)
        text = formatEvent(closed)
        self.assertIn("disconnected (closed) after 2.500s", text)
        self.assertIn("4 requests (1 failed), 1536 bytes read, 4096 bytes written", text)

    def test_close_reason(self) -> None:
        """A connection dropped for a protocol violation says so, with no export."""
        self.proto.dataReceived(b"not an NBD client at all, sixteen+")
        # StringTransport does not call connectionLost when aborted.
        self.proto.connectionLost()
        [closed] = of(self.events, "connection-close")
        self.assertIsNone(closed["export"])
        self.assertIn("protocol violation", closed["reason"])

    def test_request_failed(self) -> None:
        """A backend's error: errno, command, offset, length and reason, at warn."""
        self.proto.dataReceived(b.client_flags() + b.go("disk") + b.read(1, 4096, 512))
        self.device.take("read").fail(NBDError(28, "disk full"))
        [failed] = of(self.events, "request-failed")
        expected = {
            "command": "READ",
            "offset": 4096,
            "length": 512,
            "errno": "ENOSPC",
            "reason": "disk full",
            "export": "disk",
        }
        self.assertEqual({k: failed[k] for k in expected}, expected)
        self.assertEqual(failed["log_level"].name, "warn")
        self.assertEqual(
            formatEvent(failed),
            "READ at 4096 for 512 bytes from 192.168.1.1:54321 failed: ENOSPC: disk full",
        )
        self.assertEqual(self.proto.info.errors, 1)

    def test_backend_bug(self) -> None:
        """An unexpected exception is an EIO with its traceback in the event."""
        self.proto.dataReceived(b.client_flags() + b.go("disk") + b.write(1, 0, b"y" * 512))
        self.device.take("write").fail(ZeroDivisionError("oops"))
        [failed] = of(self.events, "request-failed")
        self.assertEqual((failed["command"], failed["errno"]), ("WRITE", "EIO"))
        self.assertIn("ZeroDivisionError", failed["reason"])
        self.assertIsInstance(failed["log_failure"].value, ZeroDivisionError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_request_refused(self) -> None:
        """A request refused by the kernel (out of range) has its range and errno."""
        self.proto.dataReceived(b.client_flags() + b.go("disk") + b.read(1, SIZE, 512))
        [refused] = of(self.events, "request-refused")
        expected = {"command": "READ", "offset": SIZE, "length": 512, "errno": "EINVAL"}
        self.assertEqual({k: refused[k] for k in expected}, expected)
        self.assertIn("Refused READ at 1048576 for 512 bytes", formatEvent(refused))
        self.assertEqual(self.device.calls, [])

    def test_no_request_events_by_default(self) -> None:
        """Without --verbose there is no per-request event, and no observer."""
        self.proto.dataReceived(b.client_flags() + b.go("disk") + b.read(1, 0, 512))
        self.device.take("read").succeed(bytes(512))
        self.assertEqual(of(self.events, "request"), [])
        self.assertEqual(self.factory.observers, [])

    def test_verbose(self) -> None:
        """RequestLog logs every request as it finishes, at debug, with its time."""
        registry = ExportRegistry.of([Export("disk", self.device)])
        factory = NBDServerFactory(registry, reactor=self.clock, observers=[logs.RequestLog()])
        self.connect(factory)
        self.proto.dataReceived(b.client_flags() + b.go("disk") + b.read(1, 0, 512))
        self.clock.advance(0.125)
        self.device.take("read").succeed(bytes(512))
        self.proto.dataReceived(b.request(Cmd.TRIM, 2, 0, 4096))
        self.device.take("trim").fail(NBDError(1, "no"))
        requests = of(self.events, "request")
        self.assertEqual(
            [(e["command"], e["offset"], e["length"], e["errno"]) for e in requests],
            [("READ", 0, 512, "OK"), ("TRIM", 0, 4096, "EPERM")],
        )
        self.assertEqual(requests[0]["elapsed"], 0.125)
        self.assertEqual(requests[0]["log_level"].name, "debug")
        self.assertEqual(requests[0]["log_namespace"], "twisted_nbd.requests")

    def test_option_refused_is_not_an_error(self) -> None:
        """Option haggling refusals are not request errors."""
        self.proto.dataReceived(b.client_flags() + b.option(Opt.STARTTLS) + b.go("disk"))
        self.assertEqual(of(self.events, "request-refused"), [])
        self.assertEqual(self.proto.info.errors, 0)


class JSONObserverTests(SynchronousTestCase):
    """json_observer writes one JSON object per line, that Twisted reads back."""

    def test_lines(self) -> None:
        out = io.StringIO()
        observer = logs.json_observer(out)
        events = collect(self)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        info = ConnectionInfo(peer="127.0.0.1:1", started=0.0)
        info.export, info.requests, info.bytes_read = "disk", 3, 1536
        logs.connection_closed(info, "closed", 1.5)
        self.assertEqual(len(events), 1)
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["nbd_event"], "connection-close")
        self.assertEqual((record["requests"], record["bytes_read"]), (3, 1536))
        self.assertEqual(record["log_namespace"], "twisted_nbd.connections")
        self.assertIn("disconnected (closed) after 1.500s", record["log_text"])
        # Twisted reads the line back as an event with the same fields.
        self.assertEqual(eventFromJSON(line)["bytes_read"], 1536)

    def test_file_from_environment(self) -> None:
        """With TWISTED_NBD_JSON_LOG set, lines are appended to that file."""
        path = self.mktemp()
        os.environ[logs.JSON_LOG_ENV] = path
        self.addCleanup(os.environ.pop, logs.JSON_LOG_ENV)
        observer = logs.json_observer()
        stream: Any = observer._outFile
        self.addCleanup(stream.close)
        observer({"log_format": "hello {who}", "who": "there", "log_time": 0.0})
        stream.flush()
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.loads(f.read())["log_text"], "hello there")


class VerboseOptionTests(SynchronousTestCase):
    """--verbose puts a RequestLog on the factory; without it there is none."""

    def factory(self, *args: str) -> NBDServerFactory:
        options = Options()
        options.parseOptions(["--memory", "1M", *args])
        registry = ExportRegistry.of([Export("", ControllableBlockDevice(SIZE))])
        return make_factory(options.config, registry, Clock())

    def test_verbose(self) -> None:
        [observer] = self.factory("--verbose").observers
        self.assertIsInstance(observer, logs.RequestLog)
        [short] = self.factory("-v").observers
        self.assertIsInstance(short, logs.RequestLog)

    def test_default(self) -> None:
        self.assertEqual(self.factory().observers, [])
