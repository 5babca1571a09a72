"""Checking what the study tools read, so that bad input is one clear error
(:class:`~minicnn.errors.MinicnnError`): a weights file's metadata, and a
training history."""

from __future__ import annotations

import json
import math
from pathlib import Path

from minicnn.errors import MinicnnError
from minicnn.files import display, open_regular
from minicnn.validation import check_history

HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "test_accuracy")


MAX_HISTORY_BYTES = 16 * 2**20       # a 1,000-epoch history is well below 1 MB


def read_history(path) -> dict:
    """A training history from a JSON file, checked: an object with a "history" list
    (and a "config"), as training once wrote beside the weights, or the bare list of
    per-epoch dicts. Returns {"config": ..., "history": [...]}; raises MinicnnError
    naming what is wrong."""
    name = display(path)
    with open_regular(path, MinicnnError, "history file") as f:
        text = f.read(MAX_HISTORY_BYTES + 1)
    if len(text) > MAX_HISTORY_BYTES:
        raise MinicnnError(f"{name}: larger than {MAX_HISTORY_BYTES:,} bytes; not a history")
    try:
        content = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MinicnnError(f"{name}: not a JSON file ({exc})") from None
    if isinstance(content, dict):
        config = content.get("config")
        return checked_history(content.get("history"), name,
                               config if isinstance(config, dict) else {})
    return checked_history(content, name, {}, field="(the list)")


def history_of(weights, metadata: dict, given=None) -> tuple[dict | None, str]:
    """The history to plot and where it came from: the file ``given`` (--history), else
    the one training records in the weights file, else a NAME.history.json beside it
    (older runs); (None, what was looked for) if there is none."""
    if given is not None:
        return read_history(given), display(given)
    training = metadata.get("training") or {}
    if training.get("history"):
        config = training.get("config")
        return (checked_history(training["history"], display(weights),
                                config if isinstance(config, dict) else {},
                                field="training.history"), display(weights))
    beside = Path(weights).with_name(Path(weights).stem + ".history.json")
    if beside.exists():
        return read_history(beside), display(beside)
    return None, f"{display(weights)} or {display(beside)}"


def checked_history(entries, source: str, config: dict, field: str = "history") -> dict:
    """{"config": config, "history": entries} after checking every entry
    (minicnn.validation.check_history: epochs 1, 2, ... with finite losses and
    accuracies) and that there is one, and its learning rates, where given, are numbers."""
    check_history(entries, source, field)
    if not entries:
        raise MinicnnError(f"{source}: field {field} has no epochs")
    for index, entry in enumerate(entries):
        if "lr" in entry and not _is_number(entry["lr"]):
            raise MinicnnError(f"{source}: field {field}[{index}].lr must be a finite number")
    return {"config": config, "history": entries}


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_metadata(metadata: dict, source) -> tuple[list[str], dict]:
    """(class names, normalization) of a weights file's metadata, checked."""
    names = metadata.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise MinicnnError(f"{source}: metadata has no list of class names")
    norm = metadata.get("normalization")
    try:
        mean, std = [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]
    except (TypeError, KeyError, ValueError):
        raise MinicnnError(f"{source}: metadata has no normalization mean and std") from None
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise MinicnnError(f"{source}: metadata normalization needs 3 means and 3 positive "
                           f"standard deviations, got mean {mean}, std {std}")
    return names, {"mean": mean, "std": std}
