"""Fault injection on the inputs: crafted weights files, data batches, images, file
names, environment variables and history files. Every case: one line on stderr
naming the file (and the field), the promised exit code, no traceback, no hang, and
bounded cost whatever the file claims."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cifar_folder
from faultkit import (CHILD_ENV, ROOT, assert_one_line, child, npz_arrays, npz_metadata,
                      rewrite_npz, run_cli, strict_json)
from PIL import Image

from minicnn import cli
from minicnn.fast import parallel

LENET = ROOT / "weights" / "lenet_cifar10.npz"
CAT = ROOT / "examples" / "images" / "cat.png"
DOG = ROOT / "examples" / "images" / "dog.png"


def classify(weights, *images, json_output=False):
    return ["classify", *images, "--weights", weights, *(["--json"] if json_output else [])]


# --- classify: nothing readable, file names -----------------------------------------------

@pytest.mark.parametrize("inputs", [["photo.jgp"], ["*.png"], ["-"], ["a.png", "b.png"]])
def test_classify_with_nothing_readable_is_one_line_per_input(tmp_path, capsys, monkeypatch,
                                                              inputs):
    """A typo, an unmatched glob or '-' gave a zero-size-array traceback (and with --json
    not even [])."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(classify(LENET, *inputs, json_output=True), capsys)
    assert code == 1 and strict_json(out) == []
    lines = err.splitlines()
    assert len(lines) == len(inputs) and "Traceback" not in err
    assert all("no such file" in line for line in lines)
    code, out, err = run_cli(classify(LENET, *inputs), capsys)
    assert code == 1 and out == "" and len(err.splitlines()) == len(inputs)


def test_file_names_of_any_bytes_are_printed_safely(tmp_path):
    """A name that is not UTF-8 under a UTF-8 stdout raised UnicodeEncodeError and lost
    the results after it; a newline in a name split its line."""
    odd = os.fsdecode(bytes(tmp_path) + b"/c\xffat.png")
    newline = str(tmp_path / "new\nline.png")
    shutil.copyfile(CAT, odd)
    shutil.copyfile(CAT, newline)
    missing = os.fsdecode(bytes(tmp_path) + b"/gone\xfe.png")
    result = child(classify(LENET, odd, newline, missing, DOG))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and "c\\xffat.png: cat" in lines[0]
    assert "new\\nline.png: cat" in lines[1] and lines[2].startswith(f"{DOG}: ")
    assert_one_line(1, result.stderr, 1, "gone\\xfe.png: no such file")
    result = child(classify(LENET, odd, newline, json_output=True))
    paths = [entry["path"] for entry in strict_json(result.stdout)]
    assert result.returncode == 0 and paths[0].endswith("c\\xffat.png")
    assert paths[1].endswith("new\\nline.png")


# --- crafted weights files ----------------------------------------------------------------

def metadata_with(**changes):
    metadata = npz_metadata(LENET)
    for key, value in changes.items():
        if value is DELETE:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return metadata


DELETE = object()
ODD_METADATA = {
    "normalization a string": ({"normalization": "imagenet"}, "field normalization"),
    "normalization of one channel": ({"normalization": {"mean": [0.5], "std": [0.2]}},
                                     "normalization has 1 channels"),
    "normalization std 0": ({"normalization": {"mean": [0.5] * 3, "std": [0.2, 0, 0.2]}},
                            "field normalization.std"),
    "normalization mean NaN": ({"normalization": {"mean": [float("nan")] * 3,
                                                  "std": [0.2] * 3}}, "field normalization.mean"),
    "normalization without std": ({"normalization": {"mean": [0.5] * 3}},
                                  "field normalization.std"),
    "class names a number": ({"class_names": 5}, "field class_names"),
    "class names too few": ({"class_names": ["cat", "dog", "frog"]},
                            "class_names has 3 names, but the model has 10 outputs"),
    "class name with a newline": ({"class_names": ["a\nb"] * 10}, "field class_names"),
    "format version as text": ({"format_version": "2"}, "field format_version"),
    "format version null": ({"format_version": None}, "field format_version"),
    "format version missing": ({"format_version": DELETE}, "field format_version"),
    "format version newer": ({"format_version": 99}, "newer than this minicnn"),
    "config a list": ({"config": [32]}, "field config"),
    "config with an unknown key": ({"config": {"width": 3}}, "bad config for model 'lenet'"),
    "config of the wrong type": ({"config": {"num_classes": "10"}},
                                 "num_classes must be a whole number"),
    "config too large": ({"config": {"num_classes": 10**9}}, "num_classes must be a whole"),
    "model a number": ({"model": 5}, "field model"),
    "model unknown": ({"model": "resnet"}, "unknown model 'resnet'"),
    "model built by hand": ({"model": "custom", "config": None}, "no architecture saved"),
    "tta as text": ({"tta": "yes"}, "field tta"),
    "test accuracy as text": ({"test_accuracy": "high"}, "field test_accuracy"),
    "another format": ({"format": "keras"}, "not a minicnn weights file"),
}


@pytest.mark.parametrize("case", sorted(ODD_METADATA))
def test_odd_weights_metadata_is_one_line_naming_the_field(tmp_path, capsys, case):
    changes, expected = ODD_METADATA[case]
    weights = rewrite_npz(LENET, tmp_path / "odd.npz", metadata_with(**changes))
    code, out, err = run_cli(classify(weights, CAT), capsys)
    assert_one_line(code, err, 1, "odd.npz", expected)
    assert out == ""


@pytest.mark.parametrize("missing", ["normalization", "class_names"])
def test_missing_optional_metadata_has_a_documented_default(tmp_path, capsys, missing):
    weights = rewrite_npz(LENET, tmp_path / "w.npz", metadata_with(**{missing: DELETE}))
    code, out, err = run_cli(classify(weights, CAT, json_output=True), capsys)
    assert code == 0 and err == ""
    labels = [p["label"] for p in strict_json(out)[0]["predictions"]]
    assert labels[0] == "cat"          # ten outputs: CIFAR-10's names (default_class_names)


@pytest.mark.parametrize("metadata,expected", [
    ("[1, 2]", "not a JSON object"), ("{not json", "corrupt metadata"),
    ("[" * 100_000 + "]" * 100_000, "corrupt metadata")])
def test_metadata_that_is_not_a_json_object(tmp_path, capsys, metadata, expected):
    content = npz_arrays(LENET)
    content["__metadata__"] = np.array(metadata)
    np.savez(tmp_path / "w.npz", **content)
    code, _, err = run_cli(classify(tmp_path / "w.npz", CAT), capsys)
    assert_one_line(code, err, 1, "w.npz", expected)


@pytest.mark.parametrize("value,expected", [
    (np.full((84,), np.nan, np.float32), "9.bias holds NaN or infinite values"),
    (np.full((84,), -np.inf, np.float32), "9.bias holds NaN or infinite values"),
    (np.arange(84), "9.bias holds int64, expected floating-point numbers"),
    (np.zeros((83,), np.float32), "9.bias has shape (83,), the model needs (84,)")])
def test_bad_arrays_are_refused_at_load(tmp_path, capsys, value, expected):
    weights = rewrite_npz(LENET, tmp_path / "w.npz", arrays={"9.bias": value})
    code, _, err = run_cli(classify(weights, CAT, json_output=True), capsys)
    assert_one_line(code, err, 1, "w.npz", expected)


def test_weights_too_large_for_float32_are_one_line_never_nan(tmp_path, capsys):
    """Finite weights whose outputs overflow gave nan% predictions, RuntimeWarnings and
    NaN in --json."""
    huge = {name: np.full_like(value, 1e30) for name, value in npz_arrays(LENET).items()}
    weights = rewrite_npz(LENET, tmp_path / "w.npz", arrays=huge)
    code, out, err = run_cli(classify(weights, CAT, json_output=True), capsys)
    assert_one_line(code, err, 1, "outputs are NaN or infinite")
    assert out == ""


def npy_bytes(shape, dtype="<f4", pad: int = 0) -> bytes:
    """An .npy header for ``shape``, then ``pad`` zero bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False,
                                                  "shape": shape})
    return header.getvalue() + bytes(pad)


def bomb(path, member: str, declared: int) -> Path:
    """The shipped lenet file with ``member`` replaced by a DEFLATE bomb of ``declared``
    bytes of zeros (a few tens of kilobytes on disk)."""
    with zipfile.ZipFile(LENET) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            if info.filename == member:
                target.writestr(member, npy_bytes((6, 3, 5, 5), pad=declared),
                                compress_type=zipfile.ZIP_DEFLATED)
            else:
                target.writestr(info, source.read(info))
    return Path(path)


@pytest.mark.parametrize("member", ["0.weight.npy", "__metadata__.npy"])
def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path, capsys, monkeypatch, member):
    """A 2.3 MB .npz took 2 GB and 20 s before it was refused: every member was
    decompressed before names were checked."""
    weights = bomb(tmp_path / "bomb.npz", member, 32 * 2**20)
    assert weights.stat().st_size < LENET.stat().st_size + 100_000
    read = {"bytes": 0}
    real_read = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        data = real_read(self, n)
        read["bytes"] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    code, _, err = run_cli(classify(weights, CAT), capsys)
    assert_one_line(code, err, 1, "bomb.npz", member.removesuffix(".npy"), "declares")
    assert read["bytes"] < 2_000_000             # the model's own members, not the bomb


def test_members_numpy_does_not_write_are_refused(tmp_path, capsys):
    with zipfile.ZipFile(LENET) as source, zipfile.ZipFile(tmp_path / "w.npz", "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_BZIP2)
    code, _, err = run_cli(classify(tmp_path / "w.npz", CAT), capsys)
    assert_one_line(code, err, 1, "w.npz", "unexpected member")


def test_one_odd_file_in_weights_does_not_break_the_default(tmp_path, capsys, monkeypatch):
    """An .npz dropped into weights/ with odd metadata broke every command that uses the
    default weights."""
    shutil.copyfile(LENET, tmp_path / "lenet.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    rewrite_npz(LENET, tmp_path / "odd.npz", metadata_with(test_accuracy="best"))
    rewrite_npz(LENET, tmp_path / "nested.npz", metadata_with(class_names=[["a"]] * 10))
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    os.mkfifo(tmp_path / "pipe.npz")
    monkeypatch.setattr(cli, "WEIGHTS_DIR", tmp_path)
    assert set(cli.shipped_weights()) == {tmp_path / "lenet.npz"}
    code, out, err = run_cli(["classify", CAT], capsys)
    assert code == 0 and err == "" and out.startswith(f"{CAT}: cat")


# --- FIFOs and other files that never end ---------------------------------------------------

def test_a_fifo_among_the_inputs_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = child(classify(LENET, fifo, CAT), timeout=60)
    assert_one_line(result.returncode, result.stderr, 1, "pipe.png: not a regular file")
    assert result.stdout.startswith(f"{CAT}: cat")
    for argv in (classify(fifo, CAT), classify(LENET, "/dev/zero")):
        result = child(argv, timeout=60)
        assert_one_line(result.returncode, result.stderr, 1, "not a regular file")


@pytest.mark.parametrize("batch", ["test_batch", "data_batch_1"])
def test_a_fifo_in_the_data_folder_is_refused(tmp_path, batch):
    folder = make_cifar_folder(tmp_path, per_batch=4)
    (folder / batch).unlink()
    os.mkfifo(folder / batch)
    argv = (["evaluate", "--weights", LENET] if batch == "test_batch"
            else ["train", "--out", tmp_path / "m.npz"])
    result = child([*argv, "--data-dir", folder], timeout=60)
    assert_one_line(result.returncode, result.stderr, 1, f"{batch}: not a regular file")


# --- crafted data batches -------------------------------------------------------------------

def write_raw_batch(path, labels, data=None) -> None:
    data = np.zeros((10, 3072), np.uint8) if data is None else data
    with open(path, "wb") as f:                 # protocol 4 writes b"" without a call
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=4)


def shared_references(depth: int = 11):
    """A list that holds 10**depth ints, in a pickle of a few hundred bytes."""
    nested = [0] * 10
    for _ in range(depth - 1):
        nested = [nested] * 10
    return nested


def test_a_test_batch_of_shared_references_is_refused_at_once(tmp_path):
    """A 2 MB test_batch whose labels were 10**11 shared references hung evaluate."""
    folder = make_cifar_folder(tmp_path, per_batch=4)
    write_raw_batch(folder / "test_batch", shared_references())
    assert (folder / "test_batch").stat().st_size < 100_000
    result = child(["evaluate", "--weights", LENET, "--data-dir", folder], timeout=60)
    assert_one_line(result.returncode, result.stderr, 1, "test_batch", "a label is list")


@pytest.mark.parametrize("labels,data,expected", [
    (["cat"] * 10, None, "a label is str 'cat'"),
    ([1.5] * 10, None, "a label is float"),
    ([True] * 10, None, "a label is bool"),
    (list(range(9)), None, "9 labels for 10 images"),
    ([-1] * 10, None, "labels outside 0..9"),
    (list(range(10)), [[0] * 3072] * 10, "b'data' has list"),
    (list(range(10)), np.zeros((10, 3072), np.float32), "dtype float32"),
    ([], np.zeros((0, 3072), np.uint8), "holds no images"),
    ({"x": 1}, None, "b'labels' is dict")])
def test_odd_data_batches_are_one_line(tmp_path, capsys, labels, data, expected):
    folder = make_cifar_folder(tmp_path, per_batch=4)
    write_raw_batch(folder / "test_batch", labels, data)
    code, _, err = run_cli(["evaluate", "--weights", LENET, "--data-dir", folder], capsys)
    assert_one_line(code, err, 1, "test_batch", expected)


# --- images ---------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none (92 bytes or so)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line_not_a_warning(tmp_path, capsys):
    """A 12000x12000 PNG of 92 bytes was decoded (750 MB) with Pillow's warning."""
    bomb_png = tmp_path / "bomb.png"
    bomb_png.write_bytes(png_header(12000, 12000))
    code, out, err = run_cli(classify(LENET, bomb_png, CAT), capsys)
    assert_one_line(code, err, 1, "bomb.png: more than 89,478,485 pixels")
    assert out.startswith(f"{CAT}: cat")


def test_an_image_with_nan_pixels_is_refused(tmp_path, capsys):
    values = np.full((40, 40), 0.5, np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    code, out, err = run_cli(classify(LENET, tmp_path / "nan.tif", CAT, json_output=True),
                             capsys)
    assert_one_line(code, err, 1, "nan.tif", "NaN or infinite pixel values")
    assert [entry["path"] for entry in strict_json(out)] == [str(CAT)]


# --- environment variables ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc", "0", "-1", "1e3", "99999", "٣"])
def test_a_bad_minicnn_threads_is_one_line(monkeypatch, capsys, value):
    monkeypatch.setenv("MINICNN_THREADS", value)
    monkeypatch.setattr(parallel, "_workers", None)         # read the variable again
    code, _, err = run_cli(classify(LENET, CAT), capsys)
    assert_one_line(code, err, 1, "MINICNN_THREADS must be a whole number between 1 and")


def test_a_bad_minicnn_processes_is_one_line(tmp_path, capsys, monkeypatch):
    folder = make_cifar_folder(tmp_path / "data", per_batch=4)
    monkeypatch.setenv("MINICNN_PROCESSES", "many")
    code, _, err = run_cli(["train", "--data-dir", folder, "--out", tmp_path / "m.npz",
                            "--epochs", "1", "--no-progress"], capsys)
    assert_one_line(code, err, 1, "MINICNN_PROCESSES must be a whole number")
    assert not (tmp_path / "m.npz").exists()


# --- visualize and trace --------------------------------------------------------------------

def visualize_main():
    """``minicnn visualize`` (examples/visualize.py is a thin wrapper of it)."""
    return lambda args: cli.main(["visualize", *args])


@pytest.mark.parametrize("history,expected", [
    ([1, 2, 3], "field (the list)[0] must be a JSON object"),
    ({"history": {"epoch": 1}}, "field history must be a list"),
    ([{"epoch": 1, "train_loss": "NaN", "train_accuracy": 0.5, "test_accuracy": 0.5}],
     "field (the list)[0].train_loss"),
    ({"history": [{"epoch": 2}]}, "field history[0].epoch")])
def test_visualize_with_an_odd_history_is_one_line(tmp_path, capsys, history, expected):
    """A history that was a JSON list gave a TypeError traceback."""
    (tmp_path / "h.json").write_text(json.dumps(history))
    code = visualize_main()(["--weights", str(LENET), "--history", str(tmp_path / "h.json"),
                             "--out", str(tmp_path / "pictures")])
    assert_one_line(code, capsys.readouterr().err, 1, "h.json", expected)
    assert not (tmp_path / "pictures").exists()


def test_visualize_takes_a_history_that_is_a_list(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    entries = json.loads((ROOT / "weights" / "lenet_cifar10.history.json").read_text())
    (tmp_path / "h.json").write_text(json.dumps(entries["history"]))
    code = visualize_main()(["--weights", str(LENET), "--history", str(tmp_path / "h.json"),
                             "--out", str(tmp_path / "pictures"), "--samples", "2"])
    assert code == 0 and list((tmp_path / "pictures").glob("*curves*.png"))


@pytest.mark.parametrize("command", ["trace", "visualize", "evaluate"])
def test_trace_visualize_evaluate_with_odd_metadata_are_one_line(tmp_path, capsys, command):
    weights = rewrite_npz(LENET, tmp_path / "odd.npz",
                          metadata_with(normalization={"mean": "x", "std": [1, 1, 1]}))
    if command == "visualize":
        code = visualize_main()(["--weights", str(weights), "--out", str(tmp_path / "pictures")])
        err = capsys.readouterr().err
    else:
        extra = ["--data-dir", make_cifar_folder(tmp_path, per_batch=4)] \
            if command == "evaluate" else []
        code, _, err = run_cli([command, "--weights", weights, *extra], capsys)
    assert_one_line(code, err, 1, "odd.npz", "field normalization.mean")


def test_visualize_refuses_a_fifo_history(tmp_path):
    fifo = tmp_path / "h.json"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, ROOT / "examples" / "visualize.py", "--weights",
                             LENET, "--history", fifo, "--out", tmp_path / "pictures"],
                            capture_output=True, text=True, env=CHILD_ENV, timeout=60)
    assert_one_line(result.returncode, result.stderr, 1, "h.json: not a regular file")
