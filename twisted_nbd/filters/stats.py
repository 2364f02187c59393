# -*- test-case-name: tests.test_filters -*-
"""
The C{stats} filter: count what passes through, per operation: requests,
bytes, errors, and a latency histogram. L{StatsFilter.stats} is a plain
object a metrics endpoint reads (find it in an export's device with
L{twisted_nbd.filters.find_filter}); with C{log=true} a summary is logged
when the export closes.

Counting costs one callback per request on the Deferred the device below
returns (no new Deferred), and the fast paths stay: sparse reads and reads
straight from memory are counted and forwarded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.interfaces import Extent, IBlockDevice, Segment
from twisted_nbd.registry import BOOL, FilterPlugin, Key

__all__ = ["BUCKETS", "OperationStats", "Stats", "StatsFilter", "plugin"]

_log = Logger()

#: Latency histogram bucket upper bounds, in seconds: 1 us to about 34 s,
#: doubling; the last bucket counts everything slower.
BUCKETS: tuple[float, ...] = tuple(1e-6 * 2**i for i in range(26))
_LAST = len(BUCKETS)


@dataclass(slots=True)
class OperationStats:
    """
    The counts of one operation.

    @ivar count: requests finished.
    @ivar bytes: bytes read, written, trimmed, zeroed... (the lengths).
    @ivar errors: requests that failed.
    @ivar latency: total seconds from call to answer.
    @ivar histogram: requests by latency: C{histogram[i]} counts those no
        slower than C{BUCKETS[i]} (and slower than the bucket before); the
        last counts the rest.
    """

    count: int = 0
    bytes: int = 0
    errors: int = 0
    latency: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def record(self, length: int, seconds: float, failed: bool) -> None:
        """Count one request."""
        self.count += 1
        self.bytes += length
        self.latency += seconds
        if failed:
            self.errors += 1
        # Doubling buckets from 1 us: the bucket is the bit length of the
        # latency in microseconds (cheaper than a search).
        micros = int(seconds * 1e6)
        index = (micros - 1).bit_length() if micros > 1 else 0
        self.histogram[index if index < _LAST else _LAST] += 1


@dataclass
class Stats:
    """The counts of every operation of one export, by name."""

    operations: dict[str, OperationStats] = field(
        default_factory=lambda: {
            op: OperationStats()
            for op in ("read", "write", "flush", "trim", "zero", "cache", "extents")
        }
    )

    def summary(self) -> str:
        """One line per operation that happened."""
        lines = []
        for name, op in self.operations.items():
            if op.count:
                mean = op.latency / op.count * 1e3
                lines.append(
                    f"{name}: {op.count} requests, {op.bytes} bytes, {op.errors} errors, "
                    f"{mean:.3f} ms mean latency"
                )
        return "\n".join(lines) or "no requests"


class StatsFilter(BlockDeviceFilter):
    """
    Counts requests, bytes, errors and latency per operation.

    @ivar stats: the counts.
    """

    def __init__(
        self,
        inner: IBlockDevice,
        clock: Callable[[], float] = time.perf_counter,
        log: bool = False,
    ) -> None:
        super().__init__(inner)
        self.stats = Stats()
        self._clock = clock
        self._log = log
        ops = self.stats.operations
        self._read, self._write, self._flush = ops["read"], ops["write"], ops["flush"]
        self._trim, self._zero, self._cache = ops["trim"], ops["zero"], ops["cache"]
        self._extents = ops["extents"]
        # Looked up once: reads are the filter's hot path.
        self._inner_read = inner.read

    def _count(
        self, d: Deferred[Any], op: OperationStats, length: int, started: float
    ) -> Deferred[Any]:
        """Count C{d}'s request when it is answered; C{d} itself is returned."""
        if d.called and not d.paused:
            # Answered already (a memory device, a page cache hit): count it
            # now, without a callback.
            op.record(length, self._clock() - started, isinstance(d.result, Failure))
            return d
        clock = self._clock

        def done(result: object) -> object:
            op.record(length, clock() - started, isinstance(result, Failure))
            return result

        return d.addBoth(done)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        clock = self._clock
        started = clock()
        d = self._inner_read(offset, length)
        if d.called and not d.paused and type(d.result) is not Failure:
            # The common case (a page cache hit, a memory device) counted
            # inline: this is most of a small read's cost of the filter.
            seconds = clock() - started
            op = self._read
            op.count += 1
            op.bytes += length
            op.latency += seconds
            micros = int(seconds * 1e6)
            op.histogram[min((micros - 1).bit_length(), _LAST) if micros > 1 else 0] += 1
            return d
        return self._count(d, self._read, length, started)

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        started = self._clock()
        return self._count(super().read_sparse(offset, length), self._read, length, started)

    def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        # Only offered when the device below has it (see BlockDeviceFilter).
        read_buffer = self._inner_read_buffer
        assert read_buffer is not None
        clock = self._clock
        started = clock()
        # If this raises, the server falls back to read, which is counted then.
        data = read_buffer(offset, length)
        self._read.record(length, clock() - started, False)
        return data

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        started = self._clock()
        d = self.inner.write(offset, data, fua)
        return self._count(d, self._write, len(data), started)

    def flush(self) -> Deferred[None]:
        started = self._clock()
        return self._count(self.inner.flush(), self._flush, 0, started)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        started = self._clock()
        return self._count(self.inner.trim(offset, length, fua), self._trim, length, started)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        started = self._clock()
        d = self.inner.write_zeroes(offset, length, fua, may_trim, fast)
        return self._count(d, self._zero, length, started)

    def cache(self, offset: int, length: int) -> Deferred[None]:
        started = self._clock()
        return self._count(self.inner.cache(offset, length), self._cache, length, started)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        started = self._clock()
        d = self.inner.block_status(offset, length)
        return self._count(d, self._extents, length, started)

    def close(self) -> Deferred[None]:
        if self._log:
            _log.info("Statistics: {summary}", summary=self.stats.summary())
        return super().close()


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return StatsFilter(inner, log=values["log"])


plugin = FilterPlugin(
    name="stats",
    help="count requests, bytes, errors and latency per operation",
    keys=(Key("log", BOOL, False, "log a summary when the export closes"),),
    wrap=_wrap,
)
