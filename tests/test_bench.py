"""
The benchmarks still work: a bench/run.py --smoke run against twisted-nbd
and a few peers writes JSON of the expected shape and a PNG chart, and a
bench/tls.py --smoke run measures every TLS server on every workload.

Only the structure is checked, never a number: the test suite must not
depend on how fast the machine is. Like the interop tests, a missing tool
is a skip on a developer's machine and a failure in CI (CI=true).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.helpers import in_ci, make_tempdir, require_tool

pytestmark = pytest.mark.interop

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench" / "run.py"
TLS_BENCH = REPO_ROOT / "bench" / "tls.py"
#: A --smoke run takes about 20 to 30 s; this only bounds a hang.
SMOKE_TIMEOUT = 240.0
#: What --smoke runs (see SMOKE_SERVERS and SMOKE_WORKLOADS in bench/run.py).
FILE_SERVERS = ["twisted-nbd", "nbdkit-file", "nbd-server"]
RAM_SERVERS = ["twisted-nbd", "nbdkit-memory"]
WORKLOADS = ["rand-rw-64K-qd16", "rand-read-4K-qd1"]
#: What bench/tls.py --smoke runs (ALL_SERVERS and WORKLOAD_NAMES in bench/tls.py).
TLS_SERVERS = ["twisted-nbd", "qemu-nbd", "nbdkit", "twisted-nbd-plaintext"]
TLS_WORKLOADS = ["seq-read-1M-qd8", "seq-write-1M-qd8", "rand-read-4K-qd32"]
#: A bench/tls.py --smoke run takes about 30 s; this only bounds a hang.
TLS_SMOKE_TIMEOUT = 180.0


def require_matplotlib() -> None:
    """
    Skip (fail in CI) unless this interpreter can import matplotlib (the test extra has it).
    """
    done = subprocess.run(
        [sys.executable, "-c", "import matplotlib"], capture_output=True, timeout=60, check=False
    )
    if done.returncode != 0:
        if in_ci():
            raise AssertionError("matplotlib is missing, and CI=true requires it")
        raise unittest.SkipTest("matplotlib is not installed (pip install -e '.[bench]')")


def require_user_namespace() -> None:
    """
    As root, bench/tls.py runs fio under C{unshare --user} (so that libnbd
    reads the CA from C{$HOME}): skip (fail in CI) if that cannot work here.
    """
    if os.geteuid() != 0:
        return
    require_tool("unshare")
    done = subprocess.run(
        ["unshare", "--user", "--", "true"], capture_output=True, timeout=60, check=False
    )
    if done.returncode != 0:
        if in_ci():
            raise AssertionError("'unshare --user' fails, and CI=true requires it (as root)")
        raise unittest.SkipTest(
            "'unshare --user' fails here (a container without user namespaces?)"
        )


class BenchSmokeTests(SynchronousTestCase):
    """
    C{bench/run.py --smoke}: every section runs and reports, nothing is timed.

    One test runs the benchmark once (about half a minute) and checks the
    result part by part with the C{check_*} methods.
    """

    def test_smoke(self) -> None:
        """
        The smoke run succeeds, and its JSON and chart have everything.
        """
        self.run_smoke()
        self.check_chart()
        self.check_document()
        self.check_fio()
        self.check_fills()
        self.check_nbdcopy()
        self.check_workers()
        self.check_rss_and_targets()

    def run_smoke(self) -> None:
        """
        Run C{bench/run.py --smoke} into a temporary directory and read its JSON.
        """
        for tool in ("fio", "nbdcopy", "nbdinfo", "nbdkit", "nbd-server"):
            require_tool(tool)
        require_matplotlib()
        self.dir = make_tempdir(self)
        self.json = self.dir / "smoke.json"
        self.png = self.dir / "smoke.png"
        argv = [
            sys.executable,
            str(BENCH),
            "--smoke",
            "--json",
            str(self.json),
            "--chart",
            str(self.png),
            "--workdir",
            str(self.dir),
        ]
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SMOKE_TIMEOUT,
            cwd=REPO_ROOT,
            check=False,
        )
        self.output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, f"bench/run.py --smoke failed:\n{self.output}")
        self.document: dict[str, Any] = json.loads(self.json.read_text())

    def check_chart(self) -> None:
        """
        A PNG chart is drawn where --chart says.
        """
        self.assertTrue(self.png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"))

    def check_document(self) -> None:
        """
        The JSON says what ran, on what, and holds every section.
        """
        document = self.document
        for key in ("date", "machine", "versions", "config", "summary", "results"):
            self.assertIn(key, document)
        for key in ("nbdcopy", "fills", "workers", "rss", "targets", "notes"):
            self.assertIn(key, document)
        config = document["config"]
        self.assertEqual(config["families"], {"file": FILE_SERVERS, "ram": RAM_SERVERS})
        self.assertEqual([w["name"] for w in config["workloads"]], WORKLOADS)
        self.assertEqual(config["sections"], ["fio", "nbdcopy", "workers"])
        self.assertEqual(config["repeat"], 1)
        self.assertIn("twisted-nbd", document["versions"])

    def check_fio(self) -> None:
        """
        Every workload ran against every server of both families, with its medians and ratios.
        """
        results = [r for r in self.document["results"] if r["section"] == "fio"]
        for family, servers in (("file", FILE_SERVERS), ("ram", RAM_SERVERS)):
            runs = {(r["workload"], r["server"]) for r in results if r["family"] == family}
            self.assertEqual(runs, {(w, s) for w in WORKLOADS for s in servers})
            rows = self.document["summary"][family]
            self.assertEqual([row["workload"] for row in rows], WORKLOADS)
            for row in rows:
                self.assertEqual(sorted(row["servers"]), sorted(servers))
                for numbers in row["servers"].values():
                    for key in ("mib_s", "iops", "clat_p99_us", "peak_rss_bytes"):
                        self.assertIn(key, numbers)
                peers = {f"twisted-nbd/{s}" for s in servers if s != "twisted-nbd"}
                self.assertEqual(set(row["ratios"]), peers)
        self.assertTrue(all(r["ok"] for r in results), results)

    def check_fills(self) -> None:
        """
        Each RAM disk was filled with nbdcopy before its runs.
        """
        fills = self.document["fills"]
        self.assertEqual(sorted(f["server"] for f in fills), sorted(RAM_SERVERS))

    def check_nbdcopy(self) -> None:
        """
        The image was copied each way with 1 and 4 connections, for every file server.
        """
        copies = self.document["nbdcopy"]["results"]
        expected = {
            (s, d, c) for s in FILE_SERVERS for d in ("from_server", "to_server") for c in (1, 4)
        }
        done = {(c["server"], c["direction"], c["connections"]) for c in copies}
        self.assertEqual(done, expected)
        self.assertEqual(len(self.document["nbdcopy"]["summary"]), 4)

    def check_workers(self) -> None:
        """
        The workers section ran, or says why not (twistd nbd without --workers).
        """
        workers = self.document["workers"]
        if workers["supported"]:
            self.assertIsNone(workers["skipped"])
            self.assertEqual(len(workers["summary"]), 4)
            self.assertEqual({c["workers"] for c in workers["copies"]}, {1})
        else:
            self.assertIn("--workers", workers["skipped"])
            self.assertIn("skipped", self.output)

    def check_rss_and_targets(self) -> None:
        """
        Peak RSS was sampled, and every target is PASS, FAIL or N/A (which, is not checked).
        """
        rss = self.document["rss"]
        self.assertGreater(rss["twisted_nbd_file_peak_bytes"], 0)
        self.assertGreater(rss["twisted_nbd_ram_peak_bytes"], 0)
        targets = self.document["targets"]
        self.assertTrue(targets)
        for target in targets:
            self.assertIn(target["status"], ("PASS", "FAIL", "N/A"))
        self.assertIn("TARGETS", self.output)


class TLSBenchSmokeTests(SynchronousTestCase):
    """
    C{bench/tls.py --smoke}: twisted-nbd, qemu-nbd and nbdkit over TLS and
    twisted-nbd without, each on every workload; nothing is timed.
    """

    def test_smoke(self) -> None:
        """
        The smoke run succeeds, and its JSON has every workload for every server.
        """
        for tool in ("fio", "qemu-nbd", "nbdkit"):
            require_tool(tool)
        require_user_namespace()
        directory = make_tempdir(self)
        path = directory / "tls.json"
        argv = [
            sys.executable,
            str(TLS_BENCH),
            "--smoke",
            "--json",
            str(path),
            "--workdir",
            str(directory),
        ]
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TLS_SMOKE_TIMEOUT,
            cwd=REPO_ROOT,
            check=False,
        )
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, f"bench/tls.py --smoke failed:\n{output}")
        document: dict[str, Any] = json.loads(path.read_text())
        self.assertEqual(document["config"]["servers"], TLS_SERVERS)
        self.assertEqual([w["name"] for w in document["config"]["workloads"]], TLS_WORKLOADS)
        results = document["results"]
        self.assertTrue(all(r["ok"] for r in results), results)
        runs = {(r["workload"], r["server"]) for r in results}
        self.assertEqual(runs, {(w, s) for w in TLS_WORKLOADS for s in TLS_SERVERS})
        rows = document["summary"]
        self.assertEqual([row["workload"] for row in rows], TLS_WORKLOADS)
        for row in rows:
            self.assertEqual(sorted(row["servers"]), sorted(TLS_SERVERS))
            for numbers in row["servers"].values():
                for key in ("mib_s", "iops", "server_cpu_pct", "clat_p99_us"):
                    self.assertIn(key, numbers)
            peers = {f"twisted-nbd/{s}" for s in TLS_SERVERS[1:]}
            self.assertEqual(set(row["ratios"]), peers)
        # TLS was really spoken: twisted-nbd logged its sessions.
        self.assertTrue(document["tls_sessions"], output)
        targets = document["targets"]
        self.assertEqual(len(targets), len(TLS_WORKLOADS))
        for target in targets:
            self.assertIn(target["status"], ("PASS", "FAIL"))
        self.assertIn("TARGETS", output)


class FloorTests(SynchronousTestCase):
    """
    bench/floor.py (the measuring stick for queue depth 1 in
    docs/benchmarks.md) still serves real clients: libnbd's handshake, and
    qemu-io's WRITEs, READs and FLUSH, one connection after another.
    """

    def test_real_clients(self) -> None:
        require_tool("nbdinfo")
        require_tool("qemu-io")
        server = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "bench" / "floor.py"), "--port", "0", "--size", "4M"]
            + ["--connections", "2"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.addCleanup(server.wait, 30)
        self.addCleanup(server.kill)
        assert server.stdout is not None
        line = server.stdout.readline()
        self.assertTrue(line.startswith("listening on 127.0.0.1:"), line)
        uri = f"nbd://{line.split()[-1]}"
        size = subprocess.run(
            ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60, check=True
        )
        self.assertEqual(size.stdout.strip(), str(4 << 20))
        io = subprocess.run(
            ["qemu-io", "-f", "raw"]
            + ["-c", "write -P 0x5a 1M 64k", "-c", "flush", "-c", "read -P 0x5a 1M 64k"]
            + ["-c", "read -P 0 0 4k", uri],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(io.returncode, 0, io.stdout + io.stderr)
        self.assertNotIn("Pattern verification failed", io.stdout + io.stderr)
        self.assertEqual(server.wait(30), 0)


def load_bench() -> Any:
    """bench/run.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("twisted_nbd_bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class StealRetryTests(SynchronousTestCase):
    """
    A fio run spoiled by the hypervisor's steal is run again, at most twice
    more, and the run with the least steal is kept; a clean run, a failed
    run or C{--max-steal 100} runs once. (No fio here: the runs are faked.)
    """

    def runs(self, steals: list[float], max_steal: float = 5.0, fail_at: int = -1) -> Any:
        bench = load_bench()
        runner = object.__new__(bench.Runner)
        runner.config = type("C", (), {"max_steal": max_steal, "steal_retries": 2})()
        made: list[float] = []

        def fio_once(*args: Any) -> Any:
            steal = steals[len(made)]
            ok = len(made) != fail_at
            made.append(steal)
            return bench.Result(ok=ok, steal_cpu_pct=steal, iops=1000 + len(made))

        runner.fio_once = fio_once
        server = type("S", (), {"name": "twisted-nbd", "family": bench.RAM})()
        result = runner.fio_run(server, bench.WORKLOADS[0], 0)
        return result, made

    def test_clean_run_once(self) -> None:
        result, made = self.runs([1.0, 0.0, 0.0])
        self.assertEqual((made, result.runs, result.iops), ([1.0], 1, 1001))

    def test_best_of_three(self) -> None:
        result, made = self.runs([30.0, 8.0, 12.0])
        self.assertEqual((len(made), result.runs), (3, 3))
        self.assertEqual((result.steal_cpu_pct, result.iops), (8.0, 1002))

    def test_stops_when_clean(self) -> None:
        result, made = self.runs([30.0, 2.0, 0.0])
        self.assertEqual((len(made), result.runs, result.iops), (2, 2, 1002))

    def test_failed_retry_keeps_first(self) -> None:
        result, made = self.runs([30.0, 0.0, 0.0], fail_at=1)
        self.assertEqual((len(made), result.iops, result.ok), (2, 1001, True))

    def test_never(self) -> None:
        result, made = self.runs([60.0, 0.0, 0.0], max_steal=100.0)
        self.assertEqual((made, result.runs), ([60.0], 1))
