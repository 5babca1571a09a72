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
step. After every epoch the resume point and then the weights are written
(minicnn.resume: the files of a run); Ctrl-C or SIGTERM saves the resume point
mid-epoch, and ``resume=True`` continues exactly where it stopped (each
epoch's randomness is drawn from its own seed). A loss that is not finite
stops training at once (checked every step on NumPy, at every progress read
on the GPU), before anything is saved.
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
from minicnn.checkpoint import CheckpointError, load_parameters, model_header, save_model
from minicnn.errors import MinicnnError
from minicnn.files import display, remove_stray_temp_files, sha256
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.errors import ReplicaError
from minicnn.models import MODELS, check_config
from minicnn.optim import SCHEDULES, SGD, make_schedule, norm_and_bias_names
from minicnn.resume import (ResumePoint, check_published, new_run_id, read_resume_point,
                            resume_path, run_files, write_resume_point)
from minicnn.validation import Record

PROGRESS_EVERY = 20   # steps between reads of the running loss (one host sync each)
MAX_CROP_PADDING = 16  # half the image: larger paddings give crops of mostly zeros


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
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """A config from a JSON object (a resume point's), every field checked for type
        and range (MinicnnError naming ``source`` and the field)."""
        r = Record(values, source)
        config = cls(
            model=r.string("model", choices=sorted(MODELS)), epochs=r.integer("epochs", 1),
            batch_size=r.integer("batch_size", 1), lr=r.number("lr", 0),
            momentum=r.number("momentum", 0), nesterov=r.boolean("nesterov"),
            weight_decay=r.number("weight_decay", 0),
            schedule=r.string("schedule", choices=SCHEDULES), warmup=r.number("warmup", 0, 1),
            label_smoothing=r.number("label_smoothing", 0, 1),
            decay_norm_and_bias=r.boolean("decay_norm_and_bias"), augment=r.boolean("augment"),
            crop_padding=r.integer("crop_padding", 0, MAX_CROP_PADDING), tta=r.boolean("tta"),
            width=r.integer("width", 1, none_ok=True), seed=r.integer("seed", 0),
            limit=r.integer("limit", 1, none_ok=True))
        if config.nesterov and config.momentum == 0:
            raise MinicnnError(f"{source}: Nesterov momentum needs momentum > 0 (--nesterov "
                               "needs --momentum)")
        check_config(config.model, config.model_config())
        return config

    def checked(self) -> TrainConfig:
        """This config after the checks of :meth:`from_dict`."""
        return TrainConfig.from_dict(asdict(self))


class TrainingInterrupted(MinicnnError):
    """Training was stopped with Ctrl-C or SIGTERM; the state was saved for --resume."""


class TrainingDiverged(MinicnnError):
    """The loss, the outputs or the weights became NaN or infinite; nothing was saved
    after the last step that was finite."""


class NonFiniteOutputs(MinicnnError):
    """The model's outputs are NaN or infinite (its weights overflow)."""


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
        if not bool(xp.isfinite(logits).all()):
            raise NonFiniteOutputs("the model's outputs are NaN or infinite (its weights are "
                                   "too large for float32, or not those of a trained model)")
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
    """Ctrl-C (SIGINT) or SIGTERM during training sets ``requested`` instead of raising at
    once, so the loop stops between two steps, never halfway through a parameter update.
    A second one raises KeyboardInterrupt immediately (files are still only ever
    written atomically)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


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
    (:func:`training_step`).

    Raises TrainingDiverged for a loss that is not finite (before that step's update;
    on the GPU it is read every PROGRESS_EVERY steps), and ReplicaError with the
    attribute ``step`` (the steps finished) if a worker process fails."""
    xp = backend.xp
    totals = EpochTotals(xp.zeros((), dtype=xp.float64), xp.zeros((), dtype=xp.int64))
    batches = data.batch_slices(len(labels), config.batch_size)[first_step:]
    started = time.perf_counter()
    step = first_step
    loss_on_host = backend.name() == "numpy"
    with tqdm(batches, **bar_settings) as bar:
        for start, stop_index in bar:
            index = plan.order[start:stop_index]
            x = _augmented_batch(images, plan, index, config)
            t = labels[index]
            try:
                loss, logits = step_fn(x, t)
            except ReplicaError as error:
                error.step = step
                raise
            if (loss_on_host or step % PROGRESS_EVERY == 0) and not math.isfinite(float(loss)):
                raise TrainingDiverged(f"the loss became {float(loss)} at epoch {epoch + 1}, "
                                       f"step {step + 1}")
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
    """Train ``model`` (built from config.model); after every epoch write its resume point
    and its weights to ``out`` (minicnn.resume describes the two files).

    Returns the final metadata (history, test accuracy, timing); an empty dict
    if a resumed run had nothing left to do. Raises TrainingInterrupted after
    saving when stopped with Ctrl-C or SIGTERM, TrainingDiverged (nothing saved
    after the last finite step) when the loss or the weights stop being finite.
    """
    config = config.checked()
    out = Path(out)
    model_header(model)         # a model that cannot be saved fails now, not after an epoch
    resume_file = resume_path(out)
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
    for path in run_files(out):
        remove_stray_temp_files(path)          # left by a process killed while it saved

    if resume:
        point = _restore(model, optimizer, config, out, n, steps_per_epoch, log)
        log(f"resuming {display(out)} at epoch {point.epoch + 1}, step {point.step}")
    else:
        point = ResumePoint(run_id=new_run_id(), weights_file=out.name, epoch=0, step=0,
                            elapsed=0.0, config=asdict(config), train_images=n, history=[],
                            replaces=sha256(out) if out.is_file() else None)
    saved_any = resume                         # is there a resume point of this run on disk?
    history = point.history
    start_epoch, start_step = point.epoch, point.step

    images, labels = backend.to_device(train.images), backend.to_device(train.labels)
    model.train()

    def moment(epoch: int, step: int) -> str:
        """Words for "after ``epoch`` complete epochs and ``step`` more steps"."""
        return f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"

    def diverged(what: str) -> TrainingDiverged:
        kept = (f"the last checkpoint ({display(resume_file)}, from "
                f"{moment(point.epoch, point.step)}) is unchanged" if saved_any
                else "nothing was saved")
        return TrainingDiverged(f"training diverged: {what}; {kept}; try a lower --lr "
                                f"(this run: {config.lr:g})")

    def save(epoch: int, step: int, published: dict | None = None) -> None:
        """The resume point after ``epoch`` complete epochs and ``step`` more steps, then
        at an epoch's end (``published``: its metadata) the weights file."""
        nonlocal saved_any
        when = moment(epoch, step)
        for name, holder, key in [*model.named_arrays(),
                                  *((name, optimizer.velocity, name) for name in
                                    optimizer.velocity)]:
            if not bool(backend.array_module(holder[key]).isfinite(holder[key]).all()):
                raise diverged(f"{name} became NaN or infinite by {when}")
        point.epoch, point.step, point.elapsed = epoch, step, elapsed
        point.model, point.velocity = model.state_dict(), optimizer.state_dict()
        if published is not None:
            point.published = published
        try:
            write_resume_point(resume_file, point)
            saved_any = True
            if published is not None:
                save_model(model, out, **published)
        except OSError as exc:
            raise CheckpointError(f"cannot save the checkpoint at {when} ("
                                  f"{exc.strerror or exc}); what is on disk is the last "
                                  "checkpoint that was saved") from None

    elapsed = point.elapsed
    metadata = {}
    with StopRequest() as stop, input_gradients_off(model), \
            training_step(model, criterion) as step_fn:
        if stop.requested:                     # during start-up: nothing new to save
            raise TrainingInterrupted("interrupted before the first step; "
                                      + ("the resume point is unchanged" if resume
                                         else "nothing was written"))
        for epoch in range(start_epoch, config.epochs):
            plan = data.plan_epoch(n, config.seed, epoch, crop_padding=config.crop_padding)
            first = start_step if epoch == start_epoch else 0
            bar_settings = {"desc": f"epoch {epoch + 1}/{config.epochs}", "unit": "batch",
                            "leave": False, "disable": not progress, "dynamic_ncols": True}
            epoch_start = time.perf_counter()
            try:
                totals, step = train_epoch(step_fn, optimizer, schedule, images, labels,
                                           plan, config, epoch, first, steps_per_epoch,
                                           bar_settings, stop)
            except TrainingDiverged as exc:
                raise diverged(str(exc)) from None
            except ReplicaError as exc:        # the state of the last finished step is intact
                elapsed += time.perf_counter() - epoch_start
                save(epoch, exc.step)
                raise MinicnnError(f"{exc}; saved the resume point after step {exc.step} of "
                                   f"epoch {epoch + 1}: run again with --resume to "
                                   "continue") from None
            train_seconds = time.perf_counter() - epoch_start
            elapsed += train_seconds
            if step < steps_per_epoch:          # stopped by a signal between two steps
                save(epoch, step)
                raise TrainingInterrupted(
                    f"interrupted in epoch {epoch + 1} after {step} steps; saved the resume "
                    f"point {display(resume_file)} ({display(out)} keeps the last complete "
                    "epoch); run again with --resume to continue")
            try:
                result = evaluate(model, test, normalization)
            except NonFiniteOutputs as exc:
                raise diverged(f"{exc} after epoch {epoch + 1}") from None
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
            if not math.isfinite(h["train_loss"]):     # on the GPU a NaN between two reads
                raise diverged(f"the loss became {h['train_loss']} in epoch {epoch + 1}")
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
            metadata = {
                "class_names": list(train.class_names),
                "normalization": normalization,
                "training": {"config": asdict(config), "epochs_completed": epoch + 1,
                             "backend": backend.name(), "train_seconds": round(elapsed, 1),
                             "train_images": n, "run_id": point.run_id,
                             "history": [dict(entry) for entry in history]},
                "test_accuracy": h["test_accuracy"],
                **metrics,
            }
            save(epoch + 1, 0, metadata)
            if stop.requested and epoch + 1 < config.epochs:
                raise TrainingInterrupted(
                    f"interrupted after epoch {epoch + 1}; saved {display(out)}; "
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


def _restore(model, optimizer: SGD, config: TrainConfig, out: Path, n: int,
             steps_per_epoch: int, log) -> ResumePoint:
    """Load the resume point of ``out`` into the model and optimizer, after checking that
    it belongs to this run (minicnn.resume); write the weights file again if it lags."""
    path = resume_path(out)
    name = display(path)
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {name} does not exist")
    point = read_resume_point(path, model, out, steps_per_epoch)
    saved = TrainConfig.from_dict(point.config, f"{name} (field config)")
    if saved != config:
        differ = ", ".join(f"{f.name} {getattr(config, f.name)!r} (saved "
                           f"{getattr(saved, f.name)!r})" for f in fields(TrainConfig)
                           if getattr(config, f.name) != getattr(saved, f.name))
        raise CheckpointError(f"{name}: the run was saved with other options: {differ}")
    if point.train_images != n:
        raise CheckpointError(f"{name}: the run trained on {point.train_images:,} images, this "
                              f"data set has {n:,}")
    expected = ({param for param, _, _ in model.named_parameters()}
                if config.momentum and (point.epoch or point.step) else set())
    if set(point.velocity) != expected:
        raise CheckpointError(f"{name}: the optimizer's velocity is incomplete (missing "
                              f"{sorted(expected - set(point.velocity))})")
    load_parameters(model, point.model, source=name)
    optimizer.load_state_dict({k: backend.to_device(v) for k, v in point.velocity.items()})
    if check_published(out, point):
        save_model(model, out, **point.published)
        log(f"wrote {display(out)} again from its resume point (epoch {point.epoch})")
    return point
