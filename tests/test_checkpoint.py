"""save_model / load_model: one .npz, no pickle, atomic, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import backend, build_model, load_model, save_model
from minicnn.checkpoint import METADATA_KEY, CheckpointError, read_metadata


def test_round_trip(tmp_path, xp):
    model = build_model("lenet")
    names = [f"class {i}" for i in range(10)]
    path = save_model(model, tmp_path / "w.npz", class_names=names, test_accuracy=0.5)
    loaded, metadata = load_model(path)
    assert metadata["model"] == "lenet" and metadata["config"] == {}
    assert metadata["class_names"] == names and metadata["format_version"] == 1
    for name, value in model.state_dict().items():
        restored = loaded.state_dict()[name]
        assert backend.array_module(restored) is xp and restored.dtype == value.dtype
        np.testing.assert_array_equal(backend.to_host(restored), backend.to_host(value))
    x = backend.make_rng(0).standard_normal((2, 3, 32, 32)).astype(xp.float32)
    np.testing.assert_array_equal(backend.to_host(loaded.forward(x)),
                                  backend.to_host(model.forward(x)))
    assert read_metadata(path)["test_accuracy"] == 0.5


def test_file_is_plain_npz_without_pickles(tmp_path):
    path = save_model(build_model("lenet"), tmp_path / "w.npz")
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {METADATA_KEY, *build_model("lenet").state_dict()}
        assert npz["0.weight"].shape == (6, 3, 5, 5)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = save_model(build_model("lenet"), tmp_path / "w.npz", note="first")
    before = path.read_bytes()

    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError):
        save_model(build_model("lenet"), path, note="second")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_missing_corrupt_and_mismatched_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(CheckpointError, match="not a minicnn weights file"):
        load_model(tmp_path / "junk.npz")
    with pytest.raises(CheckpointError, match="folder"):
        load_model(tmp_path)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="no metadata"):
        load_model(tmp_path / "plain.npz")
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "objects.npz")


def test_names_and_shapes_are_checked(tmp_path):
    model = build_model("lenet")
    model.layers[0].params["weight"] = np.zeros((6, 3, 3, 3), np.float32)
    path = save_model(model, tmp_path / "w.npz")
    with pytest.raises(CheckpointError, match=r"0\.weight has shape \(6, 3, 3, 3\)"):
        load_model(path)
    model = build_model("lenet")
    del model.layers[11].params["bias"]
    path = save_model(model, tmp_path / "w2.npz")
    with pytest.raises(CheckpointError, match=r"missing \['11.bias'\]"):
        load_model(path)


def test_unknown_model_or_newer_format(tmp_path):
    from conftest import read_npz

    from minicnn.checkpoint import write_npz_atomic
    model = build_model("lenet")
    model.name = "not-registered"           # registered elsewhere: rebuilt from its architecture
    loaded, metadata = load_model(save_model(model, tmp_path / "a.npz"))
    assert loaded.name == "not-registered" and metadata["architecture"]["type"] == "Sequential"
    arrays, metadata = read_npz(tmp_path / "a.npz")
    del metadata["architecture"]
    write_npz_atomic(tmp_path / "a.npz", arrays, metadata)
    with pytest.raises(CheckpointError, match="unknown model 'not-registered'"):
        load_model(tmp_path / "a.npz")
    model = build_model("lenet")
    path = save_model(model, tmp_path / "b.npz")
    from minicnn.checkpoint import write_npz_atomic
    write_npz_atomic(path, model.state_dict(), {**read_metadata(path), "format_version": 99})
    with pytest.raises(CheckpointError, match="newer"):
        load_model(path)
