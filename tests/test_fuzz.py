# -*- test-case-name: tests.test_fuzz -*-
"""
The bounded fuzzing run of the suite (issue 10, point 2): the targets of
L{tests.fuzz_targets} (the sans-I/O server and client, every phase, and the Twisted server
protocol over a memory device) on
Hypothesis inputs: arbitrary bytes, and well-formed sessions with bytes
flipped, cut and spliced in. The long, coverage-guided run is
C{nice -n 19 python3 bench/fuzz.py --seconds 600} (atheris). Scale this one
with C{NBD_HYPOTHESIS_EXAMPLES} (examples per test; default 150).

Every input in C{tests/fuzz_corpus/} is replayed: inputs that once broke
a contract, one file each, and C{coverage.gz}, the minimised corpus of the
long runs (see L{tests.fuzz_targets.pack_corpus}).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz_targets import (
    CLIENT_SETUPS,
    SERVER_SETUPS,
    corpus_inputs,
    fuzz_any,
    fuzz_client,
    fuzz_protocol,
    fuzz_server,
    seed_inputs,
)

EXAMPLES = int(os.environ.get("NBD_HYPOTHESIS_EXAMPLES", "150"))
SEEDS = seed_inputs()


def _settings(scale: float = 1.0) -> settings:
    return settings(
        max_examples=max(1, int(EXAMPLES * scale)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    """A well-formed session with a few bytes flipped, cut or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(3, max(3, len(data))))
        if how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
    data[2] = draw(st.sampled_from([0, 0x80, 0, 1, 6, 63, 0x85]))
    return bytes(data)


class FuzzTargetTests(SynchronousTestCase):
    """Whatever the peer sends, in any phase, only replies or a violation come out."""

    def test_seeds(self) -> None:
        """The well-formed sessions themselves run cleanly (and cover every setup)."""
        servers = {seed[1] for seed in SEEDS if seed[0] == 0}
        clients = {seed[1] for seed in SEEDS if seed[0] == 1}
        self.assertGreater(len(servers), 4)
        self.assertGreater(len(clients), 2)
        for seed in SEEDS:
            fuzz_any(seed)

    def test_corpus(self) -> None:
        """
        Inputs that once broke a contract do not any more, and the corpus
        of the long coverage-guided runs (C{coverage.gz}) runs cleanly.
        """
        inputs = corpus_inputs()
        self.assertGreater(len(inputs), 100, "the corpus is missing")
        for data in inputs:
            fuzz_any(data)

    @_settings()
    @given(st.integers(0, len(SERVER_SETUPS) - 1), st.integers(0, 255), st.binary(max_size=600))
    def test_server_random_bytes(self, setup: int, cut: int, data: bytes) -> None:
        """Arbitrary bytes to the server, from every starting phase."""
        fuzz_server(bytes([setup, cut]) + data)

    @_settings()
    @given(st.integers(0, len(CLIENT_SETUPS) - 1), st.integers(0, 255), st.binary(max_size=600))
    def test_client_random_bytes(self, setup: int, cut: int, data: bytes) -> None:
        """Arbitrary bytes to the client, from every starting phase."""
        fuzz_client(bytes([setup, cut]) + data)

    @_settings(0.5)
    @given(st.integers(0, 7), st.integers(0, 255), st.binary(max_size=600))
    def test_protocol_random_bytes(self, setup: int, cut: int, data: bytes) -> None:
        """Arbitrary bytes to the Twisted server protocol, over a memory device."""
        fuzz_protocol(bytes([setup, cut]) + data)

    @_settings()
    @given(mutated_seeds())
    def test_mutated_sessions(self, data: bytes) -> None:
        """Well-formed sessions, both ways, with bytes flipped, cut and spliced in."""
        fuzz_any(data)
