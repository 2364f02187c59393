# -*- test-case-name: tests.test_observers -*-
"""
Watching a server without touching it: the observer interface.

An L{IServerObserver} is told when connections come and go, when a request
starts and finishes (with its errno and how long it took), and when a
request or an option is refused. Metrics, audit logs and tracing are
observers; the protocol calls them and knows nothing else about them.

Observers are passed to L{twisted_nbd.service.build} or to
L{twisted_nbd.protocol.NBDServerFactory}. Every call happens in the reactor
thread, in order, and must return quickly without raising (an observer
that raises is logged and the request goes on). With no observers the
protocol skips all of this, clock reads included.

Subclass L{ServerObserver} and override what you need::

    class Audit(ServerObserver):
        def request_finished(self, connection, request, errno, elapsed):
            if errno:
                log.info("{peer}: {cmd} failed: {errno}", peer=connection.peer,
                         cmd=Cmd(request.command).name, errno=Errno(errno).name)

(C{Cmd} and C{Errno} come from L{twisted_nbd.constants}.)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zope.interface import Interface, implementer

if TYPE_CHECKING:
    from twisted_nbd.events import Request

__all__ = ["ConnectionInfo", "IFlowObserver", "IServerObserver", "ServerObserver"]

_ids = itertools.count(1)


@dataclass(eq=False)
class ConnectionInfo:
    """
    What observers know about one connection; the same object is passed to
    every call for that connection.

    @ivar id: a number unique within this process.
    @ivar peer: the client's address, as text.
    @ivar started: when the connection was made, in the server clock's
        seconds.
    @ivar export: the name of the export chosen, once the handshake is over.
    @ivar tls: whether the connection is encrypted.
    @ivar tls_peer: the subject DN of the client's TLS certificate, if any
        (C{"PSK name"} for a TLS-PSK identity).
    @ivar requests: the requests handed to the backend so far.
    @ivar errors: the requests answered with an error so far (refused ones
        included).
    @ivar bytes_read: the bytes asked for by those that were READs.
    @ivar bytes_written: the bytes carried by those that were WRITEs.
    """

    peer: str
    started: float
    id: int = field(default_factory=lambda: next(_ids))
    export: str | None = None
    tls: bool = False
    tls_peer: str = ""
    requests: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class IServerObserver(Interface):
    """
    Told of what happens on an NBD server's connections. Requests are the
    events of L{twisted_nbd.events}: each has C{command} (an
    L{twisted_nbd.constants.Cmd} number), C{cookie}, C{offset} and
    C{length} (for a WRITE, its payload's length).
    """

    def connection_made(connection: ConnectionInfo) -> None:
        """A client connected."""

    def connection_lost(connection: ConnectionInfo, reason: str) -> None:
        """
        The connection closed; C{reason} says why in a few words
        (C{"closed"} for a clean close).
        """

    def export_chosen(connection: ConnectionInfo, name: str) -> None:
        """The handshake is over: the client uses export C{name}."""

    def option_refused(connection: ConnectionInfo, option: int, reply: int, reason: str) -> None:
        """An option got the error reply C{reply} (an NBD_REP_ERR_* number)."""

    def request_started(connection: ConnectionInfo, request: Request) -> None:
        """A request was handed to the backend."""

    def request_finished(
        connection: ConnectionInfo, request: Request, errno: int, elapsed: float
    ) -> None:
        """
        A request's reply was sent (or dropped, the connection being gone):
        C{errno} is 0 on success, else the NBD error number sent; C{elapsed}
        is the seconds since L{request_started}.
        """

    def request_refused(
        connection: ConnectionInfo, cookie: int, command: int, errno: int, reason: str
    ) -> None:
        """
        A request was refused without reaching the backend (bad range or
        flags, unsupported command, shutting down...): C{errno} was sent.
        """


class IFlowObserver(Interface):
    """
    Also told when the protocol's flow control stops and starts reading a
    connection (C{transport.pauseProducing}: too many requests or bytes in
    flight, a full send buffer, a disconnect under way). A separate
    interface, so observers written before it need not change; the
    protocol looks for it once per connection.
    """

    def reading_paused(connection: ConnectionInfo) -> None:
        """The protocol stopped reading the connection."""

    def reading_resumed(connection: ConnectionInfo) -> None:
        """
        The protocol reads the connection again (not called if the
        connection is lost while paused: L{IServerObserver.connection_lost}
        ends the pause).
        """


@implementer(IServerObserver, IFlowObserver)
class ServerObserver:
    """An L{IServerObserver} that does nothing; subclass it and override what you need."""

    def connection_made(self, connection: ConnectionInfo) -> None:
        pass

    def connection_lost(self, connection: ConnectionInfo, reason: str) -> None:
        pass

    def export_chosen(self, connection: ConnectionInfo, name: str) -> None:
        pass

    def option_refused(
        self, connection: ConnectionInfo, option: int, reply: int, reason: str
    ) -> None:
        pass

    def request_started(self, connection: ConnectionInfo, request: Request) -> None:
        pass

    def request_finished(
        self, connection: ConnectionInfo, request: Request, errno: int, elapsed: float
    ) -> None:
        pass

    def request_refused(
        self, connection: ConnectionInfo, cookie: int, command: int, errno: int, reason: str
    ) -> None:
        pass

    def reading_paused(self, connection: ConnectionInfo) -> None:
        pass

    def reading_resumed(self, connection: ConnectionInfo) -> None:
        pass
