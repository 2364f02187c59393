"""
Helpers for the interoperability tests: start the real server as a
C{twistd -n nbd} process on 127.0.0.1, run external clients with timeouts,
and speak just enough raw NBD for the robustness tests.

Nothing here imports L{twisted_nbd}: the tests check the server from the
outside, the way a client sees it, so the raw client below is written from
the protocol digest rather than from the server's own codec.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence

from twisted.trial.unittest import SynchronousTestCase

__all__ = [
    "LOOPBACK",
    "NBDServer",
    "RawClient",
    "SYSTEM_PYTHON",
    "assert_file_content",
    "cpu_seconds",
    "first_difference",
    "in_ci",
    "make_image",
    "make_tempdir",
    "require_libnbd",
    "require_tool",
    "run_libnbd",
    "run_tool",
    "server_connections",
    "socket_fds",
    "start_server",
    "wait_until",
]

#: The only address these tests use.
LOOPBACK = "127.0.0.1"
#: The repository root: the server runs from here, and the plugin dropin in
#: C{./twisted/plugins} is found through C{PYTHONPATH}.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The interpreter that has Debian's libnbd binding (C{import nbd}); the
#: project's own interpreter does not.
SYSTEM_PYTHON = "/usr/bin/python3"

#: How long the server may take to start listening.
START_TIMEOUT = 30.0
#: How long it may take to exit after SIGTERM (then SIGKILL).
STOP_TIMEOUT = 15.0
#: The default timeout of one client run.
TOOL_TIMEOUT = 60.0
#: How many times to pick another port when the chosen one got taken.
PORT_ATTEMPTS = 5
#: Lines that must never appear in the server's log or output.
BAD_LOG_MARKERS = ("Traceback", "Unhandled error", "Unhandled Error")

# Wire constants (see the protocol digest, section 0).
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")


# ------------------------------------------------------------------ environment


def in_ci() -> bool:
    """Whether we run in CI, where a missing client is a failure, not a skip."""
    return os.environ.get("CI") == "true"


def _missing(what: str) -> NoReturn:
    if in_ci():
        raise AssertionError(f"{what} is missing, and CI=true requires it")
    raise unittest.SkipTest(f"{what} is not installed")


def require_tool(name: str) -> str:
    """
    The path of the external program C{name}.

    @raise unittest.SkipTest: it is missing (outside CI).
    @raise AssertionError: it is missing and C{CI=true}.
    """
    path = shutil.which(name)
    if path is None:
        _missing(f"the {name!r} program")
    return path


_libnbd_python: list[bool] = []


def require_libnbd() -> str:
    """
    The interpreter that can C{import nbd} (Debian's python3-libnbd).

    @raise unittest.SkipTest: there is none (outside CI).
    @raise AssertionError: there is none and C{CI=true}.
    """
    if not _libnbd_python:
        ok = os.access(SYSTEM_PYTHON, os.X_OK)
        if ok:
            try:
                done = subprocess.run(
                    [SYSTEM_PYTHON, "-c", "import nbd"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                ok = False
            else:
                ok = done.returncode == 0
        _libnbd_python.append(ok)
    if not _libnbd_python[0]:
        _missing(f"libnbd's Python binding for {SYSTEM_PYTHON} (python3-libnbd)")
    return SYSTEM_PYTHON


def make_tempdir(case: SynchronousTestCase) -> Path:
    """A fresh directory, removed when C{case} ends."""
    path = Path(tempfile.mkdtemp(prefix="nbd-interop-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def make_image(path: Path, size: int, data: bytes | None = None) -> Path:
    """Create a sparse image of C{size} bytes, starting with C{data} if given."""
    with open(path, "wb") as f:
        if data:
            f.write(data)
        f.truncate(size)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> float:
    """
    Poll C{condition} until it holds; how long that took.

    @raise AssertionError: it still does not hold after C{timeout} seconds.
    """
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


#: The TCP states of a socket the server has not closed yet (see
#: include/net/tcp_states.h): SYN_RECV, ESTABLISHED, CLOSE_WAIT.
_OPEN_STATES = {"01", "03", "08"}


def server_connections(port: int) -> int:
    """
    How many connections to local port C{port} the server side still holds
    open, from the kernel's table (C{/proc/net/tcp}): accepted or waiting
    to be, and not yet closed by the server. It counts every process, so it
    sees workers too.
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] in _OPEN_STATES:
                count += 1
    return count


def socket_fds(pid: int) -> int:
    """
    How many sockets process C{pid} holds open. Unlike L{server_connections}
    this sees a connection the client reset until the server closes it
    (the kernel's table forgets it at once).
    """
    count = 0
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(entry.path).startswith("socket:"):
                count += 1
        except FileNotFoundError:
            pass  # closed meanwhile
    return count


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system, every thread) process C{pid} has used."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name may hold spaces; the fields after it do not.
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# ------------------------------------------------------------------ running clients


def _describe(argv: Sequence[str], rc: object, out: str, err: str) -> str:
    return f"command {list(argv)!r} exited with {rc}\n--- stdout\n{out}\n--- stderr\n{err}"


def run_tool(
    argv: Sequence[str],
    *,
    timeout: float = TOOL_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """
    Run a client to completion and capture its output.

    @param check: fail unless it exits with status 0.
    @param env: the environment, if not ours.
    @raise AssertionError: it failed (with C{check}) or ran out of time.
    """
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else ""
        err = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else ""
        raise AssertionError(_describe(argv, f"a timeout after {timeout} s", out, err)) from e
    if check and done.returncode != 0:
        raise AssertionError(_describe(argv, done.returncode, done.stdout, done.stderr))
    return done


def run_libnbd(script: str, *args: str, timeout: float = TOOL_TIMEOUT) -> Any:
    """
    Run a Python script under the interpreter that has libnbd, with C{args}
    as C{sys.argv[1:]}; the script prints one JSON value as its last line.
    """
    python = require_libnbd()
    done = run_tool([python, "-c", script, *args], timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise AssertionError(_describe(["libnbd script", *args], 0, done.stdout, done.stderr))
    return json.loads(lines[-1])


# ------------------------------------------------------------------ the server


def _twistd_command() -> list[str]:
    """
    twistd from the interpreter running the tests. (C{python -m
    twisted.scripts.twistd} does nothing: that module has no main block.)
    """
    script = Path(sys.executable).parent / "twistd"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
    ]


class NBDServer:
    """
    One C{twistd -n nbd ...} process listening on 127.0.0.1.

    @ivar port: the port it listens on, once started.
    @ivar process: the C{Popen}, once started.
    """

    def __init__(
        self,
        args: Sequence[str],
        workdir: Path,
        command: Callable[[int], list[str]] | None = None,
        *,
        twistd_args: Sequence[str] = (),
        port: int | None = None,
        greets: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """
        @param args: the options after C{twistd -n nbd}.
        @param command: instead, the whole command line of another NBD
            server (nbdkit, qemu-nbd) for a given port.
        @param twistd_args: twistd's own options (before C{nbd}).
        @param port: listen on this port rather than on a free one.
        @param greets: whether a client from 127.0.0.1 gets the greeting
            (it does not when C{--allow} leaves it out); if not, the server
            is ready once its log says it listens.
        @param env: more environment variables for the server.
        """
        self.args = list(args)
        self.twistd_args = list(twistd_args)
        self._fixed_port = port
        self._greets = greets
        self._env = dict(env or {})
        self._command = command
        self.workdir = workdir
        self.log_path = workdir / "twistd.log"
        self.output_path = workdir / "twistd.out"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The C{nbd://} URI of the default export."""
        return f"nbd://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def endpoint(self) -> str:
        """The Twisted client endpoint string of the server."""
        return f"tcp:{LOOPBACK}:{self.port}"

    def command(self, port: int) -> list[str]:
        if self._command is not None:
            return self._command(port)
        return [
            *_twistd_command(),
            "-n",
            "--pidfile=",
            f"--logfile={self.log_path}",
            *self.twistd_args,
            "nbd",
            *self.args,
            "--listen",
            f"tcp:{port}:interface={LOOPBACK}",
        ]

    def start(self) -> None:
        """
        Start the server and wait until it answers with the NBD greeting.

        @raise AssertionError: it exited or did not answer in time.
        """
        env = {**os.environ, **self._env}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        for _ in range(PORT_ATTEMPTS):
            port = self._fixed_port or free_port()
            with open(self.output_path, "ab") as output:
                self.process = subprocess.Popen(
                    self.command(port),
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.port = port
            if self._wait_ready():
                return
        raise AssertionError(f"no free port after {PORT_ATTEMPTS} attempts\n{self.log_text()}")

    def _wait_ready(self) -> bool:
        """
        Poll until the port answers with the NBD greeting. C{False} if the
        server exited because the port was taken meanwhile.
        """
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = self.log_text()
                if "Address already in use" in text or "CannotListenError" in text:
                    return False
                raise AssertionError(
                    f"the server exited with {self.process.returncode} while starting:\n{text}"
                )
            if not self._greets:
                if f"starting on {self.port}" in self.log_text():
                    return True
                time.sleep(0.05)
                continue
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=2) as s:
                    greeting = _recv_exactly(s, _GREETING.size)
            except (OSError, ConnectionError):
                time.sleep(0.05)
                continue
            magic, opt_magic, _ = _GREETING.unpack(greeting)
            if magic != NBDMAGIC or opt_magic != IHAVEOPT:
                raise AssertionError(f"port {self.port} does not greet like NBD: {greeting!r}")
            return True
        self.stop()
        raise AssertionError(
            f"the server did not listen within {START_TIMEOUT} s\n{self.log_text()}"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go; the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        return process.returncode

    def kill9(self) -> None:
        """Kill the server at once, with no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(STOP_TIMEOUT)

    def rss_kib(self) -> int:
        """The server's resident set size in KiB, from C{/proc/PID/status}."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError(f"no VmRSS for process {self.pid}")

    def log_text(self) -> str:
        """The log (with any rotated parts) and the process's own output."""
        parts = []
        logs = sorted(self.workdir.glob("twistd.log.*"), reverse=True)
        for path in [*logs, self.log_path, self.output_path]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text('utf-8', 'replace')}")
        return "\n".join(parts)

    def wait_for_log(self, *words: str, timeout: float = 15.0) -> str:
        """
        Poll the log until one line contains all of C{words} (ignoring
        case); that line.

        @raise AssertionError: no such line within C{timeout} seconds.
        """
        wanted = [w.lower() for w in words]
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if all(w in line.lower() for w in wanted):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {words!r}:\n{self.log_text()}")
            time.sleep(0.05)

    def check_log(self) -> None:
        """
        @raise AssertionError: the log shows a traceback or an unhandled
            error.
        """
        text = self.log_text()
        for marker in BAD_LOG_MARKERS:
            if marker in text:
                raise AssertionError(f"the server log contains {marker!r}:\n{text}")

    def finish(self) -> None:
        """Stop, show the log (pytest shows it for failed tests), check it."""
        self.stop()
        if "pytest" in sys.modules:
            print(f"=== twistd log (port {self.port})\n{self.log_text()}")
        self.check_log()


def start_server(
    case: SynchronousTestCase, *args: str, workdir: Path | None = None, **options: Any
) -> NBDServer:
    """
    Start C{twistd -n nbd ARGS --listen tcp:PORT:interface=127.0.0.1} for
    C{case}; it is stopped, and its log checked, when the test ends.

    @param options: passed on to L{NBDServer}.
    """
    server = NBDServer(args, workdir if workdir is not None else make_tempdir(case), **options)
    case.addCleanup(server.finish)
    server.start()
    return server


# ------------------------------------------------------------------ a raw client


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks: list[bytes] = []
    while count:
        chunk = sock.recv(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


class RawClient:
    """
    A blocking NBD client with just the handshake and simple replies, for
    sending what well-behaved clients never send.
    """

    def __init__(
        self,
        port: int,
        *,
        rcvbuf: int | None = None,
        timeout: float = 15.0,
        source: str | None = None,
    ) -> None:
        """
        @param source: connect from this local address (any of 127.0.0.0/8
            works on Linux's loopback).
        """
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the window is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((LOOPBACK, port))
        self.size = 0
        self.tx_flags = 0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Vanish: close with a TCP reset, as a crashed client's host would answer."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def recv_exactly(self, count: int) -> bytes:
        return _recv_exactly(self.sock, count)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def greeting(self) -> int:
        """Read the newstyle greeting; the server's handshake flags."""
        magic, opt_magic, flags = _GREETING.unpack(self.recv_exactly(_GREETING.size))
        assert magic == NBDMAGIC and opt_magic == IHAVEOPT, (magic, opt_magic)
        assert flags & FLAG_FIXED_NEWSTYLE, f"handshake flags {flags:#x}"
        return int(flags)

    def option(self, option: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        """Send an option request."""
        self.send(_OPTION.pack(magic, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """Read one option reply: C{(option, reply type, data)}."""
        magic, option, reply, length = _OPTION_REPLY.unpack(self.recv_exactly(_OPTION_REPLY.size))
        assert magic == OPTION_REPLY_MAGIC, f"option reply magic {magic:#x}"
        return int(option), int(reply), self.recv_exactly(length)

    def go(self, name: str = "") -> tuple[int, int]:
        """NBD_OPT_GO for C{name}; the export's size and transmission flags."""
        raw = name.encode("utf-8")
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        self.option(OPT_GO, data)
        size = flags = None
        for _ in range(64):
            option, reply, payload = self.option_reply()
            assert option == OPT_GO, f"reply to option {option}"
            if reply & 0x80000000:
                raise AssertionError(f"NBD_OPT_GO failed with {reply:#x}: {payload!r}")
            if reply == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                size, flags = struct.unpack(">QH", payload[2:])
            if reply == REP_ACK:
                break
        else:
            raise AssertionError("no ACK to NBD_OPT_GO")
        assert size is not None and flags is not None, "no NBD_INFO_EXPORT before the ACK"
        self.size, self.tx_flags = size, flags
        return size, flags

    def handshake(self, name: str = "") -> tuple[int, int]:
        """Greeting, client flags (fixed newstyle, no zeroes if offered), GO."""
        flags = self.greeting()
        self.send(struct.pack(">I", flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)))
        return self.go(name)

    @staticmethod
    def request(
        command: int, offset: int = 0, length: int = 0, *, cookie: int = 1, flags: int = 0
    ) -> bytes:
        """A compact request header (without any payload)."""
        return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)

    def simple_reply(self) -> tuple[int, int]:
        """Read a simple reply header: C{(error, cookie)}."""
        magic, error, cookie = _SIMPLE_REPLY.unpack(self.recv_exactly(_SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC, f"reply magic {magic:#x}"
        return int(error), int(cookie)

    def read(self, offset: int, length: int, cookie: int = 7) -> bytes:
        """A READ answered with a simple reply; its data."""
        self.send(self.request(CMD_READ, offset, length, cookie=cookie))
        error, got = self.simple_reply()
        assert (error, got) == (0, cookie), (error, got)
        return self.recv_exactly(length)

    def disconnect(self) -> None:
        self.send(self.request(CMD_DISC))

    def wait_closed(self, timeout: float = 15.0) -> bool:
        """
        Read and drop whatever arrives until the server closes the
        connection (C{True}) or C{timeout} seconds pass (C{False}).
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False


# ------------------------------------------------------------------ comparing data


def first_difference(a: bytes, b: bytes) -> int | None:
    """The first offset where C{a} and C{b} differ (or where one ends), or C{None}."""
    if a == b:
        return None
    view_a, view_b = memoryview(a), memoryview(b)
    step = 1 << 16
    for start in range(0, min(len(a), len(b)), step):
        if view_a[start : start + step] != view_b[start : start + step]:
            for offset in range(start, min(start + step, len(a), len(b))):
                if a[offset] != b[offset]:
                    return offset
    return min(len(a), len(b))


def assert_file_content(path: Path, expected: bytes) -> None:
    """
    @raise AssertionError: the file at C{path} does not hold exactly
        C{expected}; the message gives the first differing offset.
    """
    actual = path.read_bytes()
    offset = first_difference(actual, expected)
    if offset is not None:
        raise AssertionError(
            f"{path} ({len(actual)} bytes) differs from the expected {len(expected)} bytes "
            f"first at offset {offset}: {actual[offset : offset + 16]!r} != "
            f"{expected[offset : offset + 16]!r}"
        )
