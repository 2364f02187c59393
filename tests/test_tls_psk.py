"""
Tests for L{twisted_nbd.tls_psk}: the C{psktool} key file, and TLS-PSK
handshakes over loopback through Twisted's C{startTLS}, between our own
server and client and against GnuTLS's C{gnutls-cli} (Debian's gnutls-bin),
the TLS library of nbdkit, qemu and libnbd. (Our PSK client against GnuTLS
servers is tested through nbdkit and qemu-nbd in tests/interop/test_tls.py:
gnutls-serv cannot listen on 127.0.0.1 alone.)

Keys are made by the tests. A missing GnuTLS tool skips its tests, except
with C{CI=true}, where it fails them. Every wait is bounded; only
127.0.0.1 is used.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IReactorProcess,
    IReactorTCP,
)
from twisted.internet.protocol import ProcessProtocol, Protocol, ServerFactory, connectionDone
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.interop.helpers import LOOPBACK, require_tool
from twisted_nbd.tls_psk import (
    MAX_KEY_LENGTH,
    PSKClientCreator,
    PSKServerCreator,
    check_psk_support,
    load_psk_file,
    psk_client_context,
    psk_identity,
    psk_server_context,
)

#: How long one exchange (or one GnuTLS tool run) may take.
EXCHANGE_TIMEOUT = 30.0
#: GnuTLS's priority string for PSK in nbdkit, qemu and libnbd.
GNUTLS_PSK_PRIORITY = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"

_reactor: Any = reactor
tcp_reactor: IReactorTCP = _reactor
process_reactor: IReactorProcess = _reactor


def write_key_file(directory: Path, text: str, name: str = "keys.psk") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ the key file


class LoadPSKFileTests(SynchronousTestCase):
    """L{load_psk_file} reads C{psktool}'s C{username:hexkey} lines."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def load(self, text: str) -> dict[str, bytes]:
        return load_psk_file(write_key_file(self.dir, text))

    def assert_refused(self, text: str, line: int, words: str) -> None:
        path = write_key_file(self.dir, text)
        with self.assertRaises(ValueError) as caught:
            load_psk_file(path)
        message = str(caught.exception)
        self.assertIn(f"{path}, line {line}:", message)
        self.assertIn(words, message)

    def test_good_file(self) -> None:
        alice, bob = os.urandom(32), os.urandom(16)
        keys = self.load(f"alice:{alice.hex()}\n\nbob:{bob.hex().upper()}\r\n   \n")
        self.assertEqual(keys, {"alice": alice, "bob": bob})

    def test_path_and_trailing_space(self) -> None:
        key = os.urandom(32)
        path = write_key_file(self.dir, f"alice:{key.hex()}  ")
        self.assertEqual(load_psk_file(str(path)), {"alice": key})
        self.assertEqual(load_psk_file(path), {"alice": key})

    def test_user_name_up_to_first_colon(self) -> None:
        """As GnuTLS reads it: the key cannot hold a colon, the name may not."""
        self.assert_refused("a:b:00\n", 1, "not hexadecimal")

    def test_no_colon(self) -> None:
        self.assert_refused("alice:00\nbob\n", 2, "no colon")

    def test_bad_hex(self) -> None:
        self.assert_refused("alice:zz\n", 1, "not hexadecimal")

    def test_odd_hex(self) -> None:
        self.assert_refused("\nalice:abc\n", 2, "not hexadecimal")

    def test_empty_user(self) -> None:
        self.assert_refused(":0011\n", 1, "user name is empty")

    def test_empty_key(self) -> None:
        self.assert_refused("alice:\n", 1, "key of user 'alice' is empty")

    def test_long_key(self) -> None:
        self.assert_refused(f"alice:{'00' * (MAX_KEY_LENGTH + 1)}\n", 1, "longer than")

    def test_duplicate_user(self) -> None:
        self.assert_refused("alice:00\nalice:11\n", 2, "second time")

    def test_not_utf8(self) -> None:
        path = self.dir / "keys.psk"
        path.write_bytes(b"al\xffce:00\n")
        with self.assertRaises(ValueError) as caught:
            load_psk_file(path)
        self.assertIn("line 1: the user name is not UTF-8", str(caught.exception))

    def test_no_keys(self) -> None:
        path = write_key_file(self.dir, "\n\n")
        with self.assertRaises(ValueError) as caught:
            load_psk_file(path)
        self.assertIn(f"{path}: no username:hexkey lines", str(caught.exception))

    def test_missing_file(self) -> None:
        with self.assertRaises(OSError):
            load_psk_file(self.dir / "absent.psk")


class BindingTests(SynchronousTestCase):
    """The pyOpenSSL and cryptography installed still give what PSK needs."""

    def test_supported(self) -> None:
        check_psk_support()

    def test_creators_provide_interfaces(self) -> None:
        server = PSKServerCreator(psk_server_context({"alice": b"k"}))
        client = PSKClientCreator(psk_client_context("alice", b"k"))
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, server))
        self.assertTrue(verifyObject(IOpenSSLClientConnectionCreator, client))

    def test_bad_client_arguments(self) -> None:
        for identity, key in [("", b"k"), ("a\0b", b"k"), ("a" * 129, b"k"), ("alice", b"")]:
            self.assertRaises(ValueError, psk_client_context, identity, key)

    def test_server_needs_keys(self) -> None:
        self.assertRaises(ValueError, psk_server_context, {})

    def test_used_context_refused(self) -> None:
        from twisted_nbd.tls_psk import add_psk_server

        context = psk_server_context({"alice": b"k"})
        SSL.Connection(context, None)
        self.assertRaises(ValueError, add_psk_server, context, {"bob": b"k"})


# ------------------------------------------------------------------ Twisted over loopback


class _EchoServer(Protocol):
    """Starts TLS at once and echoes; records the identity it saw."""

    def __init__(self, factory: _EchoFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        self.transport.startTLS(self.factory.creator)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        connection: SSL.Connection = self.transport.getHandle()  # type: ignore[union-attr]
        self.factory.identities.append(psk_identity(connection))
        self.factory.sessions.append(
            (connection.get_protocol_version_name(), connection.get_cipher_name())
        )
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.lost.append(reason)
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback([reason])


class _EchoFactory(ServerFactory):
    def buildProtocol(self, addr: object) -> _EchoServer:
        return _EchoServer(self)

    def __init__(self, creator: object) -> None:
        self.creator = creator
        self.identities: list[str | None] = []
        self.sessions: list[tuple[str, str | None]] = []
        self.lost: list[Failure] = []
        self.waiting: list[Deferred[list[Failure]]] = []

    def when_lost(self) -> Deferred[list[Failure]]:
        """The reason the (one) connection ended, in a list."""
        if self.lost:
            return succeed([self.lost[-1]])
        d: Deferred[list[Failure]] = Deferred()
        self.waiting.append(d)
        return d


class _PingClient(Protocol):
    """Starts TLS, sends C{message}, and hangs up once it came back."""

    def __init__(self, creator: object, message: bytes = b"ping") -> None:
        self.creator = creator
        self.message = message
        self.received = b""
        self.done: Deferred[tuple[bytes, Failure]] = Deferred()

    def connectionMade(self) -> None:
        self.transport.startTLS(self.creator)  # type: ignore[union-attr]
        self.transport.write(self.message)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == self.message:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback((self.received, reason))


def _bounded(d: Deferred[Any], what: str) -> Deferred[Any]:
    return d.addTimeout(EXCHANGE_TIMEOUT, _reactor, onTimeoutCancel=lambda _r, _t: _timeout(what))


def _timeout(what: str) -> Any:
    raise AssertionError(f"{what}: no result within {EXCHANGE_TIMEOUT} s")


class LoopbackTests(TestCase):
    """Our PSK server and client over Twisted's TLS on 127.0.0.1."""

    timeout = 120

    def setUp(self) -> None:
        self.key = os.urandom(32)
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def listen(self, creator: object) -> tuple[_EchoFactory, int]:
        factory = _EchoFactory(creator)
        port = tcp_reactor.listenTCP(0, factory, interface=LOOPBACK)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port  # type: ignore[attr-defined]

    @inlineCallbacks
    def exchange(self, server_creator: object, client_creator: object) -> Any:
        """Ping through; the bytes echoed, the client's and server's ends."""
        factory, port = self.listen(server_creator)
        client = _PingClient(client_creator)
        yield _bounded(
            connectProtocol(TCP4ClientEndpoint(_reactor, LOOPBACK, port), client), "connecting"
        )
        received, client_reason = yield _bounded(client.done, "the client's end")
        [server_reason] = yield _bounded(factory.when_lost(), "the server's end")
        return received, client_reason, server_reason, factory

    def server(self, **kwargs: Any) -> PSKServerCreator:
        return PSKServerCreator(psk_server_context({"alice": self.key}, **kwargs))

    def client(self, identity: str = "alice", key: bytes | None = None, **kwargs: Any) -> object:
        return PSKClientCreator(psk_client_context(identity, key or self.key, **kwargs))

    def refusals(self) -> list[str]:
        return [
            e["identity"]
            for e in self.events
            if "refusing unknown identity" in e.get("log_format", "")
        ]

    @inlineCallbacks
    def test_tls13(self) -> Any:
        """The right key: the handshake (TLS 1.3 by default) succeeds."""
        received, _, _, factory = yield self.exchange(self.server(), self.client())
        self.assertEqual(received, b"ping")
        self.assertEqual(factory.identities, ["alice"])

    @inlineCallbacks
    def test_tls12(self) -> Any:
        """A client that stops at TLS 1.2 gets a forward-secret PSK suite."""
        creator = _Recording(
            psk_client_context("alice", self.key, maximum_version=SSL.TLS1_2_VERSION)
        )
        received, _, _, factory = yield self.exchange(self.server(), creator)
        self.assertEqual(received, b"ping")
        self.assertEqual(factory.identities, ["alice"])
        [connection] = creator.connections
        self.assertEqual(connection.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(connection.get_cipher_name(), "ECDHE-PSK-CHACHA20-POLY1305")

    @inlineCallbacks
    def test_wrong_key(self) -> Any:
        received, client_reason, server_reason, factory = yield self.exchange(
            self.server(), self.client(key=os.urandom(32))
        )
        self.assertEqual(received, b"")
        self.assertIsInstance(client_reason.value, SSL.Error)
        self.assertIsInstance(server_reason.value, SSL.Error)
        self.assertEqual(factory.identities, [])
        self.assertEqual(self.refusals(), [])

    @inlineCallbacks
    def test_wrong_key_tls12(self) -> Any:
        received, client_reason, _, _ = yield self.exchange(
            self.server(),
            self.client(key=os.urandom(32), maximum_version=SSL.TLS1_2_VERSION),
        )
        self.assertEqual(received, b"")
        self.assertIsInstance(client_reason.value, SSL.Error)

    @inlineCallbacks
    def test_unknown_identity(self) -> Any:
        """Refused, and logged with the identity; it fails as a wrong key does."""
        received, client_reason, server_reason, factory = yield self.exchange(
            self.server(), self.client(identity="mallory")
        )
        self.assertEqual(received, b"")
        self.assertIsInstance(client_reason.value, SSL.Error)
        self.assertIsInstance(server_reason.value, SSL.Error)
        self.assertEqual(self.refusals(), ["mallory"])
        self.assertEqual(factory.identities, [])

    @inlineCallbacks
    def test_unknown_identity_tls12(self) -> Any:
        received, client_reason, _, _ = yield self.exchange(
            self.server(), self.client(identity="mallory", maximum_version=SSL.TLS1_2_VERSION)
        )
        self.assertEqual(received, b"")
        self.assertIsInstance(client_reason.value, SSL.Error)
        self.assertEqual(self.refusals(), ["mallory"])

    @inlineCallbacks
    def test_client_refuses_certificate_server(self) -> Any:
        """
        A server that authenticates with a certificate instead of the key
        (here: one that knows no PSK at all) is refused by the PSK client.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        key, certificate = _self_signed()
        context.use_certificate(certificate)
        context.use_privatekey(key)
        received, client_reason, _, _ = yield self.exchange(
            PSKServerCreator(context), self.client()
        )
        self.assertEqual(received, b"")
        self.assertIsInstance(client_reason.value, SSL.Error)

    @inlineCallbacks
    def test_certificate_client_refused(self) -> Any:
        """A client without the PSK gets nowhere with the PSK server."""
        client = PSKClientCreator(SSL.Context(SSL.TLS_CLIENT_METHOD))
        received, client_reason, _, _ = yield self.exchange(self.server(), client)
        self.assertEqual(received, b"")
        self.assertIsInstance(client_reason.value, SSL.Error)


class _Recording(PSKClientCreator):
    """Keeps the connections it makes."""

    def __init__(self, context: SSL.Context) -> None:
        super().__init__(context)
        self.connections: list[SSL.Connection] = []

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = super().clientConnectionForTLS(tlsProtocol)
        self.connections.append(connection)
        return connection


def _self_signed() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A throwaway key and its self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return key, certificate


# ------------------------------------------------------------------ GnuTLS


class _Tool(ProcessProtocol):
    """
    A GnuTLS tool: collects its output; writes C{send} to its stdin and
    closes stdin once C{expect} came back; tells when some output matches.
    """

    def __init__(self, send: bytes | None = None, expect: bytes | None = None) -> None:
        self.send = send
        self.expect = expect
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()
        self.watchers: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []
        self.running = True

    def connectionMade(self) -> None:
        if self.send is not None:
            self.transport.write(self.send)  # type: ignore[union-attr]
        else:
            self.transport.closeStdin()  # type: ignore[union-attr]

    def wait_for(self, pattern: bytes) -> Deferred[re.Match[bytes]]:
        d: Deferred[re.Match[bytes]] = Deferred()
        self.watchers.append((re.compile(pattern), d))
        self._check()
        return d

    def _check(self) -> None:
        for entry in list(self.watchers):
            match = entry[0].search(self.out + b"\n" + self.err)
            if match:
                self.watchers.remove(entry)
                entry[1].callback(match)

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.expect is not None and self.expect in self.out:
            self.expect = None
            self.transport.closeStdin()  # type: ignore[union-attr]
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        for _, d in self.watchers:
            d.errback(AssertionError(f"the tool ended first\n{self.output()}"))
        self.watchers = []
        self.ended.callback(getattr(reason.value, "exitCode", None))

    def output(self) -> str:
        return (
            f"--- stdout\n{self.out.decode('utf-8', 'replace')}\n"
            f"--- stderr\n{self.err.decode('utf-8', 'replace')}"
        )

    def kill(self) -> None:
        if self.running:
            self.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]


class GnuTLSTests(TestCase):
    """Interoperability with GnuTLS, the TLS library of nbdkit, qemu and libnbd."""

    timeout = 180

    def setUp(self) -> None:
        self.key = os.urandom(32)
        self.dir = Path(self.mktemp())
        self.dir.mkdir(mode=0o700)
        self.key_file = write_key_file(self.dir, f"alice:{self.key.hex()}\n")

    def spawn(self, argv: list[str], tool: _Tool) -> _Tool:
        process_reactor.spawnProcess(tool, argv[0], argv, env=dict(os.environ))
        self.addCleanup(lambda: tool.ended if tool.running else None)
        self.addCleanup(tool.kill)
        return tool

    @inlineCallbacks
    def run_tool(self, argv: list[str], tool: _Tool) -> Any:
        self.spawn(argv, tool)
        timer = _reactor.callLater(EXCHANGE_TIMEOUT, tool.kill)
        code = yield tool.ended
        if timer.active():
            timer.cancel()
        else:
            self.fail(f"{argv[0]} ran out of time\n{tool.output()}")
        return code

    def listen(self) -> tuple[_EchoFactory, int]:
        factory = _EchoFactory(PSKServerCreator(psk_server_context(load_psk_file(self.key_file))))
        port = tcp_reactor.listenTCP(0, factory, interface=LOOPBACK)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port  # type: ignore[attr-defined]

    @inlineCallbacks
    def gnutls_cli(self, priority: str, key: bytes, user: str = "alice") -> Any:
        cli = require_tool("gnutls-cli")
        factory, port = self.listen()
        tool = _Tool(send=b"ping\n", expect=b"ping")
        argv = [
            cli, "--port", str(port), "--priority", priority,
            "--pskusername", user, "--pskkey", key.hex(), LOOPBACK,
        ]  # fmt: skip
        code = yield self.run_tool(argv, tool)
        if factory.lost or factory.sessions or code == 0:
            yield _bounded(factory.when_lost(), "the server's end")
        return code, tool, factory

    @inlineCallbacks
    def test_gnutls_cli_tls13(self) -> Any:
        """
        nbdkit's, qemu's and libnbd's priority string: TLS 1.3 with the PSK
        and an ephemeral ECDH share. (gnutls-cli 3.7 describes the session
        as "(TLS1.3-X.509)--(...)" even so: its description does not know
        TLS 1.3 PSK.)
        """
        code, tool, factory = yield self.gnutls_cli(GNUTLS_PSK_PRIORITY, self.key)
        self.assertEqual(code, 0, tool.output())
        self.assertIn(b"\nping\n", tool.out)
        self.assertIn(b"PSK authentication. Connected as 'alice'", tool.out, tool.output())
        self.assertEqual(factory.identities, ["alice"])
        [(version, cipher)] = factory.sessions
        self.assertEqual(version, "TLSv1.3")
        self.assertIn(cipher, ["TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"])

    @inlineCallbacks
    def test_gnutls_cli_tls12(self) -> Any:
        """
        TLS 1.2. gnutls-cli 3.7.9 (Debian 12) crashes after any TLS 1.2
        ECDHE-PSK handshake, against gnutls-serv as much as against us (the
        library does not: libnbd's nbdinfo with TLS 1.3 disabled negotiates
        ECDHE-PSK-CHACHA20-POLY1305 with nbdkit), so this asks for plain PSK;
        L{test_gnutls_serv_tls12} covers ECDHE-PSK.
        """
        code, tool, factory = yield self.gnutls_cli("NORMAL:-VERS-TLS1.3:+PSK", self.key)
        self.assertEqual(code, 0, tool.output())
        self.assertIn(b"\nping\n", tool.out)
        self.assertIn(b"PSK authentication. Connected as 'alice'", tool.out, tool.output())
        self.assertEqual(factory.identities, ["alice"])
        [(version, cipher)] = factory.sessions
        self.assertEqual(version, "TLSv1.2")
        self.assertIn("PSK", cipher or "")

    @inlineCallbacks
    def test_gnutls_cli_wrong_key(self) -> Any:
        code, tool, factory = yield self.gnutls_cli(GNUTLS_PSK_PRIORITY, os.urandom(32))
        self.assertNotEqual(code, 0, tool.output())
        self.assertNotIn(b"ping", tool.out)
        self.assertEqual(factory.identities, [])

    @inlineCallbacks
    def test_gnutls_cli_unknown_user(self) -> Any:
        code, tool, factory = yield self.gnutls_cli(GNUTLS_PSK_PRIORITY, self.key, user="bob")
        self.assertNotEqual(code, 0, tool.output())
        self.assertEqual(factory.identities, [])
