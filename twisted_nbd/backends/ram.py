# -*- test-case-name: tests.test_ram -*-
"""
A RAM disk in one shared memory file, readable without copying.

The bytes live in an anonymous memory file (C{memfd_create}) mapped into
the process; a second small memory file holds one state byte per chunk of
L{CHUNK} bytes: never written (a hole, which reads as zeroes and costs no
memory), data, or allocated zeroes. Both are plain file descriptors, so a
worker process that is handed them serves the same disk (see
L{MappedMemoryDevice.share}): a write acknowledged on any connection, in
any process, is what every later read sees, which is what multi-conn
promises.

Reads of data hand the mapping's bytes to the server without a copy
(L{twisted_nbd.interfaces.IBufferRead}); only holes are assembled, and
they are never read through the mapping (a read fault on a hole of a
shared memory file would allocate a page for it).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from typing import Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from twisted_nbd._wire import Errno
from twisted_nbd.backends.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _fallocate
from twisted_nbd.errors import NBDError
from twisted_nbd.extents import read_planned
from twisted_nbd.interfaces import (
    STATE_HOLE,
    STATE_ZERO,
    Capabilities,
    Extent,
    IBlockDevice,
    IBufferRead,
    IBufferWrite,
    IImmediateIO,
    ISparseRead,
    Segment,
)

__all__ = ["CHUNK", "MAPPED_MAX", "MAX_ALLOCATION", "MappedMemoryDevice"]

_T = TypeVar("_T")

#: The allocation unit: the granularity of block status and of freeing.
CHUNK = 64 * 1024
_SHIFT = CHUNK.bit_length() - 1

#: The largest RAM disk mapped whole: its state map takes one byte per
#: chunk (16 MiB for 1 TiB). Larger, sparser test disks use
#: L{twisted_nbd.backends.memory.MemoryBlockDevice}.
MAPPED_MAX = 1 << 40

#: The most new memory one NO_HOLE zeroing may allocate; beyond it the
#: request fails with ENOSPC instead of eating the machine's memory.
MAX_ALLOCATION = 1 << 30

#: C{block_status} stops after this many extents, which the interface allows.
MAX_EXTENTS = 1024

#: Chunk states in the map.
_HOLE_STATE, _DATA_STATE, _ZERO_STATE = 0, 1, 2
_NOT_HOLE = re.compile(rb"[^\x00]")
_HOLE_OR_ZERO = re.compile(rb"[\x00\x02]")
_NOT_ZERO = re.compile(rb"[^\x02]")
#: The next state different from each state, and what each reports.
_NEXT = {_HOLE_STATE: _NOT_HOLE, _DATA_STATE: _HOLE_OR_ZERO, _ZERO_STATE: _NOT_ZERO}
_FLAGS = {_HOLE_STATE: STATE_HOLE | STATE_ZERO, _DATA_STATE: 0, _ZERO_STATE: STATE_ZERO}
_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

DEFAULT_CAPABILITIES = Capabilities(
    can_fast_zero=True,
    can_cache=True,
    can_extents=True,
    can_multi_conn=True,
)


def _call(f: Callable[[], _T]) -> Deferred[_T]:
    try:
        return succeed(f())
    except BaseException as e:
        return fail(e)


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


@implementer(IBlockDevice, ISparseRead, IBufferRead, IBufferWrite, IImmediateIO)
class MappedMemoryDevice:
    """
    An L{IBlockDevice} in shared memory, sparse in chunks of L{CHUNK} bytes.

    Every Deferred it returns has already fired; C{flush} and C{fua} have
    nothing to do.

    @ivar size: the device's size in bytes.
    @ivar capabilities: what it advertises.
    """

    def __init__(
        self,
        size: int,
        capabilities: Capabilities | None = None,
        *,
        fds: tuple[int, int] | None = None,
    ) -> None:
        """
        @param size: the size in bytes, at most L{MAPPED_MAX}.
        @param fds: the data and map file descriptors of a disk made by
            another process (see L{share}); a new, empty disk if C{None}.
            The device owns them from now on.
        @raise ValueError: C{size} is negative or too large.
        @raise OSError: the memory files cannot be made or mapped.
        """
        if not 0 <= size <= MAPPED_MAX:
            raise ValueError(f"size must be from 0 to {MAPPED_MAX}, not {size}")
        self.size = size
        self.capabilities = capabilities or DEFAULT_CAPABILITIES
        chunks = max(1, -(-size // CHUNK))
        if fds is None:
            data_fd = _memfd("twisted-nbd-ram", max(size, 1))
            try:
                map_fd = _memfd("twisted-nbd-ram-map", chunks)
            except BaseException:
                os.close(data_fd)
                raise
        else:
            data_fd, map_fd = fds
        self._data_fd, self._map_fd = data_fd, map_fd
        self._data = mmap.mmap(data_fd, max(size, 1), mmap.MAP_SHARED)
        self._map = mmap.mmap(map_fd, chunks, mmap.MAP_SHARED)
        self._view = memoryview(self._data)
        self._zeroes = bytes(CHUNK)
        self._closed = False

    def share(self) -> tuple[int, int]:
        """
        The file descriptors another process needs to serve this same disk
        (pass them to L{MappedMemoryDevice} there, with C{fds}).
        """
        return self._data_fd, self._map_fd

    def adopt(self, fds: tuple[int, int]) -> None:
        """
        Serve the disk of another process from now on (see L{share}),
        instead of this one's: for a new server taking over from an old one
        (L{twisted_nbd.restart}), before any client has used this device.
        The device owns C{fds} from now on; its own memory is released.

        @raise ValueError: the device is closed.
        @raise OSError: the memory files cannot be mapped.
        """
        if self._closed:
            raise ValueError("the device is closed")
        chunks = max(1, -(-self.size // CHUNK))
        data = mmap.mmap(fds[0], max(self.size, 1), mmap.MAP_SHARED)
        try:
            states = mmap.mmap(fds[1], chunks, mmap.MAP_SHARED)
        except BaseException:
            data.close()
            raise
        self._view.release()
        self._data.close()
        self._map.close()
        os.close(self._data_fd)
        os.close(self._map_fd)
        self._data_fd, self._map_fd = fds
        self._data, self._map = data, states
        self._view = memoryview(data)

    # Reading.

    def _chunks(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> _SHIFT, (offset + length - 1) >> _SHIFT

    def read_buffer(self, offset: int, length: int) -> memoryview | bytes:
        """
        The bytes at C{offset}, without copying them when they are all data
        (L{IBufferRead}): a view of the disk, valid until control returns to
        the reactor (a later write changes it).
        """
        if length <= 0:
            return b""
        # _chunks, inline: this runs for every READ.
        first = offset >> _SHIFT
        last = (offset + length - 1) >> _SHIFT
        states = self._map
        if first == last:
            if states[first]:
                return self._view[offset : offset + length]
            return self._zeroes[:length] if length <= CHUNK else bytes(length)
        if states.find(b"\x00", first, last + 1) < 0:
            return self._view[offset : offset + length]
        return self._assemble(offset, length)

    def _assemble(self, offset: int, length: int) -> bytes:
        """A copy of a range holding holes: data copied, holes left zero."""
        out = bytearray(length)
        states = self._map
        end = offset + length
        position = offset
        while position < end:
            index = position >> _SHIFT
            stop = min(end, (index + 1) << _SHIFT)
            if states[index]:
                out[position - offset : stop - offset] = self._view[position:stop]
            position = stop
        return bytes(out)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """
        Read C{length} bytes at C{offset}; holes read as zeroes.

        @return: an already-fired Deferred with a copy of the bytes.
        """
        return _call(lambda: bytes(self.read_buffer(offset, length)))

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        """
        Read C{length} bytes at C{offset}, describing holes as zero runs
        (L{ISparseRead}). As with L{read_buffer}, the data segments may be
        views of the disk, valid until control returns to the reactor.

        @return: an already-fired Deferred with the segments.
        """
        return _call(
            lambda: read_planned(
                offset,
                length,
                self._block_status(offset, length, limit=None),
                self.read_buffer,  # type: ignore[arg-type]
            )
        )

    # Writing.

    def read_now(self, offset: int, length: int) -> bytes:
        """A copy of the bytes at C{offset} (L{IImmediateIO}); holes read as zeroes."""
        return bytes(self.read_buffer(offset, length))

    def write_now(self, offset: int, data: bytes | memoryview) -> int:
        """
        Copy C{data} to C{offset} (L{IImmediateIO}); always all of it.

        @return: C{len(data)}.
        """
        length = len(data)
        if length:
            self._view[offset : offset + length] = data
            first, last = self._chunks(offset, length)
            if first == last:
                self._map[first] = _DATA_STATE
            else:
                self._map[first : last + 1] = b"\x01" * (last - first + 1)
        return length

    def write_buffer(self, offset: int, length: int) -> memoryview | None:
        """
        The disk's own memory at C{offset}, for a WRITE's payload to be
        received into (L{IBufferWrite}); C{None} when closed or empty.

        The chunks it covers become data at once: holes in the memory file
        read as zeroes there, so the parts of partly covered chunks that the
        payload does not reach still read as zeroes.
        """
        if length <= 0 or self._closed or offset < 0 or offset + length > self.size:
            return None
        first, last = self._chunks(offset, length)
        self._map[first : last + 1] = b"\x01" * (last - first + 1)
        return self._view[offset : offset + length]

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        """
        Copy C{data} to C{offset}. C{fua} changes nothing.

        @return: an already-fired Deferred with C{None}.
        """

        def write() -> None:
            self.write_now(offset, data)

        return _call(write)

    def _zero(self, offset: int, length: int, deallocate: bool) -> None:
        """
        Make a range read as zeroes. With C{deallocate}, chunks it covers
        entirely are freed, and partly covered ones too if they end up all
        zeroes; without it, every chunk touched stays (or becomes) allocated.

        @raise NBDError: C{ENOSPC} when keeping the range allocated would
            take more than L{MAX_ALLOCATION} bytes of new memory.
        """
        if length <= 0:
            return
        end = offset + length
        first, last = self._chunks(offset, length)
        # Whole chunks: from the first chunk boundary at or after offset to
        # the last one at or before end (or the device's end).
        whole_start = -(-offset // CHUNK)
        whole_end = last + 1 if end >= self.size else end >> _SHIFT
        if not deallocate:
            holes = self._map[first : last + 1].count(b"\x00")
            if holes * CHUNK > MAX_ALLOCATION:
                raise NBDError(
                    Errno.ENOSPC,
                    f"keeping {holes * CHUNK} bytes allocated needs more memory than the "
                    f"{MAX_ALLOCATION} bytes a memory device allocates at once",
                )
        for index in sorted({first, last}):
            if not whole_start <= index < whole_end:
                start = max(offset, index << _SHIFT)
                stop = min(end, (index + 1) << _SHIFT)
                self._zero_part(index, start, stop, deallocate)
        if whole_start < whole_end:
            start = whole_start << _SHIFT
            stop = min(whole_end << _SHIFT, self.size)
            count = whole_end - whole_start
            self._punch(start, stop - start)
            if deallocate:
                self._map[whole_start:whole_end] = bytes(count)
            else:
                # Allocated zeroes: the memory is taken now, so later writes
                # there cannot fail for want of it (NBD_CMD_FLAG_NO_HOLE).
                os.posix_fallocate(self._data_fd, start, stop - start)
                self._map[whole_start:whole_end] = b"\x02" * count

    def _zero_part(self, index: int, start: int, stop: int, deallocate: bool) -> None:
        """Zero [start, stop) within chunk C{index}, which it covers in part."""
        state = self._map[index]
        if state == _HOLE_STATE:
            if not deallocate:
                chunk_start = index << _SHIFT
                chunk_stop = min(chunk_start + CHUNK, self.size)
                os.posix_fallocate(self._data_fd, chunk_start, chunk_stop - chunk_start)
                self._map[index] = _ZERO_STATE
            return
        self._view[start:stop] = self._zeroes[: stop - start]
        chunk_start = index << _SHIFT
        chunk_stop = min(chunk_start + CHUNK, self.size)
        if self._view[chunk_start:chunk_stop] == self._zeroes[: chunk_stop - chunk_start]:
            # The whole chunk is zero now: free it, or remember it is zero.
            if deallocate:
                self._punch(chunk_start, chunk_stop - chunk_start)
                self._map[index] = _HOLE_STATE
            else:
                self._map[index] = _ZERO_STATE

    def _punch(self, start: int, length: int) -> None:
        """Free the memory of a range of whole chunks (it reads as zeroes)."""
        try:
            _fallocate(self._data_fd, _PUNCH, start, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # No punching here: zero it instead (the memory stays taken).
            position = start
            while position < start + length:
                piece = min(CHUNK, start + length - position)
                self._view[position : position + piece] = self._zeroes[:piece]
                position += piece

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        """
        Free the chunks the range covers entirely and zero the parts of the
        others, so a trimmed range reads as zeroes.

        @return: an already-fired Deferred with C{None}.
        """
        return _call(lambda: self._zero(offset, length, deallocate=True))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> Deferred[None]:
        """
        Make a range read as zeroes: like L{trim} when C{may_trim}, else by
        allocating zeroed memory. Always fast.

        @return: an already-fired Deferred with C{None}, or failed with
            C{NBDError(ENOSPC)} (see L{_zero}).
        """
        return _call(lambda: self._zero(offset, length, deallocate=may_trim))

    def flush(self) -> Deferred[None]:
        """
        Nothing to do: memory is as durable as it gets.

        @return: an already-fired Deferred with C{None}.
        """
        return succeed(None)

    def cache(self, offset: int, length: int) -> Deferred[None]:
        """
        Nothing to do: everything is in memory.

        @return: an already-fired Deferred with C{None}.
        """
        return succeed(None)

    # Block status.

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        """
        Describe allocation from C{offset}: holes are C{STATE_HOLE |
        STATE_ZERO}, allocated zeroes C{STATE_ZERO}, data C{0}; at most
        L{MAX_EXTENTS} extents, never past the range or the size.

        @return: an already-fired Deferred with a non-empty list of
            L{Extent}s.
        """
        return _call(lambda: self._block_status(offset, length, limit=MAX_EXTENTS))

    def _block_status(self, offset: int, length: int, limit: int | None) -> list[Extent]:
        end = min(offset + max(length, 1), self.size)
        if end <= offset:
            raise ValueError(f"block status at {offset} is outside a device of {self.size} bytes")
        states = self._map
        first, last = self._chunks(offset, end - offset)
        extents: list[Extent] = []
        index = first
        position = offset
        while index <= last and (limit is None or len(extents) < limit):
            state = states[index]
            # The next chunk in a different state (a regular expression scans
            # the map in C, so a huge hole costs little).
            found = _NEXT[state].search(states, index, last + 1)
            following = found.start() if found else last + 1
            stop = min(end, following << _SHIFT)
            extents.append(Extent(stop - position, _FLAGS[state]))
            position, index = stop, following
        return extents

    def close(self) -> Deferred[None]:
        """
        Unmap and close the memory files (the disk is gone once no process
        holds them). Calling it again does nothing.

        @return: an already-fired Deferred with C{None}.
        """
        if not self._closed:
            self._closed = True
            self._view.release()
            for mapping in (self._data, self._map):
                try:
                    mapping.close()
                except BufferError:
                    # A view still exported (a reply being written): the
                    # mapping goes when the last one does.
                    pass
            os.close(self._data_fd)
            os.close(self._map_fd)
        return succeed(None)
