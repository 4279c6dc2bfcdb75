"""The thread governor: decode steps use fewer threads when that is faster (a core owned by another
process), go back when the core is free again, and a steady machine pays for probes rarely. The
step times here are a model of the measured ones (bench/bench_contention.py: on 2 cores with one
kept busy, 2 threads decoded 3-4x slower than 1). And ``in_parallel``, the prefill's one way to
split work between threads."""

from __future__ import annotations

import itertools

import pytest

from edgelora.runtime.threads import ThreadGovernor, available_cores


def _drive(gov: ThreadGovernor, seconds_at, steps: int, batch: int = 1) -> list[int]:
    used = []
    for _ in range(steps):
        n = gov.current(batch)
        used.append(n)
        gov.record(n, seconds_at(n), batch)
    return used


def test_a_busy_core_moves_decode_to_fewer_threads_and_a_free_one_back():
    gov = ThreadGovernor(2)
    free = {1: 1.0, 2: 0.6}.__getitem__  # two threads pay on a quiet machine
    busy = {1: 1.0, 2: 3.5}.__getitem__  # one core taken: the fork-join waits for the descheduled thread
    used = _drive(gov, free, 2000)
    assert gov.n == 2 and used.count(1) <= 24 and used[1000:].count(1) <= 3  # probes, ever rarer
    used = _drive(gov, busy, 200)
    assert gov.n == 1 and used[:8].count(2) <= 6 and used[-100:].count(2) <= 6  # found at once: steps got slower
    used = _drive(gov, busy, 1000)
    assert gov.n == 1 and used.count(2) <= 8  # each failed probe upwards costs one slow step, ever rarer
    used = _drive(gov, free, 2000)
    assert gov.n == 2 and used[-500:].count(1) <= 3


def test_more_threads_than_pay_settle_on_the_fastest_count():
    gov = ThreadGovernor(8)
    cost = {n: 1.0 / min(n, 3) + 0.2 * max(0, n - 3) for n in range(1, 9)}.get  # 3 free cores, the rest busy
    _drive(gov, cost, 3000)
    assert gov.n == 3


def test_probes_compare_steps_of_one_batch_size_only():
    gov = ThreadGovernor(2)
    sizes = itertools.cycle([1] * 20 + [4] * 20)  # batches that come and go: each kind compared with its own
    for _ in range(4000):
        b = next(sizes)
        n = gov.current(b)
        gov.record(n, (0.6 if n == 2 else 1.0) * b, b)
    assert gov.n == 2


def test_a_probe_runs_only_on_steps_of_the_size_it_compares():
    """A probe started by plain steps does not take the speculative step of five rows, or the
    prompt, that comes next: they run at the current count (a five-row step run on one thread by
    another size's probe had cost twice its time, and prompt lookup's budget took that for its cost)."""
    gov = ThreadGovernor(2)
    probed = []
    for _ in range(200):
        n = gov.current(1)
        if n == 1:  # a probe at one thread fewer is on: other sizes are not part of it
            probed.append((gov.current(5), gov.current(0)))
        gov.record(n, 0.6 if n == 2 else 1.0, 1)
    assert probed and set(probed) == {(2, 2)}
    assert gov.current(1) == 2


def test_one_thread_is_never_probed_and_noise_does_not_flip_the_count():
    gov = ThreadGovernor(1)
    assert _drive(gov, lambda n: 1.0, 100) == [1] * 100
    gov = ThreadGovernor(2)
    jitter = itertools.cycle([0.55, 0.65, 0.6, 0.7, 0.5])
    _drive(gov, lambda n: next(jitter) if n == 2 else 1.0, 3000)
    assert gov.n == 2


def test_available_cores_follows_the_affinity_mask():
    import os
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
        before = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, {min(before)})
            assert available_cores() == 1
        finally:
            os.sched_setaffinity(0, before)


def test_in_parallel_runs_the_last_item_here_and_waits_for_every_other():
    """``in_parallel``: the results in the items' order, the last item on the calling thread, the
    others on the pool's; a failure on either side is raised, and only once every item is done."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from edgelora.runtime.threads import in_parallel

    pool = ThreadPoolExecutor(3)
    where = {}

    def work(i):
        where[i] = threading.get_ident()
        return i * i

    assert in_parallel(pool, work, range(4)) == [0, 1, 4, 9]
    assert where[3] == threading.get_ident() and threading.get_ident() not in (where[0], where[1], where[2])
    done = []

    def slow_then_fail_last(i):
        if i == 2:
            raise KeyError("last")
        time.sleep(0.2)
        done.append(i)

    with pytest.raises(KeyError, match="last"):
        in_parallel(pool, slow_then_fail_last, range(3))
    assert sorted(done) == [0, 1]  # (waited for before the error reached the caller)

    def fail_first(i):
        if i == 0:
            raise ValueError("first")
        return i

    with pytest.raises(ValueError, match="first"):
        in_parallel(pool, fail_first, range(3))
    pool.shutdown()


def test_a_count_that_clearly_pays_is_probed_once_in_a_long_while():
    """At the most threads, a probe whose step at one thread fewer was over ``slower * margin``
    times slower waits ``max_interval`` steps for the next (a 128-token decode had paid four such
    probe steps); one that lost by less keeps doubling from the start; contention is still found
    at once."""
    gov = ThreadGovernor(2)
    used = _drive(gov, {1: 1.0, 2: 0.45}.__getitem__, 1000)  # one thread 2.2x slower
    assert gov.n == 2 and gov.interval == gov.max_interval and used.count(1) == 1
    busy = ThreadGovernor(2)
    used = _drive(busy, {1: 1.0, 2: 0.7}.__getitem__, 1000)  # 1.43x (the memory shared with neighbours)
    assert busy.interval == busy.max_interval and used.count(1) <= 3
    close = ThreadGovernor(2)
    used = _drive(close, {1: 1.0, 2: 0.8}.__getitem__, 1000)  # 1.25x: within the noise a core's neighbours make
    assert close.n == 2 and 3 <= used.count(1) <= 24 and close.interval < close.max_interval
    used = _drive(gov, {1: 1.0, 2: 3.5}.__getitem__, 50)  # a core taken: steps at 2 threads 7.8x slower
    assert gov.n == 1 and used[:8].count(2) <= 6
