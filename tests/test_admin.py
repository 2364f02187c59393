"""
Tests for L{twisted_nbd.admin}: the JSON admin API over a server built by
L{twisted_nbd.service.build} (connections over L{StringTransport}s), the
config reload and SIGHUP, and the checks of C{--admin} options.
"""

from __future__ import annotations

import json
import os
import signal
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, cast

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests import builders as b
from twisted_nbd.admin import (
    TOKEN_ENVIRONMENT,
    AdminResource,
    ExportManager,
    ReloadOnSignal,
    check_admin_endpoint,
    read_token,
)
from twisted_nbd.config import Config
from twisted_nbd.protocol import NBDServerProtocol
from twisted_nbd.service import NBDService, build
from twisted_nbd.tap import Options

SIZE = 1 << 20


def call(
    resource: AdminResource,
    method: str,
    path: str,
    body: object = None,
    token: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One request to the API: its status and decoded JSON body."""
    location, _, query = path.partition("?")
    request: Any = DummyRequest([p.encode() for p in location.strip("/").split("/")])
    request.method = method.encode()
    request.uri = path.encode()
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        request.addArg(key.encode(), value.encode())
    if raw is None:
        raw = b"" if body is None else json.dumps(body).encode()
    request.content = BytesIO(raw)
    if token is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    data = resource.render(request)
    assert isinstance(data, bytes)  # one process: answered at once
    [kind] = request.responseHeaders.getRawHeaders(b"content-type")
    assert kind == b"application/json", kind
    return request.responseCode or 200, json.loads(data)


class AdminTests(SynchronousTestCase):
    """Round trips through the API, including the bad requests."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.config_path = self.dir / "exports.toml"
        self.config_path.write_text('[[export]]\nname = "a"\nmemory = "1M"\n')
        from twisted_nbd.config import load_config

        config = load_config(str(self.config_path))
        self.server = build(Config(config.exports, listen=("tcp:0",)), self.reactor)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        self.manager = ExportManager(
            self.server, Config(config.exports), self.reactor, str(self.config_path)
        )
        self.api = AdminResource(self.manager)

    def connect(self, export: str) -> tuple[NBDServerProtocol, StringTransport]:
        proto = self.server.factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b.client_flags() + b.go(export))
        self.assertEqual(proto.info.export, export)
        return proto, transport

    def devices(self) -> list[Any]:
        return list(self.server.getServiceNamed("device").devices)

    def test_list(self) -> None:
        """GET /exports and /exports/NAME describe the exports."""
        code, body = call(self.api, "GET", "/exports")
        self.assertEqual(code, 200)
        [export] = body["exports"]
        self.assertEqual(
            {k: export[k] for k in ("name", "size", "backend", "default", "connections")},
            {"name": "a", "size": SIZE, "backend": "memory", "default": True, "connections": 0},
        )
        self.assertEqual(call(self.api, "GET", "/exports/a")[1]["name"], "a")
        code, body = call(self.api, "GET", "/exports/nope")
        self.assertEqual(code, 404)
        self.assertEqual(body["error"], "no-such-export")

    def test_connections(self) -> None:
        """GET /connections: client, export, bytes, age."""
        proto, transport = self.connect("a")
        proto.dataReceived(b.write(1, 0, b"x" * 4096) + b.read(2, 0, 512))
        self.reactor.advance(2.5)
        code, body = call(self.api, "GET", "/connections")
        self.assertEqual(code, 200)
        [connection] = body["connections"]
        self.assertEqual(connection["export"], "a")
        self.assertEqual(connection["written_bytes"], 4096)
        self.assertEqual(connection["read_bytes"], 512)
        self.assertEqual(connection["age"], 2.5)
        self.assertFalse(connection["tls"])
        self.assertIsNone(connection["tls_peer"])
        self.assertEqual(call(self.api, "GET", "/exports/a")[1]["connections"], 1)

    def test_put_idempotent(self) -> None:
        """
        PUT creates (201), the same again changes nothing (200,
        unchanged), another specification replaces it; a new client sees
        the export at once (with a filter stack).
        """
        spec = {"memory": "2M", "filters": ["readonly", "delay:delay=1ms"]}
        code, body = call(self.api, "PUT", "/exports/b", spec)
        self.assertEqual((code, body["outcome"], body["size"]), (201, "created", 2 * SIZE))
        self.assertEqual(body["filters"], ["readonly", "delay"])
        count = len(self.devices())
        code, body = call(self.api, "PUT", "/exports/b", spec)
        self.assertEqual((code, body["outcome"]), (200, "unchanged"))
        self.assertEqual(len(self.devices()), count)
        self.connect("b")
        code, body = call(self.api, "PUT", "/exports/b", {"memory": "3M"})
        self.assertEqual((code, body["outcome"], body["size"]), (200, "replaced", 3 * SIZE))
        # The old device stays open for the connection still using it.
        self.assertEqual(len(self.devices()), count + 1)

    def test_unnamed(self) -> None:
        """/exports?name= addresses the export with the empty name."""
        code, body = call(self.api, "PUT", "/exports?name=", {"memory": "1M"})
        self.assertEqual((code, body["name"]), (201, ""))
        self.assertEqual(call(self.api, "GET", "/exports?name=")[1]["name"], "")
        self.assertEqual(call(self.api, "DELETE", "/exports?name=")[1]["existed"], True)
        self.assertEqual(sorted(self.manager.registry.exports), ["a"])

    def test_post(self) -> None:
        """POST /exports adds one named in the body; an existing name is a 409."""
        code, body = call(self.api, "POST", "/exports", {"name": "c", "memory": "1M"})
        self.assertEqual((code, body["name"]), (201, "c"))
        code, body = call(self.api, "POST", "/exports", {"name": "c", "memory": "1M"})
        self.assertEqual((code, body["error"]), (409, "exists"))

    def test_bad_requests(self) -> None:
        """Bad JSON, bad specifications, unknown paths and methods: JSON errors."""
        cases: list[tuple[tuple[Any, ...], dict[str, Any], int, str]] = [
            (("PUT", "/exports/x"), {"raw": b"{nope"}, 400, "bad-json"),
            (("PUT", "/exports/x", [1]), {}, 400, "bad-request"),
            (("PUT", "/exports/x", {"memory": "1M", "colour": "red"}), {}, 422, "invalid-export"),
            (("PUT", "/exports/x", {"memory": "lots"}), {}, 422, "invalid-export"),
            (("PUT", "/exports/x", {"name": "y", "memory": "1M"}), {}, 422, "invalid-export"),
            (("PUT", "/exports/x", {}), {}, 422, "invalid-export"),
            (("PUT", "/exports/x", {"image": "/nonexistent/disk.img"}), {}, 422, ""),
            (("PUT", "/exports/x", {"backend": "nosuch"}), {}, 422, "invalid-export"),
            (("POST", "/exports", {"memory": "1M"}), {}, 422, "invalid-export"),
            (("DELETE", "/exports/a?mode=gentle"), {}, 400, "bad-mode"),
            (("GET", "/nothing"), {}, 404, "not-found"),
            (("PATCH", "/exports/a"), {}, 405, "method-not-allowed"),
            (("GET", "/reload"), {}, 405, "method-not-allowed"),
        ]
        for args, options, status, error in cases:
            code, body = call(self.api, *args, **options)
            self.assertEqual(code, status, (args, body))
            self.assertEqual(sorted(body), ["error", "reason"], args)
            if error:
                self.assertEqual(body["error"], error, args)
            self.assertTrue(body["reason"])
        self.assertEqual(sorted(self.manager.registry.exports), ["a"])
        self.assertEqual(call(self.api, "GET", "/exports/a")[0], 200)

    def test_token(self) -> None:
        """With a token every request needs it: 401 without or with another."""
        api = AdminResource(self.manager, token="s3cret")
        code, body = call(api, "GET", "/exports")
        self.assertEqual((code, body["error"]), (401, "unauthorized"))
        self.assertEqual(call(api, "GET", "/exports", token="wrong")[0], 401)
        self.assertEqual(call(api, "DELETE", "/exports/a", token="wrong")[0], 401)
        self.assertIn("a", self.manager.registry.exports)
        self.assertEqual(call(api, "GET", "/exports", token="s3cret")[0], 200)

    def remove(self, mode: str) -> tuple[NBDServerProtocol, StringTransport, dict[str, Any]]:
        proto, transport = self.connect("a")
        before = len(self.devices())
        code, body = call(self.api, "DELETE", f"/exports/a?mode={mode}")
        self.assertEqual(code, 200)
        self.assertEqual((body["existed"], body["connections"]), (True, 1))
        self.assertNotIn("a", self.manager.registry.exports)
        self.assertIsNone(self.manager.registry.default_name)
        # A new client cannot choose it.
        late = self.server.factory.buildProtocol(None)
        assert late is not None
        late.makeConnection(StringTransport())
        late.dataReceived(b.client_flags() + b.go("a"))
        self.assertIsNone(late.info.export)
        self.assertEqual(len(self.devices()), before)
        return proto, transport, body

    def test_delete_safe(self) -> None:
        """
        mode=safe: the connection goes on; the device closes once it has
        gone. Deleting it again says it did not exist (200).
        """
        proto, transport, _ = self.remove("safe")
        transport.clear()
        proto.dataReceived(b.read(1, 0, 512))
        [(error, cookie)] = b.parse_simple_replies(transport.value()[:16])
        self.assertEqual((error, cookie), (0, 1))
        self.assertEqual(len(transport.value()), 16 + 512)
        self.assertFalse(transport.disconnecting)
        count = len(self.devices())
        proto.connectionLost()
        self.assertEqual(len(self.devices()), count - 1)
        code, body = call(self.api, "DELETE", "/exports/a")
        self.assertEqual((code, body["existed"]), (200, False))

    def test_delete_soft(self) -> None:
        """mode=soft: the connection is shut down (new requests get ESHUTDOWN, then close)."""
        proto, transport, _ = self.remove("soft")
        self.assertTrue(transport.disconnecting)
        self.closed(proto)

    def test_delete_hard(self) -> None:
        """mode=hard: the connection is closed at once."""
        proto, transport, _ = self.remove("hard")
        self.assertTrue(transport.disconnecting)
        self.closed(proto)

    def closed(self, proto: NBDServerProtocol) -> None:
        """The transport closes the connection: the export's device closes."""
        count = len(self.devices())
        proto.connectionLost()
        self.assertEqual(len(self.devices()), count - 1)

    def test_reload(self) -> None:
        """
        POST /reload applies the config file's changes: added, changed
        (replaced) and removed exports, the default; a broken file changes
        nothing.
        """
        self.assertEqual(call(self.api, "POST", "/exports", {"name": "x", "memory": "1M"})[0], 201)
        self.config_path.write_text(
            'default = "c"\n'
            '[[export]]\nname = "a"\nmemory = "2M"\n'
            '[[export]]\nname = "c"\nmemory = "1M"\n'
        )
        code, body = call(self.api, "POST", "/reload")
        self.assertEqual(code, 200)
        self.assertEqual(
            (body["added"], body["changed"], body["removed"], body["default"]),
            (["c"], ["a"], ["x"], "c"),
        )
        self.assertEqual(sorted(self.manager.registry.exports), ["a", "c"])
        self.assertEqual(self.manager.registry.lookup("").name, "c")
        self.assertEqual(self.manager.registry.exports["a"].size, 2 * SIZE)
        code, body = call(self.api, "POST", "/reload")
        self.assertEqual((body["added"], body["changed"], body["removed"]), ([], [], []))
        self.config_path.write_text('[[export]]\nname = "a"\nmemory = "banana"\n')
        code, body = call(self.api, "POST", "/reload")
        self.assertEqual((code, body["error"]), (422, "invalid-config"))
        self.assertIn("exports.toml:3", body["reason"])
        self.assertEqual(sorted(self.manager.registry.exports), ["a", "c"])

    def test_untracked(self) -> None:
        """
        Without the observer (SIGHUP reloads only) a retired export's device
        is closed within a sweep interval after its last connection left.
        """
        manager = ExportManager(
            self.server, self.manager.config, self.reactor, str(self.config_path), track=False
        )
        self.assertNotIn(manager.usage, self.server.factory.observers)
        proto, _ = self.connect("a")
        count = len(self.devices())
        manager.remove("a", "safe")
        self.assertEqual(len(self.devices()), count)
        proto.connectionLost()
        self.reactor.advance(manager.SWEEP_INTERVAL)
        self.assertEqual(len(self.devices()), count - 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reload_without_config(self) -> None:
        """Without --config there is nothing to reload: 409."""
        self.manager.config_path = None
        code, body = call(self.api, "POST", "/reload")
        self.assertEqual((code, body["error"]), (409, "no-config"))


class FakeThreadReactor:
    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(self, f: Callable[[], object]) -> None:  # noqa: N802 - Twisted's name
        self.calls.append(f)


class ReloadOnSignalTests(SynchronousTestCase):
    """SIGHUP schedules a reload in the reactor thread."""

    def test_sighup(self) -> None:
        """The handler is installed on start and the previous one put back on stop."""
        reloads: list[int] = []
        reactor = FakeThreadReactor()
        service = ReloadOnSignal(lambda: reloads.append(1), reactor)
        previous = signal.getsignal(signal.SIGHUP)
        service.startService()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            self.assertEqual(len(reactor.calls), 1)
            self.assertEqual(reloads, [])
            reactor.calls[0]()
            self.assertEqual(reloads, [1])
        finally:
            service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_workers(self) -> None:
        """
        With --workers and --config, SIGHUP reloads through the supervisor:
        its exports (what a worker started from then on gets) change, a
        new one opened by the supervisor, a removed one closed; a config
        with a backend that workers cannot share changes nothing. (The
        workers' side is in tests/interop/test_admin_workers.py.)
        """
        from twisted_nbd.ops import attach

        path = Path(self.mktemp())
        path.write_text('[[export]]\nname = "a"\nmemory = "1M"\n')
        options = Options()
        options.parseOptions(["--config", str(path), "--workers", "2"])
        reactor = MemoryReactorClock()
        server = build(options.config, reactor)
        top = attach(server, options.config, reactor, config_path=str(path))
        [handler] = [s for s in cast(Any, top) if isinstance(s, ReloadOnSignal)]
        pool = cast(Any, server).pool
        devices = server.getServiceNamed("device")
        [first] = devices.devices
        path.write_text('[[export]]\nname = "b"\nmemory = "2M"\n')
        handler.reload()
        self.assertEqual([spec.name for spec, _ in pool.shared], ["b"])
        self.assertEqual(pool.default, "b")
        self.assertEqual([d.size for d in devices.devices], [2 * 1024 * 1024])
        self.assertNotIn(first, devices.devices)
        path.write_text('[[export]]\nname = "c"\nbackend = "pattern:size=1M"\n')
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        handler.reload()  # logged, not raised
        self.assertIn("shared", " ".join(formatEvent(e) for e in events))
        self.assertEqual([spec.name for spec, _ in pool.shared], ["b"])
        self.assertEqual(self.flushLoggedErrors(), [])
        devices.stopService()

    def test_failure_logged(self) -> None:
        """A reload that fails is logged, not raised."""
        from twisted_nbd.admin import AdminError

        def fail() -> None:
            raise AdminError(422, "invalid-config", "line 3: nonsense")

        ReloadOnSignal(fail, FakeThreadReactor()).reload()
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class OptionsTests(SynchronousTestCase):
    """C{--admin} listens only where local users alone can reach it."""

    def test_endpoints(self) -> None:
        for good in (
            "unix:/run/nbd.sock",
            "tcp:9000:interface=127.0.0.1",
            "tcp6:9000:interface=\\:\\:1",
        ):
            check_admin_endpoint(good)
        for bad in (
            "tcp:9000",
            "tcp:9000:interface=0.0.0.0",
            "tcp:9000:interface=192.0.2.1",
            "ssl:9000",
        ):
            self.assertRaises(ValueError, check_admin_endpoint, bad)

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--memory", "1M", *argv])
        return options

    def test_options(self) -> None:
        """Refused: a public interface, a token without --admin (--workers is fine)."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--admin", "tcp:9000")
        self.assertIn("loopback", str(caught.exception))
        self.parse("--admin", "unix:/tmp/a.sock", "--workers", "2")
        self.assertRaises(usage.UsageError, self.parse, "--admin-token", "/dev/null")
        self.assertRaises(usage.UsageError, self.parse, "--metrics", "nonsense:1")

    def test_token(self) -> None:
        """The token is the file's first line, else the environment's, else none."""
        path = Path(self.mktemp())
        path.write_text("abc\nignored\n")
        self.assertEqual(read_token(str(path)), "abc")
        path.write_text("\n")
        self.assertRaises(ValueError, read_token, str(path))
        self.assertRaises(ValueError, read_token, str(path) + ".missing")
        self.patch(os, "environ", {TOKEN_ENVIRONMENT: " xyz \n"})
        self.assertEqual(read_token(None), "xyz")
        self.patch(os, "environ", {})
        self.assertIsNone(read_token(None))
        path.write_text("t0ken\n")
        options = self.parse("--admin", "unix:/tmp/a.sock", "--admin-token", str(path))
        self.assertEqual(options["admin-token-value"], "t0ken")

    def test_make_service(self) -> None:
        """makeService wraps the server only when an endpoint is asked for."""
        from twisted_nbd.ops import OpsService
        from twisted_nbd.tap import makeService

        plain = makeService(self.parse(), MemoryReactorClock())
        self.assertIsInstance(plain, NBDService)
        ops = makeService(
            self.parse("--metrics", "tcp:0:interface=127.0.0.1", "--admin", "unix:a.sock"),
            MemoryReactorClock(),
        )
        self.assertIsInstance(ops, OpsService)
