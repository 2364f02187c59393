#!/usr/bin/env python3
"""
Throughput of the remote backends, on 127.0.0.1, with nbdcopy:

  - http: an image served by twisted.web (tests/interop/webserver.py, a
    static File with TCP_NODELAY), read through C{twistd nbd --backend
    http:...}; beside it, the same reads straight from the web server with
    curl (one connection, the same range size), the ceiling of what the
    backend can pass on;
  - nbd: nbdkit's memory plugin, written and read through C{twistd nbd
    --backend nbd:...} (with 1 and with 4 connections); beside it, nbdcopy
    straight to nbdkit.

    python3 bench/remote.py --mib 256 --repeat 3

Each figure is the median of C{--repeat} runs, in MiB/s. It is a
benchmark, not a test: run it on a quiet machine. Requires nbdcopy,
nbdkit and curl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within 60 s")


class Processes:
    """Start helpers, and stop all of them at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], port: int, what: str) -> None:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        log = open(self.work / f"{what}.log", "ab")
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.started.append(process)
        wait_port(port, process, what)

    def nbd_server(self, backend: str) -> str:
        port = free_port()
        self.start(
            [sys.executable, "-m", "twisted", "nbd", "--backend", backend,
             "--listen", f"tcp:{port}:interface={LOOPBACK}"],
            port, "twistd-nbd",
        )  # fmt: skip
        # twistd listens only once the backend's blocking probe is done.
        return f"nbd://{LOOPBACK}:{port}"

    def stop(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.started.clear()


def timed(repeat: int, run: Callable[[], None]) -> float:
    """The median seconds of C{repeat} runs."""
    times = []
    for _ in range(repeat):
        started = time.monotonic()
        run()
        times.append(time.monotonic() - started)
    return statistics.median(times)


def check(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="image size in MiB (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument(
        "--range-kib", type=int, default=256, help="curl's range size (default 256)"
    )
    args = parser.parse_args()
    for tool in ("nbdcopy", "nbdkit", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")
    size = args.mib * MiB
    work = Path(tempfile.mkdtemp(prefix="nbd-bench-remote-"))
    processes = Processes(work)
    results: list[tuple[str, float]] = []

    def record(name: str, seconds: float) -> None:
        results.append((name, args.mib / seconds))
        print(f"{name:<48} {args.mib / seconds:8.1f} MiB/s  ({seconds:.2f} s)", flush=True)

    try:
        www = work / "www"
        www.mkdir()
        image = www / "disk.img"
        with open(image, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(MiB))
        out = work / "out.img"

        # http
        port = free_port()
        processes.start(
            [sys.executable, "-m", "tests.interop.webserver", str(port), str(www)], port, "web"
        )
        url = f"http://{LOOPBACK}:{port}/disk.img"
        step = args.range_kib * 1024
        config = work / "curl.cfg"
        config.write_text(
            "".join(
                f"url={url}\nrange={at}-{min(at + step, size) - 1}\noutput=/dev/null\n"
                for at in range(0, size, step)
            )
        )
        record(
            f"curl, {args.range_kib} KiB ranges, 1 connection",
            timed(args.repeat, lambda: check(["curl", "-sf", "-K", str(config)])),
        )
        for connections in (1, 8):
            uri = processes.nbd_server(f"http:url={url},connections={connections}")
            record(
                f"nbdcopy out of http backend, connections={connections}",
                timed(args.repeat, lambda uri=uri: check(["nbdcopy", uri, str(out)])),
            )
        processes.stop()

        # nbd
        port = free_port()
        processes.start(
            ["nbdkit", "-f", "-p", str(port), "-i", LOOPBACK, "memory", f"{args.mib}M"],
            port, "nbdkit",
        )  # fmt: skip
        direct = f"nbd://{LOOPBACK}:{port}"
        record(
            "nbdcopy into nbdkit, direct",
            timed(args.repeat, lambda: check(["nbdcopy", str(image), direct])),
        )
        record(
            "nbdcopy out of nbdkit, direct",
            timed(args.repeat, lambda: check(["nbdcopy", direct, str(out)])),
        )
        for connections in (1, 4):
            uri = processes.nbd_server(f"nbd:uri={direct},connections={connections}")
            record(
                f"nbdcopy into nbd proxy, connections={connections}",
                timed(args.repeat, lambda uri=uri: check(["nbdcopy", str(image), uri])),
            )
            record(
                f"nbdcopy out of nbd proxy, connections={connections}",
                timed(args.repeat, lambda uri=uri: check(["nbdcopy", uri, str(out)])),
            )
    finally:
        processes.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
