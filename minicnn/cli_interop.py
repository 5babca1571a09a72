"""``minicnn convert`` (weights to and from PyTorch) and ``minicnn export`` (ONNX).

Both read everything and check it before they write, write atomically, and
never overwrite an existing file without ``--force``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minicnn import architecture, backend, interop
from minicnn.checkpoint import CheckpointError, load_model, model_from_metadata, save_model
from minicnn.cli import default_weights, positive_int
from minicnn.errors import MinicnnError
from minicnn.models import MODELS, build_model


def check_output(path: Path, force: bool) -> None:
    """Refuse an output that is a folder, or that exists (unless --force)."""
    if path.is_dir():
        raise MinicnnError(f"{path} is a folder; give a file name")
    if path.exists() and not force:
        raise MinicnnError(f"{path} exists; use --force to overwrite it")


# --- convert -------------------------------------------------------------------------

def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="weights to and from PyTorch (.safetensors, .pt)",
        description="Convert a minicnn weights file (.npz) to PyTorch's state_dict of the same "
                    "layers (.safetensors; .pt or .pth where torch is installed), or back. The "
                    "suffixes give the direction. A PyTorch file does not say what model it "
                    "holds: name it with --model or --architecture, unless minicnn wrote the "
                    ".safetensors (it records the architecture in the file).")
    p.add_argument("source", help="the file to read")
    p.add_argument("target", help="the file to write")
    p.add_argument("--model", choices=sorted(MODELS),
                   help="into minicnn: the registered architecture the weights are for")
    p.add_argument("--width", type=positive_int, help="into minicnn: --model's width option")
    p.add_argument("--architecture", metavar="FILE",
                   help="into minicnn: a minicnn weights file of the same model (its class names "
                        "and normalization are taken too), or a JSON file as "
                        "minicnn.architecture.describe(model) gives")
    p.add_argument("--class-names", metavar="A,B,...",
                   help="into minicnn: the names of the model's outputs, in order (default: "
                        "the file's, else CIFAR-10's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing target")
    p.set_defaults(handler=run_convert, kernels=None)


def run_convert(args) -> int:
    backend.use("numpy")
    source, target = Path(args.source), Path(args.target)
    into_minicnn = target.suffix.lower() == ".npz"
    if into_minicnn == (source.suffix.lower() == ".npz"):
        raise MinicnnError(f"one of {source} and {target} must be a minicnn weights file "
                           f"(.npz), the other a PyTorch one ({', '.join(interop.SUFFIXES)})")
    check_output(target, args.force)
    if not into_minicnn:
        given = [f"--{name.replace('_', '-')}" for name in ("model", "width", "architecture",
                                                            "class_names")
                 if getattr(args, name) is not None]
        if given:
            raise MinicnnError(f"{', '.join(given)}: only for a PyTorch file into minicnn")
        model, metadata = load_model(source)
        interop.save_torch_weights(model, target, class_names=metadata["class_names"],
                                   normalization=metadata["normalization"])
        print(f"wrote {target}: the state_dict of {_what(model)} in PyTorch")
        return 0
    arrays, embedded = interop.read_torch_weights(source)
    model, metadata = _model_to_load(args, embedded, source)
    interop.load_torch_state_dict(model, arrays, source=str(source))
    class_names = args.class_names.split(",") if args.class_names else metadata.get("class_names")
    save_model(model, target, **({"class_names": class_names} if class_names else {}),
               normalization=metadata.get("normalization"), converted_from=source.name)
    print(f"wrote {target}: {_what(model)} with the weights of {source}")
    return 0


def _what(model) -> str:
    """'airnet', or for a model built by hand "a Sequential of 20,490 parameters"."""
    name = getattr(model, "name", None)
    return repr(name) if name else (f"a {model.layer_name()} of "
                                    f"{model.num_parameters():,} parameters")


def _model_to_load(args, embedded: dict | None, source: Path):
    """(model of fresh parameters, metadata to keep) for a PyTorch file coming in."""
    if args.width is not None and args.model is None:
        raise MinicnnError("--width goes with --model")
    if args.model is not None and args.architecture is not None:
        raise MinicnnError("give --model or --architecture, not both")
    if args.model is not None:
        return build_model(args.model, **({} if args.width is None else {"width": args.width})), {}
    if args.architecture is not None:
        return _read_architecture(Path(args.architecture))
    if embedded is not None:
        return model_from_metadata(embedded, source=str(source)), embedded
    raise MinicnnError(f"{source} does not say what model it holds; give --model "
                       f"({', '.join(sorted(MODELS))}) or --architecture FILE")


def _read_architecture(path: Path):
    if path.suffix.lower() == ".npz":
        return load_model(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not an architecture JSON file ({exc})") from None
    try:
        return architecture.build(spec), {}
    except architecture.ArchitectureError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


# --- export --------------------------------------------------------------------------

def input_shape(text: str) -> tuple:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be three positive whole numbers C,H,W, got {text}")
    return shape


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a model as ONNX, to run it with any ONNX runtime",
        description="Write the model of a weights file as an ONNX graph (opset 17, eval mode, "
                    "float32): input \"input\" (N, C, H, W), images normalized as the weights "
                    "file says (its metadata_props hold the class names and normalization), "
                    "output \"logits\" (N, classes). Needs the onnx package.")
    p.add_argument("--onnx", required=True, metavar="PATH", help="the ONNX file to write")
    p.add_argument("--weights", help="weights file (default: the best one in weights/)")
    p.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                   help="one input image's shape (default: the first layer's channels, 32x32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --onnx file")
    p.set_defaults(handler=run_export, kernels=None)


def run_export(args) -> int:
    from minicnn.onnx_export import export_onnx
    backend.use("numpy")
    out = Path(args.onnx)
    check_output(out, args.force)
    weights = Path(args.weights) if args.weights else default_weights()
    model, metadata = load_model(weights)
    export_onnx(model, out, args.input_shape, class_names=metadata["class_names"],
                normalization=metadata["normalization"])
    print(f"wrote {out}: {weights} as ONNX (input \"input\", output \"logits\"; the class "
          "names and normalization are in its metadata)")
    return 0
