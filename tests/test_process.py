"""Process-wide settings applied by the programs that own a server process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from twisted.trial import unittest

from twisted_nbd._process import tune_allocator

_PROBE = """
import os, sys
from twisted_nbd._process import tune_allocator
print(tune_allocator())
"""

_VARIABLES = frozenset(
    {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"}
)

# Where a 2 MiB buffer comes from, and whether freeing it shrinks the heap
# (glibc's mallinfo2: hblkhd is what is mmapped, arena what brk gave).
_HEAP = """
import ctypes, sys
from twisted_nbd._process import tune_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    ).split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "tune":
    tune_allocator()
before = libc.mallinfo2()
buffer = bytearray(2 << 20)
during = libc.mallinfo2()
del buffer
after = libc.mallinfo2()
print(during.hblkhd > before.hblkhd, after.arena >= during.arena)
"""


class TuneAllocatorTests(unittest.TestCase):
    """glibc keeps one malloc arena in a server process (see L{tune_allocator})."""

    def _probe(self, env: dict[str, str]) -> str:
        # A child process, so that the test's own allocator is left alone.
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def _clean(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _VARIABLES}

    def _glibc(self) -> None:
        if platform.libc_ver()[0] != "glibc":
            raise unittest.SkipTest("mallopt's settings are glibc's")

    def test_applied_on_glibc(self) -> None:
        """mallopt accepts the settings where the C library is glibc."""
        self._glibc()
        self.assertEqual(self._probe(self._clean()), "True")

    def test_environment_wins(self) -> None:
        """An administrator's MALLOC_* variable or glibc tunable is left in force."""
        for name, value in [
            ("MALLOC_ARENA_MAX", "4"),
            ("MALLOC_MMAP_THRESHOLD_", "65536"),
            ("MALLOC_TRIM_THRESHOLD_", "65536"),
            ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=65536"),
        ]:
            with self.subTest(name=name):
                self.assertEqual(self._probe(dict(self._clean(), **{name: value})), "False")

    def _heap(self, env: dict[str, str], tune: bool) -> tuple[bool, bool]:
        done = subprocess.run(
            [sys.executable, "-c", _HEAP, "tune" if tune else "leave"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        mapped, kept = done.stdout.split()
        return mapped == "True", kept == "True"

    def test_buffers_from_the_heap_and_kept(self) -> None:
        """
        A 2 MiB buffer comes from the heap, not a fresh mmap, and freeing it
        leaves the heap as large as it was for the next one; untuned, glibc
        mmaps it (and would zero fresh pages for every such buffer).
        """
        self._glibc()
        self.assertEqual(self._heap(self._clean(), tune=True), (False, True))
        self.assertEqual(self._heap(self._clean(), tune=False)[0], True)

    def test_administrators_threshold_kept(self) -> None:
        """With MALLOC_MMAP_THRESHOLD_ set, the 2 MiB buffer is mmapped as it says."""
        self._glibc()
        env = dict(self._clean(), MALLOC_MMAP_THRESHOLD_="65536")
        self.assertEqual(self._heap(env, tune=True)[0], True)

    def test_returns_bool(self) -> None:
        """Calling it in this process is harmless and says what it did."""
        self.assertIsInstance(tune_allocator(), bool)
