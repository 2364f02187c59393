"""
Tests for L{twisted_nbd.admin_workers}: the supervisor's side over fake
workers (control channels on L{StringTransport}s, answered by the test),
and a worker's side (L{WorkerExports}) over a single-process server.
The real processes are in tests/interop/test_admin_workers.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from io import BytesIO
from typing import Any, Callable, cast

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from twisted_nbd.admin import AdminResource
from twisted_nbd.admin_workers import READ_TIMEOUT, SupervisorExports, WorkerExports
from twisted_nbd.backends import OpenContext
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.config import Config, ExportSpec
from twisted_nbd.service import build
from twisted_nbd.tap import Options
from twisted_nbd.workers import _Control, _Worker

SIZE = 1 << 20


class FDTransport(StringTransport):
    """A control socket's transport that records the descriptors sent."""

    def __init__(self) -> None:
        StringTransport.__init__(self)
        self.fds: list[int] = []

    def sendFileDescriptor(self, fd: int) -> None:  # noqa: N802 - Twisted's name
        self.fds.append(fd)


def request(
    resource: AdminResource, method: str, path: str, body: object = None
) -> tuple[Any, object]:
    """Start one request: it and what render returned."""
    location, _, query = path.partition("?")
    req: Any = DummyRequest([p.encode() for p in location.strip("/").split("/")])
    req.method = method.encode()
    req.uri = path.encode()
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        req.addArg(key.encode(), value.encode())
    req.content = BytesIO(b"" if body is None else json.dumps(body).encode())
    rendered = resource.render(req)
    if isinstance(rendered, bytes):  # answered at once (as twisted.web would finish it)
        req.write(rendered)
        req.finish()
    return req, rendered


def answer_of(req: Any) -> tuple[int, Any]:
    """The status and JSON body of a finished request."""
    assert req.finished == 1, "not answered"
    return req.responseCode or 200, json.loads(b"".join(req.written))


class SupervisorTests(SynchronousTestCase):
    """The supervisor asks every worker and answers once all have."""

    def setUp(self) -> None:
        options = Options()
        options.parseOptions(["--memory", "1M", "--name", "a", "--workers", "2"])
        self.reactor = MemoryReactorClock()
        self.server: Any = cast(Any, build(options.config, self.reactor))
        self.addCleanup(lambda: self.server.getServiceNamed("device").stopService())
        self.pool = self.server.pool
        self.pool._stopping = True  # a fake worker's end starts no process
        self.transports: list[FDTransport] = []
        for index in range(2):
            worker = _Worker(index, started=0.0)
            control = _Control(self.pool, worker)
            transport = FDTransport()
            control.makeConnection(transport)
            worker.control = control
            self.pool.workers[index] = worker
            self.transports.append(transport)
        self.manager = SupervisorExports(self.server, options.config, self.reactor)
        self.api = AdminResource(self.manager)

    def requests(self, index: int) -> list[dict[str, Any]]:
        """The requests worker C{index} was sent and has not been answered."""
        transport = self.transports[index]
        lines = [json.loads(line) for line in transport.value().splitlines()]
        transport.clear()
        return lines

    def answer(self, index: int, reply: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        worker = self.pool.workers[index]
        for message in self.requests(index):
            line = json.dumps({**reply(message), "answer": message["request"]})
            worker.control.lineReceived(line.encode())

    def describe(self, names: list[str], users: int = 0) -> Callable[[Any], dict[str, Any]]:
        def reply(message: dict[str, Any]) -> dict[str, Any]:
            self.assertEqual(message["op"], "exports")
            return {
                "exports": [
                    {"name": n, "size": SIZE, "connections": users, "default": False} for n in names
                ]
            }

        return reply

    def test_put_and_remove(self) -> None:
        """
        PUT sends the spec and the RAM disk's two descriptors to every
        worker and answers once all have; DELETE is forwarded with its
        mode, counts the connections of all, and the supervisor's copy of
        the device is closed then.
        """
        req, rendered = request(self.api, "PUT", "/exports/b", {"memory": "1M"})
        self.assertEqual(rendered, NOT_DONE_YET)
        [put0], [put1] = self.requests(0), self.requests(1)
        self.assertEqual((put0["op"], put0["spec"]["name"], put0["fds"]), ("put", "b", 2))
        self.assertEqual(len(self.transports[0].fds), 2)
        self.assertEqual(self.transports[0].fds, self.transports[1].fds)
        self.assertEqual([s.name for s, _ in self.pool.shared], ["a", "b"])
        for index, message in ((0, put0), (1, put1)):
            line = {"outcome": "created", "answer": message["request"]}
            self.pool.workers[index].control.lineReceived(json.dumps(line).encode())
        self.assertEqual(req.finished, 0)  # then it asks for the description
        for index in (0, 1):
            self.answer(index, self.describe(["a", "b"]))
        status, body = answer_of(req)
        self.assertEqual((status, body["outcome"], body["workers"]), (201, "created", 2))
        [device] = [d for d in self.server.getServiceNamed("device").devices if d.size == SIZE][1:]

        req, _ = request(self.api, "DELETE", "/exports/b?mode=soft")
        for index in (0, 1):
            self.answer(
                index,
                lambda m: {"removed": {"name": m["name"], "existed": True, "connections": 1}},
            )
        self.assertEqual(
            answer_of(req),
            (200, {"name": "b", "existed": True, "mode": "soft", "connections": 2}),
        )
        self.assertNotIn(device, self.server.getServiceNamed("device").devices)
        self.assertEqual([s.name for s, _ in self.pool.shared], ["a"])

    def test_worker_dies(self) -> None:
        """A worker that dies before answering is not waited for."""
        req, _ = request(self.api, "DELETE", "/exports/a?mode=hard")
        self.answer(0, lambda m: {"removed": {"connections": 3}})
        self.assertEqual(req.finished, 0)
        worker = self.pool.workers[1]
        self.pool._ended(worker, Failure(RuntimeError("killed")))
        self.assertEqual(answer_of(req)[1]["connections"], 3)
        self.assertEqual(self.pool.shared, [])

    def test_timeout(self) -> None:
        """
        GET /connections merges the workers' lists; one that does not
        answer in time is left out, and its late answer is ignored.
        """
        req, _ = request(self.api, "GET", "/connections")
        self.answer(0, lambda m: {"connections": [{"id": 1, "export": "a"}]})
        late = self.requests(1)
        self.reactor.advance(READ_TIMEOUT)
        self.assertEqual(
            answer_of(req), (200, {"connections": [{"id": 1, "export": "a", "worker": 0}]})
        )
        line = json.dumps({"connections": [], "answer": late[0]["request"]})
        self.pool.workers[1].control.lineReceived(line.encode())
        self.flushLoggedErrors()  # the timeout's warning, no error

    def test_not_shareable(self) -> None:
        """A backend that workers cannot share: 422 at once, nothing sent."""
        req, _ = request(self.api, "PUT", "/exports/p", {"backend": "pattern:size=1M"})
        status, body = answer_of(req)
        self.assertEqual((status, body["error"]), (422, "not-shareable"))
        self.assertEqual(self.requests(0), [])


class WorkerSideTests(SynchronousTestCase):
    """L{WorkerExports.answer} applies the supervisor's requests."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        spec = ExportSpec(name="a", memory=SIZE)
        config = Config([spec], listen=("tcp:0",))
        self.server: Any = cast(Any, build(config, self.reactor))
        self.server.startService()
        self.addCleanup(self.server.stopService)
        self.exports = WorkerExports(
            self.server, config, self.reactor, OpenContext(self.reactor, 1), track=True
        )

    def test_put_remove(self) -> None:
        """A shared RAM disk is served over the descriptors sent; then removed."""
        disk = MappedMemoryDevice(SIZE)
        self.addCleanup(disk.close)
        disk.write(0, b"shared")
        spec = ExportSpec(name="b", memory=SIZE)
        fds = [os.dup(fd) for fd in disk.share()]
        self.assertEqual(
            self.exports.answer({"op": "put", "spec": asdict(spec)}, fds),
            {"outcome": "created"},
        )
        device = self.server.registry.exports["b"].device
        self.assertEqual(self.successResultOf(device.read(0, 6)), b"shared")
        # The same again: the descriptors sent are closed, not leaked.
        again = [os.dup(fd) for fd in disk.share()]
        self.assertEqual(
            self.exports.answer({"op": "put", "spec": asdict(spec)}, again),
            {"outcome": "unchanged"},
        )
        for fd in again:
            self.assertRaises(OSError, os.fstat, fd)
        names = [e["name"] for e in self.exports.answer({"op": "exports"}, [])["exports"]]
        self.assertEqual(names, ["a", "b"])
        self.assertEqual(self.exports.answer({"op": "connections"}, []), {"connections": []})
        removed = self.exports.answer({"op": "remove", "name": "b", "mode": "soft"}, [])
        self.assertEqual(removed["removed"]["existed"], True)
        self.assertNotIn("b", self.server.registry.exports)
        self.assertEqual(self.exports.answer({"op": "default", "name": "a"}, []), {})
        self.assertEqual(self.server.registry.default_name, "a")

    def test_bad(self) -> None:
        """An unknown request, a bad mode: an error answer, no exception."""
        self.assertEqual(self.exports.answer({"op": "nonsense"}, [])["status"], 400)
        bad = self.exports.answer({"op": "remove", "name": "a", "mode": "gentle"}, [])
        self.assertEqual(bad["code"], "bad-mode")
