# -*- test-case-name: tests.test_admin -*-
"""
The runtime admin API (C{twistd nbd --admin ENDPOINT}) and config reloading
(C{POST /reload}, and SIGHUP with C{--config}).

L{ExportManager} changes the exports of a running single-process server
without dropping a connection: adding an export opens its backend and
filters (the same specification as an C{[[export]]} table of the config
file) and puts it in the L{ExportRegistry} the handshake looks names up
in; removing one takes it out of the registry, so new clients cannot pick
it, and then, by mode:

  - C{safe}: the connections using it go on until their clients leave;
  - C{soft}: they are shut down as on server stop (requests in flight
    finish, new ones are answered with ESHUTDOWN, then the connection
    closes; C-07);
  - C{hard}: they are closed at once.

A removed export's device is closed once its last connection has gone.
Changing an export (C{PUT} with another specification, or a reload) opens
the new one first, then removes the old one in C{safe} mode: clients
connected before keep what they had, new ones get the new export.

With C{--workers}, L{twisted_nbd.admin_workers} applies the same changes
through the supervisor to every worker process (each worker runs an
L{ExportManager} of its own).

L{AdminResource} is the JSON API over twisted.web (see docs/admin-api.md):
every error is C{{"error": CODE, "reason": TEXT}} with a 4xx/5xx status,
and with a token every request needs C{Authorization: Bearer TOKEN}.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
from dataclasses import asdict, replace
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_nbd.backends import OpenContext, open_backend
from twisted_nbd.config import (
    _EXPORT_KEYS,
    Config,
    ConfigError,
    ExportSpec,
    SpecError,
    _KeyError,
    _spec,
    check_config,
    load_config,
)
from twisted_nbd.exports import Export
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.observers import ConnectionInfo, ServerObserver
from twisted_nbd.registry import PluginError

__all__ = [
    "REMOVE_MODES",
    "TOKEN_ENVIRONMENT",
    "AdminError",
    "AdminResource",
    "ExportManager",
    "ReloadOnSignal",
    "check_admin_endpoint",
    "read_token",
]

_log = Logger()

#: How an export can be removed (see the module docstring).
REMOVE_MODES = ("safe", "soft", "hard")
#: The environment variable that may hold the admin token instead of a file.
TOKEN_ENVIRONMENT = "TWISTED_NBD_ADMIN_TOKEN"


class AdminError(Exception):
    """A request the API refuses: the HTTP status, an error code and a reason."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        Exception.__init__(self, reason)
        self.status = status
        self.error = error
        self.reason = reason


def check_admin_endpoint(description: str) -> None:
    """
    Accept only endpoints that local users alone can reach: C{unix:}, or
    C{tcp:}/C{tcp6:} with a loopback C{interface=}.

    @raise ValueError: with the reason.
    """
    import ipaddress

    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "unix":
        return
    if kind not in ("tcp", "tcp6"):
        raise ValueError(
            f"{description!r}: the admin API listens only on unix:PATH or on a loopback "
            "tcp:PORT:interface=127.0.0.1 (or tcp6:PORT:interface=\\:\\:1)"
        )
    interface = None
    for part in rest.replace("\\:", "\0").split(":"):
        key, eq, value = part.partition("=")
        if eq and key == "interface":
            interface = value.replace("\0", ":")
    if interface is None:
        raise ValueError(
            f"{description!r} listens on every interface; the admin API needs a loopback "
            "interface=127.0.0.1 (or ::1), or a unix socket"
        )
    try:
        loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        loopback = interface == "localhost"
    if not loopback:
        raise ValueError(
            f"{description!r}: interface {interface} is not a loopback address; the admin "
            "API accepts only loopback or a unix socket"
        )


def read_token(path: str | None) -> str | None:
    """
    The admin token: the first line of C{path}, else the environment's
    L{TOKEN_ENVIRONMENT}, else C{None} (no token asked).

    @raise ValueError: the file cannot be read or holds no token.
    """
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the admin token from {path!r}: {e}") from None
        if not token:
            raise ValueError(f"{path!r} holds no token (its first line is empty)")
        return token
    token = os.environ.get(TOKEN_ENVIRONMENT, "").strip()
    return token or None


def parse_export_spec(
    body: object, name: str | None, config: Config, config_path: str | None
) -> ExportSpec:
    """
    An export specification from a JSON object written like an
    C{[[export]]} table (relative paths are relative to the directory of
    C{config_path}, or the server's working directory), checked against
    C{config}.

    @raise AdminError: 400 or 422 with the reason.
    """
    if not isinstance(body, dict):
        raise AdminError(400, "bad-request", "the body must be a JSON object")
    table = dict(body)
    if name is not None:
        if table.setdefault("name", name) != name:
            raise AdminError(
                422, "invalid-export", f"the body names {table['name']!r}, the URL {name!r}"
            )
    if not isinstance(table.get("name"), str):
        raise AdminError(422, "invalid-export", "the export needs a name (a string)")
    for key in table:
        if key not in _EXPORT_KEYS:
            raise AdminError(422, "invalid-export", f"unknown export setting {key!r}")
    base = os.path.dirname(os.path.abspath(config_path)) if config_path else "."
    try:
        spec = _spec(table, os.path.abspath(base))
        spec.check()
    except _KeyError as e:
        raise AdminError(422, "invalid-export", e.reason) from None
    except SpecError as e:
        raise AdminError(422, "invalid-export", f"{e.setting}: {e}") from None
    try:
        check_config(replace(config, exports=[spec], default=None))
    except (ConfigError, SpecError) as e:
        raise AdminError(422, "invalid-export", str(e)) from None
    return spec


class _Usage(ServerObserver):
    """
    A prompt sweep of retired exports when a connection closes. (Each
    connection's bytes, for C{GET /connections}, are its
    L{ConnectionInfo}'s own counts, the figures of its close log line.)
    """

    def __init__(self, manager: ExportManager) -> None:
        self.manager = manager

    def connection_lost(self, connection: ConnectionInfo, reason: str) -> None:
        # The factory has already forgotten the connection.
        self.manager._sweep()


class ExportManager:
    """
    Adds, changes and removes the exports of a running single-process
    server (see the module docstring).

    @param server: the L{twisted_nbd.service.NBDService} (its C{factory},
        C{registry} and C{"device"} child are used).
    @param config: the configuration it was built from.
    @param config_path: the C{--config} file to reload, if any.
    @param track: notice the last connection of a retired export leave at
        once, with an observer. Any observer costs the protocol a little on
        every request, so a server that only reloads on SIGHUP goes without,
        and then notices it within L{SWEEP_INTERVAL} seconds instead.
    """

    #: How often retired exports are checked for connections still using them.
    SWEEP_INTERVAL = 1.0

    def __init__(
        self,
        server: Any,
        config: Config,
        reactor: Any,
        config_path: str | None = None,
        track: bool = True,
    ) -> None:
        self.server = server
        self.factory = server.factory
        self.registry = server.registry
        self.config = config
        self.reactor = reactor
        self.config_path = config_path
        self.specs: dict[str, ExportSpec] = {spec.name: spec for spec in config.exports}
        # Exports taken out of the registry, with the connections that used
        # them then and are not all gone.
        self._retired: list[tuple[Export, set[Any]]] = []
        self._sweeping: Any = None
        self.usage: _Usage | None = None
        if track:
            self.usage = _Usage(self)
            self.factory.add_observer(self.usage)

    # Reading

    def describe(self, name: str) -> dict[str, Any]:
        """One export as the API shows it."""
        export = self.registry.exports[name]
        spec = self.specs.get(name)
        users = sum(1 for p in self.factory.connections if p.info.export == name)
        return {
            "name": name,
            "description": export.description,
            "size": export.size,
            "read_only": export.read_only,
            "default": self.registry.default_name == name,
            "backend": spec.backend if spec is not None else None,
            "filters": [ref.name for ref in spec.filters] if spec is not None else [],
            "connections": users,
            "spec": asdict(spec) if spec is not None else None,
        }

    def exports(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in sorted(self.registry.exports)]

    def connections(self) -> list[dict[str, Any]]:
        """The open connections as the API shows them."""
        now = self.reactor.seconds()
        found = []
        for proto in sorted(self.factory.connections, key=lambda p: p.info.id):
            info = proto.info
            found.append(
                {
                    "id": info.id,
                    "client": info.peer,
                    "export": info.export,
                    "tls": info.tls,
                    "tls_peer": info.tls_peer or None,
                    "read_bytes": info.bytes_read,
                    "written_bytes": info.bytes_written,
                    "age": round(max(0.0, now - info.started), 3),
                    "requests_in_flight": proto.in_flight,
                }
            )
        return found

    # Changing

    def parse_spec(self, body: object, name: str | None = None) -> ExportSpec:
        """
        An export specification from a JSON object written like an
        C{[[export]]} table (relative paths are relative to the config
        file's directory, or the server's working directory).

        @raise AdminError: 422 with the reason.
        """
        return parse_export_spec(body, name, self.config, self.config_path)

    def _open(self, spec: ExportSpec) -> Export:
        """
        Open the device C{spec} describes, wrapped in its filters.

        @raise AdminError: 422 if it cannot be opened.
        """
        from twisted_nbd.service import IO_THREADS

        devices = self.server.getServiceNamed("device")
        context = OpenContext(self.reactor, min(IO_THREADS, self.config.max_queue_depth))
        context.pool = devices.pool
        context.read_only = spec.read_only
        try:
            device = open_backend(spec, context)
        except (OSError, PluginError, ValueError) as e:
            raise AdminError(422, "cannot-open", f"export {spec.name!r}: {e}") from None
        return self._serve(spec, device, context)

    def _serve(self, spec: ExportSpec, device: IBlockDevice, context: OpenContext) -> Export:
        """
        The export of C{spec} over its freshly opened C{device}: wrapped in
        its filters, its device owned by the device service.

        @raise AdminError: 422 if a filter does not fit (C{device} is closed).
        """
        from twisted_nbd.service import connection_layers, export_of, with_filters

        devices = self.server.getServiceNamed("device")
        try:
            device = with_filters(spec, device, context)
            export = export_of(spec, device, connection_layers(spec, context))
        except (PluginError, ValueError) as e:
            device.close()
            raise AdminError(422, "cannot-open", f"export {spec.name!r}: {e}") from None
        if devices.pool is None and context.pool is not None:
            # The first backend here to need a thread pool: the device
            # service owns it from now on (and stops it last).
            devices.pool = context.pool
            if devices.running:
                context.pool.start()
        devices.devices.append(export.device)
        return export

    def put(self, spec: ExportSpec) -> str:
        """
        Serve C{spec}: add it, replace an export of that name that differs,
        or do nothing if it is the same.

        @return: C{"created"}, C{"replaced"} or C{"unchanged"}.
        @raise AdminError: it cannot be opened.
        """
        if self.specs.get(spec.name) == spec and spec.name in self.registry.exports:
            return "unchanged"
        export = self._open(spec)
        old = self.registry.exports.get(spec.name)
        self.registry.exports[spec.name] = export
        self.specs[spec.name] = spec
        if len(self.registry.exports) == 1 and self.registry.default_name is None:
            self.registry.default_name = spec.name
        if old is None:
            _log.info("Export {name!r} added", name=spec.name)
            return "created"
        self._retire(old)
        _log.info("Export {name!r} replaced", name=spec.name)
        return "replaced"

    def remove(self, name: str, mode: str = "safe") -> dict[str, Any]:
        """
        Stop serving export C{name} (see the module docstring for C{mode}).

        @return: what was done: C{existed}, and C{connections} (how many
            were using it).
        @raise AdminError: an unknown mode.
        """
        if mode not in REMOVE_MODES:
            raise AdminError(
                400, "bad-mode", f"mode must be one of {', '.join(REMOVE_MODES)}, not {mode!r}"
            )
        export = self.registry.exports.pop(name, None)
        self.specs.pop(name, None)
        if self.registry.default_name == name:
            self.registry.default_name = None
        users = [p for p in list(self.factory.connections) if p.info.export == name]
        if export is not None:
            self._retire(export)
        if mode == "soft":
            for proto in users:
                proto.shutdown()
        elif mode == "hard":
            for proto in users:
                proto.abort()
        if export is not None:
            _log.info(
                "Export {name!r} removed ({mode}; {count} connection(s) using it)",
                name=name,
                mode=mode,
                count=len(users),
            )
        return {
            "name": name,
            "existed": export is not None,
            "mode": mode,
            "connections": len(users),
        }

    def _retire(self, export: Export) -> None:
        """
        C{export} is out of the registry: close its device once the
        connections using it now are gone. (They are known by the export's
        name: after two quick replacements the connections of the first
        keep the second's device open too, never the other way round.)
        """
        users = {p for p in self.factory.connections if p.info.export == export.name}
        self._retired.append((export, users))
        self._sweep()

    def _sweep(self) -> None:
        """Close the devices of retired exports that nobody uses any more."""
        open_now = self.factory.connections
        still = []
        for export, users in self._retired:
            users &= open_now
            if users:
                still.append((export, users))
            else:
                self._close(export)
        self._retired = still
        if still and (self._sweeping is None or not self._sweeping.active()):
            self._sweeping = self.reactor.callLater(self.SWEEP_INTERVAL, self._sweep)

    def _close(self, export: Export) -> None:
        devices = self.server.getServiceNamed("device")
        if export.device in devices.devices:
            devices.devices.remove(export.device)
        name = export.name
        maybeDeferred(export.device.close).addErrback(
            lambda f: _log.failure("Closing the device of export {name!r} failed", f, name=name)
        )

    def reload(self) -> dict[str, Any]:
        """
        Read C{--config} again and apply what changed in its exports (see the
        module docstring); every new export is opened before anything
        changes, so a reload that fails changes nothing.

        @return: the names C{added}, C{changed}, C{removed} and
            C{unchanged}, and C{ignored}: settings that need a restart.
        @raise AdminError: no config file, or it is wrong or cannot be opened.
        """
        new = load_for_reload(self.config, self.config_path)
        wanted = {spec.name: spec for spec in new.exports}
        added, changed, removed, unchanged = reload_plan(
            {n: self.specs.get(n) for n in self.registry.exports}, wanted
        )
        opened: dict[str, Export] = {}
        try:
            for name in added + changed:
                opened[name] = self._open(wanted[name])
        except AdminError:
            for export in opened.values():
                self.server.getServiceNamed("device").devices.remove(export.device)
                export.device.close()
            raise
        for name in removed:
            self.remove(name, "safe")
        for name, export in opened.items():
            old = self.registry.exports.get(name)
            self.registry.exports[name] = export
            self.specs[name] = wanted[name]
            if old is not None:
                self._retire(old)
        default = new.default
        if default is None and len(self.registry.exports) == 1:
            default = next(iter(self.registry.exports))
        self.registry.default_name = default
        ignored = []
        if new.limits != self.config.limits:
            ignored.append("limits")
        result = {
            "added": added,
            "changed": changed,
            "removed": removed,
            "unchanged": unchanged,
            "default": default,
            "ignored": ignored,
        }
        _log.info(
            "Reloaded {path}: added {added}, changed {changed}, removed {removed}",
            path=self.config_path,
            added=added,
            changed=changed,
            removed=removed,
        )
        return result


def load_for_reload(config: Config, config_path: str | None) -> Config:
    """
    The C{--config} file C{config_path} read again, its exports checked
    against C{config}.

    @raise AdminError: no config file (409), or it is wrong (422).
    """
    if config_path is None:
        raise AdminError(409, "no-config", "the server was not started with --config")
    try:
        new = load_config(config_path)
        check_config(replace(config, exports=new.exports, default=new.default))
    except (ConfigError, SpecError) as e:
        raise AdminError(422, "invalid-config", str(e)) from None
    return new


def reload_plan(
    current: Mapping[str, ExportSpec | None], wanted: Mapping[str, ExportSpec]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """
    What a reload does, by export name: the names in C{wanted} that are
    new, those whose spec differs from C{current}'s (an export served
    without a spec, C{None}, always differs), those only in C{current},
    and the rest of C{wanted}.

    @return: C{(added, changed, removed, unchanged)}.
    """
    added = [n for n in wanted if n not in current]
    changed = [n for n in wanted if n in current and current[n] != wanted[n]]
    removed = [n for n in current if n not in wanted]
    unchanged = [n for n in wanted if n not in added and n not in changed]
    return added, changed, removed, unchanged


def _then(value: Any, f: Callable[[Any], Any]) -> Any:
    """
    C{f(value)}, or, if C{value} is a Deferred (the C{--workers} manager
    answers once the workers have), a Deferred of it.
    """
    if isinstance(value, Deferred):
        return value.addCallback(f)
    return f(value)


def _json(request: Any, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=1).encode("utf-8") + b"\n"


class AdminResource(Resource):
    """
    The admin API (see docs/admin-api.md):

      - C{GET /exports}, C{GET /exports/NAME}
      - C{POST /exports} (the name in the body; 409 if it exists)
      - C{PUT /exports/NAME} (create or replace; the same twice is a no-op)
      - C{DELETE /exports/NAME?mode=safe|soft|hard} (absent: C{existed: false})
      - C{GET /connections}
      - C{POST /reload}

    The manager's methods may return Deferreds (with C{--workers}): the
    answer is then written once they fire.
    """

    isLeaf = True

    def __init__(self, manager: Any, token: str | None = None) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self.manager = manager
        self._token = token

    def render(self, request: Any) -> bytes | int:
        try:
            self._authorize(request)
            answer = self._route(request)
        except Exception:
            return self._error(request, Failure())  # type: ignore[no-untyped-call]
        if not isinstance(answer, Deferred):
            return _json(request, *answer)

        # With --workers: the answer comes once the workers have acted.
        def done(result: tuple[int, object]) -> None:
            body = _json(request, *result)
            if not finished:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            body = self._error(request, failure)
            if not finished:
                request.write(body)
                request.finish()

        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        answer.addCallbacks(done, failed).addErrback(
            lambda f: _log.failure("The admin API failed on {uri!r}", f, uri=request.uri)
        )
        return NOT_DONE_YET

    def _error(self, request: Any, failure: Failure) -> bytes:
        e = failure.value
        if isinstance(e, AdminError):
            if e.status == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="twisted-nbd"')
            return _json(request, e.status, {"error": e.error, "reason": e.reason})
        _log.failure("The admin API failed on {uri!r}", failure, uri=request.uri)
        return _json(request, 500, {"error": "internal", "reason": "internal error (see the log)"})

    def _authorize(self, request: Any) -> None:
        if self._token is None:
            return
        given = request.getHeader(b"authorization") or b""
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() != b"bearer" or not credentials:
            raise AdminError(401, "unauthorized", "an Authorization: Bearer token is required")
        if not hmac.compare_digest(credentials.strip(), self._token.encode("utf-8")):
            raise AdminError(401, "unauthorized", "the token is wrong")

    def _body(self, request: Any) -> object:
        assert request.content is not None
        raw = request.content.read()
        try:
            return json.loads(raw or b"null")
        except ValueError as e:
            raise AdminError(400, "bad-json", f"the body is not JSON: {e}") from None

    def _route(self, request: Any) -> Any:
        """(status, body), or a Deferred of it."""
        method = (request.method or b"").decode("ascii", "replace")
        # twisted.web has already percent-decoded each segment (%2F is a
        # slash inside a name).
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if parts and parts[-1] == "":
            parts.pop()
        args = request.args or {}
        if parts == ["exports"] and b"name" in args:
            # /exports?name=NAME addresses any export, the unnamed one too.
            parts.append(args[b"name"][0].decode("utf-8", "replace"))
        manager = self.manager
        if parts == ["exports"]:
            if method == "GET":
                return _then(manager.exports(), lambda found: (200, {"exports": found}))
            if method == "POST":
                spec = manager.parse_spec(self._body(request))
                if spec.name in manager.registry.exports:
                    raise AdminError(
                        409,
                        "exists",
                        f"export {spec.name!r} exists; PUT /exports/NAME replaces it",
                    )
                return _then(
                    manager.put(spec),
                    lambda _: _then(manager.describe(spec.name), lambda found: (201, found)),
                )
            raise self._method(method, "GET, POST")
        if len(parts) == 2 and parts[0] == "exports":
            name = parts[1]
            if method == "GET":
                if name not in manager.registry.exports:
                    raise AdminError(404, "no-such-export", f"there is no export {name!r}")
                return _then(manager.describe(name), lambda found: (200, found))
            if method == "PUT":

                def described(outcome: str) -> Any:
                    return _then(
                        manager.describe(name),
                        lambda found: (
                            (201 if outcome == "created" else 200),
                            {"outcome": outcome, **found},
                        ),
                    )

                return _then(manager.put(manager.parse_spec(self._body(request), name)), described)
            if method == "DELETE":
                mode = args.get(b"mode", [b"safe"])[0].decode("utf-8", "replace")
                return _then(manager.remove(name, mode), lambda done: (200, done))
            raise self._method(method, "GET, PUT, DELETE")
        if parts == ["connections"]:
            if method == "GET":
                return _then(manager.connections(), lambda found: (200, {"connections": found}))
            raise self._method(method, "GET")
        if parts == ["reload"]:
            if method == "POST":
                return _then(manager.reload(), lambda done: (200, done))
            raise self._method(method, "POST")
        if not parts:
            return 200, {"endpoints": ["/exports", "/exports/NAME", "/connections", "/reload"]}
        raise AdminError(404, "not-found", f"no such resource: /{'/'.join(parts)}")

    def _method(self, method: str, allowed: str) -> AdminError:
        return AdminError(405, "method-not-allowed", f"{method} is not allowed here ({allowed})")


class ReloadOnSignal(Service):
    """
    Reload the config file on SIGHUP (twistd leaves SIGHUP alone; SIGUSR1
    is its log rotation). The handler only schedules the reload in the
    reactor thread; a failed reload is logged and changes nothing.
    """

    def __init__(self, reload: Callable[[], object], reactor: Any) -> None:
        self._reload = reload
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        Service.startService(self)
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _signalled(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Reload now, logging the outcome."""
        _log.info("SIGHUP: reloading the config file")
        maybeDeferred(self._reload).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        if isinstance(failure.value, AdminError):
            _log.error("Reload failed, nothing changed: {reason}", reason=failure.value.reason)
        else:
            _log.failure("Reload failed", failure)
