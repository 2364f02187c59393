#!/usr/bin/env python3
"""
Benchmark: twisted-nbd against qemu-nbd, nbdkit (its C file and memory
plugins and its Python plugin) and nbd-server, driven by fio and nbdcopy.

Two families of servers, each compared side by side, workload by workload,
every server in turn (interleaved):

  - "file": each server serves its own copy of the same page-cached raw
    image full of random data (twisted-nbd --image, qemu-nbd, nbdkit file,
    nbdkit's Python plugin doing os.pread/os.pwrite, nbd-server);
  - "ram": RAM disks, each first filled from the same reference image with
    nbdcopy (twisted-nbd --memory, nbdkit memory, nbdkit's Python plugin
    over a bytearray).

Sections: "fio" (the workloads above), "nbdcopy" (the whole image each way
with 1 and 4 connections, file family) and "workers" (twisted-nbd with
--workers N, when twistd nbd has that option). Every run samples the
server's RSS (its whole process tree). The script writes JSON, prints the
tables and the issue's TARGETS, and draws a PNG chart.

    python3 bench/run.py [--quick | --smoke] [--repeat 3] [--json FILE] [--chart FILE]

See bench/README.md and docs/benchmarks.md. A benchmark, not a test: the
exit status says whether every run worked, never whether a target was met.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
PLUGIN_DIR = BENCH_DIR / "plugins"
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: twistd's module has no C{__main__} guard (C{python3 -m twisted.scripts.twistd}
#: silently does nothing), so call its entry point as the C{twistd} script does.
TWISTD_SHIM = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

TWISTED = "twisted-nbd"
QEMU = "qemu-nbd"
NBDKIT_FILE = "nbdkit-file"
NBDKIT_PYTHON = "nbdkit-python"
NBD_SERVER = "nbd-server"
NBDKIT_MEMORY = "nbdkit-memory"
NBDKIT_PYTHON_BYTEARRAY = "nbdkit-python-bytearray"
#: twisted-nbd with one idle filter each (issue 9: an idle filter costs at
#: most 10%); run only when named with --servers.
FILTER_VARIANTS = (f"{TWISTED}+stats", f"{TWISTED}+cow")
DEFAULT_SERVERS = (
    TWISTED,
    QEMU,
    NBDKIT_FILE,
    NBDKIT_PYTHON,
    NBD_SERVER,
    NBDKIT_MEMORY,
    NBDKIT_PYTHON_BYTEARRAY,
)
ALL_SERVERS = (*DEFAULT_SERVERS, *FILTER_VARIANTS)
#: Old names still accepted by --servers.
SERVER_ALIASES = {"nbdkit": NBDKIT_FILE}

FILE = "file"
RAM = "ram"
ALL_FAMILIES = (FILE, RAM)
#: The servers of each family, twisted-nbd first, then the peers its numbers are divided by.
FAMILY_SERVERS = {
    FILE: (TWISTED, QEMU, NBDKIT_FILE, NBDKIT_PYTHON, NBD_SERVER, *FILTER_VARIANTS),
    RAM: (TWISTED, NBDKIT_MEMORY, NBDKIT_PYTHON_BYTEARRAY),
}

FIO = "fio"
NBDCOPY = "nbdcopy"
WORKERS = "workers"
ALL_SECTIONS = (FIO, NBDCOPY, WORKERS)

#: nbd-server serves exports by name only.
NBD_SERVER_EXPORT = "bench"

#: Bounds on every wait, in seconds.
START_DEADLINE = 30.0
STOP_GRACE = 10.0
FIO_SLACK = 60.0
TOOL_TIMEOUT = 60.0
#: nbdcopy gets at least this long, or as long as the image takes at 4 MiB/s.
COPY_TIMEOUT_MIN = 120.0
COPY_TIMEOUT_RATE = 4 * MiB
#: How often the servers' RSS is sampled.
RSS_INTERVAL = 0.2
#: Targets of issue 7.
RSS_TARGET = 128 * MiB

#: The connections of the nbdcopy section; nbdcopy uses no more connections
#: than threads, and defaults to one thread per core, so --threads says the same.
COPY_CONNECTIONS = (1, 4)
#: nbdcopy directions: from the file into the server (NBD writes), and from
#: the server into a file (NBD reads).
TO_SERVER = "to_server"
FROM_SERVER = "from_server"
DIRECTIONS = (FROM_SERVER, TO_SERVER)
DIRECTION_LABELS = {FROM_SERVER: "server->file", TO_SERVER: "file->server"}

#: fio jobs (connections) of the workers section.
WORKER_JOBS = 4


class BenchError(Exception):
    """
    A failure the benchmark reports in one line and exits on.
    """


@dataclasses.dataclass(frozen=True)
class Workload:
    """
    One fio job: what it does, with how large requests, how many in flight.
    """

    name: str
    rw: str
    bs: str
    iodepth: int
    #: For mixed workloads, the percentage of reads.
    rwmixread: int | None = None

    @property
    def directions(self) -> tuple[str, ...]:
        """
        The sections of fio's job report that hold this workload's numbers.
        """
        if self.rw in ("randrw", "rw", "readwrite"):
            return ("read", "write")
        return ("write",) if "write" in self.rw else ("read",)


WORKLOADS = (
    Workload("seq-read-1M-qd8", "read", "1M", 8),
    Workload("seq-write-1M-qd8", "write", "1M", 8),
    Workload("rand-read-4K-qd32", "randread", "4k", 32),
    Workload("rand-write-4K-qd32", "randwrite", "4k", 32),
    Workload("rand-rw-64K-qd16", "randrw", "64k", 16, rwmixread=50),
    Workload("rand-read-4K-qd1", "randread", "4k", 1),
)
WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}
#: The workloads --smoke runs unless --workloads says otherwise.
SMOKE_WORKLOADS = ("rand-rw-64K-qd16", "rand-read-4K-qd1")
#: The servers --smoke runs unless --servers says otherwise.
SMOKE_SERVERS = (TWISTED, NBDKIT_FILE, NBD_SERVER, NBDKIT_MEMORY)
#: The fio workloads of the workers section, each with WORKER_JOBS jobs.
WORKER_WORKLOADS = ("rand-read-4K-qd32", "rand-write-4K-qd32")
#: The workload whose p99 latency has a target.
LATENCY_WORKLOAD = "rand-read-4K-qd1"
#: The 4 KiB workloads (RAM targets against the bytearray plugin).
SMALL_WORKLOADS = ("rand-read-4K-qd32", "rand-write-4K-qd32", "rand-read-4K-qd1")


@dataclasses.dataclass
class Usage:
    """
    What one run cost: CPU in percent of one core, and the server's peak RSS.
    """

    #: CPU time the server used during the run (its whole process tree).
    server_cpu_pct: float = 0.0
    #: The client's (fio's, nbdcopy's) user + system time.
    client_cpu_pct: float = 0.0
    #: CPU time of every other process: anything else running disturbs the numbers.
    other_cpu_pct: float = 0.0
    #: Interrupts and softirqs (loopback TCP's receive path), charged to no process.
    irq_cpu_pct: float = 0.0
    #: Time the hypervisor gave to others: also disturbs the numbers.
    steal_cpu_pct: float = 0.0
    #: The largest RSS of the server's process tree (summed) seen during the run.
    peak_rss_bytes: int = 0
    #: The largest RSS of any one of the server's processes (with C{--workers},
    #: the supervisor or one worker) seen during the run.
    peak_process_rss_bytes: int = 0


@dataclasses.dataclass
class Result(Usage):
    """
    One fio run of one workload against one server.
    """

    section: str = FIO
    family: str = FILE
    workload: str = ""
    server: str = ""
    repeat: int = 0
    #: fio jobs, each with its own connection.
    numjobs: int = 1
    #: twisted-nbd's --workers, where it was given.
    workers: int | None = None
    ok: bool = False
    error: str | None = None
    mib_s: float = 0.0
    iops: float = 0.0
    lat_mean_us: float = 0.0
    #: 99th percentile completion latency (the larger of read's and write's).
    clat_p99_us: float = 0.0
    #: fio runs made for this result: more than one when the hypervisor's
    #: steal spoiled the earlier ones (see L{Config.max_steal}); the one
    #: with the least steal is kept.
    runs: int = 1


@dataclasses.dataclass
class CopyResult(Usage):
    """
    One nbdcopy of the whole image, to or from one server.
    """

    #: "nbdcopy", "workers" or "fill" (a RAM disk filled before its runs).
    section: str = NBDCOPY
    family: str = FILE
    server: str = ""
    repeat: int = 0
    direction: str = FROM_SERVER
    connections: int = 1
    workers: int | None = None
    #: Whether the server advertised multi-conn (nbdcopy uses one connection otherwise).
    multi_conn: bool | None = None
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0
    mib_s: float = 0.0


# -- Small helpers ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """
    Parse C{512M}, C{1G}, C{1GiB}, C{4096}: powers of 1024.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M or 1G)")
    number, suffix = int(match.group(1)), match.group(2).upper()
    scale: int = 1024 ** " KMGT".index(suffix or " ")
    return number * scale


def human_size(n: int) -> str:
    """
    C{1073741824} as C{1G}, C{33554432} as C{32M}.
    """
    for unit, scale in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def split_list(text: str) -> list[str]:
    """
    C{"a, b,,c"} as C{["a", "b", "c"]}.
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def twisted_env() -> dict[str, str]:
    """
    The environment twistd runs in: the repository first on C{PYTHONPATH}.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def embedded_python_env() -> dict[str, str]:
    """
    The environment for nbdkit's Python plugin: the system's Python is embedded
    there, so none of this interpreter's path settings.
    """
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def tool_output(argv: Sequence[str], timeout: float = TOOL_TIMEOUT) -> tuple[int, str]:
    """
    Run a short command; its exit code and its output (stdout then stderr).
    """
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=twisted_env(),
        )
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(argv)}: timed out after {timeout:.0f} s"
    return done.returncode, done.stdout + done.stderr


def first_line(text: str) -> str:
    """
    The first line of C{text}, stripped; empty if there is none.
    """
    return text.strip().splitlines()[0] if text.strip() else ""


def tail(path: Path, lines: int = 15) -> str:
    """
    The last lines of a log, indented, for an error message.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty log)"


def twistd_argv() -> list[str]:
    """
    The start of every twistd command line (see L{TWISTD_SHIM}).
    """
    return [sys.executable, "-c", TWISTD_SHIM]


# -- Processes: trees, CPU time, RSS ----------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_tree(root: int) -> list[int]:
    """
    C{root} and all its descendants, from C{/proc/PID/task/TID/children}.
    """
    pids = [root]
    index = 0
    while index < len(pids):
        pid = pids[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            except OSError:
                continue
            pids.extend(int(child) for child in text.split() if int(child) not in pids)
    return pids


def stat_fields(pid: int) -> list[str]:
    """
    The fields of C{/proc/PID/stat} after C{pid (comm)}: the state is [0].
    """
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_cpu_seconds(root: int) -> float:
    """
    User plus system CPU time of a process tree so far, with its waited-for children.
    """
    total = 0
    for pid in process_tree(root):
        try:
            fields = stat_fields(pid)
        except (OSError, IndexError):
            continue
        # utime, stime, cutime, cstime: fields 14 to 17 of proc(5).
        total += sum(int(x) for x in fields[11:15])
    return total / CLOCK_TICK


def tree_rss_bytes(root: int) -> tuple[int, int]:
    """
    The resident memory of a process tree: the sum of its processes' RSS,
    and the largest RSS of any one of them.
    """
    total = largest = 0
    for pid in process_tree(root):
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


def process_alive(pid: int) -> bool:
    """
    Whether C{pid} exists and is no zombie.
    """
    try:
        return stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def children_cpu_seconds() -> float:
    """
    CPU time of this process's waited-for children (fio, nbdcopy) so far.
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """
    Samples a process tree's RSS every L{RSS_INTERVAL} seconds in a thread;
    keeps the peak of the tree's sum and of any one process.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        self.peak_process = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(RSS_INTERVAL):
                return

    def _sample(self) -> None:
        total, largest = tree_rss_bytes(self.root)
        self.peak = max(self.peak, total)
        self.peak_process = max(self.peak_process, largest)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> int:
        """
        Stop sampling (after one last sample); the peak in bytes.
        """
        self._stop.set()
        self._thread.join(5.0)
        self._sample()
        return self.peak


# -- Pre-flight checks ------------------------------------------------------------------------


def check_server(name: str) -> str | None:
    """
    Why C{name} cannot run here, or None if it can.
    """
    if name == TWISTED or name in FILTER_VARIANTS:
        code, out = tool_output([*twistd_argv(), "nbd", "--help"])
        if code != 0 or "--image" not in out:
            return (
                f"the twistd 'nbd' plugin is not usable from {REPO_ROOT} (twisted_nbd/tap.py and "
                f"twisted/plugins/twisted_nbd_dropin.py; is Twisted installed for "
                f"{sys.executable}?): {first_line(out)}"
            )
        return None
    if name == QEMU:
        return None if shutil.which("qemu-nbd") else "qemu-nbd is not installed (qemu-utils)"
    if name == NBD_SERVER:
        return None if shutil.which("nbd-server") else "nbd-server is not installed (nbd-server)"
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed (nbdkit)"
    plugin = {
        NBDKIT_FILE: "file",
        NBDKIT_MEMORY: "memory",
        NBDKIT_PYTHON: "python",
        NBDKIT_PYTHON_BYTEARRAY: "python",
    }[name]
    if tool_output(["nbdkit", plugin, "--dump-plugin"])[0] != 0:
        package = "nbdkit-plugin-python" if plugin == "python" else "nbdkit"
        return f"nbdkit has no '{plugin}' plugin ({package})"
    return None


def check_tools(
    sections: Sequence[str], families: Sequence[str], pin: bool, pyspy: bool, chart: bool
) -> list[str]:
    """
    What is missing for the benchmark as a whole (not for single servers).
    """
    problems: list[str] = []
    if FIO in sections or WORKERS in sections:
        if shutil.which("fio") is None:
            problems.append("fio is not installed (apt-get install fio)")
        else:
            code, out = tool_output(["fio", "--enghelp=nbd"])
            if code != 0 or "uri" not in out:
                problems.append(
                    "this fio has no 'nbd' ioengine (Debian's fio has it, via libnbd: "
                    "apt-get install fio libnbd0)"
                )
    needs_nbdcopy = NBDCOPY in sections or WORKERS in sections or RAM in families
    if needs_nbdcopy and shutil.which("nbdcopy") is None:
        problems.append(
            "nbdcopy is not installed (apt-get install libnbd-bin); it also fills the RAM disks"
        )
    if pin and shutil.which("taskset") is None:
        problems.append("--pin needs taskset (apt-get install util-linux)")
    if pyspy and shutil.which("py-spy") is None:
        problems.append("--py-spy needs py-spy (pip install py-spy)")
    if chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            problems.append("--chart needs matplotlib (pip install matplotlib)")
    return problems


def workers_supported() -> tuple[bool, str]:
    """
    Whether C{twistd nbd} takes C{--workers N}, and what its help said if not.
    """
    code, out = tool_output([*twistd_argv(), "nbd", "--help"])
    if code == 0 and re.search(r"--workers\b", out):
        return True, ""
    return False, "twistd nbd has no --workers option yet (twistd nbd --help)"


def versions(servers: Sequence[str]) -> dict[str, str]:
    """
    The versions of everything measured and measuring, for the JSON.
    """
    found = {
        "fio": first_line(tool_output(["fio", "--version"])[1]),
        "python": platform.python_version(),
    }
    code, out = tool_output(
        [
            sys.executable,
            "-c",
            "import twisted, twisted_nbd; print(twisted.__version__, twisted_nbd.__version__)",
        ]
    )
    if code == 0 and len(out.split()) == 2:
        found["twisted"], found["twisted-nbd"] = out.split()
    code, out = tool_output(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"])
    if code == 0:
        found["twisted-nbd git"] = out.strip()
    if QEMU in servers:
        found["qemu-nbd"] = first_line(tool_output(["qemu-nbd", "--version"])[1])
    if any(s.startswith("nbdkit") for s in servers):
        found["nbdkit"] = first_line(tool_output(["nbdkit", "--version"])[1])
    if NBDKIT_PYTHON in servers or NBDKIT_PYTHON_BYTEARRAY in servers:
        out = tool_output(["nbdkit", "python", "--dump-plugin"])[1]
        match = re.search(r"^python_version=(\S+)", out, re.MULTILINE)
        if match:
            found["nbdkit python plugin's python"] = match.group(1)
    if NBD_SERVER in servers:
        match = re.search(r"version (\S+)", tool_output(["nbd-server", "-V"])[1])
        if match:
            found["nbd-server"] = match.group(1)
    code, out = tool_output(["nbdinfo", "--version"])
    if code == 0:
        found["libnbd"] = " ".join(line.strip() for line in out.splitlines() if "libnbd" in line)
    try:
        import matplotlib

        found["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    # "nbdkit 1.32.5" under "nbdkit": keep the version only.
    return {k: v.removeprefix(k).strip() if v.startswith(k + " ") else v for k, v in found.items()}


@dataclasses.dataclass(frozen=True)
class CPUTimes:
    """
    The machine's CPU seconds so far, summed over its CPUs (from /proc/stat).
    """

    #: Run by processes, user and system (a process's system calls).
    processes: float
    #: Interrupts and softirqs: much of loopback TCP's work is done here,
    #: charged to no process.
    interrupts: float
    #: Taken by the hypervisor for others while this machine wanted to run.
    steal: float
    idle: float

    @classmethod
    def now(cls) -> CPUTimes:
        """The counters as they are now."""
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user).
        user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
        return cls(
            (user + nice + system) / CLOCK_TICK,
            (irq + softirq) / CLOCK_TICK,
            steal / CLOCK_TICK,
            (idle + iowait) / CLOCK_TICK,
        )

    def __sub__(self, other: CPUTimes) -> CPUTimes:
        return CPUTimes(
            self.processes - other.processes,
            self.interrupts - other.interrupts,
            self.steal - other.steal,
            self.idle - other.idle,
        )

    @property
    def total(self) -> float:
        """All the CPU seconds, busy or idle."""
        return self.processes + self.interrupts + self.steal + self.idle


def busy_fraction(seconds: float = 1.0) -> float:
    """
    How busy the machine's CPUs were over the next C{seconds} (0 to 1).
    """
    try:
        before = CPUTimes.now()
        time.sleep(seconds)
        spent = CPUTimes.now() - before
    except (OSError, ValueError):
        return 0.0
    return 1 - spent.idle / spent.total if spent.total > 0 else 0.0


def wait_until_idle(limit: float, threshold: float = 0.15) -> float:
    """
    Wait up to C{limit} seconds for two quiet seconds in a row; how busy the last one was.
    """
    deadline = time.monotonic() + limit
    quiet = 0
    busy = busy_fraction()
    while time.monotonic() < deadline:
        quiet = quiet + 1 if busy <= threshold else 0
        if quiet >= 2:
            break
        busy = busy_fraction()
    return busy


def machine() -> dict[str, Any]:
    """
    The machine the numbers come from.
    """
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = PAGE_SIZE * os.sysconf("SC_PHYS_PAGES")
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu model": model,
        "memory GiB": round(memory / GiB, 1),
        "kernel": platform.release(),
        "system": platform.platform(),
    }


def available_memory() -> int:
    """
    MemAvailable from /proc/meminfo, in bytes (0 if unknown).
    """
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return 0


# -- The images -------------------------------------------------------------------------------


@dataclasses.dataclass
class Images:
    """
    The reference image, each file server's copy of it, and where nbdcopy copies to.
    """

    reference: Path
    copies: dict[str, Path]
    copy_target: Path


def make_images(workdir: Path, size: int, servers: Sequence[str], ram_servers: int) -> Images:
    """
    A reference image full of random data, one copy per file server, all in the page cache.
    """
    # The reference, the copies and nbdcopy's target, plus some room.
    needed = size * (len(servers) + 2) + 256 * MiB
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise BenchError(
            f"{workdir} has {free / GiB:.1f} GiB free; the images need {needed / GiB:.1f} GiB "
            "(use a smaller --size or another --workdir)"
        )
    memory = available_memory()
    wanted = size * ram_servers + 512 * MiB
    if ram_servers and memory and memory < wanted:
        raise BenchError(
            f"{ram_servers} RAM disks of {human_size(size)} need about {wanted / GiB:.1f} GiB "
            f"of memory; {memory / GiB:.1f} GiB is available (use a smaller --size)"
        )
    reference = workdir / "reference.img"
    chunk = 4 * MiB
    with reference.open("wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        if size % chunk:
            f.write(os.urandom(size % chunk))
    copies = {}
    for server in servers:
        image = workdir / f"{server}.img"
        shutil.copyfile(reference, image)
        copies[server] = image
    os.sync()
    for image in [reference, *copies.values()]:
        warm(image)
    return Images(reference, copies, workdir / "nbdcopy-target.img")


def warm(path: Path) -> None:
    """
    Read a file once so that it sits in the page cache.
    """
    buffer = bytearray(8 * MiB)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


# -- Servers ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """
    How to start one server: its command, environment, and where a daemon says its pid.
    """

    argv: list[str]
    env: dict[str, str] | None = None
    #: Set for servers that fork into the background (nbd-server) and write their pid here.
    pidfile: Path | None = None
    #: The export name clients ask for.
    export: str = ""


def nbd_server_config(port: int | str, image: Path | str) -> str:
    """
    nbd-server's configuration: 127.0.0.1 only, as root (no user or group to drop to).
    """
    return (
        "# Written by bench/run.py. No user or group: nbd-server stays the user that\n"
        "# started it (Debian's 'nbd' user may not exist, or may not read the image).\n"
        "[generic]\n"
        f"listenaddr = {HOST}\n"
        f"port = {port}\n"
        f"[{NBD_SERVER_EXPORT}]\n"
        f"exportname = {image}\n"
    )


def server_launch(
    name: str,
    family: str,
    port: int | str,
    log: Path,
    *,
    image: Path | str,
    size: int,
    twisted_args: Sequence[str] = (),
    workers: int | None = None,
    conf: Path | None = None,
) -> Launch:
    """
    The command line of one server of one family.

    @param image: the image file servers of the file family serve.
    @param size: the size of the RAM disks of the ram family.
    @param conf: where nbd-server's configuration file is (written by the caller).
    """
    if name == TWISTED or name in FILTER_VARIANTS:
        target = ["--image", str(image)] if family == FILE else ["--memory", str(size)]
        extra = [] if workers is None else ["--workers", str(workers)]
        if name in FILTER_VARIANTS:
            extra += ["--filter", name.split("+", 1)[1]]
        return Launch(
            [
                *twistd_argv(), "-n", "--pidfile=", f"--logfile={log}",
                "nbd", *target, "--listen", f"tcp:{port}:interface={HOST}", *extra,
                *twisted_args,
            ],
            env=twisted_env(),
        )  # fmt: skip
    nbdkit = ["nbdkit", "-f", "--exit-with-parent", "-i", HOST, "-p", str(port)]
    if name == QEMU:
        return Launch(
            [
                "qemu-nbd", "-f", "raw", "-b", HOST, "-p", str(port), "-x", "",
                "--persistent", "--shared=8", "--cache=writeback", str(image),
            ]
        )  # fmt: skip
    if name == NBDKIT_FILE:
        return Launch([*nbdkit, "file", str(image)])
    if name == NBDKIT_PYTHON:
        script = PLUGIN_DIR / "python_file.py"
        return Launch(
            [*nbdkit, "python", f"script={script}", f"file={image}"], env=embedded_python_env()
        )
    if name == NBDKIT_MEMORY:
        return Launch([*nbdkit, "memory", f"size={size}"])
    if name == NBDKIT_PYTHON_BYTEARRAY:
        script = PLUGIN_DIR / "python_bytearray.py"
        return Launch(
            [*nbdkit, "python", f"script={script}", f"size={size}"], env=embedded_python_env()
        )
    if name == NBD_SERVER:
        # Without -d it forks into the background (and a child per connection);
        # with -d it would serve one connection at a time, and nbdcopy's four would hang.
        conf = conf or Path("CONF")
        pidfile = conf.with_suffix(".pid")
        return Launch(
            ["nbd-server", "-C", str(conf), "-p", str(pidfile)],
            pidfile=pidfile,
            export=NBD_SERVER_EXPORT,
        )
    raise ValueError(name)


class Server:
    """
    One server process (and its children), with a bounded start and stop.

    Servers run in their own process group; a daemon (nbd-server) makes its
    own session, found through its pid file.
    """

    def __init__(self, name: str, family: str, launch: Launch, log: Path, port: int) -> None:
        self.name = name
        self.family = family
        self.launch = launch
        self.log = log
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        #: The daemon's pid, read from its pid file.
        self.daemon_pid: int | None = None

    @property
    def uri(self) -> str:
        """The NBD URI of the server's export."""
        return f"nbd://{HOST}:{self.port}/{self.launch.export}"

    def start(self) -> None:
        """
        Start the server and wait until it greets like an NBD server.
        """
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=self.launch.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_DEADLINE
        if self.launch.pidfile is not None:
            self._wait_for_daemon(deadline)
        while True:
            if not self.alive():
                code = self.process.poll() if self.daemon_pid is None else "?"
                raise BenchError(
                    f"{self.name} exited with {code} while starting; "
                    f"its log ({self.log}):\n{tail(self.log)}"
                )
            if nbd_greets(self.port):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not accept NBD connections on {HOST}:{self.port} within "
                    f"{START_DEADLINE:.0f} s; its log ({self.log}):\n{tail(self.log)}"
                )
            time.sleep(0.05)

    def _wait_for_daemon(self, deadline: float) -> None:
        """Wait for the launcher to exit and the daemon to write its pid."""
        assert self.process is not None and self.launch.pidfile is not None
        try:
            code = self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} did not go into the background in time") from None
        if code != 0:
            raise BenchError(f"{self.name} exited with {code}; its log:\n{tail(self.log)}")
        while time.monotonic() < deadline:
            pid = self._read_pidfile()
            if pid is not None:
                self.daemon_pid = pid
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name} wrote no pid to {self.launch.pidfile}")

    def _read_pidfile(self) -> int | None:
        """The pid in the daemon's pid file, if it is there yet."""
        if self.launch.pidfile is None:
            return None
        try:
            text = self.launch.pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    @property
    def pid(self) -> int:
        """
        The server's main process.
        """
        if self.daemon_pid is not None:
            return self.daemon_pid
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        """Whether the server is still running."""
        if self.daemon_pid is not None:
            return process_alive(self.daemon_pid)
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """
        SIGTERM to the process group, then SIGKILL if it outstays its grace.
        """
        process = self.process
        if process is None:
            return
        if self.launch.pidfile is not None:
            if process.poll() is None:
                # Still the launcher: it has not forked yet, or hangs.
                signal_group(process.pid, signal.SIGKILL)
                process.wait(STOP_GRACE)
            # A daemon forked just before may take a moment to write its pid.
            deadline = time.monotonic() + 2.0
            while self.daemon_pid is None and time.monotonic() < deadline:
                self.daemon_pid = self._read_pidfile()
                if self.daemon_pid is None:
                    time.sleep(0.05)
            if self.daemon_pid is not None:
                self._stop_daemon(self.daemon_pid)
        elif process.poll() is None:
            signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} ignored SIGTERM for {STOP_GRACE:.0f} s: SIGKILL")
                signal_group(process.pid, signal.SIGKILL)
                process.wait(STOP_GRACE)
        self.process = None
        self.daemon_pid = None

    def _stop_daemon(self, pid: int) -> None:
        """SIGTERM, then SIGKILL, to the daemon's session (or the process), each bounded."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return
        if group <= 1 or group == os.getpgrp():
            # Not a session of its own: signal the process only.
            group = -pid
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if group > 0:
                signal_group(group, signum)
            else:
                signal_process(pid, signum)
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline:
                if not process_alive(pid) and (group < 0 or not group_alive(group)):
                    return
                time.sleep(0.05)
            if signum == signal.SIGTERM:
                print(f"  {self.name} ignored SIGTERM for {STOP_GRACE:.0f} s: SIGKILL")

    def cpu_seconds(self) -> float:
        """
        User plus system CPU time of the server's processes and threads so far.
        """
        return tree_cpu_seconds(self.pid)


def signal_group(pgid: int, signum: int) -> None:
    """
    Send C{signum} to a process group, if it still exists.
    """
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def signal_process(pid: int, signum: int) -> None:
    """
    Send C{signum} to one process, if it still exists.
    """
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """
    Whether any live process is left in a process group.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_fields(int(entry))
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def nbd_greets(port: int) -> bool:
    """
    Whether something on C{port} accepts a connection and greets like an NBD server.
    """
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as s:
            greeting = b""
            while len(greeting) < 8:
                data = s.recv(8 - len(greeting))
                if not data:
                    return False
                greeting += data
            return greeting == b"NBDMAGIC"
    except OSError:
        return False


def can_multi_conn(uri: str) -> bool | None:
    """
    Whether the server at C{uri} advertises multi-conn (None if nbdinfo cannot say).
    """
    if shutil.which("nbdinfo") is None:
        return None
    code, out = tool_output(["nbdinfo", "--json", uri], timeout=30)
    if code != 0:
        return None
    try:
        info = json.loads(out[out.index("{") :])
        value = info["exports"][0]["can_multi_conn"]
    except (ValueError, KeyError, IndexError):
        return None
    return bool(value)


# -- fio and nbdcopy --------------------------------------------------------------------------


def fio_argv(
    workload: Workload,
    uri: str,
    runtime: int,
    ramp: int,
    output: Path,
    numjobs: int = 1,
) -> list[str]:
    """
    One fio run of C{workload}; C{numjobs} jobs (one connection each) are reported together.
    """
    argv = [
        "fio",
        f"--name={workload.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        f"--numjobs={numjobs}",
        "--time_based",
        f"--runtime={runtime}s",
        f"--ramp_time={ramp}s",
        "--output-format=json",
        f"--output={output}",
    ]
    if workload.rwmixread is not None:
        argv.insert(5, f"--rwmixread={workload.rwmixread}")
    if numjobs > 1:
        argv.append("--group_reporting")
    return argv


def parse_fio(path: Path, workload: Workload) -> dict[str, float]:
    """
    Throughput and latency from fio's JSON report (reads and writes added up).
    """
    text = path.read_text()
    # Only the JSON document; be lenient about anything fio printed before it.
    report = json.loads(text[text.index("{") :])
    job = report["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    sections = [job[d] for d in workload.directions]
    ios = sum(s.get("total_ios", 0) for s in sections)
    if not ios:
        raise BenchError("fio did no I/O")
    p99 = max(s.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) for s in sections)
    mean = sum(s["lat_ns"]["mean"] * s.get("total_ios", 0) for s in sections) / ios
    return {
        "mib_s": sum(s["bw_bytes"] for s in sections) / MiB,
        "iops": sum(s["iops"] for s in sections),
        "lat_mean_us": mean / 1000,
        "clat_p99_us": p99 / 1000,
    }


def nbdcopy_argv(source: str, destination: str, connections: int) -> list[str]:
    """
    nbdcopy with C{connections} connections (and as many threads, or it uses fewer).
    """
    return [
        "nbdcopy",
        f"--connections={connections}",
        f"--threads={connections}",
        source,
        destination,
    ]


class Measure:
    """
    What one run costs: the server's CPU and peak RSS, the client's and the machine's CPU.

    Used as a context manager around the client (fio, nbdcopy), which must be
    this process's child and waited for inside it.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sampler = RssSampler(server.pid)
        self.usage = Usage()
        self.wall = 0.0

    def __enter__(self) -> Measure:
        self.sampler.start()
        self._cpu = self.server.cpu_seconds()
        self._client = children_cpu_seconds()
        self._machine = CPUTimes.now()
        self._wall = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu = self.server.cpu_seconds() - self._cpu
        self.wall = wall = max(time.monotonic() - self._wall, 1e-6)
        client = children_cpu_seconds() - self._client
        spent = CPUTimes.now() - self._machine
        peak = self.sampler.stop()
        self.usage = Usage(
            server_cpu_pct=100 * cpu / wall,
            client_cpu_pct=100 * client / wall,
            other_cpu_pct=max(0.0, 100 * (spent.processes - cpu - client) / wall),
            irq_cpu_pct=100 * spent.interrupts / wall,
            steal_cpu_pct=100 * spent.steal / wall,
            peak_rss_bytes=peak,
            peak_process_rss_bytes=self.sampler.peak_process,
        )


class PySpy:
    """
    py-spy sampling one twisted-nbd run into collapsed stacks.

    Only the thread holding the GIL is sampled (C{--gil}), so the profile
    shows where the interpreter spends its time, per thread (C{--threads}),
    in every process of the server (C{--subprocesses}: its workers). py-spy
    stops the process for each sample, which slows it down: a run with a
    profile measures the profile, not the server.
    """

    RATE = 250

    def __init__(self, pid: int, output: Path, duration: int) -> None:
        self.output = output
        self.duration = duration
        self.log = output.with_suffix(".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "py-spy", "record", "--pid", str(pid), "--format", "raw",
                    "--rate", str(self.RATE), "--gil", "--threads", "--subprocesses",
                    "--duration", str(duration), "--output", str(output),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def finish(self, timeout: float) -> None:
        """Wait for py-spy to finish its recording (bounded), and say if it wrote nothing."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_GRACE)
        if not self.output.exists():
            print(f"  py-spy wrote no profile; its log:\n{tail(self.log)}")


def summarize_profile(path: Path, wall_samples: int = 0, top: int = 12) -> list[str]:
    """
    The functions with the most samples in a py-spy raw (collapsed) profile,
    per thread: "self" where a sample's innermost frame is the function,
    "total" where the function is anywhere on the stack.

    @param wall_samples: how many samples the run's duration would give a
        thread that always held the GIL, to say how busy the GIL was.
    """
    own: dict[str, Counter[str]] = {}
    total: dict[str, Counter[str]] = {}
    samples: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # With --subprocesses, each stack starts with its process and its
        # command line, quoted (twistd's has semicolons in it).
        stack = re.sub(r'^process \d+:(?:"[^"]*")?;', "", stack)
        frames = stack.split(";")
        thread = "?"
        match = re.fullmatch(r"thread \(\w+\):? ?(.*)", frames[0]) if frames else None
        if match:
            # Pool threads are numbered: count them as one.
            thread = re.sub(r"[-_]?\d+$", "", match.group(1)) or "?"
            frames = frames[1:]
        frames = [strip_line_number(frame) for frame in frames if frame]
        samples[thread] += count
        own.setdefault(thread, Counter())
        total.setdefault(thread, Counter())
        if frames:
            own[thread][frames[-1]] += count
        for frame in set(frames):
            total[thread][frame] += count
    everything = sum(samples.values())
    if not everything:
        return ["(no samples)"]
    lines = [f"{everything} samples of the thread holding the GIL"]
    if wall_samples:
        lines[0] += f": the GIL was held {100 * everything / wall_samples:.0f}% of the run"
    for thread, n in samples.most_common():
        lines.append(f"thread {thread}: {n} samples ({100 * n / everything:.0f}%)")
        lines.append("   self%  total%  function (by self)")
        for frame, count in own[thread].most_common(top):
            lines.append(
                f"  {100 * count / n:6.1f}  {100 * total[thread][frame] / n:6.1f}  {frame}"
            )
        # Inclusive time is what points at code to change: twisted-nbd's own.
        inclusive = [(f, c) for f, c in total[thread].most_common() if "(twisted_nbd/" in f]
        inclusive = inclusive[:top]
        lines.append("   self%  total%  twisted_nbd function (by total)")
        for frame, count in inclusive:
            lines.append(f"  {100 * own[thread][frame] / n:6.1f}  {100 * count / n:6.1f}  {frame}")
    return lines


def strip_line_number(frame: str) -> str:
    """
    C{"dataReceived (twisted_nbd/protocol.py:120)"} without its line number,
    and with the site-packages prefix cut off.
    """
    frame = re.sub(r":\d+\)$", ")", frame.strip())
    return re.sub(r"\((?:/[^()]*/site-packages/|" + re.escape(str(REPO_ROOT)) + "/)", "(", frame)


# -- The run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """
    Everything one benchmark run does.
    """

    #: The servers that run, per family (only the installed ones).
    families: dict[str, list[str]]
    workloads: list[Workload]
    sections: list[str]
    size: int
    runtime: int
    ramp: int
    repeat: int
    pin: bool
    twisted_args: list[str]
    #: The --workers values of the workers section.
    workers: list[int]
    #: Whether twistd nbd has --workers (the workers section is skipped otherwise).
    workers_supported: bool
    workdir: Path
    pyspy_dir: Path | None
    #: A fio run during which the hypervisor took more than this percentage
    #: of the CPUs from this machine (steal) is run again, at most
    #: L{steal_retries} more times: it measured the neighbours' load, not
    #: the server, and every server gets the same rule.
    max_steal: float = 5.0
    steal_retries: int = 2

    @property
    def copy_timeout(self) -> float:
        """How long one nbdcopy of the image may take."""
        return max(COPY_TIMEOUT_MIN, self.size / COPY_TIMEOUT_RATE)


class Runner:
    """
    Runs the sections, pass by pass, and keeps every result.
    """

    def __init__(self, config: Config, images: Images) -> None:
        self.config = config
        self.images = images
        self.results: list[Result] = []
        self.copies: list[CopyResult] = []
        #: Servers running now, stopped by L{stop_all} whatever happens.
        self.running: list[Server] = []

    # Servers

    def start_server(self, name: str, family: str, tag: str, workers: int | None = None) -> Server:
        """
        Start one server of one family on a free port; stopped by L{stop_all} if not before.
        """
        config = self.config
        port = free_port()
        log = config.workdir / f"{tag}.server.log"
        conf = config.workdir / f"{tag}.nbd-server.conf"
        image = self.images.copies.get(name, Path("/nonexistent")) if family == FILE else ""
        if name == NBD_SERVER:
            conf.write_text(nbd_server_config(port, image))
        launch = server_launch(
            name,
            family,
            port,
            log,
            image=image,
            size=config.size,
            twisted_args=config.twisted_args,
            workers=workers,
            conf=conf,
        )
        if config.pin:
            launch.argv = ["taskset", "-c", "1", *launch.argv]
        server = Server(name, family, launch, log, port)
        self.running.append(server)
        try:
            server.start()
        except BaseException:
            self.stop_server(server)
            raise
        return server

    def stop_server(self, server: Server) -> None:
        """Stop one server and forget it."""
        try:
            server.stop()
        finally:
            if server in self.running:
                self.running.remove(server)

    def stop_all(self) -> None:
        """
        Stop every server still running (on the way out, normal or not).
        """
        while self.running:
            self.stop_server(self.running[-1])

    def client(self, argv: list[str]) -> list[str]:
        """A client command line, pinned to CPU 0 with --pin."""
        return ["taskset", "-c", "0", *argv] if self.config.pin else argv

    # One measurement

    def fio_run(
        self,
        server: Server,
        workload: Workload,
        repeat: int,
        section: str = FIO,
        numjobs: int = 1,
        workers: int | None = None,
    ) -> Result:
        """
        One fio run against a running server; run again while the
        hypervisor's steal spoils it (L{Config.max_steal}, at most
        L{Config.steal_retries} more runs), keeping the run with the least.
        """
        config = self.config
        best = self.fio_once(server, workload, repeat, section, numjobs, workers)
        runs = 1
        while best.ok and best.steal_cpu_pct > config.max_steal and runs <= config.steal_retries:
            print(
                f"  ({server.name} {workload.name}: {best.steal_cpu_pct:.0f}% steal"
                f" during run {runs}: running it again)",
                flush=True,
            )
            if server.family == FILE:
                # As between runs: the last run's dirty pages are flushed first.
                os.sync()
            runs += 1
            again = self.fio_once(server, workload, repeat, section, numjobs, workers)
            if not again.ok:
                break
            if again.steal_cpu_pct < best.steal_cpu_pct:
                best = again
        return dataclasses.replace(best, runs=runs)

    def fio_once(
        self,
        server: Server,
        workload: Workload,
        repeat: int,
        section: str,
        numjobs: int,
        workers: int | None,
    ) -> Result:
        """
        One fio run against a running server.
        """
        config = self.config
        tag = run_tag(section, server.family, workload.name, server.name, workers, repeat)
        output = config.workdir / f"{tag}.fio.json"
        fio_log = config.workdir / f"{tag}.fio.log"
        argv = fio_argv(workload, server.uri, config.runtime, config.ramp, output, numjobs)
        result = Result(
            section=section,
            family=server.family,
            workload=workload.name,
            server=server.name,
            repeat=repeat,
            numjobs=numjobs,
            workers=workers,
        )
        profiler: PySpy | None = None
        try:
            if config.pyspy_dir is not None and server.name == TWISTED:
                name = run_tag(section, server.family, workload.name, workers, repeat) + ".txt"
                profiler = PySpy(server.pid, config.pyspy_dir / name, config.runtime + config.ramp)
            with Measure(server) as measure, fio_log.open("wb") as log:
                done = subprocess.run(
                    self.client(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=config.runtime + config.ramp + FIO_SLACK,
                )
            if not server.alive():
                raise BenchError(f"{server.name} died during the run; its log:\n{tail(server.log)}")
            if done.returncode != 0:
                raise BenchError(f"fio exited with {done.returncode}; its log:\n{tail(fio_log)}")
            numbers = parse_fio(output, workload)
            fields = {**dataclasses.asdict(measure.usage), **numbers}
            return dataclasses.replace(result, ok=True, **fields)
        except subprocess.TimeoutExpired:
            result.error = "fio timed out"
        except (BenchError, OSError, ValueError, KeyError) as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            if profiler is not None:
                profiler.finish(STOP_GRACE + 5)
        return result

    def copy_run(
        self,
        server: Server,
        direction: str,
        connections: int,
        repeat: int,
        section: str = NBDCOPY,
        workers: int | None = None,
        multi_conn: bool | None = None,
    ) -> CopyResult:
        """
        One nbdcopy of the whole image to or from a running server, timed.
        """
        config = self.config
        target = self.images.copy_target
        tag = run_tag(section, server.name, direction, connections, workers, repeat)
        result = CopyResult(
            section=section,
            family=server.family,
            server=server.name,
            repeat=repeat,
            direction=direction,
            connections=connections,
            workers=workers,
            multi_conn=multi_conn,
        )
        if direction == TO_SERVER:
            argv = nbdcopy_argv(str(self.images.reference), server.uri, connections)
        else:
            target.unlink(missing_ok=True)
            argv = nbdcopy_argv(server.uri, str(target), connections)
        log_path = config.workdir / f"{tag}.nbdcopy.log"
        try:
            with Measure(server) as measure, log_path.open("wb") as log:
                done = subprocess.run(
                    self.client(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=config.copy_timeout,
                )
            if not server.alive():
                raise BenchError(
                    f"{server.name} died during the copy; its log:\n{tail(server.log)}"
                )
            if done.returncode != 0:
                raise BenchError(f"nbdcopy exited with {done.returncode}:\n{tail(log_path)}")
            if direction == FROM_SERVER and target.stat().st_size != config.size:
                raise BenchError(f"nbdcopy wrote {target.stat().st_size} bytes, not {config.size}")
            seconds = measure.wall
            fields = dataclasses.asdict(measure.usage)
            return dataclasses.replace(
                result, ok=True, seconds=seconds, mib_s=config.size / MiB / seconds, **fields
            )
        except subprocess.TimeoutExpired:
            result.error = f"nbdcopy timed out after {config.copy_timeout:.0f} s"
        except (BenchError, OSError) as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            if direction == FROM_SERVER:
                target.unlink(missing_ok=True)
            # Dirty pages are flushed now, not during the next run.
            os.sync()
        return result

    # Sections

    def run(self) -> None:
        """
        Every section, pass after pass.
        """
        config = self.config
        for repeat in range(config.repeat):
            if FIO in config.sections:
                for family in ALL_FAMILIES:
                    if config.families.get(family):
                        self.fio_section(family, repeat)
            if NBDCOPY in config.sections and config.families.get(FILE):
                self.nbdcopy_section(repeat)
            if WORKERS in config.sections and config.workers_supported:
                if TWISTED in config.families.get(FILE, []):
                    self.workers_section(repeat)

    def order(self, servers: Sequence[str], repeat: int) -> list[str]:
        """
        Each pass starts with another server, so none is always first after a change.
        """
        shift = repeat % len(servers)
        return [*servers[shift:], *servers[:shift]]

    def label(self, repeat: int, *parts: str) -> str:
        """The start of a progress line."""
        return f"[{repeat + 1}/{self.config.repeat}] " + " ".join(parts)

    def fio_section(self, family: str, repeat: int) -> None:
        """
        Each workload against every server of the family in turn.

        File servers are started for each run. RAM servers are started and
        filled once per pass and stay up for all its workloads (so their data
        persists); one that died is restarted and filled again.
        """
        config = self.config
        order = self.order(config.families[family], repeat)
        up: dict[str, Server] = {}
        try:
            for workload in config.workloads:
                for name in order:
                    label = self.label(
                        repeat, f"{family:<4}", f"{workload.name:<20}", f"{name:<24}"
                    )
                    server: Server | None = None
                    try:
                        if family == RAM:
                            server = up.get(name)
                            if server is None or not server.alive():
                                if server is not None:
                                    print(f"{label} died: restarting and filling again")
                                    self.stop_server(server)
                                server = up[name] = self.start_ram_server(name, repeat)
                        else:
                            tag = f"fio.{family}.{workload.name}.{name}.{repeat}"
                            server = self.start_server(name, family, tag)
                    except BenchError as e:
                        up.pop(name, None)
                        result = Result(
                            family=family, workload=workload.name, server=name, repeat=repeat
                        )
                        result.error = f"BenchError: {e}"
                    else:
                        result = self.fio_run(server, workload, repeat)
                    finally:
                        if family == FILE and server is not None:
                            self.stop_server(server)
                            # Dirty pages of the write workloads are flushed now,
                            # not during the next run.
                            os.sync()
                    self.results.append(result)
                    print(label, describe_result(result), flush=True)
        finally:
            for server in up.values():
                self.stop_server(server)

    def start_ram_server(self, name: str, repeat: int) -> Server:
        """
        Start a RAM disk and fill it with the reference image.
        """
        # Numbered by the fills so far: a restarted server gets a log of its own.
        server = self.start_server(name, RAM, f"fio.ram.{name}.{repeat}.{len(self.copies)}")
        fill = self.copy_run(server, TO_SERVER, 4, repeat, section="fill")
        self.copies.append(fill)
        if not fill.ok:
            self.stop_server(server)
            raise BenchError(f"could not fill {name}: {fill.error}")
        print(
            self.label(repeat, f"{RAM:<4}", f"{'(fill)':<20}", f"{name:<24}"),
            f"filled with nbdcopy in {fill.seconds:.1f} s ({fill.mib_s:.0f} MiB/s)",
            flush=True,
        )
        return server

    def nbdcopy_section(self, repeat: int) -> None:
        """
        The whole image from and to every file server, with 1 and 4 connections.
        """
        for name in self.order(self.config.families[FILE], repeat):
            tag = f"nbdcopy.{name}.{repeat}"
            try:
                server = self.start_server(name, FILE, tag)
            except BenchError as e:
                for direction in DIRECTIONS:
                    for connections in COPY_CONNECTIONS:
                        failed = CopyResult(
                            server=name,
                            repeat=repeat,
                            direction=direction,
                            connections=connections,
                            error=f"BenchError: {e}",
                        )
                        self.copies.append(failed)
                print(self.label(repeat, "nbdcopy", name), f"FAILED: {e}")
                continue
            try:
                multi_conn = can_multi_conn(server.uri)
                for connections in COPY_CONNECTIONS:
                    for direction in DIRECTIONS:
                        result = self.copy_run(
                            server, direction, connections, repeat, multi_conn=multi_conn
                        )
                        self.copies.append(result)
                        what = f"{DIRECTION_LABELS[direction]:<12} x{connections}"
                        print(
                            self.label(repeat, "nbdcopy", f"{name:<24}", what),
                            describe_copy(result),
                            flush=True,
                        )
            finally:
                self.stop_server(server)

    def workers_section(self, repeat: int) -> None:
        """
        twisted-nbd with --workers N: nbdcopy with 4 connections, fio with 4 jobs.
        """
        for workers in self.config.workers:
            tag = f"workers.{workers}.{repeat}"
            name = f"{TWISTED} --workers {workers}"
            try:
                server = self.start_server(TWISTED, FILE, tag, workers=workers)
            except BenchError as e:
                for workload_name in WORKER_WORKLOADS:
                    self.results.append(
                        Result(
                            section=WORKERS,
                            workload=workload_name,
                            server=TWISTED,
                            repeat=repeat,
                            numjobs=WORKER_JOBS,
                            workers=workers,
                            error=f"BenchError: {e}",
                        )
                    )
                for direction in DIRECTIONS:
                    self.copies.append(
                        CopyResult(
                            section=WORKERS,
                            server=TWISTED,
                            repeat=repeat,
                            direction=direction,
                            connections=4,
                            workers=workers,
                            error=f"BenchError: {e}",
                        )
                    )
                print(self.label(repeat, WORKERS, name), f"FAILED: {e}")
                continue
            try:
                multi_conn = can_multi_conn(server.uri)
                for direction in DIRECTIONS:
                    copy = self.copy_run(
                        server, direction, 4, repeat, WORKERS, workers, multi_conn=multi_conn
                    )
                    self.copies.append(copy)
                    what = f"nbdcopy {DIRECTION_LABELS[direction]} x4"
                    print(self.label(repeat, WORKERS, f"{name:<24}", what), describe_copy(copy))
                for workload_name in WORKER_WORKLOADS:
                    workload = WORKLOADS_BY_NAME[workload_name]
                    result = self.fio_run(server, workload, repeat, WORKERS, WORKER_JOBS, workers)
                    self.results.append(result)
                    what = f"fio {workload.name} x{WORKER_JOBS}"
                    print(
                        self.label(repeat, WORKERS, f"{name:<24}", what),
                        describe_result(result),
                        flush=True,
                    )
            finally:
                self.stop_server(server)
                os.sync()


def run_tag(*parts: object) -> str:
    """
    The file name stem of one run's logs and output: its non-None parts, dotted.
    """
    return ".".join(str(part) for part in parts if part is not None)


def describe_result(result: Result) -> str:
    """
    One fio run in one line of progress.
    """
    if not result.ok:
        return f"FAILED: {result.error}"
    return (
        f"{result.mib_s:9.1f} MiB/s {result.iops:9.0f} IOPS  p99 {result.clat_p99_us:7.0f} us"
        f"  CPU: server {result.server_cpu_pct:3.0f}%  fio {result.client_cpu_pct:3.0f}%"
        f"  other {result.other_cpu_pct:3.0f}%  irq {result.irq_cpu_pct:3.0f}%"
        f"  steal {result.steal_cpu_pct:3.0f}%  RSS {result.peak_rss_bytes / MiB:5.0f} MiB"
        + (f"  (best of {result.runs} runs)" if result.runs > 1 else "")
    )


def describe_copy(result: CopyResult) -> str:
    """
    One nbdcopy in one line of progress.
    """
    if not result.ok:
        return f"FAILED: {result.error}"
    return (
        f"{result.mib_s:9.1f} MiB/s in {result.seconds:6.2f} s"
        f"  CPU: server {result.server_cpu_pct:3.0f}%  nbdcopy {result.client_cpu_pct:3.0f}%"
        f"  RSS {result.peak_rss_bytes / MiB:5.0f} MiB"
    )


# -- Summaries --------------------------------------------------------------------------------

FIO_FIELDS = (
    "mib_s",
    "iops",
    "lat_mean_us",
    "clat_p99_us",
    "server_cpu_pct",
    "client_cpu_pct",
    "other_cpu_pct",
    "irq_cpu_pct",
    "steal_cpu_pct",
)
COPY_FIELDS = ("mib_s", "seconds", "server_cpu_pct", "client_cpu_pct", "steal_cpu_pct")


def median_of(items: Sequence[Any], fields: Sequence[str]) -> dict[str, Any]:
    """
    The median of each field over the runs, the largest peak RSS, and how many runs.
    """
    numbers: dict[str, Any] = {f: statistics.median(getattr(r, f) for r in items) for f in fields}
    numbers["peak_rss_bytes"] = max(r.peak_rss_bytes for r in items)
    numbers["peak_process_rss_bytes"] = max(r.peak_process_rss_bytes for r in items)
    numbers["runs"] = len(items)
    return numbers


def summarize_fio(config: Config, results: list[Result], family: str) -> list[dict[str, Any]]:
    """
    Per workload and server of a family the medians over the passes, and twisted-nbd's ratios.
    """
    rows = []
    servers = config.families.get(family, [])
    for workload in config.workloads:
        row: dict[str, Any] = {
            "workload": workload.name,
            "rw": workload.rw,
            "bs": workload.bs,
            "iodepth": workload.iodepth,
            "rwmixread": workload.rwmixread,
            "servers": {},
            "ratios": {},
        }
        for server in servers:
            good = [
                r
                for r in results
                if r.ok
                and r.section == FIO
                and r.family == family
                and r.workload == workload.name
                and r.server == server
            ]
            if good:
                row["servers"][server] = median_of(good, FIO_FIELDS)
        ours = row["servers"].get(TWISTED)
        for peer in FAMILY_SERVERS[family][1:]:
            theirs = row["servers"].get(peer)
            if ours and theirs and theirs["iops"]:
                row["ratios"][f"{TWISTED}/{peer}"] = ours["iops"] / theirs["iops"]
        rows.append(row)
    return rows


def summarize_copies(config: Config, copies: list[CopyResult]) -> list[dict[str, Any]]:
    """
    Per file server, direction and connections the median nbdcopy, and twisted-nbd's ratios.
    """
    rows = []
    for direction in DIRECTIONS:
        for connections in COPY_CONNECTIONS:
            row: dict[str, Any] = {
                "direction": direction,
                "connections": connections,
                "servers": {},
                "ratios": {},
            }
            for server in config.families.get(FILE, []):
                good = [
                    c
                    for c in copies
                    if c.ok
                    and c.section == NBDCOPY
                    and c.server == server
                    and c.direction == direction
                    and c.connections == connections
                ]
                if good:
                    row["servers"][server] = median_of(good, COPY_FIELDS)
                    row["servers"][server]["multi_conn"] = good[0].multi_conn
            ours = row["servers"].get(TWISTED)
            for peer in FAMILY_SERVERS[FILE][1:]:
                theirs = row["servers"].get(peer)
                if ours and theirs and theirs["mib_s"]:
                    row["ratios"][f"{TWISTED}/{peer}"] = ours["mib_s"] / theirs["mib_s"]
            rows.append(row)
    return rows


def summarize_workers(
    config: Config, results: list[Result], copies: list[CopyResult]
) -> list[dict[str, Any]]:
    """
    Per test of the workers section the median for each N, and the speed-up over the first N.
    """
    rows: list[dict[str, Any]] = []
    tests: list[tuple[str, str, str]] = [
        *((f"nbdcopy {DIRECTION_LABELS[d]} x4", d, "mib_s") for d in DIRECTIONS),
        *((f"fio {w} x{WORKER_JOBS}", w, "iops") for w in WORKER_WORKLOADS),
    ]
    for test, key, unit in tests:
        row: dict[str, Any] = {"test": test, "unit": unit, "workers": {}, "speedup": {}}
        for n in config.workers:
            if unit == "mib_s":
                copied = [
                    c
                    for c in copies
                    if c.ok and c.section == WORKERS and c.workers == n and c.direction == key
                ]
                if copied:
                    row["workers"][str(n)] = median_of(copied, COPY_FIELDS)
            else:
                measured = [
                    r
                    for r in results
                    if r.ok and r.section == WORKERS and r.workers == n and r.workload == key
                ]
                if measured:
                    row["workers"][str(n)] = median_of(measured, FIO_FIELDS)
        base = row["workers"].get(str(config.workers[0])) if config.workers else None
        for n, numbers in row["workers"].items():
            if base and base[unit]:
                row["speedup"][n] = numbers[unit] / base[unit]
        rows.append(row)
    return rows


def summarize_rss(results: list[Result], copies: list[CopyResult]) -> dict[str, Any]:
    """
    The peak RSS of each server over every run, per family and section.

    twisted-nbd's figure for the target covers the runs that serve a file:
    a RAM disk's RSS holds the whole disk (the ram family's figure is given
    separately, with the disk's size).
    """
    runs: list[Result | CopyResult] = [*results, *copies]
    peaks: dict[str, dict[str, int]] = {}
    for run in runs:
        key = f"{run.section}/{run.family}"
        server = peaks.setdefault(key, {})
        server[run.server] = max(server.get(run.server, 0), run.peak_rss_bytes)
    file_peak = max(
        (
            r.peak_process_rss_bytes or r.peak_rss_bytes
            for r in runs
            if r.server == TWISTED and r.family == FILE and r.peak_rss_bytes
        ),
        default=None,
    )
    ram_peak = max(
        (
            r.peak_rss_bytes
            for r in runs
            if r.server == TWISTED and r.family == RAM and r.peak_rss_bytes
        ),
        default=None,
    )
    return {
        "interval_s": RSS_INTERVAL,
        "peak_bytes": peaks,
        "twisted_nbd_file_peak_bytes": file_peak,
        "twisted_nbd_ram_peak_bytes": ram_peak,
        "target_bytes": RSS_TARGET,
    }


# -- Targets ----------------------------------------------------------------------------------


def find_row(rows: list[dict[str, Any]], workload: str) -> dict[str, Any] | None:
    """The summary row of one workload, if it was run."""
    return next((row for row in rows if row["workload"] == workload), None)


def ratio_target(
    rows: list[dict[str, Any]], family: str, workload: str, peer: str, minimum: float
) -> dict[str, Any]:
    """
    twisted-nbd's IOPS over a peer's on one workload, against a minimum.
    """
    name = f"{family} {workload}: {TWISTED}/{peer} >= {minimum:.1f}"
    row = find_row(rows, workload)
    ratio = None if row is None else row["ratios"].get(f"{TWISTED}/{peer}")
    if row is None or ratio is None:
        if not rows:
            why = f"the {family} family's fio runs are not in this run"
        elif row is None:
            why = "workload not in this run"
        else:
            missing = [s for s in (TWISTED, peer) if s not in row["servers"]]
            why = f"{' and '.join(missing)}: not in this run, or failed"
        return {"name": name, "status": "N/A", "value": None, "limit": minimum, "detail": why}
    ours, theirs = row["servers"][TWISTED]["iops"], row["servers"][peer]["iops"]
    return {
        "name": name,
        "status": "PASS" if ratio >= minimum else "FAIL",
        "value": ratio,
        "limit": minimum,
        "detail": f"{ratio:.2f} ({ours:.0f} vs {theirs:.0f} IOPS)",
    }


def evaluate_targets(
    summary: dict[str, list[dict[str, Any]]], rss: dict[str, Any]
) -> list[dict[str, Any]]:
    """
    Issue 7's targets, each PASS, FAIL or N/A (not measured), from this run's medians.
    """
    targets = []
    names = [w.name for w in WORKLOADS]
    file_rows, ram_rows = summary.get(FILE, []), summary.get(RAM, [])
    for workload in names:
        targets.append(ratio_target(file_rows, FILE, workload, QEMU, 1.0))
        targets.append(ratio_target(file_rows, FILE, workload, NBDKIT_PYTHON, 1.0))
    for workload in ("rand-read-4K-qd32", "rand-write-4K-qd32"):
        targets.append(ratio_target(file_rows, FILE, workload, NBDKIT_PYTHON, 3.0))
    for workload in names:
        targets.append(ratio_target(ram_rows, RAM, workload, NBDKIT_MEMORY, 1.0))
    for workload in SMALL_WORKLOADS:
        targets.append(ratio_target(ram_rows, RAM, workload, NBDKIT_PYTHON_BYTEARRAY, 2.0))
    name = f"{FILE} {LATENCY_WORKLOAD}: {TWISTED} p99 <= {QEMU} p99"
    row = find_row(file_rows, LATENCY_WORKLOAD)
    ours = row["servers"].get(TWISTED) if row else None
    theirs = row["servers"].get(QEMU) if row else None
    if ours and theirs:
        p99, limit = ours["clat_p99_us"], theirs["clat_p99_us"]
        targets.append(
            {
                "name": name,
                "status": "PASS" if p99 <= limit else "FAIL",
                "value": p99,
                "limit": limit,
                "detail": f"{p99:.0f} us vs {limit:.0f} us",
            }
        )
    else:
        targets.append(
            {"name": name, "status": "N/A", "value": None, "limit": None, "detail": "not measured"}
        )
    name = f"{TWISTED} peak RSS < {RSS_TARGET // MiB} MiB per process (every run serving a file)"
    peak = rss.get("twisted_nbd_file_peak_bytes")
    if peak:
        targets.append(
            {
                "name": name,
                "status": "PASS" if peak < RSS_TARGET else "FAIL",
                "value": peak,
                "limit": RSS_TARGET,
                "detail": f"{peak / MiB:.1f} MiB",
            }
        )
    else:
        targets.append(
            {"name": name, "status": "N/A", "value": None, "limit": RSS_TARGET, "detail": "no run"}
        )
    return targets


# -- Tables -----------------------------------------------------------------------------------


def render(header: list[str], body: list[list[str]], markdown: bool, left: int = 1) -> str:
    """
    A table as aligned text, or as Markdown; the first C{left} columns are text, the rest numbers.
    """
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in [header, *body]
    )


def ratio_cell(value: float | None) -> str:
    """A ratio with two decimals, or "-"."""
    return "-" if value is None else f"{value:.2f}"


def throughput_table(servers: Sequence[str], rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    MiB/s per workload and server.
    """
    header = ["workload", *(f"{s} MiB/s" for s in servers)]
    body = []
    for row in rows:
        cells = [row["workload"]]
        for server in servers:
            numbers = row["servers"].get(server)
            cells.append("failed" if numbers is None else f"{numbers['mib_s']:.1f}")
        body.append(cells)
    return render(header, body, markdown)


def ratio_table(family: str, servers: Sequence[str], rows: list[dict[str, Any]], md: bool) -> str:
    """
    twisted-nbd's throughput over each peer's, per workload.
    """
    peers = [p for p in FAMILY_SERVERS[family][1:] if p in servers]
    header = ["workload", *(f"{TWISTED} / {p}" for p in peers)]
    body = [
        [row["workload"], *(ratio_cell(row["ratios"].get(f"{TWISTED}/{p}")) for p in peers)]
        for row in rows
    ]
    return render(header, body, md)


def detail_table(servers: Sequence[str], rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    IOPS, latency, CPU use and peak RSS per workload and server.
    """
    header = [
        "workload",
        "server",
        "IOPS",
        "mean lat us",
        "p99 clat us",
        "server CPU %",
        "fio CPU %",
        "other CPU %",
        "irq CPU %",
        "steal %",
        "peak RSS MiB",
    ]
    body = []
    for row in rows:
        for server in servers:
            n = row["servers"].get(server)
            if n is None:
                body.append([row["workload"], server] + ["failed"] * (len(header) - 2))
                continue
            body.append(
                [
                    row["workload"],
                    server,
                    f"{n['iops']:.0f}",
                    f"{n['lat_mean_us']:.0f}",
                    f"{n['clat_p99_us']:.0f}",
                    f"{n['server_cpu_pct']:.0f}",
                    f"{n['client_cpu_pct']:.0f}",
                    f"{n['other_cpu_pct']:.0f}",
                    f"{n['irq_cpu_pct']:.0f}",
                    f"{n['steal_cpu_pct']:.0f}",
                    f"{n['peak_rss_bytes'] / MiB:.0f}",
                ]
            )
    return render(header, body, markdown, left=2)


def copy_table(servers: Sequence[str], rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    nbdcopy MiB/s per server, direction and connections, and twisted-nbd's ratios.
    """
    columns = [(r["direction"], r["connections"]) for r in rows]
    header = ["server", *(f"{DIRECTION_LABELS[d]} x{c} MiB/s" for d, c in columns)]
    header += ["multi-conn", "peak RSS MiB"]
    body = []
    for server in servers:
        cells = [server]
        multi: Any = None
        peak = 0
        for row in rows:
            n = row["servers"].get(server)
            cells.append("failed" if n is None else f"{n['mib_s']:.1f}")
            if n is not None:
                multi = n["multi_conn"] if multi is None else multi
                peak = max(peak, n["peak_rss_bytes"])
        cells.append({True: "yes", False: "no"}.get(multi, "?"))
        cells.append(f"{peak / MiB:.0f}" if peak else "-")
        body.append(cells)
    for peer in FAMILY_SERVERS[FILE][1:]:
        if TWISTED in servers and peer in servers:
            cells = [f"{TWISTED} / {peer}"]
            cells += [ratio_cell(row["ratios"].get(f"{TWISTED}/{peer}")) for row in rows]
            body.append([*cells, "", ""])
    return render(header, body, markdown)


def workers_table(config: Config, rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    The workers section: each test's figure for each N, and the speed-up over the first N.
    """
    header = ["test"]
    for n in config.workers:
        header += [f"N={n}", f"N={n} speed-up"]
    header.append("peak RSS MiB")
    body = []
    for row in rows:
        unit = "MiB/s" if row["unit"] == "mib_s" else "IOPS"
        cells = [f"{row['test']} ({unit})"]
        peak = 0
        for n in config.workers:
            numbers = row["workers"].get(str(n))
            value = None if numbers is None else numbers[row["unit"]]
            cells.append("failed" if value is None else f"{value:.1f}")
            cells.append(ratio_cell(row["speedup"].get(str(n))))
            if numbers is not None:
                peak = max(peak, numbers["peak_rss_bytes"])
        cells.append(f"{peak / MiB:.0f}" if peak else "-")
        body.append(cells)
    return render(header, body, markdown)


def rss_table(rss: dict[str, Any], markdown: bool) -> str:
    """
    Each server's peak RSS, per section and family.
    """
    header = ["section/family", "server", "peak RSS MiB"]
    body = []
    for key, servers in sorted(rss["peak_bytes"].items()):
        for server, peak in servers.items():
            body.append([key, server, f"{peak / MiB:.1f}"])
    return render(header, body, markdown, left=2)


def targets_text(targets: list[dict[str, Any]], markdown: bool) -> str:
    """
    The TARGETS section: one line per target measured, N/A ones grouped by reason, a count.
    """
    reasons = Counter(t["detail"] for t in targets if t["status"] == "N/A")
    body = [
        [t["status"], t["name"], t["detail"]]
        for t in targets
        if t["status"] != "N/A" or reasons[t["detail"]] == 1
    ]
    for reason, count in reasons.items():
        if count > 1:
            body.append(["N/A", f"{count} targets", f"{reason} (see the JSON)"])
    counts = Counter(t["status"] for t in targets)
    total = (
        f"{counts['PASS']} of {counts['PASS'] + counts['FAIL']} measured targets met"
        f" ({counts['FAIL']} missed, {counts['N/A']} not measured in this run)"
    )
    if markdown:
        table = render(["", "target", "figures"], body, markdown=True, left=3)
        return f"{table}\n\n{total}"
    width = max(len(cells[1]) for cells in body)
    lines = [f"  {status:<4}  {name:<{width}}  {detail}" for status, name, detail in body]
    return "\n".join([*lines, f"  {total}"])


def report(document: dict[str, Any], config: Config, markdown: bool) -> str:
    """
    Every table of the run, as text or Markdown.
    """
    out: list[str] = []

    def heading(text: str) -> None:
        out.append("")
        out.append(f"### {text}" if markdown else f"== {text}")
        out.append("")

    for family in ALL_FAMILIES:
        rows = document["summary"].get(family)
        servers = config.families.get(family, [])
        if not rows or FIO not in config.sections:
            continue
        what = "image files" if family == FILE else "RAM disks"
        heading(f"fio, {what} ({family} family): MiB/s")
        out.append(throughput_table(servers, rows, markdown))
        heading(f"fio, {what}: twisted-nbd's throughput over each peer's")
        out.append(ratio_table(family, servers, rows, markdown))
        heading(f"fio, {what}: IOPS, latency, CPU (% of one core) and peak RSS")
        out.append(detail_table(servers, rows, markdown))
        row = find_row(rows, LATENCY_WORKLOAD)
        if row:
            p99 = ", ".join(
                f"{s} {n['clat_p99_us']:.0f} us" for s, n in row["servers"].items() if n
            )
            out.append("")
            out.append(f"p99 completion latency at {LATENCY_WORKLOAD}: {p99}")
    if document["nbdcopy"]["summary"] and NBDCOPY in config.sections:
        heading(f"nbdcopy of the whole {human_size(config.size)} image (MiB/s)")
        out.append(
            copy_table(config.families.get(FILE, []), document["nbdcopy"]["summary"], markdown)
        )
    workers = document["workers"]
    if WORKERS in config.sections:
        heading("twisted-nbd --workers N (nbdcopy 4 connections, fio 4 jobs)")
        if workers["skipped"]:
            out.append(f"skipped: {workers['skipped']}")
        else:
            out.append(workers_table(config, workers["summary"], markdown))
    rss = document["rss"]
    heading(f"Peak RSS (process tree, sampled every {RSS_INTERVAL} s)")
    out.append(rss_table(rss, markdown))
    if rss["twisted_nbd_file_peak_bytes"]:
        out.append("")
        peak = rss["twisted_nbd_file_peak_bytes"]
        out.append(
            f"twisted-nbd serving a file: {peak / MiB:.1f} MiB at most in any one process"
            " (the table sums a process tree: with --workers, the supervisor and every worker)"
        )
    if rss["twisted_nbd_ram_peak_bytes"]:
        peak = rss["twisted_nbd_ram_peak_bytes"]
        out.append(
            f"twisted-nbd --memory {human_size(config.size)}: {peak / MiB:.1f} MiB at most, "
            f"of which the disk's data is {config.size / MiB:.0f} MiB"
        )
    heading("TARGETS (issue 7, from this run's medians)")
    out.append(targets_text(document["targets"], markdown))
    return "\n".join(out)


# -- The chart --------------------------------------------------------------------------------


def draw_chart(document: dict[str, Any], path: Path) -> None:
    """
    A PNG: fio throughput relative to twisted-nbd per family, nbdcopy, and the workers section.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = document["config"]
    figure, axes = plt.subplots(2, 2, figsize=(15, 10), constrained_layout=True)
    figure.suptitle(
        f"twisted-nbd benchmark, {document['date']}: {document['machine']['cpus']} CPUs, "
        f"{human_size(config['size'])} image, {config['runtime_s']} s per fio run, "
        f"{config['repeat']} pass(es), medians"
    )
    for ax, family in zip(axes[0], ALL_FAMILIES, strict=True):
        rows = document["summary"].get(family) or []
        servers = config["families"].get(family, [])
        what = "image files" if family == FILE else "RAM disks"
        ax.set_title(f"fio, {what}: throughput relative to twisted-nbd (log scale)")
        relative_bars(ax, rows, servers)
    copy_bars(axes[1][0], document["nbdcopy"]["summary"], config["families"].get(FILE, []))
    workers_bars(axes[1][1], document["workers"], config["workers"])
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def relative_bars(ax: Any, rows: list[dict[str, Any]], servers: Sequence[str]) -> None:
    """
    Each server's IOPS over twisted-nbd's, per workload (twisted-nbd's own number in the label).
    """
    rows = [row for row in rows if row["servers"].get(TWISTED)]
    if not rows or not servers:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    width = 0.8 / len(servers)
    shown = [1.0]
    for i, server in enumerate(servers):
        values = []
        for row in rows:
            ours, theirs = row["servers"][TWISTED], row["servers"].get(server)
            ratio = theirs["iops"] / ours["iops"] if theirs and ours["iops"] else None
            values.append(float("nan") if ratio is None else ratio)
            shown += [ratio] if ratio else []
        positions = [x + (i - (len(servers) - 1) / 2) * width for x in range(len(rows))]
        ax.bar(positions, values, width, label=server)
    labels = []
    for row in rows:
        ours = row["servers"][TWISTED]
        p99 = f"\np99 {ours['clat_p99_us']:.0f} us" if row["workload"] == LATENCY_WORKLOAD else ""
        labels.append(f"{row['workload']}\n{ours['mib_s']:.0f} MiB/s{p99}")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_yscale("log")
    low, high = min(shown) / 1.4, max(shown) * 1.4
    ax.set_ylim(low, high)
    steps = [1 / 8, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32]
    ax.yaxis.set_major_locator(FixedLocator([t for t in steps if low <= t <= high]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("IOPS / twisted-nbd's (below 1: twisted-nbd is faster)")
    ax.legend(fontsize=7)


def copy_bars(ax: Any, rows: list[dict[str, Any]], servers: Sequence[str]) -> None:
    """
    nbdcopy MiB/s per direction and connections, a bar per server.
    """
    ax.set_title("nbdcopy of the whole image, image files (MiB/s)")
    if not rows or not any(row["servers"] for row in rows) or not servers:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        values = [row["servers"].get(server, {}).get("mib_s", 0.0) for row in rows]
        positions = [x + (i - (len(servers) - 1) / 2) * width for x in range(len(rows))]
        ax.bar(positions, values, width, label=server)
    labels = [f"{DIRECTION_LABELS[r['direction']]}\n{r['connections']} conn." for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("MiB/s")
    ax.legend(fontsize=7)


def workers_bars(ax: Any, workers: dict[str, Any], counts: Sequence[int]) -> None:
    """
    The workers section: each test's speed-up over the first N, a bar per N.
    """
    ax.set_title("twisted-nbd --workers N: speed-up over N=%s" % (counts[0] if counts else "?"))
    rows = workers.get("summary") or []
    if workers.get("skipped") or not any(row["workers"] for row in rows):
        why = workers.get("skipped") or "no results"
        ax.text(0.5, 0.5, f"skipped:\n{why}", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    width = 0.8 / len(counts)
    for i, n in enumerate(counts):
        values = [row["speedup"].get(str(n), 0.0) for row in rows]
        positions = [x + (i - (len(counts) - 1) / 2) * width for x in range(len(rows))]
        ax.bar(positions, values, width, label=f"N={n}")
    labels = []
    for row in rows:
        first = row["workers"].get(str(counts[0]))
        unit = "MiB/s" if row["unit"] == "mib_s" else "IOPS"
        base = f"\nN={counts[0]}: {first[row['unit']]:.0f} {unit}" if first else ""
        labels.append(f"{row['test']}{base}")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("speed-up")
    ax.legend(fontsize=7)


# -- Options ----------------------------------------------------------------------------------


def add_common_options(parser: argparse.ArgumentParser, smoke_help: str, keep_help: str) -> None:
    """
    The options every benchmark script here shares: how long and how big
    (--quick, --smoke, --size, --runtime, --ramp, --repeat), --markdown,
    --wait-idle, --workdir and --keep. L{finish_common_options} fills in
    their defaults.
    """
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument(
        "--quick", action="store_true", help="3 s per fio run and a 256M image unless given"
    )
    speed.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--size", type=parse_size, help="image size (default 1G; --quick 256M)")
    parser.add_argument("--runtime", type=int, help="seconds measured per fio run (default 10)")
    parser.add_argument(
        "--ramp", type=int, help="seconds of warm-up before each fio run (default 1)"
    )
    parser.add_argument("--repeat", type=int, help="passes over everything; medians are reported")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown too")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the CPUs to be idle (default 0)",
    )
    parser.add_argument(
        "--max-steal",
        type=float,
        default=5.0,
        metavar="PCT",
        help=(
            "run a fio run again (at most twice more, keeping the one with the least) when the"
            " hypervisor took more than PCT%% of the CPUs during it (default 5; 100: never)"
        ),
    )
    parser.add_argument("--workdir", type=Path, help="where the images and logs go (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help=keep_help)


def finish_common_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """
    Fill in the defaults --quick and --smoke imply for the options of
    L{add_common_options}, and check their ranges (C{parser.error} if not).
    """

    def pick(value: Any, full: Any, quick: Any, smoke: Any) -> Any:
        if value is not None:
            return value
        return smoke if args.smoke else quick if args.quick else full

    args.runtime = pick(args.runtime, 10, 3, 1)
    args.size = pick(args.size, GiB, 256 * MiB, 32 * MiB)
    args.ramp = pick(args.ramp, 1, 1, 0)
    args.repeat = pick(args.repeat, 1, 1, 1)
    if not 1 <= args.runtime <= 600:
        parser.error("--runtime must be 1..600 seconds")
    if not 0 <= args.ramp <= 60:
        parser.error("--ramp must be 0..60 seconds")
    if not 0 <= args.wait_idle <= 3600:
        parser.error("--wait-idle must be 0..3600 seconds")
    if not 0 <= args.max_steal <= 100:
        parser.error("--max-steal must be 0..100 (percent)")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be 1..20")
    if args.size < 16 * MiB or args.size % MiB:
        parser.error("--size must be a whole number of MiB, at least 16M")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """
    The command line, with the defaults --quick and --smoke imply filled in.
    """
    names = [w.name for w in WORKLOADS]
    parser = argparse.ArgumentParser(
        description=(
            "Compare twisted-nbd with qemu-nbd, nbdkit (file, memory, Python plugins) and "
            "nbd-server on 127.0.0.1: fio workloads, nbdcopy, --workers scaling, RSS."
        ),
        epilog=(
            f"Workloads: {', '.join(names)}. Servers: file family "
            f"{', '.join(FAMILY_SERVERS[FILE])}; ram family {', '.join(FAMILY_SERVERS[RAM])}."
        ),
    )
    add_common_options(
        parser,
        smoke_help="check that the benchmark works (not for numbers): a 32M image, 1 s runs, "
        f"no ramp, one pass, workloads {','.join(SMOKE_WORKLOADS)}, servers "
        f"{','.join(SMOKE_SERVERS)}, --workers 1; each unless given",
        keep_help="keep the work directory (images, logs, fio JSON)",
    )
    parser.add_argument(
        "--servers",
        help=f"comma-separated subset of {','.join(ALL_SERVERS)} (a server named here must run)",
    )
    parser.add_argument(
        "--families", help=f"comma-separated subset of {','.join(ALL_FAMILIES)} (default both)"
    )
    parser.add_argument(
        "--sections", help=f"comma-separated subset of {','.join(ALL_SECTIONS)} (default all)"
    )
    parser.add_argument("--workloads", help="comma-separated subset of the fio workloads")
    parser.add_argument(
        "--workers",
        help="comma-separated values of twistd nbd --workers for the workers section (default 1,2)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where the JSON goes (default bench/results/DATE-HOST.json, DATE in UTC)",
    )
    parser.add_argument(
        "--chart", type=Path, help="where the PNG chart goes (default: the JSON's path, .png)"
    )
    parser.add_argument("--no-chart", action="store_true", help="draw no chart")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the client (fio, nbdcopy) to CPU 0 and the server to CPU 1 "
        "(default: both float on all CPUs)",
    )
    parser.add_argument(
        "--twisted-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra option for 'twistd nbd', e.g. --twisted-arg=--max-queue-depth=128",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record twisted-nbd's fio runs with py-spy into DIR and print its hot spots "
        "(this slows twisted-nbd down: use for profiling, not for numbers)",
    )
    args = parser.parse_args(argv)
    finish_common_options(parser, args)
    args.explicit_servers = args.servers is not None
    servers = split_list(args.servers or ",".join(SMOKE_SERVERS if args.smoke else DEFAULT_SERVERS))
    servers = [SERVER_ALIASES.get(s, s) for s in servers]
    unknown = set(servers) - set(ALL_SERVERS)
    if unknown or not servers:
        parser.error(f"--servers: choose from {', '.join(ALL_SERVERS)}")
    args.servers = [s for s in ALL_SERVERS if s in servers]
    args.explicit_families = args.families is not None
    families = split_list(args.families or ",".join(ALL_FAMILIES))
    if set(families) - set(ALL_FAMILIES) or not families:
        parser.error(f"--families: choose from {', '.join(ALL_FAMILIES)}")
    args.families = [f for f in ALL_FAMILIES if f in families]
    args.explicit_sections = args.sections is not None
    sections = split_list(args.sections or ",".join(ALL_SECTIONS))
    if set(sections) - set(ALL_SECTIONS) or not sections:
        parser.error(f"--sections: choose from {', '.join(ALL_SECTIONS)}")
    args.sections = [s for s in ALL_SECTIONS if s in sections]
    default_workloads = ",".join(SMOKE_WORKLOADS) if args.smoke else ",".join(names)
    chosen = split_list(args.workloads or default_workloads)
    if set(chosen) - set(names) or not chosen:
        parser.error(f"--workloads: choose from {', '.join(names)}")
    args.workloads = [w for w in WORKLOADS if w.name in chosen]
    try:
        workers = [int(n) for n in split_list(args.workers or ("1" if args.smoke else "1,2"))]
    except ValueError:
        parser.error("--workers: a comma-separated list of numbers, e.g. 1,2")
    if not workers or not all(1 <= n <= 64 for n in workers):
        parser.error("--workers: numbers from 1 to 64")
    args.workers = sorted(set(workers))
    if args.no_chart and args.chart is not None:
        parser.error("--chart and --no-chart contradict each other")
    return args


def select_servers(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, str]]:
    """
    The servers that run in each family, and why the others were left out.

    @raise BenchError: twisted-nbd cannot run, or a server named with
        --servers is not installed.
    """
    wanted = {s for f in args.families for s in FAMILY_SERVERS[f] if s in args.servers}
    skipped: dict[str, str] = {}
    for name in ALL_SERVERS:
        if name in wanted:
            why = check_server(name)
            if why is not None:
                skipped[name] = why
    if TWISTED in skipped:
        raise BenchError(skipped[TWISTED])
    if args.explicit_servers and skipped:
        raise BenchError(
            "missing servers named with --servers:\n  - "
            + "\n  - ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    families = {
        family: [s for s in FAMILY_SERVERS[family] if s in wanted and s not in skipped]
        for family in args.families
    }
    return {f: s for f, s in families.items() if s}, skipped


def default_json_path(started: datetime.datetime) -> Path:
    """
    bench/results/DATE-HOST.json, DATE in UTC to the minute.
    """
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname().split(".")[0]) or "host"
    return RESULTS_DIR / f"{started:%Y-%m-%d-%H%M}-{host}.json"


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """
    Unwind through the finally clauses, which stop the servers (once: later SIGTERMs wait).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; 0 if every run worked, 1 if some failed, 2 if it could not run.
    """
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    started = datetime.datetime.now(datetime.UTC)
    json_path: Path = args.json or default_json_path(started)
    chart_path: Path | None = None if args.no_chart else args.chart or json_path.with_suffix(".png")
    notes: list[str] = []
    try:
        problems = check_tools(
            args.sections, args.families, args.pin, args.py_spy is not None, args.chart is not None
        )
        if problems:
            raise BenchError("missing tools:\n  - " + "\n  - ".join(problems))
        families, skipped = select_servers(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    for name, why in skipped.items():
        notes.append(f"{name} skipped: {why}")
    if chart_path is not None and args.chart is None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes.append("no chart: matplotlib is not installed (pip install matplotlib)")
            chart_path = None
    supported, why_not = (False, "")
    if WORKERS in args.sections:
        supported, why_not = workers_supported()
        if not supported:
            notes.append(f"workers section skipped: {why_not}")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="twisted-nbd-bench-", dir=args.workdir))
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    config = Config(
        families=families,
        workloads=args.workloads,
        sections=args.sections,
        size=args.size,
        runtime=args.runtime,
        ramp=args.ramp,
        repeat=args.repeat,
        pin=args.pin,
        twisted_args=args.twisted_arg,
        workers=args.workers,
        workers_supported=supported,
        workdir=workdir,
        pyspy_dir=args.py_spy,
        max_steal=args.max_steal,
    )
    runner: Runner | None = None
    try:
        everything = sorted({s for servers in families.values() for s in servers})
        found = versions(everything)
        host = machine()
        print(f"machine: {host['cpus']} CPUs ({host['cpu model']}), kernel {host['kernel']}")
        print("versions: " + "; ".join(f"{k} {v}" for k, v in found.items()))
        for note in notes:
            print(f"note: {note}")
        for family, servers in families.items():
            print(f"{family} family: {', '.join(servers)}")
        host["busy before the run"] = round(wait_until_idle(args.wait_idle), 2)
        if host["busy before the run"] > 0.15:
            print(
                f"warning: the CPUs were {100 * host['busy before the run']:.0f}% busy before "
                "the run: something else is running, and the numbers will suffer"
            )
        if (host["cpus"] or 1) <= 2 and not config.pin:
            print("note: the clients and the server share this machine's CPUs")
        file_servers = families.get(FILE, [])
        print(
            f"preparing a {human_size(config.size)} reference image and "
            f"{len(file_servers)} copies in {workdir}"
        )
        images = make_images(workdir, config.size, file_servers, len(families.get(RAM, [])))
        runner = Runner(config, images)
        clock = time.monotonic()
        runner.run()
        elapsed = time.monotonic() - clock
        document = build_document(config, runner, host, found, started, notes, skipped, elapsed)
        print()
        print(
            f"{human_size(config.size)} image, {config.runtime} s per fio run after "
            f"{config.ramp} s ramp, {config.repeat} pass(es), medians; ratios are twisted-nbd's "
            f"IOPS (or MiB/s) over the peer's; measured in {elapsed:.0f} s"
        )
        print(report(document, config, markdown=False))
        if args.markdown:
            print("\n== The same tables in Markdown")
            print(report(document, config, markdown=True))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {json_path}")
        if chart_path is not None:
            draw_chart(document, chart_path)
            print(f"wrote {chart_path}")
        if config.pyspy_dir is not None:
            wall = PySpy.RATE * (config.runtime + config.ramp)
            for profile in sorted(config.pyspy_dir.glob("*.txt")):
                print(f"\npy-spy {profile}:")
                print("\n".join(summarize_profile(profile, wall)))
        if args.keep:
            print(f"kept {workdir}")
        runs: list[Result | CopyResult] = [*runner.results, *runner.copies]
        return 0 if all(r.ok for r in runs) else 1
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping the servers", file=sys.stderr)
        return 130
    except SystemExit:
        print("\nbench: terminated; stopping the servers", file=sys.stderr)
        raise
    finally:
        if runner is not None:
            runner.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def build_document(
    config: Config,
    runner: Runner,
    host: dict[str, Any],
    found: dict[str, str],
    started: datetime.datetime,
    notes: list[str],
    skipped: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    """
    Everything the run measured, for --json (and the tables and chart, drawn from it).
    """
    summary = {
        family: summarize_fio(config, runner.results, family)
        for family in config.families
        if FIO in config.sections
    }
    rss = summarize_rss(runner.results, runner.copies)
    workers: dict[str, Any] = {
        "supported": config.workers_supported,
        "skipped": None,
        "values": config.workers,
        "summary": [],
    }
    if WORKERS not in config.sections:
        workers["skipped"] = "not asked for (--sections)"
    elif not config.workers_supported:
        workers["skipped"] = "twistd nbd has no --workers option yet"
    elif TWISTED not in config.families.get(FILE, []):
        workers["skipped"] = "twisted-nbd's file family is not run"
    else:
        workers["summary"] = summarize_workers(config, runner.results, runner.copies)
    commands = {
        family: {
            name: server_launch(
                name,
                family,
                "PORT",
                Path("LOG"),
                image="IMG",
                size=config.size,
                twisted_args=config.twisted_args,
            ).argv
            for name in servers
        }
        for family, servers in config.families.items()
    }
    example = WORKLOADS_BY_NAME[WORKER_WORKLOADS[0]]
    return {
        "schema": 2,
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": host,
        "versions": found,
        "notes": notes,
        "config": {
            "size": config.size,
            "runtime_s": config.runtime,
            "ramp_s": config.ramp,
            "repeat": config.repeat,
            "pin": config.pin,
            "families": config.families,
            "sections": config.sections,
            "skipped_servers": skipped,
            "twisted_args": config.twisted_args,
            "workers": config.workers,
            "workloads": [dataclasses.asdict(w) for w in config.workloads],
            "commands": commands,
            "nbd_server_config": nbd_server_config("PORT", "IMG"),
            "fio": fio_argv(config.workloads[0], "URI", config.runtime, config.ramp, Path("OUT")),
            "fio_workers": fio_argv(
                example, "URI", config.runtime, config.ramp, Path("OUT"), WORKER_JOBS
            ),
            "nbdcopy": nbdcopy_argv("SOURCE", "DESTINATION", 4),
        },
        "summary": summary,
        "results": [dataclasses.asdict(r) for r in runner.results],
        "nbdcopy": {
            "summary": summarize_copies(config, runner.copies)
            if NBDCOPY in config.sections
            else [],
            "results": [dataclasses.asdict(c) for c in runner.copies if c.section == NBDCOPY],
        },
        "fills": [dataclasses.asdict(c) for c in runner.copies if c.section == "fill"],
        "workers": {
            **workers,
            # The fio runs of this section are in "results", with section "workers".
            "copies": [dataclasses.asdict(c) for c in runner.copies if c.section == WORKERS],
        },
        "rss": rss,
        "targets": evaluate_targets(summary, rss),
    }


if __name__ == "__main__":
    sys.exit(main())
