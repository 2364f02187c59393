#!/usr/bin/env python3
"""
Throughput of the C{s3} backend against a throwaway local Ceph (issue 11):
twisted-nbd serving an image from radosgw, driven by nbdcopy, beside
C{rados bench} on the same cluster (the ceiling: RADOS objects written and
read straight from the OSD, no HTTP, no NBD).

    python3 bench/s3.py [--size 1G] [--seconds 10] [--json FILE] [--markdown]
    python3 bench/s3.py --smoke      # 64 MiB, 3 s: checks that it runs

What is measured (MB/s = 10^6 bytes per second, wall clock):

  - rados bench write / seq: 4 MiB objects, 16 in flight, C{--seconds}
    each, in a pool of its own;
  - S3 PUT/GET 4M: SIZE in 4 MiB objects straight to radosgw with
    botocore's client, 16 threads (HTTP and the gateway, no NBD);
  - nbd write 4M: nbdcopy uploads SIZE of random data to the server with
    4 MiB requests (whole objects: one PUT each), then FLUSH;
  - nbd read 4M: nbdcopy downloads it again (ranged GETs of whole objects);
  - nbd write 256K: nbdcopy's default 256 KiB requests, each a
    read-modify-write of its 4 MiB object (the worst case, for contrast).

The cluster comes from tests/interop/ceph.py (memstore OSD: data in RAM),
started here and removed at the end. On a busy machine the figures say
little; the lead re-runs this on a quiet one. A benchmark, not a test: the
exit status says whether every run worked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.interop.ceph import CephCluster  # noqa: E402
from tests.interop.helpers import NBDServer  # noqa: E402

MiB = 1024 * 1024
BUCKET = "bench"


def rados_bench(cluster: CephCluster, seconds: int) -> dict[str, float]:
    """C{rados bench} write then seq in a pool of its own: MB/s of each."""
    cluster.run("ceph", "osd", "pool", "create", "bench", "8", "8")
    results: dict[str, float] = {}
    for mode, extra in (("write", ["-b", str(4 * MiB), "--no-cleanup"]), ("seq", [])):
        out = cluster.run(
            "rados",
            "-p",
            "bench",
            "bench",
            str(seconds),
            mode,
            "-t",
            "16",
            *extra,
            timeout=seconds * 4 + 60,
        )
        match = re.search(r"Bandwidth \(MB/sec\):\s*([0-9.]+)", out)
        if match is None:
            raise RuntimeError(f"rados bench {mode}: no bandwidth in\n{out}")
        # rados bench's "MB" are MiB: convert to 10^6 bytes like the rest.
        results[f"rados bench {mode}"] = float(match.group(1)) * MiB / 1e6
    cluster.run("rados", "-p", "bench", "cleanup", check=False)
    return results


def direct_bench(cluster: CephCluster, size: int) -> dict[str, float]:
    """
    PUT then GET SIZE of 4 MiB objects straight to radosgw with botocore's
    own client, 16 threads: the S3 gateway's ceiling over HTTP, no NBD.
    """
    from concurrent.futures import ThreadPoolExecutor

    import botocore.session  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    s3 = cluster.require_s3()
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )
    client.create_bucket(Bucket="direct")
    data = os.urandom(4 * MiB)
    count = size // (4 * MiB)
    results: dict[str, float] = {}
    with ThreadPoolExecutor(16) as pool:
        started = time.monotonic()
        list(
            pool.map(
                lambda i: client.put_object(Bucket="direct", Key=str(i), Body=data), range(count)
            )
        )
        results["S3 PUT 4M (botocore)"] = size / (time.monotonic() - started) / 1e6
        started = time.monotonic()
        list(
            pool.map(
                lambda i: client.get_object(Bucket="direct", Key=str(i))["Body"].read(),
                range(count),
            )
        )
        results["S3 GET 4M (botocore)"] = size / (time.monotonic() - started) / 1e6
    return results


def nbdcopy(args: list[str], size: int) -> float:
    """Run nbdcopy; MB/s for C{size} bytes."""
    started = time.monotonic()
    subprocess.run(["nbdcopy", *args], check=True, timeout=3600)
    return size / (time.monotonic() - started) / 1e6


def nbd_bench(cluster: CephCluster, size: int, workdir: Path) -> dict[str, float]:
    s3 = cluster.require_s3()
    image = workdir / "random.img"
    with open(image, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    results: dict[str, float] = {}
    for name, prefix, request in (("4M", "big/", 4 * MiB), ("256K", "small/", 256 * 1024)):
        backend = ",".join(
            [
                f"s3:endpoint={s3.endpoint}",
                f"bucket={BUCKET}",
                f"prefix={prefix}",
                f"access-key={s3.access_key}",
                f"secret-key={s3.secret_key}",
                f"size={size}",
                "create=true",
            ]
        )
        logs = workdir / name
        logs.mkdir()
        server = NBDServer(["--backend", backend], logs)
        server.start()
        try:
            copy = [f"--request-size={request}", "--requests=16"]
            results[f"nbd write {name}"] = nbdcopy([*copy, "--flush", str(image), server.uri], size)
            if name == "4M":
                results[f"nbd read {name}"] = nbdcopy([*copy, server.uri, "null:"], size)
        finally:
            server.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=int, default=1024, help="MiB copied by nbdcopy (default 1024)"
    )
    parser.add_argument("--seconds", type=int, default=10, help="seconds of each rados bench run")
    parser.add_argument("--smoke", action="store_true", help="64 MiB and 3 s: only check it runs")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    size = (64 if args.smoke else args.size) * MiB
    seconds = 3 if args.smoke else args.seconds
    results: dict[str, Any] = {"size_bytes": size, "rados_seconds": seconds}
    # The memstore OSD keeps everything in RAM and stops (rados bench hangs)
    # once full: room for rados bench's objects (up to ~1 GiB/s for its
    # seconds) and three copies of the image (direct, through the server).
    capacity = max(3 * 1024 * MiB, seconds * 1024 * MiB + 3 * size + 2 * 1024 * MiB)
    scratch = tempfile.TemporaryDirectory(prefix="nbd-s3-bench-")
    with scratch as tmp, CephCluster(memstore_bytes=capacity) as cluster:
        figures = rados_bench(cluster, seconds)
        figures.update(direct_bench(cluster, size))
        figures.update(nbd_bench(cluster, size, Path(tmp)))
    results["mb_per_s"] = figures
    rows = [(name, f"{value:.1f}") for name, value in figures.items()]
    width = max(len(name) for name, _ in rows)
    if args.markdown:
        print("| run | MB/s |\n|---|---:|")
        for name, value in rows:
            print(f"| {name} | {value} |")
    else:
        for name, value in rows:
            print(f"{name:<{width}}  {value:>8} MB/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
