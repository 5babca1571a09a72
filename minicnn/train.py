"""fit() and evaluate(): the training loop, metrics, progress and checkpoints.

One training step, with data flowing one way::

    x, t   = a shuffled, augmented, normalized batch
    logits = model.forward(x)
    loss   = criterion.forward(logits, t)
    model.backward(criterion.backward())      # fills every layer's grads
    optimizer.step()                          # p -= lr * (momentum-adjusted) grad

The first three lines are :func:`forward_backward`. On the fast kernels, on a
CPU with several cores, they run split over processes instead, each with a copy
of the model, and the grads summed (minicnn.fast.replicas: the same grads, up
to rounding); models with BatchNorm, the GPU and the reference kernels keep the
plain step. MINICNN_PROCESSES=1 turns it off.

Loss and accuracy are summed on the backend's arrays and read back to the
host only when the progress bar is refreshed, so a GPU is not stalled every
step. After every epoch the model and the training state are written
atomically; Ctrl-C saves the state mid-epoch, and ``resume=True`` continues
exactly where it stopped (each epoch's randomness is drawn from its own seed).
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tqdm import tqdm

from minicnn import backend, data, kernels
from minicnn.checkpoint import (CheckpointError, load_parameters, model_header, read_npz,
                                 save_model, write_json_atomic, write_npz_atomic)
from minicnn.errors import MinicnnError
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.optim import SGD, make_schedule, norm_and_bias_names

PROGRESS_EVERY = 20   # steps between reads of the running loss (one host sync each)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with its checkpoints."""
    model: str = "lenet"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.3           # fraction of the steps spent warming up (onecycle, linear)
    label_smoothing: float = 0.0
    decay_norm_and_bias: bool = True   # False: weight decay skips biases and BatchNorm
    augment: bool = True          # random horizontal flips
    crop_padding: int = 0         # random crops after padding by this much (0: off)
    tta: bool = False             # also test with flipped images (averaged logits) at the end
    width: int | None = None      # the model's width option, for models that have one
    seed: int = 0
    limit: int | None = None      # use only the first N training images

    def model_config(self) -> dict:
        """Keyword arguments for build_model(self.model, ...)."""
        return {} if self.width is None else {"width": self.width}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class TrainingInterrupted(MinicnnError):
    """Training was stopped with Ctrl-C; the state was saved for --resume."""


def state_path(weights_path: Path) -> Path:
    """Where the optimizer state for --resume lives, beside the weights."""
    return weights_path.with_name(weights_path.stem + ".state.npz")


def history_path(weights_path: Path) -> Path:
    return weights_path.with_name(weights_path.stem + ".history.json")


# --- evaluation --------------------------------------------------------------------

def predict_logits(model, images_uint8, normalization: dict, batch_size: int = 1000,
                   tta: bool = False):
    """Logits (N, K) on the backend for uint8 images (N, 3, H, W) on the backend.

    tta (test-time augmentation): the mean of the logits of each image and of
    its mirror image, two forward passes.
    """
    xp = backend.xp
    model.eval()
    outputs = []
    for start, stop in data.batch_slices(len(images_uint8), batch_size):
        x = data.normalize(images_uint8[start:stop], normalization["mean"], normalization["std"])
        logits = model.forward(x)
        if tta:
            logits += model.forward(xp.ascontiguousarray(x[..., ::-1]))
            logits *= 0.5
        outputs.append(logits)
    return xp.concatenate(outputs) if outputs else xp.zeros((0, 0), dtype=xp.float32)


def evaluate(model, dataset: data.Dataset, normalization: dict, batch_size: int = 1000,
             tta: bool = False) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true, columns: predicted)."""
    xp = backend.xp
    k = len(dataset.class_names)
    images = backend.to_device(dataset.images)
    labels = backend.to_device(dataset.labels)
    logits = predict_logits(model, images, normalization, batch_size, tta)
    if len(logits) and logits.shape[1:] != (k,):
        raise MinicnnError(f"the model's output has shape {tuple(logits.shape[1:])}, but the "
                           f"data set has {k} classes")
    predicted = logits.argmax(axis=1)
    confusion = backend.to_host(xp.bincount(labels * k + predicted, minlength=k * k)).reshape(k, k)
    totals = confusion.sum(axis=1)
    n = int(totals.sum())
    return {
        "accuracy": float(confusion.trace() / max(n, 1)),
        "per_class": {name: float(confusion[i, i] / totals[i]) if totals[i] else None
                      for i, name in enumerate(dataset.class_names)},
        "confusion": confusion.tolist(),
        "class_names": list(dataset.class_names),
        "n": n,
        "tta": tta,
    }


# --- training ------------------------------------------------------------------------

def _augmented_batch(images, plan: data.EpochPlan, index, config: TrainConfig):
    x = images[index]
    if config.augment:
        x = data.random_flip(x, plan.flip[index])
    if config.crop_padding:
        x = data.random_crop(x, plan.offsets[index], config.crop_padding)
    return data.normalize(x)


class StopRequest:
    """Ctrl-C during training sets ``requested`` instead of raising at once, so the
    loop stops between two steps, never halfway through a parameter update.
    A second Ctrl-C raises KeyboardInterrupt immediately (files are still only
    ever written atomically)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def forward_backward(model, criterion, x, labels, share: float = 1.0):
    """The plain training step without the update: forward, loss and backward of
    ``model`` on (x, labels); returns (loss, logits) and leaves dL/dθ in the grads.
    ``share`` scales the loss and its gradient (a part's n_k / N of a batch split
    over processes, minicnn.fast.replicas)."""
    logits = model.forward(x)
    loss = criterion.forward(logits, labels)
    gradient = criterion.backward()
    if share != 1.0:
        loss, gradient = loss * share, gradient * share
    model.backward(gradient)
    return loss, logits


@contextlib.contextmanager
def input_gradients_off(model):
    """While training, nothing needs the gradient of the images: the first layer
    skips it. Callers get the model back with input gradients on."""
    model.set_needs_input_grad(False)
    try:
        yield model
    finally:
        model.set_needs_input_grad(True)


@dataclass
class EpochTotals:
    """Running sums of one epoch, kept on the backend (no host sync per step)."""
    loss_sum: object
    correct: object
    seen: int = 0


def train_epoch(step_fn, optimizer, schedule, images, labels, plan, config,
                epoch: int, first_step: int, steps_per_epoch: int, bar_settings: dict,
                stop: StopRequest) -> tuple[EpochTotals, int]:
    """Run the steps of one epoch from ``first_step``; return the totals and the
    number of steps done in this epoch (fewer than steps_per_epoch if stopped).
    ``step_fn(x, labels) -> (loss, logits)``: forward, loss and backward
    (:func:`training_step`)."""
    xp = backend.xp
    totals = EpochTotals(xp.zeros((), dtype=xp.float64), xp.zeros((), dtype=xp.int64))
    batches = data.batch_slices(len(labels), config.batch_size)[first_step:]
    started = time.perf_counter()
    step = first_step
    with tqdm(batches, **bar_settings) as bar:
        for start, stop_index in bar:
            index = plan.order[start:stop_index]
            x = _augmented_batch(images, plan, index, config)
            t = labels[index]
            loss, logits = step_fn(x, t)
            optimizer.lr = schedule(epoch * steps_per_epoch + step)
            optimizer.step()
            totals.loss_sum += loss * (stop_index - start)
            totals.correct += (logits.argmax(axis=1) == t).sum()
            totals.seen += stop_index - start
            step += 1
            if stop.requested:
                break
            if step % PROGRESS_EVERY == 0:
                rate = totals.seen / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{float(totals.loss_sum) / totals.seen:.3f}",
                                img_s=f"{rate:.0f}")
    return totals, step


def fit(model, train: data.Dataset, test: data.Dataset, config: TrainConfig, out: Path, *,
        resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train ``model`` (built from config.model) and save it to ``out`` after every epoch.

    Returns the final metadata (history, test accuracy, timing); an empty dict
    if a resumed run had nothing left to do. Raises TrainingInterrupted after
    saving when stopped with Ctrl-C.
    """
    out = Path(out)
    model_header(model)         # a model that cannot be saved fails now, not after an epoch
    train = train.subset(config.limit)
    n = len(train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    schedule = make_schedule(config.schedule, config.lr, config.epochs * steps_per_epoch,
                             warmup_fraction=config.warmup)
    skip_decay = () if config.decay_norm_and_bias else norm_and_bias_names(model)
    optimizer = SGD(model, config.lr, config.momentum, config.nesterov, config.weight_decay,
                    skip_decay)
    criterion = SoftmaxCrossEntropy(config.label_smoothing)
    normalization = {"mean": list(data.CIFAR10_MEAN), "std": list(data.CIFAR10_STD)}

    start_epoch, start_step, history, elapsed = 0, 0, [], 0.0
    if resume:
        start_epoch, start_step, history, elapsed = _restore(model, optimizer, out)
        log(f"resuming {out} at epoch {start_epoch + 1}, step {start_step}")

    images, labels = backend.to_device(train.images), backend.to_device(train.labels)
    model.train()

    def save(epoch: int, step: int, metrics: dict | None = None) -> dict:
        metadata = {
            "class_names": list(train.class_names),
            "normalization": normalization,
            "training": {"config": asdict(config), "epochs_completed": epoch,
                         "backend": backend.name(), "train_seconds": round(elapsed, 1),
                         "train_images": n},
            "test_accuracy": history[-1]["test_accuracy"] if history else None,
            **(metrics or {}),
        }
        save_model(model, out, **metadata)
        state = {f"velocity/{k}": v for k, v in optimizer.state_dict().items()}
        write_npz_atomic(state_path(out), state, {"epoch": epoch, "step": step,
                                                  "history": history, "elapsed": elapsed,
                                                  "config": asdict(config)})
        write_json_atomic(history_path(out), {"config": asdict(config), "history": history})
        return metadata

    metadata = {}
    with StopRequest() as stop, input_gradients_off(model), \
            training_step(model, criterion) as step_fn:
        for epoch in range(start_epoch, config.epochs):
            plan = data.plan_epoch(n, config.seed, epoch, crop_padding=config.crop_padding)
            first = start_step if epoch == start_epoch else 0
            bar_settings = {"desc": f"epoch {epoch + 1}/{config.epochs}", "unit": "batch",
                            "leave": False, "disable": not progress, "dynamic_ncols": True}
            epoch_start = time.perf_counter()
            totals, step = train_epoch(step_fn, optimizer, schedule, images, labels,
                                       plan, config, epoch, first, steps_per_epoch,
                                       bar_settings, stop)
            train_seconds = time.perf_counter() - epoch_start
            elapsed += train_seconds
            if step < steps_per_epoch:          # stopped by Ctrl-C between two steps
                save(epoch, step)
                raise TrainingInterrupted(
                    f"interrupted in epoch {epoch + 1} after {step} steps; saved {out}; "
                    "run again with --resume to continue")
            result = evaluate(model, test, normalization)
            model.train()
            seen = totals.seen
            history.append({
                "epoch": epoch + 1,
                "train_loss": float(totals.loss_sum) / max(seen, 1),
                "train_accuracy": float(totals.correct) / max(seen, 1),
                "test_accuracy": result["accuracy"],
                "lr": optimizer.lr,
                "seconds": round(train_seconds, 2),
                "images_per_second": round(seen / train_seconds, 1),
            })
            h = history[-1]
            metrics = {"test_per_class": result["per_class"], "tta": False}
            if config.tta and epoch + 1 == config.epochs:
                flipped = evaluate(model, test, normalization, tta=True)
                model.train()
                h["test_accuracy_tta"] = flipped["accuracy"]
                metrics = {"test_per_class": flipped["per_class"], "tta": True,
                           "test_accuracy": flipped["accuracy"],
                           "test_accuracy_plain": result["accuracy"]}
            log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {h['train_loss']:.4f}  "
                f"train acc {h['train_accuracy']:.2%}  test acc {h['test_accuracy']:.2%}"
                + (f" (with flips {h['test_accuracy_tta']:.2%})" if "test_accuracy_tta" in h
                   else "")
                + f"  {train_seconds:.1f}s ({h['images_per_second']:.0f} img/s)")
            metadata = save(epoch + 1, 0, metrics)
            if stop.requested and epoch + 1 < config.epochs:
                raise TrainingInterrupted(
                    f"interrupted after epoch {epoch + 1}; saved {out}; "
                    "run again with --resume to continue")
    return metadata


@contextlib.contextmanager
def training_step(model, criterion):
    """A function (x, labels) -> (loss, logits) that runs forward, loss and backward:
    the batch split over processes by the replicas of the fast kernels
    (minicnn.fast.replicas) where they help, else :func:`forward_backward`. Replicas
    are not used on the reference kernels, where there is one CPU or
    MINICNN_PROCESSES=1, on the GPU, or for a model with batch statistics."""
    if kernels.of(model) == "fast":
        from minicnn.fast.replicas import Replicas, default_processes   # imports this module
        if default_processes(model) > 1:
            with Replicas(model, criterion) as replicas:
                yield replicas.forward_backward
            return
    yield functools.partial(forward_backward, model, criterion)


def _restore(model, optimizer: SGD, out: Path):
    """Load the weights and optimizer state saved by fit(); return where to continue."""
    path = state_path(out)
    if not out.is_file() or not path.is_file():
        raise CheckpointError(f"nothing to resume: {out} or {path} is missing")
    weights, _ = read_npz(out)
    velocity, state = read_npz(path)
    load_parameters(model, weights, source=str(out))
    optimizer.load_state_dict({k.removeprefix("velocity/"): backend.to_device(v)
                               for k, v in velocity.items()})
    return state["epoch"], state["step"], state["history"], state["elapsed"]
