#!/usr/bin/env python3
"""
Coverage-guided fuzzing of the sans-I/O server and client connections (and
the Twisted server protocol) with atheris (libFuzzer for Python): the
targets of C{tests/fuzz_targets.py} (every phase: greeting, option
haggling, after STARTTLS, transmission with simple, structured and
extended replies; the allowed outcomes are written there). The inputs
start from the seeds of C{fuzz_targets.seed_inputs()} and the corpus in
C{tests/fuzz_corpus/}; new coverage found is kept in C{--corpus-out} (a
temporary directory unless given). To keep what a long run found for the
suite to replay, pack that directory (best minimised first with libFuzzer's
C{-merge=1}, which needs a script libFuzzer can run by its path):

    python3 bench/fuzz.py --pack CORPUS_OUT

    nice -n 19 python3 bench/fuzz.py --seconds 600 [--target all|server|client|protocol]
                                     [--corpus-out DIR] [--runs N]

A crash (an exception other than a protocol violation, or a broken
contract) stops the run, prints the traceback and writes the input to
C{crash-*} in the current directory: add it to C{tests/fuzz_corpus/} with
the fix, so the suite replays it. Needs C{pip install atheris}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import atheris  # noqa: E402

with atheris.instrument_imports(include=["twisted_nbd", "tests.fuzz_targets"]):
    from tests import fuzz_targets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="how long to run")
    parser.add_argument("--runs", type=int, default=0, help="stop after this many inputs")
    parser.add_argument("--target", choices=["all", "server", "client", "protocol"], default="all")
    parser.add_argument("--corpus-out", help="where new inputs go (a temporary directory)")
    parser.add_argument(
        "--pack",
        metavar="DIR",
        help="pack the corpus in DIR (minimise it first with -merge=1) into "
        "tests/fuzz_corpus/coverage.gz, which the suite replays, and exit",
    )
    args, rest = parser.parse_known_args()
    if args.pack:
        print(f"fuzz.py: packed {fuzz_targets.pack_corpus(args.pack)} inputs")
        return
    target = fuzz_targets.fuzz_any if args.target == "all" else fuzz_targets.TARGETS[args.target]
    corpus_out = args.corpus_out or tempfile.mkdtemp(prefix="nbd-fuzz-")
    os.makedirs(corpus_out, exist_ok=True)
    seeds = fuzz_targets.seed_inputs() + fuzz_targets.corpus_inputs()
    for index, seed in enumerate(seeds):
        with open(os.path.join(corpus_out, f"seed-{index:04d}"), "wb") as f:
            f.write(seed)
    print(f"fuzz.py: target {args.target}, new inputs go to {corpus_out}", flush=True)
    libfuzzer = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        "-max_len=4096",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        *([f"-runs={args.runs}"] if args.runs else []),
        *rest,
        corpus_out,
    ]
    # libFuzzer prints the number of inputs run at the end
    # (stat::number_of_executed_units).
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
