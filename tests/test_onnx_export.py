"""ONNX export: every registered model and a model of every layer, run in onnxruntime and
compared with minicnn; `minicnn export` and how it fails. The comparisons skip where onnx
or onnxruntime is not installed (pip install onnx onnxruntime)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import every_layer_model, example_images, lived_in, readme_model

from minicnn import Flatten, Linear, Module, Sequential, build_model, load_model, save_model
from minicnn.cli import main
from minicnn.errors import MinicnnError
from minicnn.models import MODELS

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx and onnxruntime are not installed (pip install onnx onnxruntime)")


def run_onnx(model, x):
    """Logits of an ONNX model (a file, or its bytes) in onnxruntime."""
    import onnxruntime
    source = model if isinstance(model, bytes) else str(model)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def assert_same_logits(got, want):
    """float32 tolerance, relative to the size of the logits."""
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))


def images(n, shape=(3, 32, 32), seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


ROOT = Path(__file__).resolve().parents[1]
MODELS_TO_EXPORT = {**{name: (lambda name=name: build_model(name)) for name in sorted(MODELS)},
                    "airnet width 8": lambda: build_model("airnet", width=8),
                    "every layer": every_layer_model, "readme": readme_model}


@needs_onnx
@pytest.mark.parametrize("name", list(MODELS_TO_EXPORT))
def test_onnxruntime_gives_minicnn_logits(name, tmp_path):
    from minicnn.onnx_export import export_onnx
    model = lived_in(MODELS_TO_EXPORT[name]())
    path = export_onnx(model, tmp_path / "m.onnx", class_names=["a", "b"])
    for n in (1, 5):                                   # any batch size
        x = images(n, seed=n)
        assert_same_logits(run_onnx(path, x), model.eval().forward(x))


@needs_onnx
@pytest.mark.parametrize("name", ["lenet", "airnet"])
def test_the_shipped_weights_on_the_example_images(name):
    """Trained weights and real pictures: logits of the size they have in use."""
    from minicnn.onnx_export import to_onnx
    model, metadata = load_model(ROOT / "weights" / f"{name}_cifar10.npz")
    x = example_images(metadata)
    got, want = run_onnx(to_onnx(model).SerializeToString(), x), model.eval().forward(x)
    assert_same_logits(got, want)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


@needs_onnx
def test_a_model_on_either_backend(tmp_path, xp):
    from minicnn import backend
    from minicnn.onnx_export import export_onnx
    model = lived_in(every_layer_model())             # built on the backend of the moment
    path = export_onnx(model, tmp_path / "m.onnx")
    x = images(3)
    assert_same_logits(run_onnx(path, x),
                       backend.to_host(model.eval().forward(backend.to_device(x))))


@needs_onnx
def test_the_file_says_what_it_holds(tmp_path):
    import onnx
    from minicnn.onnx_export import export_onnx
    model = every_layer_model()
    path = export_onnx(model, tmp_path / "m.onnx", class_names=["x", "y"],
                       normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
    proto = onnx.load(str(path))
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props == {"class_names": ["x", "y"], "normalization": {"mean": [0.5] * 3,
                                                                  "std": [0.25] * 3}}
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert {i.name for i in proto.graph.initializer} >= set(model.state_dict())
    ops = {node.op_type for node in proto.graph.node}
    assert ops >= {"Conv", "BatchNormalization", "Relu", "Add", "MaxPool", "GlobalAveragePool",
                   "Flatten", "Gemm", "Mul"}


@needs_onnx
def test_an_input_shape_of_your_choice(tmp_path):
    from minicnn import Conv2d, GlobalAvgPool2d, ReLU
    from minicnn.onnx_export import export_onnx
    model = Sequential(Conv2d(1, 4, 3), ReLU(), GlobalAvgPool2d(), Linear(4, 3))
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 20, 12))
    x = images(2, (1, 20, 12))
    assert_same_logits(run_onnx(path, x), model.eval().forward(x))


class Swish(Module):
    def forward(self, x):
        return x / (1 + np.exp(-x))


@needs_onnx
def test_a_layer_it_cannot_export_is_named_and_nothing_is_written(tmp_path):
    from minicnn.onnx_export import export_onnx
    model = Sequential(Flatten(), Sequential(Linear(3072, 4), Swish()), Linear(4, 2))
    with pytest.raises(MinicnnError, match=r"cannot export 1\.1 \(Swish\) to ONNX"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(MinicnnError, match="cannot take 3x30x30 inputs"):
        export_onnx(readme_model(), tmp_path / "m.onnx", input_shape=(3, 30, 30))
    assert list(tmp_path.iterdir()) == []


# --- minicnn export --------------------------------------------------------------------

@pytest.fixture
def weights(tmp_path):
    return save_model(lived_in(every_layer_model()), tmp_path / "mine.npz",
                      class_names=[str(i) for i in range(7)])


@needs_onnx
def test_export_command(weights, tmp_path, capsys):
    out = tmp_path / "out" / "mine.onnx"
    assert main(["export", "--weights", str(weights), "--onnx", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model, _ = load_model(weights)
    x = images(3)
    assert_same_logits(run_onnx(out, x), model.eval().forward(x))


@needs_onnx
def test_export_refuses_to_overwrite_without_force(weights, tmp_path, capsys):
    out = tmp_path / "mine.onnx"
    out.write_bytes(b"precious")
    assert main(["export", "--weights", str(weights), "--onnx", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; use --force" in err and out.read_bytes() == b"precious"
    assert main(["export", "--weights", str(weights), "--onnx", str(out), "--force"]) == 0
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize("case", ["missing weights", "unsupported layer", "input shape",
                                  "onnx missing", "folder"])
def test_export_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.onnx"
    weights = tmp_path / "w.npz"
    argv = ["export", "--weights", str(weights), "--onnx", str(out)]
    if case != "missing weights":
        save_model(readme_model(), weights)
    if case == "unsupported layer":
        monkeypatch.setitem(MODELS, "swishy", lambda: Sequential(Flatten(), Swish(),
                                                                  Linear(3072, 10)))
        save_model(build_model("swishy"), weights)
    if case == "input shape":
        argv += ["--input-shape", "3,16,16"]
    if case == "onnx missing":
        monkeypatch.setitem(sys.modules, "onnx", None)         # import onnx fails
    if case == "folder":
        out.mkdir()
    elif case != "onnx missing" and importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx is not installed: every case would be the onnx-missing one")
    assert main(argv) == 1
    err = capsys.readouterr().err
    expected = {"missing weights": "no such file", "unsupported layer": "(Swish)",
                "input shape": "cannot take 3x16x16 inputs", "onnx missing": "pip install",
                "folder": "is a folder"}[case]
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert out.is_dir() if case == "folder" else not out.exists()


@pytest.mark.parametrize("shape", ["3,32", "3,0,32", "a,b,c"])
def test_a_bad_input_shape_is_a_usage_error(shape, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--onnx", "m.onnx", "--input-shape", shape])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
