"""
pytest configuration.

pytest-twisted runs the reactor in a greenlet for the rest of the session as
soon as one of its tests (tests/test_pytest_style.py) starts it; trial's
asynchronous TestCase methods, which run the reactor themselves, cannot run
after that. So the pytest-twisted tests run last. Under trial they do not
run at all (trial collects TestCase classes only).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests that start pytest-twisted's reactor greenlet to the end."""
    uses_greenlet = [item for item in items if item.module.__name__.endswith("test_pytest_style")]  # type: ignore[attr-defined]
    others = [item for item in items if item not in uses_greenlet]
    items[:] = others + uses_greenlet
