# -*- test-case-name: tests.test_filters -*-
"""
The C{delay} filter: hold each request for a while before passing it on,
to imitate slow or distant storage (like nbdkit's delay filter). The wait
is on the reactor's clock (C{callLater}), never a sleep, so other requests
and connections go on meanwhile.

C{delay:delay=10ms,ops=read} delays reads by 10 ms; C{jitter=5ms} adds a
random part from 0 to 5 ms (C{seed=N} makes it repeatable).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from twisted_nbd.backends import OpenContext
from twisted_nbd.base import OperationFilter
from twisted_nbd.filters.error import OPERATIONS
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.registry import DURATION, INT, FilterPlugin, Key, set_of

__all__ = ["DelayFilter", "plugin"]

_T = TypeVar("_T")


class DelayFilter(OperationFilter):
    """
    Delays the chosen operations by C{delay} seconds plus a random part
    up to C{jitter}.
    """

    def __init__(
        self,
        inner: IBlockDevice,
        clock: IReactorTime,
        delay: float,
        jitter: float = 0.0,
        ops: frozenset[str] = frozenset(OPERATIONS),
        seed: int | None = None,
    ) -> None:
        super().__init__(inner)
        self._clock = clock
        self._delay = delay
        self._jitter = jitter
        self._ops = ops
        self._random = random.Random(seed).random

    def around(self, op: str, call: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        if op not in self._ops:
            return call()
        wait = self._delay + (self._jitter * self._random() if self._jitter else 0.0)
        if wait <= 0:
            return call()
        return deferLater(self._clock, wait, cast("Callable[[], _T]", call))


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return DelayFilter(
        inner, context.reactor, values["delay"], values["jitter"], values["ops"], values["seed"]
    )


plugin = FilterPlugin(
    name="delay",
    help="delay requests on the reactor's clock, to imitate slow storage",
    keys=(
        Key("delay", DURATION, 0.01, "the fixed delay: 10ms, 250us, 0.5s", "10ms"),
        Key("jitter", DURATION, 0.0, "add a random delay from 0 up to this", "0"),
        Key("ops", set_of(*OPERATIONS), frozenset(OPERATIONS), "which operations", "all"),
        Key("seed", INT, None, "seed the random part, for repeatable tests"),
    ),
    wrap=_wrap,
)
