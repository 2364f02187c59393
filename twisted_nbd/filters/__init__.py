"""
Filters: block devices that wrap a block device and change what passes
through (copy-on-write, read-only, error and delay injection, statistics,
caching, rate limits, slicing, block size adaptation).

Each module defines a L{twisted_nbd.base.BlockDeviceFilter} subclass and a
C{plugin} (a L{twisted_nbd.registry.FilterPlugin}) through which it is
named on the command line (C{--filter NAME:key=value,...}) and in config
files. Filters stack in any order; the first named is the outermost.
"""

from __future__ import annotations

from typing import TypeVar

from twisted_nbd.interfaces import IBlockDevice

__all__ = ["find_filter", "stack"]

_F = TypeVar("_F")


def stack(device: IBlockDevice) -> list[IBlockDevice]:
    """C{device} and every device it wraps (through C{inner}), outermost first."""
    found = [device]
    while (inner := getattr(found[-1], "inner", None)) is not None:
        found.append(inner)
    return found


def find_filter(device: IBlockDevice, kind: type[_F]) -> _F | None:
    """
    The outermost filter of class C{kind} in C{device}'s stack, or C{None}:
    how a metrics endpoint finds an export's
    L{twisted_nbd.filters.stats.StatsFilter}.
    """
    for layer in stack(device):
        if isinstance(layer, kind):
            return layer
    return None
