# -*- test-case-name: tests.test_backends -*-
"""
A sparse block device that lives in memory, for tests and RAM disks.

Data is kept in fixed-size pages in a dict keyed by page number. A page that
was never written (or was trimmed) is absent: it reads as zeroes, costs no
memory and is reported as a hole by C{block_status}. So a 1 TiB device costs
next to nothing until it is written.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from twisted_nbd._wire import Errno
from twisted_nbd.errors import NBDError
from twisted_nbd.extents import read_planned
from twisted_nbd.interfaces import (
    STATE_HOLE,
    STATE_ZERO,
    Capabilities,
    Extent,
    IBlockDevice,
    ISparseRead,
    Segment,
)

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_PAGE_SIZE",
    "MAX_ALLOCATION",
    "MAX_EXTENTS",
    "MemoryBlockDevice",
]

_T = TypeVar("_T")

#: The default page size: big enough to keep the dict small, small enough
#: that a few scattered writes stay cheap.
DEFAULT_PAGE_SIZE = 64 * 1024

#: C{block_status} stops after this many extents, which the interface allows,
#: so one request over a badly fragmented device stays cheap to answer.
MAX_EXTENTS = 1024

#: What a memory device can do: zeroing is always fast in memory, caching is
#: a harmless no-op, and every connection sees the same dict.
DEFAULT_CAPABILITIES = Capabilities(
    can_fast_zero=True,
    can_cache=True,
    can_extents=True,
    can_multi_conn=True,
)

#: The most new memory one NO_HOLE zeroing may allocate; beyond it the
#: request fails with ENOSPC instead of eating the machine's memory.
MAX_ALLOCATION = 1 << 30

_HOLE = STATE_HOLE | STATE_ZERO


def _call(f: Callable[[], _T]) -> Deferred[_T]:
    """
    Run C{f} now and return an already-fired Deferred with its result or
    its exception, so a bug never escapes as a synchronous raise.
    """
    try:
        return succeed(f())
    except BaseException as e:
        return fail(e)


@implementer(IBlockDevice, ISparseRead)
class MemoryBlockDevice:
    """
    An L{IBlockDevice} kept in memory, sparse in pages of C{page_size} bytes.

    Every Deferred it returns has already fired. Contents are lost when the
    device is closed or garbage collected; C{flush} and C{fua} therefore
    have nothing to do.

    @ivar size: the size of the device in bytes.
    @ivar capabilities: L{DEFAULT_CAPABILITIES} unless others were given.
    @ivar page_size: the size of one page in bytes.
    """

    def __init__(
        self,
        size: int,
        capabilities: Capabilities | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        """
        @param size: the device's size in bytes.
        @param capabilities: what to advertise, for example with
            C{can_write=False} for a read-only RAM disk or a bigger
            C{min_block}; L{DEFAULT_CAPABILITIES} if not given.
        @param page_size: the allocation unit.
        @raise ValueError: C{size} is negative or C{page_size} is not
            positive.
        """
        if size < 0:
            raise ValueError(f"size must not be negative, not {size}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, not {page_size}")
        self.size = size
        self.capabilities = capabilities or DEFAULT_CAPABILITIES
        self.page_size = page_size
        self._pages: dict[int, bytearray] = {}
        # Allocated pages known to hold only zeroes (zeroed with NO_HOLE and not
        # written since): block_status reports them as STATE_ZERO.
        self._zeroPages: set[int] = set()
        # One shared page of zeroes: reads of holes slice it instead of
        # allocating, and zeroing copies from it.
        self._zeroes = memoryview(bytes(page_size))

    @property
    def page_count(self) -> int:
        """The number of pages that hold data (and so cost memory)."""
        return len(self._pages)

    def _spans(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """
        Split a byte range into C{(page index, start in page, length)}
        pieces, one per page touched.
        """
        spans = []
        page_size = self.page_size
        position, end = offset, offset + length
        while position < end:
            index, start = divmod(position, page_size)
            chunk = min(page_size - start, end - position)
            spans.append((index, start, chunk))
            position += chunk
        return spans

    def _whole_page(self, index: int, start: int, chunk: int) -> bool:
        """
        Whether a span covers every byte of its page that lies inside the
        device (the last page may stick out past C{size}).
        """
        return start == 0 and chunk >= min(self.page_size, self.size - index * self.page_size)

    def _page(self, index: int) -> bytearray:
        """Return page C{index}, allocating it (zeroed) if it is absent."""
        page = self._pages.get(index)
        if page is None:
            page = self._pages[index] = bytearray(self.page_size)
        return page

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """
        Read C{length} bytes at C{offset}; absent pages read as zeroes.

        @return: an already-fired Deferred with exactly C{length} bytes.
        """

        return _call(lambda: self._read(offset, length))

    def _read(self, offset: int, length: int) -> bytes:
        # Views into the pages and into the shared zero page, joined once:
        # a single copy whatever the length.
        pieces: list[memoryview] = []
        for index, start, chunk in self._spans(offset, length):
            page = self._pages.get(index)
            if page is None:
                pieces.append(self._zeroes[:chunk])
            else:
                pieces.append(memoryview(page)[start : start + chunk])
        return b"".join(pieces)

    def read_sparse(self, offset: int, length: int) -> Deferred[Sequence[Segment]]:
        """
        Read C{length} bytes at C{offset}, describing absent pages as zero
        runs instead of returning their bytes (L{ISparseRead}).

        @return: an already-fired Deferred with the segments.
        """

        return _call(
            lambda: read_planned(offset, length, self._block_status(offset, length), self._read)
        )

    def write(self, offset: int, data: bytes, fua: bool = False) -> Deferred[None]:
        """
        Copy C{data} to C{offset}, allocating the pages it touches. C{fua}
        changes nothing: memory is as durable as it gets.

        @return: an already-fired Deferred with C{None}.
        """

        def write() -> None:
            view = memoryview(data).cast("B")
            position = 0
            for index, start, chunk in self._spans(offset, len(view)):
                self._page(index)[start : start + chunk] = view[position : position + chunk]
                self._zeroPages.discard(index)
                position += chunk

        return _call(write)

    def _zero(self, offset: int, length: int, deallocate: bool) -> None:
        """
        Make a range read as zeroes. With C{deallocate}, pages it covers
        entirely are dropped, and partly covered ones are dropped too if they
        end up all zeroes; without it, every page touched stays (or becomes)
        allocated, as NBD_CMD_FLAG_NO_HOLE requires.

        The cost follows the pages that exist, not the length: zeroing
        2^62 bytes of a huge sparse device is as quick as zeroing one page,
        because this runs in the reactor thread.

        @raise NBDError: C{ENOSPC} when keeping the range allocated would
            take more than L{MAX_ALLOCATION} bytes of new pages.
        """
        if length <= 0:
            return
        page_size = self.page_size
        end = offset + length
        first, last = offset // page_size, (end - 1) // page_size
        middle = range(first + 1, last)
        # Visit whichever is smaller: the pages of the range, or the allocated ones.
        if len(middle) <= len(self._pages):
            present = [index for index in middle if index in self._pages]
        else:
            present = [index for index in self._pages if first < index < last]
        absent = len(middle) - len(present)
        if not deallocate and absent * page_size > MAX_ALLOCATION:
            # Refuse before touching anything.
            raise NBDError(
                Errno.ENOSPC,
                f"keeping {absent * page_size} bytes allocated needs more memory than the "
                f"{MAX_ALLOCATION} bytes a memory device allocates at once",
            )
        # The first and last pages may be partly covered: handle them one by one.
        for index in sorted({first, last}):
            start = max(offset, index * page_size)
            stop = min(end, (index + 1) * page_size)
            self._zero_span(index, start - index * page_size, stop - start, deallocate)
        if deallocate:
            for index in present:
                del self._pages[index]
                self._zeroPages.discard(index)
            return
        for index in present:
            self._pages[index][:] = self._zeroes
        for index in middle:
            if index not in self._pages:
                self._pages[index] = bytearray(page_size)
            self._zeroPages.add(index)

    def _zero_span(self, index: int, start: int, chunk: int, deallocate: bool) -> None:
        """Zero C{chunk} bytes from C{start} in page C{index}."""
        if deallocate:
            if self._whole_page(index, start, chunk):
                self._pages.pop(index, None)
                self._zeroPages.discard(index)
                return
            page = self._pages.get(index)
            if page is None:
                return
            page[start : start + chunk] = self._zeroes[:chunk]
            # Comparing 64 KiB is cheap, and it keeps block_status honest
            # about ranges zeroed in several unaligned requests.
            if page == self._zeroes:
                del self._pages[index]
                self._zeroPages.discard(index)
        else:
            page = self._page(index)
            page[start : start + chunk] = self._zeroes[:chunk]
            if self._whole_page(index, start, chunk) or page == self._zeroes:
                self._zeroPages.add(index)

    def flush(self) -> Deferred[None]:
        """
        Nothing to do.

        @return: an already-fired Deferred with C{None}.
        """
        return succeed(None)

    def trim(self, offset: int, length: int, fua: bool = False) -> Deferred[None]:
        """
        Drop the pages the range covers entirely and zero the parts of the
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
        Make a range read as zeroes: like L{trim} when C{may_trim}, otherwise
        by writing zeroes into allocated pages. Always fast, so C{fast} never
        fails.

        @return: an already-fired Deferred with C{None}.
        """
        return _call(lambda: self._zero(offset, length, deallocate=may_trim))

    def cache(self, offset: int, length: int) -> Deferred[None]:
        """
        Nothing to do: everything is already in memory.

        @return: an already-fired Deferred with C{None}.
        """
        return succeed(None)

    def block_status(self, offset: int, length: int) -> Deferred[Sequence[Extent]]:
        """
        Describe allocation from C{offset}: absent pages are
        C{STATE_HOLE | STATE_ZERO}, present ones C{0}, or C{STATE_ZERO}
        when known to hold only zeroes. Extents never run past
        C{offset + length} or the device's size, and stop after
        L{MAX_EXTENTS}.

        @return: an already-fired Deferred with a non-empty list of
            L{Extent}s.
        """
        return _call(lambda: self._block_status(offset, length))

    def _block_status(self, offset: int, length: int) -> Sequence[Extent]:
        end = min(offset + max(length, 1), self.size)
        if end <= offset:
            raise ValueError(f"block status at {offset} is outside a device of {self.size} bytes")
        page_size = self.page_size
        first, last = offset // page_size, (end - 1) // page_size
        # Walk whichever is shorter: the pages of the range, or the pages
        # that exist. A status request over a huge empty device must not
        # iterate over billions of page numbers.
        if last - first + 1 <= len(self._pages):
            present = [index for index in range(first, last + 1) if index in self._pages]
        else:
            present = sorted(index for index in self._pages if first <= index <= last)

        runs: list[list[int]] = []  # [length, flags], merged as they come

        def add(run_length: int, flags: int) -> None:
            if runs and runs[-1][1] == flags:
                runs[-1][0] += run_length
            else:
                runs.append([run_length, flags])

        position = offset
        for index in present:
            page_start = index * page_size
            if page_start > position:
                add(page_start - position, _HOLE)
                position = page_start
                if len(runs) >= MAX_EXTENTS:
                    break
            stop = min(page_start + page_size, end)
            add(stop - position, STATE_ZERO if index in self._zeroPages else 0)
            position = stop
            if len(runs) >= MAX_EXTENTS:
                break
        if position < end and len(runs) < MAX_EXTENTS:
            add(end - position, _HOLE)
        return [Extent(run_length, flags) for run_length, flags in runs]

    def close(self) -> Deferred[None]:
        """
        Drop every page. Calling it again does nothing.

        @return: an already-fired Deferred with C{None}.
        """
        self._pages.clear()
        self._zeroPages.clear()
        return succeed(None)
