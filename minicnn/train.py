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

from minicnn import augment, backend, data, holdout, kernels
from minicnn.averaging import Lookahead
from minicnn.checkpoint import CheckpointError, load_parameters, model_header, save_model
from minicnn.errors import MinicnnError, ReplicaError
from minicnn.files import display, remove_stray_temp_files, sha256
from minicnn.layers.whitening import whitening_layers
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.models import MODELS, check_config
from minicnn.optim import (SCHEDULES, SGD, ParamGroup, batchnorm_names, make_schedule,
                           norm_and_bias_names)
from minicnn.resume import (ResumePoint, check_published, new_run_id, read_resume_point,
                            resume_path, run_files, write_resume_point)
from minicnn.validation import Record

PROGRESS_EVERY = 20   # steps between reads of the running loss (one host sync each)
MAX_CROP_PADDING = 16  # half the image: larger paddings give crops of mostly zeros
WHITENING_IMAGES = 5000   # training images the whitening stem's filters are computed from


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
    tta: str = "none"             # also test with TTA at the end: augment.TTA_MODES
    width: int | None = None      # the model's width option, for models that have one
    seed: int = 0
    limit: int | None = None      # use only the first N training images
    # The model's other options, for models that have them (None: the model's default)
    widths: list | None = None    # airnet: the three blocks' widths
    stem: str | None = None       # airnet: "conv" or "whiten" (patch whitening)
    dirac: bool | None = None     # airnet: identity init of the blocks' convs
    bn_momentum: float | None = None
    bn_eps: float | None = None
    # airbench's recipe (docs/accuracy.md); the defaults leave each piece off
    flip_rule: str = "random"     # with augment: "random" or "alternating" (augment.py)
    crop_mode: str = "zeros"      # how crops pad: "zeros" or "reflect"
    lr_start_factor: float | None = None  # linear schedule: lr * this at step 0 (None: 1/25)
    lr_end_factor: float = 0.0    # linear schedule: lr * this at the end
    norm_lr_scale: float = 1.0    # BatchNorm parameters' lr times this, their decay / this
    whiten_bias_epochs: int | None = None  # the whitening stem's bias trains this many epochs
    lookahead: bool = False       # lookahead averaging of the weights (averaging.py)
    lookahead_every: int = 5      # steps between its pulls
    lookahead_start_epoch: int = 3  # the epoch (from 0) it starts in
    holdout: int = 0              # hold out N training images and evaluate on them, not test
    holdout_seed: int = 0         # the hold-out split's own seed (holdout.py)
    eval_each_epoch: bool = True  # False: evaluate after the last epoch only
    keep_epoch_weights: bool = False  # also keep each epoch's weights (NAME.epochNNN.npz)

    MODEL_OPTIONS = ("width", "widths", "stem", "dirac", "bn_momentum", "bn_eps")

    def __post_init__(self):
        self.tta = augment.tta_mode(self.tta)       # True/False in runs saved before the modes

    def model_config(self) -> dict:
        """Keyword arguments for build_model(self.model, ...): the model options set."""
        return {name: getattr(self, name) for name in self.MODEL_OPTIONS
                if getattr(self, name) is not None}

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
            crop_padding=r.integer("crop_padding", 0, MAX_CROP_PADDING),
            tta=r.field("tta", lambda v: isinstance(v, bool) or v in augment.TTA_MODES,
                        "true, false or one of " + ", ".join(augment.TTA_MODES)),
            width=r.integer("width", 1, none_ok=True), seed=r.integer("seed", 0),
            limit=r.integer("limit", 1, none_ok=True),
            # the options added with airbench's recipe: absent in runs saved before them
            widths=r.field("widths", lambda v: isinstance(v, list), "a list",
                           default=None, none_ok=True),
            stem=r.string("stem", default=None, none_ok=True),
            dirac=r.boolean("dirac", default=None, none_ok=True),
            bn_momentum=r.number("bn_momentum", 0, 1, default=None, none_ok=True),
            bn_eps=r.number("bn_eps", 0, 1, default=None, none_ok=True),
            flip_rule=r.string("flip_rule", choices=augment.FLIP_RULES, default="random"),
            crop_mode=r.string("crop_mode", choices=data.PAD_MODES, default="zeros"),
            lr_start_factor=r.number("lr_start_factor", 0, default=None, none_ok=True),
            lr_end_factor=r.number("lr_end_factor", 0, default=0.0),
            norm_lr_scale=r.number("norm_lr_scale", 0, default=1.0),
            whiten_bias_epochs=r.integer("whiten_bias_epochs", 0, default=None, none_ok=True),
            lookahead=r.boolean("lookahead", default=False),
            lookahead_every=r.integer("lookahead_every", 1, default=5),
            lookahead_start_epoch=r.integer("lookahead_start_epoch", 0, default=3),
            holdout=r.integer("holdout", 0, default=0),
            holdout_seed=r.integer("holdout_seed", 0, default=0),
            eval_each_epoch=r.boolean("eval_each_epoch", default=True),
            keep_epoch_weights=r.boolean("keep_epoch_weights", default=False))
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
                   tta="none"):
    """Logits (N, K) on the backend for uint8 images (N, 3, H, W) on the backend.

    tta (test-time augmentation, minicnn.augment): "none"; "flip" (or True), the
    mean of the logits of each image and of its mirror image, two forward passes;
    "flip-translate", airbench's six views with 1-pixel translations.
    """
    xp = backend.xp
    model.eval()
    outputs = []
    for start, stop in data.batch_slices(len(images_uint8), batch_size):
        x = data.normalize(images_uint8[start:stop], normalization["mean"], normalization["std"])
        logits = augment.tta_logits(model, x, tta)
        if not bool(xp.isfinite(logits).all()):
            raise NonFiniteOutputs("the model's outputs are NaN or infinite (its weights are "
                                   "too large for float32, or not those of a trained model)")
        outputs.append(logits)
    return xp.concatenate(outputs) if outputs else xp.zeros((0, 0), dtype=xp.float32)


def evaluate(model, dataset: data.Dataset, normalization: dict, batch_size: int = 1000,
             tta="none") -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true, columns: predicted);
    "tta": the test-time augmentation used (predict_logits)."""
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
        "tta": augment.tta_mode(tta),
    }


# --- training ------------------------------------------------------------------------

def _augmented_batch(images, plan: data.EpochPlan, index, config: TrainConfig):
    x = images[index]
    if config.augment:
        x = data.random_flip(x, plan.flip[index])
    if config.crop_padding:
        x = data.random_crop(x, plan.offsets[index], config.crop_padding, config.crop_mode)
    return data.normalize(x)


def _plan_epoch(n: int, config: TrainConfig, epoch: int) -> data.EpochPlan:
    plan = data.plan_epoch(n, config.seed, epoch, crop_padding=config.crop_padding)
    if config.flip_rule == "alternating":
        plan.flip = augment.alternating_flips(n, config.seed, epoch)
    return plan


def make_optimizer(model, config: TrainConfig) -> SGD:
    """SGD as the config says: decay skipped for biases and BatchNorm unless
    decay_norm_and_bias, and BatchNorm's parameters in a group of their own when
    norm_lr_scale is set (lr times it, weight decay divided by it: the same
    shrinkage lr * wd per step as the others, as airbench)."""
    skip_decay = () if config.decay_norm_and_bias else norm_and_bias_names(model)
    groups = []
    if config.norm_lr_scale != 1.0:
        groups.append(ParamGroup(frozenset(batchnorm_names(model)), config.norm_lr_scale,
                                 config.weight_decay / config.norm_lr_scale))
    return SGD(model, config.lr, config.momentum, config.nesterov, config.weight_decay,
               skip_decay, groups)


def _freeze_whitening_biases(model, config: TrainConfig, epoch: int) -> bool:
    """From epoch whiten_bias_epochs on, the whitening stem's bias stops training; the
    layers after it then need no input gradient either (set_needs_input_grad). Returns
    whether it froze one now (the model's parameters changed)."""
    layers = whitening_layers(model)
    if config.whiten_bias_epochs is None or epoch < config.whiten_bias_epochs or not any(
            layer.bias_trainable for layer in layers):
        return False
    for layer in layers:
        layer.freeze_bias()
    model.set_needs_input_grad(False)
    return True


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
                stop: StopRequest, lookahead: Lookahead | None = None
                ) -> tuple[EpochTotals, int]:
    """Run the steps of one epoch from ``first_step``; return the totals and the
    number of steps done in this epoch (fewer than steps_per_epoch if stopped).
    ``step_fn(x, labels) -> (loss, logits)``: forward, loss and backward
    (:func:`training_step`); ``lookahead`` follows every step.

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
            if lookahead is not None:
                lookahead.after_step(optimizer.model, epoch, epoch * steps_per_epoch + step + 1)
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
    With config.holdout, ``test`` is not used: the held-out training images
    (minicnn.holdout) are evaluated instead, and the results are named
    "holdout_..." instead of "test_...".
    """
    config = config.checked()
    out = Path(out)
    model_header(model)         # a model that cannot be saved fails now, not after an epoch
    resume_file = resume_path(out)
    evaluated_on = "test"
    if config.holdout:
        train, test = holdout.split(train, config.holdout, config.holdout_seed)
        evaluated_on = "holdout"
    accuracy_key = f"{evaluated_on}_accuracy"
    train = train.subset(config.limit)
    n = len(train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    schedule = make_schedule(config.schedule, config.lr, total_steps,
                             warmup_fraction=config.warmup, start_factor=config.lr_start_factor,
                             end_factor=config.lr_end_factor)
    optimizer = make_optimizer(model, config)
    lookahead = (Lookahead(total_steps, config.lookahead_start_epoch, config.lookahead_every)
                 if config.lookahead else None)
    criterion = SoftmaxCrossEntropy(config.label_smoothing)
    normalization = {"mean": list(data.CIFAR10_MEAN), "std": list(data.CIFAR10_STD)}
    for path in run_files(out):
        remove_stray_temp_files(path)          # left by a process killed while it saved

    whitening_seconds = 0.0
    if resume:
        point = _restore(model, optimizer, lookahead, config, out, n, steps_per_epoch, log)
        log(f"resuming {display(out)} at epoch {point.epoch + 1}, step {point.step}")
    else:
        point = ResumePoint(run_id=new_run_id(), weights_file=out.name, epoch=0, step=0,
                            elapsed=0.0, config=asdict(config), train_images=n, history=[],
                            replaces=sha256(out) if out.is_file() else None)
        if whitening_layers(model):
            whitening_seconds = _fit_whitening(model, train, log)
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
        point.lookahead = lookahead.state_dict() if lookahead is not None else {}
        if published is not None:
            point.published = published
        try:
            write_resume_point(resume_file, point)
            saved_any = True
            if published is not None:
                save_model(model, out, **published)
                if config.keep_epoch_weights:
                    save_model(model, epoch_weights_path(out, epoch), **published)
        except OSError as exc:
            raise CheckpointError(f"cannot save the checkpoint at {when} ("
                                  f"{exc.strerror or exc}); what is on disk is the last "
                                  "checkpoint that was saved") from None

    elapsed = point.elapsed + whitening_seconds
    metadata = {}
    with StopRequest() as stop, input_gradients_off(model), contextlib.ExitStack() as steps:
        step_fn = steps.enter_context(training_step(model, criterion))
        if stop.requested:                     # during start-up: nothing new to save
            raise TrainingInterrupted("interrupted before the first step; "
                                      + ("the resume point is unchanged" if resume
                                         else "nothing was written"))
        for epoch in range(start_epoch, config.epochs):
            if _freeze_whitening_biases(model, config, epoch):
                steps.close()                  # replicas hold the parameters as they were
                step_fn = steps.enter_context(training_step(model, criterion))
            plan = _plan_epoch(n, config, epoch)
            first = start_step if epoch == start_epoch else 0
            bar_settings = {"desc": f"epoch {epoch + 1}/{config.epochs}", "unit": "batch",
                            "leave": False, "disable": not progress, "dynamic_ncols": True}
            epoch_start = time.perf_counter()
            try:
                totals, step = train_epoch(step_fn, optimizer, schedule, images, labels,
                                           plan, config, epoch, first, steps_per_epoch,
                                           bar_settings, stop, lookahead)
            except TrainingDiverged as exc:
                raise diverged(str(exc)) from None
            except ReplicaError as exc:        # the state of the last finished step is intact
                elapsed += time.perf_counter() - epoch_start
                save(epoch, exc.step)
                raise MinicnnError(f"{exc}; saved the resume point after step {exc.step} of "
                                   f"epoch {epoch + 1}: run again with --resume to "
                                   "continue") from None
            if step == steps_per_epoch and lookahead is not None:
                lookahead.end_epoch(model)     # the averaged weights are evaluated and saved
            train_seconds = time.perf_counter() - epoch_start
            elapsed += train_seconds
            if step < steps_per_epoch:          # stopped by a signal between two steps
                save(epoch, step)
                raise TrainingInterrupted(
                    f"interrupted in epoch {epoch + 1} after {step} steps; saved the resume "
                    f"point {display(resume_file)} ({display(out)} keeps the last complete "
                    "epoch); run again with --resume to continue")
            last = epoch + 1 == config.epochs
            try:
                result = (evaluate(model, test, normalization)
                          if config.eval_each_epoch or last else None)
            except NonFiniteOutputs as exc:
                raise diverged(f"{exc} after epoch {epoch + 1}") from None
            model.train()
            seen = totals.seen
            history.append({
                "epoch": epoch + 1,
                "train_loss": float(totals.loss_sum) / max(seen, 1),
                "train_accuracy": float(totals.correct) / max(seen, 1),
                accuracy_key: result["accuracy"] if result else None,
                "lr": optimizer.lr,
                "seconds": round(train_seconds, 2),
                "images_per_second": round(seen / train_seconds, 1),
            })
            h = history[-1]
            if not math.isfinite(h["train_loss"]):     # on the GPU a NaN between two reads
                raise diverged(f"the loss became {h['train_loss']} in epoch {epoch + 1}")
            metrics = {f"{evaluated_on}_per_class": result["per_class"] if result else None,
                       "tta": "none"}
            if config.holdout:
                metrics["holdout"] = {"images": config.holdout, "seed": config.holdout_seed}
            if config.tta != "none" and last:
                augmented = evaluate(model, test, normalization, tta=config.tta)
                model.train()
                h[f"{accuracy_key}_tta"] = augmented["accuracy"]
                metrics |= {f"{evaluated_on}_per_class": augmented["per_class"],
                            "tta": config.tta, accuracy_key: augmented["accuracy"],
                            f"{accuracy_key}_plain": result["accuracy"]}
            shown = "" if result is None else f"  {evaluated_on} acc {h[accuracy_key]:.2%}"
            if f"{accuracy_key}_tta" in h:
                shown += f" (TTA {config.tta} {h[f'{accuracy_key}_tta']:.2%})"
            log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {h['train_loss']:.4f}  "
                f"train acc {h['train_accuracy']:.2%}{shown}"
                f"  {train_seconds:.1f}s ({h['images_per_second']:.0f} img/s)")
            metadata = {
                "class_names": list(train.class_names),
                "normalization": normalization,
                "training": {"config": asdict(config), "epochs_completed": epoch + 1,
                             "backend": backend.name(), "train_seconds": round(elapsed, 1),
                             "train_images": n, "run_id": point.run_id,
                             "history": [dict(entry) for entry in history]},
                accuracy_key: h[accuracy_key],
                **metrics,
            }
            save(epoch + 1, 0, metadata)
            if stop.requested and epoch + 1 < config.epochs:
                raise TrainingInterrupted(
                    f"interrupted after epoch {epoch + 1}; saved {display(out)}; "
                    "run again with --resume to continue")
    return metadata


def epoch_weights_path(weights_path: Path, epoch: int) -> Path:
    """Where keep_epoch_weights puts the weights after epoch ``epoch`` (1-based)."""
    return weights_path.with_name(f"{weights_path.stem}.epoch{epoch:03d}.npz")


def _fit_whitening(model, train: data.Dataset, log) -> float:
    """Set the whitening stem's filters from the first WHITENING_IMAGES training images
    (normalized, not augmented, as airbench); returns the seconds it took."""
    started = time.perf_counter()
    x = data.normalize(backend.to_device(train.images[:WHITENING_IMAGES]))
    for layer in whitening_layers(model):
        layer.fit_to(x)
    seconds = time.perf_counter() - started
    log(f"whitening filters set from {len(x):,} training images in {seconds:.1f}s")
    return seconds


@contextlib.contextmanager
def training_step(model, criterion):
    """A function (x, labels) -> (loss, logits) that runs forward, loss and backward:
    the batch split over processes by the replicas of the fast kernels
    (minicnn.fast.replicas) where they help, else :func:`forward_backward`. Replicas
    are not used on the reference kernels, where there is one CPU or
    MINICNN_PROCESSES=1, on the GPU, or for a model with batch statistics that the
    processes cannot share (every BatchNorm2d of the fast kernels can)."""
    if kernels.of(model) == "fast":
        from minicnn.fast.replicas import Replicas, default_processes   # imports this module
        if default_processes(model) > 1:
            with Replicas(model, criterion) as replicas:
                yield replicas.forward_backward
            return
    yield functools.partial(forward_backward, model, criterion)


def _restore(model, optimizer: SGD, lookahead: Lookahead | None, config: TrainConfig, out: Path,
             n: int, steps_per_epoch: int, log) -> ResumePoint:
    """Load the resume point of ``out`` into the model, optimizer and lookahead, after
    checking that it belongs to this run (minicnn.resume); write the weights file again
    if it lags."""
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
    if lookahead is not None:
        lookahead.load_state_dict(point.lookahead)
    if check_published(out, point):
        save_model(model, out, **point.published)
        log(f"wrote {display(out)} again from its resume point (epoch {point.epoch})")
    return point
