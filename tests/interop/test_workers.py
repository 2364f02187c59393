"""
C{twistd nbd --workers N}: one port, N processes, every guarantee kept
(see L{twisted_nbd.workers}). Real servers, real clients, on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import (
    NBDServer,
    make_image,
    make_tempdir,
    require_libnbd,
    require_tool,
    run_libnbd,
    run_tool,
    start_server,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024

#: Two connections that may land in different workers: a write on one, a
#: FLUSH on the other, then a read on a third sees the data (multi-conn).
MULTI_CONN_SCRIPT = r"""
import json, sys, nbd
uri = sys.argv[1]
handles = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
a, b, c = handles
pattern = bytes(range(256)) * 16
a.pwrite(pattern, 1 << 20)
b.flush()
seen = c.pread(len(pattern), 1 << 20)
print(json.dumps({
    "multi_conn": [h.can_multi_conn() for h in handles],
    "same": seen == pattern,
}))
"""


#: Sixteen 4 MiB READs in flight; once told to go on (a file appears), wait
#: for every reply: how many succeeded, got ESHUTDOWN, or failed otherwise.
IN_FLIGHT_SCRIPT = r"""
import errno, json, os, sys, time, nbd
uri, go = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
cookies = [h.aio_pread(nbd.Buffer(4 << 20), (i % 16) * (4 << 20)) for i in range(16)]
print("submitted", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
result = {"ok": 0, "shutdown": 0, "other": []}
for cookie in cookies:
    while True:
        try:
            if h.aio_command_completed(cookie):
                result["ok"] += 1
                break
        except nbd.Error as e:
            if e.errnum == errno.ESHUTDOWN:
                result["shutdown"] += 1
            else:
                result["other"].append(str(e))
            break
        h.poll(1)
print(json.dumps(result))
"""


def worker_pids(server: NBDServer) -> list[int]:
    """The pids of the supervisor's children (its workers)."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def wait_for(condition: object, timeout: float = 30.0) -> None:
    """Poll C{condition()} until it is true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {condition}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


class WorkersTests(SynchronousTestCase):
    """Several worker processes behind one port."""

    def start(self, *args: str) -> NBDServer:
        server = start_server(self, *args, "--workers", "2")
        server.wait_for_log("Worker 0 is ready")
        server.wait_for_log("Worker 1 is ready")
        return server

    def test_copy_across_workers(self) -> None:
        """
        nbdcopy with four connections up and down: the data is intact, both
        workers served connections, and nothing was left behind.
        """
        workdir = make_tempdir(self)
        image = make_image(workdir / "disk.img", 64 * MiB)
        source = workdir / "source.img"
        source.write_bytes(os.urandom(64 * MiB))
        server = self.start("--image", str(image))
        self.assertEqual(len(worker_pids(server)), 2)
        nbdcopy = require_tool("nbdcopy")
        run_tool([nbdcopy, "--connections=4", "--threads=4", str(source), server.uri])
        copy = workdir / "copy.img"
        run_tool([nbdcopy, "--connections=4", "--threads=4", server.uri, str(copy)])
        self.assertEqual(sha256(copy), sha256(source))
        self.assertEqual(sha256(image), sha256(source))
        log = server.log_text()
        for index in (0, 1):
            self.assertIn(f"[worker {index}] Client", log)

    def test_multi_conn_flush_across_workers(self) -> None:
        """
        C-02 across processes: a write on one connection, a FLUSH on another
        (in another worker), and a third sees the data; multi-conn is
        advertised. For an image (one page cache) and a RAM disk (shared
        memory) alike.
        """
        workdir = make_tempdir(self)
        image = make_image(workdir / "disk.img", 16 * MiB)
        for args in (["--image", str(image)], ["--memory", "16M"]):
            server = self.start(*args)
            out = run_libnbd(MULTI_CONN_SCRIPT, server.uri)
            self.assertEqual(out, {"multi_conn": [True, True, True], "same": True}, args)
            log = server.log_text()
            self.assertIn("[worker 0] Client", log)
            self.assertIn("[worker 1] Client", log)
            server.finish()
        with open(image, "rb") as f:
            f.seek(MiB)
            self.assertEqual(f.read(4096), bytes(range(256)) * 16)

    def test_killed_worker_replaced(self) -> None:
        """
        A worker killed with SIGKILL is replaced; meanwhile the port stays
        open and the other worker serves; afterwards there are two again.
        """
        server = self.start("--memory", "16M")
        nbdinfo = require_tool("nbdinfo")
        first = worker_pids(server)
        os.kill(first[0], signal.SIGKILL)
        # At once: served by the other worker (or queued until a worker is ready).
        run_tool([nbdinfo, "--json", server.uri])
        wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server) != first)
        server.wait_for_log("starting another")
        for _ in range(4):
            info = json.loads(run_tool([nbdinfo, "--json", server.uri]).stdout)
            self.assertEqual(info["exports"][0]["export-size"], 16 * MiB)
        self.assertTrue(server.alive())

    def test_graceful_stop(self) -> None:
        """
        SIGTERM stops listening and lets every worker finish what is in
        flight (C-07): each READ a client had sent gets its data or
        ESHUTDOWN, none is cut off; then every process exits cleanly.
        """
        workdir = make_tempdir(self)
        image = make_image(workdir / "disk.img", 64 * MiB)
        server = self.start("--image", str(image))
        pids = worker_pids(server)
        go = workdir / "go"
        clients = [
            subprocess.Popen(
                [require_libnbd(), "-c", IN_FLIGHT_SCRIPT, server.uri, str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for client in clients:
            assert client.stdout is not None
            self.assertEqual(client.stdout.readline().strip(), "submitted")
        server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        go.touch()
        for client in clients:
            out, err = client.communicate(timeout=60)
            result = json.loads(out.strip().splitlines()[-1])
            self.assertEqual(result["other"], [], err)
            self.assertEqual(result["ok"] + result["shutdown"], 16, result)
        # twistd ends by raising the signal that stopped it again, once cleaned up.
        self.assertIn(server.process.wait(timeout=30), (0, -signal.SIGTERM))  # type: ignore[union-attr]
        for pid in pids:
            self.assertFalse(Path(f"/proc/{pid}").exists() and _alive(pid), pid)
        self.assertIn("Worker 0 stopping", server.log_text())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"
