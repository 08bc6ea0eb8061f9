"""Running test jobs in threads released together: the one helper every concurrency test uses."""

from __future__ import annotations

import threading
from collections.abc import Callable


def in_threads(jobs: list[Callable[[], object]], threads: int | None = None, *, catch: bool = False) -> list:
    """Each job once, spread over ``threads`` threads (default one per job) started behind one barrier.

    Thread t runs jobs t, t + threads, ... in turn, so ``jobs * 5`` on ``len(jobs)`` threads
    has each thread repeat its job five times.

    Args:
        jobs: no-argument callables.
        threads: how many threads (at most ``len(jobs)``; None: one per job).
        catch: return a job's exception in its place instead of letting its thread die with it.

    Returns:
        The jobs' results (or, with ``catch``, exceptions), in job order.
    """
    threads = threads or len(jobs)
    barrier = threading.Barrier(threads)
    results: list = [None] * len(jobs)

    def work(start: int) -> None:
        barrier.wait()
        for i in range(start, len(jobs), threads):
            try:
                results[i] = jobs[i]()
            except Exception as exc:  # noqa: BLE001 - handed to the test, which checks it
                if not catch:
                    raise
                results[i] = exc

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results
