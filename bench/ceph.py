#!/usr/bin/env python3
"""
A throwaway single-node Ceph cluster by hand (the test suite's harness,
C{tests/interop/ceph.py}), for benchmarks and debugging.

    python3 bench/ceph.py up [--dir DIR] [--s3]
        start one, print how to reach it (shell variables), and keep it
        running until Ctrl-C or SIGTERM; then stop it (and remove DIR
        unless --dir was given)

    python3 bench/ceph.py bench [--size 64M] [--image-size 256M] [--json FILE]
        start one, then compare twisted-nbd's rbd backend (fio and nbdcopy
        through the server) with "rbd bench" and "rados bench" on the same
        cluster; see docs/backend-rbd.md

A benchmark, not a test: a busy machine gives meaningless figures (run it
on a quiet one; the exit status says only whether every run worked).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.interop.ceph import CephCluster  # noqa: E402
from tests.interop.helpers import NBDServer  # noqa: E402

MiB = 1024 * 1024
#: The workloads: name, fio rw / rbd bench pattern+type, block size, queue depth.
WORKLOADS = (
    ("seq-write-4M", "write", "seq", "4M", 16),
    ("seq-read-4M", "read", "seq", "4M", 16),
    ("rand-write-4K", "randwrite", "rand", "4K", 16),
    ("rand-read-4K", "randread", "rand", "4K", 16),
)
_UNITS = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB}


def up(args: argparse.Namespace) -> int:
    """Start a cluster, print its settings, wait for a signal, stop it."""
    root = Path(args.dir) if args.dir else None
    cluster = CephCluster(root, remove_root=root is None)
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    cluster.start()
    try:
        print(f"# up in {cluster.start_seconds:.1f} s; state in {cluster.root}")
        print(f"export CEPH_CONF={cluster.conf}")
        print(f"export CEPH_KEYRING={cluster.keyring}")
        print(f"# twistd -n nbd --backend rbd:conf={cluster.conf},image=NAME  (after: rbd create)")
        if args.s3:
            s3 = cluster.require_s3()
            print(f"S3_ENDPOINT={s3.endpoint}")
            print(f"AWS_ACCESS_KEY_ID={s3.access_key}")
            print(f"AWS_SECRET_ACCESS_KEY={s3.secret_key}")
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
    finally:
        cluster.stop()
    return 0


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64M")
    return int(match.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}[match.group(2)]


def _bytes(size: str) -> int:
    return _parse_size(size)


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command; its output (it must succeed)."""
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def rbd_bench(
    cluster: CephCluster, image: str, rw: str, pattern: str, bs: str, qd: int, total: int
) -> dict[str, float]:
    """C{rbd bench} (librbd directly, in one process): MiB/s and IOPS."""
    io_type = "read" if "read" in rw else "write"
    out = cluster.run(
        "rbd",
        "bench",
        "--io-type",
        io_type,
        "--io-size",
        str(_bytes(bs)),
        "--io-threads",
        str(qd),
        "--io-total",
        str(total),
        "--io-pattern",
        pattern,
        f"rbd/{image}",
        timeout=600,
    )
    match = re.search(
        r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)\s+bytes/sec:\s*([\d.]+)\s*(\w+)/s",
        out,
    )
    if match is None:
        raise RuntimeError(f"cannot read rbd bench's output: {out[-500:]}")
    per_second = float(match.group(4)) * _UNITS.get(match.group(5), 1)
    return {"mib_s": per_second / MiB, "iops": float(match.group(3))}


def rados_bench(cluster: CephCluster, seconds: int, qd: int) -> dict[str, dict[str, float]]:
    """C{rados bench} 4 MiB objects: write, then sequential read of them."""
    results = {}
    for mode in ("write", "seq"):
        argv = ["rados", "bench", "-p", "rbd", str(seconds), mode, "-t", str(qd)]
        if mode == "write":
            argv += ["-b", str(4 * MiB), "--no-cleanup"]
        out = cluster.run(*argv, timeout=600)
        bandwidth = re.search(r"Bandwidth \(MB/sec\):\s*([\d.]+)", out)
        iops = re.search(r"Average IOPS:\s*([\d.]+)", out)
        if bandwidth is None:
            raise RuntimeError(f"cannot read rados bench's output: {out[-500:]}")
        results["write-4M" if mode == "write" else "seq-read-4M"] = {
            "mib_s": float(bandwidth.group(1)),
            "iops": float(iops.group(1)) if iops else 0.0,
        }
    cluster.run("rados", "-p", "rbd", "cleanup", timeout=600)
    return results


def fio_nbd(
    uri: str, name: str, rw: str, bs: str, qd: int, total: int, out: Path
) -> dict[str, float]:
    """fio through the NBD server (libnbd engine, one connection): MiB/s and IOPS."""
    run(
        [
            "fio",
            f"--name={name}",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={qd}",
            f"--io_size={total}",
            "--output-format=json",
            f"--output={out}",
        ]
    )
    text = out.read_text()
    job = json.loads(text[text.index("{") :])["jobs"][0]
    section = job["read" if "read" in rw else "write"]
    return {"mib_s": section["bw_bytes"] / MiB, "iops": section["iops"]}


def bench(args: argparse.Namespace) -> int:
    """Start a cluster, run every benchmark, print a table (and JSON)."""
    for tool in ("fio", "nbdcopy", "rbd", "rados"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing", file=sys.stderr)
            return 2
    size, image_size = args.size, max(args.image_size, args.size)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0],
        "size": size,
        "image_size": image_size,
        "rbd_bench": {},
        "twisted_nbd_fio": {},
        "twisted_nbd_memory_fio": {},
    }
    # memstore's capacity (RAM is used only for what is written).
    capacity = max(3 * 1024 * MiB, 2 * image_size + 8 * 1024 * MiB)
    scratch = tempfile.TemporaryDirectory(prefix="nbd-rbd-bench-")
    with CephCluster(memstore_bytes=capacity) as cluster, scratch as tmp:
        workdir = Path(tmp)
        results["cluster_start_s"] = round(cluster.start_seconds, 2)
        for image in ("bench-rbd", "bench-nbd"):
            cluster.create_image(image, image_size)
        # Both images written in full first, so reads read data.
        cluster.run(
            "rbd",
            "bench",
            "--io-type",
            "write",
            "--io-size",
            str(4 * MiB),
            "--io-threads",
            "16",
            "--io-total",
            str(image_size),
            "rbd/bench-rbd",
        )
        server = NBDServer(
            ["--backend", f"rbd:image=bench-nbd,conf={cluster.conf},keyring={cluster.keyring}"],
            workdir,
        )
        server.start()
        try:
            run(["nbdcopy", "--connections=4", f"{server.uri}", "null:"])
            fill = workdir / "fill.raw"
            with open(fill, "wb") as f:
                for _ in range(image_size // (16 * MiB)):
                    f.write(os.urandom(16 * MiB))
            started = time.monotonic()
            run(["nbdcopy", "--connections=4", str(fill), server.uri])
            results["nbdcopy_in_mib_s"] = image_size / MiB / (time.monotonic() - started)
            started = time.monotonic()
            run(["nbdcopy", "--connections=4", server.uri, "null:"])
            results["nbdcopy_out_mib_s"] = image_size / MiB / (time.monotonic() - started)
            fill.unlink()
            for name, rw, pattern, bs, qd in WORKLOADS:
                total = size if bs == "4M" else max(size // 16, 4 * MiB)
                results["rbd_bench"][name] = rbd_bench(
                    cluster, "bench-rbd", rw, pattern, bs, qd, total
                )
                results["twisted_nbd_fio"][name] = fio_nbd(
                    server.uri, name, rw, bs, qd, total, workdir / f"{name}.json"
                )
        finally:
            server.stop()
        # The server's own ceiling on this machine: the same fio runs on a RAM disk.
        memory = NBDServer(["--memory", str(image_size)], workdir)
        memory.start()
        try:
            for name, rw, _, bs, qd in WORKLOADS:
                total = size if bs == "4M" else max(size // 16, 4 * MiB)
                results["twisted_nbd_memory_fio"][name] = fio_nbd(
                    memory.uri, name, rw, bs, qd, total, workdir / f"memory-{name}.json"
                )
        finally:
            memory.stop()
        # The memstore OSD keeps everything in RAM: make room for rados bench.
        for image in ("bench-rbd", "bench-nbd"):
            cluster.remove_image(image)
        results["rados_bench"] = rados_bench(cluster, args.seconds, 16)
    results["load_after"] = os.getloadavg()[0]
    print(
        f"rbd backend against the local Ceph ({results['cpus']} CPUs, load "
        f"{results['load_before']:.1f} before, {results['load_after']:.1f} after)"
    )
    print(
        "| workload | rbd bench MiB/s | IOPS | twisted-nbd rbd MiB/s | IOPS "
        "| twisted-nbd memory MiB/s | IOPS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, *_ in WORKLOADS:
        row = [results[k][name] for k in ("rbd_bench", "twisted_nbd_fio", "twisted_nbd_memory_fio")]
        print(
            f"| {name} | " + " | ".join(f"{r['mib_s']:.1f} | {r['iops']:.0f}" for r in row) + " |"
        )
    for name, figures in results["rados_bench"].items():
        print(f"rados bench {name}: {figures['mib_s']:.1f} MiB/s")
    print(
        f"nbdcopy into the served image: {results['nbdcopy_in_mib_s']:.1f} MiB/s, "
        f"out of it: {results['nbdcopy_out_mib_s']:.1f} MiB/s (4 connections)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a cluster and keep it running")
    p_up.add_argument("--dir", help="keep the cluster's state here (kept afterwards)")
    p_up.add_argument("--s3", action="store_true", help="start radosgw and an S3 user too")
    p_up.set_defaults(run=up)
    p_bench = sub.add_parser("bench", help="rbd backend against rbd bench and rados bench")
    p_bench.add_argument(
        "--size",
        type=_parse_size,
        default=64 * MiB,
        help="bytes per 4 MiB workload (1/16 of it for 4 KiB ones)",
    )
    p_bench.add_argument(
        "--image-size",
        type=_parse_size,
        default=256 * MiB,
        help="the images' size (nbdcopy copies all of it)",
    )
    p_bench.add_argument("--seconds", type=int, default=5, help="rados bench's duration")
    p_bench.add_argument("--json", help="write the figures here as JSON")
    p_bench.set_defaults(run=bench)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
