# -*- test-case-name: tests.test_filters -*-
"""
The C{error} filter: fail a random share of requests with an NBD error,
to test how clients cope (like nbdkit's error filter). A failed request
never reaches the device below.

C{error:rate=0.01,ops=read+write,errno=EIO} fails 1% of reads and writes
with EIO; C{seed=N} makes the choice repeatable, for tests.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping, TypeVar

from twisted.internet.defer import Deferred, fail

from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.base import OperationFilter
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.registry import ERRNO, INT, FilterPlugin, Key, KeyType, set_of

__all__ = ["ErrorFilter", "OPERATIONS", "RATE", "plugin"]

_T = TypeVar("_T")

#: The operations the C{ops} key names.
OPERATIONS = ("read", "write", "flush", "trim", "zero", "cache", "extents")


def _parse_rate(text: str) -> float:
    text = text.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate such as 0.01 or 1%") from None
    return _check_rate(value)


def _check_rate(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{value} is not from 0 to 1")
    return float(value)


#: A share of requests: C{0.01} or C{1%}.
RATE: KeyType[float] = KeyType("RATE", _parse_rate, (int, float), _check_rate)


class ErrorFilter(OperationFilter):
    """
    Fails each of the chosen operations with probability C{rate}.

    @ivar injected: how many requests it has failed.
    """

    def __init__(
        self,
        inner: IBlockDevice,
        rate: float,
        ops: frozenset[str] = frozenset({"read", "write"}),
        errno: Errno = Errno.EIO,
        seed: int | None = None,
    ) -> None:
        super().__init__(inner)
        self._rate = rate
        self._ops = ops
        self._errno = errno
        self._random = random.Random(seed).random
        self.injected = 0

    def around(self, op: str, call: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        if op in self._ops and self._random() < self._rate:
            self.injected += 1
            return fail(NBDError(self._errno, f"{op} failed by the error filter"))
        return call()


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return ErrorFilter(inner, values["rate"], values["ops"], values["errno"], values["seed"])


plugin = FilterPlugin(
    name="error",
    help="fail a random share of requests with an error, to test clients",
    keys=(
        Key("rate", RATE, 0.01, "the share of requests to fail: 0.01 or 1%"),
        Key(
            "ops",
            set_of(*OPERATIONS),
            frozenset({"read", "write"}),
            f"which operations: {'+'.join(OPERATIONS)} or all",
            "read+write",
        ),
        Key("errno", ERRNO, Errno.EIO, "the error: EIO, ENOSPC, EPERM, EINVAL, ENOMEM, ..."),
        Key("seed", INT, None, "seed the random choice, for repeatable tests"),
    ),
    wrap=_wrap,
)
