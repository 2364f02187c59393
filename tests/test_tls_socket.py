"""
TLS on the server's socket (L{twisted_nbd._tls_socket.SocketTLS}) with
whole writes (L{twisted_nbd.tls.whole_writes}): replies far larger than the
socket's buffers, sent with one C{SSL_write} each, arrive intact, though
the socket fills halfway through one and the rest must be retried as
OpenSSL requires. Over real loopback TCP with the twisted-nbd client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase

from tests.tlsfiles import make_certificates, make_psk_file
from twisted_nbd._connection import ServerConfiguration
from twisted_nbd._tls_socket import SocketTLS
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.client import TLSClientSettings, connect
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.protocol import NBDServerFactory
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
