"""How many threads the kernels use: the cores this process may run on, and fewer when other
processes keep some of them busy.

The parallel kernels split each product between their threads and wait for the last one (a
fork-join per product, a few hundred per token). When another process owns one of those cores (a
drone's flight stack, a phone's other apps), the thread that shares its core is descheduled for a
whole time slice at a time and every product waits for it: measured on 2 cores with one kept busy,
2 threads decoded 3-4x slower than 1 (bench/bench_contention.py). No split of the work fixes that
(the join still waits for the descheduled thread), so the runtime measures instead:
:class:`ThreadGovernor` times decode steps, now and then runs a few with one thread fewer (and,
when below the maximum, one more), and keeps whichever count is faster. The model's ``threads`` is
the most it uses.
"""

from __future__ import annotations

import math
import operator
import os
import statistics
from concurrent.futures import wait
from contextlib import contextmanager

import numba

from edgelora.errors import UsageError


def in_parallel(pool, work, items) -> list:
    """``[work(i) for i in items]``: every item but the last on ``pool``'s threads, the last on the
    calling thread, which then waits for the others (also when its own item fails). One hand-off
    fewer than a ``pool.map``, and a pool of n threads serves n + 1 items at once. Every parallel
    split of the prefill goes through here: with a mix of ``map`` (n items) and this (n - 1) on one
    pool, ``ThreadPoolExecutor``, which starts a thread only while no finished work item has left
    one counted idle, had started one thread where two were meant, and a prompt's attention shares
    ran one after the other (a TinyLlama prompt's attention over 128 tokens: 36 -> 54 ms)."""
    items = list(items)
    others = [pool.submit(work, i) for i in items[:-1]]
    try:
        last = work(items[-1])
    except BaseException:
        wait(others)
        raise
    return [f.result() for f in others] + [last]


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (``taskset``, cpusets), and a container's
    CPU quota (cgroup v2 ``cpu.max``) where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def set_threads(threads: int | None) -> int:
    """A model's thread count, checked; ``None`` means every core this process may use
    (:func:`available_cores`).

    Numba runs the parallel kernels with this many threads. Numba's count belongs to each calling
    thread: this sets the calling (loading) thread's, for code that runs ``model.net`` directly,
    and ``Model`` applies its count around every forward (:func:`thread_count`), from whichever
    thread it runs. BLAS is held to one thread (for the process) because the prefill splits its
    products between threads itself (two spinning thread pools on the same cores slow each other
    down many times over)."""
    n = numba.config.NUMBA_NUM_THREADS
    given = threads
    try:
        threads = min(n, available_cores()) if given is None else operator.index(given)
    except TypeError:
        threads = 0
    if not 1 <= threads <= n:
        raise UsageError(f"threads must be between 1 and {n} on this machine, got {given!r}")
    numba.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, user_api="blas")
    except ImportError:  # BLAS then uses its own default
        pass
    return threads


@contextmanager
def thread_count(n: int):
    """Run the block's kernels on ``n`` threads (in this thread), then put the caller's count back."""
    caller = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(caller)


class ThreadGovernor:
    """Chooses the thread count of each decode step between 1 and ``max_threads``.

    It runs at its current count ``n``; every ``interval`` steps it probes: ``probe_steps`` steps at
    ``n - 1`` (or, when ``n`` is below the maximum, alternately at ``n + 1``), compared by median
    with the ``probe_steps`` steps at ``n`` just before. A probe that is faster by ``margin`` moves
    ``n`` there and brings the next probe forward; a probe that is not doubles the interval (up to
    ``max_interval``), so a steady machine pays for a probe rarely; at the most threads a probe
    whose steps were more than ``slower * margin`` times slower sets it to ``max_interval`` at once
    (one thread fewer can then win only after the steps at ``n`` have become ``slower`` times
    slower, which probes at once: a 1B decode's first 128 tokens had paid four probe steps of
    twice a step's time, 3 %). Steps that become ``slower`` times slower than at the last decision
    (another process took a core) probe at once. Steps are only compared with steps of the same
    batch size. A probe step ``slower`` times slower than the current count's ends the probe at
    once (a core owned by another process makes such steps several times slower: each failed
    probe then costs one of them, not ``probe_steps``)."""

    def __init__(self, max_threads: int, interval: int = 8, max_interval: int = 1024, probe_steps: int = 3,
                 margin: float = 0.9, slower: float = 1.5):
        self.max_threads = max(1, int(max_threads))
        self.n = self.max_threads
        self.base_interval, self.max_interval = interval, max_interval
        self.interval = interval
        self.probe_steps, self.margin, self.slower = probe_steps, margin, slower
        self._reference: float | None = None  # median step time at n when it was last decided
        self._recent: list[float] = []  # the last steps at n (seconds)
        self._probe: list[float] = []  # steps at the probed count
        self._probing: int | None = None  # the count being probed
        self._since = 0  # steps since the last probe
        self._up = False  # the next probe goes up (when possible)
        self._batch = None

    def current(self, batch: int = 1) -> int:
        """The thread count for the next step of ``batch`` rows (0: not a decode step, a prompt). A
        probe runs only on steps of the size it compares: a speculative step of five rows, or a
        prompt, after plain steps started a probe runs at the current count, not the probed one."""
        return self._probing if self._probing is not None and batch == self._batch else self.n

    def record(self, threads: int, seconds: float, batch: int = 1) -> None:
        """One decode step of ``batch`` rows took ``seconds`` with ``threads`` threads."""
        if self.max_threads == 1:
            return
        if batch != self._batch:  # another kind of step: start comparing afresh
            self._batch, self._recent, self._probe, self._probing, self._since = batch, [], [], None, 0
            self._reference = None
        if self._probing is not None and threads == self._probing:
            self._probe.append(seconds)
            if len(self._probe) >= self.probe_steps or seconds > self.slower * statistics.median(self._recent):
                self._decide()  # enough steps, or one so slow that more would only cost
            return
        if threads != self.n:
            return
        self._recent = (self._recent + [seconds])[-self.probe_steps:]
        self._since += 1
        if len(self._recent) < self.probe_steps:
            return
        now = statistics.median(self._recent)
        if self._reference is None:
            self._reference = now
        if self._since >= self.interval or now > self.slower * self._reference:
            self._start_probe()

    def _start_probe(self) -> None:
        up = self.n < self.max_threads and (self._up or self.n == 1)
        self._up = not self._up
        self._probing = self.n + 1 if up else self.n - 1
        self._probe = []

    def _decide(self) -> None:
        probe, now = statistics.median(self._probe), statistics.median(self._recent)
        if probe < self.margin * now:
            self.n, self.interval = self._probing, self.base_interval
            self._recent = list(self._probe)
        elif self.n == self.max_threads and self._probing < self.n and probe > self.slower * self.margin * now:
            # one thread fewer can win only once steps at n are probe / margin, over ``slower``
            # times, slower, which starts a probe at once; at the most threads no probe goes up,
            # so the periodic ones wait ``max_interval`` steps
            self.interval = self.max_interval
        else:
            self.interval = min(self.max_interval, self.interval * 2)
        self._reference = statistics.median(self._recent)
        self._probing, self._probe, self._since = None, [], 0
