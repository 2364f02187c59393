"""
Simulated power loss for the durability trials (tests/interop/durability.py).

C{kill -9} alone proves little about durability: the kernel keeps the page
cache, so a write the server never synced survives the kill as well as one
it did. With this directory on C{PYTHONPATH} and C{NBD_CRASHSIM_IMAGE} and
C{NBD_CRASHSIM_JOURNAL} set, every process of the server (its workers
too) keeps an undo journal of the image: before each C{os.pwrite} or
C{os.pwritev} to the image it appends the bytes about to be overwritten,
after it a "done" mark, and around each C{os.fdatasync} or C{os.fsync} of
the image a "sync start" and "sync end" mark. L{replay} then undoes, newest
first, every write that no completed sync covered, which leaves the image as
a power cut at the moment of the kill would have: only what was synced.

A write covered by a sync is one whose "done" mark precedes that sync's
"start" (fdatasync covers writes finished before it began); one still
running when the sync began is not covered by it. The journal is one file
opened with C{O_APPEND}, each record one C{write}, so the workers' records
interleave whole.

C{NBD_CRASHSIM_DROP_SYNC=1} turns the syncs of the image into no-ops, to
prove that the trials catch a server that acknowledges FLUSH or FUA
without syncing.

Nothing here is imported by the server itself; Python imports it at start
(C{sitecustomize}) only when the tests put this directory on the path.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
from typing import Any, Callable

#: A record: kind (U undo, D done, S sync start, E sync end), id, offset, length.
RECORD = struct.Struct(">cQQQ")

_IMAGE = os.environ.get("NBD_CRASHSIM_IMAGE")
_JOURNAL = os.environ.get("NBD_CRASHSIM_JOURNAL")


def replay(image: str, journal: str) -> tuple[int, int]:
    """
    Undo in C{image} every write in C{journal} that no completed sync
    covers; how many writes were undone and how many were kept.
    """
    with open(journal, "rb") as f:
        data = f.read()
    undo: list[tuple[int, int, bytes]] = []
    done: list[int] = []
    started: dict[int, int] = {}
    durable: set[int] = set()
    position = 0
    while position + RECORD.size <= len(data):
        kind, ident, offset, length = RECORD.unpack_from(data, position)
        position += RECORD.size
        if kind == b"U":
            if position + length > len(data):
                break  # torn by the kill before its write could happen
            undo.append((ident, offset, data[position : position + length]))
            position += length
        elif kind == b"D":
            done.append(ident)
        elif kind == b"S":
            started[ident] = len(done)
        elif kind == b"E" and ident in started:
            durable.update(done[: started[ident]])
    undone = 0
    with open(image, "r+b") as f:
        for ident, offset, old in reversed(undo):
            if ident not in durable:
                f.seek(offset)
                f.write(old)
                undone += 1
    return undone, len(undo) - undone


def _install(image: str, journal_path: str) -> None:
    real_pwrite = os.pwrite
    real_pwritev: Callable[..., int] | None = getattr(os, "pwritev", None)
    real_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
    real_fsync = os.fsync
    drop_sync = os.environ.get("NBD_CRASHSIM_DROP_SYNC") == "1"
    target = os.stat(image)
    journal = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    counter = itertools.count(1)
    lock = threading.Lock()
    pid = os.getpid()
    is_image: dict[int, bool] = {}

    def watched(fd: int) -> bool:
        # fds are reused, so ask each time unless it is known to be the image.
        if is_image.get(fd):
            return True
        try:
            info = os.fstat(fd)
        except OSError:
            return False
        hit = (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino)
        if hit:
            is_image[fd] = True
        return hit

    def new_id() -> int:
        with lock:
            return (pid << 32) | next(counter)

    def record(kind: bytes, ident: int, offset: int = 0, payload: bytes = b"") -> None:
        os.write(journal, RECORD.pack(kind, ident, offset, len(payload)) + payload)

    def around_write(fd: int, length: int, offset: int, call: Callable[[], int]) -> int:
        if not watched(fd):
            return call()
        ident = new_id()
        record(b"U", ident, offset, os.pread(fd, length, offset))
        try:
            return call()
        finally:
            record(b"D", ident)

    def pwrite(fd: int, data: Any, offset: int) -> int:
        return around_write(
            fd, len(memoryview(data)), offset, lambda: real_pwrite(fd, data, offset)
        )

    def pwritev(fd: int, buffers: Any, offset: int, *flags: int) -> int:
        assert real_pwritev is not None
        buffers = list(buffers)
        length = sum(memoryview(b).nbytes for b in buffers)
        return around_write(fd, length, offset, lambda: real_pwritev(fd, buffers, offset, *flags))

    def syncing(real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            if not watched(fd):
                return real(fd)
            if drop_sync:
                return None
            ident = new_id()
            record(b"S", ident)
            real(fd)
            record(b"E", ident)
            return None

        return sync

    os.pwrite = pwrite
    if real_pwritev is not None:
        os.pwritev = pwritev
    os.fdatasync = syncing(real_fdatasync)  # type: ignore[assignment]
    os.fsync = syncing(real_fsync)  # type: ignore[assignment]


if _IMAGE and _JOURNAL:
    _install(_IMAGE, _JOURNAL)
