#!/usr/bin/env python3
"""
Injected faults under load (issue 10, point 4), the long variant of
tests/interop/test_reliability.py FaultTests: the server with 1% EIO on
reads and writes (the error filter) and random delays up to 100 ms (the
delay filter); four libnbd handles with N 64 KiB reads and writes each in
flight. Every request must be answered with data or EIO, every handle
must stay usable; prints the counts and the server's peak RSS.

    PYTHONPATH=. python3 bench/faults.py --requests 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.interop.helpers import NBDServer, make_image, run_libnbd  # noqa: E402
from tests.interop.test_reliability import FAULT_SCRIPT  # noqa: E402
from tests.interop.test_robustness import RSSSampler  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per handle (4 handles)")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nbd-faults-"))
    image = make_image(workdir / "disk.img", 16 << 20)
    server = NBDServer(
        [
            "--image",
            str(image),
            "--filter",
            "error:rate=1%,ops=read+write",
            "--filter",
            "delay:delay=0,jitter=100ms",
        ],
        workdir,
    )
    server.start()
    sampler = RSSSampler(server)
    sampler.start()
    started = time.monotonic()
    try:
        out = run_libnbd(FAULT_SCRIPT, server.uri, str(options.requests), timeout=3600)
        alive = server.alive()
    finally:
        sampler.stop()
        server.stop()
        server.check_log()
    out["requests"] = 4 * options.requests
    out["seconds"] = round(time.monotonic() - started, 1)
    out["peak_rss_mib"] = round(sampler.peak_kib / 1024, 1)
    out["server_alive"] = alive
    print(json.dumps(out))
    answered = out["ok"] + out["eio"] == out["requests"]
    return 0 if answered and not out["other"] and out["alive"] == 4 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
