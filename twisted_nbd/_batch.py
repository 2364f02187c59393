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

import threading
from queue import Empty, Queue
from typing import Any, Callable, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["BATCH_MAX", "LINGER", "BatchingRunner", "linger_for", "threads"]

_T = TypeVar("_T")

#: The most calls one pool job runs before handing results back, so that
#: early results in a long queue are not held up for long.
BATCH_MAX = 32
#: How long a job waits for more calls once the queue is empty (seconds):
#: handing a call to a waiting job is much cheaper than starting a new one
#: (a thread pool hand-off and its locks), and I/O calls come in bursts.
LINGER = 0.005

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


def linger_for(pool: object) -> float:
    """
    How long jobs in C{pool} wait for more calls: L{LINGER} in a real
    thread pool; 0 in anything else (the fakes of tests run jobs inline).
    """
    return LINGER if isinstance(pool, ThreadPool) else 0.0


class BatchingRunner:
    """
    Runs blocking callables in C{pool}, several to a pool job, delivering
    their results to Deferreds in the reactor thread.

    @param jobs: how many pool jobs may run at once (at most the pool's
        threads, to keep them all busy under load).
    """

    def __init__(
        self, reactor: IReactorFromThreads, pool: ThreadPool, jobs: int, linger: float = LINGER
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._max_jobs = max(1, jobs)
        self._linger = linger
        # Put in the reactor thread, taken in pool threads. A Queue (its
        # timed wait is threading's Condition) rather than a SimpleQueue: a
        # pool thread was once seen never to return from
        # SimpleQueue.get(timeout=...) after SIGTERM, cause not found.
        self._queue: Queue[tuple[Callable[[], Any], Deferred[Any]]] = Queue()
        # Jobs submitted and not yet done; only the reactor thread touches this.
        self._jobs = 0
        # Jobs waiting for more calls (see _work); changed in pool threads.
        self._idle = 0
        self._idle_lock = threading.Lock()

    def run(self, f: Callable[[], _T]) -> Deferred[_T]:
        """
        Run C{f} in the pool.

        @return: a Deferred that fires, in the reactor thread, with what
            C{f} returned, or fails with what it raised.
        """
        d: Deferred[_T] = Deferred()
        self._queue.put((f, d))
        # A job waiting for calls takes it; else start one, if allowed.
        if not self._idle and self._jobs < self._max_jobs:
            self._submit()
        return d

    def _submit(self) -> None:
        self._jobs += 1
        self._pool.callInThreadWithCallback(self._delivered, self._work)

    def _work(self) -> list[_Result]:
        """
        In a pool thread: run what is queued, handing results to the reactor
        every L{BATCH_MAX} calls, and once the queue is empty wait up to
        C{linger} seconds for more before ending: a call that comes soon
        then costs no new pool job. What is left is returned.
        """
        results: list[_Result] = []
        queue = self._queue
        while True:
            try:
                f, d = queue.get_nowait()
            except Empty:
                if not self._linger:
                    return results
                # Counted idle before the results go: a caller woken by
                # them must see this job waiting, not start another.
                with self._idle_lock:
                    self._idle += 1
                if results:
                    self._reactor.callFromThread(self._fire, results)
                    results = []
                try:
                    f, d = queue.get(timeout=self._linger)
                except Empty:
                    return results
                finally:
                    with self._idle_lock:
                        self._idle -= 1
            try:
                results.append((d, True, f()))
            except BaseException:
                results.append((d, False, Failure()))  # type: ignore[no-untyped-call]
            if len(results) >= BATCH_MAX:
                self._reactor.callFromThread(self._fire, results)
                results = []

    def _delivered(self, success: bool, results: Any) -> None:
        """In a pool thread: pass a job's results to the reactor thread."""
        self._reactor.callFromThread(self._deliver, success, results)

    def _deliver(self, success: bool, results: Any) -> None:
        """In the reactor thread: a job ended; fire the Deferreds of its last calls."""
        self._jobs -= 1
        # Calls queued after the last job stopped looking would otherwise
        # wait for the next call to submit a job.
        if not self._queue.empty() and self._jobs < self._max_jobs:
            self._submit()
        if not success:
            # _work catches everything a call raises; this is a bug in it.
            failure: Failure = results
            failure.raiseException()
        self._fire(results)

    @staticmethod
    def _fire(results: list[_Result]) -> None:
        """In the reactor thread: fire the Deferreds of some calls."""
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
