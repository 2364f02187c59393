# -*- test-case-name: tests.test_filters -*-
"""
The C{readonly} filter: the device below is served read-only, whatever it
can do. Writes, trims and zeroing fail with C{EPERM} (the server does not
even pass them on, since the capabilities say the device cannot write).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from twisted.internet.defer import Deferred, fail

from twisted_nbd._wire import Errno
from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDeviceFilter
from twisted_nbd.errors import NBDError
from twisted_nbd.interfaces import Capabilities, IBlockDevice
from twisted_nbd.registry import FilterPlugin

__all__ = ["ReadOnlyFilter", "plugin"]


class ReadOnlyFilter(BlockDeviceFilter):
    """Serves C{inner} read-only; reads and block status pass straight through."""

    def __init__(self, inner: IBlockDevice) -> None:
        super().__init__(inner)
        caps: Capabilities = inner.capabilities
        self._capabilities = replace(
            caps,
            can_write=False,
            can_fua=False,
            can_trim=False,
            can_zero=False,
            can_fast_zero=False,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _refuse(self) -> Deferred[None]:
        return fail(NBDError(Errno.EPERM, "the device is read-only (readonly filter)"))

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        return self._refuse()

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        return self._refuse()

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        return self._refuse()


def _wrap(inner: IBlockDevice, values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    return ReadOnlyFilter(inner)


plugin = FilterPlugin(
    name="readonly",
    help="serve the device below read-only (writes fail with EPERM)",
    keys=(),
    wrap=_wrap,
)
