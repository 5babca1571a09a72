"""Data-parallel training on the CPU: each batch split over processes, each with a copy
of the model.

Why processes and not more threads: minicnn's threads (minicnn.fast.parallel)
each run a few dozen NumPy calls per chunk of images, and NumPy has to take the
GIL back after every call. With two threads doing that at once, each waits on
the other (docs/performance.md has the measurements). A process has a GIL of
its own.

One training step, for a batch of N images split into parts of n_0, n_1, ...
images (part 0 in the calling process, the others in worker processes, each
part on one thread)::

    L_k  = mean loss over part k,   g_k = dL_k / dθ    (forward and backward of part k)
    L    = sum_k (n_k / N) * L_k                       (the mean over the whole batch)
    dL/dθ = sum_k (n_k / N) * g_k

This holds because every image's loss depends only on that image, once the
batch statistics of BatchNorm are those of the whole batch: each process's
BatchNorm layers (minicnn.fast.norm.FastBatchNorm2d) add up their parts' sums
with the other processes' through :class:`_AllReduce` before using them.
Each part's loss gradient is scaled by n_k / N before its backward, so the g's
add up to dL/dθ in the model's grads and the optimizer steps as usual.

The parameters live in shared memory: the calling process's model is rebound
to views of it, its optimizer updates them in place, and every copy reads
them on its next forward. Each worker takes its images from shared memory
and writes its part's gradients to shared memory of its own; its loss and
logits (a few numbers per image) come back through its pipe.

Usage, in place of forward, loss and backward::

    with Replicas(model, criterion) as replicas:
        for x, labels in batches:
            loss, logits = replicas.forward_backward(x, labels)
            optimizer.step()
"""

from __future__ import annotations

import atexit
import contextlib
import math
import multiprocessing
import signal
import sys
import threading
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

from minicnn import backend
from minicnn.errors import ReplicaError
from minicnn.fast import parallel
from minicnn.fast.norm import FastBatchNorm2d
from minicnn.train import forward_backward
from minicnn.validation import env_int

PROCESSES_VARIABLE = "MINICNN_PROCESSES"
MAX_PROCESSES = 256
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}    # the calling process's to handle

_OPEN = set()      # the finalizers of the Replicas not closed yet


@atexit.register
def _close_all() -> None:
    """At exit, stop the workers of every Replicas nobody closed. Registered after
    multiprocessing's own exit handler (imported above), so it runs first: that one
    sends SIGTERM, which workers ignore, and then waits for them forever."""
    for finalizer in list(_OPEN):
        finalizer()


def default_processes(model) -> int:
    """How many processes forward_backward would use for ``model``: MINICNN_PROCESSES
    if set, else one per worker thread of minicnn.parallel (one per CPU); 1 where
    replicas do not apply (see :func:`refusal`)."""
    if refusal(model) is not None:
        return 1
    value = env_int(PROCESSES_VARIABLE, 1, MAX_PROCESSES)
    return parallel.workers() if value is None else value


def refusal(model) -> str | None:
    """Why ``model`` cannot be trained by replicas here, or None if it can."""
    if backend.name() != "numpy":
        return "replicas run on the NumPy backend only (a GPU is parallel already)"
    for _, module in model.modules():
        if module.batch_statistics and not isinstance(module, FastBatchNorm2d):
            return (f"its {module.layer_name()} layer keeps batch statistics that the "
                    "processes cannot share")
    return None


class _SharedArrays:
    """Arrays of the given (shape, dtype) in one block of shared memory; ``spec`` lets
    another process attach to the same block (:meth:`attach`)."""

    def __init__(self, layouts, name: str | None = None):
        self.layouts = self.normalized(layouts)
        offsets, size = [], 0
        for shape, dtype in self.layouts:
            offsets.append(size)
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            size += math.ceil(nbytes / 64) * 64          # each array starts 64-byte aligned
        self.offsets = offsets
        if name is None:
            self.memory = shared_memory.SharedMemory(create=True, size=max(size, 64))
            self.owner = True
        else:
            # the workers share the calling process's resource tracker, which dedups the
            # name that attaching registers again: the block is unlinked once, by close()
            self.memory = shared_memory.SharedMemory(name=name)
            self.owner = False
        self.arrays = [np.ndarray(shape, dtype, buffer=self.memory.buf, offset=offset)
                       for (shape, dtype), offset in zip(self.layouts, offsets)]

    @staticmethod
    def normalized(layouts) -> list:
        """[(shape tuple, dtype string), ...]: comparable, and picklable as the spec."""
        return [(tuple(shape), np.dtype(dtype).str) for shape, dtype in layouts]

    @property
    def spec(self):
        return self.memory.name, self.layouts

    @classmethod
    def attach(cls, spec) -> _SharedArrays:
        name, layouts = spec
        return cls(layouts, name=name)

    def close(self) -> None:
        """Unmap the block (and, in the process that made it, free it): no view of it may
        be used afterwards."""
        self.arrays = []
        self.memory.close()
        if self.owner:
            self.memory.unlink()


def _reply(worker) -> tuple:
    """The worker's next message: ("ready",), ("done", loss, logits), ("error", its
    traceback), or ("dead", why) if its process has gone."""
    try:
        return worker["connection"].recv()
    except (EOFError, OSError):
        worker["process"].join(timeout=10)
        return "dead", _exit_reason(worker["process"])


def _exit_reason(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"a replica's process was killed by {name}{hint}"
    return f"a replica's process exited (exit code {code})"


class _AllReduce:
    """all_sum(vector): the sum of the vectors that every process passes in its call of
    the same number (counted from 0 in each step), the same array in every process
    (added in rank order). The BatchNorm layers of each process call it in the same
    order.

    Each process writes its vector into its row of a shared block, waits at a barrier
    for the others, and sums the rows. Two blocks are used in turn, so one barrier per
    call is enough: a process writes block k again only in call i + 2, after every
    process has passed call i + 1's barrier, and so has read call i's sums."""

    def __init__(self, processes: int, width: int, barrier, spec=None, rank: int = 0):
        layouts = [((2, processes, width), np.float64)]
        self.block = _SharedArrays(layouts) if spec is None else _SharedArrays.attach(spec)
        self.barrier, self.rank, self.calls = barrier, rank, 0

    def all_sum(self, vector):
        rows = self.block.arrays[0][self.calls % 2]
        self.calls += 1
        size = len(vector)
        rows[self.rank, :size] = vector
        self.barrier.wait()
        return rows[:, :size].sum(axis=0)


def _batch_norms(model) -> list:
    return [module for _, module in model.modules() if isinstance(module, FastBatchNorm2d)]


def _reduce_width(model) -> int:
    """The longest vector the BatchNorm layers all-sum: 2 numbers per channel."""
    return max((2 * module.num_features + 1 for module in _batch_norms(model)), default=0)


def _slots(model):
    """[(module, key), ...] of every parameter, in a fixed order."""
    return [(module, key) for _, module, key in model.named_parameters()]


def _worker(connection, params_spec, grads_spec, reduce=None) -> None:
    """A worker process: forward and backward of its part of each batch (see the module
    docstring), until told to stop. ``reduce``: (block spec, barrier, rank) of the
    all-reduce its BatchNorm layers share with the other processes. It starts with
    SIGINT and SIGTERM blocked (see Replicas) and ignores them: Ctrl-C to the process
    group is the calling process's to handle, which then stops the workers.
    Floating-point warnings are the calling process's too (it checks the loss)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    np.seterr(all="ignore")
    try:
        message = connection.recv()                   # ("model", model, criterion)
    except EOFError:
        return
    if message[0] != "model":
        return
    try:
        _, model, criterion = message
        parallel.set_workers(1)
        parallel.hold_blas_to_one_thread()
        params, grads = _SharedArrays.attach(params_spec), _SharedArrays.attach(grads_spec)
        slots = _slots(model)
        for (module, key), view in zip(slots, params.arrays):
            module.params[key] = view
        model.train()
        model.set_needs_input_grad(False)
        sync = _AllReduce(0, 0, reduce[1], spec=reduce[0], rank=reduce[2]) if reduce else None
        for module in _batch_norms(model):
            module.sync = sync
    except Exception:  # noqa: BLE001 (sent to the calling process, raised there)
        connection.send(("error", traceback.format_exc()))
        return
    connection.send(("ready",))
    inputs = {}                                       # block name -> attached block
    while True:
        try:
            message = connection.recv()
        except EOFError:                              # the calling process has gone
            break
        if message[0] == "stop":
            break
        _, inputs_spec, total = message
        try:
            name = inputs_spec[0]
            if name not in inputs:
                for block in inputs.values():
                    block.close()
                inputs = {name: _SharedArrays.attach(inputs_spec)}
            # copies: the model's caches must not point into a block that is closed later
            x, labels = (array.copy() for array in inputs[name].arrays)
            if sync is not None:
                sync.calls = 0                        # each step's calls count from 0
            loss, logits = forward_backward(model, criterion, x, labels, len(labels) / total)
            for (module, key), out in zip(slots, grads.arrays):
                out[...] = module.grads[key]
            connection.send(("done", float(loss), logits))
        except Exception:  # noqa: BLE001 (sent to the calling process, raised there)
            if sync is not None:          # nobody may wait at the barrier for this part
                sync.barrier.abort()
            connection.send(("error", traceback.format_exc()))
    model = slots = None                # drop the views of shared memory before closing it
    for block in (*inputs.values(), params, grads, *([sync.block] if sync else [])):
        block.close()


class Replicas:
    """forward_backward(x, labels) of ``model`` with ``criterion``, the batch split over
    ``processes`` processes (this one and processes-1 workers); see the module docstring."""

    def __init__(self, model, criterion, processes: int | None = None):
        reason = refusal(model)
        if reason is not None:
            raise ValueError(f"cannot train this model with replicas: {reason}")
        self.model, self.criterion = model, criterion
        self.processes = default_processes(model) if processes is None else int(processes)
        if self.processes < 1:
            raise ValueError(f"need at least one process, got {self.processes}")
        self._slots = slots = _slots(model)          # (module, key) stay; the arrays may not
        layouts = [(module.params[key].shape, module.params[key].dtype) for module, key in slots]
        self._params = _SharedArrays(layouts)
        for (module, key), view in zip(slots, self._params.arrays):
            view[...] = module.params[key]
            module.params[key] = view                # the optimizer now updates shared memory
        parallel.hold_blas_to_one_thread()           # this process runs a part too
        self._workers = []
        context = multiprocessing.get_context("spawn")   # no fork of a process with threads
        self._sync = None
        if _batch_norms(model):
            self._sync = _AllReduce(self.processes, _reduce_width(model),
                                    context.Barrier(self.processes))
        # close() when this object is dropped or at exit, if nobody called it
        self._finalizer = weakref.finalize(self, _shut_down, model, slots, self._params,
                                           self._workers, self._sync)
        _OPEN.add(self._finalizer)
        try:
            self._start_workers(context, layouts)
        except BaseException:                         # Ctrl-C included: nothing is left behind
            self.close()
            raise
        for module in _batch_norms(model):
            module.sync = self._sync
        if self._sync is not None:        # a worker that dies breaks the barrier at once
            threading.Thread(target=_watch, args=(self._workers, self._sync.barrier),
                             daemon=True, name="minicnn-replica-watch").start()

    def _start_workers(self, context, layouts) -> None:
        """Start processes-1 workers and wait until each has its copy of the model.

        Each starts with SIGINT and SIGTERM blocked (a child inherits the signal mask),
        so that Ctrl-C to the process group cannot kill it halfway through Python's
        start-up. The model goes through the pipe after the start, not as an argument
        of the process: the start writes its arguments to a pipe the parent still
        reads from, and waits forever there if the child dies before reading them
        all (the few kilobytes of the start fit in the pipe's buffer; a model may not)."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for rank in range(1, self.processes):
                grads = _SharedArrays(layouts)
                ours, theirs = context.Pipe()
                reduce = (self._sync.block.spec, self._sync.barrier, rank) if self._sync else None
                process = context.Process(target=_worker, daemon=True, name="minicnn-replica",
                                          args=(theirs, self._params.spec, grads.spec, reduce))
                self._workers.append({"process": process, "connection": ours, "grads": grads,
                                      "inputs": None})
                try:
                    with _script_not_rerun(self.model, self.criterion):
                        process.start()
                finally:
                    theirs.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for worker in self._workers:
            try:
                worker["connection"].send(("model", self.model, self.criterion))
            except OSError:
                pass                                  # _reply says why the process is gone
        for worker in self._workers:                  # each has its copy of the model now
            answer = _reply(worker)
            if answer[0] != "ready":
                raise ReplicaError(_why(answer, "a replica's process did not start"))

    @property
    def worker_pids(self) -> list[int]:
        return [worker["process"].pid for worker in self._workers]

    def _check_parameters(self) -> None:
        """Put back into shared memory any parameter that was replaced by a new array
        since (loading weights does that), so that the workers see it."""
        for (module, key), view in zip(self._slots, self._params.arrays):
            param = module.params.get(key)
            if param is None:
                raise ValueError(f"parameter {key!r} is no longer trained (frozen) since the "
                                 "replicas were made; make new Replicas")
            if param is not view:
                if param.shape != view.shape or param.dtype != view.dtype:
                    raise ValueError(f"parameter {key!r} changed shape or dtype since the "
                                     "replicas were made; make new Replicas")
                view[...] = backend.to_host(param)
                module.params[key] = view

    @staticmethod
    def _inputs_for(worker, x, labels):
        """The worker's shared block for this part (x, labels), made anew when the part's
        shapes change (the last batch of an epoch is smaller)."""
        layouts = [(x.shape, x.dtype), (labels.shape, labels.dtype)]
        block = worker["inputs"]
        if block is None or block.layouts != _SharedArrays.normalized(layouts):
            if block is not None:
                block.close()
            block = worker["inputs"] = _SharedArrays(layouts)
        return block

    def forward_backward(self, x, labels):
        """Forward, loss and backward of the batch: fills the model's grads with dL/dθ of
        the mean loss over the whole batch; returns (loss, logits) as forward would."""
        n = len(labels)
        if len(x) != n:
            raise ValueError(f"{len(x)} images but {n} labels")
        self._check_parameters()
        parts = min(self.processes, n)
        if self._sync is not None and parts < self.processes:
            return self._alone(x, labels)        # the all-reduce needs every process
        bounds = [n * k // parts for k in range(parts + 1)]
        busy = []
        for worker, start, stop in zip(self._workers, bounds[1:-1], bounds[2:]):
            block = self._inputs_for(worker, x[start:stop], labels[start:stop])
            block.arrays[0][...] = x[start:stop]
            block.arrays[1][...] = labels[start:stop]
            try:
                worker["connection"].send(("step", block.spec, n))
            except OSError:
                busy.append((worker, None))           # _reply says why it is gone
                continue
            busy.append((worker, block))
        broken = False
        if self._sync is not None:
            self._sync.calls = 0                  # every process counts its calls from 0
        try:
            with parallel.in_calling_thread():
                head = slice(0, bounds[1])
                loss, logits_head = forward_backward(self.model, self.criterion, x[head],
                                                     labels[head], bounds[1] / n)
        except threading.BrokenBarrierError:   # a worker failed or died mid-step
            broken = True
        except BaseException:
            if self._sync is not None:         # the workers may wait at the barrier for us
                self._sync.barrier.abort()
            for worker, _ in busy:
                _reply(worker)
            self._repair_barrier()
            raise
        replies = [_reply(worker) for worker, _ in busy]
        failed = [reply for reply in replies if reply[0] in ("error", "dead")]
        if failed or broken:
            self._repair_barrier()
            raise ReplicaError(_why(failed[0], "a replica's step failed") if failed else
                               "a replica's step failed: its processes fell out of step")
        logits = [logits_head]
        for (worker, _), (_, part_loss, part_logits) in zip(busy, replies):
            loss = loss + part_loss                       # scaled by its share already
            for (module, key), grad in zip(self._slots, worker["grads"].arrays):
                module.grads[key] = module.grads[key] + grad
            logits.append(part_logits)
        return np.asarray(loss, dtype=logits_head.dtype), np.concatenate(logits)

    def _repair_barrier(self) -> None:
        """After a failed step, when every process is out of the barrier: make it usable
        again (unless a worker has died: then the replicas stay broken)."""
        if self._sync is not None and all(w["process"].is_alive() for w in self._workers):
            self._sync.barrier.reset()

    def _alone(self, x, labels):
        """The step in this process only, with its own batch statistics: for a batch
        smaller than the number of processes."""
        norms = _batch_norms(self.model)
        for module in norms:
            module.sync = None
        try:
            with parallel.in_calling_thread():
                loss, logits = forward_backward(self.model, self.criterion, x, labels)
        finally:
            for module in norms:
                module.sync = self._sync
        return loss, logits

    def close(self) -> None:
        """Stop the workers and free the shared memory (the model keeps its parameters,
        copied back into ordinary arrays)."""
        self._finalizer()
        _OPEN.discard(self._finalizer)

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _script_not_rerun(model, criterion):
    """Meanwhile, a spawned process does not run the calling script again, where it
    needs nothing from it: Python's spawn imports the main module in every new
    process, so a script without ``if __name__ == "__main__":`` would start training
    anew in each worker, whose own start of workers then fails. The workers need the
    main module only to unpickle classes defined there; where the model and the loss
    are made of minicnn's classes alone, it is hidden from the spawn."""
    main = sys.modules.get("__main__")
    ours = all(type(m).__module__.startswith("minicnn.") for _, m in model.modules())
    if main is None or not ours or not type(criterion).__module__.startswith("minicnn."):
        yield
        return
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _why(reply, failed: str) -> str:
    """One line for a failed reply: why the process is gone, or ``failed`` and the last
    line of the worker's traceback (the exception)."""
    kind, text = reply[0], str(reply[1])
    if kind == "dead":
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{failed}: {lines[-1] if lines else 'unknown error'}"


def _watch(workers: list, barrier) -> None:
    """Break the barrier as soon as a worker process has died, so that no process waits
    at it for a part that will never come; ends when the replicas are closed."""
    while workers:
        if any(not worker["process"].is_alive() for worker in list(workers)):
            barrier.abort()
            return
        threading.Event().wait(0.2)


def _shut_down(model, slots: list, params: _SharedArrays, workers: list, sync=None) -> None:
    """Replicas.close(): stop the workers, give the model ordinary arrays again, free the
    shared memory. Runs once (weakref.finalize)."""
    if sync is not None:
        sync.barrier.abort()                           # no process may wait at it any more
    for worker in workers:
        try:
            worker["connection"].send(("stop",))
        except OSError:                                # the worker is gone already
            pass
    for worker in workers:
        process = worker["process"]
        if process.pid is not None:                   # started
            process.join(timeout=10)
            if process.is_alive():                    # stuck: it ignores SIGINT and SIGTERM
                process.kill()
                process.join()
        worker["connection"].close()
        worker["grads"].close()
        if worker["inputs"] is not None:
            worker["inputs"].close()
    workers.clear()
    for (module, key), view in zip(slots, params.arrays):   # the slots the block was made for
        for holder in (module.params, module.buffers):     # (a frozen parameter is a buffer)
            if holder.get(key) is view:
                holder[key] = view.copy()
    params.close()
    for module in _batch_norms(model):
        module.sync = None
    if sync is not None:
        sync.block.close()
