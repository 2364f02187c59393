"""
Durability trials: random writes (some FUA) and FLUSHes over two raw
connections to the real server on a file image, C{kill -9} of the whole
server (workers too) at a random moment while writes are in flight, a
simulated power loss, a restart, and a check of every sector of the image.

The simulated power loss (C{tests/interop/crashsim}) undoes every write the
server had not synced when it was killed, so a trial fails if the server
acknowledged a FLUSH or a FUA write before C{fdatasync} returned. (A plain
C{kill -9} would prove nothing: the page cache survives it.)

What must hold (C-02, C-03 in the protocol digest), sector by sector:

  - the last write to the sector that was made durable (a FUA write that
    was acknowledged, or a write acknowledged before a FLUSH was sent that
    was acknowledged in turn, on either connection: the server offers
    multi-conn) is there, or a write sent after it;
  - a sector never made durable holds its original bytes or one of the
    writes sent to it;
  - a sector never written holds its original bytes.

The client never has two overlapping writes in flight, so "sent after"
is a total order per sector. Used by C{tests/interop/test_reliability.py}
(a few trials) and C{bench/durability.py} (as many as asked).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.interop.crashsim.sitecustomize import replay
from tests.interop.helpers import CMD_FLUSH, CMD_WRITE, NBDServer, RawClient

__all__ = ["TrialResult", "Totals", "run_trials"]

SECTOR = 512
#: NBD_CMD_FLAG_FUA, and the transmission flags that say FLUSH and FUA work.
FLAG_FUA = 1
TX_SEND_FLUSH = 1 << 2
TX_SEND_FUA = 1 << 3
CRASHSIM = Path(__file__).resolve().parent / "crashsim"


@dataclass
class _Write:
    ident: int
    offset: int
    length: int
    fua: bool
    acked: bool = False
    durable: bool = False


@dataclass
class TrialResult:
    """
    What one trial did and found.

    @ivar lost: bytes that were durable and are not in the image.
    @ivar corrupt: bytes that hold neither their original contents nor any
        write sent to them.
    """

    writes: int = 0
    acked: int = 0
    durable: int = 0
    flushes: int = 0
    in_flight_at_kill: int = 0
    undone: int = 0
    lost: int = 0
    corrupt: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Totals:
    trials: int = 0
    writes: int = 0
    acked: int = 0
    durable: int = 0
    flushes: int = 0
    killed_in_flight: int = 0
    undone: int = 0
    lost: int = 0
    corrupt: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, result: TrialResult) -> None:
        self.trials += 1
        self.writes += result.writes
        self.acked += result.acked
        self.durable += result.durable
        self.flushes += result.flushes
        self.killed_in_flight += bool(result.in_flight_at_kill)
        self.undone += result.undone
        self.lost += result.lost
        self.corrupt += result.corrupt
        self.errors.extend(result.errors)

    def summary(self) -> str:
        return (
            f"{self.trials} trials, {self.lost} bytes lost, {self.corrupt} bytes corrupt "
            f"({self.writes} writes sent, {self.acked} acknowledged, {self.durable} durable, "
            f"{self.flushes} FLUSHes acknowledged, {self.killed_in_flight} trials killed with "
            f"writes in flight, {self.undone} unsynced writes undone by the simulated power loss)"
        )


def _sector_data(ident: int, sector: int) -> bytes:
    return struct.pack(">QQ", ident, sector) * (SECTOR // 16)


class _Trial:
    """One trial's client side: two connections, a sender, two receivers."""

    def __init__(self, port: int, size: int, rng: random.Random, max_in_flight: int) -> None:
        self.size = size
        self.rng = rng
        self.max_in_flight = max_in_flight
        self.clients = [RawClient(port, timeout=30.0) for _ in range(2)]
        for client in self.clients:
            _, flags = client.handshake()
            if flags & (TX_SEND_FLUSH | TX_SEND_FUA) != TX_SEND_FLUSH | TX_SEND_FUA:
                raise AssertionError(f"the server offers no FLUSH or FUA: flags {flags:#x}")
        self.lock = threading.Condition()
        self.writes: list[_Write] = []
        self.pending: dict[int, tuple[str, object]] = {}  # cookie -> kind, write or snapshot
        self.next_cookie = 1
        self.flushes_acked = 0
        self.first_durable = threading.Event()
        self.errors: list[str] = []
        self.stopped = False

    # -- receiving

    def receive(self, client: RawClient) -> None:
        while True:
            try:
                error, cookie = client.simple_reply()
            except (OSError, ConnectionError, AssertionError):
                return
            with self.lock:
                kind, what = self.pending.pop(cookie, ("?", None))
                if kind == "?":
                    self.errors.append(f"a reply to unknown cookie {cookie}")
                elif error:
                    self.errors.append(f"{kind} failed with errno {error}")
                elif kind == "write":
                    assert isinstance(what, _Write)
                    what.acked = True
                    if what.fua:
                        what.durable = True
                        self.first_durable.set()
                else:
                    assert isinstance(what, list)
                    for write in what:
                        write.durable = True
                    self.flushes_acked += 1
                    self.first_durable.set()
                self.lock.notify_all()

    # -- sending

    def _overlaps_in_flight(self, offset: int, length: int) -> bool:
        return any(
            kind == "write"
            and isinstance(w, _Write)
            and w.offset < offset + length
            and offset < w.offset + w.length
            for kind, w in self.pending.values()
        )

    def send_one(self) -> bool:
        """Send one random request; C{False} once the connections are gone."""
        client = self.rng.choice(self.clients)
        with self.lock:
            while len(self.pending) >= self.max_in_flight and not self.stopped:
                self.lock.wait(0.5)
            if self.stopped:
                return False
            cookie = self.next_cookie
            self.next_cookie += 1
            if self.rng.random() < 0.1:
                snapshot = [w for w in self.writes if w.acked and not w.durable]
                self.pending[cookie] = ("flush", snapshot)
                message = client.request(CMD_FLUSH, cookie=cookie)
            else:
                for _ in range(20):
                    length = SECTOR * self.rng.choice((1, 2, 8, 16, 64, 128))
                    offset = SECTOR * self.rng.randrange((self.size - length) // SECTOR + 1)
                    if not self._overlaps_in_flight(offset, length):
                        break
                else:
                    self.next_cookie -= 1
                    self.lock.wait(0.05)
                    return True
                write = _Write(cookie, offset, length, fua=self.rng.random() < 0.2)
                self.writes.append(write)
                self.pending[cookie] = ("write", write)
                first = offset // SECTOR
                data = b"".join(_sector_data(cookie, first + i) for i in range(length // SECTOR))
                message = client.request(
                    CMD_WRITE, offset, length, cookie=cookie, flags=FLAG_FUA if write.fua else 0
                )
                message += data
        try:
            client.send(message)
        except OSError:
            return False
        return True

    def close(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
        for client in self.clients:
            client.close()

    # -- checking

    def check(self, image: bytes, original: bytes, result: TrialResult) -> None:
        """Compare every written sector with what may be there (see the module doc)."""
        covering: dict[int, list[_Write]] = {}
        for write in self.writes:  # in the order sent
            for sector in range(write.offset // SECTOR, (write.offset + write.length) // SECTOR):
                covering.setdefault(sector, []).append(write)
        view, before = memoryview(image), memoryview(original)
        for sector in range(len(image) // SECTOR):
            start = sector * SECTOR
            actual = view[start : start + SECTOR]
            writes = covering.get(sector, [])
            last = max((i for i, w in enumerate(writes) if w.durable), default=None)
            allowed = [_sector_data(w.ident, sector) for w in writes[last or 0 :]]
            if last is None:
                allowed.append(bytes(before[start : start + SECTOR]))
            if actual in allowed:
                continue
            if last is not None:
                result.lost += SECTOR
                if len(result.errors) < 5:
                    result.errors.append(
                        f"sector {sector}: durable write {writes[last].ident} lost "
                        f"(found {bytes(actual[:16])!r})"
                    )
            else:
                result.corrupt += SECTOR
                if len(result.errors) < 5:
                    result.errors.append(f"sector {sector} corrupt: {bytes(actual[:16])!r}")


def _start(image: Path, journal: Path, workdir: Path, workers: int, drop_sync: bool) -> NBDServer:
    journal.write_bytes(b"")
    env = {
        "NBD_CRASHSIM_IMAGE": str(image),
        "NBD_CRASHSIM_JOURNAL": str(journal),
        "NBD_CRASHSIM_DROP_SYNC": "1" if drop_sync else "0",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(CRASHSIM), os.environ.get("PYTHONPATH")) if p
        ),
    }
    args = ["--image", str(image)]
    if workers:
        args += ["--workers", str(workers)]
    workdir.mkdir(parents=True, exist_ok=True)
    server = NBDServer(args, workdir, env=env)
    server.start()
    for index in range(workers):
        server.wait_for_log(f"Worker {index} is ready", timeout=60)
    return server


def _kill_all(server: NBDServer) -> None:
    """SIGKILL the server's whole process group (its workers too), at once."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert server.process is not None
    server.process.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError("the server's workers outlived SIGKILL")


def run_trials(
    trials: int,
    workdir: Path,
    *,
    workers: int = 0,
    seed: int | None = None,
    size: int = 4 << 20,
    max_kill_delay: float = 0.5,
    drop_sync: bool = False,
    progress: Callable[[int, TrialResult], None] | None = None,
) -> Totals:
    """
    Run C{trials} durability trials on one image in C{workdir}; the totals.

    @param workers: run the server with C{--workers} this many (0: none).
    @param max_kill_delay: the kill comes at a random moment up to this
        many seconds after the first FLUSH or FUA write was acknowledged.
    @param drop_sync: make the server's syncs no-ops (the trials must then
        find lost bytes: this proves they can fail).
    """
    rng = random.Random(seed)
    image = workdir / "disk.img"
    journal = workdir / "journal"
    image.write_bytes(rng.randbytes(size))
    totals = Totals()
    server = _start(image, journal, workdir / "server-0", workers, drop_sync)
    try:
        for number in range(trials):
            original = image.read_bytes()
            result = TrialResult()
            trial = _Trial(server.port, size, rng, max_in_flight=rng.choice((4, 16, 32)))
            receivers = [
                threading.Thread(target=trial.receive, args=(c,), daemon=True)
                for c in trial.clients
            ]
            for thread in receivers:
                thread.start()
            delay = rng.uniform(0, max_kill_delay)

            def kill(
                trial: _Trial = trial,
                server: NBDServer = server,
                delay: float = delay,
                result: TrialResult = result,
            ) -> None:
                trial.first_durable.wait(30)
                time.sleep(delay)  # the random moment of the crash
                with trial.lock:
                    result.in_flight_at_kill = sum(
                        1 for kind, _ in trial.pending.values() if kind == "write"
                    )
                _kill_all(server)
                with trial.lock:
                    trial.stopped = True
                    trial.lock.notify_all()

            killer = threading.Thread(target=kill, daemon=True)
            killer.start()
            deadline = time.monotonic() + 60
            while trial.send_one() and time.monotonic() < deadline:
                pass
            killer.join(60)
            trial.close()
            for thread in receivers:
                thread.join(30)
            server.check_log()
            result.undone = replay(str(image), str(journal))[0]
            with trial.lock:
                result.writes = len(trial.writes)
                result.acked = sum(w.acked for w in trial.writes)
                result.durable = sum(w.durable for w in trial.writes)
                result.flushes = trial.flushes_acked
                result.errors.extend(trial.errors)
            # Restart on the image after the power loss; it must serve
            # exactly what is in the file.
            server = _start(image, journal, workdir / f"server-{number + 1}", workers, drop_sync)
            data = image.read_bytes()
            with RawClient(server.port, timeout=30.0) as reader:
                reader.handshake()
                served = b"".join(reader.read(o, 1 << 20) for o in range(0, size, 1 << 20))
            if served != data:
                result.errors.append("the restarted server does not serve the image's bytes")
            trial.check(data, original, result)
            totals.add(result)
            if progress is not None:
                progress(number, result)
    finally:
        server.stop()
        server.check_log()
    return totals
