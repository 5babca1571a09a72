"""Checking what the study tools read, so that bad input is one clear error
(:class:`~minicnn.errors.MinicnnError`): a weights file's metadata, and a
training history."""

from __future__ import annotations

import json
import math
from pathlib import Path

from minicnn.errors import MinicnnError

HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "test_accuracy")


def read_history(path) -> dict:
    """A training history JSON ({"config": ..., "history": [per-epoch dicts]}), checked;
    raises MinicnnError naming what is wrong."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise MinicnnError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MinicnnError(f"{path}: is a folder, not a history file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MinicnnError(f"{path}: not a JSON file ({exc})") from None
    entries = content.get("history") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise MinicnnError(f"{path}: not a training history (expected a JSON object with a "
                           "non-empty \"history\" list, as train writes beside the weights)")
    for number, entry in enumerate(entries, start=1):
        wanted = HISTORY_KEYS + (("lr",) if isinstance(entry, dict) and "lr" in entry else ())
        if not isinstance(entry, dict) or not all(_is_number(entry.get(k)) for k in wanted):
            raise MinicnnError(f"{path}: history entry {number} is not a dict with numbers "
                               f"for {', '.join(wanted)}")
    config = content.get("config")
    return {"config": config if isinstance(config, dict) else {}, "history": entries}


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
