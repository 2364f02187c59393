"""Helpers shared by the filters."""

from __future__ import annotations

from typing import Sequence

from twisted_nbd.interfaces import Extent

__all__ = ["clip_extents"]


def clip_extents(extents: Sequence[Extent], length: int) -> list[Extent]:
    """The first C{length} bytes (at least one extent) of C{extents}."""
    clipped: list[Extent] = []
    left = length
    for extent in extents:
        if left <= 0:
            break
        if extent.length <= left:
            clipped.append(extent)
        else:
            clipped.append(Extent(left, extent.flags))
        left -= extent.length
    return clipped
