# -*- test-case-name: tests.test_batch -*-
"""
Blocking calls run in a thread pool, in batches.

C{deferToThreadPool} costs one pool hand-off and one reactor wake-up for
every call: tens of microseconds of CPU, which for a 4 KiB write is far more
than the write itself. L{BatchingRunner} keeps a queue instead. Each pool job
takes every call queued when it gets to run (up to L{BATCH_MAX}), runs them
one after the other, and hands all their results back to the reactor at
once. Under load, many calls share one hand-off; with one call at a time it
behaves like C{deferToThreadPool}.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["BATCH_MAX", "BatchingRunner", "threads"]

_T = TypeVar("_T")

#: The most calls one pool job runs before handing results back, so that
#: early results in a long queue are not held up for long.
BATCH_MAX = 32

_Result = tuple["Deferred[Any]", bool, Any]


def threads(
    reactor: IReactorFromThreads | None, threadpool: ThreadPool | None
) -> tuple[IReactorFromThreads, ThreadPool]:
    """
    The reactor and pool to use: the ones given, or the global reactor and
    its own pool. Call it when the pool is first needed, not at import or
    construction time: library code must not pick the global reactor
    before the application has installed the one it wants.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IReactorFromThreads, global_reactor)
    if threadpool is None:
        threadpool = IReactorThreads(reactor).getThreadPool()
    return reactor, threadpool


class BatchingRunner:
    """
    Runs blocking callables in C{pool}, several to a pool job, delivering
    their results to Deferreds in the reactor thread.

    @param jobs: how many pool jobs may run at once (at most the pool's
        threads, to keep them all busy under load).
    """

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool, jobs: int) -> None:
        self._reactor = reactor
        self._pool = pool
        self._max_jobs = max(1, jobs)
        # Appended in the reactor thread, taken in pool threads: deque's
        # append and popleft are atomic.
        self._queue: deque[tuple[Callable[[], Any], Deferred[Any]]] = deque()
        # Jobs submitted and not yet delivered; only the reactor thread
        # touches this.
        self._jobs = 0

    def run(self, f: Callable[[], _T]) -> Deferred[_T]:
        """
        Run C{f} in the pool.

        @return: a Deferred that fires, in the reactor thread, with what
            C{f} returned, or fails with what it raised.
        """
        d: Deferred[_T] = Deferred()
        self._queue.append((f, d))
        if self._jobs < self._max_jobs:
            self._submit()
        return d

    def _submit(self) -> None:
        self._jobs += 1
        self._pool.callInThreadWithCallback(self._delivered, self._work)

    def _work(self) -> list[_Result]:
        """In a pool thread: run what is queued, up to L{BATCH_MAX} calls."""
        results: list[_Result] = []
        while len(results) < BATCH_MAX:
            try:
                f, d = self._queue.popleft()
            except IndexError:
                break
            try:
                results.append((d, True, f()))
            except BaseException:
                results.append((d, False, Failure()))  # type: ignore[no-untyped-call]
        return results

    def _delivered(self, success: bool, results: Any) -> None:
        """In a pool thread: pass a job's results to the reactor thread."""
        self._reactor.callFromThread(self._deliver, success, results)

    def _deliver(self, success: bool, results: Any) -> None:
        """In the reactor thread: fire the Deferreds of one job's calls."""
        self._jobs -= 1
        # Calls queued after the last job stopped looking would otherwise
        # wait for the next call to submit a job.
        if self._queue and self._jobs < self._max_jobs:
            self._submit()
        if not success:
            # _work catches everything a call raises; this is a bug in it.
            failure: Failure = results
            failure.raiseException()
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
