"""
Misbehaving clients against the real server: truncated payloads, garbage,
protocol violations and a client that never reads its replies. After each,
the server must still serve the next client, say in its log why it dropped
the bad one, and log no traceback (checked for every test when the server
stops). Rule ids refer to the protocol digest in the shared docs.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import (
    CMD_READ,
    CMD_WRITE,
    OPT_GO,
    REP_ACK,
    NBDServer,
    RawClient,
    make_image,
    make_tempdir,
    require_tool,
    run_tool,
    start_server,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
GiB = 1024 * MiB
SIZE = 8 * MiB
OPT_ABORT = 2
REP_ERR_UNSUP = 0x80000001


def assert_serving(case: SynchronousTestCase, server: NBDServer, size: int = SIZE) -> None:
    """The server is alive and answers a new client: raw READ, then nbdinfo."""
    case.assertTrue(server.alive(), "the server exited")
    with RawClient(server.port) as client:
        case.assertEqual(client.handshake()[0], size)
        case.assertEqual(len(client.read(0, 4096)), 4096)
        client.disconnect()
        case.assertTrue(client.wait_closed())
    done = run_tool([require_tool("nbdinfo"), "--size", server.uri])
    case.assertEqual(int(done.stdout), size)


class BadClientTests(SynchronousTestCase):
    """A client that breaks the protocol loses its connection, nobody else's."""

    def setUp(self) -> None:
        self.image = make_image(make_tempdir(self) / "disk.img", SIZE)
        self.server = start_server(self, "--image", str(self.image))

    def test_truncated_write(self) -> None:
        """
        A client that sends a WRITE header for 1 MiB and only half the
        payload, then closes: the server drops the half-received write (the
        image is unchanged) and keeps serving others.
        """
        with RawClient(self.server.port) as client:
            client.handshake()
            self.assertEqual(client.read(0, 512), bytes(512))
            client.send(client.request(CMD_WRITE, MiB, MiB, cookie=99))
            client.send(b"\xab" * (MiB // 2))
        assert_serving(self, self.server)
        self.server.stop()
        self.assertEqual(self.image.read_bytes(), bytes(SIZE))

    def test_http_request_as_client_flags(self) -> None:
        """
        Garbage after the greeting (an HTTP request, read as client flags
        with unknown bits set) makes the server close the connection (H-02)
        and log why.
        """
        with RawClient(self.server.port) as client:
            client.greeting()
            client.send(b"GET / HTTP/1.0\r\n\r\n")
            self.assertTrue(client.wait_closed(), "the server kept the connection open")
        self.server.wait_for_log("client flags")
        assert_serving(self, self.server)

    def test_unknown_client_flag(self) -> None:
        """
        Client flags with a bit the server did not offer (bit 2) close the
        connection (H-02).
        """
        with RawClient(self.server.port) as client:
            client.greeting()
            client.send(struct.pack(">I", 0x1 | 0x4))
            self.assertTrue(client.wait_closed(), "the server kept the connection open")
        self.server.wait_for_log("client flags")
        assert_serving(self, self.server)

    def test_bad_option_magic(self) -> None:
        """An option without the IHAVEOPT magic closes the connection (H-03)."""
        with RawClient(self.server.port) as client:
            client.send(struct.pack(">I", client.greeting() & 0x3))
            client.option(OPT_GO, b"\0" * 6, magic=0x0102030405060708)
            self.assertTrue(client.wait_closed(), "the server kept the connection open")
        self.server.wait_for_log("magic")
        assert_serving(self, self.server)

    def test_unknown_option(self) -> None:
        """
        An unknown option (0x7654321, with 4 bytes of data, as the reference
        tester sends) gets ERR_UNSUP echoing its number, its data is skipped,
        and GO then works on the same connection (H-04, H-05).
        """
        with RawClient(self.server.port) as client:
            client.send(struct.pack(">I", client.greeting() & 0x3))
            client.option(0x7654321, b"\x01\x02\x03\x04")
            self.assertEqual(client.option_reply()[:2], (0x7654321, REP_ERR_UNSUP))
            self.assertEqual(client.go()[0], SIZE)
            self.assertEqual(client.read(SIZE - 512, 512), bytes(512))

    def test_abort(self) -> None:
        """NBD_OPT_ABORT gets an ACK and the server then closes (H-08)."""
        with RawClient(self.server.port) as client:
            client.send(struct.pack(">I", client.greeting() & 0x3))
            client.option(OPT_ABORT)
            self.assertEqual(client.option_reply(), (OPT_ABORT, REP_ACK, b""))
            self.assertTrue(client.wait_closed())
        assert_serving(self, self.server)

    def test_bad_request_magic(self) -> None:
        """
        A request with a wrong magic after GO makes the server close the
        connection at once (T-01) and log why.
        """
        with RawClient(self.server.port) as client:
            client.handshake()
            client.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
            self.assertTrue(client.wait_closed(), "the server kept the connection open")
        self.server.wait_for_log("magic", "0xdeadbeef")
        assert_serving(self, self.server)

    def test_disc_after_pipelined_reads(self) -> None:
        """
        READs pipelined before NBD_CMD_DISC are all answered, then the
        server closes the connection (C-06).
        """
        with RawClient(self.server.port) as client:
            client.handshake()
            requests = [client.request(CMD_READ, i * 65536, 65536, cookie=i) for i in range(16)]
            client.send(b"".join(requests) + client.request(2))
            cookies = set()
            for _ in range(16):
                error, cookie = client.simple_reply()
                self.assertEqual(error, 0)
                self.assertEqual(client.recv_exactly(65536), bytes(65536))
                cookies.add(cookie)
            self.assertEqual(cookies, set(range(16)))
            self.assertTrue(
                client.wait_closed(10.0), "the server did not close the connection after DISC"
            )
        assert_serving(self, self.server)


class RSSSampler(threading.Thread):
    """Samples a server's RSS every 50 ms until stopped; keeps the peak."""

    def __init__(self, server: NBDServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.peak_kib = 0
        self.last_kib = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            try:
                self.last_kib = self.server.rss_kib()
            except OSError:
                return  # the server is gone; the test will notice
            self.peak_kib = max(self.peak_kib, self.last_kib)
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


class SlowReaderTests(SynchronousTestCase):
    """A client that pipelines big READs and never reads the replies."""

    #: The ceiling for the server's resident memory while it is flooded
    #: (issue 10; bench/slow_reader.py measures the peak and the latency).
    RSS_LIMIT_KIB = 128 * 1024
    READS = 2000

    def test_slow_reader(self) -> None:
        """
        A client with a tiny receive window pipelines 2000 READs of 1 MiB
        and reads nothing. The server stops reading its requests once its
        send buffer fills (flow control), so its RSS stays under 128 MiB,
        and it keeps answering other clients meanwhile (a 4 KiB read, a
        1 MiB one); after the slow client goes, it still serves.
        """
        qemu_io = require_tool("qemu-io")
        image = make_image(make_tempdir(self) / "disk.img", 2 * GiB)
        server = start_server(self, "--image", str(image))
        sampler = RSSSampler(server)
        sampler.start()
        self.addCleanup(sampler.stop)

        slow = RawClient(server.port, rcvbuf=4096)
        self.addCleanup(slow.close)
        slow.handshake()
        requests = b"".join(
            slow.request(CMD_READ, (i % 2048) * MiB, MiB, cookie=i) for i in range(self.READS)
        )
        sent = _send_for_a_while(slow.sock, requests, seconds=5.0)
        self.assertGreater(sent, 0)

        # Let the server take in what it will, until its memory stops growing.
        _wait_steady(sampler, steady=1.0, timeout=20.0)
        # Another client is served while the slow one is stuck.
        done = run_tool(
            [qemu_io, "-f", "raw", server.uri, "-c", f"read -P 0 {GiB} {MiB}"], timeout=30
        )
        self.assertNotIn("failed", done.stdout + done.stderr)
        with RawClient(server.port) as other:
            other.handshake()
            self.assertEqual(other.read(GiB + MiB, 4096), bytes(4096))
            self.assertEqual(other.read(2 * GiB - MiB, MiB), bytes(MiB))
        _wait_steady(sampler, steady=0.5, timeout=5.0)
        sampler.stop()
        self.assertGreaterEqual(sampler.samples, 10)
        self.assertLess(
            sampler.peak_kib,
            self.RSS_LIMIT_KIB,
            f"the server's RSS peaked at {sampler.peak_kib} KiB with {sent} bytes of "
            "requests from a client that reads nothing",
        )

        slow.close()
        assert_serving(self, server, 2 * GiB)


def _send_for_a_while(sock: socket.socket, data: bytes, seconds: float) -> int:
    """
    Send as much of C{data} as the peer takes within C{seconds}, without
    ever blocking; the number of bytes sent.
    """
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    return sent


def _wait_steady(sampler: RSSSampler, steady: float, timeout: float) -> None:
    """Wait until the sampled RSS has not grown for C{steady} seconds (at most C{timeout})."""
    deadline = time.monotonic() + timeout
    peak, since = sampler.peak_kib, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if sampler.peak_kib > peak + 1024:
            peak, since = sampler.peak_kib, time.monotonic()
        elif time.monotonic() - since >= steady:
            return
