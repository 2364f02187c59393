#!/usr/bin/env python3
"""
Many durability trials (see tests/interop/durability.py): random writes,
some FUA, and FLUSHes over two connections; kill -9 of the whole server
with writes in flight; a simulated power loss that undoes every write the
server had not synced; a restart; every sector checked.

    PYTHONPATH=. python3 bench/durability.py --trials 200
    PYTHONPATH=. python3 bench/durability.py --trials 100 --workers 2

Prints one line per trial and the totals ("N trials, 0 bytes lost, ...");
exits 1 if a byte was lost or corrupted or a request failed.
With --drop-sync the server's syncs are no-ops: the trials must then fail
(a check that the check works).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.interop.durability import TrialResult, run_trials  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="run the server with --workers N")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--size", type=int, default=4 << 20, help="image size in bytes")
    parser.add_argument("--max-kill-delay", type=float, default=0.5)
    parser.add_argument("--drop-sync", action="store_true", help="make the server's syncs no-ops")
    parser.add_argument("--json", action="store_true", help="end with the totals as JSON")
    options = parser.parse_args(argv)

    def progress(number: int, result: TrialResult) -> None:
        print(
            f"trial {number + 1}: {result.writes} writes, {result.acked} acked, "
            f"{result.durable} durable, {result.in_flight_at_kill} in flight at the kill, "
            f"{result.undone} undone, {result.lost} bytes lost, {result.corrupt} corrupt"
            + (f" {result.errors[:3]}" if result.errors else ""),
            flush=True,
        )

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nbd-durability-") as workdir:
        totals = run_trials(
            options.trials,
            Path(workdir),
            workers=options.workers,
            seed=options.seed,
            size=options.size,
            max_kill_delay=options.max_kill_delay,
            drop_sync=options.drop_sync,
            progress=progress,
        )
    mode = f"--workers {options.workers}" if options.workers else "single process"
    print(f"{mode}: {totals.summary()} in {time.monotonic() - started:.0f} s")
    if options.json:
        print(json.dumps(totals.__dict__))
    return 1 if totals.lost or totals.corrupt or totals.errors else 0


if __name__ == "__main__":
    sys.exit(main())
