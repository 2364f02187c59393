"""
C{--idle-timeout} against the real server, on the paths the unit tests of
L{twisted_nbd.limits} cannot reach: a large WRITE's payload is received
straight into the device's buffer (L{twisted_nbd._transport.PayloadReceiver}),
bypassing C{dataReceived}, and a client that stops sending in the middle of
it is idle all the same.

Nothing waits a fixed time: each test polls for its condition, with a bound.
"""

from __future__ import annotations

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import CMD_WRITE, RawClient, make_image, make_tempdir, start_server

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


class StalledPayloadTests(SynchronousTestCase):
    """
    A client that sends part of a WRITE's payload and then nothing is
    closed by C{--idle-timeout} (C-08 lets the operator choose to time
    idle clients out; the unfinished WRITE is never acknowledged, so nothing
    is claimed written).
    """

    def test_stalled_mid_payload_is_closed(self) -> None:
        """The idle timeout covers a client stalled halfway through a 1 MiB WRITE."""
        workdir = make_tempdir(self)
        image = make_image(workdir / "disk.img", 8 * MiB)
        server = start_server(self, "--image", str(image), "--idle-timeout", "1", workdir=workdir)
        with RawClient(server.port) as client:
            client.handshake()
            client.send(RawClient.request(CMD_WRITE, 0, MiB, cookie=3))
            client.send(b"\x01" * (256 * 1024))
            # Bounded: the timeout is 1 s (closed within 1.25 s of going idle).
            self.assertTrue(client.wait_closed(timeout=20), "a stalled WRITE kept its connection")
        self.assertIn("idle for 1.0s (--idle-timeout)", server.log_text())
        # The partial payload was never written.
        self.assertEqual(image.read_bytes()[: 256 * 1024], bytes(256 * 1024))
