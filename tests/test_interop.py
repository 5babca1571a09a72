"""PyTorch weights in and out: `minicnn convert` between minicnn's .npz and PyTorch's
state_dict (.safetensors, .pt), round trips of lenet and airnet through PyTorch with the
logits compared, and how bad input fails. Skips where safetensors or torch is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import every_layer_model, example_images, lived_in

from minicnn import BatchNorm2d, build_model, kernels, load_model, save_model
from minicnn.checkpoint import CheckpointError
from minicnn.cli import main
from minicnn.interop import load_torch_state_dict, read_torch_weights, torch_state_dict

needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="safetensors is not installed "
                                              "(pip install safetensors)")
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (pip install torch)")


ROOT = Path(__file__).resolve().parents[1]


def images(n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


@needs_safetensors
def test_npz_to_safetensors_and_back_needs_nothing_else(tmp_path, capsys):
    model = lived_in(every_layer_model())
    weights = save_model(model, tmp_path / "m.npz", class_names=[f"k{i}" for i in range(7)])
    assert convert(weights, tmp_path / "m.safetensors") == 0
    arrays, _ = read_torch_weights(tmp_path / "m.safetensors")
    # PyTorch's names: BatchNorm's missing gamma / beta and its counter are there
    assert set(arrays) == set(torch_state_dict(model)) > set(model.state_dict())
    np.testing.assert_array_equal(arrays["1.weight"], np.ones(6, np.float32))
    assert arrays["1.num_batches_tracked"].dtype == np.int64
    assert convert(tmp_path / "m.safetensors", tmp_path / "back.npz") == 0
    back, metadata = load_model(tmp_path / "back.npz")
    assert metadata["class_names"] == [f"k{i}" for i in range(7)]
    assert metadata["converted_from"] == "m.safetensors"
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value)
    x = images()                      # on the same kernels (load_model's are the default)
    back = kernels.prepare(back, kernels.of(model))
    np.testing.assert_array_equal(back.eval().forward(x), model.eval().forward(x))
    assert "wrote" in capsys.readouterr().out


@needs_safetensors
def test_either_backend(tmp_path, xp):
    from minicnn import backend
    from minicnn.interop import load_torch_weights, save_torch_weights
    model = lived_in(every_layer_model())             # built on the backend of the moment
    save_torch_weights(model, tmp_path / "m.safetensors")
    copy = every_layer_model()
    load_torch_weights(copy, tmp_path / "m.safetensors")
    for name, value in model.state_dict().items():
        assert backend.array_module(copy.state_dict()[name]) is xp
        np.testing.assert_array_equal(backend.to_host(copy.state_dict()[name]),
                                      backend.to_host(value))


def test_a_batch_norm_without_gamma_takes_only_ones():
    layer = BatchNorm2d(3, weight=False)
    arrays = torch_state_dict(layer)
    load_torch_state_dict(layer, arrays)                         # ones: accepted
    arrays["weight"] = np.full(3, 2.0, np.float32)
    with pytest.raises(CheckpointError, match="weight is not all 1, but the model's "
                                              "BatchNorm2d '' has a fixed scale of 1"):
        load_torch_state_dict(layer, arrays)
    arrays["weight"] = np.ones(3, np.float32)
    arrays["running_mean"] = np.zeros(3, np.int32)
    with pytest.raises(CheckpointError, match="running_mean holds int32 values"):
        load_torch_state_dict(layer, arrays)


# --- through PyTorch ----------------------------------------------------------------------

def torch_model_with_other_weights(name):
    """PyTorch's version of the registered model, with fresh weights (not the file's)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_mirror import torch_mirror
    return torch_mirror(build_model(name)).eval()


def torch_logits(torch_model, x):
    import torch
    with torch.no_grad():
        return torch_model.eval()(torch.from_numpy(x)).numpy()


def assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))


@needs_torch
@needs_safetensors
@pytest.mark.parametrize("name", ["lenet", "airnet"])
def test_round_trip_through_pytorch(name, tmp_path):
    import torch
    from safetensors.torch import save_file
    weights = ROOT / "weights" / f"{name}_cifar10.npz"        # trained: logits of real size
    model, metadata = load_model(weights)
    x = example_images(metadata)

    # minicnn -> PyTorch: both kinds of file load into PyTorch's model, strictly
    for suffix in (".safetensors", ".pt"):
        assert convert(weights, tmp_path / f"m{suffix}") == 0
        torch_model = torch_model_with_other_weights(name)
        if suffix == ".pt":
            state = torch.load(tmp_path / "m.pt", weights_only=True)
        else:
            arrays, _ = read_torch_weights(tmp_path / "m.safetensors")
            state = {k: torch.from_numpy(v) for k, v in arrays.items()}
        torch_model.load_state_dict(state, strict=True)
        assert_close(torch_logits(torch_model, x), model.eval().forward(x))

    # PyTorch -> minicnn: weights trained in PyTorch, saved as PyTorch users do
    torch_model.train()
    optimizer = torch.optim.SGD([p for p in torch_model.parameters() if p.requires_grad], lr=0.1)
    batch = torch.from_numpy(images(8, seed=10))
    torch.nn.functional.cross_entropy(torch_model(batch), torch.arange(8)).backward()
    optimizer.step()                    # and BatchNorm's running statistics moved in train()
    expected = torch_logits(torch_model, x)
    torch.save(torch_model.state_dict(), tmp_path / "trained.pt")
    save_file(torch_model.state_dict(), tmp_path / "trained.safetensors")
    for suffix in (".pt", ".safetensors"):
        out = tmp_path / f"from{suffix}.npz"
        assert convert(tmp_path / f"trained{suffix}", out, "--model", name) == 0
        back, _ = load_model(out)
        assert_close(back.eval().forward(x), expected)
        assert np.abs(back.eval().forward(x) - model.eval().forward(x)).max() > 0.1


@needs_torch
def test_a_checkpoint_dict_around_the_state_dict_is_unwrapped(tmp_path):
    import torch
    model = lived_in(build_model("lenet"))
    state = {k: torch.from_numpy(v) for k, v in torch_state_dict(model).items()}
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "ckpt.pt")
    assert convert(tmp_path / "ckpt.pt", tmp_path / "m.npz", "--model", "lenet") == 0
    x = images()
    np.testing.assert_array_equal(load_model(tmp_path / "m.npz")[0].eval().forward(x),
                                  model.eval().forward(x))


@needs_torch
def test_a_pickle_with_code_is_refused(tmp_path, capsys):
    import torch
    torch.save({"weight": torch.zeros(2), "thing": Path("x")}, tmp_path / "code.pt")
    assert convert(tmp_path / "code.pt", tmp_path / "m.npz", "--model", "lenet") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights_only=True" in err
    assert not (tmp_path / "m.npz").exists()


# --- bad input: one line, non-zero exit, nothing written ----------------------------------

@pytest.fixture
def files(tmp_path):
    airnet = save_model(build_model("airnet", width=4), tmp_path / "airnet.npz")
    lenet = save_model(build_model("lenet"), tmp_path / "lenet.npz")
    return {"airnet": airnet, "lenet": lenet, "dir": tmp_path}


CASES = {
    "missing source": (["nope.safetensors", "out.npz", "--model", "lenet"], "no such file"),
    "missing npz": (["nope.npz", "out.safetensors"], "no such file"),
    "two npz": (["lenet.npz", "out.npz"], "one of"),
    "two torch": (["x.safetensors", "out.pt"], "one of"),
    "wrong shapes": (["lenet.safetensors", "out.npz", "--model", "airnet"],
                     "parameters do not match the model"),
    "no architecture": (["plain.safetensors", "out.npz"], "does not say what model"),
    "corrupt": (["corrupt.safetensors", "out.npz", "--model", "lenet"],
                "not a safetensors file"),
    "torch missing": (["lenet.pt", "out.npz", "--model", "lenet"], "pip install torch"),
    "torch missing out": (["lenet.npz", "out.pt"], "pip install torch"),
    "safetensors missing": (["lenet.safetensors", "out.npz"], "pip install"),
    "width alone": (["lenet.safetensors", "out.npz", "--width", "8"], "--width goes with"),
    "options going out": (["lenet.npz", "out.safetensors", "--model", "lenet"],
                          "only for a PyTorch file into minicnn"),
    "bad architecture json": (["lenet.safetensors", "out.npz", "--architecture", "arch.json"],
                              "arch.json: architecture.layers: must be a non-empty list"),
    "target exists": (["lenet.safetensors", "exists.npz"], "exists; use --force"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, files, capsys, monkeypatch):
    argv, expected = CASES[case]
    folder = files["dir"]
    needs = {"safetensors": any(a.endswith(".safetensors") for a in argv[:2]),
             "torch": case == "torch missing"}
    if case not in ("safetensors missing", "torch missing", "torch missing out"):
        for package, needed in needs.items():
            if needed and importlib.util.find_spec(package) is None:
                pytest.skip(f"{package} is not installed")
    if importlib.util.find_spec("safetensors") is not None:
        assert convert(files["lenet"], folder / "lenet.safetensors") == 0
        from safetensors.numpy import save_file
        save_file({"w": np.zeros(2, np.float32)}, str(folder / "plain.safetensors"))
    (folder / "corrupt.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{not json")
    (folder / "lenet.pt").write_bytes(b"not read: torch is missing")
    (folder / "arch.json").write_text('{"type": "Sequential", "layers": []}')
    (folder / "exists.npz").write_bytes(b"precious")
    if case in ("torch missing", "torch missing out"):
        monkeypatch.setitem(sys.modules, "torch", None)
    if case == "safetensors missing":
        monkeypatch.setitem(sys.modules, "safetensors", None)
        (folder / "lenet.safetensors").write_bytes(b"not read")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert convert(*[folder / a if i < 2 or a.endswith(".json") else a
                     for i, a in enumerate(argv)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


@needs_safetensors
def test_force_overwrites_and_architecture_from_a_weights_file(files, capsys):
    folder = files["dir"]
    assert convert(files["airnet"], folder / "a.safetensors") == 0
    from safetensors.numpy import load_file, save_file
    save_file(load_file(str(folder / "a.safetensors")), str(folder / "bare.safetensors"))
    (folder / "out.npz").write_bytes(b"old")
    assert convert(folder / "bare.safetensors", folder / "out.npz", "--architecture",
                   files["airnet"], "--force", "--class-names", ",".join("abcdefghij")) == 0
    model, metadata = load_model(folder / "out.npz")
    assert metadata["model"] == "airnet" and metadata["config"] == {"width": 4}
    assert metadata["class_names"] == list("abcdefghij")
    original, _ = load_model(files["airnet"])
    x = images(2)
    np.testing.assert_array_equal(model.eval().forward(x), original.eval().forward(x))
