"""Data-parallel training on the CPU: each batch split over processes, each with a copy
of the model.

Why processes and not more threads: minicnn's threads (minicnn.parallel) each
run a few dozen NumPy calls per chunk of images, and NumPy has to take the GIL
back after every call. With two threads doing that at once, each waits on the
other: on a 2-vCPU machine the same chunks ran 0.5-0.95x as fast on two
threads as on one, and 1.2-2.2x as fast on two processes (README, Speed). A
process has a GIL of its own.

One training step, for a batch of N images split into parts of n_0, n_1, ...
images (part 0 in the calling process, the others in worker processes, each
part on one thread)::

    L_k  = mean loss over part k,   g_k = dL_k / dθ    (forward and backward of part k)
    L    = sum_k (n_k / N) * L_k                       (the mean over the whole batch)
    dL/dθ = sum_k (n_k / N) * g_k

This holds because the model treats every image on its own: no batch
statistics, so models with BatchNorm (which has buffers) are refused. Each
part's loss gradient is scaled by n_k / N before its backward, so the g's add
up to dL/dθ in the model's grads and the optimizer steps as usual.

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
import math
import multiprocessing
import signal
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

from minicnn import backend, parallel
from minicnn.errors import MinicnnError
from minicnn.validation import env_int

PROCESSES_VARIABLE = "MINICNN_PROCESSES"
MAX_PROCESSES = 256
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}    # the calling process's to handle


class ReplicaError(MinicnnError, RuntimeError):
    """A replica's process died (killed, out of memory) or its step failed."""


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
    if any(True for _ in model.named_buffers()):
        return ("the model has buffers (BatchNorm): its batch statistics would differ "
                "from part to part")
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


def forward_backward(model, criterion, x, labels, share: float = 1.0):
    """The plain step in one process: forward, loss and backward of ``model`` on (x,
    labels), the loss and its gradient scaled by ``share`` (a part's n_k / N, see the
    module docstring); returns (loss, logits). Replicas runs it on every part."""
    logits = model.forward(x)
    loss = criterion.forward(logits, labels)
    gradient = criterion.backward()
    if share != 1.0:
        loss, gradient = loss * share, gradient * share
    model.backward(gradient)
    return loss, logits


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


def _slots(model):
    """[(module, key), ...] of every parameter, in a fixed order."""
    return [(module, key) for _, module, key in model.named_parameters()]


def _worker(connection, params_spec, grads_spec) -> None:
    """A worker process: forward and backward of its part of each batch (see the module
    docstring), until told to stop. It starts with SIGINT and SIGTERM blocked (see
    Replicas) and ignores them: Ctrl-C to the process group is the calling process's to
    handle, which then stops the workers. Floating-point warnings are the calling
    process's too (it checks the loss)."""
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
        model.needs_input_grad = False
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
            loss, logits = forward_backward(model, criterion, x, labels, len(labels) / total)
            for (module, key), out in zip(slots, grads.arrays):
                out[...] = module.grads[key]
            connection.send(("done", float(loss), logits))
        except Exception:  # noqa: BLE001 (sent to the calling process, raised there)
            connection.send(("error", traceback.format_exc()))
    model = slots = None                # drop the views of shared memory before closing it
    for block in (*inputs.values(), params, grads):
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
        # close() when this object is dropped or at exit, if nobody called it
        self._finalizer = weakref.finalize(self, _shut_down, model, self._params, self._workers)
        _OPEN.add(self._finalizer)
        try:
            self._start_workers(layouts)
        except BaseException:                         # Ctrl-C included: nothing is left behind
            self.close()
            raise

    def _start_workers(self, layouts) -> None:
        """Start processes-1 workers and wait until each has its copy of the model.

        Each starts with SIGINT and SIGTERM blocked (a child inherits the signal mask),
        so that Ctrl-C to the process group cannot kill it halfway through Python's
        start-up. The model goes through the pipe after the start, not as an argument
        of the process: the start writes its arguments to a pipe the parent still
        reads from, and waits forever there if the child dies before reading them
        all (the few kilobytes of the start fit in the pipe's buffer; a model may not)."""
        context = multiprocessing.get_context("spawn")   # no fork of a process with threads
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for _ in range(self.processes - 1):
                grads = _SharedArrays(layouts)
                ours, theirs = context.Pipe()
                process = context.Process(target=_worker, daemon=True, name="minicnn-replica",
                                          args=(theirs, self._params.spec, grads.spec))
                self._workers.append({"process": process, "connection": ours, "grads": grads,
                                      "inputs": None})
                try:
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
            param = module.params[key]
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
        try:
            with parallel.in_calling_thread():
                head = slice(0, bounds[1])
                loss, logits_head = forward_backward(self.model, self.criterion, x[head],
                                                     labels[head], bounds[1] / n)
        finally:
            replies = [_reply(worker) for worker, _ in busy]
        failed = [reply for reply in replies if reply[0] in ("error", "dead")]
        if failed:
            raise ReplicaError(_why(failed[0], "a replica's step failed"))
        logits = [logits_head]
        for (worker, _), (_, part_loss, part_logits) in zip(busy, replies):
            loss = loss + part_loss                       # scaled by its share already
            for (module, key), grad in zip(self._slots, worker["grads"].arrays):
                module.grads[key] = module.grads[key] + grad
            logits.append(part_logits)
        return np.asarray(loss, dtype=logits_head.dtype), np.concatenate(logits)

    def close(self) -> None:
        """Stop the workers and free the shared memory (the model keeps its parameters,
        copied back into ordinary arrays)."""
        self._finalizer()
        _OPEN.discard(self._finalizer)

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _why(reply, failed: str) -> str:
    """One line for a failed reply: why the process is gone, or ``failed`` and the last
    line of the worker's traceback (the exception)."""
    kind, text = reply[0], str(reply[1])
    if kind == "dead":
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{failed}: {lines[-1] if lines else 'unknown error'}"


def _shut_down(model, params: _SharedArrays, workers: list) -> None:
    """Replicas.close(): stop the workers, give the model ordinary arrays again, free the
    shared memory. Runs once (weakref.finalize)."""
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
    for (module, key), view in zip(_slots(model), params.arrays):
        if module.params[key] is view:
            module.params[key] = view.copy()
    params.close()
