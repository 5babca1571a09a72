"""Command-line front ends: ``minicnn train | evaluate | classify | trace | visualize``,
and ``convert | export`` (minicnn/cli_interop.py).

Also reached as ``python -m minicnn ...`` and through the thin scripts in
examples/. Errors caused by the input print one line on stderr and exit
non-zero, without a traceback; Ctrl-C and SIGTERM exit with 130 (training
saves its resume point first); file names are printed safely whatever their
bytes, and JSON output never holds NaN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
import warnings
from dataclasses import asdict, fields
from pathlib import Path

from minicnn import __version__, augment, backend, data, kernels
from minicnn.architecture import ArchitectureError, output_shape
from minicnn.checkpoint import check_metadata, load_model, read_metadata
from minicnn.errors import MinicnnError
from minicnn.files import display, printable
from minicnn.images import load_image, load_images
from minicnn.losses import softmax
from minicnn.models import MODELS, STEMS, build_model, check_config
from minicnn.optim import SCHEDULES
from minicnn.resume import read_resume_config, resume_path, run_files
from minicnn.study import inputs as study_inputs_checks
from minicnn.trace import trace_step
from minicnn.train import (MAX_CROP_PADDING, TrainConfig, TrainingInterrupted, evaluate, fit,
                           predict_logits)

KERNELS_HELP = ("compute with the reference layers (the textbook code of minicnn/layers/) or "
                "the fast kernels (minicnn/fast/); default: $MINICNN_KERNELS, else fast")


def add_kernels_option(p) -> None:
    p.add_argument("--kernels", choices=kernels.NAMES, help=KERNELS_HELP)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def crop_padding(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_CROP_PADDING:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_CROP_PADDING} (half the "
                                         f"image), got {text}")
    return value


def widths_list(text: str) -> list[int]:
    """"64,128,128" -> [64, 128, 128]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be three positive integers such as 64,128,128, "
                                         f"got {text}")
    return values


def shipped_weights(folder: Path | None = None) -> dict:
    """{path: metadata} of the minicnn weights files in ``folder`` (default WEIGHTS_DIR);
    resume points and anything unreadable or with metadata that does not pass
    check_metadata are skipped, so one odd file there cannot break the default."""
    found = {}
    for path in sorted((folder or WEIGHTS_DIR).glob("*.npz")):
        try:
            found[path] = check_metadata(read_metadata(path), display(path))
        except MinicnnError:
            continue
    return found


def default_weights() -> Path:
    """The shipped weights file with the highest recorded test accuracy."""
    candidates = shipped_weights()
    if not candidates:
        raise MinicnnError(f"no weights file found in {display(WEIGHTS_DIR)}; pass "
                           "--weights PATH")
    return max(candidates, key=lambda path: candidates[path]["test_accuracy"] or 0.0)


# --- train -------------------------------------------------------------------------

def add_train_parser(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a model on CIFAR-10 and save its weights",
                              description="Train a model on CIFAR-10. Every option has a sane "
                              "default; with --resume the saved run's options are used.")
    p.add_argument("--backend", choices=backend.NAMES, default="numpy")
    add_kernels_option(p)
    p.add_argument("--model", choices=sorted(MODELS), help=f"architecture (default {d.model})")
    p.add_argument("--epochs", type=positive_int, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=positive_int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=non_negative_float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--momentum", type=non_negative_float, help=f"default {d.momentum}")
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=non_negative_float, help=f"default {d.weight_decay}")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"LR schedule (default {d.schedule})")
    p.add_argument("--warmup", type=fraction,
                   help=f"fraction of training spent warming up (default {d.warmup})")
    p.add_argument("--label-smoothing", type=fraction, help=f"default {d.label_smoothing}")
    p.add_argument("--no-decay-norm-bias", dest="decay_norm_and_bias", action="store_false",
                   default=None, help="weight decay skips biases and BatchNorm parameters")
    p.add_argument("--tta", nargs="?", const="flip", choices=augment.TTA_MODES, default=None,
                   help="test the final model also with test-time augmentation, and record that "
                        "evaluate and classify should use it: flip (the default of a bare "
                        "--tta; image and mirror image) or flip-translate (airbench's six "
                        "views)")
    p.add_argument("--width", type=positive_int,
                   help="width option of the model (airnet: channels of its first block)")
    p.add_argument("--widths", type=widths_list, metavar="W1,W2,W3",
                   help="airnet: the widths of its three blocks, e.g. 64,128,128 (instead of "
                        "--width W, which means W,4W,4W)")
    p.add_argument("--stem", choices=STEMS,
                   help="airnet: conv (a learned 2x2 conv + BatchNorm, the default) or whiten "
                        "(fixed patch-whitening filters from the training images)")
    p.add_argument("--dirac", action="store_true", default=None,
                   help="airnet: identity init of the blocks' 3x3 convs")
    p.add_argument("--bn-momentum", type=fraction, help="airnet: BatchNorm momentum (default 0.2)")
    p.add_argument("--bn-eps", type=non_negative_float, help="airnet: BatchNorm eps (default 1e-5)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no random horizontal flips")
    p.add_argument("--flip-rule", choices=augment.FLIP_RULES,
                   help="random: a fresh coin per image and epoch (the default); alternating: "
                        "one coin per image, every image mirrored every other epoch")
    p.add_argument("--crop-padding", type=crop_padding,
                   help=f"random crops after padding by this many pixels (default "
                        f"{d.crop_padding}: off)")
    p.add_argument("--crop-mode", choices=data.PAD_MODES,
                   help="how crops pad: zeros (the default) or reflect (mirrored edges)")
    p.add_argument("--lr-start-factor", type=non_negative_float,
                   help="linear schedule: start at LR times this (default 1/25)")
    p.add_argument("--lr-end-factor", type=non_negative_float,
                   help="linear schedule: end at LR times this (default 0)")
    p.add_argument("--norm-lr-scale", type=non_negative_float,
                   help="BatchNorm parameters' learning rate times this, their weight decay "
                        "divided by it (default 1)")
    p.add_argument("--whiten-bias-epochs", type=non_negative_int,
                   help="--stem whiten: train its bias this many epochs, then freeze it "
                        "(default: never frozen)")
    p.add_argument("--lookahead", action="store_true", default=None,
                   help="lookahead averaging of the weights on airbench's schedule; the saved "
                        "weights are the averaged ones")
    p.add_argument("--lookahead-every", type=positive_int,
                   help=f"steps between the lookahead's pulls (default {d.lookahead_every})")
    p.add_argument("--lookahead-start-epoch", type=non_negative_int,
                   help=f"the epoch (counted from 0) the lookahead starts in (default "
                        f"{d.lookahead_start_epoch})")
    p.add_argument("--seed", type=non_negative_int, help=f"default {d.seed}")
    p.add_argument("--limit", type=positive_int, help="train on the first N images only")
    p.add_argument("--holdout", type=positive_int, metavar="N",
                   help="hold out N training images (stratified; minicnn/holdout.py), train on "
                        "the rest and evaluate on them instead of the test set")
    p.add_argument("--holdout-seed", type=non_negative_int,
                   help=f"the hold-out split's own seed (default {d.holdout_seed})")
    p.add_argument("--no-eval-each-epoch", dest="eval_each_epoch", action="store_false",
                   default=None, help="evaluate after the last epoch only")
    p.add_argument("--keep-epoch-weights", action="store_true", default=None,
                   help="also keep each epoch's weights (NAME.epoch001.npz, ...) to evaluate "
                        "later")
    p.add_argument("--data-dir", help="CIFAR-10 folder or tarball (default: $MINICNN_DATA, "
                                      f"else {data.DEFAULT_CACHE}, downloading if needed)")
    p.add_argument("--out", help="weights file to write (default runs/MODEL_cifar10.npz); its "
                                 "resume point NAME.resume.npz is written beside it")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out and its resume point")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.set_defaults(handler=run_train)


def _train_config(args) -> TrainConfig:
    """The run's config: the defaults (or the saved run's) overridden by given options."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if not args.resume:
        return TrainConfig(**given).checked()
    path = resume_path(Path(args.out))
    config = TrainConfig.from_dict(read_resume_config(path), f"{display(path)} (field config)")
    differ = {k: v for k, v in given.items() if getattr(config, k) != v}
    if differ:
        listed = ", ".join(f"--{k.replace('_', '-')} {v} (saved {getattr(config, k)})"
                           for k, v in differ.items())
        raise MinicnnError(f"--resume continues the saved run, but these options differ from "
                           f"it: {listed}; drop them, or start a new run with another --out")
    return config


def check_train_config(config: TrainConfig) -> None:
    """Options that only mean something with others: a MinicnnError if those are missing."""
    if config.width is not None and config.widths is not None:
        raise MinicnnError("give --width or --widths, not both")
    if config.schedule != "linear" and (config.lr_start_factor is not None
                                         or config.lr_end_factor):
        raise MinicnnError("--lr-start-factor and --lr-end-factor need --schedule linear")
    if config.whiten_bias_epochs is not None and config.stem != "whiten":
        raise MinicnnError("--whiten-bias-epochs needs --stem whiten")
    if config.flip_rule != "random" and not config.augment:
        raise MinicnnError("--flip-rule needs flips: drop --no-augment")


def run_train(args) -> int:
    out = Path(args.out or f"runs/{args.model or TrainConfig.model}_cifar10.npz")
    args.out = str(out)
    if out.is_dir():
        raise MinicnnError(f"--out {display(out)} is a folder; give a file name such as "
                           f"{display(out / 'model.npz')}")
    _check_run_files(out, args.resume, args.force)
    config = _train_config(args)
    check_train_config(config)
    check_config(config.model, config.model_config())      # before anything is created
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise MinicnnError(f"cannot write to {display(out.parent)}; choose another --out")
    backend.use(args.backend, seed=config.seed)
    train, test = data.load_cifar10(args.data_dir)
    model = build_model(config.model, **config.model_config())
    print(f"training {config.model} ({model.num_parameters():,} parameters) on "
          f"{min(len(train), config.limit or len(train)):,} images, backend {backend.name()}; "
          f"config {json.dumps(asdict(config))}")
    try:
        metadata = fit(model, train, test, config, out, resume=args.resume,
                       progress=args.progress)
    except TrainingInterrupted as exc:
        print(f"minicnn train: {printable(str(exc))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not metadata:
        print(f"{display(out)} already holds all {config.epochs} epochs of this run; "
              "nothing to do")
        return 0
    where = "holdout" if config.holdout else "test"
    print(f"{where} accuracy {metadata[where + '_accuracy']:.2%}; saved {display(out)}")
    return 0


def _check_run_files(out: Path, resume: bool, force: bool) -> None:
    """The overwrite check, over every file the run writes (minicnn.resume.run_files):
    a new run refuses to replace any of them without --force; --resume needs the
    resume point. Whatever exists must be a regular file."""
    for path in run_files(out):
        if os.path.lexists(path) and not path.is_file():
            raise MinicnnError(f"{display(path)} exists and is not a regular file; choose "
                               "another --out")
    point = resume_path(out)
    if resume:
        if not point.is_file():
            old = out.with_name(out.stem + ".state.npz")
            hint = (f" ({display(old)} is the training state of an older minicnn, which this "
                    "version cannot resume)" if old.is_file() else "")
            raise MinicnnError(f"nothing to resume: {display(point)} does not exist{hint}")
        return
    existing = [display(path) for path in run_files(out) if os.path.lexists(path)]
    if existing and not force:
        raise MinicnnError(f"{' and '.join(existing)} {'exists' if len(existing) == 1 else 'exist'}"
                           "; use --resume to continue that run, --force to overwrite, or "
                           "another --out")


# --- evaluate ------------------------------------------------------------------------

def add_model_options(p, batch_size: int, json_help: str) -> None:
    """The options evaluate and classify share: which weights, where, how."""
    p.add_argument("--weights", help="weights file (default: the best one in weights/)")
    p.add_argument("--backend", choices=backend.NAMES, default="numpy")
    add_kernels_option(p)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--tta", dest="tta", action="store_const", const="flip", default=None,
                   help="average the logits of each image and its mirror image (test-time "
                        "flips); default: as recorded in the weights file")
    p.add_argument("--tta-mode", dest="tta", choices=augment.TTA_MODES,
                   help="test-time augmentation by name: none, flip, or flip-translate "
                        "(airbench's six views with 1-pixel translations)")
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none",
                   help="no test-time augmentation (--tta-mode none)")


def use_tta(args, metadata: dict) -> str:
    """The TTA mode: --tta / --no-tta, else the weights file's (True there: "flip")."""
    return augment.tta_mode(metadata.get("tta") if args.tta is None else args.tta)


TTA_SHOWN = {"none": "", "flip": " (test-time flips)",
             "flip-translate": " (test-time flips and 1-pixel translations)"}


def load_requested_model(args):
    """Select the backend, then load --weights (or the best shipped file)."""
    backend.use(args.backend)
    weights = Path(args.weights) if args.weights else default_weights()
    return (weights, *load_image_model(weights))


def load_image_model(weights: Path):
    """(model, metadata) of a weights file whose model takes the 3x32x32 images these
    commands give it and has one output per class name, else a MinicnnError."""
    model, metadata = load_model(weights)
    try:
        shape = output_shape(model, (3, 32, 32))
    except ArchitectureError as exc:
        raise MinicnnError(f"{weights}: {exc}") from None
    if shape != (len(metadata["class_names"]),):
        raise MinicnnError(f"{weights}: the model's output has shape {shape}, but the file "
                           f"names {len(metadata['class_names'])} classes")
    return model, metadata


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate",
                              help="accuracy of a weights file on the CIFAR-10 test set")
    p.add_argument("--data-dir", help="CIFAR-10 folder or tarball (default: $MINICNN_DATA)")
    add_model_options(p, batch_size=1000, json_help="print the result as JSON")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args) -> int:
    weights, model, metadata = load_requested_model(args)
    _, test = data.load_cifar10(args.data_dir, train=False)
    if len(metadata["class_names"]) != len(test.class_names):
        raise MinicnnError(f"{display(weights)}: the model has {len(metadata['class_names'])} "
                           f"outputs, the test set {len(test.class_names)} classes")
    result = evaluate(model, test, metadata["normalization"], args.batch_size,
                      tta=use_tta(args, metadata))
    result["weights"] = display(weights)
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    names = result["class_names"]
    print(f"{display(weights)}: accuracy {result['accuracy']:.2%} on {result['n']:,} test "
          "images" + TTA_SHOWN[result["tta"]])
    for name, accuracy in result["per_class"].items():
        shown = "no test images" if accuracy is None else f"{accuracy:.2%}"
        print(f"  {name:<11} {shown}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print("            " + " ".join(f"{n[:5]:>5}" for n in names))
    for name, row in zip(names, result["confusion"], strict=True):
        print(f"  {name:<10}" + " ".join(f"{v:>5}" for v in row))
    return 0


# --- classify ------------------------------------------------------------------------

def add_classify_parser(subparsers) -> None:
    p = subparsers.add_parser("classify", help="classify image files with a trained model")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=positive_int, default=3, help="labels to show (default 3)")
    add_model_options(p, batch_size=256, json_help="print a JSON list, in input order")
    p.set_defaults(handler=run_classify)


def run_classify(args) -> int:
    _, model, metadata = load_requested_model(args)
    class_names = metadata["class_names"]
    if args.top_k > len(class_names):
        raise MinicnnError(f"--top-k {args.top_k} is more than the model's "
                           f"{len(class_names)} classes")
    paths, images, errors = load_images(args.images)
    for error in errors:
        print(f"minicnn classify: {printable(str(error))}", file=sys.stderr)
    if not paths:                              # nothing readable: each input got its line
        if args.json:
            print("[]")
        return EXIT_ERROR
    logits = predict_logits(model, backend.to_device(images), metadata["normalization"],
                            args.batch_size, tta=use_tta(args, metadata))
    probabilities = backend.to_host(softmax(logits))
    results = []
    for path, probs in zip(paths, probabilities, strict=True):
        top = probs.argsort()[::-1][:args.top_k]
        results.append({"path": display(path), "predictions": [
            {"label": class_names[i], "probability": float(probs[i])} for i in top]})
    if args.json:
        print(json.dumps(results, allow_nan=False))
    else:
        for result in results:
            shown = ", ".join(f"{p['label']} {p['probability']:.1%}" for p in result["predictions"])
            print(f"{result['path']}: {shown}")
    return EXIT_ERROR if errors else 0


# --- trace and visualize -------------------------------------------------------------

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "images" / "cat.png"
SEED_WEIGHTS = WEIGHTS_DIR / "lenet_cifar10.npz"


def add_study_options(p) -> None:
    """The options trace and visualize share: which image, weights, label, kernels."""
    p.add_argument("image", nargs="?", default=str(EXAMPLE_IMAGE),
                   help="image file (default: examples/images/cat.png)")
    p.add_argument("--weights", help="weights file (default: weights/lenet_cifar10.npz, "
                                     "the seed network)")
    p.add_argument("--label", help="class name or index (default: the predicted class)")
    add_kernels_option(p)


def study_inputs(args, command: str):
    """(weights path, model, class names, normalization, image uint8 (3, 32, 32)) for
    trace or visualize."""
    backend.use("numpy")
    if Path(args.image).suffix == ".npz":
        raise MinicnnError(f"{args.image} is a weights file, not an image; give it as "
                           f"--weights {args.image} (see minicnn {command} --help)")
    weights = Path(args.weights) if args.weights else SEED_WEIGHTS
    model, metadata = load_image_model(weights)
    names, normalization = study_inputs_checks.check_metadata(metadata, display(weights))
    return weights, model, metadata, names, normalization, load_image(args.image)


def chosen_label(text: str | None, names: list[str]) -> int | None:
    """The class index --label names (a name or an index); None when not given."""
    if text is None:
        return None
    if text in names:
        return names.index(text)
    if re.fullmatch(r"[0-9]{1,6}", text) and int(text) < len(names):
        return int(text)
    raise MinicnnError(f"--label must be a class name ({', '.join(names)}) "
                       f"or an index below {len(names)}, got {printable(repr(text))}")


def label_line(label: int, names: list[str], given: bool) -> str:
    how = "from --label" if given else "the predicted class; --label to choose"
    return f"label: {names[label]} ({how})"


def add_trace_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="follow one image through forward and backward, "
                                            "layer by layer")
    add_study_options(p)
    p.set_defaults(handler=run_trace)


def run_trace(args) -> int:
    weights, model, _, names, normalization, image = study_inputs(args, "trace")
    x = data.normalize(image[None], **normalization)
    label = chosen_label(args.label, names)
    given = label is not None
    if not given:
        label = int(model.eval().forward(x).argmax())
    print(f"{display(args.image)} through {display(weights)}, on the {kernels.of(model)} "
          "kernels")
    print(label_line(label, names, given) + "\n")
    print("\n".join(trace_step(model, x, label, names)))
    return 0


def add_visualize_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "visualize", help="pictures of one image through a trained model: predictions, "
                          "feature maps, saliency, filters, training curves",
        description="Draw what a trained model does with one image: its top predictions, "
                    "each conv layer's feature maps, saliency maps (gradient, SmoothGrad, "
                    "gradient x input, by minicnn's own backward), the first layer's filters "
                    "and the training curves, each titled and captioned. Writes PNG files "
                    "(--out) and/or one self-contained HTML page (--html). Needs matplotlib.")
    add_study_options(p)
    p.add_argument("--html", help="write one self-contained HTML page (images inlined) here")
    p.add_argument("--out", help="folder for PNG files (default runs/visualize when --html "
                                 "is not given)")
    p.add_argument("--history", help="training history JSON (default: WEIGHTS' "
                                     ".history.json, if there is one)")
    p.add_argument("--top-k", type=positive_int, default=5,
                   help="predictions to show (default 5)")
    p.add_argument("--samples", type=positive_int, default=256,
                   help="noisy copies SmoothGrad averages over (default 256)")
    p.add_argument("--noise", type=non_negative_float, default=0.3,
                   help="SmoothGrad's noise sd, as a fraction of the input's range "
                        "(default 0.3)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of SmoothGrad's noise (default 0)")
    p.add_argument("--dpi", type=positive_int, default=100,
                   help="pixels per inch of the figures (default 100: the widest is 1260 "
                        "pixels)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.set_defaults(handler=run_visualize)


def run_visualize(args) -> int:
    from minicnn.study import report       # needs matplotlib, which only this command does
    out = Path(args.out) if args.out else (None if args.html else Path("runs/visualize"))
    if out is not None and out.exists() and not out.is_dir():
        raise MinicnnError(f"--out {out} is a file; give a folder")
    if args.html and Path(args.html).is_dir():
        raise MinicnnError(f"--html {args.html} is a folder; give a file name such as "
                           f"{Path(args.html) / 'report.html'}")
    weights, model, metadata, names, _, image = study_inputs(args, "visualize")
    history, where = study_inputs_checks.history_of(weights, metadata, args.history)
    if history is None:
        print(f"no training history in {where}: no curves (--history to give one)")
    label = chosen_label(args.label, names)
    panels, label = report.study(
        model, metadata, image, image_name=Path(args.image).name, weights_name=weights.name,
        label=label, history=history, top_k=args.top_k, samples=args.samples,
        noise=args.noise, seed=args.seed, dpi=args.dpi, progress=args.progress)
    print(f"{args.image} through {weights}, on the {kernels.of(model)} kernels")
    print(label_line(label, names, args.label is not None))
    written = report.write_pngs(panels, out) if out is not None else []
    if args.html:
        title = f"{Path(args.image).name} through {weights.name}"
        intro = (f"What the trained model in {weights} ({metadata.get('model', 'a model')}, "
                 f"{model.num_parameters():,} parameters) does with {args.image}: "
                 f"{label_line(label, names, args.label is not None)}.")
        footer = ("Made by minicnn visualize. Every gradient here comes from minicnn's own "
                  "backward pass; the tests check it against finite differences.")
        written.append(report.write_html(report.html_page(panels, title, intro, footer),
                                         args.html))
    for path in written:
        print(f"wrote {path}")
    return 0


# --- entry point -------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="minicnn", description="A from-scratch CNN engine on NumPy/CuPy.")
    parser.add_argument("--version", action="version", version=f"minicnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_classify_parser(subparsers)
    add_trace_parser(subparsers)
    add_visualize_parser(subparsers)
    from minicnn.cli_interop import add_convert_parser, add_export_parser   # they import this
    add_convert_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with _sigterm_as_ctrl_c(), warnings.catch_warnings():
        # NaN and overflow are checked where they matter (the loss, the outputs): NumPy's
        # warnings about them would only add lines
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                                RuntimeWarning)
        try:
            kernels.use(args.kernels)
            return args.handler(args)
        except BrokenPipeError:                    # stdout's reader has gone (| head): quietly
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_ERROR
        except (MinicnnError, OSError) as exc:     # OSError: disk full, permission denied, ...
            message = str(exc)
        except MemoryError:
            message = "out of memory; try a smaller --batch-size (or model)"
        except KeyboardInterrupt:
            print(f"minicnn {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(f"minicnn {args.command}: error: {printable(message)}", file=sys.stderr)
    return EXIT_ERROR


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """Meanwhile SIGTERM raises KeyboardInterrupt, as Ctrl-C does (training handles both
    itself, saving its resume point first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
