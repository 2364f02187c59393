# -*- test-case-name: tests.test_ops -*-
"""
Operations endpoints beside the NBD service: C{--metrics ENDPOINT} (Prometheus
text at C{/metrics}, C{/health} and C{/ready}) and C{--admin ENDPOINT} (the
JSON API of L{twisted_nbd.admin}), both on twisted.web in the server's own
process and reactor.

L{OpsService} wraps the NBD service tree (an L{NBDService} or, with
C{--workers}, a supervisor) so that the HTTP endpoints outlive it on stop:
while the NBD side drains its connections C{/ready} answers 503 and the
last metrics can still be scraped; the HTTP listeners close last.

The metrics are served by L{MetricsPage}, which renders the server's own
C{CollectorRegistry} in the reactor thread. (C{prometheus_client.twisted
.MetricsResource} is a WSGI resource that collects in the global reactor's
thread pool: the collector would then read the protocol's counters from
another thread while the reactor changes them.)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, cast

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["MetricsPage", "OpsService", "StatusPage", "attach", "is_listening", "metrics_root"]


def is_listening(service: Any) -> bool:
    """
    Whether every endpoint listener among C{service}'s children listens:
    their C{StreamServerEndpointService} has a port (Twisted keeps the
    Deferred of its C{listen} as C{_waitingForPort}, with no public way to
    ask).
    """
    from twisted.application.internet import StreamServerEndpointService

    found = False
    for child in service:
        if isinstance(child, StreamServerEndpointService):
            waiting = getattr(child, "_waitingForPort", None)
            if waiting is None or not waiting.called or isinstance(waiting.result, Failure):
                return False
            found = True
    return found


class StatusPage(Resource):
    """
    C{/health} or C{/ready}: 200 with C{ok}, or 503 with the reason
    C{check} gives.
    """

    isLeaf = True

    def __init__(self, check: Callable[[], str | None]) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self._check = check

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's name
        reason = self._check()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if reason is None:
            return b"ok\n"
        request.setResponseCode(503)
        return reason.encode("utf-8") + b"\n"


class MetricsPage(Resource):
    """C{/metrics}: C{registry} in the format the scraper asks for (Accept)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's name
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        body: bytes = encoder(self._registry)
        return body


class _Index(Resource):
    def __init__(self, names: list[str]) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self._names = names

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's name
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"endpoints": self._names}).encode() + b"\n"


def metrics_root(registry: CollectorRegistry, ready: Callable[[], str | None]) -> Resource:
    """The resource tree of C{--metrics}: /metrics, /health, /ready."""
    root = _Index(["/metrics", "/health", "/ready"])
    root.putChild(b"metrics", MetricsPage(registry))
    root.putChild(b"health", StatusPage(lambda: None))
    root.putChild(b"ready", StatusPage(ready))
    return root


class OpsService(MultiService):
    """
    The NBD service tree C{server} and HTTP endpoints beside it (see the
    module docstring).

    @ivar server: the wrapped NBD service.
    @ivar draining: the NBD service is stopping.
    """

    def __init__(self, server: Service, reactor: Any) -> None:
        MultiService.__init__(self)
        self.server = server
        self.reactor = reactor
        self.draining = False
        self._http: list[Service] = []
        server.setServiceParent(self)

    def add_site(self, description: str, resource: Resource) -> Service:
        """Serve C{resource} on the endpoint C{description}; the listener service."""
        site = Site(resource)  # type: ignore[no-untyped-call]
        site.displayTracebacks = False
        listener: Service = strports.service(description, site, reactor=self.reactor)
        listener.setServiceParent(self)
        self._http.append(listener)
        return listener

    def ready(self) -> str | None:
        """Why the server is not ready for clients, or C{None} if it is."""
        if self.draining:
            return "draining"
        if not self.running:
            return "starting"
        if not is_listening(self.server):
            return "not listening yet"
        registry = getattr(self.server, "registry", None)
        if registry is not None and not len(registry):
            return "no exports"  # all removed through the admin API
        pool = getattr(self.server, "pool", None)
        if pool is not None and not any(w is not None and w.ready for w in pool.workers):
            return "no worker is ready yet"
        return None

    def startService(self) -> None:
        self.draining = False
        MultiService.startService(self)

    def stopService(self) -> Deferred[None]:
        """
        Stop (drain) the NBD service, then the HTTP endpoints and anything
        else.

        @return: a Deferred that fires once all are stopped.
        """
        Service.stopService(self)
        self.draining = True
        others = [child for child in self if child is not self.server]
        stopped: Deferred[Any] = maybeDeferred(self.server.stopService)
        stopped.addBoth(
            lambda _: DeferredList(
                [maybeDeferred(child.stopService) for child in reversed(others)],
                consumeErrors=True,
            )
        )
        return stopped.addCallback(lambda _: None)


def attach(
    server: Service,
    config: Any,
    reactor: Any,
    *,
    metrics: str | None = None,
    admin: str | None = None,
    token: str | None = None,
    config_path: str | None = None,
) -> Service:
    """
    Add what C{twistd nbd}'s operations options ask for to the service tree
    C{server} that L{twisted_nbd.service.build} made from C{config}:
    C{--metrics} and C{--admin} endpoints (then the result is an
    L{OpsService} around C{server}) and the reload on SIGHUP of a
    C{--config} file (with C{--workers} too: see L{twisted_nbd.admin_workers}).

    @return: the tree to run: C{server} itself if no endpoint is asked for.
    """
    from twisted_nbd.admin import AdminResource, ExportManager, ReloadOnSignal

    workers = getattr(server, "pool", None) is not None
    manager: Any = None
    if workers and (admin is not None or config_path is not None):
        # The supervisor applies changes to every worker (twisted_nbd.admin_workers).
        from twisted_nbd.admin_workers import SupervisorExports

        cast(Any, server).pool.admin = admin is not None
        manager = SupervisorExports(server, config, reactor, config_path)
    elif admin is not None or config_path is not None:
        manager = ExportManager(server, config, reactor, config_path, track=admin is not None)
    top: Service = server
    if metrics is not None or admin is not None:
        ops = OpsService(server, reactor)
        top = ops
        if metrics is not None:
            ops.add_site(metrics, metrics_root(_registry(server), ops.ready))
        if admin is not None:
            assert manager is not None
            ops.add_site(admin, AdminResource(manager, token))
    if manager is not None and config_path is not None:
        # Its parent stops it with the listeners, before the drain.
        cast(Any, ReloadOnSignal(manager.reload, reactor)).setServiceParent(top)
    return top


def _registry(server: Any) -> CollectorRegistry:
    """A registry of the metrics of C{server} (one process, or a supervisor)."""
    from prometheus_client import CollectorRegistry

    from twisted_nbd.metrics import MetricsObserver, NBDCollector, WorkerMetrics, slots_snapshot

    registry = CollectorRegistry(auto_describe=False)
    pool = getattr(server, "pool", None)
    if pool is not None:
        aggregate = WorkerMetrics()
        aggregate.local = lambda: slots_snapshot(pool.slots)
        pool.metrics = aggregate
        registry.register(NBDCollector(aggregate.snapshots))
    else:
        factory = server.factory
        observer = MetricsObserver(factory._clock)
        observer.slots = factory.slots
        factory.add_observer(observer)
        registry.register(NBDCollector(lambda: [observer.snapshot()]))
    return registry
