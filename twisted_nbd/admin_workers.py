# -*- test-case-name: tests.test_admin_workers -*-
"""
The admin API and config reloading with C{--workers N} (see
L{twisted_nbd.admin} for the single-process server and docs/admin-api.md).

The supervisor (L{SupervisorExports}) owns the truth: the export
specifications, the default export and its own open copy of each device.
A change is applied there first, so a worker started from then on (after a
crash) gets the current exports with its settings, and then sent to every
running worker over its control channel (L{WorkerPool.ask}): adding or
replacing an export sends its specification with copies of the device's
descriptors (the image file; the memory files of a RAM disk), as at
startup. The HTTP answer waits until every worker has answered.

Each worker applies a change with the single-process logic
(L{WorkerExports} is an L{ExportManager} whose devices come from the
descriptors the supervisor sent): removal modes, replacement (new
clients get the new export, connected ones keep the old one) and closing a
retired device after its last connection are the same.

The supervisor closes its copy of a removed or replaced device as soon as
every worker has answered the change: each worker holds its own
descriptors (C{SCM_RIGHTS} passes copies), so the worker's connections
keep the file or shared memory alive; and the answer proves that the
descriptors of every earlier change were received, so no descriptor still
queued to be sent is closed under the supervisor's feet.

C{GET /exports} and C{GET /connections} ask every worker and merge the
answers (connections counted over all workers; each connection carries
its C{worker}). A worker that does not answer within L{READ_TIMEOUT}
seconds is left out.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Any, Sequence

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger

from twisted_nbd.admin import (
    REMOVE_MODES,
    AdminError,
    ExportManager,
    load_for_reload,
    parse_export_spec,
    reload_plan,
)
from twisted_nbd.backends import OpenContext
from twisted_nbd.config import Config, ConfigError, ExportSpec, SpecError
from twisted_nbd.exports import Export
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.registry import PluginError

__all__ = ["CHANGE_TIMEOUT", "READ_TIMEOUT", "SupervisorExports", "WorkerExports"]

_log = Logger()

#: How long the supervisor waits for a worker's answer to a read.
READ_TIMEOUT = 5.0
#: ... and to a change of the exports.
CHANGE_TIMEOUT = 30.0


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class WorkerExports(ExportManager):
    """
    In a worker: the single-process L{ExportManager} over the devices the
    supervisor shares, driven by its requests (L{answer}).
    """

    def __init__(
        self, server: Any, config: Config, reactor: Any, context: OpenContext, track: bool
    ) -> None:
        ExportManager.__init__(self, server, config, reactor, None, track=track)
        self.context = context
        # The descriptors of the export being opened (see answer()).
        self._fds: Sequence[int] = ()

    def _open(self, spec: ExportSpec) -> Export:
        from twisted_nbd.workers import shared_device

        context = self.context
        fds, self._fds = self._fds, ()
        try:
            device = shared_device(spec, fds, context)
        except (OSError, ValueError) as e:
            _close_fds(fds)
            raise AdminError(422, "cannot-open", f"export {spec.name!r}: {e}") from None
        return self._serve(spec, device, context)

    def answer(self, message: dict[str, Any], fds: Sequence[int]) -> dict[str, Any]:
        """
        Apply or answer one request of the supervisor (C{op}: C{put} with
        C{spec} and the device's descriptors C{fds}, C{remove} with C{name}
        and C{mode}, C{default} with C{name}, C{exports}, C{connections}).

        @return: the answer: C{error} (with C{status} and C{code}) if it failed.
        """
        op = message.get("op")
        try:
            if op == "put":
                spec = ExportSpec.from_json(message["spec"])
                self._fds = tuple(fds)
                try:
                    return {"outcome": self.put(spec)}
                finally:
                    # Left unused if the export was already there, unchanged.
                    _close_fds(self._fds)
                    self._fds = ()
            _close_fds(fds)
            if op == "remove":
                return {"removed": self.remove(str(message["name"]), str(message["mode"]))}
            if op == "default":
                name = message.get("name")
                self.registry.default_name = name if name in self.registry.exports else None
                return {}
            if op == "exports":
                return {"exports": self.exports()}
            if op == "connections":
                return {"connections": self.connections()}
            raise AdminError(400, "bad-request", f"unknown request {op!r}")
        except AdminError as e:
            return {"error": e.reason, "status": e.status, "code": e.error}
        except Exception:
            _log.failure("Admin request {op!r} failed", op=op)
            return {"error": "internal error (see the log)", "status": 500, "code": "internal"}


class _Names:
    """What L{AdminResource} reads of a registry: the export names."""

    def __init__(self, specs: dict[str, ExportSpec]) -> None:
        self.exports = specs


class SupervisorExports:
    """
    In the supervisor of C{--workers}: adds, changes and removes the
    exports of every worker (see the module docstring). Its methods that
    change or read the exports return Deferreds.

    @param server: the L{twisted_nbd.workers.SupervisorService}.
    """

    def __init__(
        self, server: Any, config: Config, reactor: Any, config_path: str | None = None
    ) -> None:
        self.server = server
        self.pool = server.pool
        self.config = config
        self.reactor = reactor
        self.config_path = config_path
        self.specs: dict[str, ExportSpec] = {spec.name: spec for spec, _ in self.pool.shared}
        self.registry = _Names(self.specs)
        # build_supervisor opened the devices in the order of the exports.
        held = self.server.getServiceNamed("device").devices
        self.devices: dict[str, IBlockDevice] = {
            spec.name: device for (spec, _), device in zip(self.pool.shared, held, strict=True)
        }

    # Reading

    def exports(self) -> Deferred[list[dict[str, Any]]]:
        """
        The exports, as the workers describe them, with their connections
        counted over all workers.

        @return: a Deferred that fires with the list (never fails).
        """
        found: Deferred[list[dict[str, Any]]] = self.pool.ask(
            {"op": "exports"}, (), READ_TIMEOUT
        ).addCallback(self._merge)
        return found

    def _merge(self, answers: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        seen: dict[str, list[dict[str, Any]]] = {}
        for _, answer in answers:
            for found in answer.get("exports", ()):
                seen.setdefault(found.get("name"), []).append(found)
        merged = []
        for name in sorted(self.specs):
            spec = self.specs[name]
            views = seen.get(name, [])
            if views:
                described = dict(views[0])
                described["connections"] = sum(v.get("connections", 0) for v in views)
            else:
                # No worker could say (none running yet): what the supervisor knows.
                device = self.devices.get(name)
                described = {
                    "name": name,
                    "description": spec.description,
                    "size": device.size if device is not None else None,
                    "read_only": spec.read_only,
                    "backend": spec.backend,
                    "filters": [ref.name for ref in spec.filters],
                    "connections": 0,
                    "spec": asdict(spec),
                }
            described["default"] = self.pool.default == name
            described["workers"] = len(views)
            merged.append(described)
        return merged

    def describe(self, name: str) -> Deferred[dict[str, Any]]:
        """
        One export as the API shows it.

        @return: a Deferred that fires with it, or fails with L{AdminError}
            (404) if there is no such export.
        """

        def pick(found: list[dict[str, Any]]) -> dict[str, Any]:
            for described in found:
                if described["name"] == name:
                    return described
            raise AdminError(404, "no-such-export", f"there is no export {name!r}")

        return self.exports().addCallback(pick)

    def connections(self) -> Deferred[list[dict[str, Any]]]:
        """
        The connections of every worker (each with its C{worker} index;
        C{id} is unique within a worker).

        @return: a Deferred that fires with the list (never fails).
        """

        def merge(answers: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
            found = []
            for index, answer in answers:
                for connection in answer.get("connections", ()):
                    found.append({**connection, "worker": index})
            return sorted(found, key=lambda c: (c["worker"], c["id"]))

        found: Deferred[list[dict[str, Any]]] = self.pool.ask(
            {"op": "connections"}, (), READ_TIMEOUT
        ).addCallback(merge)
        return found

    # Changing

    def parse_spec(self, body: object, name: str | None = None) -> ExportSpec:
        """
        As L{ExportManager.parse_spec}, and only what worker processes can
        share (see L{twisted_nbd.workers.check_workers}).

        @raise AdminError: 400 or 422 with the reason.
        """
        from twisted_nbd.workers import check_workers

        spec = parse_export_spec(body, name, self.config, self.config_path)
        try:
            check_workers(replace(self.config, exports=[spec], default=None))
        except (ConfigError, SpecError, PluginError) as e:
            raise AdminError(422, "not-shareable", str(e)) from None
        return spec

    def _open(self, spec: ExportSpec) -> IBlockDevice:
        from twisted_nbd.workers import open_shared

        try:
            return open_shared(spec, OpenContext(self.reactor, 1))
        except (OSError, ValueError) as e:
            raise AdminError(422, "cannot-open", f"export {spec.name!r}: {e}") from None

    def _close(self, device: IBlockDevice | None) -> None:
        if device is None:
            return
        held = self.server.getServiceNamed("device").devices
        if device in held:
            held.remove(device)
        maybeDeferred(device.close).addErrback(
            lambda f: _log.failure("Closing the supervisor's copy of a device failed", f)
        )

    def _install(self, spec: ExportSpec, device: IBlockDevice) -> Deferred[str]:
        """
        Serve C{spec} over the open C{device}, in the supervisor's state
        (for workers started later) and then in every worker.

        @return: a Deferred that fires with C{"created"} or C{"replaced"}
            once every worker has answered, or fails with L{AdminError}
            if a worker could not open it (then it is removed again).
        """
        from twisted_nbd.workers import _shares

        fds = _shares(device)
        name = spec.name
        old = self.devices.get(name)
        self.devices[name] = device
        self.server.getServiceNamed("device").devices.append(device)
        self.specs[name] = spec
        shared = [(s, f) for s, f in self.pool.shared if s.name != name]
        self.pool.shared = [*shared, (spec, fds)]
        if len(self.specs) == 1 and self.pool.default is None:
            self.pool.default = name  # as ExportManager.put (and each worker) does
        outcome = "created" if old is None else "replaced"
        asked = self.pool.ask({"op": "put", "spec": asdict(spec)}, fds, CHANGE_TIMEOUT)

        def answered(answers: list[tuple[int, dict[str, Any]]]) -> Any:
            self._close(old)
            errors = [a for _, a in answers if "error" in a]
            if not errors:
                _log.info("Export {name!r} {outcome} in every worker", name=name, outcome=outcome)
                return outcome
            # A worker could not serve it (its filters, say): nobody serves it.
            reason = errors[0]["error"]
            _log.error("Export {name!r}: a worker failed: {reason}", name=name, reason=reason)

            def failed(_: object) -> None:
                raise AdminError(int(errors[0].get("status", 422)), "worker-failed", reason)

            return self.remove(name, "hard").addCallback(failed)

        done: Deferred[str] = asked.addCallback(answered)
        return done

    def put(self, spec: ExportSpec) -> Deferred[str]:
        """
        Serve C{spec}: add it, replace an export of that name that differs,
        or do nothing if it is the same.

        @return: a Deferred that fires with C{"created"}, C{"replaced"} or
            C{"unchanged"} once every worker has applied it.
        @raise AdminError: it cannot be opened.
        """
        if self.specs.get(spec.name) == spec:
            return succeed("unchanged")
        return self._install(spec, self._open(spec))

    def remove(self, name: str, mode: str = "safe") -> Deferred[dict[str, Any]]:
        """
        Stop serving export C{name} in every worker (see L{twisted_nbd.admin}
        for C{mode}).

        @return: a Deferred that fires with C{existed} and C{connections}
            (how many were using it, in all workers) once every worker has
            answered.
        @raise AdminError: an unknown mode.
        """
        if mode not in REMOVE_MODES:
            raise AdminError(
                400, "bad-mode", f"mode must be one of {', '.join(REMOVE_MODES)}, not {mode!r}"
            )
        spec = self.specs.pop(name, None)
        device = self.devices.pop(name, None)
        self.pool.shared = [(s, f) for s, f in self.pool.shared if s.name != name]
        if self.pool.default == name:
            self.pool.default = None
        asked = self.pool.ask({"op": "remove", "name": name, "mode": mode}, (), CHANGE_TIMEOUT)

        def answered(answers: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
            self._close(device)
            users = sum(a.get("removed", {}).get("connections", 0) for _, a in answers)
            if spec is not None:
                _log.info(
                    "Export {name!r} removed ({mode}; {count} connection(s) using it)",
                    name=name,
                    mode=mode,
                    count=users,
                )
            return {"name": name, "existed": spec is not None, "mode": mode, "connections": users}

        done: Deferred[dict[str, Any]] = asked.addCallback(answered)
        return done

    def reload(self) -> Deferred[dict[str, Any]]:
        """
        Read C{--config} again and apply what changed in its exports to
        every worker, as L{ExportManager.reload} does: every new or changed
        export is opened (by the supervisor) before anything changes.

        @return: a Deferred that fires with the names C{added}, C{changed},
            C{removed}, C{unchanged}, the C{default} and C{ignored}
            settings, once every worker has applied them.
        @raise AdminError: no config file, it is wrong, an export cannot be
            shared or opened.
        """
        from twisted_nbd.workers import check_workers

        new = load_for_reload(self.config, self.config_path)
        try:
            check_workers(replace(self.config, exports=new.exports, default=new.default))
        except (ConfigError, SpecError, PluginError) as e:
            raise AdminError(422, "invalid-config", str(e)) from None
        wanted = {spec.name: spec for spec in new.exports}
        added, changed, removed, unchanged = reload_plan(self.specs, wanted)
        opened: dict[str, IBlockDevice] = {}
        try:
            for name in added + changed:
                opened[name] = self._open(wanted[name])
        except AdminError:
            for device in opened.values():
                device.close()
            raise
        steps: list[Deferred[Any]] = [self.remove(name, "safe") for name in removed]
        steps += [self._install(wanted[name], device) for name, device in opened.items()]
        default = new.default
        if default is None and len(self.specs) == 1:
            default = next(iter(self.specs))
        self.pool.default = default
        steps.append(self.pool.ask({"op": "default", "name": default}, (), CHANGE_TIMEOUT))
        result = {
            "added": added,
            "changed": changed,
            "removed": removed,
            "unchanged": unchanged,
            "default": default,
            "ignored": ["limits"] if new.limits != self.config.limits else [],
        }
        _log.info(
            "Reloaded {path}: added {added}, changed {changed}, removed {removed}",
            path=self.config_path,
            added=added,
            changed=changed,
            removed=removed,
        )

        def done(results: list[tuple[bool, Any]]) -> dict[str, Any]:
            for ok, failure in results:
                if not ok:
                    failure.raiseException()
            return result

        return DeferredList(steps, consumeErrors=True).addCallback(done)
