"""
Captive mode and C{--print-uri} without processes (see
L{twisted_nbd.captive}; the real thing is in C{tests/interop/test_restart.py}).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_nbd.captive import CaptiveService, run_environment, uri_for
from twisted_nbd.tap import Options
from twisted_nbd.tls import TLSSettings

PLAIN = TLSSettings()


class URITests(SynchronousTestCase):
    """L{uri_for} writes URIs as libnbd and qemu read them."""

    def test_tcp(self) -> None:
        self.assertEqual(
            uri_for(IPv4Address("TCP", "127.0.0.1", 10809), "", PLAIN), "nbd://127.0.0.1:10809/"
        )
        self.assertEqual(
            uri_for(IPv4Address("TCP", "0.0.0.0", 5000), "disk", PLAIN), "nbd://localhost:5000/disk"
        )
        self.assertEqual(uri_for(IPv6Address("TCP", "::1", 5000), "", PLAIN), "nbd://[::1]:5000/")

    def test_name_quoted(self) -> None:
        """Export names are percent-encoded: a slash or space stays in the name."""
        self.assertEqual(
            uri_for(IPv4Address("TCP", "127.0.0.1", 1), "a b/c", PLAIN),
            "nbd://127.0.0.1:1/a%20b%2Fc",
        )

    def test_unix(self) -> None:
        self.assertEqual(
            uri_for(UNIXAddress("/run/nbd.sock"), "disk", PLAIN),
            "nbd+unix:///disk?socket=/run/nbd.sock",
        )

    def test_tls_require(self) -> None:
        """
        With TLS required the scheme is nbds, with libnbd's parameters for
        the certificates directory or the PSK file (and its first user).
        """
        certs = TLSSettings(
            mode="require", cert="/c/server-cert.pem", key="/c/server-key.pem", ca="/c/ca-cert.pem"
        )
        self.assertEqual(
            uri_for(IPv4Address("TCP", "127.0.0.1", 1), "", certs),
            "nbds://127.0.0.1:1/?tls-certificates=/c",
        )
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice:0123456789abcdef\n")
        psk = TLSSettings(mode="require", psk_file=path)
        self.assertEqual(
            uri_for(UNIXAddress("/s"), "", psk),
            f"nbds+unix:///?socket=/s&tls-psk-file={path}&tls-username=alice",
        )
        # TLS offered but not required: plain URIs work.
        self.assertEqual(
            uri_for(UNIXAddress("/s"), "", TLSSettings(mode="on", psk_file=path)),
            "nbd+unix:///?socket=/s",
        )

    def test_environment(self) -> None:
        """The command sees nbdkit's variables."""
        env = run_environment(
            {"HOME": "/root", "port": "1"}, "nbd+unix:///?socket=/s", UNIXAddress("/s"), "", PLAIN
        )
        self.assertEqual(env["uri"], env["nbd"])
        self.assertEqual(env["unixsocket"], "/s")
        self.assertEqual(env["exportname"], "")
        self.assertEqual(env["tls"], "0")
        self.assertEqual(env["HOME"], "/root")
        self.assertNotIn("port", env)


class _Reactor:
    def __init__(self, running: bool) -> None:
        self.running = running
        self.stopped = 0
        self.when_running: list[Any] = []

    def stop(self) -> None:
        self.stopped += 1

    def callWhenRunning(self, f: Any) -> None:  # noqa: N802 - the reactor's name
        self.when_running.append(f)


class CaptiveServiceTests(SynchronousTestCase):
    """What happens when the command ends."""

    def ended(self, reason: Failure, running: bool = True) -> tuple[list[Any], _Reactor]:
        recorded: list[Any] = []
        reactor = _Reactor(running)
        service = CaptiveService(MultiService(), "true", "", PLAIN, reactor, record=recorded.append)
        service._ended(reason)
        return recorded, reactor

    def test_exit_status(self) -> None:
        recorded, reactor = self.ended(Failure(ProcessTerminated(exitCode=3)))
        self.assertEqual(recorded, [("exit", 3)])
        self.assertEqual(reactor.stopped, 1)
        recorded, _ = self.ended(Failure(ProcessDone(0)))
        self.assertEqual(recorded, [("exit", 0)])

    def test_signal(self) -> None:
        recorded, _ = self.ended(Failure(ProcessTerminated(signal=15)))
        self.assertEqual(recorded, [("signal", 15)])

    def test_before_running(self) -> None:
        """A command that ended while the reactor starts stops it once it runs."""
        _, reactor = self.ended(Failure(ProcessDone(0)), running=False)
        self.assertEqual(reactor.stopped, 0)
        self.assertEqual(reactor.when_running, [reactor.stop])


class OptionTests(SynchronousTestCase):
    def test_run_listens_privately(self) -> None:
        """--run puts a private Unix socket first, and only it by default."""
        options = Options()
        options.parseOptions(["--memory", "1M", "--run", "true"])
        (listen,) = options.config.listen
        self.assertTrue(listen.startswith("unix:/"))
        self.assertTrue(listen.endswith("/nbd.sock"))
        options = Options()
        options.parseOptions(["--memory", "1M", "--run", "true", "--listen", "tcp:0"])
        self.assertEqual(options.config.listen[1:], ("tcp:0",))
