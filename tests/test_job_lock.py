"""The worker's job lock: a thread waiting between back-to-back jobs gets it at the next release."""

from __future__ import annotations

import threading
import time

import pytest

from src.job_lock import JobLock


def _jobs_back_to_back(lock: JobLock, jobs: int) -> list[object]:
    """Hold ``lock`` while a second thread starts waiting for it, then run ``jobs`` jobs, each
    taking the lock again at once (as a busy worker does); the order in which they all held it."""
    order: list[object] = []
    waiting = threading.Event()

    def switch_between_jobs() -> None:
        waiting.set()
        with lock:
            order.append("switch")

    lock.acquire()
    thread = threading.Thread(target=switch_between_jobs)
    thread.start()
    assert waiting.wait(10)
    while not _has_waiter(lock):
        time.sleep(0.001)
    lock.release()
    for job in range(jobs):
        with lock:
            order.append(job)
            sum(range(20_000))  # Python work holding the GIL, as a job's own code does
    thread.join(10)
    return order


def _has_waiter(lock: JobLock) -> bool:
    return lock._next_ticket - lock._serving > 1


def test_a_waiting_thread_is_served_before_the_next_job() -> None:
    for _ in range(5):
        order = _jobs_back_to_back(JobLock(), jobs=20)
        assert order == ["switch", *range(20)]


def test_threads_are_served_in_the_order_they_came() -> None:
    lock = JobLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for n in range(6):
        thread = threading.Thread(target=lambda n=n: (lock.acquire(), order.append(n), lock.release()))
        thread.start()
        threads.append(thread)
        while lock._next_ticket != n + 2:  # this thread has taken its ticket
            time.sleep(0.001)
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == list(range(6))
    assert not lock.locked()


def test_mutual_exclusion_under_contention() -> None:
    lock = JobLock()
    inside = 0
    most_inside = 0
    count = 0

    def work() -> None:
        nonlocal inside, most_inside, count
        for _ in range(200):
            with lock:
                inside += 1
                most_inside = max(most_inside, inside)
                value = count
                time.sleep(0)
                count = value + 1
                inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert (count, most_inside) == (800, 1)


def test_released_on_error_and_locked_state() -> None:
    lock = JobLock()
    assert not lock.locked()
    with pytest.raises(ValueError), lock:
        assert lock.locked()
        raise ValueError("job failed")
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release of an unlocked JobLock"):
        lock.release()
    with lock:  # still usable after the refused release
        assert lock.locked()
