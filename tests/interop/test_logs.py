"""
C{twistd --logger twisted_nbd.logs.json_observer nbd ...}: every line the
server writes is one JSON event, and the connection events count what
real clients (nbdcopy, nbdinfo) did; with C{--workers} the workers' events
keep their fields, and C{--verbose} adds one event per request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import NBDServer, make_tempdir, require_tool, run_tool, start_server
from tests.tlsfiles import make_psk_file

pytestmark = pytest.mark.interop

MiB = 1 << 20
JSON_LOGGER = ["--logger", "twisted_nbd.logs.json_observer"]


def json_events(server: NBDServer) -> list[dict[str, Any]]:
    """
    Every line of the server's output, each parsed as JSON.

    @raise AssertionError: a line is not a JSON object.
    """
    events = []
    for line in server.output_path.read_text("utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(event, dict), line
        events.append(event)
    return events


class JSONLogTests(SynchronousTestCase):
    """Real clients against a server logging JSON."""

    psk = False

    def copy_and_inspect(self, *args: str, psk: bool = False) -> list[dict[str, Any]]:
        """
        Start a server with C{args}, copy 1 MiB into it with nbdcopy, run
        nbdinfo, stop it: the events of the nbdcopy connection (those of its
        process and number: each worker numbers its own).

        @param psk: require TLS with a pre-shared key for user C{alice}.
        """
        nbdcopy, nbdinfo = require_tool("nbdcopy"), require_tool("nbdinfo")
        workdir = Path(make_tempdir(self))
        source = workdir / "source.img"
        source.write_bytes(os.urandom(MiB))
        if psk:
            keys = workdir / "keys.psk"
            make_psk_file(keys)
            args += ("--tls", "require", "--tls-psk", str(keys))
        server = start_server(self, "--memory", "8M", *args, twistd_args=JSON_LOGGER)
        uri = server.uri
        if psk:
            uri = f"nbds://alice@127.0.0.1:{server.port}/?tls-psk-file={keys}"
        run_tool([nbdcopy, "--connections=1", "--no-extents", str(source), uri])
        run_tool([nbdinfo, uri])
        server.stop()
        events = json_events(server)
        closes = [e for e in events if e.get("nbd_event") == "connection-close"]
        [copy] = [e for e in closes if e["bytes_written"]]
        key = (copy.get("worker"), copy["connection"])
        return [e for e in events if (e.get("worker"), e.get("connection")) == key]

    def check_copy(self, mine: list[dict[str, Any]]) -> None:
        """The nbdcopy connection's open and close events add up to the copy."""
        kinds = [
            e["nbd_event"] for e in mine if e["nbd_event"].startswith(("connection", "export"))
        ]
        self.assertEqual(kinds, ["connection-open", "export-chosen", "connection-close"])
        close = mine[-1]
        self.assertEqual(close["bytes_written"], MiB)
        self.assertEqual(close["errors"], 0)
        self.assertEqual(close["reason"], "closed")
        self.assertEqual(close["export"], "")
        self.assertEqual(close["tls_peer"], "PSK alice" if self.psk else "")
        self.assertTrue(close["peer"].startswith("127.0.0.1:"), close["peer"])
        self.assertGreaterEqual(close["requests"], 2)  # the writes and a flush
        self.assertGreaterEqual(close["duration"], 0)
        self.assertEqual(close["log_namespace"], "twisted_nbd.connections")
        self.assertIn("disconnected (closed)", close["log_text"])

    def test_json_lines(self) -> None:
        """
        Each line is JSON; nbdcopy's connection (over TLS-PSK) is opened,
        chooses the default export, and closes with 1 MiB written and its
        PSK identity; there is no per-request event without --verbose.
        """
        self.psk = True
        mine = self.copy_and_inspect(psk=True)
        self.check_copy(mine)
        self.assertFalse([e for e in mine if e["nbd_event"] == "request"])

    def test_workers_verbose(self) -> None:
        """
        With --workers 2 the workers' events reach the supervisor's JSON
        log with their fields and the worker's index; --verbose adds an
        event per request, whose WRITEs add up to the copy.
        """
        mine = self.copy_and_inspect("--workers", "2", "--verbose")
        self.check_copy(mine)
        self.assertIn(mine[0]["worker"], (0, 1))
        requests = [e for e in mine if e["nbd_event"] == "request"]
        written = sum(e["length"] for e in requests if e["command"] == "WRITE")
        self.assertEqual(written, MiB)
        self.assertEqual({e["errno"] for e in requests}, {"OK"})
        self.assertEqual({e["log_namespace"] for e in requests}, {"twisted_nbd.requests"})
