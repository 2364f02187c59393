# -*- test-case-name: tests.test_buffer -*-
"""
A receive buffer whose cost is linear in the bytes received.

Data is kept as the list of chunks it arrived in. Taking a message that is
exactly one chunk costs nothing; otherwise the pieces are joined once. This
keeps a 32 MiB WRITE that arrives in 64 KiB reads from being copied more than
once, where C{buffer += data} would copy it hundreds of times.
"""

from __future__ import annotations

import enum
from collections import deque
from struct import Struct
from typing import Any

__all__ = ["NEED_DATA", "ReceiveBuffer"]


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: What the sans-I/O parsers return when the buffered bytes do not yet hold
#: a whole message.
NEED_DATA = _NeedData.NEED_DATA


class ReceiveBuffer:
    """
    A FIFO of bytes: L{append} at the end, L{take} or L{skip} from the
    front.
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        # How much of the first chunk has already been consumed.
        self._offset = 0
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def append(self, data: bytes) -> None:
        """Add C{data} at the end."""
        if data:
            self._chunks.append(data)
            self._length += len(data)

    def take(self, count: int) -> bytes:
        """
        Remove and return the first C{count} bytes.

        @raise ValueError: fewer than C{count} bytes are buffered.
        """
        if count > self._length:
            raise ValueError(f"{count} bytes wanted, {self._length} buffered")
        if count == 0:
            return b""
        first = self._chunks[0]
        available = len(first) - self._offset
        if available >= count:
            if self._offset == 0 and available == count:
                # The common case for large payloads: hand the chunk over.
                self._chunks.popleft()
                result = first
            else:
                result = first[self._offset : self._offset + count]
                self._consume_first(count, available)
            self._length -= count
            return result
        parts: list[memoryview | bytes] = []
        remaining = count
        while remaining:
            first = self._chunks[0]
            available = len(first) - self._offset
            if available <= remaining:
                parts.append(memoryview(first)[self._offset :] if self._offset else first)
                self._chunks.popleft()
                self._offset = 0
                remaining -= available
            else:
                parts.append(memoryview(first)[self._offset : self._offset + remaining])
                self._offset += remaining
                remaining = 0
        self._length -= count
        return b"".join(parts)

    def take_view(self, count: int) -> bytes | memoryview:
        """
        Like L{take}, but a part of one chunk comes as a view of it rather
        than a copy (the chunk is bytes, so the view never changes).
        """
        if count and self._chunks and len(self._chunks[0]) - self._offset > count:
            first = self._chunks[0]
            start = self._offset
            self._offset += count
            self._length -= count
            return memoryview(first)[start : start + count]
        return self.take(count)

    def take_into(self, view: memoryview) -> int:
        """
        Move as many bytes from the front as fit into C{view} (all of them
        if they fit).

        @return: how many were moved.
        """
        count = min(len(view), self._length)
        position = 0
        while position < count:
            first = self._chunks[0]
            available = len(first) - self._offset
            piece = min(available, count - position)
            view[position : position + piece] = memoryview(first)[
                self._offset : self._offset + piece
            ]
            self._consume_first(piece, available)
            position += piece
        self._length -= count
        return count

    def unpack(self, fmt: Struct) -> tuple[Any, ...] | None:
        """
        Remove a fixed-size structure from the front and return its fields,
        or return C{None} (removing nothing) if it has not all arrived. When
        it lies within one chunk, as nearly always, nothing is copied.
        """
        size = fmt.size
        if size > self._length:
            return None
        first = self._chunks[0]
        offset = self._offset
        if len(first) - offset >= size:
            fields = fmt.unpack_from(first, offset)
            self._consume_first(size, len(first) - offset)
            self._length -= size
            return fields
        return fmt.unpack(self.take(size))

    def front(self) -> tuple[bytes, int]:
        """
        The first chunk and where its unconsumed bytes start (C{(b"", 0)}
        when nothing is buffered), for a parser that reads messages lying
        within it in place; it then calls L{consume_front}.
        """
        if not self._length:
            return b"", 0
        return self._chunks[0], self._offset

    def consume_front(self, count: int) -> None:
        """
        Remove C{count} bytes from the front, all of them within the first
        chunk (see L{front}).
        """
        first = self._chunks[0]
        if self._offset + count >= len(first):
            self._chunks.popleft()
            self._offset = 0
        else:
            self._offset += count
        self._length -= count

    def skip(self, count: int) -> int:
        """
        Discard up to C{count} bytes from the front.

        @return: how many bytes were discarded.
        """
        count = min(count, self._length)
        remaining = count
        while remaining:
            first = self._chunks[0]
            available = len(first) - self._offset
            if available <= remaining:
                self._chunks.popleft()
                self._offset = 0
                remaining -= available
            else:
                self._offset += remaining
                remaining = 0
        self._length -= count
        return count

    def _consume_first(self, count: int, available: int) -> None:
        if count == available:
            self._chunks.popleft()
            self._offset = 0
        else:
            self._offset += count
