"""
C{--admin} and SIGHUP with C{--workers 2} on a real C{twistd nbd}: an
export added through the API is served by both workers (C{nbdcopy} over
several connections, libnbd clients on each worker), connections are
listed from all workers, a C{soft} removal ends them, a reload from the
changed config reaches every worker, and a worker started after a crash
gets the current exports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import (
    LOOPBACK,
    make_tempdir,
    require_libnbd,
    require_tool,
    run_tool,
    start_server,
    wait_until,
)
from tests.interop.test_ops import CLIENT_SCRIPT, UnixAPI, stop

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


class AdminWorkersInteropTests(SynchronousTestCase):
    """The admin API and reloads reach every worker process."""

    def test_admin_workers(self) -> None:
        nbdinfo = require_tool("nbdinfo")
        nbdcopy = require_tool("nbdcopy")
        python = require_libnbd()
        workdir = make_tempdir(self)
        config = workdir / "exports.toml"
        config.write_text('[[export]]\nname = "a"\nmemory = "1M"\n')
        (workdir / "token").write_text("s3cret\n")
        socket_path = workdir / "admin.sock"
        server = start_server(
            self,
            "--config",
            str(config),
            "--workers",
            "2",
            "--admin",
            f"unix:{socket_path}",
            "--admin-token",
            str(workdir / "token"),
            workdir=workdir,
        )
        server.wait_for_log("Worker 1 is ready")

        # Bad requests: no token; a backend that workers cannot share.
        status, body = UnixAPI(socket_path)("PUT", "/exports/b", {"memory": "1M"})
        self.assertEqual((status, body["error"]), (401, "unauthorized"))
        api = UnixAPI(socket_path, "s3cret")
        status, body = api("PUT", "/exports/p", {"backend": "pattern:size=1M"})
        self.assertEqual((status, body["error"]), (422, "not-shareable"), body)
        self.assertIn("cannot be shared", body["reason"])

        def names() -> list[str]:
            out = run_tool([nbdinfo, "--list", "--json", server.uri]).stdout
            return sorted(e["export-name"] for e in json.loads(out)["exports"])

        # Added at runtime, an image file, which both workers serve.
        image = workdir / "b.img"
        image.write_bytes(bytes(2 * MiB))
        status, body = api("PUT", "/exports/b", {"image": str(image)})
        self.assertEqual((status, body["outcome"], body["workers"]), (201, "created", 2), body)
        self.assertEqual(body["size"], 2 * MiB)
        self.assertEqual(names(), ["a", "b"])
        data = os.urandom(2 * MiB)
        source = workdir / "source.img"
        source.write_bytes(data)
        # Several connections each way, spread over the two workers.
        b_uri = f"nbd://{LOOPBACK}:{server.port}/b"
        run_tool([nbdcopy, "--connections=4", str(source), b_uri])
        copy = workdir / "copy.img"
        run_tool([nbdcopy, "--connections=4", b_uri, str(copy)])
        self.assertEqual(copy.read_bytes(), data)
        self.assertEqual(image.read_bytes(), data)

        # Two libnbd clients of b: one in each worker (the least busy gets
        # the next connection, once nbdcopy's are all gone), both listed,
        # then ended by a soft removal.
        wait_until(lambda: api("GET", "/connections")[1]["connections"] == [], 15, "no clients")
        go = workdir / "go"
        clients = []
        for _ in range(2):
            client = subprocess.Popen(
                [python, "-c", CLIENT_SCRIPT, b_uri, str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.addCleanup(stop, client)
            assert client.stdout is not None
            self.assertEqual(client.stdout.readline().strip(), "connected")
            clients.append(client)
        status, body = api("GET", "/connections")
        self.assertEqual(status, 200, body)
        found = [c for c in body["connections"] if c["export"] == "b"]
        self.assertEqual(sorted(c["worker"] for c in found), [0, 1], body)
        self.assertEqual([c["read_bytes"] for c in found], [512, 512])
        status, body = api("GET", "/exports/b")
        self.assertEqual((body["connections"], body["workers"]), (2, 2), body)
        status, body = api("DELETE", "/exports/b?mode=soft")
        self.assertEqual((status, body["existed"], body["connections"]), (200, True, 2), body)
        go.touch()
        for client in clients:
            self.assertIn("failed", client.communicate(timeout=30)[0])
        self.assertEqual(names(), ["a"])

        # SIGHUP: a changes (2M), c comes; every worker applies it.
        config.write_text(
            '[[export]]\nname = "a"\nmemory = "2M"\n[[export]]\nname = "c"\nmemory = "1M"\n'
        )
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("Reloaded", "added ['c']", "changed ['a']")
        server.wait_for_log("Export 'c' created in every worker")
        server.wait_for_log("Export 'a' replaced in every worker")
        self.assertEqual(names(), ["a", "c"])

        # A worker started after a crash gets the current exports.
        found_pid = re.search(r"Started worker 1 \(pid (\d+)\)", server.log_text())
        assert found_pid is not None
        os.kill(int(found_pid.group(1)), signal.SIGKILL)
        wait_until(lambda: server.log_text().count("Worker 1 is ready") == 2, 15, "worker 1 again")
        status, body = api("GET", "/exports")
        described = {e["name"]: (e["size"], e["workers"]) for e in body["exports"]}
        self.assertEqual(described, {"a": (2 * MiB, 2), "c": (MiB, 2)})
        # POST /reload: the same reload, answered once every worker has applied it.
        config.write_text('[[export]]\nname = "c"\nmemory = "1M"\n')
        status, body = api("POST", "/reload")
        self.assertEqual((status, body["removed"], body["unchanged"]), (200, ["a"], ["c"]), body)
        self.assertEqual(body["default"], "c")
        self.assertEqual(names(), ["c"])
        server.check_log()
