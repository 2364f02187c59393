"""
TLS on the server's socket (L{twisted_nbd._tls_socket.SocketTLS}) with
whole writes (L{twisted_nbd.tls.whole_writes}): replies far larger than the
socket's buffers, sent with one C{SSL_write} each, arrive intact, though
the socket fills halfway through one and the rest must be retried as
OpenSSL requires. Over real loopback TCP with the twisted-nbd client.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.tlsfiles import make_certificates, make_psk_file
from twisted_nbd import _tls_socket
from twisted_nbd._connection import ServerConfiguration
from twisted_nbd._tls_socket import SocketTLS
from twisted_nbd._transport import PayloadReceiver
from twisted_nbd.backends.file import FileBlockDevice
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.client import TLSClientSettings, connect
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol
from twisted_nbd.tls import TLSSettings

MiB = 1 << 20


class WholeWritesTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.data = os.urandom(48 * MiB)
        self.device = MappedMemoryDevice(len(self.data))
        self.addCleanup(self.device.close)
        self.device.write_now(0, self.data)
        # Every retry of an SSL_write that the full socket cut short, by the
        # length it had to be at least.
        self.retries: list[int] = []
        real = SocketTLS._write_some_data

        def spy(tls: SocketTLS, data: Any) -> Any:
            if tls._retry_length:
                self.retries.append(tls._retry_length)
                # OpenSSL's rule: at least as long, starting with the same bytes.
                assert len(data) >= tls._retry_length, (len(data), tls._retry_length)
            return real(tls, data)

        self.patch(SocketTLS, "_write_some_data", spy)
        # How much each SSL_write that succeeded took.
        self.sent: list[int] = []
        real_send = SSL.Connection.send

        def send(connection: SSL.Connection, data: Any, flags: int = 0) -> int:
            count = real_send(connection, data, flags)
            self.sent.append(count)
            return count

        self.patch(SSL.Connection, "send", send)

    async def exchange(self, settings: TLSSettings, client: TLSClientSettings) -> None:
        from twisted.internet import reactor

        factory = NBDServerFactory(
            ExportRegistry.of([Export("", self.device)]),
            config=ServerConfiguration(tls="require"),
            tls=settings.server_creator(),
        )
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.shutdown)
        conn = await connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}", tls=client)
        # Each 32 MiB reply is more than loopback's socket buffers hold, and
        # the client cannot read while the server is writing (one thread).
        ranges = [(0, 32 * MiB), (MiB + 7 * 4096, MiB), (16 * MiB, 32 * MiB), (5 * MiB, 4096)]
        got = await gatherResults([conn.read(at, length) for at, length in ranges])
        for (at, length), data in zip(ranges, got, strict=True):
            self.assertEqual(data, self.data[at : at + length], f"READ {at}+{length}")
        payload = os.urandom(8 * MiB)
        await conn.write(3 * MiB, payload)
        self.assertEqual(await conn.read(3 * MiB, len(payload)), payload)
        await conn.disconnect()
        self.assertTrue(self.retries, "no SSL_write was cut short: the test proved nothing")
        # Whole writes: one call took more than a 16 KiB record.
        self.assertGreater(max(self.sent), 1 * MiB)
        self.assertGreaterEqual(max(self.retries), 16 * 1024 + 1)

    async def test_certificates(self) -> None:
        """S-06: x509 TLS 1.3 (the default), 32 MiB replies in one SSL_write each."""
        certs = make_certificates(self.tmp / "pki")
        await self.exchange(
            TLSSettings.from_directory(str(certs), "require"),
            TLSClientSettings.from_directory(str(certs), hostname="127.0.0.1"),
        )

    async def test_psk(self) -> None:
        """The same with a pre-shared key (its own server context)."""
        path = self.tmp / "keys.psk"
        make_psk_file(path)
        await self.exchange(
            TLSSettings(mode="require", psk_file=str(path)),
            TLSClientSettings.from_psk_file(str(path), "alice"),
        )


class DirectPayloadTests(TestCase):
    """
    Large WRITE payloads over TLS are decrypted straight into the buffer the
    device is given (or into a RAM disk's memory) by L{SocketTLS.recv_into},
    not into records that are copied and joined; WRITEs of other sizes, and
    the requests whose headers share a record with the end of a payload,
    still arrive whole and in order.
    """

    timeout = 120

    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.certs = make_certificates(self.tmp / "pki")
        # How many bytes each recv_into decrypted (all of them, direct or not).
        self.direct: list[int] = []
        real = SocketTLS.recv_into

        def spy(tls: SocketTLS, view: memoryview) -> int:
            count = real(tls, view)
            self.direct.append(count)
            return count

        self.patch(SocketTLS, "recv_into", spy)
        # pyOpenSSL's recv_into decrypts into a buffer of its own and copies it.
        self.copied = 0
        real_copy = SSL.Connection.recv_into

        def copying(connection: SSL.Connection, buffer: Any, *args: Any) -> int:
            count = real_copy(connection, buffer, *args)
            self.copied += count
            return count

        self.patch(SSL.Connection, "recv_into", copying)

    async def round_trip(self, device: Any, size: int) -> None:
        from twisted.internet import reactor

        settings = TLSSettings.from_directory(str(self.certs), "require")
        factory = NBDServerFactory(
            ExportRegistry.of([Export("", device)]),
            config=ServerConfiguration(tls="require"),
            tls=settings.server_creator(),
        )
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.shutdown)
        client = TLSClientSettings.from_directory(str(self.certs), hostname="127.0.0.1")
        conn = await connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}", tls=client)
        # Pipelined, so that the twisted-nbd client's records carry the end
        # of one payload and the next request's header together: large
        # payloads of odd lengths at odd offsets, small ones between.
        writes = [
            (7, os.urandom(MiB)),
            (3 * MiB + 1, os.urandom(300_001)),
            (2 * MiB, os.urandom(4096)),
            (5 * MiB - 3, os.urandom(MiB + 12_345)),
            (MiB + 100, os.urandom(64 * 1024)),
            (size - 512 * 1024, os.urandom(512 * 1024)),
        ]
        await gatherResults([conn.write(at, data) for at, data in writes])
        for at, data in writes:
            self.assertEqual(await conn.read(at, len(data)), data, f"WRITE {at}+{len(data)}")
        await conn.disconnect()
        large = sum(len(data) for _, data in writes if len(data) >= 256 * 1024)
        # All but the first record or so of each large payload was decrypted
        # in place (what came with its header went the usual way).
        self.assertGreater(sum(self.direct), large - 4 * 64 * 1024)

    async def test_file(self) -> None:
        """Into payload buffers, for a file."""
        path = self.tmp / "disk"
        path.write_bytes(b"\0" * (8 * MiB))
        device = FileBlockDevice(str(path))
        self.addCleanup(device.close)
        await self.round_trip(device, 8 * MiB)
        self.assertEqual(self.copied, 0, "pyOpenSSL's copying recv_into was used")

    async def test_ram(self) -> None:
        """Into the RAM disk's memory."""
        device = MappedMemoryDevice(8 * MiB)
        self.addCleanup(device.close)
        await self.round_trip(device, 8 * MiB)
        self.assertEqual(self.copied, 0, "pyOpenSSL's copying recv_into was used")

    async def test_client_vanishes_mid_payload(self) -> None:
        """
        A client that goes away while its payload is being decrypted into a
        payload buffer: no write reaches the file, the connection ends, and
        the WRITE fails at the client.
        """
        from twisted.internet import reactor

        path = self.tmp / "disk"
        path.write_bytes(b"\0" * (2 * MiB))
        device = FileBlockDevice(str(path))
        self.addCleanup(device.close)
        settings = TLSSettings.from_directory(str(self.certs), "require")
        factory = NBDServerFactory(
            ExportRegistry.of([Export("", device)]),
            config=ServerConfiguration(tls="require"),
            tls=settings.server_creator(),
        )
        started: Deferred[None] = Deferred()
        receivers: list[PayloadReceiver] = []
        real_start = PayloadReceiver.start

        def start(receiver: PayloadReceiver, view: memoryview, done: Any) -> None:
            real_start(receiver, view, done)
            receivers.append(receiver)
            if not started.called:
                started.callback(None)

        self.patch(PayloadReceiver, "start", start)
        lost: Deferred[None] = Deferred()
        real_lost = NBDServerProtocol.connectionLost

        def connection_lost(proto: NBDServerProtocol, reason: Any) -> None:
            real_lost(proto, reason)
            lost.callback(None)

        self.patch(NBDServerProtocol, "connectionLost", connection_lost)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.shutdown)
        client = TLSClientSettings.from_directory(str(self.certs), hostname="127.0.0.1")
        conn = await connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}", tls=client)
        transport: Any = conn.protocol.transport
        real_write = transport.writeSequence
        # Only the header and the first 300 KiB of the payload leave the client.
        transport.writeSequence = lambda pieces: real_write([b"".join(pieces)[: 300 * 1024]])
        write = conn.write(0, os.urandom(MiB))
        await started
        transport.abortConnection()
        await lost
        with self.assertRaises(ConnectionClosed):
            await write
        # It was being decrypted by TLS's recv_into.
        self.assertIsInstance(receivers[0]._recv_into.__self__, SocketTLS)  # type: ignore[union-attr]
        self.assertEqual(path.read_bytes(), b"\0" * (2 * MiB))

    async def test_without_direct_reads(self) -> None:
        """
        Where cryptography's binding does not allow decrypting into our
        buffer, pyOpenSSL's recv_into (a copy) does it, with the same result.
        """
        self.patch(_tls_socket, "_DIRECT_READ", False)
        device = MappedMemoryDevice(8 * MiB)
        self.addCleanup(device.close)
        await self.round_trip(device, 8 * MiB)
        self.assertGreater(self.copied, 2 * MiB)


class _Transport:
    """Just enough of a TCP transport for L{SocketTLS} (see L{possible})."""

    def __init__(self, sock: socket.socket, reactor: Any, protocol: Any) -> None:
        self.socket = sock
        self.reactor = reactor
        self.protocol = protocol
        self.connected = True
        self.disconnecting = False

    def doRead(self) -> Any:  # noqa: N802 - FileDescriptor's name
        raise AssertionError("replaced by SocketTLS")

    def writeSomeData(self, data: Any) -> Any:  # noqa: N802
        raise AssertionError("replaced by SocketTLS")

    def _closeSocket(self, orderly: bool) -> None:  # noqa: N802
        self.socket.close()

    def startReading(self) -> None:  # noqa: N802
        pass


class _Records:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def records_received(self, records: Any) -> None:
        self.records.extend(records)


class RecvIntoTests(SynchronousTestCase):
    """
    L{SocketTLS.recv_into} as C{socket.recv_into}: what has arrived, up to
    the buffer's size, record after record; C{BlockingIOError} when nothing
    has; what ends the stream or fails the session after some bytes is
    reported by the next call, not lost. Over a socket pair, the client a
    pyOpenSSL connection in the same thread.
    """

    direct = True

    def setUp(self) -> None:
        if not self.direct:
            self.patch(_tls_socket, "_DIRECT_READ", False)
        certs = make_certificates(Path(self.mktemp()))
        server_sock, client_sock = socket.socketpair()
        for sock in (server_sock, client_sock):
            sock.setblocking(False)
            self.addCleanup(sock.close)
        self.client_sock = client_sock
        self.failures: list[str] = []
        settings = TLSSettings.from_directory(str(certs), "require")
        # Kept: the context's callbacks live as long as this does.
        self.creator = settings.server_creator()
        self.transport = _Transport(server_sock, Clock(), _Records())
        self.tls = SocketTLS(
            self.transport,
            self.creator.context,
            lambda: None,
            self.failures.append,
            lambda: True,
        )
        self.assertEqual(self.tls._ssl is not None, self.direct)
        self.client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), client_sock)
        self.client.set_connect_state()
        for _ in range(100):
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            self.transport.doRead()
            if self.tls.handshake_done:
                break
        self.assertTrue(self.tls.handshake_done)
        # The server's session tickets, sent after the handshake: read now so
        # that they do not stand in the way of the client's writes below.
        with self.assertRaises(SSL.WantReadError):
            self.client.recv(1)

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        count = self.tls.recv_into(memoryview(buffer))
        return bytes(buffer[:count])

    def test_records_until_full(self) -> None:
        """Several records in one call, stopping where the buffer is full."""
        data = os.urandom(3 * 16384 + 100)
        for at in range(0, len(data), 16384):
            self.client.sendall(data[at : at + 16384])
        self.assertEqual(self.recv(40000), data[:40000])
        # The rest of the record it stopped in is kept for the next call.
        self.assertGreater(self.tls.connection.pending(), 0)
        self.assertEqual(self.recv(65536), data[40000:])
        with self.assertRaises(BlockingIOError):
            self.recv(65536)

    def test_end_after_data(self) -> None:
        """A close_notify after some bytes: the bytes, then 0 (the end)."""
        self.client.sendall(b"x" * 5000)
        self.client.shutdown()
        self.assertEqual(self.recv(65536), b"x" * 5000)
        self.assertEqual(self.recv(65536), b"")
        self.assertEqual(self.failures, [])

    def test_failure_after_data(self) -> None:
        """
        A record that does not decrypt after some bytes: the bytes, then the
        session fails (reported, and as an OSError that ends the connection).
        """
        self.client.sendall(b"y" * 5000)
        self.client_sock.send(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        self.assertEqual(self.recv(65536), b"y" * 5000)
        with self.assertRaises(ConnectionResetError):
            self.recv(65536)
        self.assertEqual(len(self.failures), 1, self.failures)

    def test_nothing_yet(self) -> None:
        """Nothing has arrived: BlockingIOError, as a socket would raise."""
        with self.assertRaises(BlockingIOError):
            self.recv(100)
        self.assertEqual(self.failures, [])


class CopyingRecvIntoTests(RecvIntoTests):
    """The same through pyOpenSSL's own recv_into (a copy)."""

    direct = False
