"""
C{--metrics} and C{--admin} on a real C{twistd nbd}, with real clients:
scrape the metrics while C{nbdcopy} runs (one process, and C{--workers 2}
with a worker killed afterwards), and drive the admin API and SIGHUP while
C{nbdinfo} and libnbd watch.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import (
    LOOPBACK,
    NBDServer,
    free_port,
    make_tempdir,
    require_libnbd,
    require_tool,
    run_tool,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
#: The copy: 8 MiB in 64 KiB WRITEs, one at a time per connection, each
#: delayed 2 ms by the server, so it lasts long enough to be scraped.
SIZE = 8 * MiB
REQUEST = 64 * 1024
HTTP_TIMEOUT = 10.0


def web(url: str) -> tuple[int, str]:
    """GET C{url}: its status and body as text."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class UnixAPI:
    """The admin API over a unix socket (what curl --unix-socket does)."""

    def __init__(self, path: Path, token: str | None = None) -> None:
        self.path = path
        self.token = token

    def __call__(self, method: str, target: str, body: object = None) -> tuple[int, Any]:
        """One request; (status, decoded JSON body)."""
        connection = http.client.HTTPConnection("localhost", timeout=HTTP_TIMEOUT)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(HTTP_TIMEOUT)
        sock.connect(str(self.path))
        connection.sock = sock
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        data = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, target, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()


def stop(process: subprocess.Popen[Any]) -> None:
    """Kill C{process} if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(30)


def scrape(port: int) -> dict[str, float]:
    """The metrics, C{name{labels}} (labels sorted) to value."""
    status, text = web(f"http://{LOOPBACK}:{port}/metrics")
    assert status == 200, text
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def total(metrics: dict[str, float], name: str, *parts: str) -> float:
    """The sum of C{name}'s samples whose labels contain every one of C{parts}."""
    return sum(
        value
        for key, value in metrics.items()
        if key.startswith(name + "{") and all(p in key for p in parts)
    )


class MetricsInteropTests(SynchronousTestCase):
    """The counters add up to what C{nbdcopy} copied."""

    def copy_and_scrape(self, *args: str, connections: int) -> tuple[NBDServer, int]:
        nbdcopy = require_tool("nbdcopy")
        workdir = make_tempdir(self)
        source = workdir / "source.img"
        source.write_bytes(os.urandom(SIZE))
        port = free_port()
        server = start_server(
            self,
            "--memory",
            str(SIZE),
            "--filter",
            "delay:delay=2ms,ops=write",
            "--metrics",
            f"tcp:{port}:interface={LOOPBACK}",
            *args,
            workdir=workdir,
        )
        self.assertEqual(web(f"http://{LOOPBACK}:{port}/health"), (200, "ok\n"))
        wait_until(lambda: web(f"http://{LOOPBACK}:{port}/ready")[0] == 200, 15, "ready")
        copy = subprocess.Popen(
            [
                nbdcopy,
                f"--connections={connections}",
                "--requests=1",
                f"--request-size={REQUEST}",
                str(source),
                server.uri,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(stop, copy)
        # Scrape while it runs (bounded: the copy ends or the test fails):
        # the counters never go backwards.
        seen: list[float] = []
        for _ in range(500):
            seen.append(total(scrape(port), "nbd_written_bytes_total"))
            try:
                copy.wait(timeout=0.05)  # paces the scrapes; ends the loop with the copy
                break
            except subprocess.TimeoutExpired:
                pass
        output = copy.communicate(timeout=60)[0]
        self.assertEqual(copy.returncode, 0, output)
        self.assertEqual(seen, sorted(seen))

        def settled() -> bool:
            metrics = scrape(port)
            return (
                total(metrics, "nbd_written_bytes_total") == SIZE
                and total(metrics, "nbd_connections_open") == 0
            )

        wait_until(settled, 15, "all bytes counted")
        metrics = scrape(port)
        writes = SIZE // REQUEST
        self.assertEqual(
            total(metrics, "nbd_requests_total", "command=WRITE", "outcome=ok"), writes
        )
        self.assertEqual(
            total(metrics, "nbd_requests_total", "command=WRITE"), writes, "no failed WRITE"
        )
        self.assertEqual(
            total(metrics, "nbd_request_duration_seconds_count", "command=WRITE"), writes
        )
        self.assertEqual(
            total(metrics, "nbd_request_duration_seconds_bucket", "command=WRITE", "le=0.001"),
            0,
            "every WRITE was delayed 2 ms",
        )
        self.assertGreaterEqual(
            total(metrics, "nbd_request_duration_seconds_sum", "command=WRITE"), writes * 0.002
        )
        self.assertGreaterEqual(total(metrics, "nbd_connections_total"), connections)
        self.assertEqual(total(metrics, "nbd_requests_in_flight"), 0)
        self.assertEqual(total(metrics, "nbd_request_bytes_in_flight"), 0)
        self.assertEqual(total(metrics, "nbd_read_bytes_total"), 0)
        return server, port

    def test_nbdcopy(self) -> None:
        """One process: bytes written == the image size, one request per 64 KiB."""
        self.copy_and_scrape(connections=1)

    def test_nbdcopy_workers(self) -> None:
        """
        C{--workers 2}: the workers' counts add up in the supervisor, and
        stay when a worker is killed (its successor starts from zero).
        """
        server, port = self.copy_and_scrape("--workers", "2", connections=2)
        before = scrape(port)
        line = server.wait_for_log("Started worker 0 (pid")
        found = re.search(r"\(pid (\d+)\)", line)
        assert found is not None
        os.kill(int(found.group(1)), signal.SIGKILL)
        server.wait_for_log("Worker 0", "ended")
        wait_until(lambda: web(f"http://{LOOPBACK}:{port}/ready")[0] == 200, 15, "ready")
        after = scrape(port)
        for name in ("nbd_written_bytes_total", "nbd_requests_total", "nbd_connections_total"):
            self.assertEqual(total(after, name), total(before, name), name)
        # The supervisor logs the worker's death as a warning, no traceback.


class AdminInteropTests(SynchronousTestCase):
    """The admin API and SIGHUP change what C{nbdinfo} and libnbd see."""

    def test_admin(self) -> None:
        nbdinfo = require_tool("nbdinfo")
        require_libnbd()
        workdir = make_tempdir(self)
        config = workdir / "exports.toml"
        config.write_text('[[export]]\nname = "a"\nmemory = "1M"\n')
        token_file = workdir / "token"
        token_file.write_text("s3cret\n")
        socket_path = workdir / "admin.sock"
        server = start_server(
            self,
            "--config",
            str(config),
            "--admin",
            f"unix:{socket_path}",
            "--admin-token",
            str(token_file),
            workdir=workdir,
        )
        status, body = UnixAPI(socket_path)("GET", "/exports")
        self.assertEqual((status, body["error"]), (401, "unauthorized"))
        api = UnixAPI(socket_path, "s3cret")

        def names() -> list[str]:
            out = run_tool([nbdinfo, "--list", "--json", server.uri]).stdout
            return sorted(e["export-name"] for e in json.loads(out)["exports"])

        status, body = api("PUT", "/exports/b", {"memory": "2M"})
        self.assertEqual((status, body["outcome"]), (201, "created"), body)
        self.assertEqual(api("PUT", "/exports/b", {"memory": "2M"})[1]["outcome"], "unchanged")
        self.assertEqual(names(), ["a", "b"])

        # SIGHUP reloads the file: b (added by the API) goes, c comes.
        config.write_text(
            '[[export]]\nname = "a"\nmemory = "1M"\n[[export]]\nname = "c"\nmemory = "1M"\n'
        )
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("Reloaded", "added ['c']")
        self.assertEqual(names(), ["a", "c"])

        # A client of c, cut off by a hard removal.
        go = workdir / "go"
        client = subprocess.Popen(
            [
                require_libnbd(),
                "-c",
                CLIENT_SCRIPT,
                f"nbd://{LOOPBACK}:{server.port}/c",
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(stop, client)
        assert client.stdout is not None
        self.assertEqual(client.stdout.readline().strip(), "connected")
        status, body = api("GET", "/connections")
        [connection] = body["connections"]
        self.assertEqual((connection["export"], connection["read_bytes"]), ("c", 512))
        status, body = api("DELETE", "/exports/c?mode=hard")
        self.assertEqual((status, body["connections"]), (200, 1))
        go.touch()
        output = client.communicate(timeout=30)[0]
        self.assertIn("failed", output)
        status, body = api("DELETE", "/exports/c?mode=hard")
        self.assertEqual((status, body["existed"]), (200, False))
        self.assertEqual(names(), ["a"])
        server.check_log()


#: Connect, read once, wait for a file, read again: print what happened.
CLIENT_SCRIPT = r"""
import os, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(512, 0)
print("connected", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
try:
    h.pread(512, 0)
    print("read ok")
except nbd.Error as e:
    print("failed:", e)
"""
