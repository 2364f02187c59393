# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: past one core, with one listening endpoint.

A Python server runs its protocol code on one core. With C{--workers N} the
C{twistd} process becomes a supervisor: it listens (so every endpoint string,
socket activation and C{--uid} work as usual), opens the exports, and starts
N worker processes (C{python -m twisted_nbd.worker}). It never reads from a
client: it passes each accepted socket to the worker with the fewest
connections, over a Unix socket (C{SCM_RIGHTS}, Twisted's
C{sendFileDescriptor}), and the worker adopts it
(C{reactor.adoptStreamConnection}) and speaks NBD on it from the greeting
on. The supervisor closes its own copy once the worker says it has the
connection, without shutting the socket down; if the worker dies first, the
connection goes to another worker, since nothing was read from it yet.

Workers serve the very same devices: the supervisor passes them the open
file descriptors (the image file; the two memory files of a RAM disk), so a
FLUSH in any worker covers the writes of all (one file, one page cache; one
shared memory), and C{can_multi_conn} stays true. A worker that dies is
started again (after a pause that grows if it keeps dying); the port never
closes. On stop the supervisor stops listening, asks every worker to drain
(SIGTERM: requests in flight finish, new ones get ESHUTDOWN, at most
C{shutdown_timeout} seconds) and waits for them, then closes the devices.

Connection limits (L{twisted_nbd.limits}) hold for the server as a whole:
the supervisor checks C{--allow}, C{--max-connections} and
C{--max-negotiating} before it hands a connection out (a refused one is
closed before the greeting, as without workers), counting the connections
each worker reports plus those handed to it and not yet reported. Workers
get the same limits and run the handshake and idle timeouts; their own
check of the caps is a second line that the supervisor's makes redundant.

The control channel is newline-separated JSON. Supervisor to worker:
C{{"connection": ID, "family": FAMILY}} with the socket's descriptor.
Worker to supervisor: C{{"ready": true}} once serving, C{{"adopted": ID}},
and C{{"connections": N, "negotiating": M}} when either of its counts
changes; with C{--metrics}, C{{"metrics": SNAPSHOT}} (see
L{twisted_nbd.metrics}) once a second when something changed and when a
connection closes.

With C{--admin} or C{--config}, admin requests (L{WorkerPool.ask}, see
L{twisted_nbd.admin_workers}): supervisor to worker C{{"request": NUMBER,
"op": OP, "fds": COUNT, ...}} with COUNT descriptors sent before the line;
the worker answers C{{"answer": NUMBER, ...}}. A worker takes descriptors
in the order they come, each message those it announces.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence, cast

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IFileDescriptorReceiver, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger, eventFromJSON
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

import twisted_nbd
from twisted_nbd.backends import OpenContext
from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.ram import MAPPED_MAX, MappedMemoryDevice
from twisted_nbd.config import Config, ConfigError, ExportSpec
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.limits import ConnectionSlots

__all__ = ["WORKER_MODULE", "SupervisorService", "WorkerPool", "build_supervisor", "shared_device"]

_log = Logger()

#: The module a worker process runs.
WORKER_MODULE = "twisted_nbd.worker"
#: Where a worker finds its control socket.
CONTROL_FD = 3
#: The first descriptor of the shared devices in a worker.
FIRST_SHARED_FD = 4
#: A worker that dies sooner than this after starting is started again only
#: after a pause, doubled each time (up to MAX_RESPAWN_DELAY).
QUICK_DEATH = 10.0
MIN_RESPAWN_DELAY = 0.2
MAX_RESPAWN_DELAY = 10.0
#: Connections waiting for a worker (none ready yet) beyond this are dropped.
MAX_WAITING = 1024
#: Grace beyond the shutdown timeout before a worker is killed.
STOP_GRACE = 5.0


def check_workers(config: Config) -> None:
    """
    @raise ConfigError: C{config} cannot be served by several processes.
    """
    if config.workers < 1:
        raise ConfigError("the number of workers must be at least 1")
    if config.workers == 1:
        return
    from twisted_nbd.registry import FilterPlugin, registry

    for spec in config.exports:
        if spec.memory is not None and spec.memory > MAPPED_MAX:
            raise ConfigError(
                f"export {spec.name!r}: a RAM disk over {MAPPED_MAX} bytes cannot be shared "
                "by worker processes"
            )
        if spec.backend_ref is not None:
            raise ConfigError(
                f"export {spec.name!r}: the {spec.backend_ref.name!r} backend cannot be shared "
                "by worker processes (only file and memory can)"
            )
        for ref in spec.filters:
            plugin, values = registry.resolve("filter", ref)
            assert isinstance(plugin, FilterPlugin)
            if plugin.per_connection is not None and plugin.per_connection(values):
                continue  # one per connection: each process has its own anyway
            if not plugin.per_process:
                raise ConfigError(
                    f"export {spec.name!r}: the {ref.name!r} filter keeps one state per export, "
                    "which worker processes cannot share"
                )


def open_shared(spec: ExportSpec, context: OpenContext) -> IBlockDevice:
    """
    Open what C{spec} describes so that worker processes can serve it too:
    a file, or a RAM disk in shared memory (see L{shared_device}).
    """
    if spec.memory is not None:
        return MappedMemoryDevice(spec.memory)
    assert spec.image is not None
    if spec.size is not None:
        create_image(spec.image, spec.size)
    return FileBlockDevice(
        spec.image, read_only=spec.read_only, reactor=context.reactor, threadpool=None
    )


def shared_device(spec: ExportSpec, fds: Sequence[int], context: OpenContext) -> IBlockDevice:
    """
    In a worker: the device C{spec} describes, over the descriptors the
    supervisor passed (see L{open_shared}).
    """
    if spec.memory is not None:
        data_fd, map_fd = fds
        return MappedMemoryDevice(spec.memory, fds=(data_fd, map_fd))
    assert spec.image is not None
    (fd,) = fds
    return FileBlockDevice(
        spec.image,
        read_only=spec.read_only,
        reactor=context.reactor,
        threadpool=context.threadpool(),
        fd=fd,
    )


def _shares(device: IBlockDevice) -> tuple[int, ...]:
    share = getattr(device, "share", None)
    if share is None:
        raise ConfigError(f"{device!r} cannot be shared with worker processes")
    fds: tuple[int, ...] = tuple(share())
    return fds


# ---------------------------------------------------------------- supervisor


@dataclass(eq=False)
class _Worker:
    """One worker process as the supervisor sees it."""

    index: int
    started: float
    process: Any = None
    control: _Control | None = None
    pid: int | None = None
    ready: bool = False
    #: The counts the worker last reported.
    reported_connections: int = 0
    reported_negotiating: int = 0
    #: Connections sent and not yet adopted, by id: their transports.
    handed: dict[int, Any] = field(default_factory=dict)
    ended: Deferred[None] = field(default_factory=Deferred)
    #: Admin requests sent and not answered yet, by number (see
    #: L{WorkerPool.ask}).
    asked: dict[int, Deferred[Any]] = field(default_factory=dict)

    @property
    def connections(self) -> int:
        """Its connections, counting those on their way to it."""
        return self.reported_connections + len(self.handed)

    @property
    def negotiating(self) -> int:
        """Its connections still negotiating (those on their way to it are)."""
        return self.reported_negotiating + len(self.handed)


class _Forget:
    """On a timeout: forget the request, whose answer would come too late."""

    def __init__(self, worker: _Worker, number: int) -> None:
        self.worker = worker
        self.number = number

    def __call__(self, result: object, timeout: float) -> None:
        self.worker.asked.pop(self.number, None)
        _log.warn(
            "Worker {index} did not answer admin request {number} within {timeout} s",
            index=self.worker.index,
            number=self.number,
            timeout=timeout,
        )


class _Control(LineReceiver):
    """The supervisor's end of one worker's control socket."""

    delimiter = b"\n"

    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        self.pool = pool
        self.worker = worker

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - LineReceiver's name
        try:
            message = json.loads(line)
        except ValueError:
            _log.warn(
                "worker {index}: bad control message {line!r}", index=self.worker.index, line=line
            )
            return
        self.pool._message(self.worker, message)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.worker.control is self:
            self.worker.control = None


def _worker_event(line: bytes) -> dict[str, Any] | None:
    """
    The log event a worker wrote as a line of JSON (see
    L{twisted_nbd.worker}), or C{None} if the line is something else
    (output that did not go through the log, a traceback on stderr).
    """
    if not line.startswith(b"{"):
        return None
    try:
        event = eventFromJSON(line.decode("utf-8"))
    except ValueError:
        return None
    return event if isinstance(event, dict) and "log_time" in event else None


class _WorkerProcess(ProcessProtocol):
    """Relays a worker's output to the supervisor's log, and notices its end."""

    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        self.pool = pool
        self.worker = worker
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if fd not in self._partial:
            return
        *lines, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        for line in lines:
            event = _worker_event(line)
            if event is not None:
                event["worker"] = self.worker.index
                event["log_system"] = f"worker {self.worker.index}"
                _log.observer(event)
            elif line.strip():
                _log.info(
                    "[worker {index}] {line}",
                    index=self.worker.index,
                    line=line.decode("utf-8", "replace"),
                )

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        self.pool._ended(self.worker, reason)


@implementer(IFileDescriptorReceiver)
class _Handoff(Protocol):
    """The supervisor's side of an accepted client: pass it on, never read it."""

    def connectionMade(self) -> None:
        transport = cast(Any, self.transport)
        # The client's bytes are the worker's: nothing is read here.
        transport.stopReading()
        pool = cast(_HandoffFactory, self.factory).pool
        pool.hand_off(transport)

    def fileDescriptorReceived(self, descriptor: int) -> None:  # noqa: N802
        os.close(descriptor)


class _HandoffFactory(Factory):
    protocol = _Handoff

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> Protocol | None:
        # The limits of the whole server, before the greeting (see the module docstring).
        if not self.pool.admit(addr):
            return None
        proto = _Handoff()
        proto.factory = self
        return proto


class WorkerPool(Service):
    """
    Starts and supervises the worker processes, and hands them connections.

    @ivar workers: the current worker of each slot.
    """

    def __init__(
        self,
        config: Config,
        shared: Sequence[tuple[ExportSpec, tuple[int, ...]]],
        reactor: Any,
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self.shared = list(shared)
        self.reactor = reactor
        self.python = python
        self.workers: list[_Worker | None] = [None] * config.workers
        self._delays = [MIN_RESPAWN_DELAY] * config.workers
        self._next_id = 1
        self._waiting: list[Any] = []
        self._stopping = False
        # Counts nothing itself: admit() fills in the workers' sums.
        self.slots = ConnectionSlots(config.limits, reactor)
        #: With --metrics, the L{twisted_nbd.metrics.WorkerMetrics} the
        #: workers report to (set before the pool starts).
        self.metrics: Any = None
        #: The default export now (the admin API and reloads change it,
        #: and C{shared}, for the workers started from then on).
        self.default = config.default
        #: With --admin: workers count each connection's bytes.
        self.admin = False
        self._next_request = 1

    @property
    def connection_count(self) -> int:
        """The server's connections: in the workers, or waiting for one."""
        return sum(w.connections for w in self.workers if w is not None) + len(self._waiting)

    @property
    def negotiating_count(self) -> int:
        """The server's connections still negotiating."""
        return sum(w.negotiating for w in self.workers if w is not None) + len(self._waiting)

    def admit(self, address: Any) -> bool:
        """Whether a new connection from C{address} may come in (logged if not)."""
        from twisted_nbd.protocol import describe_address

        reason = self.config.limits.refusal(address, self.connection_count, self.negotiating_count)
        if reason is None:
            return True
        self.slots.refuse(reason, describe_address(address))
        return False

    # Processes.

    def startService(self) -> None:
        Service.startService(self)
        self._stopping = False
        for index in range(len(self.workers)):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = _Worker(index, started=time.monotonic())
        self.workers[index] = worker
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", CONTROL_FD: theirs.fileno()}
        shared_fds: dict[str, list[int]] = {}
        next_fd = FIRST_SHARED_FD
        for spec, fds in self.shared:
            numbers = []
            for fd in fds:
                child_fds[next_fd] = fd
                numbers.append(next_fd)
                next_fd += 1
            shared_fds[spec.name] = numbers
        env = dict(os.environ)
        # The worker must import this very package, installed or not.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(twisted_nbd.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        try:
            process = self.reactor.spawnProcess(
                _WorkerProcess(self, worker),
                self.python,
                [self.python, "-m", WORKER_MODULE, "--index", str(index)],
                env=env,
                childFDs=child_fds,
            )
        finally:
            theirs.close()
        worker.process = process
        worker.pid = process.pid
        settings = {
            "index": index,
            # The exports now, not at startup: the admin API may have changed them.
            "exports": [asdict(spec) for spec, _ in self.shared],
            "default": self.default,
            "shared": shared_fds,
            "max_queue_depth": self.config.max_queue_depth,
            "max_bytes_in_flight": self.config.max_bytes_in_flight,
            "shutdown_timeout": self.config.shutdown_timeout,
            "poll_max": self.config.poll_max,
            "tls": asdict(self.config.tls),
            "limits": self.config.limits.to_json(),
            "verbose": self.config.verbose,
            "metrics": self.metrics is not None,
            "admin": self.admin,
        }
        process.write(json.dumps(settings).encode("utf-8"))
        process.closeStdin()
        control = _Control(self, worker)
        worker.control = control
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, _OneProtocolFactory(control)
        )
        ours.close()
        _log.info("Started worker {index} (pid {pid})", index=index, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker process exited: start another in its slot (unless stopping)."""
        if self.workers[worker.index] is worker:
            self.workers[worker.index] = None
        if self.metrics is not None:
            # Its counters stay in the totals: they must never go backwards.
            self.metrics.retire(worker)
        orphans = list(worker.handed.values())
        worker.handed.clear()
        # It will never answer; one started later gets the current exports.
        asked, worker.asked = worker.asked, {}
        for pending in asked.values():
            pending.callback(None)
        worker.ready = False
        if not worker.ended.called:
            worker.ended.callback(None)
        if self._stopping:
            for transport in orphans:
                transport.abortConnection()
            return
        _log.warn(
            "Worker {index} (pid {pid}) ended: {reason}; starting another",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
        )
        # Connections it never adopted go to another worker: nothing was read.
        for transport in orphans:
            self.hand_off(transport)
        delay = self._delays[worker.index]
        if time.monotonic() - worker.started < QUICK_DEATH:
            self._delays[worker.index] = min(delay * 2, MAX_RESPAWN_DELAY)
        else:
            self._delays[worker.index] = delay = MIN_RESPAWN_DELAY
        cast(IReactorTime, self.reactor).callLater(delay, self._spawn, worker.index)

    def _message(self, worker: _Worker, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if "answer" in message:
            # An answer to an admin request (its keys are its own).
            pending = worker.asked.pop(message["answer"], None)
            if pending is not None:
                pending.callback(message)
            return
        if message.get("ready"):
            worker.ready = True
            _log.info("Worker {index} is ready", index=worker.index)
            waiting, self._waiting = self._waiting, []
            for transport in waiting:
                self.hand_off(transport)
        if "adopted" in message:
            transport = worker.handed.pop(message["adopted"], None)
            if transport is not None:
                # Our copy goes; the connection stays, so no shutdown().
                transport._shouldShutdown = False
                transport.loseConnection()
        if "connections" in message:
            worker.reported_connections = int(message["connections"])
        if "negotiating" in message:
            worker.reported_negotiating = int(message["negotiating"])
        if "metrics" in message and self.metrics is not None:
            self.metrics.update(worker, message["metrics"])

    # Admin requests (see twisted_nbd.admin_workers).

    def ask(
        self, request: dict[str, Any], fds: Sequence[int] = (), timeout: float | None = None
    ) -> Deferred[list[tuple[int, dict[str, Any]]]]:
        """
        Send C{request} (with copies of the descriptors C{fds}) to every
        running worker.

        @return: a Deferred that fires with the (worker index, answer) of
            each worker that answered; one that died, or did not answer
            within C{timeout} seconds, is left out.
        """
        waits: list[Deferred[Any]] = []
        indexes = []
        for worker in self.workers:
            if worker is None or worker.control is None or worker.control.transport is None:
                continue  # none, or on its way out: its successor gets the current exports
            number = self._next_request
            self._next_request += 1
            waiting: Deferred[Any] = Deferred()
            worker.asked[number] = waiting
            if timeout is not None:
                waiting.addTimeout(timeout, self.reactor, _Forget(worker, number))
            control = worker.control
            transport = cast(Any, control.transport)
            for fd in fds:
                transport.sendFileDescriptor(fd)
            line = json.dumps({**request, "request": number, "fds": len(fds)}).encode()
            control.sendLine(line)  # type: ignore[no-untyped-call]
            waits.append(waiting)
            indexes.append(worker.index)

        def gather(results: list[tuple[bool, Any]]) -> list[tuple[int, dict[str, Any]]]:
            return [
                (index, answer)
                for index, (ok, answer) in zip(indexes, results, strict=True)
                if ok and isinstance(answer, dict)
            ]

        return DeferredList(waits, consumeErrors=True).addCallback(gather)

    # Connections.

    def hand_off(self, transport: Any) -> None:
        """Give an accepted connection to the least busy worker."""
        ready = [w for w in self.workers if w is not None and w.ready and w.control is not None]
        if not ready:
            if self._stopping or len(self._waiting) >= MAX_WAITING:
                transport.abortConnection()
            else:
                self._waiting.append(transport)
            return
        worker = min(ready, key=lambda w: (w.connections, w.index))
        connection_id = self._next_id
        self._next_id += 1
        worker.handed[connection_id] = transport
        control = worker.control
        assert control is not None and control.transport is not None
        family = transport.socket.family
        cast(Any, control.transport).sendFileDescriptor(transport.fileno())
        line = json.dumps({"connection": connection_id, "family": family}).encode()
        control.sendLine(line)  # type: ignore[no-untyped-call]

    # Stopping.

    def stopService(self) -> Deferred[None]:
        """
        Ask every worker to drain and exit (SIGTERM), and kill those still
        running C{shutdown_timeout} plus L{STOP_GRACE} seconds later.

        @return: a Deferred that fires once every worker has exited.
        """
        Service.stopService(self)
        self._stopping = True
        for transport in self._waiting:
            transport.abortConnection()
        self._waiting = []
        running = [w for w in self.workers if w is not None]
        for worker in running:
            self._signal(worker, signal.SIGTERM)
        clock = cast(IReactorTime, self.reactor)

        def kill() -> None:
            for worker in running:
                if not worker.ended.called:
                    _log.warn("Killing worker {index}: it did not stop", index=worker.index)
                    self._signal(worker, signal.SIGKILL)

        deadline = clock.callLater(self.config.shutdown_timeout + STOP_GRACE, kill)

        def done(_: object) -> None:
            if deadline.active():
                deadline.cancel()

        return DeferredList([w.ended for w in running]).addCallback(done)

    def _signal(self, worker: _Worker, signum: int) -> None:
        try:
            worker.process.signalProcess(signum)
        except Exception:
            pass  # already gone


class _OneProtocolFactory(Factory):
    """A factory for exactly one protocol made beforehand."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:  # noqa: N802
        return self._protocol


class SupervisorService(MultiService):
    """
    The service tree of a server with workers: the devices (named
    C{"device"}, only held open for the workers), the worker pool, and the
    listeners. Stopping: stop listening, drain and stop the workers, close
    the devices.
    """

    def __init__(self, pool: WorkerPool) -> None:
        MultiService.__init__(self)
        self.pool = pool

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        children = list(self)
        listeners = [c for c in children if c is not self.pool and c.name != "device"]
        devices = [c for c in children if c.name == "device"]
        stopped = DeferredList([maybeDeferred(c.stopService) for c in listeners])
        stopped.addCallback(lambda _: self.pool.stopService())
        stopped.addCallback(lambda _: DeferredList([maybeDeferred(c.stopService) for c in devices]))
        return stopped.addCallback(lambda _: None)


def build_supervisor(config: Config, reactor: Any) -> SupervisorService:
    """
    Build the supervisor's service tree for C{config} (with C{workers} > 1):
    open the exports so they can be shared, and listen.

    @raise ConfigError: an export cannot be shared.
    @raise OSError: a device could not be opened.
    """
    from twisted_nbd.service import BlockDeviceService

    check_workers(config)
    context = OpenContext(reactor, 1)
    devices: list[IBlockDevice] = []
    shared: list[tuple[ExportSpec, tuple[int, ...]]] = []
    try:
        for spec in config.exports:
            device = open_shared(spec, context)
            devices.append(device)
            shared.append((spec, _shares(device)))
    except BaseException:
        for device in devices:
            device.close()
        raise
    pool = WorkerPool(config, shared, reactor)
    top = SupervisorService(pool)
    owner: Service = BlockDeviceService(devices, None)
    owner.setName("device")
    owner.setServiceParent(top)
    cast(Service, pool).setServiceParent(top)
    factory = _HandoffFactory(pool)
    for description in config.listen:
        strports.service(description, factory, reactor=reactor).setServiceParent(top)
    return top
