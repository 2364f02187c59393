"""
Composition test: the NBD service from L{twisted_nbd.tap.makeService} runs
inside someone else's L{MultiService}, beside a L{twisted.web} site, on the
real reactor and real sockets on 127.0.0.1.

The NBD client here is written from the protocol specification, not from
the server's own codec, so a mistake shared by both cannot hide.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from twisted_nbd.tap import Options, makeService

# Wire constants, from the NBD protocol specification (doc/proto.md).
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT = 0
TRANSMISSION_HAS_FLAGS = 1 << 0
TRANSMISSION_READ_ONLY = 1 << 1
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2

GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")

DEVICE_SIZE = 16 * 1024 * 1024
LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"


class RawNBDClient(Protocol):
    """
    Just enough of an NBD client: send bytes, and wait for an exact number
    of bytes to arrive.

    @ivar lost: fires when the connection is gone.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._wanted: tuple[int, Deferred[bytes]] | None = None
        self.lost: Deferred[None] = Deferred()
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._deliver()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self._wanted is not None:
            _, waiting = self._wanted
            self._wanted = None
            waiting.errback(reason)
        self.lost.callback(None)

    def _deliver(self) -> None:
        if self._wanted is not None and len(self._buffer) >= self._wanted[0]:
            count, waiting = self._wanted
            self._wanted = None
            chunk = bytes(self._buffer[:count])
            del self._buffer[:count]
            waiting.callback(chunk)

    def send(self, data: bytes) -> None:
        """Write C{data} to the server."""
        assert self.transport is not None
        self.transport.write(data)

    def receive(self, count: int) -> Deferred[bytes]:
        """
        @return: a Deferred that fires with the next C{count} bytes, or
            fails if the connection is lost first.
        """
        assert self._wanted is None, "one receive at a time"
        waiting: Deferred[bytes] = Deferred()
        if not self.connected and len(self._buffer) < count:
            waiting.errback(ConnectionError("the connection is closed"))
            return waiting
        self._wanted = (count, waiting)
        self._deliver()
        return waiting


class Hello(Resource):
    """
    A web page that says hello, whatever its path.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the web"


class ConnectionTracker(WrappingFactory):
    """
    A factory wrapper that can tell when all of its connections are closed.
    """

    def __init__(self, wrappedFactory: Any) -> None:
        super().__init__(wrappedFactory)
        self._idleWaiters: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once no connection is open.
        """
        if not self.protocols:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idleWaiters.append(waiter)
        return waiter


class BodyCollector(Protocol):
    """
    Collect a response body.

    (C{twisted.web.client.read_body} warns about the pooled transport, which
    has no C{abortConnection}.)

    @ivar done: fires with the whole body.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    """
    @return: a Deferred that fires with C{response}'s body.
    """
    collector = BodyCollector()
    response.deliverBody(collector)
    return collector.done


def bound_port(service: StreamServerEndpointService) -> Deferred[int]:
    """
    @return: a Deferred that fires with the TCP port a started service
        listens on (useful with port 0).
    """
    waiting = service._waitingForPort
    assert waiting is not None, "the service has not started listening"
    result: Deferred[int] = Deferred()

    def listening(port: IListeningPort) -> IListeningPort:
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        result.callback(address.port)
        # The service keeps using this Deferred's result to stop listening.
        return port

    waiting.addCallback(listening)
    return result


def listeners(service: MultiService) -> list[StreamServerEndpointService]:
    """The listening services among C{service}'s children."""
    return [s for s in service if isinstance(s, StreamServerEndpointService)]


class ComposeTests(TestCase):
    """
    The NBD service composes with other services in one application.
    """

    def test_nbd_beside_web(self) -> Deferred[None]:
        """
        C{makeService} for C{--memory 16M --listen tcp:0:interface=127.0.0.1}
        and a web site run in one L{MultiService}: the site serves a page,
        an NBD client completes the handshake and writes then reads back a
        block, and the whole tree stops cleanly.
        """
        return Deferred.fromCoroutine(self._nbd_beside_web())

    async def _nbd_beside_web(self) -> None:
        from twisted.internet import reactor

        options = Options()
        options.parseOptions(["--memory", "16M", "--listen", LOOPBACK_ANY_PORT])
        nbd = makeService(options)
        web = ConnectionTracker(Site(Hello()))
        web_service = strports.service(LOOPBACK_ANY_PORT, web, reactor=reactor)

        top = MultiService()
        nbd.setServiceParent(top)
        web_service.setServiceParent(top)
        top.startService()
        self.addCleanup(lambda: top.stopService() if top.running else None)

        (nbd_service,) = listeners(nbd)
        nbd_port = await bound_port(nbd_service)
        web_port = await bound_port(web_service)

        # The web site answers.
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        response = await agent.request(b"GET", f"http://127.0.0.1:{web_port}/".encode("ascii"))
        self.assertEqual(response.code, 200)
        self.assertEqual(await read_body(response), b"hello from the web")
        await pool.closeCachedConnections()
        await web.when_idle()

        # The NBD server answers.
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", nbd_port)
        client = await connectProtocol(endpoint, RawNBDClient())

        def drop_client() -> Deferred[None] | None:
            if client.connected and client.transport is not None:
                cast(ITCPTransport, client.transport).abortConnection()
                lost: Deferred[None] = client.lost
                return lost
            return None

        self.addCleanup(drop_client)
        await self._handshake(client)
        await self._write_and_read(client)

        # NBD_CMD_DISC: the server closes the connection.
        client.send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 3, 0, 0))
        await client.lost

        await top.stopService()
        self.assertFalse(nbd.running)
        self.assertFalse(web_service.running)

    async def _handshake(self, client: RawNBDClient) -> None:
        """
        Fixed newstyle: greeting, client flags, NBD_OPT_GO for the empty
        name with no information requests, replies until NBD_REP_ACK.
        """
        magic, have_opt, handshake_flags = GREETING.unpack(await client.receive(GREETING.size))
        self.assertEqual((magic, have_opt), (NBDMAGIC, IHAVEOPT))
        self.assertTrue(handshake_flags & FLAG_FIXED_NEWSTYLE)
        self.assertTrue(handshake_flags & FLAG_NO_ZEROES)

        client.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = b""
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        client.send(OPTION.pack(IHAVEOPT, OPT_GO, len(data)) + data)

        export_info: tuple[int, int] | None = None
        while True:
            header = await client.receive(OPTION_REPLY.size)
            magic, option, reply, length = OPTION_REPLY.unpack(header)
            payload = await client.receive(length) if length else b""
            self.assertEqual((magic, option), (OPTION_REPLY_MAGIC, OPT_GO))
            self.assertFalse(reply & REP_FLAG_ERROR, f"error reply {reply:#x}: {payload!r}")
            if reply == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                size, transmission_flags = struct.unpack(">QH", payload[2:12])
                export_info = (size, transmission_flags)
            if reply == REP_ACK:
                break

        assert export_info is not None, "NBD_OPT_GO must send NBD_INFO_EXPORT"
        size, transmission_flags = export_info
        self.assertEqual(size, DEVICE_SIZE)
        self.assertTrue(transmission_flags & TRANSMISSION_HAS_FLAGS)
        self.assertFalse(transmission_flags & TRANSMISSION_READ_ONLY)

    async def _write_and_read(self, client: RawNBDClient) -> None:
        """
        One WRITE and one READ of the same block, with simple replies.
        """
        offset = 3 * 4096
        block = bytes(range(256)) * 16

        client.send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, 1, offset, len(block)) + block)
        magic, error, cookie = SIMPLE_REPLY.unpack(await client.receive(SIMPLE_REPLY.size))
        self.assertEqual((magic, error, cookie), (SIMPLE_REPLY_MAGIC, 0, 1))

        client.send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, 2, offset, len(block)))
        magic, error, cookie = SIMPLE_REPLY.unpack(await client.receive(SIMPLE_REPLY.size))
        self.assertEqual((magic, error, cookie), (SIMPLE_REPLY_MAGIC, 0, 2))
        self.assertEqual(await client.receive(len(block)), block)
