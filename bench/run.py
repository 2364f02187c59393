#!/usr/bin/env python3
"""
Throughput benchmark: twisted-nbd against qemu-nbd and nbdkit, driven by fio.

Each server serves its own copy of the same raw image, filled with random
data and warmed into the page cache, on 127.0.0.1. fio's C{nbd} engine
(libnbd) runs the workloads one after the other; for each workload every
server is started, measured and stopped in turn, so the servers are compared
side by side under the same conditions of the same run.

    python3 bench/run.py [--quick] [--size 1G] [--runtime 10] [--json out.json]

See bench/README.md and docs/benchmarks.md.
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
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: twistd's module has no C{__main__} guard (C{python3 -m twisted.scripts.twistd}
#: silently does nothing), so call its entry point as the C{twistd} script does.
TWISTD_SHIM = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

TWISTED = "twisted-nbd"
QEMU = "qemu-nbd"
NBDKIT = "nbdkit"
ALL_SERVERS = (TWISTED, QEMU, NBDKIT)
#: The peers twisted-nbd's numbers are divided by.
PEERS = (QEMU, NBDKIT)

#: Bounds on every wait, in seconds.
START_DEADLINE = 30.0
STOP_GRACE = 10.0
FIO_SLACK = 60.0
TOOL_TIMEOUT = 60.0


class BenchError(Exception):
    """
    A failure the benchmark reports in one line and exits on.
    """


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        """
        The section of fio's job report that holds this workload's numbers.
        """
        return "write" if "write" in self.rw else "read"


WORKLOADS = (
    Workload("seq-read-1M-qd8", "read", "1M", 8),
    Workload("seq-write-1M-qd8", "write", "1M", 8),
    Workload("rand-read-4K-qd32", "randread", "4k", 32),
    Workload("rand-write-4K-qd32", "randwrite", "4k", 32),
    Workload("rand-read-4K-qd1", "randread", "4k", 1),
)


@dataclasses.dataclass
class Result:
    """
    One fio run of one workload against one server.
    """

    workload: str
    server: str
    repeat: int
    ok: bool
    error: str | None = None
    mib_s: float = 0.0
    iops: float = 0.0
    lat_mean_us: float = 0.0
    clat_p99_us: float = 0.0
    #: CPU time the server used during the fio run, in percent of one core.
    server_cpu_pct: float = 0.0
    #: fio's own CPU use (user + system), in percent of one core.
    fio_cpu_pct: float = 0.0
    #: CPU time of every other process during the run, in percent of one
    #: core: anything else running disturbs the numbers.
    other_cpu_pct: float = 0.0
    #: Interrupts and softirqs (loopback TCP's receive path), charged to no process.
    irq_cpu_pct: float = 0.0
    #: Time the hypervisor gave to others: also disturbs the numbers.
    steal_cpu_pct: float = 0.0


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
    for unit, scale in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


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
    return text.strip().splitlines()[0] if text.strip() else ""


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def twisted_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# -- Pre-flight checks ------------------------------------------------------------------------


def check_tools(servers: Sequence[str], pin: bool, pyspy: bool) -> None:
    """
    Fail with one clear message listing everything that is missing.
    """
    problems: list[str] = []
    if shutil.which("fio") is None:
        problems.append("fio is not installed (apt-get install fio)")
    else:
        code, out = tool_output(["fio", "--enghelp=nbd"])
        if code != 0 or "uri" not in out:
            problems.append(
                "this fio has no 'nbd' ioengine (Debian's fio has it, via libnbd: "
                "apt-get install fio libnbd0)"
            )
    if QEMU in servers and shutil.which("qemu-nbd") is None:
        problems.append(
            "qemu-nbd is not installed (apt-get install qemu-utils), or leave it out of --servers"
        )
    if NBDKIT in servers:
        if shutil.which("nbdkit") is None:
            problems.append(
                "nbdkit is not installed (apt-get install nbdkit), or leave it out of --servers"
            )
        elif tool_output(["nbdkit", "file", "--dump-plugin"])[0] != 0:
            problems.append("nbdkit has no 'file' plugin (apt-get install nbdkit)")
    if TWISTED in servers:
        code, out = tool_output([sys.executable, "-c", TWISTD_SHIM, "nbd", "--help"])
        if code != 0 or "--image" not in out:
            problems.append(
                "the twistd 'nbd' plugin is not usable from "
                f"{REPO_ROOT} (twisted_nbd/tap.py and twisted/plugins/twisted_nbd_dropin.py; "
                f"is Twisted installed for {sys.executable}?): {first_line(out)}"
            )
    if pin and shutil.which("taskset") is None:
        problems.append("--pin needs taskset (apt-get install util-linux)")
    if pyspy and shutil.which("py-spy") is None:
        problems.append("--py-spy needs py-spy (pip install py-spy)")
    if problems:
        raise BenchError("missing tools:\n  - " + "\n  - ".join(problems))


def versions(servers: Sequence[str]) -> dict[str, str]:
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
    if NBDKIT in servers:
        found["nbdkit"] = first_line(tool_output(["nbdkit", "--version"])[1])
    code, out = tool_output(["nbdinfo", "--version"])
    if code == 0:
        found["libnbd"] = " ".join(line.strip() for line in out.splitlines() if "libnbd" in line)
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
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user).
        user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
        tick = os.sysconf("SC_CLK_TCK")
        return cls(
            (user + nice + system) / tick,
            (irq + softirq) / tick,
            steal / tick,
            (idle + iowait) / tick,
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


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu model": model,
        "memory GiB": round(memory / GiB, 1),
        "kernel": platform.release(),
        "system": platform.platform(),
    }


# -- The image --------------------------------------------------------------------------------


def make_images(workdir: Path, size: int, servers: Sequence[str]) -> dict[str, Path]:
    """
    One copy per server of a raw image full of random data, in the page cache.
    """
    needed = size * (len(servers) + 1) + 256 * MiB
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise BenchError(
            f"{workdir} has {free / GiB:.1f} GiB free; the images need {needed / GiB:.1f} GiB "
            "(use a smaller --size or another --workdir)"
        )
    base = workdir / "base.img"
    chunk = 4 * MiB
    with base.open("wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        if size % chunk:
            f.write(os.urandom(size % chunk))
    images = {}
    for server in servers:
        image = workdir / f"{server}.img"
        shutil.copyfile(base, image)
        images[server] = image
    base.unlink()
    os.sync()
    for image in images.values():
        warm(image)
    return images


def warm(path: Path) -> None:
    """
    Read a file once so that it sits in the page cache.
    """
    buffer = bytearray(8 * MiB)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


# -- Servers ----------------------------------------------------------------------------------


def server_argv(
    name: str, image: Path, port: int | str, log: Path, twisted_args: Sequence[str]
) -> list[str]:
    if name == TWISTED:
        return [
            sys.executable, "-c", TWISTD_SHIM,
            "-n", "--pidfile=", f"--logfile={log}",
            "nbd", "--image", str(image), "--listen", f"tcp:{port}:interface={HOST}",
            *twisted_args,
        ]  # fmt: skip
    if name == QEMU:
        return [
            "qemu-nbd", "-f", "raw", "-b", HOST, "-p", str(port), "-x", "",
            "--persistent", "--shared=8", "--cache=writeback", str(image),
        ]  # fmt: skip
    if name == NBDKIT:
        return [
            "nbdkit", "-f", "--exit-with-parent", "-i", HOST, "-p", str(port),
            "file", str(image),
        ]  # fmt: skip
    raise ValueError(name)


class Server:
    """
    One server process, in its own process group, with a bounded start and stop.
    """

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=twisted_env() if self.name == TWISTED else None,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode} while starting; "
                    f"its log ({self.log}):\n{tail(self.log)}"
                )
            if nbd_greets(port):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not accept NBD connections on {HOST}:{port} within "
                    f"{START_DEADLINE:.0f} s; its log ({self.log}):\n{tail(self.log)}"
                )
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        """
        User plus system CPU time of the process and all its threads so far.
        """
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # Fields 14 and 15 of stat(5), counted after "pid (comm)" as 1 and 2.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """
        SIGTERM to the process group, then SIGKILL if it outstays its grace.
        """
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} ignored SIGTERM for {STOP_GRACE:.0f} s: SIGKILL")
                signal_group(process.pid, signal.SIGKILL)
                process.wait(STOP_GRACE)
        self.process = None


def signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


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


# -- fio --------------------------------------------------------------------------------------


def fio_argv(
    workload: Workload, port: int | str, runtime: int, ramp: int, output: Path
) -> list[str]:
    return [
        "fio",
        f"--name={workload.name}",
        "--ioengine=nbd",
        f"--uri=nbd://{HOST}:{port}/",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        "--numjobs=1",
        "--time_based",
        f"--runtime={runtime}s",
        f"--ramp_time={ramp}s",
        "--output-format=json",
        f"--output={output}",
    ]


def parse_fio(path: Path, workload: Workload) -> dict[str, float]:
    text = path.read_text()
    # Only the JSON document; be lenient about anything fio printed before it.
    report = json.loads(text[text.index("{") :])
    job = report["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    section = job[workload.direction]
    if not section.get("total_ios"):
        raise BenchError("fio did no I/O")
    percentiles = section.get("clat_ns", {}).get("percentile", {})
    return {
        "mib_s": section["bw_bytes"] / MiB,
        "iops": section["iops"],
        "lat_mean_us": section["lat_ns"]["mean"] / 1000,
        "clat_p99_us": percentiles.get("99.000000", 0) / 1000,
    }


class PySpy:
    """
    py-spy sampling one twisted-nbd run into collapsed stacks.

    Only the thread holding the GIL is sampled (C{--gil}), so the profile
    shows where the interpreter spends its time, per thread (C{--threads}).
    py-spy stops the process for each sample, which slows it down: a run
    with a profile measures the profile, not the server.
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
                    "--rate", str(self.RATE), "--gil", "--threads",
                    "--duration", str(duration), "--output", str(output),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def finish(self, timeout: float) -> None:
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
        frames = stack.split(";")
        thread = "?"
        match = re.fullmatch(r"thread \(\w+\):? ?(.*)", frames[0])
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
    servers: list[str]
    workloads: list[Workload]
    size: int
    runtime: int
    ramp: int
    repeat: int
    pin: bool
    twisted_args: list[str]
    workdir: Path
    pyspy_dir: Path | None


def run_one(
    config: Config, server_name: str, image: Path, workload: Workload, repeat: int
) -> Result:
    tag = f"{workload.name}.{server_name}.{repeat}"
    log = config.workdir / f"{tag}.server.log"
    port = free_port()
    argv = server_argv(server_name, image, port, log, config.twisted_args)
    if config.pin:
        argv = ["taskset", "-c", "1", *argv]
    server = Server(server_name, argv, log)
    output = config.workdir / f"{tag}.fio.json"
    fio = fio_argv(workload, port, config.runtime, config.ramp, output)
    if config.pin:
        fio = ["taskset", "-c", "0", *fio]
    profiler: PySpy | None = None
    try:
        server.start(port)
        if config.pyspy_dir is not None and server_name == TWISTED:
            profiler = PySpy(
                server.pid,
                config.pyspy_dir / f"{workload.name}.{repeat}.txt",
                config.runtime + config.ramp,
            )
        cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
        fio_before, machine_before = children_cpu_seconds(), CPUTimes.now()
        with (config.workdir / f"{tag}.fio.log").open("wb") as fio_log:
            done = subprocess.run(
                fio,
                stdin=subprocess.DEVNULL,
                stdout=fio_log,
                stderr=subprocess.STDOUT,
                timeout=config.runtime + config.ramp + FIO_SLACK,
            )
        cpu = server.cpu_seconds() - cpu_before
        wall = time.monotonic() - wall_before
        # fio (its job process is its child) was waited for: its CPU time is in ours.
        fio_cpu = children_cpu_seconds() - fio_before
        spent = CPUTimes.now() - machine_before
        if not server.alive():
            raise BenchError(f"{server_name} died during the run; its log:\n{tail(log)}")
        if done.returncode != 0:
            raise BenchError(
                f"fio exited with {done.returncode}; its log:\n"
                f"{tail(config.workdir / f'{tag}.fio.log')}"
            )
        numbers = parse_fio(output, workload)
        return Result(
            workload.name,
            server_name,
            repeat,
            ok=True,
            mib_s=numbers["mib_s"],
            iops=numbers["iops"],
            lat_mean_us=numbers["lat_mean_us"],
            clat_p99_us=numbers["clat_p99_us"],
            server_cpu_pct=100 * cpu / wall,
            fio_cpu_pct=100 * fio_cpu / wall,
            other_cpu_pct=max(0.0, 100 * (spent.processes - cpu - fio_cpu) / wall),
            irq_cpu_pct=100 * spent.interrupts / wall,
            steal_cpu_pct=100 * spent.steal / wall,
        )
    except subprocess.TimeoutExpired:
        return Result(workload.name, server_name, repeat, False, "fio timed out")
    except (BenchError, OSError, ValueError, KeyError) as e:
        return Result(workload.name, server_name, repeat, False, f"{type(e).__name__}: {e}")
    finally:
        if profiler is not None:
            profiler.finish(STOP_GRACE + 5)
        server.stop()
        # Dirty pages from the write workloads are flushed now, not during the next run.
        os.sync()


def run_all(config: Config, images: dict[str, Path]) -> list[Result]:
    results: list[Result] = []
    for repeat in range(config.repeat):
        # Each pass starts with another server, so none is always first after a change.
        shift = repeat % len(config.servers)
        order = config.servers[shift:] + config.servers[:shift]
        for workload in config.workloads:
            for server_name in order:
                label = f"[{repeat + 1}/{config.repeat}] {workload.name:<20} {server_name:<12}"
                print(label, end=" ", flush=True)
                result = run_one(config, server_name, images[server_name], workload, repeat)
                results.append(result)
                if result.ok:
                    print(
                        f"{result.mib_s:9.1f} MiB/s {result.iops:10.0f} IOPS"
                        f"  CPU: server {result.server_cpu_pct:3.0f}%"
                        f"  fio {result.fio_cpu_pct:3.0f}%"
                        f"  other {result.other_cpu_pct:3.0f}%"
                        f"  irq {result.irq_cpu_pct:3.0f}%"
                        f"  steal {result.steal_cpu_pct:3.0f}%"
                    )
                else:
                    print(f"FAILED: {result.error}")
    return results


def summarize(config: Config, results: list[Result]) -> list[dict[str, Any]]:
    """
    Per workload and server the median over the repeats, and twisted-nbd's ratios.
    """
    rows = []
    fields = (
        "mib_s",
        "iops",
        "lat_mean_us",
        "clat_p99_us",
        "server_cpu_pct",
        "fio_cpu_pct",
        "other_cpu_pct",
        "irq_cpu_pct",
        "steal_cpu_pct",
    )
    for workload in config.workloads:
        row: dict[str, Any] = {
            "workload": workload.name,
            "rw": workload.rw,
            "bs": workload.bs,
            "iodepth": workload.iodepth,
            "servers": {},
            "ratios": {},
        }
        for server in config.servers:
            good = [r for r in results if r.workload == workload.name and r.server == server]
            good = [r for r in good if r.ok]
            if good:
                row["servers"][server] = {
                    f: statistics.median(getattr(r, f) for r in good) for f in fields
                }
        ours = row["servers"].get(TWISTED)
        for peer in PEERS:
            theirs = row["servers"].get(peer)
            if ours and theirs and theirs["iops"]:
                row["ratios"][f"{TWISTED}/{peer}"] = ours["iops"] / theirs["iops"]
        rows.append(row)
    return rows


def render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in [header, *body]
    )


def table(config: Config, rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    Throughput per workload and server, and twisted-nbd's ratios.
    """
    servers = config.servers
    ratio_names = [f"{TWISTED}/{p}" for p in PEERS if TWISTED in servers and p in servers]
    header = ["workload"]
    for server in servers:
        header += [f"{server} MiB/s", f"{server} IOPS"]
    header += ratio_names
    body = []
    for row in rows:
        cells = [row["workload"]]
        for server in servers:
            numbers = row["servers"].get(server)
            if numbers is None:
                cells += ["failed", "failed"]
            else:
                cells += [f"{numbers['mib_s']:.1f}", f"{numbers['iops']:.0f}"]
        for name in ratio_names:
            ratio = row["ratios"].get(name)
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        body.append(cells)
    return render(header, body, markdown)


def detail_table(config: Config, rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    Latency and CPU use per workload and server.
    """
    header = [
        "workload",
        "server",
        "mean lat us",
        "p99 clat us",
        "server CPU %",
        "fio CPU %",
        "other CPU %",
        "irq CPU %",
        "steal %",
    ]
    body = []
    for row in rows:
        for server in config.servers:
            n = row["servers"].get(server)
            if n is None:
                body.append([row["workload"], server] + ["failed"] * (len(header) - 2))
                continue
            body.append(
                [
                    row["workload"],
                    server,
                    f"{n['lat_mean_us']:.0f}",
                    f"{n['clat_p99_us']:.0f}",
                    f"{n['server_cpu_pct']:.0f}",
                    f"{n['fio_cpu_pct']:.0f}",
                    f"{n['other_cpu_pct']:.0f}",
                    f"{n['irq_cpu_pct']:.0f}",
                    f"{n['steal_cpu_pct']:.0f}",
                ]
            )
    return render(header, body, markdown)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [w.name for w in WORKLOADS]
    parser = argparse.ArgumentParser(
        description=(
            "Compare twisted-nbd with qemu-nbd and nbdkit using fio's nbd engine, "
            "on 127.0.0.1, workload by workload."
        ),
        epilog="Workloads: " + ", ".join(names),
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s per run and a 256M image unless given"
    )
    parser.add_argument("--size", type=parse_size, help="image size (default 1G; --quick 256M)")
    parser.add_argument("--runtime", type=int, help="seconds measured per run (default 10)")
    parser.add_argument(
        "--ramp", type=int, default=1, help="seconds of warm-up before each run (default 1)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="passes over everything; medians are reported"
    )
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help=f"comma-separated subset of {','.join(ALL_SERVERS)}",
    )
    parser.add_argument(
        "--workloads", default=",".join(names), help="comma-separated subset of the workloads"
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--markdown", action="store_true", help="print the results table as Markdown too"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin fio to CPU 0 and the server to CPU 1 (default: both float on all CPUs)",
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
        help="record twisted-nbd with py-spy into DIR and print its hot spots "
        "(this slows twisted-nbd down: use for profiling, not for numbers)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the CPUs to be idle (default 0)",
    )
    parser.add_argument("--workdir", type=Path, help="where the images and logs go (default: /tmp)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (images, logs, fio JSON)"
    )
    args = parser.parse_args(argv)
    if args.runtime is None:
        args.runtime = 3 if args.quick else 10
    if args.size is None:
        args.size = 256 * MiB if args.quick else GiB
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - set(ALL_SERVERS)
    if unknown or not servers:
        parser.error(f"--servers: choose from {', '.join(ALL_SERVERS)}")
    args.servers = [s for s in ALL_SERVERS if s in servers]
    chosen = [w for w in args.workloads.split(",") if w]
    unknown = set(chosen) - set(names)
    if unknown or not chosen:
        parser.error(f"--workloads: choose from {', '.join(names)}")
    args.workloads = [w for w in WORKLOADS if w.name in chosen]
    if not 1 <= args.runtime <= 600:
        parser.error("--runtime must be 1..600 seconds")
    if not 0 <= args.ramp <= 60:
        parser.error("--ramp must be 0..60 seconds")
    if not 0 <= args.wait_idle <= 3600:
        parser.error("--wait-idle must be 0..3600 seconds")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be 1..20")
    if args.size < 16 * MiB or args.size % MiB:
        parser.error("--size must be a whole number of MiB, at least 16M")
    return args


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind through the finally clauses, which stop the servers.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        check_tools(args.servers, args.pin, args.py_spy is not None)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="twisted-nbd-bench-", dir=args.workdir))
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    config = Config(
        servers=args.servers,
        workloads=args.workloads,
        size=args.size,
        runtime=args.runtime,
        ramp=args.ramp,
        repeat=args.repeat,
        pin=args.pin,
        twisted_args=args.twisted_arg,
        workdir=workdir,
        pyspy_dir=args.py_spy,
    )
    cleanup: list[Callable[[], None]] = []
    if not args.keep:
        cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    try:
        found = versions(config.servers)
        host = machine()
        print(f"machine: {host['cpus']} CPUs ({host['cpu model']}), kernel {host['kernel']}")
        print("versions: " + "; ".join(f"{k} {v}" for k, v in found.items()))
        host["busy before the run"] = round(wait_until_idle(args.wait_idle), 2)
        if host["busy before the run"] > 0.15:
            print(
                f"warning: the CPUs were {100 * host['busy before the run']:.0f}% busy before "
                "the run: something else is running, and the numbers will suffer"
            )
        if (host["cpus"] or 1) <= 2 and not config.pin:
            print("note: fio and the server share this machine's CPUs (see docs/benchmarks.md)")
        copies = f"{len(config.servers)} image copies of {human_size(config.size)}"
        print(f"preparing {copies} in {workdir}")
        images = make_images(workdir, config.size, config.servers)
        started = datetime.datetime.now(datetime.UTC)
        results = run_all(config, images)
        rows = summarize(config, results)
        print()
        print(
            f"{human_size(config.size)} image, {config.runtime} s per run after "
            f"{config.ramp} s ramp, {config.repeat} pass(es); ratios are twisted-nbd's IOPS "
            "over the peer's"
        )
        print(table(config, rows, markdown=False))
        print()
        print(f"CPU use in % of one core (this machine has {host['cpus']}), over each run:")
        print(detail_table(config, rows, markdown=False))
        if args.markdown:
            print()
            print(table(config, rows, markdown=True))
            print()
            print(detail_table(config, rows, markdown=True))
        if args.json is not None:
            document = {
                "date": started.isoformat(timespec="seconds"),
                "machine": host,
                "versions": found,
                "config": {
                    "size": config.size,
                    "runtime_s": config.runtime,
                    "ramp_s": config.ramp,
                    "repeat": config.repeat,
                    "pin": config.pin,
                    "servers": config.servers,
                    "twisted_args": config.twisted_args,
                    "workloads": [dataclasses.asdict(w) for w in config.workloads],
                    "commands": {
                        s: server_argv(s, Path("IMG"), "PORT", Path("LOG"), config.twisted_args)
                        for s in config.servers
                    },
                    "fio": fio_argv(
                        config.workloads[0], "PORT", config.runtime, config.ramp, Path("OUT")
                    ),
                },
                "summary": rows,
                "results": [dataclasses.asdict(r) for r in results],
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"\nwrote {args.json}")
        if config.pyspy_dir is not None:
            wall = PySpy.RATE * (config.runtime + config.ramp)
            for profile in sorted(config.pyspy_dir.glob("*.txt")):
                print(f"\npy-spy {profile}:")
                print("\n".join(summarize_profile(profile, wall)))
        if args.keep:
            print(f"kept {workdir}")
        return 0 if all(r.ok for r in results) else 1
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    finally:
        for step in cleanup:
            step()


if __name__ == "__main__":
    sys.exit(main())
