# -*- test-case-name: tests.test_batch -*-
"""
Tests for L{twisted_nbd._batch.BatchingRunner}.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_nbd._batch import BATCH_MAX, LINGER, BatchingRunner, linger_for


class FakePool:
    """Keeps each submitted job until the test runs it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[bool, Any], None], Callable[[], Any]]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[[], Any]
    ) -> None:
        self.jobs.append((on_result, f))

    def run_one(self) -> None:
        on_result, f = self.jobs.pop(0)
        on_result(True, f())


class FakeReactor:
    """Counts the wake-ups from pool threads and runs them at once."""

    def __init__(self) -> None:
        self.wakeups = 0

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.wakeups += 1
        f(*args)


def constant(i: int) -> Callable[[], int]:
    """A call that returns C{i}."""
    return lambda: i


class BatchingRunnerTests(SynchronousTestCase):
    """Calls share pool jobs and reactor wake-ups, and none is left behind."""

    def setUp(self) -> None:
        self.pool = FakePool()
        self.reactor = FakeReactor()

    def runner(self, jobs: int) -> BatchingRunner:
        return BatchingRunner(
            cast(IReactorFromThreads, self.reactor), cast(ThreadPool, self.pool), jobs, linger=0
        )

    def test_one_call(self) -> None:
        """A lone call is one job and one wake-up, like deferToThreadPool."""
        d = self.runner(4).run(lambda: 42)
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.run_one()
        self.assertEqual(self.successResultOf(d), 42)
        self.assertEqual(self.reactor.wakeups, 1)

    def test_queued_calls_share_a_job(self) -> None:
        """Calls queued while the jobs are busy run in one job, with one wake-up."""
        runner = self.runner(1)
        ds = [runner.run(constant(i)) for i in range(10)]
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.run_one()
        self.assertEqual([self.successResultOf(d) for d in ds], list(range(10)))
        self.assertEqual(self.reactor.wakeups, 1)
        self.assertEqual(self.pool.jobs, [])

    def test_batch_cap(self) -> None:
        """
        A job hands its results back every BATCH_MAX calls, so early ones
        are not held up, and runs on until the queue is empty.
        """
        runner = self.runner(1)
        ds = [runner.run(constant(i)) for i in range(BATCH_MAX + 3)]
        self.pool.run_one()
        self.assertEqual([self.successResultOf(d) for d in ds], list(range(BATCH_MAX + 3)))
        self.assertEqual(self.reactor.wakeups, 2)
        self.assertEqual(self.pool.jobs, [])

    def test_failures(self) -> None:
        """A call that raises fails its own Deferred only."""
        runner = self.runner(1)

        def bad() -> None:
            raise ZeroDivisionError()

        first, second = runner.run(bad), runner.run(lambda: "fine")
        self.pool.run_one()
        self.failureResultOf(first, ZeroDivisionError)
        self.assertEqual(self.successResultOf(second), "fine")

    def test_job_limit(self) -> None:
        """No more jobs are submitted than allowed."""
        runner = self.runner(2)
        for _ in range(5):
            runner.run(lambda: None)
        self.assertEqual(len(self.pool.jobs), 2)

    def test_call_queued_after_drain(self) -> None:
        """A call queued after every running job stopped taking calls, but before
        they delivered, is not stranded: delivery submits a job for it."""
        runner = self.runner(1)
        first = runner.run(lambda: 1)
        on_result, work = self.pool.jobs.pop(0)
        results = work()  # the job has drained the queue...
        late = runner.run(lambda: 2)  # ...when this call arrives, at the job limit
        self.assertEqual(self.pool.jobs, [])
        on_result(True, results)
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.run_one()
        self.assertEqual(self.successResultOf(late), 2)


class LingerTests(TestCase):
    """In a real thread pool, a job waits a little for more calls."""

    async def test_calls_share_a_lingering_job(self) -> None:
        """
        Calls that come one after the other, each after the previous one's
        result, are all run by one pool job waiting for them.
        """
        from twisted.internet import reactor

        pool = ThreadPool(minthreads=1, maxthreads=4, name="linger-test")
        pool.start()
        self.addCleanup(pool.stop)
        submitted: list[int] = []
        real = pool.callInThreadWithCallback

        def counting(on_result: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            submitted.append(1)
            real(on_result, f, *args, **kwargs)

        self.patch(pool, "callInThreadWithCallback", counting)
        runner = BatchingRunner(cast(IReactorFromThreads, reactor), pool, 4, linger=1.0)
        for i in range(20):
            self.assertEqual(await runner.run(constant(i)), i)
        self.assertEqual(len(submitted), 1)

    def test_linger_only_in_real_pools(self) -> None:
        """Fakes that run jobs inline must not wait."""
        self.assertEqual(linger_for(ThreadPool()), LINGER)
        self.assertEqual(linger_for(FakePool()), 0.0)
