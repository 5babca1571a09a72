"""Command-line front ends: ``minicnn train | evaluate | classify``.

Also reached as ``python -m minicnn ...`` and through the thin scripts in
examples/. Errors caused by the input print one line on stderr and exit
non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

from minicnn import __version__, augment, backend, data, kernels
from minicnn.checkpoint import FORMAT, CheckpointError, load_model, read_metadata
from minicnn.errors import MinicnnError
from minicnn.images import load_image, load_images
from minicnn.losses import softmax
from minicnn.models import MODELS, STEMS, build_model, check_config
from minicnn.optim import SCHEDULES
from minicnn.trace import trace_step
from minicnn.train import (TrainConfig, TrainingInterrupted, evaluate, fit, predict_logits,
                           state_path)

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
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
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


def shipped_weights(folder: Path = WEIGHTS_DIR) -> dict:
    """{path: metadata} of the minicnn weights files in ``folder`` (training-state
    files and anything unreadable are skipped)."""
    found = {}
    for path in sorted(folder.glob("*.npz")):
        try:
            metadata = read_metadata(path)
        except CheckpointError:
            continue
        if metadata.get("format") == FORMAT:
            found[path] = metadata
    return found


def default_weights() -> Path:
    """The shipped weights file with the highest recorded test accuracy."""
    candidates = shipped_weights()
    if not candidates:
        raise MinicnnError(f"no weights file found in {WEIGHTS_DIR}; pass --weights PATH")
    return max(candidates, key=lambda path: candidates[path].get("test_accuracy") or 0.0)


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
    p.add_argument("--crop-padding", type=non_negative_int,
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
    p.add_argument("--out", help="weights file to write (default runs/MODEL_cifar10.npz); the "
                                 "training state and history are written beside it")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.set_defaults(handler=run_train)


def _train_config(args) -> TrainConfig:
    """The run's config: the defaults (or the saved run's) overridden by given options."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if not args.resume:
        return TrainConfig(**given)
    saved = read_metadata(state_path(Path(args.out)))
    config = TrainConfig.from_dict(saved.get("config", {}))
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
        raise MinicnnError(f"--out {out} is a folder; give a file name such as {out / 'model.npz'}")
    if args.resume and not state_path(out).is_file():
        raise MinicnnError(f"nothing to resume: {state_path(out)} does not exist")
    if out.exists() and not (args.resume or args.force):
        raise MinicnnError(f"{out} exists; use --resume to continue that run, --force to "
                           "overwrite it, or --out for a new file")
    config = _train_config(args)
    check_train_config(config)
    check_config(config.model, config.model_config())      # before anything is created
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise MinicnnError(f"cannot write to {out.parent}; choose another --out")
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
        print(f"minicnn train: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not metadata:
        print(f"{out} already holds all {config.epochs} epochs of this run; nothing to do")
        return 0
    where = "holdout" if config.holdout else "test"
    print(f"{where} accuracy {metadata[where + '_accuracy']:.2%}; saved {out}")
    return 0


# --- evaluate ------------------------------------------------------------------------

def add_model_options(p, batch_size: int, json_help: str) -> None:
    """The options evaluate and classify share: which weights, where, how."""
    p.add_argument("--weights", help="weights file (default: the best one in weights/)")
    p.add_argument("--backend", choices=backend.NAMES, default="numpy")
    add_kernels_option(p)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--tta", nargs="?", const="flip", choices=augment.TTA_MODES, default=None,
                   help="test-time augmentation: none, flip (the default of a bare --tta: the "
                        "mean of the logits of each image and its mirror image) or "
                        "flip-translate (airbench's six views); default: as recorded in the "
                        "weights file. A bare --tta reads the next word as its mode: put it "
                        "after the image files")
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none",
                   help="no test-time augmentation (--tta none)")


def use_tta(args, metadata: dict) -> str:
    """The TTA mode: --tta / --no-tta, else the weights file's (True there: "flip")."""
    return augment.tta_mode(metadata.get("tta") if args.tta is None else args.tta)


TTA_SHOWN = {"none": "", "flip": " (test-time flips)",
             "flip-translate": " (test-time flips and 1-pixel translations)"}


def load_requested_model(args):
    """Select the backend, then load --weights (or the best shipped file)."""
    backend.use(args.backend)
    weights = Path(args.weights) if args.weights else default_weights()
    model, metadata = load_model(weights)
    return weights, model, metadata


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate",
                              help="accuracy of a weights file on the CIFAR-10 test set")
    p.add_argument("--data-dir", help="CIFAR-10 folder or tarball (default: $MINICNN_DATA)")
    add_model_options(p, batch_size=1000, json_help="print the result as JSON")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args) -> int:
    weights, model, metadata = load_requested_model(args)
    _, test = data.load_cifar10(args.data_dir)
    result = evaluate(model, test, metadata["normalization"], args.batch_size,
                      tta=use_tta(args, metadata))
    result["weights"] = str(weights)
    if args.json:
        print(json.dumps(result))
        return 0
    names = result["class_names"]
    print(f"{weights}: accuracy {result['accuracy']:.2%} on {result['n']:,} test images"
          + TTA_SHOWN[result["tta"]])
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
        print(f"minicnn classify: {error}", file=sys.stderr)
    logits = predict_logits(model, backend.to_device(images), metadata["normalization"],
                            args.batch_size, tta=use_tta(args, metadata))
    probabilities = backend.to_host(softmax(logits))
    results = []
    for path, probs in zip(paths, probabilities, strict=True):
        top = probs.argsort()[::-1][:args.top_k]
        results.append({"path": path, "predictions": [
            {"label": class_names[i], "probability": float(probs[i])} for i in top]})
    if args.json:
        print(json.dumps(results))
    else:
        for result in results:
            shown = ", ".join(f"{p['label']} {p['probability']:.1%}" for p in result["predictions"])
            print(f"{result['path']}: {shown}")
    return EXIT_ERROR if errors else 0


# --- trace -------------------------------------------------------------------------

DEFAULT_TRACE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "images" / "cat.png"


def add_trace_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="follow one image through forward and backward, "
                                            "layer by layer")
    p.add_argument("image", nargs="?", default=str(DEFAULT_TRACE_IMAGE),
                   help="image file (default: examples/images/cat.png)")
    p.add_argument("--label", help="class name or index for the loss (default: the "
                                   "predicted class)")
    p.add_argument("--weights", help="weights file (default: weights/lenet_cifar10.npz, "
                                     "the seed network)")
    add_kernels_option(p)
    p.set_defaults(handler=run_trace)


def run_trace(args) -> int:
    backend.use("numpy")
    weights = Path(args.weights) if args.weights else WEIGHTS_DIR / "lenet_cifar10.npz"
    model, metadata = load_model(weights)
    names = metadata["class_names"]
    x = data.normalize(load_image(args.image)[None], **metadata["normalization"])
    if args.label is None:
        label = int(model.eval().forward(x).argmax())
    elif args.label in names:
        label = names.index(args.label)
    elif args.label.isdigit() and int(args.label) < len(names):
        label = int(args.label)
    else:
        raise MinicnnError(f"--label must be a class name ({', '.join(names)}) "
                           f"or an index below {len(names)}, got {args.label!r}")
    print(f"{args.image} through {weights}, on the {kernels.of(model)} kernels\n")
    print("\n".join(trace_step(model, x, label, names)))
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        kernels.use(args.kernels)
        return args.handler(args)
    except (MinicnnError, OSError) as exc:     # OSError: disk full, permission denied, ...
        print(f"minicnn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"minicnn {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
