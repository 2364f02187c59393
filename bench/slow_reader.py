#!/usr/bin/env python3
"""
A slow reader (issue 10, point 5): a client pipelines 2000 READs of 1 MiB
and reads nothing, while another client's 4 KiB READs are timed. Prints
the server's peak RSS and the other client's latencies (before the slow
reader came, and while it stalls). The test (tests/interop/
test_robustness.py, SlowReaderTests) asserts the RSS bound and that the
other client is answered at all; latency depends on the machine, so it is
measured here, not asserted there. Run it on a quiet machine:

    PYTHONPATH=. python3 bench/slow_reader.py [--reads 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.interop.helpers import CMD_READ, NBDServer, RawClient, make_image  # noqa: E402
from tests.interop.test_robustness import (  # noqa: E402
    RSSSampler,
    _send_for_a_while,
    _wait_steady,
)

MiB = 1 << 20
GiB = 1 << 30


def latencies(port: int, count: int) -> dict[str, float]:
    """Time C{count} 4 KiB READs, one at a time, in milliseconds."""
    times = []
    with RawClient(port) as client:
        client.handshake()
        for i in range(count):
            started = time.perf_counter()
            client.read(GiB + (i % 256) * 4096, 4096)
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
        "max_ms": round(times[-1], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=500, help="4 KiB READs timed per phase")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nbd-slow-reader-"))
    image = make_image(workdir / "disk.img", 2 * GiB)
    server = NBDServer(["--image", str(image)], workdir)
    server.start()
    sampler = RSSSampler(server)
    sampler.start()
    try:
        before = latencies(server.port, options.reads)
        slow = RawClient(server.port, rcvbuf=4096)
        slow.handshake()
        requests = b"".join(
            slow.request(CMD_READ, (i % 2048) * MiB, MiB, cookie=i) for i in range(2000)
        )
        sent = _send_for_a_while(slow.sock, requests, seconds=5.0)
        _wait_steady(sampler, steady=1.0, timeout=20.0)
        during = latencies(server.port, options.reads)
        _wait_steady(sampler, steady=0.5, timeout=5.0)
        slow.close()
    finally:
        sampler.stop()
        server.stop()
    report = {
        "slow_reader_bytes_sent": sent,
        "peak_rss_mib": round(sampler.peak_kib / 1024, 1),
        "latency_4k_alone": before,
        "latency_4k_during_slow_reader": during,
    }
    print(json.dumps(report, indent=2))
    return 0 if sampler.peak_kib < 128 * 1024 and during["max_ms"] < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
