"""Any model of minicnn's layers saved with its architecture, rebuilt by load_model, and
served by classify, evaluate and trace; every field of a description checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import every_layer_model, read_npz, readme_model
from minicnn import (Conv2d, Flatten, GlobalAvgPool2d, Linear, Module, Residual, Sequential,
                     backend, build_model, kernels, load_model, register, save_model)
from minicnn.architecture import ArchitectureError, build, describe, output_shape
from minicnn.checkpoint import CheckpointError, write_npz_atomic
from minicnn.cli import main
from minicnn.data import CIFAR10_MEAN, CLASS_NAMES
from minicnn.models import MODELS


def randomize(model, seed=1):
    """Every parameter and buffer random (BatchNorm's statistics too), so a copy that
    mixed up two arrays or skipped one would give other logits."""
    rng = np.random.default_rng(seed)
    for _, holder, key in model.named_arrays():
        holder[key] = backend.to_device(rng.uniform(0.5, 1.5, holder[key].shape)
                                        .astype(np.float32))
    return model


def images(n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("make", [readme_model, every_layer_model,
                                  lambda: build_model("lenet"), lambda: build_model("airnet")])
def test_describe_and_build_round_trip(make):
    model = randomize(make())
    spec = describe(model)
    assert json.loads(json.dumps(spec)) == spec             # plain JSON
    rebuilt = build(spec)
    assert describe(rebuilt) == spec
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
           {k: v.shape for k, v in model.state_dict().items()}


def test_save_and_load_a_model_built_by_hand(tmp_path, xp):
    """The issue's case: no name, no class names, no normalization given."""
    model = randomize(every_layer_model())
    path = save_model(model, tmp_path / "mine.npz")
    loaded, metadata = load_model(path)
    assert metadata["model"] is None and metadata["architecture"] == describe(model)
    assert metadata["class_names"] == [str(i) for i in range(7)]     # 7 outputs: not CIFAR-10
    assert metadata["normalization"]["mean"] == list(CIFAR10_MEAN)
    assert kernels.of(loaded) == kernels.default()
    assert all(backend.array_module(v) is xp for v in loaded.state_dict().values())
    x = backend.to_device(images())
    np.testing.assert_allclose(backend.to_host(loaded.eval().forward(x)),
                               backend.to_host(model.eval().forward(x)), rtol=1e-5, atol=1e-6)


def test_a_file_without_class_names_gets_the_defaults(tmp_path):
    path = save_model(readme_model(), tmp_path / "m.npz")
    arrays, metadata = read_npz(path)
    del metadata["class_names"], metadata["normalization"]
    write_npz_atomic(path, arrays, metadata)
    _, metadata = load_model(path)
    assert metadata["class_names"] == list(CLASS_NAMES) and "normalization" in metadata


def test_built_on_the_kernels_of_the_moment():
    kernels.use("reference")
    assert kernels.of(build(describe(readme_model()))) == "reference"
    kernels.use("fast")
    fast = build(describe(readme_model()))
    assert kernels.of(fast) == "fast" and describe(fast) == describe(readme_model())


class Swish(Module):                       # a layer of the user's own
    def forward(self, x):
        return x / (1 + np.exp(-x))


def test_a_layer_of_your_own_is_named_and_nothing_is_written(tmp_path):
    model = Sequential(Conv2d(3, 4, 3), Residual(Swish()), Flatten(), Linear(4 * 30 * 30, 10))
    with pytest.raises(ArchitectureError, match=r"model\[1\]\.body is Swish.*register"):
        describe(model)
    with pytest.raises(ArchitectureError, match="Swish"):
        save_model(model, tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


def test_a_registered_model_with_its_own_layer_keeps_its_name(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "swishnet", lambda: Sequential(Flatten(), Swish(),
                                                                Linear(3 * 32 * 32, 10)))
    model = build_model("swishnet")
    _, metadata = load_model(save_model(model, tmp_path / "m.npz"))
    assert metadata["model"] == "swishnet" and "architecture" not in metadata


def test_fit_refuses_a_model_it_could_not_save_before_training(tiny_cifar, tmp_path):
    from minicnn.data import load_cifar10
    from minicnn.train import TrainConfig, fit
    train, test = load_cifar10(tiny_cifar)
    with pytest.raises(ArchitectureError, match="Swish"):
        fit(Sequential(Flatten(), Swish(), Linear(3072, 10)), train, test, TrainConfig(epochs=1),
            tmp_path / "m.npz", progress=False)
    assert not (tmp_path / "m.npz").exists()


CONV = {"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3}


@pytest.mark.parametrize("spec,message", [
    ([], r"architecture: must be an object"),
    ({"type": "Dense"}, r"architecture\.type: must be one of Sequential, Residual, Conv2d"),
    ({"type": "Sequential"}, r"architecture\.layers: must be a non-empty list"),
    ({"type": "Sequential", "layers": []}, r"architecture\.layers: must be a non-empty list"),
    ({"type": "Sequential", "layers": [CONV, {**CONV, "kernel_size": 0}]},
     r"architecture\.layers\[1\]\.kernel_size: must be a whole number >= 1, got 0"),
    ({"type": "Sequential", "layers": [{**CONV, "kernel_size": [3, 2, 1]}]},
     r"layers\[0\]\.kernel_size: must be a whole number or a list of two"),
    ({**CONV, "stride": 1.5}, r"architecture\.stride: must be a whole number >= 1, got 1\.5"),
    ({**CONV, "padding": True}, r"architecture\.padding: must be a whole number >= 0"),
    ({**CONV, "bias": "yes"}, r"architecture\.bias: must be true or false"),
    ({**CONV, "dilation": 2}, r"architecture\.dilation: not a field of Conv2d"),
    ({"type": "Conv2d", "in_channels": 3, "kernel_size": 3},
     r"architecture\.out_channels: missing"),
    ({"type": "Residual"}, r"architecture\.body: missing"),
    ({"type": "Residual", "body": {"type": "ReLU", "inplace": True}},
     r"architecture\.body\.inplace: not a field of ReLU \(it has none\)"),
    ({"type": "Scale", "factor": float("nan")}, r"architecture\.factor: must be a finite number"),
    ({"type": "BatchNorm2d", "num_features": 4, "momentum": 2.0},
     r"architecture: BatchNorm2d needs 0 <= momentum <= 1"),
    ({"type": "MaxPool2d", "kernel_size": 2, "padding": 2},
     r"architecture: MaxPool2d padding must be between 0 and kernel_size // 2"),
])
def test_every_field_is_checked(spec, message):
    with pytest.raises(ArchitectureError, match=message):
        build(spec)


def test_nesting_too_deep_is_refused():
    spec = {"type": "ReLU"}
    for _ in range(100):
        spec = {"type": "Residual", "body": spec}
    with pytest.raises(ArchitectureError, match="nested more than"):
        build(spec)


def test_a_crafted_architecture_in_a_file_is_one_clear_error(tmp_path):
    path = save_model(readme_model(), tmp_path / "m.npz")
    arrays, metadata = read_npz(path)
    metadata["architecture"]["layers"][0]["out_channels"] = -8
    write_npz_atomic(path, arrays, metadata)
    with pytest.raises(CheckpointError, match=r"m\.npz: architecture\.layers\[0\]\.out_channels"):
        load_model(path)
    metadata["architecture"]["layers"][0]["out_channels"] = 9        # well-formed, wrong size
    write_npz_atomic(path, arrays, metadata)
    with pytest.raises(CheckpointError, match=r"0\.weight has shape \(8, 3, 3, 3\)"):
        load_model(path)


def test_output_shape_keeps_the_modes_and_names_a_misfit():
    model = readme_model().train()
    assert output_shape(model, (3, 32, 32)) == (10,)
    assert all(m.training for _, m in model.modules())
    with pytest.raises(ArchitectureError, match="cannot take 3x28x28 inputs: Linear expected"):
        output_shape(model, (3, 28, 28))


# --- the commands on a file of a model built by hand ----------------------------------

@pytest.fixture
def mine(tmp_path):
    return save_model(randomize(every_layer_model().astype(np.float32)), tmp_path / "mine.npz",
                      class_names=[f"c{i}" for i in range(7)])


def test_classify_evaluate_and_trace_serve_it(mine, tiny_cifar, capsys):
    cat = "examples/images/cat.png"
    assert main(["classify", cat, "--weights", str(mine), "--json", "--top-k", "7"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(p["label"] for p in result[0]["predictions"]) == [f"c{i}" for i in range(7)]
    assert main(["trace", cat, "--weights", str(mine), "--label", "c3"]) == 0
    out = capsys.readouterr().out
    assert "label 3 (c3)" in out and "dL/dbody.0.weight" in out and "\n 4 Residual(" in out
    write = save_model(randomize(readme_model()), mine.with_name("ten.npz"))
    assert main(["evaluate", "--weights", str(write), "--data-dir", str(tiny_cifar),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 20


def test_a_model_that_does_not_fit_the_images_or_the_names_is_one_line(mine, tmp_path, capsys):
    wrong = save_model(Sequential(Flatten(), Linear(100, 10)), tmp_path / "wrong.npz")
    for argv in (["classify", "examples/images/cat.png"], ["trace"]):
        assert main([*argv, "--weights", str(wrong)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot take 3x32x32 inputs" in err
    two = save_model(Sequential(Flatten(), Linear(3072, 2)), tmp_path / "two.npz")
    arrays, metadata = read_npz(two)
    write_npz_atomic(two, arrays, {**metadata, "class_names": list(CLASS_NAMES)})
    assert main(["classify", "examples/images/cat.png", "--weights", str(two)]) == 1
    assert "class_names has 10 names, but the model has 2 outputs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="10 class names for a model with 2 outputs"):
        save_model(Sequential(Flatten(), Linear(3072, 2)), tmp_path / "other.npz",
                   class_names=CLASS_NAMES)


def test_trace_of_a_model_that_is_not_sequential_is_a_clear_error():
    from minicnn.errors import MinicnnError
    from minicnn.trace import trace_step
    with pytest.raises(MinicnnError, match="Sequential model layer by layer; this model is a "
                                           "Residual"):
        trace_step(Residual(Conv2d(3, 3, 1)), images(1), 0)


def test_register_is_how_a_model_keeps_a_name(tmp_path, monkeypatch):
    monkeypatch.setattr("minicnn.models.MODELS", dict(MODELS))
    register("tiny")(lambda width=2: Sequential(Conv2d(3, width, 3), GlobalAvgPool2d(),
                                                 Linear(width, 10)))
    model = build_model("tiny", width=3)
    _, metadata = load_model(save_model(model, tmp_path / "t.npz"))
    assert (metadata["model"], metadata["config"]) == ("tiny", {"width": 3})
    assert metadata["architecture"] == describe(model)
