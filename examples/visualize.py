"""Pictures of a trained network: filters, feature maps, saliency, training curves.

    python examples/visualize.py weights/lenet_cifar10.npz examples/images/cat.png
    python examples/visualize.py weights/lenet_cifar10.npz --out runs/pictures

Writes PNG files into --out (default runs/visualize) and prints each path:
filters.png (first conv layer), features_layerK.png (each conv layer's
output for the image), saliency.png (the image and |d score / d pixel| for
the predicted class), curves.png (loss and accuracy per epoch, from the
history in WEIGHTS, or NAME.history.json beside it, or --history; needs
matplotlib).
Without IMAGE, examples/images/cat.png is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minicnn import backend, data
from minicnn.checkpoint import load_model
from minicnn.errors import MinicnnError
from minicnn.files import display, printable
from minicnn.images import load_image
from minicnn.validation import check_history
from minicnn.visualize import (curves, feature_map_grids, filter_grid, read_history, saliency,
                               saliency_image)

DEFAULT_IMAGE = Path(__file__).resolve().parent / "images" / "cat.png"


def visualize(weights: Path, image: Path, out: Path, history: Path | None) -> list[Path]:
    backend.use("numpy")
    model, metadata = load_model(weights)
    image_uint8 = load_image(image)                                   # (3, 32, 32)
    x = data.normalize(image_uint8[None], **metadata["normalization"])
    entries = history_of(weights, metadata, history)          # checked before writing anything
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(picture, name: str) -> None:
        path = out / name
        picture.save(path)
        written.append(path)

    save(filter_grid(model), "filters.png")
    for index, grid in feature_map_grids(model, x).items():
        save(grid, f"features_layer{index}.png")
    predicted = int(model.eval().forward(x).argmax())
    save(saliency_image(image_uint8, saliency(model, x, predicted)), "saliency.png")
    if entries:
        figure = curves(entries, title=display(weights.name))
        figure.savefig(out / "curves.png", dpi=100)
        written.append(out / "curves.png")
    print(f"{display(image)}: predicted {metadata['class_names'][predicted]}")
    return written


def history_of(weights: Path, metadata: dict, history: Path | None) -> list | None:
    """The history to plot: --history, else the one in the weights file, else the
    NAME.history.json that older runs wrote beside it; None if there is none."""
    if history is not None:
        return read_history(history)
    if "history" in metadata["training"]:
        return check_history(metadata["training"]["history"], display(weights),
                             "training.history")
    beside = weights.with_name(weights.stem + ".history.json")
    return read_history(beside) if beside.exists() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, help="weights file (.npz)")
    parser.add_argument("image", type=Path, nargs="?", default=DEFAULT_IMAGE)
    parser.add_argument("--out", type=Path, default=Path("runs/visualize"),
                        help="folder for the PNG files (default runs/visualize)")
    parser.add_argument("--history", type=Path,
                        help="training history JSON (default: next to the weights)")
    args = parser.parse_args(argv)
    try:
        for path in visualize(args.weights, args.image, args.out, args.history):
            print(f"wrote {display(path)}")
    except (MinicnnError, OSError) as exc:
        print(f"visualize: error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("visualize: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
