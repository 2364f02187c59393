#!/usr/bin/env python3
"""
Connection hygiene (issue 10, point 6): many connect/handshake/I-O/
disconnect cycles, then what is left, counted before and after.

    PYTHONPATH=. python3 bench/hygiene.py --cycles 10000

Two parts:

  - in process (the server's factory on loopback TCP in this process, as
    tests/test_reliability.py does with 1000): file descriptors, threads,
    delayed calls, open and negotiating connections, Deferreds, protocol
    objects, resident memory;
  - against the real server (twistd nbd --image, a separate process):
    its file descriptors, threads and resident memory (from /proc).

Exits 1 if anything but memory and the server's threads differs, memory
grew by 8 MiB or more, or the server has more threads than its thread pool
allows (the pool starts threads as work comes, up to 10, and keeps them).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.logger import ILogObserver, Logger  # noqa: E402

from tests.interop.helpers import NBDServer, make_image  # noqa: E402
from tests.test_reliability import run_cycles  # noqa: E402
from twisted_nbd.protocol import NBDServerProtocol  # noqa: E402

GREETING = 18
OPT_GO = 7


def in_process(cycles: int) -> tuple[dict[str, int], dict[str, int]]:
    # Before logging begins Twisted buffers events (and the protocols they
    # name); send the server's lines nowhere, as the test does.
    nowhere = cast(ILogObserver, lambda event: None)
    NBDServerProtocol.log = Logger(observer=nowhere)  # type: ignore[misc]
    results: list[tuple[dict[str, int], dict[str, int]]] = []

    async def main(reactor: Any) -> None:
        results.append(await run_cycles(reactor, cycles))

    try:
        react(lambda reactor: ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    return results[0]


def process_state(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "threads": int(fields["Threads"]),
        "rss_kib": int(fields["VmRSS"].split()[0]),
    }


def one_cycle(port: int, index: int) -> None:
    """Handshake, a 4 KiB WRITE, a READ of it checked, DISC; wait for the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        payload = struct.pack(">Q", index) * 512
        offset = 4096 * (index % 1024)
        request = struct.Struct(">IHHQQI")
        s.sendall(
            struct.pack(">I", 3)
            + struct.pack(">QII", 0x49484156454F5054, OPT_GO, 6)
            + struct.pack(">IH", 0, 0)
            + request.pack(0x25609513, 0, 1, 1, offset, 4096)
            + payload
        )
        # The READ only once the WRITE is answered: NBD does not order
        # requests in flight together.
        written = struct.pack(">IIQ", 0x67446698, 0, 1)
        data = bytearray()
        while not data.endswith(written):
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"cycle {index}: closed before the WRITE was answered")
            data += chunk
        s.sendall(
            request.pack(0x25609513, 0, 0, 2, offset, 4096)
            + request.pack(0x25609513, 0, 2, 3, 0, 0)
        )
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
        if not data.endswith(payload):
            raise AssertionError(f"cycle {index}: the READ did not return the WRITE's data")


def against_server(cycles: int) -> tuple[dict[str, int], dict[str, int]]:
    workdir = Path(tempfile.mkdtemp(prefix="nbd-hygiene-"))
    image = make_image(workdir / "disk.img", 4 << 20)
    server = NBDServer(["--image", str(image)], workdir)
    server.start()
    try:
        for index in range(200):  # warm-up: thread pool, caches
            one_cycle(server.port, index)
        time.sleep(0.5)
        before = process_state(server.pid)
        for index in range(cycles):
            one_cycle(server.port, index)
        time.sleep(0.5)  # let the last closes be processed
        after = process_state(server.pid)
    finally:
        server.stop()
        server.check_log()
    return before, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10000)
    parser.add_argument("--only", choices=("server", "in-process"), help="run one part")
    options = parser.parse_args()
    failed = False
    report = {}
    parts = (("server process", against_server), ("in process", in_process))
    for name, run in parts:
        if options.only and not name.startswith(options.only.replace("-", " ")):
            continue
        started = time.monotonic()
        before, after = run(options.cycles)
        took = time.monotonic() - started
        report[name] = {"before": before, "after": after, "seconds": round(took, 1)}
        print(f"{name}: {options.cycles} cycles in {took:.1f} s")
        for key in before:
            print(f"  {key}: {before[key]} -> {after[key]}")
            grew = after[key] - before[key]
            if key == "rss_kib":
                failed = failed or grew >= 8 * 1024
            elif key == "threads" and name == "server process":
                # The reactor's thread pool starts threads as work comes and
                # keeps them; it stops at its maximum (10), so that is the bound.
                failed = failed or after[key] > max(before[key], 12)
            else:
                failed = failed or bool(grew)
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
