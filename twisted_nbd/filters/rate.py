# -*- test-case-name: tests.test_filters -*-
"""
The C{rate} filter: limit the bytes read and written per second, with a
token bucket on the reactor's clock. Requests wait their turn in order; a
request larger than the bucket is let through once it is full and leaves
it in debt, so any size passes and the average rate holds. The limit is
per export (all its connections share the bucket), or with
C{per=connection} one bucket per connection.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping, Sequence, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.interfaces import IBlockDevice, Segment
from twisted_nbd.registry import SIZE, FilterPlugin, Key, choice, set_of

__all__ = ["RateFilter", "plugin"]

_T = TypeVar("_T")


class RateFilter(BlockDeviceFilter):
    """Lets through at most C{rate} bytes per second of the chosen operations."""

    def __init__(
        self,
        inner: IBlockDevice,
        clock: IReactorTime,
        rate: int,
        burst: int | None = None,
        ops: frozenset[str] = frozenset({"read", "write"}),
        owns_inner: bool = True,
    ) -> None:
        """
        @param owns_inner: C{close} closes C{inner} too; false for a
            per-connection layer, whose device outlives it.
        """
        super().__init__(inner)
        self._owns_inner = owns_inner
        self._clock = clock
        self._rate = float(rate)
        self._burst = float(burst if burst is not None else max(rate // 10, 64 * 1024))
        self._tokens = self._burst
        self._last = clock.seconds()
        self._ops = ops
        self._queue: deque[tuple[int, Callable[[], object]]] = deque()
        self._timer: IDelayedCall | None = None

    def _refill(self) -> None:
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def _take(self, op: str, length: int, call: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        if op not in self._ops:
            return call()
        self._refill()
        if not self._queue and self._tokens >= 0:
            self._tokens -= length
            return call()
        d: Deferred[_T] = Deferred()
        self._queue.append((length, lambda: call().chainDeferred(d)))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._timer is None and self._queue:
            wait = max(-self._tokens / self._rate, 0.0)
            self._timer = self._clock.callLater(wait, self._release)

    def _release(self) -> None:
        self._timer = None
        self._refill()
        while self._queue and self._tokens >= 0:
            length, go = self._queue.popleft()
            self._tokens -= length
            go()
        self._schedule()

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self._take("read", length, lambda: self.inner.read(offset, length))

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        return self._take(
            "read", length, lambda: super(RateFilter, self).read_sparse(offset, length)
        )

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        if "write" in self._ops and (self._queue or self._tokens < 0):
            data = bytes(data)  # it waits: the server may reuse the payload's memory
        return self._take("write", len(data), lambda: self.inner.write(offset, data, fua))

    def close(self) -> Deferred[None]:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # Whatever still waits goes now, so close's promise holds.
        queue, self._queue = self._queue, deque()
        for _, go in queue:
            go()
        if not self._owns_inner:
            return succeed(None)
        return super().close()


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    per_connection = values["per"] == "connection"
    return RateFilter(
        inner,
        context.reactor,
        values["rate"],
        values["burst"],
        values["ops"],
        owns_inner=not per_connection,
    )


plugin = FilterPlugin(
    name="rate",
    help="limit the bytes per second read and written (a token bucket)",
    keys=(
        Key("rate", SIZE, help="bytes per second: 10M is 10 MiB/s"),
        Key("burst", SIZE, None, "the bucket's size [default: a tenth of a second, 64K at least]"),
        Key("ops", set_of("read", "write"), frozenset({"read", "write"}), "which operations"),
        Key("per", choice("export", "connection"), "export", "one bucket per export or connection"),
    ),
    wrap=_wrap,
    per_process=False,
    per_connection=lambda values: values["per"] == "connection",
)
