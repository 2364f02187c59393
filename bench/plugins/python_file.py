"""
nbdkit Python plugin serving an image file with os.pread/os.pwrite: the
"nbdkit-python" peer of bench/run.py.

    nbdkit python script=bench/plugins/python_file.py file=IMAGE

Thread model "parallel": nbdkit calls it from several threads at once, and
the system calls run while the GIL is released.
"""

import os

import nbdkit

API_VERSION = 2

path = ""


def thread_model() -> int:
    """Let requests run in parallel (the GIL still serialises the Python code)."""
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    """Take file=PATH."""
    global path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (expected file=PATH)")
    path = os.path.abspath(value)


def config_complete() -> None:
    """Insist on file=PATH."""
    if not path:
        raise RuntimeError("file=PATH is required")


def open(readonly: bool) -> int:
    """One file descriptor per connection."""
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def close(h: int) -> None:
    """Close the connection's file descriptor."""
    os.close(h)


def get_size(h: int) -> int:
    """The image's size."""
    return os.fstat(h).st_size


def can_multi_conn(h: int) -> bool:
    """One file, one page cache: a flush on any connection covers all of them."""
    return True


def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    """Read len(buf) bytes at offset into buf."""
    data = os.pread(h, len(buf), offset)
    if len(data) != len(buf):
        raise OSError(f"short read at {offset}")
    buf[:] = data


def pwrite(h: int, buf: memoryview, offset: int, flags: int) -> None:
    """Write buf at offset."""
    if os.pwrite(h, buf, offset) != len(buf):
        raise OSError(f"short write at {offset}")


def flush(h: int, flags: int) -> None:
    """Flush the file to its storage."""
    os.fdatasync(h)
