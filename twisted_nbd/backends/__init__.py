"""
Storage backends: where the bytes of an export live.

Backends are chosen by name from L{BACKENDS}: an export specification
(L{twisted_nbd.config.ExportSpec}) names its backend, and
L{twisted_nbd.service} opens it with L{open_backend}. A new backend is one
more entry, not an edit of the service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.backends.ram import MAPPED_MAX, MappedMemoryDevice
from twisted_nbd.interfaces import IBlockDevice

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from twisted_nbd.config import ExportSpec

__all__ = [
    "BACKENDS",
    "BackendOpener",
    "FileBlockDevice",
    "MappedMemoryDevice",
    "MemoryBlockDevice",
    "OpenContext",
    "create_image",
    "open_backend",
]


class OpenContext:
    """
    What opening a backend may need from the server being built: the
    reactor, and a thread pool for blocking calls, made only if some
    backend asks for it.

    @ivar reactor: the reactor the server runs on.
    @ivar pool: the thread pool, once a backend has asked for one.
    """

    def __init__(self, reactor: Any, max_threads: int) -> None:
        self.reactor = reactor
        self.max_threads = max_threads
        self.pool: ThreadPool | None = None

    def threadpool(self) -> ThreadPool:
        """The shared I/O thread pool (not started: its service starts it)."""
        if self.pool is None:
            from twisted.python.threadpool import ThreadPool

            self.pool = ThreadPool(minthreads=1, maxthreads=self.max_threads, name="nbd-io")
        return self.pool


#: Opens the device an export specification describes (it was checked
#: already); may block briefly, since it runs while the server is built.
BackendOpener = Callable[["ExportSpec", OpenContext], IBlockDevice]


def _open_file(spec: ExportSpec, context: OpenContext) -> IBlockDevice:
    assert spec.image is not None
    if spec.size is not None:
        create_image(spec.image, spec.size)
    return FileBlockDevice(
        spec.image,
        read_only=spec.read_only,
        reactor=context.reactor,
        threadpool=context.threadpool(),
    )


def _open_memory(spec: ExportSpec, context: OpenContext) -> IBlockDevice:
    assert spec.memory is not None
    if spec.memory <= MAPPED_MAX:
        # Shared memory, readable without copying, and shareable with workers.
        return MappedMemoryDevice(spec.memory)
    # A huge test disk: sparse in a dict, cheap whatever its size.
    return MemoryBlockDevice(spec.memory)


#: The backends by name.
BACKENDS: dict[str, BackendOpener] = {
    "file": _open_file,
    "memory": _open_memory,
}


def open_backend(spec: ExportSpec, context: OpenContext) -> IBlockDevice:
    """
    Open the backend C{spec} names.

    @raise KeyError: no backend has that name.
    @raise OSError: it could not be opened.
    """
    return BACKENDS[spec.backend](spec, context)
