# -*- test-case-name: tests.test_connection -*-
"""
Helpers for backends that know where their holes are.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted_nbd.interfaces import STATE_ZERO, Extent, Segment

__all__ = ["MIN_HOLE", "plan_sparse_read", "read_planned"]

#: Zero runs shorter than this are sent as data: a hole chunk would save little.
MIN_HOLE = 4096


def plan_sparse_read(
    offset: int, length: int, extents: Sequence[Extent]
) -> list[tuple[int, int, bool]]:
    """
    Split the read of C{length} bytes at C{offset} into consecutive
    C{(offset, length, is_hole)} segments from a backend's extents: runs
    that read as zeroes (L{STATE_ZERO}) of at least L{MIN_HOLE} bytes are
    holes, everything else (and anything the extents do not cover) is data.
    """
    end = offset + length
    pos = offset
    segments: list[list[int]] = []
    for extent in extents:
        if pos >= end:
            break
        run = min(extent.length, end - pos)
        if run <= 0:
            break
        hole = int(bool(extent.flags & STATE_ZERO) and run >= MIN_HOLE)
        if segments and segments[-1][2] == hole:
            segments[-1][1] += run
        else:
            segments.append([pos, run, hole])
        pos += run
    if pos < end:
        if segments and not segments[-1][2]:
            segments[-1][1] += end - pos
        else:
            segments.append([pos, end - pos, 0])
    return [(start, run, bool(hole)) for start, run, hole in segments]


def read_planned(
    offset: int,
    length: int,
    extents: Sequence[Extent],
    read: Callable[[int, int], bytes],
) -> list[Segment]:
    """
    A synchronous C{read_sparse}: plan the read from C{extents} and call
    C{read(offset, length)} for each data run.

    @return: the segments, as L{twisted_nbd.interfaces.ISparseRead} wants.
    """
    return [
        (start, run) if hole else (start, read(start, run))
        for start, run, hole in plan_sparse_read(offset, length, extents)
    ]
