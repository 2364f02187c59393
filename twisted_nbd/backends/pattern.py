# -*- test-case-name: tests.test_filters -*-
"""
The C{pattern} backend: a read-only device whose every 8-byte word holds
its own offset, big-endian, like nbdkit's pattern plugin. It costs no
memory whatever its size, so it makes good test data: any byte read tells
where it came from. Serve it with C{twistd -n nbd --backend pattern:size=1G}.

It shows how short a backend can be with L{BlockDevice}: C{read} returns
plain bytes, and the capabilities (read-only, no trim, no extents) follow
from the methods it does not define.
"""

from __future__ import annotations

import sys
from array import array
from typing import Any, Mapping

from twisted_nbd.backends import OpenContext
from twisted_nbd.base import BlockDevice
from twisted_nbd.registry import SIZE, BackendPlugin, Key

__all__ = ["PatternDevice", "plugin"]


class PatternDevice(BlockDevice):
    """A read-only device whose 8-byte words hold their own offsets."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        first = offset - offset % 8
        words = array("Q", range(first, offset + length, 8))
        if sys.byteorder == "little":
            words.byteswap()  # the pattern is big-endian, as nbdkit's
        start = offset - first
        return words.tobytes()[start : start + length]


def _open(values: Mapping[str, Any], context: OpenContext) -> PatternDevice:
    return PatternDevice(values["size"])


plugin = BackendPlugin(
    name="pattern",
    help="read-only test data: each 8-byte word holds its offset, big-endian (as nbdkit's)",
    keys=(Key("size", SIZE, help="the device's size"),),
    open=_open,
)
