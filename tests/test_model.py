# -*- test-case-name: tests.test_model -*-
"""
Model-based tests of the whole server (issue 10, point 1).

A Hypothesis state machine drives random sequences of requests through
the real stack: the Twisted client (L{twisted_nbd.client.NBDClient} over
L{NBDClientProtocol}) talks to the real server (L{NBDServerFactory},
L{NBDServerProtocol}) through an in-memory link that delivers the byte
stream in chunks Hypothesis chooses and honours the server's back-pressure
(it stops delivering while the server has paused its transport). The
export's device is a real backend (memory, file, or a C{cow} stack) under
L{HoldingDevice}, which holds every call until Hypothesis releases it, in
any order; the file backend's thread-pool jobs are held the same way. The
server's transport has a socket pair behind it, so that WRITE payloads of
more than 256 KiB take the server's direct path into its own (reused)
buffers (L{SocketStringTransport}). A plain C{bytearray} is the model of
the disk.

What must agree with the model, checked on every reply:

  - a READ returns exactly the model's bytes;
  - a BLOCK_STATUS (C{base:allocation}) answer is well formed (at least
    one extent, none empty, consecutive from the offset, the first N-1
    shorter than the request, one extent no longer than the request with
    REQ_ONE, nothing past the end of the export: S-T17); every byte of an
    extent with C{STATE_ZERO} is zero in the model; and, stricter than the
    spec but true of every backend here, C{STATE_HOLE} comes with
    C{STATE_ZERO}. Data extents may be conservative: a range reported as
    allocated data may hold zeroes. On the memory backend, whose
    allocation is exact, a range written or zeroed with NO_HOLE (and not
    trimmed or zeroed with holes allowed since, within the same page) must
    not be reported as a hole;
  - every request succeeds, except a WRITE_ZEROES with FAST_ZERO, which may
    fail with C{ENOTSUP} and then leaves the data unchanged;
  - a TRIM leaves each byte either as it was or zero (the spec leaves
    trimmed data undefined; every backend here keeps it or zeroes it); the
    first read of a trimmed byte settles which, and later reads must agree;
  - the connection never hangs: once every held call is released and the
    link drained, every request has been answered.

Concurrency: overlapping writes in flight have no defined order (C-01),
so the machine only puts requests in flight together when the result is
defined: a write, trim or zeroing never overlaps another request in
flight, and a read or block status never overlaps a write in flight (if
one would, the machine first lets everything in flight finish). Reads of
the same range may be in flight together. Two connections share the
export (multi-conn): what one connection has had acknowledged, the other
must read (stronger than C-05 requires, which is only after a FLUSH; every
backend here shares one store, so they must). A connection may be dropped
with requests in flight: the writes the server had handed to the device
(L{HoldingDevice} records them) count, the others do not.

Run longer with C{NBD_HYPOTHESIS_EXAMPLES=500} (examples per backend) and
C{NBD_HYPOTHESIS_STEPS} (steps per example).
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, cast

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_nbd._client_connection import ClientConfiguration, ClientConnection
from twisted_nbd._wire import Errno
from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.backends.ram import MappedMemoryDevice
from twisted_nbd.client import NBDClient, NBDClientProtocol
from twisted_nbd.errors import NBDError
from twisted_nbd.exports import Export, ExportRegistry
from twisted_nbd.filters.cow import CopyOnWriteFilter
from twisted_nbd.interfaces import STATE_HOLE, STATE_ZERO, Extent, IBlockDevice
from twisted_nbd.protocol import NBDServerFactory, NBDServerProtocol

#: Examples per backend, and steps per example; scale up with the variables.
EXAMPLES = int(os.environ.get("NBD_HYPOTHESIS_EXAMPLES", "20"))
STEPS = int(os.environ.get("NBD_HYPOTHESIS_STEPS", "40"))

#: Counts of what the machines did, over the run (printed with NBD_MODEL_STATS=1).
TOTALS: dict[str, int] = {}

SIZE = 1024 * 1024 + 512  # not a multiple of a page: the tail is exercised
PAGE = 4096


# ------------------------------------------------------------------ holding


class Scheduler:
    """
    Calls held back (device calls, thread-pool jobs) until the test
    releases them, in the order it chooses.
    """

    def __init__(self) -> None:
        self.held: list[Callable[[], None]] = []

    def hold(self, call: Callable[[], None]) -> None:
        self.held.append(call)

    def release(self, index: int) -> None:
        """Run the held call at C{index} (modulo the number held)."""
        self.held.pop(index % len(self.held))()

    def release_all(self, rng: random.Random) -> None:
        """Run every held call, and those they hold in turn, in a random order."""
        for _ in range(100_000):
            if not self.held:
                return
            self.release(rng.randrange(len(self.held)))
        raise AssertionError("held calls keep holding more")


@dataclass
class DeviceCall:
    """One call that reached a L{HoldingDevice}: what, and how it ended."""

    method: str
    offset: int
    length: int
    outcome: object = None
    done: bool = False


@implementer(IBlockDevice)
class HoldingDevice:
    """
    An L{IBlockDevice} that holds every call in a L{Scheduler} and, when
    released, makes it on the device below and passes its result on. The
    WRITE payload is not copied: the server must not reuse its buffer
    before the Deferred fires (L{IBlockDevice.write}), and a server that
    did would show up as wrong data.

    @ivar log: every write-like call, when it was made (not released).
    """

    def __init__(self, inner: IBlockDevice, scheduler: Scheduler) -> None:
        self.inner = inner
        self.size = inner.size
        self.capabilities = inner.capabilities
        self.scheduler = scheduler
        self.log: list[DeviceCall] = []

    def _hold(self, call: Callable[[], Any], record: DeviceCall | None = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if record is not None:
            self.log.append(record)

        def run() -> None:
            def finished(result: object) -> object:
                if record is not None:
                    record.outcome = result
                    record.done = True
                return result

            maybeDeferred(call).addBoth(finished).chainDeferred(d)

        self.scheduler.hold(run)
        return d

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self._hold(lambda: self.inner.read(offset, length))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        record = DeviceCall("write", offset, len(data))
        return self._hold(lambda: self.inner.write(offset, data, fua), record)

    def flush(self) -> Deferred[None]:
        return self._hold(self.inner.flush)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        record = DeviceCall("trim", offset, length)
        return self._hold(lambda: self.inner.trim(offset, length, fua), record)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        record = DeviceCall("zero", offset, length)
        return self._hold(
            lambda: self.inner.write_zeroes(offset, length, fua, may_trim, fast), record
        )

    def cache(self, offset: int, length: int) -> Deferred[None]:
        return self._hold(lambda: self.inner.cache(offset, length))

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        return self._hold(lambda: self.inner.block_status(offset, length))

    def close(self) -> Deferred[None]:
        return self.inner.close()


class HeldThreadPool:
    """Enough of a L{ThreadPool} for the file backend: jobs wait in a L{Scheduler}."""

    max = 4

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def callInThreadWithCallback(  # noqa: N802 - ThreadPool's name
        self, on_result: Callable[[bool, object], None], f: Callable[..., object], *a: Any
    ) -> None:
        def job() -> None:
            try:
                result = f(*a)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)

        self.scheduler.hold(job)


class ImmediateReactor:
    """A reactor whose C{callFromThread} runs the call at once."""

    def callFromThread(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:  # noqa: N802
        f(*args, **kwargs)


# ------------------------------------------------------------------ the link


class SocketStringTransport(StringTransport):
    """
    A L{StringTransport} with a real socket behind it for one purpose: the
    server receives large WRITE payloads straight into its buffers
    (L{twisted_nbd._transport.PayloadReceiver}), by replacing C{doRead} and
    reading the socket. L{Link} writes a payload there while that is on,
    and calls C{doRead} as a reactor would.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.socket, self.peer = socket.socketpair()
        self.socket.setblocking(False)

    def doRead(self) -> object:  # noqa: N802 - FileDescriptor's name
        raise AssertionError("doRead is only called while a payload is received directly")

    def close_sockets(self) -> None:
        self.socket.close()
        self.peer.close()


class Link:
    """
    One client connection to the server over two L{StringTransport}s; the
    test moves the bytes with L{pump}, in chunks of random sizes.
    """

    def __init__(self, factory: NBDServerFactory, config: ClientConfiguration, port: int) -> None:
        server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        assert server is not None
        self.server: NBDServerProtocol = server
        self.server_transport = SocketStringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", port),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 10809),
        )
        self.connection = ClientConnection(config)
        self.client_protocol = NBDClientProtocol(self.connection)
        self.client_transport = StringTransport()
        self.to_server = b""
        self.to_client = b""
        self.closed = False
        # Payload bytes the server received straight into its buffers.
        self.direct_bytes = 0
        # Set before NBD_CMD_DISC: only then may the server close.
        self.expect_close = False
        self.client: NBDClient | None = None
        self.client_protocol.handshake.addCallback(self._ready)
        self.client_protocol.handshake.addErrback(self._handshake_failed)
        self.server.makeConnection(self.server_transport)
        self.client_protocol.makeConnection(self.client_transport)

    def _ready(self, info: object) -> None:
        self.client = NBDClient(self.client_protocol, self.connection)

    def _handshake_failed(self, failure: Failure) -> None:
        raise AssertionError(f"the handshake failed: {failure.getTraceback()}")

    def busy(self) -> bool:
        """Whether bytes or a close are still on their way."""
        return not self.closed and bool(
            self.to_server
            or self.to_client
            or self.client_transport.value()
            or self.server_transport.value()
            or self.client_transport.disconnecting
            or self.server_transport.disconnecting
        )

    def pump(self, rng: random.Random, small: float) -> bool:
        """
        Move bytes once each way, in random chunks; deliver a close once the
        bytes before it are through. The server gets nothing while it has
        paused its transport (its flow control).

        @return: whether anything moved.
        """
        if self.closed:
            return False
        moved = False

        def size() -> int:
            # Mostly large pieces, with a share of tiny ones that split
            # headers and payloads anywhere (too many would make big
            # requests slow).
            return rng.randint(1, 64) if rng.random() < small else rng.randint(1, 1 << 17)

        self.to_server += self.client_transport.value()
        self.client_transport.clear()
        while self.to_server and self.server_transport.producerState != "paused":
            cut = size()
            moved = True
            receiver = self.server._receiver
            if receiver is not None and receiver.active:
                # A payload straight into the server's buffer: as much as
                # it still wants goes through the socket, then doRead.
                assert receiver._view is not None
                cut = min(cut, len(receiver._view) - receiver._position, 65536)
                chunk, self.to_server = self.to_server[:cut], self.to_server[cut:]
                self.server_transport.peer.sendall(chunk)
                self.server_transport.doRead()
                self.direct_bytes += len(chunk)
            else:
                chunk, self.to_server = self.to_server[:cut], self.to_server[cut:]
                self.server.dataReceived(chunk)
            self.to_server += self.client_transport.value()
            self.client_transport.clear()
        if self.server_transport.disconnected:
            # An abort: what was not sent yet is lost.
            self.server_transport.clear()
        self.to_client += self.server_transport.value()
        self.server_transport.clear()
        while self.to_client:
            cut = size()
            chunk, self.to_client = self.to_client[:cut], self.to_client[cut:]
            moved = True
            self.client_protocol.dataReceived(chunk)
            self.to_server += self.client_transport.value()
            self.client_transport.clear()
        if self.server_transport.disconnecting and not self.server_transport.value():
            if not self.expect_close:
                # Only NBD_CMD_DISC may make the server hang up on this client.
                raise AssertionError(
                    f"the server closed the connection: {self.server._lost_reason}"
                )
            self.close()
            return True
        if (
            self.client_transport.disconnecting
            and not self.to_server
            and self.server_transport.producerState != "paused"
        ):
            self.close()
            return True
        return moved

    def close(self) -> None:
        """The TCP connection ends: both sides hear of it."""
        if self.closed:
            return
        self.closed = True
        self.to_server = self.to_client = b""
        self.server.connectionLost(Failure(ConnectionDone("closed")))
        self.client_protocol.connectionLost(Failure(ConnectionDone("closed")))
        self.server_transport.close_sockets()


# ------------------------------------------------------------------ the model


@dataclass
class Op:
    """A request in flight, as the model sees it."""

    kind: str  # read, write, trim, zero, zero-fast, flush, cache, status
    link: Link
    offset: int
    length: int
    writes: bool
    deferred: Deferred[Any]
    data: bytes = b""
    no_hole: bool = False
    req_one: bool = False
    result: list[Any] = field(default_factory=list)
    # Ranges written while a block status was in flight: its answer past
    # the request's length may describe either state there.
    tainted: list[tuple[int, int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + self.length


_NONZERO = bytes([0] + [1] * 255)


def _overlap(a: int, a_end: int, b: int, b_end: int) -> bool:
    return a < b_end and b < a_end


class Disk:
    """
    The model: the bytes every read must return, and which of them a
    trim has left undecided (they read either as the byte here or zero).
    """

    def __init__(self, initial: bytes) -> None:
        self.data = bytearray(initial)
        self.maybe_zero = bytearray(len(initial))
        # Exact backends: bytes that must not be reported as a hole.
        self.allocated = bytearray(len(initial))

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        self.data[offset:end] = data
        self.maybe_zero[offset:end] = bytes(len(data))
        self.allocated[offset:end] = b"\1" * len(data)

    def zero(self, offset: int, length: int, no_hole: bool) -> None:
        self.data[offset : offset + length] = bytes(length)
        self.maybe_zero[offset : offset + length] = bytes(length)
        if no_hole:
            self.allocated[offset : offset + length] = b"\1" * length
        else:
            self._forget_allocation(offset, length)

    def trim(self, offset: int, length: int) -> None:
        self.maybe_zero[offset : offset + length] = b"\1" * length
        self._forget_allocation(offset, length)

    def _forget_allocation(self, offset: int, length: int) -> None:
        # A page left all zeroes may be dropped whole (the memory backend
        # does), so nothing on the pages touched need stay allocated.
        start = offset - offset % PAGE
        end = min(len(self.data), -(-(offset + length) // PAGE) * PAGE)
        self.allocated[start:end] = bytes(end - start)

    def check_read(self, offset: int, actual: bytes) -> None:
        """Check a read; settle the bytes a trim left undecided."""
        end = offset + len(actual)
        expected = bytes(self.data[offset:end])
        if actual != expected:
            # Compare page by page: a page must be as the model says, or
            # zero where a trim left its bytes undecided.
            for start in range(0, len(actual), PAGE):
                got, want = actual[start : start + PAGE], expected[start : start + PAGE]
                if got == want:
                    continue
                undecided = self.maybe_zero[offset + start : offset + start + len(got)]
                if not got.strip(b"\0") and not undecided.replace(b"\1", b""):
                    continue
                for i, (g, x) in enumerate(zip(got, want, strict=True)):
                    if g != x and not (g == 0 and undecided[i]):
                        at = offset + start + i
                        raise AssertionError(
                            f"read at {offset}: byte {at} is {g:#04x}, the model says {x:#04x}"
                        )
            self.data[offset:end] = actual
        self.maybe_zero[offset:end] = bytes(len(actual))

    def may_be_zero(self, start: int, end: int) -> bool:
        """Whether every byte of a range may read as zero."""
        data = self.data[start:end]
        if not data.strip(b"\0"):
            return True
        # Bytes 0/1 for zero/non-zero, against 1 where a trim left the byte
        # undecided: a non-zero byte that is decided is data.
        nonzero = int.from_bytes(data.translate(_NONZERO), "big")
        undecided = int.from_bytes(self.maybe_zero[start:end], "big")
        return nonzero & ~undecided == 0


# ------------------------------------------------------------------ the machine

offsets = st.one_of(
    st.integers(0, SIZE - 1),
    st.integers(0, SIZE // PAGE).map(lambda n: n * PAGE),
    st.sampled_from([0, SIZE - 512, SIZE - 1, 64 * 1024 - 1, SIZE - 300_000]),
)
lengths = st.one_of(
    st.integers(1, 3 * PAGE),
    st.sampled_from([1, 512, PAGE, 2 * PAGE, 64 * 1024, 70_000]),
    # Large enough for the server's reused payload buffers (DIRECT_PAYLOAD_MIN).
    st.sampled_from([256 * 1024, 300_000]),
)

#: The "pattern" initial contents: no zero bytes, a period of 251.
_PATTERN = (bytes(range(1, 252)) * (SIZE // 251 + 1))[:SIZE]


class NBDModelMachine(RuleBasedStateMachine):
    """Random requests through the real client and server, checked against L{Disk}."""

    backend = "memory"
    exact_allocation = True

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = Scheduler()
        self.cleanups: list[Callable[[], None]] = []
        self.links: list[Link] = []
        self.ops: list[Op] = []
        self.port = 40000
        self.rng = random.Random(0)
        self.device: HoldingDevice | None = None
        self.stats: dict[str, int] = {}

    # ---------------------------------------------------------- set-up

    def make_device(self, initial: bytes) -> IBlockDevice:
        """The device under test, holding C{initial}."""
        if self.backend == "memory":
            memory = MemoryBlockDevice(SIZE, page_size=PAGE)
            memory.write(0, initial)
            return memory
        if self.backend == "ram":
            # Replies straight from its memory (IBufferRead) and writes at
            # once (IImmediateIO): the server's tight loop.
            ram = MappedMemoryDevice(SIZE)
            ram.write_now(0, initial)

            def close() -> None:
                ram.close()

            self.cleanups.append(close)
            return ram
        if self.backend == "file":
            directory = tempfile.mkdtemp(prefix="twisted-nbd-model-")
            path = os.path.join(directory, "disk.img")
            create_image(path, SIZE)
            with open(path, "r+b") as f:
                # Data where the initial contents are not zero, holes elsewhere.
                for start in range(0, SIZE, PAGE):
                    piece = initial[start : start + PAGE]
                    if piece.strip(b"\0"):
                        f.seek(start)
                        f.write(piece)
            device = FileBlockDevice(
                path,
                reactor=cast(IReactorFromThreads, ImmediateReactor()),
                threadpool=cast(ThreadPool, HeldThreadPool(self.scheduler)),
            )

            def remove() -> None:
                os.unlink(path)
                os.rmdir(directory)

            self.cleanups.append(remove)
            return device
        assert self.backend == "cow"
        base = MemoryBlockDevice(SIZE, page_size=PAGE)
        base.write(0, initial)
        overlay = MemoryBlockDevice(SIZE, page_size=PAGE)
        return CopyOnWriteFilter(
            HoldingDevice(base, self.scheduler),
            HoldingDevice(overlay, self.scheduler),
            block_size=PAGE,
        )

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        initial=st.sampled_from(["zeroes", "pattern", "patches"]),
        extended=st.booleans(),
        structured=st.booleans(),
        depth=st.sampled_from([1, 2, 4, 64]),
        in_flight=st.sampled_from([64 * 1024, 1 << 20, 64 << 20]),
        small=st.sampled_from([0.0, 0.1, 0.5]),
    )
    def start(
        self,
        seed: int,
        initial: str,
        extended: bool,
        structured: bool,
        depth: int,
        in_flight: int,
        small: float,
    ) -> None:
        self.rng = random.Random(seed)
        self.small = small
        content = bytearray(SIZE)
        if initial == "pattern":
            content[:] = _PATTERN
        elif initial == "patches":
            for start in range(0, SIZE, 3 * PAGE):
                piece = content[start : start + PAGE + 100]
                content[start : start + len(piece)] = b"\xa5" * len(piece)
        self.model = Disk(bytes(content))
        inner = self.make_device(bytes(content))
        self.device = HoldingDevice(inner, self.scheduler)
        self.factory = NBDServerFactory(
            ExportRegistry.of([Export("disk", self.device)]),
            max_queue_depth=depth,
            max_bytes_in_flight=in_flight,
            poll_max=0,
        )
        self.config = ClientConfiguration(
            "disk", structured_replies=structured or extended, extended_headers=extended
        )
        self._connect()

    def _connect(self) -> None:
        self.port += 1
        link = Link(self.factory, self.config, self.port)
        self.links.append(link)
        self._drain()
        client = link.client
        assert client is not None, "the handshake did not finish"
        if len(self._open_links()) > 1:
            # Two connections at once rely on what CAN_MULTI_CONN promises (C-05).
            assert client.can_multi_conn, "a second connection to an export without multi-conn"
            self._count("second-connection")
        self._count("connect")

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def teardown(self) -> None:
        try:
            if self.device is not None:
                self._drain()
                # The whole disk, through a fresh connection, in 64 KiB reads.
                if not [link for link in self.links if not link.closed]:
                    self._connect()
                link = [link for link in self.links if not link.closed][0]
                for offset in range(0, SIZE, 256 * 1024):
                    self._issue_read(link, offset, min(256 * 1024, SIZE - offset))
                self._drain()
                for link in self.links:
                    if not link.closed and link.client is not None:
                        link.expect_close = True
                        link.client.disconnect()
                self._drain()
                self.device.close()
                self.scheduler.release_all(self.rng)
        finally:
            for link in self.links:
                link.server_transport.close_sockets()
                if link.direct_bytes:
                    self._count("direct-payloads")
            for cleanup in self.cleanups:
                cleanup()
            for what, count in self.stats.items():
                TOTALS[what] = TOTALS.get(what, 0) + count
            TOTALS["examples"] = TOTALS.get("examples", 0) + 1

    # ---------------------------------------------------------- plumbing

    def _open_links(self) -> list[Link]:
        return [link for link in self.links if not link.closed and link.client is not None]

    def _link(self, index: int) -> Link:
        links = self._open_links()
        return links[index % len(links)]

    def _drain(self) -> None:
        """Release everything held and move every byte until all is quiet."""
        for _ in range(100_000):
            moved = False
            for link in list(self.links):
                moved = link.pump(self.rng, self.small) or moved
            if self.scheduler.held:
                self.scheduler.release(self.rng.randrange(len(self.scheduler.held)))
                moved = True
            self._collect()
            if not moved and not any(link.busy() for link in self.links):
                break
        else:
            raise AssertionError("the connection never became quiet")
        self._collect()
        pending = [op for op in self.ops if not op.result]
        assert not pending, f"requests never answered: {pending}"

    def _conflicts(self, offset: int, end: int, writes: bool) -> bool:
        for op in self.ops:
            if op.result or op.kind in ("flush",):
                continue
            if (writes or op.writes) and _overlap(offset, end, op.offset, op.end):
                return True
        return False

    def _issue(self, op: Op) -> None:
        if op.writes:
            for other in self.ops:
                if other.kind == "status" and not other.result:
                    other.tainted.append((op.offset, op.end))
        self.ops.append(op)
        op.deferred.addBoth(op.result.append)
        self._count(op.kind)

    def _prepare(
        self, link_index: int, offset: int, length: int, writes: bool
    ) -> tuple[Link, int, int]:
        """The link, and the range fitted to the export's block size and end;
        lets everything in flight finish first if the range would clash."""
        link = self._link(link_index)
        assert link.client is not None
        minimum = max(link.client.block_size.minimum, 1)
        offset -= offset % minimum
        length = max(minimum, length - length % minimum)
        length = min(length, SIZE - offset)
        if self._conflicts(offset, offset + length, writes):
            self._count("waits")
            self._drain()
        return link, offset, length

    def _collect(self) -> None:
        """Check every answered request against the model, in answer order."""
        still = []
        for op in self.ops:
            if not op.result:
                still.append(op)
                continue
            self._check(op, op.result[0])
        self.ops = still

    def _check(self, op: Op, result: object) -> None:
        if op.link.closed and isinstance(result, Failure) and not result.check(NBDError):
            # Dropped with the connection: the device log says whether a
            # write took effect.
            result.trap(Exception)
            if op.writes:
                self._settle_dropped(op)
            return
        if op.kind == "zero-fast" and isinstance(result, Failure) and result.check(NBDError):
            error = cast(NBDError, result.value)
            assert error.errno == Errno.ENOTSUP, f"fast zero failed with {error}"
            self._device_call(op)
            self._count("fast-zero-refused")
            return
        if isinstance(result, Failure):
            raise AssertionError(
                f"{op.kind} {op.offset}+{op.length} failed: {result.getTraceback()}"
            )
        if op.kind == "read":
            assert isinstance(result, bytes) and len(result) == op.length, (
                f"read {op.offset}+{op.length} returned {len(result)} bytes"  # type: ignore[arg-type]
            )
            self.model.check_read(op.offset, result)
        elif op.writes:
            assert result is None, f"{op.kind} returned {result!r}"
            self._device_call(op)
            self._apply(op)
        elif op.kind == "status":
            self._check_status(op, cast("dict[str, list[Extent]]", result))
        else:
            assert result is None, f"{op.kind} returned {result!r}"

    def _device_call(self, op: Op) -> DeviceCall | None:
        """Take the device's record of write-like C{op} off its log, if it got there."""
        assert self.device is not None
        method = "zero" if op.kind.startswith("zero") else op.kind
        for call in self.device.log:
            if (call.method, call.offset, call.length) == (method, op.offset, op.length):
                self.device.log.remove(call)
                return call
        return None

    def _apply(self, op: Op) -> None:
        """Apply a write-like request that succeeded to the model."""
        if op.kind == "write":
            self.model.write(op.offset, op.data)
        elif op.kind in ("zero", "zero-fast"):
            self.model.zero(op.offset, op.length, op.no_hole)
        else:
            assert op.kind == "trim"
            self.model.trim(op.offset, op.length)

    def _settle_dropped(self, op: Op) -> None:
        """
        A write-like request lost with its connection: it took effect if
        and only if the server handed it to the device.
        """
        call = self._device_call(op)
        if call is None:
            self._count("dropped-unsent")
            return
        self.scheduler.release_all(self.rng)
        assert call.done
        self._count("dropped-applied")
        if isinstance(call.outcome, Failure):
            call.outcome.trap(NBDError)
            assert op.kind == "zero-fast", f"a dropped {op.kind} failed: {call.outcome}"
            return
        self._apply(op)

    def _check_status(self, op: Op, result: dict[str, list[Extent]]) -> None:
        extents = result["base:allocation"]
        assert extents, "no extents"
        assert all(e.length > 0 for e in extents), f"an empty extent: {extents}"
        if op.req_one:
            assert len(extents) == 1 and extents[0].length <= op.length, f"REQ_ONE: {extents}"
        assert sum(e.length for e in extents[:-1]) < op.length, f"past the request: {extents}"
        position = op.offset
        for extent in extents:
            end = position + extent.length
            assert end <= SIZE, f"extents run past the end: {extents}"
            unknown = [
                (a, b) for a, b in op.tainted if end > op.end and _overlap(position, end, a, b)
            ]
            if extent.flags & STATE_HOLE:
                assert extent.flags & STATE_ZERO, f"a hole not known to read as zeroes: {extents}"
            checked_end = op.end if unknown else end
            checked_end = max(min(end, checked_end), position)
            if extent.flags & STATE_ZERO:
                assert self.model.may_be_zero(position, checked_end), (
                    f"{position}+{extent.length} reported zero, but the model holds data there"
                )
            if self.exact_allocation and extent.flags & STATE_HOLE:
                assert not any(self.model.allocated[position:checked_end]), (
                    f"{position}+{extent.length} reported a hole, but was written or zeroed "
                    f"with NO_HOLE"
                )
            position = end
        self._count("status-extents")

    def _issue_read(self, link: Link, offset: int, length: int) -> None:
        assert link.client is not None
        self._issue(Op("read", link, offset, length, False, link.client.read(offset, length)))

    # ---------------------------------------------------------- rules

    @rule(link=st.integers(0, 1), offset=offsets, length=lengths)
    def read(self, link: int, offset: int, length: int) -> None:
        chosen, offset, length = self._prepare(link, offset, length, False)
        self._issue_read(chosen, offset, length)

    @rule(
        link=st.integers(0, 1),
        offset=offsets,
        length=lengths,
        fua=st.booleans(),
        fill=st.integers(0, 255),
    )
    def write(self, link: int, offset: int, length: int, fua: bool, fill: int) -> None:
        chosen, offset, length = self._prepare(link, offset, length, True)
        assert chosen.client is not None
        # Bytes that differ from their neighbours, so misplaced data shows.
        data = (_PATTERN[fill:] + _PATTERN)[:length] if fill else bytes(length)
        d = chosen.client.write(offset, data, fua=fua and chosen.client.can_fua)
        self._issue(Op("write", chosen, offset, length, True, d, data=data))

    @rule(link=st.integers(0, 1), offset=offsets, length=lengths, fua=st.booleans())
    def trim(self, link: int, offset: int, length: int, fua: bool) -> None:
        chosen, offset, length = self._prepare(link, offset, length, True)
        assert chosen.client is not None
        d = chosen.client.trim(offset, length, fua=fua and chosen.client.can_fua)
        self._issue(Op("trim", chosen, offset, length, True, d))

    @rule(
        link=st.integers(0, 1),
        offset=offsets,
        length=lengths,
        fua=st.booleans(),
        no_hole=st.booleans(),
        fast=st.booleans(),
    )
    def zero(
        self, link: int, offset: int, length: int, fua: bool, no_hole: bool, fast: bool
    ) -> None:
        chosen, offset, length = self._prepare(link, offset, length, True)
        client = chosen.client
        assert client is not None
        fast = fast and client.can_fast_zero
        d = client.zero(offset, length, fua=fua and client.can_fua, no_hole=no_hole, fast=fast)
        kind = "zero-fast" if fast else "zero"
        self._issue(Op(kind, chosen, offset, length, True, d, no_hole=no_hole))

    @rule(link=st.integers(0, 1))
    def flush(self, link: int) -> None:
        chosen = self._link(link)
        assert chosen.client is not None
        self._issue(Op("flush", chosen, 0, 0, False, chosen.client.flush()))

    @rule(link=st.integers(0, 1), offset=offsets, length=lengths)
    def cache(self, link: int, offset: int, length: int) -> None:
        chosen, offset, length = self._prepare(link, offset, length, False)
        assert chosen.client is not None
        if chosen.client.can_cache:
            self._issue(
                Op("cache", chosen, offset, length, False, chosen.client.cache(offset, length))
            )

    @rule(link=st.integers(0, 1), offset=offsets, length=lengths, req_one=st.booleans())
    def block_status(self, link: int, offset: int, length: int, req_one: bool) -> None:
        chosen, offset, length = self._prepare(link, offset, length, False)
        client = chosen.client
        assert client is not None
        if not client.meta_contexts:
            return
        d = client.block_status(offset, length, req_one=req_one)
        self._issue(Op("status", chosen, offset, length, False, d, req_one=req_one))

    @rule(
        link=st.integers(0, 1),
        offset=offsets,
        length=lengths,
        fua=st.booleans(),
        fill=st.integers(0, 255),
    )
    def write_again(self, link: int, offset: int, length: int, fua: bool, fill: int) -> None:
        """Writes are what the model is about: twice the chance of the others."""
        self.write(link, offset, length, fua, fill)

    @rule(link=st.integers(0, 1), slot=st.integers(0, 1), fill=st.integers(1, 255))
    def write_large(self, link: int, slot: int, fill: int) -> None:
        """
        A 512 KiB WRITE in one of two slots: big enough for the server to
        receive most of it straight into a buffer (more than
        DIRECT_PAYLOAD_MIN still to come after the header), and of one
        size, so that it reuses the buffers of earlier ones; in separate
        slots, two can be in flight at once.
        """
        self.write(link, slot * 512 * 1024, 512 * 1024, False, fill)

    @rule(
        how=st.sampled_from(["pump", "pump", "release", "release", "release", "drain"]),
        steps=st.integers(1, 8),
    )
    def progress(self, how: str, steps: int) -> None:
        """
        Let things happen: bytes through the links in random chunks, one
        held device call (or thread-pool job) finishing, or everything.
        """
        self._count(how)
        if how == "pump":
            for _ in range(steps):
                for link in list(self.links):
                    link.pump(self.rng, self.small)
        elif how == "release":
            for _ in range(steps):
                if self.scheduler.held:
                    self.scheduler.release(self.rng.randrange(len(self.scheduler.held)))
        else:
            self._drain()
        self._collect()

    @rule(
        how=st.sampled_from(["connect", "disconnect", "drop"]),
        link=st.integers(0, 1),
        steps=st.integers(0, 3),
    )
    def churn(self, how: str, link: int, steps: int) -> None:
        """
        A second connection (multi-conn), or a new one; NBD_CMD_DISC after
        every request in flight is answered (C-06); or the client vanishing
        with requests in flight.
        """
        if how == "connect":
            if len(self._open_links()) < 2:
                self._connect()
            return
        chosen = self._link(link)
        assert chosen.client is not None
        if how == "disconnect":
            chosen.expect_close = True
            chosen.client.disconnect()
            self._drain()
            assert chosen.closed, "the server did not close after NBD_CMD_DISC"
        else:
            for _ in range(steps):
                chosen.pump(self.rng, self.small)
            chosen.close()
            self._drain()
        self._count(how)
        if not self._open_links():
            self._connect()

    @invariant()
    def bounded(self) -> None:
        """The server's bookkeeping stays within its limits."""
        for link in self.links:
            if link.closed:
                continue
            assert link.server.in_flight <= self.factory.max_queue_depth, (
                f"{link.server.in_flight} requests in flight, limit {self.factory.max_queue_depth}"
            )


class FileModelMachine(NBDModelMachine):
    backend = "file"
    exact_allocation = False


class RamModelMachine(NBDModelMachine):
    backend = "ram"
    exact_allocation = False


class CowModelMachine(NBDModelMachine):
    backend = "cow"
    exact_allocation = True


def _settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


class ModelTests(SynchronousTestCase):
    """Random request sequences through client and server agree with the model."""

    def setUp(self) -> None:
        TOTALS.clear()
        if os.environ.get("NBD_MODEL_STATS"):
            self.addCleanup(lambda: print(f"\n{self.id()}: {dict(sorted(TOTALS.items()))}"))

    def test_memory(self) -> None:
        """The memory backend."""
        run_state_machine_as_test(NBDModelMachine, settings=_settings())

    def test_file(self) -> None:
        """The file backend, its thread-pool jobs finishing in random order."""
        run_state_machine_as_test(FileModelMachine, settings=_settings())

    def test_ram(self) -> None:
        """
        The RAM disk: READ replies that are views of its memory, sent after
        later WRITEs in the same batch changed it, must still carry the old data.
        """
        run_state_machine_as_test(RamModelMachine, settings=_settings())

    def test_cow(self) -> None:
        """A cow filter over a memory device, with a memory overlay."""
        run_state_machine_as_test(CowModelMachine, settings=_settings())
