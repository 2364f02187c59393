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


class TuneAllocatorTests(unittest.TestCase):
    """glibc keeps one malloc arena in a server process (see L{tune_allocator})."""

    def _probe(self, env: dict[str, str]) -> str:
        # A child process, so that the test's own allocator is left alone.
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def test_applied_on_glibc(self) -> None:
        """mallopt accepts the setting where the C library is glibc."""
        if platform.libc_ver()[0] != "glibc":
            raise unittest.SkipTest("mallopt's arena setting is glibc's")
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        self.assertEqual(self._probe(env), "True")

    def test_environment_wins(self) -> None:
        """An administrator's MALLOC_ARENA_MAX is left in force."""
        env = dict(os.environ, MALLOC_ARENA_MAX="4")
        self.assertEqual(self._probe(env), "False")

    def test_returns_bool(self) -> None:
        """Calling it in this process is harmless and says what it did."""
        self.assertIsInstance(tune_allocator(), bool)
