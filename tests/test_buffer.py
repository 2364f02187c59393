# -*- test-case-name: tests.test_buffer -*-
"""
Tests for L{twisted_nbd._buffer}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_nbd._buffer import ReceiveBuffer


class ReceiveBufferTests(SynchronousTestCase):
    """The buffer behaves like slicing one long byte string."""

    @given(
        st.lists(st.binary(max_size=50), max_size=20),
        st.lists(st.tuples(st.booleans(), st.integers(0, 60)), max_size=30),
    )
    def test_matches_slicing(self, chunks: list[bytes], ops: list[tuple[bool, int]]) -> None:
        """Any mix of take and skip over any chunking gives the same bytes as slicing."""
        buf = ReceiveBuffer()
        for chunk in chunks:
            buf.append(chunk)
        model = b"".join(chunks)
        for is_take, count in ops:
            self.assertEqual(len(buf), len(model))
            if is_take:
                if count > len(model):
                    self.assertRaises(ValueError, buf.take, count)
                    continue
                self.assertEqual(buf.take(count), model[:count])
                model = model[count:]
            else:
                skipped = buf.skip(count)
                self.assertEqual(skipped, min(count, len(model)))
                model = model[skipped:]
        self.assertEqual(buf.take(len(buf)), model)

    def test_whole_chunk_not_copied(self) -> None:
        """Taking exactly one whole chunk returns that very object."""
        buf = ReceiveBuffer()
        data = b"x" * 100
        buf.append(b"head")
        buf.append(data)
        self.assertEqual(buf.take(4), b"head")
        self.assertIs(buf.take(100), data)
