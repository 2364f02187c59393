# -*- test-case-name: tests.test_protocol -*-
"""
Public test helpers for people who write backends, filters or applications
on top of twisted-nbd.

L{ControllableBlockDevice} answers nothing by itself: every call is recorded
with an unfired Deferred that the test fires when and how it likes, which is
how the protocol tests show out-of-order replies, queue-depth limits, FLUSH
ordering and connections that close with requests in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from twisted_nbd.interfaces import Capabilities, Extent, IBlockDevice

__all__ = ["Call", "ControllableBlockDevice"]


@dataclass
class Call:
    """
    One recorded call on a L{ControllableBlockDevice}.

    @ivar method: the method's name (C{"read"}, C{"write"}, ...).
    @ivar args: its arguments, by name.
    @ivar deferred: the Deferred the call returned; fire it to answer.
    """

    method: str
    args: dict[str, Any]
    deferred: Deferred[Any] = field(repr=False)

    def succeed(self, result: Any = None) -> None:
        """Fire the call's Deferred with C{result}."""
        self.deferred.callback(result)

    def fail(self, error: BaseException) -> None:
        """Fail the call's Deferred with C{error}."""
        self.deferred.errback(error)


@implementer(IBlockDevice)
class ControllableBlockDevice:
    """
    An L{IBlockDevice} whose every operation returns a Deferred that the
    test fires by hand, in any order.

    @ivar calls: the calls not yet taken by L{take}, oldest first.
    """

    def __init__(self, size: int, capabilities: Capabilities | None = None) -> None:
        self.size = size
        self.capabilities = capabilities or Capabilities(
            can_fast_zero=True, can_cache=True, can_extents=True
        )
        self.calls: list[Call] = []
        self.closed = False

    def _record(self, method: str, **args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(Call(method, args, d))
        return d

    def take(self, method: str | None = None) -> Call:
        """
        Remove and return the oldest recorded call.

        @raise AssertionError: there is none, or it is not a call of
            C{method}.
        """
        if not self.calls:
            raise AssertionError("no call was recorded")
        call = self.calls.pop(0)
        if method is not None and call.method != method:
            raise AssertionError(f"expected a call of {method}, got {call}")
        return call

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self._record("read", offset=offset, length=length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        return self._record("write", offset=offset, data=bytes(data), fua=fua)

    def flush(self) -> Deferred[None]:
        return self._record("flush")

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return self._record("trim", offset=offset, length=length, fua=fua)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        return self._record(
            "write_zeroes", offset=offset, length=length, fua=fua, may_trim=may_trim, fast=fast
        )

    def cache(self, offset: int, length: int) -> Deferred[None]:
        return self._record("cache", offset=offset, length=length)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        return self._record("block_status", offset=offset, length=length)

    def close(self) -> Deferred[None]:
        self.closed = True
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d
