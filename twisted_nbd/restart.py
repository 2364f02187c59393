# -*- test-case-name: tests.test_restart -*-
"""
Live restart: C{twistd nbd --takeover PATH}.

Every generation of the server runs with the same C{--takeover PATH}. A
server that finds nobody at PATH starts as usual and listens at PATH for its
successor. A server that finds a predecessor there takes over from it:

 1. Before its reactor runs (in C{makeService}), the successor connects to
    PATH and says hello; the predecessor sends its listening sockets with
    their endpoint descriptions (C{SCM_RIGHTS}). The successor adopts those
    whose description is among its own C{--listen} (C{adoptStreamPort}) and
    listens anew on the others.
 2. Once its listeners are up, the successor says C{listening}. The
    predecessor stops accepting (its copies of the listening sockets are
    closed without C{shutdown()}, and a Unix socket's path is left alone:
    they are the successor's now) and hands over each connection: it stops
    taking requests at the next request boundary, lets the requests in flight
    finish and their replies reach the kernel, then sends the socket and the
    connection's state as JSON: what was negotiated (structured replies,
    extended headers, the meta contexts with their ids), the export, its
    transmission flags, size and block sizes as the client was told, and
    the bytes received but not parsed yet. The successor checks that its
    export of that name would behave the same and serves the same data,
    resumes the connection in transmission (no greeting) and parses those
    bytes first (C{adoptStreamConnection}); or it declines, and the
    predecessor serves the connection on.
 3. Connections still negotiating when the successor arrives stay in the
    predecessor until they choose an export, then move like the others.
    TLS connections stay: OpenSSL's session state cannot leave the process.
    The predecessor keeps serving what stays until it closes. Connections
    to an export that cannot move stay too (a RAM disk, or a filter that
    keeps data per export: their contents are the predecessor's alone).
 4. When nothing is left to hand over, the predecessor says C{done} and
    closes the control connection; the successor then listens at PATH for
    the next generation. The predecessor exits once its last connection
    has closed.

If the successor goes away before C{done}, the predecessor takes its
listeners back, serves the connections it had not handed over, and listens
at PATH again.

Messages are JSON, one per line; a descriptor travels with the first byte
of the line it belongs to.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from dataclasses import asdict
from typing import Any, Sequence, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import unix
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IFileDescriptorReceiver, IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.config import Config, ConfigError, ExportSpec
from twisted_nbd.observers import ConnectionInfo, ServerObserver
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol

__all__ = ["HandoverService", "attach_takeover", "movable"]

_log = Logger()

#: How long the successor waits for the predecessor's listeners.
HELLO_TIMEOUT = 30.0
#: How often a frozen connection's send buffer is checked until it is empty.
DRAIN_INTERVAL = 0.005
#: The longest control message (a connection's state with its buffered bytes).
MAX_MESSAGE = 64 * 1024 * 1024


def movable(spec: ExportSpec, shared: bool = False) -> str | None:
    """
    Why connections to C{spec}'s export cannot move to another process, or
    C{None} if they can: its data must be where the other process finds it
    (an image file, or a RAM disk in shared memory whose memory files went
    along: C{shared}), and no filter may keep data of its own per export.
    """
    if spec.memory is not None and not shared:
        return "a RAM disk does not outlive its process"
    if spec.backend_ref is not None:
        return f"the {spec.backend_ref.name!r} backend's state is this process's own"
    from twisted_nbd.registry import FilterPlugin, registry

    for ref in spec.filters:
        plugin, values = registry.resolve("filter", ref)
        assert isinstance(plugin, FilterPlugin)
        if plugin.per_connection is not None and plugin.per_connection(values):
            continue
        if not plugin.per_process:
            return f"the {ref.name!r} filter keeps state per export"
    return None


def _shared_memory(device: Any) -> MappedMemoryDevice | None:
    """The RAM disk in shared memory under C{device}'s filters, if that is what it is."""
    while not isinstance(device, MappedMemoryDevice):
        device = getattr(device, "inner", None)
        if device is None:
            return None
    return device


def _spec_json(spec: ExportSpec) -> Any:
    return json.loads(json.dumps(asdict(spec), default=str))


# ---------------------------------------------------------------- descriptors


def _send_line(transport: Any, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    for fd in fds:
        transport.sendFileDescriptor(fd)
    transport.write(json.dumps(message).encode("utf-8") + b"\n")


def _recv_line(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and its descriptors, from a blocking socket."""
    data = b""
    fds: list[int] = []
    while b"\n" not in data:
        chunk, got, _, _ = socket.recv_fds(sock, 65536, 64)
        fds.extend(got)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the old server closed the takeover socket")
        data += chunk
    line, _, rest = data.partition(b"\n")
    if rest:
        raise ConnectionError("the old server sent more than its listeners")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ConnectionError(f"bad takeover message {line!r}")
    return message, fds


# ---------------------------------------------------------------- the successor


class _AdoptedEndpoint:
    """A server endpoint whose listening socket came from the predecessor."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        try:
            port = self._reactor.adoptStreamPort(self._fd, self._family, factory)
        finally:
            os.close(self._fd)  # adoptStreamPort made its own copy
        return succeed(port)


class _OneProtocol(Factory):
    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Any:  # noqa: N802 - Twisted's name
        return self._protocol


@implementer(IFileDescriptorReceiver)
class _Successor(LineReceiver):
    """The successor's end of the takeover socket: adopts connections."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, service: HandoverService) -> None:
        self.service = service
        self._fds: list[int] = []

    def fileDescriptorReceived(self, descriptor: int) -> None:  # noqa: N802
        self._fds.append(descriptor)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        try:
            message = json.loads(line)
        except ValueError:
            _log.warn("Bad takeover message {line!r}", line=line[:200])
            return
        if not isinstance(message, dict):
            return
        if "connection" in message:
            if not self._fds:
                _log.warn("Takeover message without a descriptor")
                return
            self._adopt(message, self._fds.pop(0))
        if message.get("done"):
            _log.info("The old server has handed over all it could")
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _adopt(self, message: dict[str, Any], fd: int) -> None:
        connection_id = message.get("connection")
        try:
            reason = self.service.accepts(message)
            if reason is None:
                proto = self.service.factory.make_protocol()
                proto.resume(message["state"])
                self.service.reactor.adoptStreamConnection(
                    fd, int(message["family"]), _OneProtocol(proto)
                )
        except Exception as e:
            reason = str(e) or type(e).__name__
        finally:
            os.close(fd)
        if reason is None:
            _log.info(
                "Took over client {peer} (export {name!r})",
                peer=message["state"].get("peer", "?"),
                name=message["state"].get("export"),
            )
            _send_line(self.transport, {"adopted": connection_id})
        else:
            _send_line(self.transport, {"declined": connection_id, "reason": reason})

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.service.predecessor_gone()


# ---------------------------------------------------------------- the predecessor


class _Moving:
    """One connection on its way to the successor."""

    def __init__(self, ident: int, proto: NBDServerProtocol) -> None:
        self.ident = ident
        self.proto = proto
        self.sent = False
        self.timer: Any = None


@implementer(IFileDescriptorReceiver)
class _Predecessor(LineReceiver):
    """The predecessor's end of the takeover socket: hands over."""

    delimiter = b"\n"
    MAX_LENGTH = 1024 * 1024

    def __init__(self, service: HandoverService) -> None:
        self.service = service

    def connectionMade(self) -> None:  # noqa: N802
        if not self.service.successor_arrived(self):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def fileDescriptorReceived(self, descriptor: int) -> None:  # noqa: N802
        os.close(descriptor)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            _log.warn("Bad takeover message {line!r}", line=line[:200])
            return
        self.service.message(message)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.service.successor_gone(self)


class _PredecessorFactory(Factory):
    def __init__(self, service: HandoverService) -> None:
        self.service = service

    def buildProtocol(self, addr: object) -> _Predecessor:  # noqa: N802
        proto = _Predecessor(self.service)
        proto.factory = self
        return proto


class _Watcher(ServerObserver):
    """Tells the handover of connections choosing an export or closing."""

    def __init__(self, service: HandoverService) -> None:
        self.service = service

    def export_chosen(self, connection: ConnectionInfo, name: str) -> None:
        self.service.export_chosen(connection)

    def connection_lost(self, connection: ConnectionInfo, reason: str) -> None:
        self.service.connection_lost()


# ---------------------------------------------------------------- both


class HandoverService(Service):
    """
    Both ends of a live restart for one server (see the module docstring):
    takes over from a predecessor if there was one, and hands over to a
    successor when one comes.

    @ivar factory: the server's factory.
    @ivar listeners: the server's listeners, by endpoint description.
    """

    def __init__(
        self,
        factory: NBDServerFactory,
        config: Config,
        path: str,
        reactor: Any,
        listeners: dict[str, StreamServerEndpointService],
        predecessor: socket.socket | None = None,
        stop_reactor: bool = True,
    ) -> None:
        self.factory = factory
        self.config = config
        self.path = path
        self.reactor = reactor
        self.listeners = listeners
        self._predecessor_socket = predecessor
        self._stop_reactor = stop_reactor
        # The RAM disks shared with the other process, by export name.
        self.shared: set[str] = set()
        self._port: Any = None
        self._successor: _Predecessor | None = None
        self._moving: dict[int, _Moving] = {}
        self._staying: set[NBDServerProtocol] = set()
        self._next_id = 1
        self._released: list[Any] = []
        self._done = False
        self._began = 0.0
        # Handed over and being closed here (their connectionLost comes later).
        self._moved: set[NBDServerProtocol] = set()
        self._moved_count = 0
        factory.add_observer(_Watcher(self))

    # The successor's side.

    def startService(self) -> None:
        Service.startService(self)
        sock, self._predecessor_socket = self._predecessor_socket, None
        if sock is None:
            self._listen()
            return
        sock.setblocking(False)
        control = _Successor(self)
        self.reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _OneProtocol(control))
        sock.close()
        _send_line(control.transport, {"listening": True})

    def accepts(self, message: dict[str, Any]) -> str | None:
        """Why a connection the predecessor offers cannot be served here, or C{None}."""
        state = message.get("state")
        if not isinstance(state, dict):
            return "no state"
        name = state.get("export")
        ours = next((s for s in self.config.exports if s.name == name), None)
        if ours is None:
            return f"there is no export named {name!r} here"
        why = movable(ours, ours.name in self.shared)
        if why is not None:
            return why
        if message.get("spec") != _spec_json(ours):
            return f"export {name!r} is configured differently here"
        return None

    def predecessor_gone(self) -> None:
        """The takeover is over: listen at PATH for the next generation."""
        if self.running and self._port is None:
            self._listen()

    def _listen(self) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # nobody answered there (see attach_takeover)
        except FileNotFoundError:
            pass
        self._port = self.reactor.listenUNIX(self.path, _PredecessorFactory(self), mode=0o600)

    # The predecessor's side.

    def successor_arrived(self, control: _Predecessor) -> bool:
        if self._successor is not None or self._done:
            return False
        self._successor = control
        self._began = self.reactor.seconds()
        _log.info("A new server takes over: handing over the listeners")
        fds: list[int] = []
        described: list[dict[str, Any]] = []
        for description, listener in self.listeners.items():
            port = _port_of(listener)
            if port is None:
                continue
            fds.append(port.fileno())
            described.append({"description": description, "family": _family(port)})
        memory: list[dict[str, Any]] = []
        for spec in self.config.exports:
            export = self.factory.registry.lookup(spec.name)
            disk = _shared_memory(export.device) if export is not None else None
            if spec.memory is not None and disk is not None:
                # The new server serves the same memory (as workers do).
                fds.extend(disk.share())
                memory.append({"name": spec.name, "size": disk.size})
                self.shared.add(spec.name)
        _send_line(control.transport, {"listeners": described, "memory": memory}, fds)
        return True

    def message(self, message: dict[str, Any]) -> None:
        if message.get("listening"):
            self._release_listeners()
            for proto in list(self.factory.connections):
                self._offer(proto)
            self._maybe_done()
        if "adopted" in message:
            moving = self._moving.pop(message["adopted"], None)
            if moving is not None:
                self._moved.add(moving.proto)
                self._moved_count += 1
                moving.proto.detach()
            self._maybe_done()
        if "declined" in message:
            moving = self._moving.pop(message["declined"], None)
            if moving is not None:
                _log.info(
                    "Client {peer} stays: {reason}",
                    peer=moving.proto.info.peer,
                    reason=message.get("reason"),
                )
                self._stay(moving)
            self._maybe_done()

    def _release_listeners(self) -> None:
        """Stop accepting: the successor has the listening sockets now."""
        if self._port is not None:
            self._port.stopListening()
            self._port = None
        for listener in self.listeners.values():
            port = _port_of(listener)
            if port is not None:
                port.stopReading()
                self._released.append(port)

    def _offer(self, proto: NBDServerProtocol) -> None:
        """Start handing C{proto} over, if it can go."""
        if proto in self._staying or any(m.proto is proto for m in self._moving.values()):
            return
        name = proto.info.export
        if name is None:
            return  # still negotiating: see export_chosen
        spec = next((s for s in self.config.exports if s.name == name), None)
        why = movable(spec, spec.name in self.shared) if spec is not None else "unknown export"
        if why is not None:
            _log.info("Client {peer} stays: {reason}", peer=proto.info.peer, reason=why)
            self._staying.add(proto)
            return
        moving = _Moving(self._next_id, proto)
        self._next_id += 1
        self._moving[moving.ident] = moving
        # Set before freezing: an idle connection is frozen (and sent) at once.
        moving.timer = self.reactor.callLater(self.config.shutdown_timeout, self._expire, moving)
        if not proto.freeze(lambda: self._drain(moving)):
            del self._moving[moving.ident]
            moving.timer.cancel()
            if not proto.info.tls:
                _log.info("Client {peer} stays: it is closing", peer=proto.info.peer)
            else:
                _log.info("Client {peer} stays: TLS", peer=proto.info.peer)
            self._staying.add(proto)

    def _expire(self, moving: _Moving) -> None:
        moving.timer = None
        if moving.sent or self._moving.get(moving.ident) is not moving:
            return
        del self._moving[moving.ident]
        _log.warn(
            "Client {peer} stays: still busy after {timeout}s",
            peer=moving.proto.info.peer,
            timeout=self.config.shutdown_timeout,
        )
        self._stay(moving)
        self._maybe_done()

    def _stay(self, moving: _Moving) -> None:
        if moving.timer is not None and moving.timer.active():
            moving.timer.cancel()
        self._staying.add(moving.proto)
        moving.proto.thaw()

    def _drain(self, moving: _Moving) -> None:
        """The connection is frozen: send it once its replies have left."""
        if self._moving.get(moving.ident) is not moving or self._successor is None:
            return
        proto = moving.proto
        transport = cast(Any, proto.transport)
        if transport is None or not transport.connected:
            del self._moving[moving.ident]
            self._maybe_done()
            return
        if len(transport.dataBuffer) > transport.offset or transport._tempDataLen:
            # Twisted says nothing when a buffer empties unless it was full.
            self.reactor.callLater(DRAIN_INTERVAL, self._drain, moving)
            return
        if moving.timer is not None and moving.timer.active():
            moving.timer.cancel()
        moving.sent = True
        message = {
            "connection": moving.ident,
            "family": transport.socket.family,
            "state": proto.handover_state(),
            "spec": _spec_json(next(s for s in self.config.exports if s.name == proto.info.export)),
        }
        _send_line(self._successor.transport, message, [transport.fileno()])

    def export_chosen(self, info: ConnectionInfo) -> None:
        if self._successor is None or self._done:
            return
        for proto in self.factory.connections:
            if proto.info is info:
                self._offer(proto)
                return

    def connection_lost(self) -> None:
        for ident, moving in list(self._moving.items()):
            transport = cast(Any, moving.proto.transport)
            if transport is None or not transport.connected:
                if not moving.sent:
                    del self._moving[ident]
        self._staying = {p for p in self._staying if p in self.factory.connections}
        self._moved = {p for p in self._moved if p in self.factory.connections}
        self._maybe_done()
        self._maybe_exit()

    def _maybe_done(self) -> None:
        """Say C{done} once every connection left here stays here."""
        if self._successor is None or self._done or self._moving:
            return
        left = set(self.factory.connections) - self._moved
        if any(p.info.export is None and not p.info.tls for p in left):
            return  # still negotiating: it may go yet
        self._done = True
        _log.info(
            "Handover done in {elapsed:.3f}s: {moved} connection(s) moved, {count} stay "
            "until they close",
            elapsed=self.reactor.seconds() - self._began,
            moved=self._moved_count,
            count=len(left),
        )
        _send_line(self._successor.transport, {"done": True})
        self._successor.transport.loseConnection()  # type: ignore[union-attr]
        self._maybe_exit()

    def _maybe_exit(self) -> None:
        if self._done and not self.factory.connections and self._stop_reactor:
            _log.info("Every connection has moved or closed: the old server exits")
            self._stop_reactor = False
            self.reactor.callLater(0, self.reactor.stop)

    def successor_gone(self, control: _Predecessor) -> None:
        if self._successor is not control:
            return
        self._successor = None
        if self._done:
            return
        _log.warn("The new server went away before the handover was done: serving on")
        for port in self._released:
            port.startReading()
        self._released = []
        for moving in list(self._moving.values()):
            if not moving.sent:
                self._stay(moving)
            else:
                # Sent, but never confirmed: the other side may have
                # adopted it before it died. Nobody knows who has it now.
                moving.proto.abort()
        self._moving.clear()
        self._staying.clear()
        if self.running and self._port is None:
            self._listen()

    def stopService(self) -> None:
        Service.stopService(self)
        if self._port is not None:
            self._port.stopListening()
            self._port = None
        for port in self._released:
            _forget(port)


def _port_of(listener: StreamServerEndpointService) -> Any:
    waiting = getattr(listener, "_waitingForPort", None)
    if waiting is None or not waiting.called:
        return None
    port = waiting.result
    return port if not isinstance(port, Failure) else None


def _family(port: Any) -> int:
    family: int = port.socket.family
    return family


def _forget(port: Any) -> None:
    """
    Make a listening port's later C{stopListening} close only this
    process's copy: no C{shutdown()} (which would stop the successor's
    copy listening too) and no unlinking of a Unix socket's path (the
    successor's now).
    """
    port._shouldShutdown = False
    if isinstance(port, unix.Port):
        path = port._bindPath
        port._bindPath = b"\0" if isinstance(path, bytes) else "\0"


def _connect(path: str) -> socket.socket | None:
    """
    A connection to the predecessor at C{path}, or C{None} if there is
    none (nothing there, or a socket nobody listens on: a server that
    died).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HELLO_TIMEOUT)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise ConfigError(f"--takeover {path!r}: {e.strerror}") from None
    return sock


def attach_takeover(
    top: MultiService, config: Config, path: str, reactor: Any, stop_reactor: bool = True
) -> HandoverService:
    """
    Add live restart to a tree built by L{twisted_nbd.service.build}: take
    the listeners over from a predecessor at C{path} if there is one (this
    blocks until it sends them: call it before the reactor runs), and hand
    over to a successor later.

    @param stop_reactor: stop the reactor once everything has moved or
        closed (what C{twistd nbd} wants; not a server embedded in a bigger
        program, or a test).
    @return: the service added to C{top}.
    @raise ConfigError: there are workers, or the predecessor misbehaves.
    """
    from twisted_nbd.service import NBDService

    if not isinstance(top, NBDService):
        raise ConfigError("--takeover does not work with --workers")
    services = [c for c in top if isinstance(c, StreamServerEndpointService)]
    if len(services) != len(config.listen):
        raise ConfigError("--takeover: the listeners do not match --listen")
    listeners = dict(zip(config.listen, services, strict=True))
    shared: set[str] = set()
    sock = _connect(path)
    if sock is not None:
        try:
            message, fds = _recv_line_after_hello(sock)
        except (OSError, ValueError) as e:
            sock.close()
            raise ConfigError(f"--takeover {path!r}: {e}") from None
        given = message.get("listeners", [])
        for entry, fd in zip(given, fds, strict=False):
            service = listeners.get(entry.get("description"))
            if service is None:
                os.close(fd)  # a listener we do not have: it closes with the old server
                continue
            service.endpoint = _AdoptedEndpoint(reactor, fd, int(entry["family"]))
        rest = fds[len(given) :]
        for entry in message.get("memory", []):
            pair, rest = (rest[0], rest[1]), rest[2:]
            if _adopt_memory(top, config, entry, pair):
                shared.add(entry["name"])
            else:
                for fd in pair:
                    os.close(fd)
        for fd in rest:
            os.close(fd)
    handover = HandoverService(
        top.factory, config, path, reactor, listeners, sock, stop_reactor=stop_reactor
    )
    handover.shared = shared
    cast(Service, handover).setServiceParent(top)
    return handover


def _adopt_memory(top: Any, config: Config, entry: Any, fds: tuple[int, int]) -> bool:
    """
    Serve the old server's RAM disk for an export of the same name and size
    instead of the new, empty one (nobody has used it yet).
    """
    spec = next((s for s in config.exports if s.name == entry.get("name")), None)
    export = top.factory.registry.lookup(spec.name) if spec is not None else None
    disk = _shared_memory(export.device) if export is not None else None
    if spec is None or spec.memory is None or disk is None or disk.size != entry.get("size"):
        return False
    disk.adopt(fds)
    return True


def _recv_line_after_hello(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    sock.sendall(json.dumps({"hello": 1, "pid": os.getpid()}).encode() + b"\n")
    return _recv_line(sock)
