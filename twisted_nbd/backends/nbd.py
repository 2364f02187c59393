# -*- test-case-name: tests.interop.test_nbd_backend -*-
"""
The C{nbd} backend: a proxy to another NBD server, through
L{twisted_nbd.client}.

    twistd -n nbd --backend nbd:uri=nbd://10.0.0.5/disk
    twistd -n nbd --backend nbd:uri=nbd+unix:///disk?socket=/run/nbd.sock,connections=4
    twistd -n nbd --backend nbd:uri=nbds://host/disk,tls-certificates=/etc/pki/nbd

The remote is named by a URI as libnbd writes them (C{nbd://HOST[:PORT]/EXPORT},
C{nbds://} for TLS, C{nbd+unix:///EXPORT?socket=PATH}, C{nbds+unix://}, with
the C{tls-certificates}, C{tls-psk-file}, C{tls-username} and
C{tls-hostname} query parameters) or by separate keys.

What the remote advertises is what this export advertises: its size,
read-only flag, FLUSH, FUA, TRIM, WRITE_ZEROES, fast zero, CACHE,
multi-conn, C{base:allocation} block status and block size constraints.
Requests go to a pool of C{connections} connections (the least busy one
takes each); more than one needs a remote that advertises multi-conn, since
otherwise the remote does not promise that its connections see each
other's writes.

When the remote goes away (a restart, a network cut), every connection of
the pool reconnects with exponential backoff (from C{backoff}, doubling, at
most L{MAX_BACKOFF}), and checks that the remote still has the same size and
still advertises what this export promised. Requests that were in flight on
a lost connection: READ, BLOCK_STATUS and CACHE are sent once more on a new
connection; writes, trims, zeroing and flushes fail with C{EIO} (whether the
remote did them is unknown). New requests wait for a connection at most
C{timeout} seconds, then fail with C{EIO}. And since the remote may have
lost writes it had acknowledged but not yet flushed, the first FLUSH after
such a loss fails with C{EIO}, so that the client's FLUSH never claims what
is not true.

Opening it (the registry's opener runs before the reactor does) makes one
blocking handshake to learn the remote's size and flags (L{probe_blocking},
with TLS through pyOpenSSL's memory BIO as the Twisted client does); the
pool connects once the reactor runs. L{open_nbd} does the same on a running
reactor.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from twisted_nbd._client_connection import (
    NEED_DATA,
    ClientConfiguration,
    ClientConnection,
    ExportInfo,
    HandshakeComplete,
    HandshakeRefused,
    TLSStarting,
)
from twisted_nbd._wire import BASE_ALLOCATION, Errno, TxFlags
from twisted_nbd.backends import OpenContext
from twisted_nbd.errors import NBDError, ProtocolViolation
from twisted_nbd.interfaces import Capabilities, Extent, IBlockDevice
from twisted_nbd.registry import DURATION, INT, PATH, STRING, BackendPlugin, Key, choice
from twisted_nbd.tls import TLSClientSettings, TLSError

if TYPE_CHECKING:
    from twisted_nbd.client import NBDClient

__all__ = [
    "MAX_BACKOFF",
    "NBDProxyDevice",
    "NBDTarget",
    "RemoteShape",
    "open_nbd",
    "parse_uri",
    "plugin",
    "probe_blocking",
]

_log = Logger()
_T = TypeVar("_T")

#: The longest wait between two connection attempts, in seconds.
MAX_BACKOFF = 5.0
#: The default NBD port.
DEFAULT_PORT = 10809


# ---------------------------------------------------------------- the target


@dataclass(frozen=True)
class NBDTarget:
    """
    Where the remote export is.

    @ivar host: its host, for TCP.
    @ivar port: its TCP port.
    @ivar socket: its Unix socket path (instead of C{host}).
    @ivar export: the export's name.
    @ivar tls: how to do TLS, or C{None} for plaintext.
    """

    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    export: str = ""
    tls: TLSClientSettings | None = None

    def __str__(self) -> str:
        scheme = "nbds" if self.tls is not None else "nbd"
        if self.socket is not None:
            return f"{scheme}+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.export}"

    def endpoint(self, reactor: Any, timeout: float) -> Any:
        """A Twisted client endpoint for the remote."""
        if self.socket is not None:
            return UNIXClientEndpoint(reactor, self.socket, timeout=timeout)
        assert self.host is not None
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


_SCHEMES = {"nbd": False, "nbds": True, "nbd+unix": False, "nbds+unix": True}


def parse_uri(uri: str) -> dict[str, Any]:
    """
    Split a libnbd-style NBD URI into the backend's keys: C{host},
    C{port}, C{socket}, C{export}, C{tls} and the C{tls-*} parameters.

    @raise ValueError: it is not such a URI.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"uri: {uri!r} is not an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    known = {"socket", "tls-certificates", "tls-psk-file", "tls-username", "tls-hostname"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(f"uri: unknown query parameter {unknown[0]!r} (known: {sorted(known)})")
    found: dict[str, Any] = {
        "export": unquote(parts.path[1:] if parts.path.startswith("/") else parts.path),
        "tls": "require" if _SCHEMES[scheme] else "off",
    }
    for name in known - {"socket"}:
        if name in query:
            found[name] = query[name]
    if scheme.endswith("+unix"):
        if parts.netloc:
            raise ValueError(f"uri: {uri!r}: a +unix URI has no host (write nbd+unix:///EXPORT)")
        if "socket" not in query:
            raise ValueError(f"uri: {uri!r} needs ?socket=PATH")
        found["socket"] = query["socket"]
    else:
        if not parts.hostname:
            raise ValueError(f"uri: {uri!r} has no host")
        found["host"] = parts.hostname
        found["port"] = parts.port or DEFAULT_PORT
    return found


def target_from_values(values: Mapping[str, Any]) -> NBDTarget:
    """
    The L{NBDTarget} the backend's keys describe (a C{uri}, or C{host}/
    C{port} or C{socket} and C{export}; explicit keys win over the URI's
    query parameters).

    @raise ValueError: they do not describe one remote, or the TLS files
        do not load.
    """
    merged: dict[str, Any] = {}
    if values.get("uri"):
        if values.get("host") or values.get("socket"):
            raise ValueError("give either uri= or host=/socket=, not both")
        merged.update(parse_uri(values["uri"]))
    for name in ("host", "socket", "export", "tls", *_TLS_KEYS):
        if values.get(name) is not None:
            merged[name] = values[name]
    if values.get("port") is not None:
        merged["port"] = values["port"]
    host, path = merged.get("host"), merged.get("socket")
    if (host is None) == (path is None):
        raise ValueError("give uri=, or exactly one of host= and socket=")
    tls_mode = merged.get("tls") or "off"
    settings: TLSClientSettings | None = None
    certificates = merged.get("tls-certificates")
    psk = merged.get("tls-psk-file")
    if certificates and psk:
        raise ValueError("give tls-certificates= or tls-psk-file=, not both")
    if tls_mode == "off" and (certificates or psk):
        tls_mode = "require"  # naming TLS files means TLS
    if tls_mode == "require":
        hostname = merged.get("tls-hostname") or host
        try:
            if psk:
                user = merged.get("tls-username") or getpass.getuser()
                settings = TLSClientSettings.from_psk_file(psk, user)
            elif certificates:
                settings = TLSClientSettings.from_directory(certificates, hostname=hostname)
            else:
                settings = TLSClientSettings(hostname=hostname)
            settings.client_creator()  # the files load
        except TLSError as e:
            raise ValueError(str(e)) from None
    return NBDTarget(
        host=host,
        port=int(merged.get("port") or DEFAULT_PORT),
        socket=path,
        export=merged.get("export") or "",
        tls=settings,
    )


_TLS_KEYS = ("tls-certificates", "tls-psk-file", "tls-username", "tls-hostname")


# ---------------------------------------------------------------- the remote's shape


@dataclass(frozen=True)
class RemoteShape:
    """
    What the remote export promised in its handshake, which this export
    passes on and which every reconnection must still offer.

    @ivar size: bytes.
    @ivar flags: the transmission flags.
    @ivar block_size: C{(minimum, preferred, maximum)}.
    @ivar extents: C{base:allocation} was selected.
    """

    size: int
    flags: int
    block_size: tuple[int, int, int]
    extents: bool

    @classmethod
    def of(cls, info: ExportInfo) -> RemoteShape:
        """The shape of an export as a handshake described it."""
        return cls(
            size=info.size,
            flags=int(info.transmission_flags),
            block_size=tuple(info.block_size),  # type: ignore[arg-type]
            extents=BASE_ALLOCATION in info.meta_contexts,
        )

    def flag(self, flag: TxFlags) -> bool:
        return bool(self.flags & flag)

    def capabilities(self) -> Capabilities:
        """This export's capabilities: the remote's, passed through."""
        minimum, preferred, maximum = self.block_size
        # The server checks its own block sizes strictly (a preferred size of
        # at least 512, a maximum that is a multiple of the minimum): keep
        # the remote's where they fit, else the nearest that does.
        minimum = minimum if 0 < minimum <= 65536 and minimum & (minimum - 1) == 0 else 1
        preferred = max(preferred, minimum, 512)
        if preferred & (preferred - 1):
            preferred = 1 << preferred.bit_length()
        maximum = max(min(maximum, 0xFFFFFFFF), preferred)
        maximum -= maximum % minimum
        writable = not self.flag(TxFlags.READ_ONLY)
        return Capabilities(
            can_write=writable,
            can_flush=self.flag(TxFlags.SEND_FLUSH),
            can_fua=writable and self.flag(TxFlags.SEND_FUA),
            can_trim=writable and self.flag(TxFlags.SEND_TRIM),
            can_zero=writable and self.flag(TxFlags.SEND_WRITE_ZEROES),
            can_fast_zero=writable
            and self.flag(TxFlags.SEND_WRITE_ZEROES)
            and self.flag(TxFlags.SEND_FAST_ZERO),
            can_cache=self.flag(TxFlags.SEND_CACHE),
            can_extents=self.extents,
            can_multi_conn=self.flag(TxFlags.CAN_MULTI_CONN),
            rotational=self.flag(TxFlags.ROTATIONAL),
            min_block=minimum,
            preferred_block=preferred,
            max_block=maximum,
        )

    def still(self, now: RemoteShape) -> str | None:
        """
        Why the remote, now looking like C{now}, can no longer serve what
        this shape promised; C{None} if it can.
        """
        if now.size != self.size:
            return f"its size changed from {self.size} to {now.size} bytes"
        promised, offered = self.capabilities(), now.capabilities()
        for name in (
            "can_write",
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_extents",
            "can_multi_conn",
        ):
            if getattr(promised, name) and not getattr(offered, name):
                return f"it no longer offers {name.removeprefix('can_')}"
        if offered.min_block > promised.min_block or offered.max_block < promised.max_block:
            return "its block size constraints are stricter than before"
        return None


# ---------------------------------------------------------------- the blocking probe


class _NoFactory:
    """What L{_VerificationRecorder} offers as the factory behind it."""

    wrappedFactory = None  # noqa: N815 - Twisted's name


class _VerificationRecorder:
    """
    Stands in for Twisted's TLS protocol during the blocking probe:
    Twisted's hostname check reports a mismatch to C{failVerification}.
    """

    def __init__(self) -> None:
        self.failure: Any = None
        # Twisted's ALPN set-up looks for the protocol factory it wraps: none.
        self.factory = _NoFactory()

    def failVerification(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self.failure = reason


class _Channel:
    """A blocking socket that can switch to TLS (pyOpenSSL, memory BIO)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls: Any = None

    def _pump_out(self) -> None:
        from OpenSSL import SSL

        while True:
            try:
                data = self.tls.bio_read(65536)
            except SSL.WantReadError:
                return
            if not data:
                return
            self.sock.sendall(data)

    def _pump_in(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.tls.bio_write(data)
        return True

    def start_tls(self, creator: Any) -> None:
        from OpenSSL import SSL

        from twisted_nbd.tls import describe_tls_error

        recorder = _VerificationRecorder()
        self.tls = creator.clientConnectionForTLS(recorder)
        self.tls.set_app_data(recorder)
        self.tls.set_connect_state()
        try:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except SSL.WantReadError:
                    self._pump_out()
                    if not self._pump_in():
                        raise ValueError("the server closed the connection during TLS") from None
        except SSL.Error as e:
            raise ValueError(f"TLS failed: {describe_tls_error(e)}") from None
        self._pump_out()
        if recorder.failure is not None:
            raise ValueError(f"TLS: {recorder.failure.getErrorMessage()}")

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
            return
        self.tls.sendall(data)
        self._pump_out()

    def recv(self) -> bytes:
        if self.tls is None:
            return self.sock.recv(65536)
        from OpenSSL import SSL

        while True:
            try:
                data: bytes = self.tls.recv(65536)
                return data
            except SSL.WantReadError:
                if not self._pump_in():
                    return b""
            except SSL.ZeroReturnError:
                return b""


def probe_blocking(target: NBDTarget, timeout: float) -> ExportInfo:
    """
    One blocking handshake with the remote, then NBD_CMD_DISC: what it
    offers. For the registry's opener, which runs before the reactor.

    @raise ValueError: the remote cannot be reached, refuses the export or
        TLS, or breaks the protocol; the message says which.
    """
    where = str(target)
    try:
        if target.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(target.socket)
        else:
            assert target.host is not None
            sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except OSError as e:
        raise ValueError(f"cannot connect to {where}: {e.strerror or e}") from None
    try:
        sock.settimeout(timeout)
        channel = _Channel(sock)
        tls = "require" if target.tls is not None else "off"
        conn = ClientConnection(ClientConfiguration(target.export, tls=tls))
        while True:
            try:
                event = conn.next_event()
            except ProtocolViolation as e:
                raise ValueError(f"{where} broke the NBD protocol: {e}") from None
            for data in conn.data_to_send():
                channel.send(bytes(data))
            if event is NEED_DATA:
                received = channel.recv()
                if not received:
                    raise ValueError(f"{where} closed the connection during the handshake")
                conn.receive_data(received)
            elif isinstance(event, HandshakeComplete):
                conn.disconnect()
                for data in conn.data_to_send():
                    channel.send(bytes(data))
                return event.info
            elif isinstance(event, HandshakeRefused):
                raise ValueError(f"{where} refused the export: {event.error}")
            elif isinstance(event, TLSStarting):
                assert target.tls is not None
                channel.start_tls(target.tls.client_creator())
                conn.tls_started()
                for data in conn.data_to_send():
                    channel.send(bytes(data))
            else:
                raise ValueError(f"{where}: unexpected {event!r} during the handshake")
    except OSError as e:
        raise ValueError(f"the handshake with {where} failed: {e.strerror or e}") from None
    finally:
        sock.close()


# ---------------------------------------------------------------- the device


class _Slot:
    """One connection of the pool, and what is known about its writes."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.client: NBDClient | None = None
        self.connecting: Deferred[None] | None = None
        # Writes acknowledged without FUA, and how many of them a FLUSH has covered.
        self.writes = 0
        self.flushed = 0
        self.ever_connected = False


#: What a lost connection looks like to a request.
_LOST = (ConnectionLost, ConnectionDone, ProtocolViolation)


@implementer(IBlockDevice)
class NBDProxyDevice:
    """
    A device whose bytes are on another NBD server, over a pool of client
    connections. Make one with L{open_nbd} or the registry's C{nbd}
    backend.

    @ivar target: the remote.
    @ivar shape: what the remote promised, passed on as C{size} and
        C{capabilities}.
    @ivar reconnects: connections made after the first one of each slot.
    @ivar retried: requests sent once more after their connection was lost.
    """

    def __init__(
        self,
        reactor: Any,
        target: NBDTarget,
        shape: RemoteShape,
        connections: int = 1,
        timeout: float = 30.0,
        backoff: float = 0.1,
    ) -> None:
        self.reactor = reactor
        self.target = target
        self.shape = shape
        self.size = shape.size
        self.capabilities = shape.capabilities()
        self.timeout = timeout
        self.backoff = backoff
        if connections > 1 and not self.capabilities.can_multi_conn:
            raise ValueError(
                f"connections={connections} needs a remote that advertises multi-conn "
                f"({target} does not, so its connections need not see each other's writes)"
            )
        self._slots = [_Slot(i) for i in range(connections)]
        self._waiters: list[Deferred[None]] = []
        self._closed = False
        self._last_error = "not connected yet"
        # Set when a connection with unflushed writes was lost: the next
        # FLUSH must not claim they are durable.
        self._lost_unflushed = False
        self.reconnects = 0
        self.retried = 0

    @property
    def closed(self) -> bool:
        """Whether L{close} was called (it may be, while a connection is made)."""
        return self._closed

    def __repr__(self) -> str:
        return f"<NBDProxyDevice {self.target} size={self.size}>"

    # ------------------------------------------------------------ the pool

    def start(self) -> None:
        """Connect every slot of the pool that is not connected or connecting."""
        for slot in self._slots:
            if slot.client is None and slot.connecting is None and not self._closed:
                slot.connecting = Deferred.fromCoroutine(self._connect(slot))

    def adopt(self, client: NBDClient) -> None:
        """Use an already open connection (L{open_nbd}'s first) as the first slot."""
        self._attach(self._slots[0], client)

    async def _connect(self, slot: _Slot) -> None:
        from twisted_nbd.client import connect

        attempt = 0
        while not self._closed:
            try:
                endpoint = self.target.endpoint(self.reactor, self.timeout)
                d = connect(self.reactor, endpoint, self.target.export, tls=self.target.tls)
                client = await d.addTimeout(self.timeout, self.reactor)
            except CancelledError:
                break  # close() stopped us
            except Exception as e:
                if self.closed:
                    break
                self._last_error = f"cannot connect to {self.target}: {_describe(e)}"
            else:
                why = self.shape.still(RemoteShape.of(client.info))
                if why is None:
                    if slot.ever_connected:
                        self.reconnects += 1
                        _log.info(
                            "nbd: connection {index} to {target} is back",
                            index=slot.index,
                            target=str(self.target),
                        )
                    self._attach(slot, client)
                    break
                self._last_error = f"{self.target} cannot serve this export any more: {why}"
                _log.error("nbd: {reason}", reason=self._last_error)
                client.disconnect()
            delay = min(self.backoff * 2**attempt, MAX_BACKOFF)
            attempt += 1
            if attempt in (1, 10) or attempt % 50 == 0:
                _log.warn(
                    "nbd: {reason}; trying again in {delay:.2f} s (attempt {attempt})",
                    reason=self._last_error,
                    delay=delay,
                    attempt=attempt,
                )
            try:
                await deferLater(self.reactor, delay, lambda: None)
            except CancelledError:
                break
        slot.connecting = None

    def _attach(self, slot: _Slot, client: NBDClient) -> None:
        slot.client = client
        slot.ever_connected = True
        slot.writes = slot.flushed = 0
        client.when_closed().addCallback(lambda _: self._lost(slot, client))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    def _lost(self, slot: _Slot, client: NBDClient) -> None:
        if slot.client is not client:
            return
        slot.client = None
        if slot.writes > slot.flushed:
            self._lost_unflushed = True
        if not self._closed:
            self._last_error = f"the connection to {self.target} was lost"
            _log.warn(
                "nbd: connection {index} to {target} was lost; reconnecting",
                index=slot.index,
                target=str(self.target),
            )
            self.start()

    def _ready(self) -> list[_Slot]:
        return [
            s for s in self._slots if s.client is not None and s.client.protocol.unusable() is None
        ]

    async def _slot(self) -> _Slot:
        """The least busy connected slot, waiting up to C{timeout} for one."""
        if self._closed:
            raise NBDError(Errno.EIO, "the nbd device is closed")
        ready = self._ready()
        if not ready:
            self.start()
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            waiter.addTimeout(self.timeout, self.reactor)
            try:
                await waiter
            except Exception:
                raise NBDError(
                    Errno.EIO,
                    f"no connection to the remote within {self.timeout:g} s: {self._last_error}",
                ) from None
            ready = self._ready()
            if not ready:
                raise NBDError(Errno.EIO, self._last_error)
        return min(ready, key=lambda s: s.client.in_flight if s.client else 0)

    async def _call(
        self, what: str, request: Callable[[NBDClient], Deferred[_T]], retry: bool
    ) -> _T:
        """
        Send a request on a connection of the pool; if that connection is
        lost before the reply, send it once more if C{retry}, else fail
        with C{EIO}.
        """
        for attempt in (0, 1):
            slot = await self._slot()
            client = slot.client
            assert client is not None
            try:
                return await request(client)
            except NBDError as e:
                if e.errno != Errno.ESHUTDOWN:
                    raise  # the remote's answer, passed on as it is
                error: Exception = e  # the remote is going away: as lost
            except _LOST as e:
                error = e
            except ValueError as e:
                raise NBDError(Errno.EINVAL, f"{what}: {e}") from None
            self._lost(slot, client)
            if retry and attempt == 0:
                self.retried += 1
                continue
            raise NBDError(
                Errno.EIO, f"{what}: the connection to {self.target} was lost: {_describe(error)}"
            )
        raise AssertionError("not reached")

    def _run(
        self, what: str, request: Callable[[NBDClient], Deferred[_T]], retry: bool = False
    ) -> Deferred[_T]:
        return Deferred.fromCoroutine(self._call(what, request, retry))

    async def _wrote(
        self, what: str, request: Callable[[NBDClient], Deferred[None]], fua: bool
    ) -> None:
        """A write-like request; counts it as unflushed unless it had FUA."""
        used: list[_Slot] = []

        def send(client: NBDClient) -> Deferred[None]:
            used[:] = [s for s in self._slots if s.client is client]
            return request(client)

        await self._call(what, send, retry=False)
        if not fua:
            for slot in used:
                slot.writes += 1

    # ------------------------------------------------------------ IBlockDevice

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if length == 0:
            return succeed(b"")
        return self._run("READ", lambda c: c.read(offset, length), retry=True)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        if fua and not self.capabilities.can_fua:
            return Deferred.fromCoroutine(self._write_then_flush(offset, data))
        return Deferred.fromCoroutine(
            self._wrote("WRITE", lambda c: c.write(offset, data, fua), fua)
        )

    async def _write_then_flush(self, offset: int, data: bytes) -> None:
        await self.write(offset, data)
        await self.flush()

    def flush(self) -> Deferred[None]:
        if not self.capabilities.can_flush:
            return succeed(None)
        return Deferred.fromCoroutine(self._flush())

    def _take_lost_unflushed(self) -> bool:
        """Whether unflushed writes were lost since the last FLUSH (and forget it)."""
        lost, self._lost_unflushed = self._lost_unflushed, False
        return lost

    async def _flush(self) -> None:
        if self._take_lost_unflushed():
            raise NBDError(
                Errno.EIO,
                f"the connection to {self.target} was lost with writes it had not flushed: "
                f"they may be lost",
            )
        # With multi-conn (required for more than one connection) one FLUSH
        # covers every connection's acknowledged writes.
        marks = {slot.index: slot.writes for slot in self._slots}
        try:
            await self._call("FLUSH", lambda c: c.flush(), retry=False)
        except BaseException:
            # A failed FLUSH already tells the client that nothing since the
            # last good one is known to be durable: no need to say it twice.
            self._take_lost_unflushed()
            raise
        for slot in self._slots:
            slot.flushed = max(slot.flushed, min(marks[slot.index], slot.writes))
        if self._take_lost_unflushed():
            raise NBDError(
                Errno.EIO, f"a connection to {self.target} with unflushed writes was lost"
            )

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        if not self.capabilities.can_trim:
            return succeed(None)
        return Deferred.fromCoroutine(
            self._wrote("TRIM", lambda c: c.trim(offset, length, fua), fua)
        )

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        if fast and not self.capabilities.can_fast_zero:
            return fail(NBDError(Errno.ENOTSUP, "the remote has no fast zeroing"))
        if not self.capabilities.can_zero:
            return Deferred.fromCoroutine(self._write_zero_bytes(offset, length, fua))
        fua = fua and self.capabilities.can_fua
        return Deferred.fromCoroutine(
            self._wrote(
                "WRITE_ZEROES",
                lambda c: c.zero(offset, length, fua=fua, no_hole=not may_trim, fast=fast),
                fua,
            )
        )

    async def _write_zero_bytes(self, offset: int, length: int, fua: bool) -> None:
        """WRITE_ZEROES for a remote without it: write zeroes, 1 MiB at a time."""
        step = max(self.capabilities.min_block, min(1 << 20, self.capabilities.max_block))
        zeroes = bytes(min(step, length))
        end = offset + length
        while offset < end:
            piece = min(step, end - offset)
            await self.write(offset, zeroes[:piece], fua and offset + piece == end)
            offset += piece

    def cache(self, offset: int, length: int) -> Deferred[None]:
        if not self.capabilities.can_cache or length == 0:
            return succeed(None)
        return self._run("CACHE", lambda c: c.cache(offset, length), retry=True)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        if not self.capabilities.can_extents:
            return succeed([Extent(length, 0)])
        return Deferred.fromCoroutine(self._block_status(offset, length))

    async def _block_status(self, offset: int, length: int) -> Sequence[Extent]:
        found = await self._call(
            "BLOCK_STATUS", lambda c: c.block_status(offset, length), retry=True
        )
        extents = found.get(BASE_ALLOCATION) or []
        end = self.size
        out: list[Extent] = []
        position = offset
        for extent in extents:
            run = min(extent.length, end - position)
            if run <= 0:
                break
            out.append(Extent(run, extent.flags & 3))
            position += run
        if not out:
            raise NBDError(Errno.EIO, f"{self.target} sent no base:allocation extents")
        return out

    def close(self) -> Deferred[None]:
        """
        Stop reconnecting, fail the requests waiting for a connection, and
        disconnect (politely: the remote answers what is in flight first).

        @return: a Deferred that fires with C{None} once every connection
            has closed.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(NBDError(Errno.EIO, "the nbd device is closed"))
        for slot in self._slots:
            if slot.connecting is not None:
                slot.connecting.cancel()
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        from twisted.internet.defer import DeferredList

        closing = []
        for slot in self._slots:
            client = slot.client
            if client is not None:
                closing.append(client.disconnect().addTimeout(self.timeout, self.reactor))
                slot.client = None
        await DeferredList(closing, consumeErrors=True)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def open_nbd(
    reactor: Any,
    target: NBDTarget,
    connections: int = 1,
    timeout: float = 30.0,
    backoff: float = 0.1,
) -> Deferred[NBDProxyDevice]:
    """
    Connect to the remote and open the device (on a running reactor).

    @return: a Deferred that fires with an L{NBDProxyDevice} whose pool is
        connecting, or fails with the first connection's error
        (C{NBDHandshakeError}, a connection error, C{TimeoutError}) or
        C{ValueError} (more connections than a remote without multi-conn
        allows).
    """
    from twisted_nbd.client import connect

    async def opened() -> NBDProxyDevice:
        endpoint = target.endpoint(reactor, timeout)
        d = connect(reactor, endpoint, target.export, tls=target.tls)
        client = await d.addTimeout(timeout, reactor)
        try:
            device = NBDProxyDevice(
                reactor, target, RemoteShape.of(client.info), connections, timeout, backoff
            )
        except ValueError:
            await client.disconnect()
            raise
        device.adopt(client)
        device.start()
        return device

    return Deferred.fromCoroutine(opened())


# ---------------------------------------------------------------- the registry


def _check(values: Mapping[str, Any]) -> None:
    if values["connections"] < 1:
        raise ValueError("connections: must be 1 or more")
    if values["timeout"] <= 0:
        raise ValueError("timeout: must be more than 0")
    if values.get("uri"):
        parse_uri(values["uri"])
    elif not values.get("host") and not values.get("socket"):
        raise ValueError("give uri=, host= or socket=")


def _open(values: Mapping[str, Any], context: OpenContext) -> NBDProxyDevice:
    target = target_from_values(values)
    info = probe_blocking(target, values["timeout"])
    device = NBDProxyDevice(
        context.reactor,
        target,
        RemoteShape.of(info),
        values["connections"],
        values["timeout"],
        values["backoff"],
    )
    # The pool connects once the reactor runs (at once if it already does).
    context.reactor.callWhenRunning(device.start)
    return device


_KEYS = (
    Key("uri", STRING, None, "nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=P"),
    Key("host", STRING, None, "the remote's host (instead of uri=)"),
    Key("port", INT, None, "its port", shown=str(DEFAULT_PORT)),
    Key("socket", PATH, None, "its Unix socket (instead of host=)"),
    Key("export", STRING, None, "the export's name", shown='""'),
    Key("tls", choice("off", "require"), None, "TLS (nbds://, tls- keys: require)", shown="off"),
    Key("tls-certificates", PATH, None, "directory with ca-cert.pem (client-cert.pem, -key.pem)"),
    Key("tls-psk-file", PATH, None, "PSK file (username:hexkey lines)"),
    Key("tls-username", STRING, None, "the PSK identity", shown="the login name"),
    Key("tls-hostname", STRING, None, "the name in the remote's certificate", shown="the host"),
    Key("connections", INT, 1, "connections in the pool (more than 1 needs multi-conn)"),
    Key("timeout", DURATION, 30.0, "seconds to connect; a request waits as long", shown="30s"),
    Key("backoff", DURATION, 0.1, "first wait to reconnect; doubles up to 5s", shown="100ms"),
)

plugin = BackendPlugin(
    name="nbd",
    help="a proxy to another NBD server (TCP, Unix socket, TLS), passing on what it offers",
    keys=_KEYS,
    open=_open,
    check=_check,
)
