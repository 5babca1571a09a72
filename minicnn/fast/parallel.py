"""CPU threads over chunks of a batch, for the fast kernels.

NumPy releases the GIL inside array copies, ufuncs and matrix products, so
plain Python threads that work on different images of a batch run at the
same time on different cores. A kernel hands :func:`run_chunks` a function
and a list of batch slices; each worker thread takes the next slice that
nobody has taken yet, so a thread that starts late (waking a sleeping thread
takes a while) simply does fewer of them.

The matrix products of one chunk are small. OpenBLAS would split each of them
over all cores too, which costs more in hand-offs than it gains; worse, its
threads keep spinning for a while after each call, waiting for more work, and
so take a core away from our own threads. So once minicnn's threads are first
used, BLAS is held to one thread for the rest of the process (threadpoolctl),
and parallelism comes from the chunks instead. This also holds NumPy's BLAS to
one thread for the caller's own NumPy code in the same process.

The helper threads are started once and wait on a queue each; handing them a
job is one put, and the caller collects one message per helper (lighter than
a ThreadPoolExecutor's submit and Future).

Threads share one GIL, and NumPy takes it back after every call: two threads
that each make many short calls wait on each other. Training therefore splits
each batch over processes instead (minicnn.fast.replicas), each running its
part in its calling thread (:func:`in_calling_thread`); these threads still
serve inference and the models that replicas do not take.

On CuPy everything runs in the calling thread: the GPU is already parallel.
One model at a time: the helper threads and the kernels' scratch buffers are
shared, so minicnn must not be called from several threads at once.
The number of workers is :func:`workers`: ``MINICNN_THREADS`` if set, else
the number of CPUs this process may use; :func:`set_workers` changes it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading

from minicnn import backend
from minicnn.validation import env_int

_workers: int | None = None
_pool: _HelperThreads | None = None
_blas_limit = None   # threadpoolctl's limit, set on the first parallel run_chunks
_in_calling_thread = 0   # > 0 inside in_calling_thread(): no helper threads
_part = threading.local()   # .worker: the worker running a part of run_chunks in this thread


def _default_workers() -> int:
    value = env_int("MINICNN_THREADS")
    if value is not None:
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:            # not on Linux
        return max(1, os.cpu_count() or 1)


def _outer_worker() -> int | None:
    """The worker whose part of run_chunks this thread is running, or None."""
    return getattr(_part, "worker", None)


def workers() -> int:
    """How many threads run_chunks uses on NumPy (1 inside in_calling_thread(), and inside
    a part of another run_chunks)."""
    global _workers
    if _in_calling_thread or _outer_worker() is not None:
        return 1
    if _workers is None:
        _workers = _default_workers()
    return _workers


def threads_at_work() -> int:
    """How many threads of this process run minicnn's kernels at the same time: 1 inside
    in_calling_thread() (each process of the replicas), all the workers inside a part
    of another run_chunks (the other parts run meanwhile), else workers()."""
    if _in_calling_thread:
        return 1
    if _outer_worker() is not None:
        return _workers or _default_workers()
    return workers()


@contextlib.contextmanager
def in_calling_thread():
    """Meanwhile, run_chunks works in the calling thread only: for a process that
    shares the CPUs with other processes of its own (minicnn.replicas)."""
    global _in_calling_thread
    _in_calling_thread += 1
    try:
        yield
    finally:
        _in_calling_thread -= 1


def set_workers(count: int) -> None:
    """Use ``count`` threads from now on (1: everything in the calling thread)."""
    global _workers, _pool
    if count < 1:
        raise ValueError(f"need at least one worker thread, got {count}")
    _workers = int(count)
    if _pool is not None:
        _pool.stop()
        _pool = None


class _HelperThreads:
    """Threads 1 .. count-1 (the calling thread is worker 0), each waiting for jobs."""

    def __init__(self, count: int):
        self.inboxes = [queue.SimpleQueue() for _ in range(count)]
        self.finished = queue.SimpleQueue()        # None, or the error a job raised
        for worker in range(1, count):
            threading.Thread(target=self._serve, args=(worker,), daemon=True,
                             name=f"minicnn-{worker}").start()

    def _serve(self, worker: int) -> None:
        while (job := self.inboxes[worker].get()) is not None:
            error = None
            try:
                job(worker)
            except Exception as caught:  # noqa: BLE001 (handed to the caller, raised there)
                error = caught
            finally:
                self.finished.put(error)

    def run(self, job, count: int) -> None:
        """job(worker) on workers 0 .. count-1 at once; re-raises a helper's error."""
        for worker in range(1, count):
            self.inboxes[worker].put(job)
        try:
            job(0)
        finally:                      # even if job(0) failed: wait until the helpers are done
            errors = [self.finished.get() for _ in range(1, count)]
        for error in errors:
            if error is not None:
                raise error

    def stop(self) -> None:
        for inbox in self.inboxes[1:]:
            inbox.put(None)


def hold_blas_to_one_thread() -> None:
    """Hold BLAS to one thread from now on (see the module docstring)."""
    global _blas_limit
    if _blas_limit is None:
        from threadpoolctl import threadpool_limits
        _blas_limit = threadpool_limits(limits=1, user_api="blas")


def batch_parts(array, min_images: int = 1) -> list:
    """Slices of the batch ``array`` (images first), one per worker thread, each of at
    least ``min_images`` images (so fewer parts for a small batch, and one on CuPy), for
    run_chunks on work that goes image by image."""
    n = array.shape[0]
    count = max(1, min(workers() if backend.on_cpu(array) else 1, n // min_images))
    bounds = [n * k // count for k in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def run_chunks(work, parts: list, array) -> list:
    """Call ``work(part, worker)`` for every part, return the results in order.

    ``worker`` is the index of the thread (0 .. workers()-1) so that ``work``
    can use scratch space of its own. ``array`` tells the backend: CuPy
    arrays are worked on in the calling thread, one part after the other. Called
    inside a part of another run_chunks (FastSequential's inference parts), it works
    in that part's thread, as that worker, so that it uses that worker's scratch space.
    """
    outer = _outer_worker()
    if outer is not None:
        return [work(part, outer) for part in parts]
    count = min(workers(), len(parts))
    if count == 1 or not backend.on_cpu(array):
        return [work(part, 0) for part in parts]
    global _pool
    if _pool is None:
        _pool = _HelperThreads(workers())

    results = [None] * len(parts)
    claim = itertools.count()       # next() on it is atomic: each part is taken exactly once

    def worker_loop(worker: int) -> None:
        _part.worker = worker
        try:
            index = next(claim)
            while index < len(parts):
                results[index] = work(parts[index], worker)
                index = next(claim)
        finally:
            _part.worker = None

    hold_blas_to_one_thread()
    _pool.run(worker_loop, count)
    return results
