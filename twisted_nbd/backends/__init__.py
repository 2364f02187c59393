"""
Storage backends: where the bytes of an export live.

Backends are chosen by name: an export specification
(L{twisted_nbd.config.ExportSpec}) names its backend, and
L{twisted_nbd.service} opens it with L{open_backend}. The built-in C{file}
and C{memory} backends are described here (L{file_plugin},
L{memory_plugin}) and found, like every other backend, through
L{twisted_nbd.registry}. L{BACKENDS} maps their names to the functions that
open an export specification's C{image} or C{memory}, the shorthand fields
that C{--image}, C{--memory} and C{--backend file:...}/C{memory:...} fill
in (the worker processes share exactly those).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from twisted_nbd.backends.file import FileBlockDevice, create_image
from twisted_nbd.backends.memory import MemoryBlockDevice
from twisted_nbd.backends.ram import MAPPED_MAX, MappedMemoryDevice
from twisted_nbd.interfaces import IBlockDevice
from twisted_nbd.registry import PATH, SIZE, BackendPlugin, Key

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
    "file_plugin",
    "memory_plugin",
    "open_backend",
]


class OpenContext:
    """
    What opening a backend may need from the server being built: the
    reactor, and a thread pool for blocking calls, made only if some
    backend asks for it.

    @ivar reactor: the reactor the server runs on.
    @ivar pool: the thread pool, once a backend has asked for one.
    @ivar read_only: the export being opened is served read-only (a
        backend may then open its storage read-only).
    """

    def __init__(self, reactor: Any, max_threads: int = 8, read_only: bool = False) -> None:
        self.reactor = reactor
        self.max_threads = max_threads
        self.pool: ThreadPool | None = None
        self.read_only = read_only

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
    Open the backend C{spec} names (without its filters).

    @raise KeyError: no backend has that name.
    @raise twisted_nbd.registry.PluginError: its keys are wrong.
    @raise OSError: it could not be opened.
    """
    if spec.backend_ref is not None:
        from twisted_nbd.registry import registry

        return registry.open_backend(spec.backend_ref, context)
    return BACKENDS[spec.backend](spec, context)


def _open_file_plugin(values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    from twisted_nbd.config import ExportSpec

    spec = ExportSpec(image=values["path"], size=values["size"], read_only=context.read_only)
    return _open_file(spec, context)


def _open_memory_plugin(values: Mapping[str, Any], context: OpenContext) -> IBlockDevice:
    from twisted_nbd.config import ExportSpec

    return _open_memory(ExportSpec(memory=values["size"]), context)


#: C{--backend file:path=PATH[,size=SIZE]}, which C{--image} is short for.
file_plugin = BackendPlugin(
    name="file",
    help="an image file or block device (what --image PATH serves)",
    keys=(
        Key("path", PATH, help="the file or block device"),
        Key("size", SIZE, None, "create PATH as a sparse file of SIZE bytes if it does not exist"),
    ),
    open=_open_file_plugin,
)

#: C{--backend memory:size=SIZE}, which C{--memory} is short for.
memory_plugin = BackendPlugin(
    name="memory",
    help="a sparse RAM disk (what --memory SIZE serves)",
    keys=(Key("size", SIZE, help="the disk's size"),),
    open=_open_memory_plugin,
)
