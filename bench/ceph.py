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
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.interop.ceph import CephCluster  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a cluster and keep it running")
    p_up.add_argument("--dir", help="keep the cluster's state here (kept afterwards)")
    p_up.add_argument("--s3", action="store_true", help="start radosgw and an S3 user too")
    p_up.set_defaults(run=up)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
