"""
A throwaway single-node Ceph cluster for tests and benchmarks: one monitor,
one manager, one memstore OSD and (on demand) a radosgw S3 gateway, all on
127.0.0.1 with free ports, all state in one temporary folder.

Tests share one cluster per process::

    from tests.interop.ceph import require_ceph

    cluster = require_ceph()          # starts it the first time (about 6-10 s)
    cluster.conf, cluster.keyring     # paths for librados/librbd clients
    cluster.create_image("disk", 64 * 2**20)    # in pool "rbd"
    s3 = cluster.require_s3()         # starts radosgw + an S3 user on first use
    s3.endpoint, s3.access_key, s3.secret_key, s3.region

L{require_ceph} skips the test when Ceph is not installed, or fails it when
C{CI=true} (as L{require_tool} does); a cluster that does not start is
always a failure. The shared cluster is stopped when the process exits
(C{atexit}, so it works under pytest and trial alike). L{CephCluster} can
also be used directly (C{bench/ceph.py} does).

What is done and why follows C{docs/ceph-notes.md} of the shared notes:
every path is set in C{ceph.conf} (or the daemons write under C{/var}); the
cluster is ready only when the manager's own pool exists and every PG is
active+clean (C{ceph health} says OK earlier than that); the daemons stop in
the order radosgw, OSD, manager, monitor. The daemons run in the foreground
as children of this process (not daemonised), so they are stopped by their
L{subprocess.Popen}, and, when started from the main thread, die with this
process even if it is killed (C{PR_SET_PDEATHSIG}).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tests.interop.helpers import LOOPBACK, free_port, in_ci

__all__ = [
    "CephCluster",
    "CephStartError",
    "S3Credentials",
    "require_ceph",
    "shared_cluster",
]

#: The programs a cluster needs (Debian: ceph-mon ceph-mgr ceph-osd ceph-common).
CORE_PROGRAMS = ("monmaptool", "ceph-authtool", "ceph-mon", "ceph-mgr", "ceph-osd")
#: And the S3 gateway (Debian: radosgw).
RGW_PROGRAMS = ("radosgw", "radosgw-admin")

#: How long the core cluster may take to become ready.
START_TIMEOUT = 90.0
#: How long radosgw may take to answer HTTP.
RGW_TIMEOUT = 60.0
#: How long one daemon may take to exit after SIGTERM (then SIGKILL).
STOP_TIMEOUT = 15.0
#: How long one admin command may take.
COMMAND_TIMEOUT = 60.0
#: The memstore OSD's capacity (memory is used only for what is written).
DEFAULT_MEMSTORE_BYTES = 3 * 2**30
#: PGs of the "rbd" pool (one OSD serialises work per PG, so not just one).
RBD_POOL_PGS = 16


def _mgr_modules() -> str:
    """
    The manager's Python modules, none of them needed here: importing them
    takes half a minute of CPU on a busy 2-core machine (they are imported
    even when not enabled), and devicehealth creates a pool of its own
    (gotcha 1). The manager's C++ core still serves C{pg stat}.
    """
    folder = Path("/usr/share/ceph/mgr")
    return " ".join(sorted(p.name for p in folder.glob("*") if (p / "module.py").exists()))


class CephStartError(Exception):
    """The cluster did not come up; the message says which step failed."""


@dataclass(frozen=True)
class S3Credentials:
    """
    How to reach radosgw: path-style addressing (C{endpoint/bucket/key}),
    AWS signature v4 with any region name.
    """

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    user: str = "nbd-test"


#: prctl(2) option: the signal a child gets when its parent thread dies.
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL this child when its parent thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _port_is_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


class CephCluster:
    """
    A single-node Ceph cluster in C{root} (made if missing).

    @ivar root: the folder holding all its state.
    @ivar conf: the path of its C{ceph.conf}.
    @ivar keyring: the path of the keyring with C{client.admin}'s key.
    @ivar fsid: the cluster's id.
    """

    def __init__(
        self,
        root: Path | None = None,
        memstore_bytes: int = DEFAULT_MEMSTORE_BYTES,
        remove_root: bool | None = None,
    ) -> None:
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="nbd-ceph-"))
            if remove_root is None:
                remove_root = True
        self.root = Path(root)
        self.remove_root = bool(remove_root)
        self.memstore_bytes = memstore_bytes
        self.conf = self.root / "ceph.conf"
        self.keyring = self.root / "keyring"
        self.fsid = str(uuid.uuid4())
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._s3: S3Credentials | None = None
        self._rados: Any = None
        self.mon_ports = (0, 0)
        self.rgw_port = 0
        self.started = False
        self.start_seconds = 0.0
        self.rgw_seconds = 0.0

    # ------------------------------------------------------------ helpers

    def env(self) -> dict[str, str]:
        """An environment for Ceph's command-line tools that finds this cluster."""
        env = dict(os.environ)
        env["CEPH_CONF"] = str(self.conf)
        env["CEPH_KEYRING"] = str(self.keyring)
        return env

    def run(self, *argv: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> str:
        """
        Run a Ceph tool (C{ceph}, C{rbd}, C{rados}, C{radosgw-admin} ...)
        against this cluster; its standard output.

        @raise CephStartError: it failed or timed out (with C{check}).
        """
        command = [argv[0], "--conf", str(self.conf), *argv[1:]]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                timeout=timeout,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise CephStartError(f"{' '.join(command)} timed out after {timeout} s") from e
        if check and done.returncode != 0:
            raise CephStartError(
                f"{' '.join(command)} exited with {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()[-2000:]}"
            )
        return done.stdout.decode(errors="replace")

    def ceph_json(self, *argv: str) -> Any:
        """The JSON output of C{ceph ARGV --format json}."""
        out = self.run("ceph", "--connect-timeout", "15", *argv, "--format", "json")
        return json.loads(out) if out.strip() else None

    def command(self, prefix: str, target: str = "mon", **args: Any) -> Any:
        """
        A monitor (or, with C{target="mgr"}, manager) command through
        librados, much quicker than starting the C{ceph} tool (a Python
        program) each time; its JSON answer, or C{None}.

        @raise CephStartError: it failed.
        """
        handle = self._connect()
        request = json.dumps({"prefix": prefix, "format": "json", **args})
        send = handle.mgr_command if target == "mgr" else handle.mon_command
        ret, out, err = send(request, b"", timeout=int(COMMAND_TIMEOUT))
        if ret != 0:
            raise CephStartError(f"ceph {prefix} {args or ''} failed ({ret}): {err}")
        return json.loads(out) if out.strip() else None

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        in_main = threading.current_thread() is threading.main_thread()
        with log:
            self._processes[name] = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                # A child of a thread that ends would die with that thread.
                preexec_fn=_set_pdeathsig if in_main else None,
            )

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise CephStartError(
                        f"{name} exited with {process.returncode} while waiting for {what}"
                        f"{self._log_tail(name)}"
                    )
            if condition():
                return
            if time.monotonic() > deadline:
                raise CephStartError(f"not {what} after {timeout} s")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.5)

    def _log_tail(self, name: str) -> str:
        lines: list[str] = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            try:
                lines += path.read_text(errors="replace").splitlines()[-15:]
            except OSError:
                pass
        return ("; log tail:\n" + "\n".join(lines)) if lines else ""

    # ------------------------------------------------------------ start

    def _write_conf(self) -> None:
        r = self.root
        v2, v1 = self.mon_ports
        self.rgw_port = free_port()
        self.conf.write_text(
            f"""\
[global]
fsid = {self.fsid}
mon host = [v2:{LOOPBACK}:{v2},v1:{LOOPBACK}:{v1}]
mon initial members = a
public addr = {LOOPBACK}
cluster addr = {LOOPBACK}
public network = {LOOPBACK}/32
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {r}/keyring
run dir = {r}/run
pid file = {r}/run/$name.pid
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
crash dir = {r}/crash
exporter sock dir = {r}/run
mon data = {r}/data/$name
mgr data = {r}/data/$name
osd data = {r}/data/$name
rgw data = {r}/data/$name
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.1
mgr stats period = 1
mon mgr digest period = 1
mgr tick period = 1
mgr initial modules =
mgr disabled modules = {_mgr_modules()}
osd op num shards = 2
osd op num threads per shard = 2

[client.rgw.x]
rgw frontends = beast endpoint={LOOPBACK}:{self.rgw_port}
rgw thread pool size = 64
rgw dns name = {LOOPBACK}
"""
        )

    def _make_keyring(self) -> None:
        tool = "ceph-authtool"
        k = str(self.keyring)
        subprocess.run(
            [tool, "--create-keyring", k, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
            check=True,
            capture_output=True,
        )
        caps = {
            "client.admin": [
                "mon",
                "allow *",
                "osd",
                "allow *",
                "mgr",
                "allow *",
                "mds",
                "allow *",
            ],
            "mgr.x": ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"],
            "osd.0": ["mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *"],
            "client.rgw.x": ["mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw"],
        }
        for name, pairs in caps.items():
            argv = [tool, k, "--gen-key", "-n", name]
            for i in range(0, len(pairs), 2):
                argv += ["--cap", pairs[i], pairs[i + 1]]
            subprocess.run(argv, check=True, capture_output=True)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """
        Bring up the monitor, manager and OSD, create pool C{rbd} and wait
        until every PG is active+clean.

        @raise CephStartError: a step failed or the cluster was not ready
            within C{timeout} seconds (the daemons are stopped again).
        """
        started = time.monotonic()
        try:
            self._start(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.started = True
        self.start_seconds = time.monotonic() - started

    def _step(self, what: str) -> None:
        """Record how long the start took up to C{what} (in C{self.steps})."""
        self.steps.append((what, time.monotonic() - self._t0))

    def _start(self, deadline: float) -> None:
        self._t0 = time.monotonic()
        self.steps: list[tuple[str, float]] = []
        for program in CORE_PROGRAMS:
            if shutil.which(program) is None:
                raise CephStartError(f"the {program!r} program is missing")
        for sub in ("run", "log", "crash", "data/mon.a", "data/mgr.x", "data/osd.0"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Free ports are chosen now; another process may take one before
        # the monitor binds it: then the monitor exits and we try again.
        for attempt in range(3):
            self.mon_ports = (free_port(), free_port())
            self._write_conf()
            if attempt == 0:
                self._make_keyring()
            shutil.rmtree(self.root / "data/mon.a", ignore_errors=True)
            (self.root / "data/mon.a").mkdir()
            subprocess.run(
                [
                    "monmaptool",
                    "--create",
                    "--clobber",
                    "--fsid",
                    self.fsid,
                    "--addv",
                    "a",
                    f"[v2:{LOOPBACK}:{self.mon_ports[0]},v1:{LOOPBACK}:{self.mon_ports[1]}]",
                    str(self.root / "monmap"),
                ],
                check=True,
                capture_output=True,
            )
            self.run(
                "ceph-mon",
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                str(self.root / "monmap"),
                "--keyring",
                str(self.keyring),
            )
            self._spawn("mon.a", ["ceph-mon", "--conf", str(self.conf), "-i", "a", "-f"])
            try:
                self._wait(
                    lambda: _port_is_open(self.mon_ports[0]) and _port_is_open(self.mon_ports[1]),
                    min(20.0, deadline - time.monotonic()),
                    "the monitor listening",
                )
            except CephStartError:
                process = self._processes.pop("mon.a")
                if process.poll() is None or attempt == 2:
                    _stop_process(process)
                    raise
                continue
            break
        self._step("mon listening")
        self._connect()
        self._step("mon answers")
        self._spawn("mgr.x", ["ceph-mgr", "--conf", str(self.conf), "-i", "x", "-f"])
        osd_uuid = str(uuid.uuid4())
        answer = self.command("osd new", uuid=osd_uuid)
        osd_id = str(answer.get("osdid") if isinstance(answer, dict) else answer)
        if osd_id != "0":
            raise CephStartError(f"ceph osd new gave id {osd_id!r}, not 0")
        self._step("osd new")
        self.run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._step("osd mkfs")
        self._spawn("osd.0", ["ceph-osd", "--conf", str(self.conf), "-i", "0", "-f"])
        self._wait(
            lambda: self.command("osd stat").get("num_up_osds") == 1,
            deadline - time.monotonic(),
            "1 OSD up",
        )
        self._step("osd up")
        self.command("osd pool create", pool="rbd", pg_num=RBD_POOL_PGS, pgp_num=RBD_POOL_PGS)
        from twisted_nbd._ceph import import_rbd

        ioctx = self._connect().open_ioctx("rbd")
        try:
            import_rbd().RBD().pool_init(ioctx, False)  # rbd pool init
        finally:
            ioctx.close()
        self._step("pool rbd")
        self.wait_ready(deadline - time.monotonic(), ("rbd",))
        self._step("ready")

    def _pgs_clean(self, pools: Sequence[str]) -> bool:
        names = set(self.command("osd pool ls"))
        if not set(pools) <= names:
            return False
        stat = self.command("pg stat", target="mgr")
        # 16.2: {"pg_ready": true, "num_pg_by_state": [{"name": ..., "num": ...}], "num_pgs": N}
        summary = stat.get("pg_summary", stat)
        total = summary.get("num_pgs", 0)
        clean = sum(
            s["num"] for s in summary.get("num_pg_by_state", []) if s["name"] == "active+clean"
        )
        return bool(total) and clean == total

    def wait_ready(self, timeout: float, pools: Sequence[str] = ()) -> None:
        """
        Wait until C{pools} exist, every PG is active+clean and health is
        not an error.

        @raise CephStartError: not within C{timeout} seconds.
        """
        self._wait(lambda: self._pgs_clean(pools), timeout, f"pools {list(pools)} active+clean")
        health = self.command("health")
        if not health.get("checks", {}).get("MGR_MODULE_ERROR", {}).get("muted", True):
            # The always-on manager modules, disabled on purpose (see
            # _mgr_modules), count as failed: silence that.
            self.command("health mute", code="MGR_MODULE_ERROR", sticky=True)
            health = self.command("health")
        if health.get("status") == "HEALTH_ERR":
            raise CephStartError(f"cluster health is HEALTH_ERR: {health}")

    def require_s3(self) -> S3Credentials:
        """
        Start radosgw and create an S3 user, the first time; the user's
        credentials.

        @raise CephStartError: it did not come up.
        """
        with self._lock:
            if self._s3 is None:
                started = time.monotonic()
                for program in RGW_PROGRAMS:
                    if shutil.which(program) is None:
                        raise CephStartError(f"the {program!r} program is missing")
                (self.root / "data/client.rgw.x").mkdir(parents=True, exist_ok=True)
                self._spawn(
                    "client.rgw.x",
                    ["radosgw", "--conf", str(self.conf), "-n", "client.rgw.x", "-f"],
                )
                access, secret = secrets.token_hex(10).upper(), secrets.token_hex(20)
                self.run(
                    "radosgw-admin",
                    "user",
                    "create",
                    "--uid=nbd-test",
                    "--display-name=twisted-nbd tests",
                    f"--access-key={access}",
                    f"--secret-key={secret}",
                )
                endpoint = f"http://{LOOPBACK}:{self.rgw_port}"
                self._wait(lambda: _http_ok(endpoint), RGW_TIMEOUT, "radosgw answering HTTP")
                self._s3 = S3Credentials(endpoint, access, secret)
                self.rgw_seconds = time.monotonic() - started
            return self._s3

    def pid(self, daemon: str) -> int:
        """
        The process id of a running daemon: C{"mon.a"}, C{"mgr.x"},
        C{"osd.0"} or C{"client.rgw.x"} (radosgw).

        @raise KeyError: it is not running.
        """
        return self._processes[daemon].pid

    def rados(self) -> Any:
        """
        A librados handle connected as C{client.admin} (shut down by
        L{stop}): quicker than the command-line tools for making and
        removing images in tests.

        @raise CephStartError: the cluster is not running.
        """
        if not self.started:
            raise CephStartError("the cluster is not running")
        return self._connect()

    def _connect(self) -> Any:
        """The admin librados handle, connected on first use."""
        with self._lock:
            if self._rados is None:
                from twisted_nbd._ceph import import_rados

                rados = import_rados()
                handle = rados.Rados(conffile=str(self.conf), conf={"keyring": str(self.keyring)})
                try:
                    handle.connect(timeout=int(COMMAND_TIMEOUT))
                except rados.Error as e:
                    raise CephStartError(f"cannot connect to the monitor: {e}") from e
                self._rados = handle
            return self._rados

    # ------------------------------------------------------------ images

    def create_image(self, name: str, size: int, pool: str = "rbd", *extra: str) -> None:
        """Create RBD image C{pool/name} of C{size} bytes (C{extra}: more C{rbd create} options)."""
        self.run("rbd", "create", "--size", f"{size}B", *extra, f"{pool}/{name}")

    def remove_image(self, name: str, pool: str = "rbd") -> None:
        """Remove RBD image C{pool/name}, with its snapshots."""
        self.run("rbd", "snap", "purge", f"{pool}/{name}", check=False)
        self.run("rbd", "rm", "--no-progress", f"{pool}/{name}", check=False)

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop the daemons (radosgw, OSD, manager, monitor, in this order) and remove C{root}."""
        with self._lock:
            handle, self._rados = self._rados, None
        if handle is not None:
            handle.shutdown()
        for name in ("client.rgw.x", "osd.0", "mgr.x", "mon.a"):
            process = self._processes.pop(name, None)
            if process is not None:
                _stop_process(process)
        self.started = False
        self._s3 = None
        if self.remove_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _http_ok(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return True  # it answers HTTP: good enough to be up
    except OSError:
        return False


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


# ------------------------------------------------------------ the shared one

_shared: list[CephCluster] = []
_shared_error: list[BaseException] = []
_shared_lock = threading.Lock()


def shared_cluster() -> CephCluster:
    """
    The process's one cluster, started by the first caller and stopped at
    process exit.

    @raise CephStartError: it did not start (now or on an earlier call).
    """
    with _shared_lock:
        if _shared_error:
            raise CephStartError(f"the shared Ceph cluster did not start: {_shared_error[0]}")
        if not _shared:
            cluster = CephCluster()
            try:
                cluster.start()
            except BaseException as e:
                _shared_error.append(e)
                raise
            _shared.append(cluster)
            atexit.register(cluster.stop)
        return _shared[0]


def ceph_missing() -> str | None:
    """What is missing to run a cluster here, or C{None}."""
    for program in CORE_PROGRAMS + RGW_PROGRAMS + ("ceph", "rbd"):
        if shutil.which(program) is None:
            return f"the {program!r} program"
    try:
        from twisted_nbd._ceph import import_rbd

        import_rbd()
    except ImportError as e:
        return f"Ceph's Python bindings ({e})"
    return None


def require_ceph() -> CephCluster:
    """
    The shared cluster, for a test.

    @raise unittest.SkipTest: Ceph is not installed (outside CI).
    @raise AssertionError: Ceph is not installed and C{CI=true}, or the
        cluster did not start (always a failure: it is installed).
    """
    missing = ceph_missing()
    if missing is not None:
        if in_ci():
            raise AssertionError(f"{missing} is missing, and CI=true requires Ceph")
        raise unittest.SkipTest(f"{missing} is missing")
    try:
        return shared_cluster()
    except CephStartError as e:
        raise AssertionError(str(e)) from e
