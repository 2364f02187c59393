"""
Operations with real clients: a live restart (C{--takeover}) under
nbdcopy and libnbd, systemd socket activation, and captive mode (C{--run},
C{--print-uri}).

The copies under a restart read from or write to a pipe that the test
feeds (or drains) in two halves, and the new server starts between them: the
copy is certainly running when its connections move, with no timing guess.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, cast

import pytest
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.interop.helpers import (
    LOOPBACK,
    REPO_ROOT,
    NBDServer,
    _twistd_command,
    make_image,
    make_tempdir,
    require_libnbd,
    require_tool,
    run_libnbd,
    run_tool,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
#: C{NBD_LONG=1} runs the long variants: bigger copies, and nbdcopy reading
#: across a restart as well as writing.
LONG = os.environ.get("NBD_LONG") == "1"
#: How much each copy under a restart moves (half before it, half after).
COPY_SIZE = (384 if LONG else 32) * MiB
#: The longest a restart may take (the new server starting included).
RESTART_TIMEOUT = 60.0
COPY_TIMEOUT = 120.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _data(seed: int, size: int) -> bytes:
    """C{size} pseudo-random bytes (randbytes takes at most 256 MiB at once)."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(min(16 * MiB, size - at)) for at in range(0, size, 16 * MiB))


def _read_exactly(stream: IO[bytes], count: int) -> bytes:
    parts = []
    while count:
        part = stream.read(count)
        if not part:
            raise AssertionError(f"end of stream with {count} bytes still to come")
        parts.append(part)
        count -= len(part)
    return b"".join(parts)


class RestartMixin:
    """Starts servers with C{--takeover} and replaces them."""

    workdir: Path
    takeover: str
    image: Path
    #: What to serve, if not the image.
    serve: list[str] = []

    def setUp(self) -> None:
        self.workdir = make_tempdir(cast(SynchronousTestCase, self))
        self.takeover = str(self.workdir / "takeover.sock")
        self.image = self.workdir / "disk.img"

    def start(self, name: str, port: int | None = None, extra: tuple[str, ...] = ()) -> NBDServer:
        workdir = self.workdir / name
        workdir.mkdir()
        serve = self.serve if self.serve else ["--image", str(self.image)]
        args = [*serve, "--takeover", self.takeover, *extra]
        return start_server(cast(SynchronousTestCase, self), *args, workdir=workdir, port=port)

    def restart(self, old: NBDServer) -> NBDServer:
        """Start the new server, and wait until the old one has exited."""
        new = self.start("new", port=old.port)
        wait_until(lambda: not old.alive(), RESTART_TIMEOUT, "the old server gone")
        assert old.process is not None
        if old.process.returncode != 0:
            raise AssertionError(f"the old server exited with {old.process.returncode}")
        return new

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stderr=subprocess.PIPE, **kw)

        def cleanup() -> None:
            if process.poll() is None:
                process.kill()
            process.wait(30)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

        cast(SynchronousTestCase, self).addCleanup(cleanup)
        return process


class RestartTests(RestartMixin, SynchronousTestCase):
    """C{twistd nbd --takeover PATH} hands its clients to a new server."""

    def test_upgrade_while_nbdcopy_writes(self) -> None:
        """
        nbdcopy writes from a pipe; half way, a new server takes over (its
        listener and the copy's connections, after the requests in flight
        have finished), and the copy completes with every byte in place.

        A TLS-PSK client of the same server stays with the old one (OpenSSL's
        state cannot move): the old server keeps serving it after the
        handover, and exits only once it has disconnected.
        """
        from tests.tlsfiles import make_psk_file

        keys = self.workdir / "keys.psk"
        (user,) = make_psk_file(keys)
        tls = ("--tls", "on", "--tls-psk", str(keys))
        make_image(self.image, COPY_SIZE + MiB)
        data = _data(12, COPY_SIZE)
        old = self.start("old", extra=tls)
        tls_client = self.popen(
            [
                require_libnbd(),
                "-c",
                _LIBNBD_TLS_CLIENT,
                f"nbds://{user}@{LOOPBACK}:{old.port}/?tls-psk-file={keys}",
                str(COPY_SIZE),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert tls_client.stdin is not None and tls_client.stdout is not None
        self.assertEqual(tls_client.stdout.readline().strip(), b"ready")
        copy = self.popen(
            [require_tool("nbdcopy"), "--connections=2", "-", old.uri], stdin=subprocess.PIPE
        )
        assert copy.stdin is not None
        half = COPY_SIZE // 2
        # Returns once nbdcopy has taken all but a pipe's worth: it is copying.
        copy.stdin.write(data[:half])
        copy.stdin.flush()
        new = self.start("new", port=old.port, extra=tls)
        old.wait_for_log("handover done", timeout=RESTART_TIMEOUT)
        old.wait_for_log("stays: TLS")
        copy.stdin.write(data[half:])
        copy.stdin.close()
        self.assertEqual(copy.wait(COPY_TIMEOUT), 0, copy.stderr.read() if copy.stderr else "")
        self.assertGreaterEqual(new.log_text().lower().count("took over client"), 1)

        # The TLS client is still served by the old server.
        self.assertTrue(old.alive())
        tls_client.stdin.write(b"go\n")
        tls_client.stdin.close()
        self.assertEqual(tls_client.stdout.read().strip(), b"tls-ok")
        self.assertEqual(tls_client.wait(COPY_TIMEOUT), 0)
        wait_until(lambda: not old.alive(), RESTART_TIMEOUT, "the old server gone")
        self.assertEqual(old.process.returncode if old.process else None, 0)
        image = self.image.read_bytes()
        self.assertEqual(image[COPY_SIZE : COPY_SIZE + 6], b"tls-ok")
        self.assertEqual(
            hashlib.sha256(image[:COPY_SIZE]).hexdigest(), hashlib.sha256(data).hexdigest()
        )

    def test_upgrade_while_nbdcopy_reads(self) -> None:
        """
        nbdcopy reads into a pipe across a restart: the same bytes come out.
        (C{NBD_LONG=1} copies 384 MiB instead of 32.)
        """
        data = _data(13, COPY_SIZE)
        self.image.write_bytes(data)
        old = self.start("old")
        copy = self.popen(
            [require_tool("nbdcopy"), "--connections=4", old.uri, "-"], stdout=subprocess.PIPE
        )
        assert copy.stdout is not None
        half = COPY_SIZE // 2
        first = _read_exactly(copy.stdout, half)
        new = self.restart(old)
        rest = copy.stdout.read()
        self.assertEqual(copy.wait(COPY_TIMEOUT), 0, copy.stderr.read() if copy.stderr else "")
        new.wait_for_log("took over client")
        self.assertEqual(hashlib.sha256(first + rest).hexdigest(), hashlib.sha256(data).hexdigest())


class NegotiatedStateTests(RestartMixin, TestCase):
    """What clients negotiated survives a restart."""

    async def test_negotiated_state_survives(self) -> None:
        """
        Two clients move in one restart. A libnbd client that negotiated
        structured replies and the base:allocation meta context keeps
        writes and reads in flight while the server is replaced; afterwards
        its replies are still structured, BLOCK_STATUS answers for its
        context, and every block holds what was last written to it. Our own
        client negotiated extended headers (libnbd 1.14 cannot): its
        replies still come with extended headers, and BLOCK_STATUS with the
        context id it was given. The export is a RAM disk: its shared memory
        goes to the new server with the connections, data included.
        """
        from twisted.internet import reactor

        from twisted_nbd.client import connect

        self.serve = ["--memory", "32M"]
        old = self.start("old")
        client = self.popen(
            [require_libnbd(), "-c", _LIBNBD_CLIENT, old.uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert client.stdin is not None and client.stdout is not None
        self.assertEqual(client.stdout.readline().strip(), b"ready")
        ours = await connect(reactor, old.endpoint)
        self.assertTrue(ours.extended_headers)
        self.assertEqual(dict(ours.meta_contexts), {"base:allocation": 1})
        await ours.write(24 * MiB, b"ours" * 1024)

        new = self.restart(old)
        wait_until(
            lambda: new.log_text().lower().count("took over client") >= 2,
            RESTART_TIMEOUT,
            "both clients taken over",
        )
        self.assertEqual(await ours.read(24 * MiB, 4096), b"ours" * 1024)
        status = await ours.block_status(24 * MiB, MiB)
        self.assertEqual(list(status), ["base:allocation"])
        await ours.write(24 * MiB + 4096, b"more" * 1024)
        self.assertEqual(await ours.read(24 * MiB + 4096, 4096), b"more" * 1024)
        await ours.disconnect()

        client.stdin.write(b"stop\n")
        client.stdin.close()
        out = client.stdout.read().decode()
        errors = client.stderr.read() if client.stderr else b""
        self.assertEqual(client.wait(COPY_TIMEOUT), 0, errors)
        result = json.loads(out.strip().splitlines()[-1])
        self.assertTrue(result["structured"])
        self.assertTrue(result["meta"])
        self.assertGreater(result["rounds"], 0)
        self.assertEqual(result["mismatches"], [])
        self.assertEqual(result["contexts"], ["base:allocation"])


#: A TLS client that connects, waits for a line, writes and reads, and leaves.
_LIBNBD_TLS_CLIENT = r"""
import sys
import nbd

h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
offset = int(sys.argv[2])
h.pwrite(b"tls-ok", offset)
h.flush()
print(h.pread(6, offset).decode(), flush=True)
h.shutdown()
"""


#: Runs under the interpreter with libnbd: requests in flight until told to
#: stop on standard input, then checks (see test_negotiated_state_survives).
_LIBNBD_CLIENT = r"""
import json, select, sys
import nbd

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
BLOCK = 64 * 1024
BLOCKS = 256  # the first 16 MiB; the rest is the other client's
last = {}

def content(block, round_):
    return (block.to_bytes(8, "big") + round_.to_bytes(8, "big")) * (BLOCK // 16)

print("ready", flush=True)
rounds = 0
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        sys.stdin.readline()
        break
    cookies = []
    for k in range(16):
        block = (rounds * 16 + k) % BLOCKS
        last[block] = rounds
        data = nbd.Buffer.from_bytearray(bytearray(content(block, rounds)))
        cookies.append(h.aio_pwrite(data, block * BLOCK))
    buffers = []
    # The blocks the previous round wrote: a READ in flight beside a WRITE of
    # the same block may see either, so never read what is being written.
    for k in range(16 if rounds else 0):
        block = ((rounds - 1) * 16 + k) % BLOCKS
        buf = nbd.Buffer(BLOCK)
        buffers.append((block, buf))
        cookies.append(h.aio_pread(buf, block * BLOCK))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        h.aio_command_completed(cookie)  # raises if it failed
    for block, buf in buffers:
        if buf.to_bytearray() != content(block, rounds - 1):
            raise SystemExit(f"block {block} read back wrong in round {rounds}")
    rounds += 1
mismatches = []
for block, round_ in sorted(last.items()):
    if h.pread(BLOCK, block * BLOCK) != content(block, round_):
        mismatches.append(block)
contexts = []
h.block_status(h.get_size(), 0, lambda meta, offset, entries, err: contexts.append(meta) or 0)
result = {
    "structured": h.get_structured_replies_negotiated(),
    "meta": h.can_meta_context("base:allocation"),
    "rounds": rounds,
    "mismatches": mismatches,
    "contexts": sorted(set(contexts)),
}
h.shutdown()
print(json.dumps(result))
"""


class SocketActivationTests(SynchronousTestCase):
    """C{--listen systemd:domain=INET:index=0} under a LISTEN_FDS harness."""

    def test_listen_fds(self) -> None:
        """
        The server serves the listening socket it inherits as descriptor 3
        (LISTEN_FDS=1, LISTEN_FDNAMES, which Twisted insists on, and
        LISTEN_PID its own pid, as systemd sets them: a small wrapper sets
        LISTEN_PID and execs twistd), and --print-uri names its real address.
        The endpoint and the socket's name are those of the unit files in
        docs/examples, so they cannot rot.
        """
        workdir = make_tempdir(self)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind((LOOPBACK, 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        make_image(workdir / "disk.img", 4 * MiB, b"activated")
        examples = REPO_ROOT / "docs" / "examples"
        unit = (examples / "twisted-nbd.service").read_text()
        endpoint = re.search(r"--listen (\S+)", unit).group(1)  # type: ignore[union-attr]
        socket_unit = (examples / "twisted-nbd.socket").read_text()
        fd_name = re.search(r"^FileDescriptorName=(\S+)$", socket_unit, re.M).group(1)  # type: ignore[union-attr]
        wrapper = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES=sys.argv[2], "
            "LISTEN_PID=str(os.getpid())); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        twistd = _twistd_command()
        argv = [
            sys.executable,
            "-c",
            wrapper,
            str(listener.fileno()),
            fd_name,
            *twistd,
            "-n",
            "--pidfile=",
            f"--logfile={workdir / 'twistd.log'}",
            "nbd",
            "--image",
            str(workdir / "disk.img"),
            "--listen",
            endpoint,
            "--print-uri",
        ]
        server = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(listener.fileno(),),
        )

        def stop() -> None:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            server.wait(30)
            assert server.stdout is not None
            server.stdout.close()

        self.addCleanup(stop)
        listener.close()  # the server's copy is the one that counts now
        assert server.stdout is not None
        uri = server.stdout.readline().decode().strip()
        self.assertEqual(uri, f"nbd://{LOOPBACK}:{port}/")
        done = run_tool([require_tool("nbdinfo"), "--size", uri])
        self.assertEqual(int(done.stdout), 4 * MiB)
        head = run_libnbd(
            "import json, sys, nbd\n"
            "h = nbd.NBD()\n"
            "h.connect_uri(sys.argv[1])\n"
            "print(json.dumps(h.pread(9, 0).decode()))\n",
            uri,
        )
        self.assertEqual(head, "activated")


class CaptiveTests(SynchronousTestCase):
    """C{--run COMMAND}: serve while the command runs, exit with its status."""

    def captive(self, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [
            *_twistd_command(),
            "-n",
            "--pidfile=",
            f"--logfile={workdir / 'twistd.log'}",
            "nbd",
            *args,
        ]
        try:
            return subprocess.run(
                argv,
                cwd=workdir,
                env=_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COPY_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{argv} did not exit") from e

    def test_exit_status_and_variables(self) -> None:
        """
        The command sees $uri (nbd+unix on a private socket), $nbd,
        $unixsocket and $exportname, nbdinfo connects with $uri, and twistd
        exits with the command's status.
        """
        workdir = make_tempdir(self)
        require_tool("nbdinfo")
        done = self.captive(
            workdir,
            "--memory",
            "8M",
            "--name",
            "scratch",
            "--run",
            'echo "$uri|$nbd|$unixsocket|$exportname"; nbdinfo --size "$uri"; exit 7',
        )
        self.assertEqual(done.returncode, 7, done.stderr + (workdir / "twistd.log").read_text())
        line, size = done.stdout.strip().splitlines()[-2:]
        uri, nbd, unixsocket, name = line.split("|")
        self.assertEqual(uri, f"nbd+unix:///scratch?socket={unixsocket}")
        self.assertEqual(nbd, uri)
        self.assertEqual(name, "scratch")
        self.assertEqual(int(size), 8 * MiB)
        # The private directory goes with the server.
        self.assertFalse(os.path.exists(os.path.dirname(unixsocket)))

    def test_qemu_img_convert(self) -> None:
        """
        C{--run 'qemu-img convert -n ... "$uri"'} fills the export, and the
        server exits with status 0 once it is done.
        """
        workdir = make_tempdir(self)
        qemu_img = require_tool("qemu-img")
        data = random.Random(14).randbytes(8 * MiB)
        (workdir / "source.raw").write_bytes(data)
        make_image(workdir / "out.img", 8 * MiB)
        done = self.captive(
            workdir,
            "--image",
            "out.img",
            "--run",
            f'{qemu_img} convert -n -f raw -O raw source.raw "$uri"',
        )
        self.assertEqual(done.returncode, 0, done.stderr + (workdir / "twistd.log").read_text())
        self.assertEqual((workdir / "out.img").read_bytes(), data)

    def test_killed_by_signal(self) -> None:
        """A command killed by a signal makes the server die of it too (as nbdkit)."""
        workdir = make_tempdir(self)
        done = self.captive(workdir, "--memory", "1M", "--run", "kill -TERM $$")
        self.assertEqual(done.returncode, -signal.SIGTERM, done.stderr)
