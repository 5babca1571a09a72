"""The files of a training run, and its resume point: one file that cannot disagree
with itself.

``minicnn train --out NAME.npz`` writes two files, and only these:

    NAME.npz          the published weights: written after every complete epoch; a
                      plain weights file (load_model) whose metadata names the run
                      (training.run_id), the epochs completed and the per-epoch history.
    NAME.resume.npz   the resume point: the weights, the optimizer's velocity, epoch and
                      step, history, time, config and run id, in one file written
                      atomically, so everything in it belongs to the same step. Written
                      after every epoch (before NAME.npz) and when a run stops mid-epoch
                      (Ctrl-C, SIGTERM, a dead worker). A mid-epoch stop never touches
                      NAME.npz, which keeps the last complete epoch.

``--resume`` reads the resume point alone and verifies it (:func:`read_resume_point`):
every field for type and range, its weights and velocity against the model (names,
shapes, finite values), the config against the run's, the number of training
images, the step against the epoch's steps, and that it was written for this
``--out``. It then checks NAME.npz (:func:`check_published`): it must be this run's
(same run id) and not newer than the resume point, or the file that ``--force``
allowed this run to replace; a NAME.npz that lags one epoch behind (the process was
killed between the two writes) is written again from the resume point.
"""

from __future__ import annotations

import glob
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from minicnn.checkpoint import (FORMAT, FORMAT_VERSION, CheckpointError, NpzReader,
                                check_metadata, read_metadata, write_npz_atomic)
from minicnn.files import display, sha256
from minicnn.validation import Record, check_history

RESUME_FORMAT = "minicnn-resume"
RESUME_VERSION = 1
MODEL_PREFIX, VELOCITY_PREFIX, LOOKAHEAD_PREFIX = "model/", "velocity/", "lookahead/"


def resume_path(out: Path) -> Path:
    """Where the resume point of the run writing ``out`` lives: NAME.resume.npz."""
    out = Path(out)
    return out.with_name(out.stem + ".resume.npz")


def run_files(out: Path) -> list[Path]:
    """Every file a run with --out ``out`` writes (the overwrite check covers them all):
    the two above, and the NAME.epochNNN.npz of --keep-epoch-weights that are there."""
    out = Path(out)
    kept = sorted(out.parent.glob(f"{glob.escape(out.stem)}.epoch[0-9][0-9][0-9].npz"))
    return [out, resume_path(out), *kept]


def new_run_id() -> str:
    return secrets.token_hex(8)


@dataclass
class ResumePoint:
    """What the resume file holds. ``published``: the metadata of NAME.npz as last
    written (None before the first complete epoch); ``replaces``: the SHA-256 of the
    NAME.npz that --force allowed this run to replace (None if there was none)."""
    run_id: str
    weights_file: str
    epoch: int                    # epochs completed
    step: int                     # steps done in epoch ``epoch`` (0 at an epoch's end)
    elapsed: float
    config: dict
    train_images: int
    history: list
    published: dict | None = None
    replaces: str | None = None
    model: dict = field(default_factory=dict)        # {name: array}, as model.state_dict()
    velocity: dict = field(default_factory=dict)     # {name: array}, as SGD.state_dict()
    lookahead: dict = field(default_factory=dict)    # {name: array}, as Lookahead.state_dict()

    def metadata(self) -> dict:
        return {"format": RESUME_FORMAT, "format_version": RESUME_VERSION,
                "run_id": self.run_id, "weights_file": self.weights_file, "epoch": self.epoch,
                "step": self.step, "elapsed": self.elapsed, "config": self.config,
                "train_images": self.train_images, "history": self.history,
                "published": self.published, "replaces": self.replaces}


def write_resume_point(path: Path, point: ResumePoint) -> None:
    arrays = {MODEL_PREFIX + k: v for k, v in point.model.items()}
    arrays.update({VELOCITY_PREFIX + k: v for k, v in point.velocity.items()})
    arrays.update({LOOKAHEAD_PREFIX + k: v for k, v in point.lookahead.items()})
    write_npz_atomic(path, arrays, point.metadata())


def _read_metadata(path: Path) -> Record:
    name = display(path)
    metadata = read_metadata(path, what="resume point")
    if metadata.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{name}: not a minicnn resume point (format "
                              f"{metadata.get('format')!r})")
    record = Record(metadata, name, CheckpointError)
    version = record.integer("format_version", low=1)
    if version > RESUME_VERSION:
        raise CheckpointError(f"{name}: format version {version} is newer than this minicnn "
                              f"understands ({RESUME_VERSION}); upgrade minicnn")
    return record


def read_resume_config(path: Path) -> dict:
    """The config a resume point was trained with (its "config" field, as a dict)."""
    return _read_metadata(path).record("config").values


def read_resume_point(path: Path, model, out: Path, steps_per_epoch: int) -> ResumePoint:
    """The resume point at ``path`` for ``model`` and --out ``out``, every field checked
    (CheckpointError naming the file and the field). The caller checks config and
    train_images against its own run."""
    name = display(path)
    record = _read_metadata(path)
    weights_file = record.string("weights_file")
    if weights_file != Path(out).name:
        raise CheckpointError(f"{name}: is the resume point of {weights_file}, not of "
                              f"{display(Path(out).name)}; resume with --out "
                              f"{display(Path(out).with_name(weights_file))}")
    config = record.record("config").values
    epochs = config.get("epochs") if isinstance(config.get("epochs"), int) else None
    epoch = record.integer("epoch", 0, epochs)
    step = record.integer("step", 0, 0 if epoch == epochs else steps_per_epoch - 1)
    point = ResumePoint(
        run_id=record.field("run_id", lambda v: isinstance(v, str) and v.isalnum()
                            and 8 <= len(v) <= 64, "a run id (8 to 64 letters and digits)"),
        weights_file=weights_file, epoch=epoch, step=step,
        elapsed=record.number("elapsed", 0), config=config,
        train_images=record.integer("train_images", 1),
        history=check_history(record.sequence("history"), name, error=CheckpointError),
        replaces=record.field("replaces", lambda v: isinstance(v, str) and len(v) == 64
                              and all(c in "0123456789abcdef" for c in v),
                              "a SHA-256 in hex", none_ok=True))
    if len(point.history) != epoch:
        record.fail("history", f"one entry per completed epoch ({epoch})", point.history)
    published = record.record("published", none_ok=True)
    if published is not None:
        header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "model": str(config.get("model"))}
        check_metadata({**published.values, **header}, f"{name} (field published)")
        training = published.record("training")
        if training.string("run_id") != point.run_id:
            training.fail("run_id", f"this run's id {point.run_id!r}", training.values["run_id"])
        training.integer("epochs_completed", 1, epoch)
        check_history(training.sequence("history"), name, "published.training.history",
                      CheckpointError)
        point.published = published.values
    with NpzReader(path, what="resume point") as npz:
        shapes = {MODEL_PREFIX + n: tuple(h[k].shape) for n, h, k in model.named_arrays()}
        params = {VELOCITY_PREFIX + n: tuple(m.params[k].shape)
                  for n, m, k in model.named_parameters()}
        velocity = {n: params[n] for n in npz.names() if n.startswith(VELOCITY_PREFIX)
                    and n in params}
        average = {LOOKAHEAD_PREFIX + n.removeprefix(MODEL_PREFIX): shape
                   for n, shape in shapes.items()}
        lookahead = {n: average[n] for n in npz.names() if n in average}
        arrays = npz.arrays({**shapes, **velocity, **lookahead})
    point.model = {n.removeprefix(MODEL_PREFIX): a for n, a in arrays.items()
                   if n.startswith(MODEL_PREFIX)}
    point.velocity = {n.removeprefix(VELOCITY_PREFIX): a for n, a in arrays.items()
                      if n.startswith(VELOCITY_PREFIX)}
    point.lookahead = {n.removeprefix(LOOKAHEAD_PREFIX): a for n, a in arrays.items()
                       if n.startswith(LOOKAHEAD_PREFIX)}
    return point


def check_published(out: Path, point: ResumePoint) -> bool:
    """Whether NAME.npz (``out``) may be written by the run of ``point``; raises
    CheckpointError if it holds another run's weights (or this run's, newer than the
    resume point). Returns True if it must be written again now from the resume point
    (missing, or one epoch behind after a kill between the two writes)."""
    out = Path(out)
    at_published_epoch = (point.published is not None and point.step == 0
                          and point.published["training"]["epochs_completed"] == point.epoch)
    if not out.exists():
        return at_published_epoch
    name, resume = display(out), display(resume_path(out))
    try:
        training = read_metadata(out).get("training")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; it should hold the weights of the run in {resume}: "
                              "move it away to resume") from None
    run_id = training.get("run_id") if isinstance(training, dict) else None
    if run_id == point.run_id:
        epochs = training.get("epochs_completed")
        published = point.published["training"]["epochs_completed"] if point.published else 0
        if not isinstance(epochs, int) or epochs > published:
            raise CheckpointError(f"{name} holds epoch {epochs} of this run, but its resume "
                                  f"point {resume} is at epoch {point.epoch}; resuming would "
                                  "replace newer weights: move it away to resume")
        return at_published_epoch and epochs < published
    if point.replaces is not None and sha256(out) == point.replaces:
        return at_published_epoch
    raise CheckpointError(f"{name} is not from the run in {resume} (run id {run_id!r}, the "
                          f"resume point's is {point.run_id!r}); resuming would overwrite it: "
                          "move it away, or start a new run with --force")
