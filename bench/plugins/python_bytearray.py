"""
nbdkit Python plugin serving a RAM disk held in one bytearray: the
"nbdkit-python-bytearray" peer of bench/run.py.

    nbdkit python script=bench/plugins/python_bytearray.py size=1G

Every connection sees the same disk; it lives as long as nbdkit.
"""

import nbdkit

API_VERSION = 2

disk = bytearray()
view = memoryview(disk)


def thread_model() -> int:
    """Let requests run in parallel (the GIL serialises the copies anyway)."""
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    """Take size=SIZE and allocate the disk (zeroed, so the kernel maps it lazily)."""
    global disk, view
    if key != "size":
        raise RuntimeError(f"unknown parameter {key!r} (expected size=SIZE)")
    disk = bytearray(nbdkit.parse_size(value))
    view = memoryview(disk)


def open(readonly: bool) -> int:
    """No per-connection state."""
    return 1


def get_size(h: int) -> int:
    """The disk's size."""
    return len(disk)


def can_multi_conn(h: int) -> bool:
    """One disk in one process: every connection sees every write at once."""
    return True


def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    """Copy len(buf) bytes at offset into buf (one copy, through a memoryview)."""
    buf[:] = view[offset : offset + len(buf)]


def pwrite(h: int, buf: memoryview, offset: int, flags: int) -> None:
    """Copy buf into the disk at offset."""
    view[offset : offset + len(buf)] = buf
