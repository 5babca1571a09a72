"""The command line: train / evaluate / classify, and how they fail on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicnn import build_model, save_model
from minicnn.cli import main
from minicnn.data import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def weights(tmp_path) -> Path:
    return save_model(build_model("lenet"), tmp_path / "w.npz", class_names=list(CLASS_NAMES),
                      normalization={"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
                      test_accuracy=0.1)


def picture(mode="RGB", size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.fixture
def images(tmp_path) -> dict:
    """One file per awkward kind of image Pillow can read."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = {}
    for name, mode, ext in [("rgb", "RGB", "png"), ("gray", "L", "png"), ("rgba", "RGBA", "png"),
                            ("palette", "P", "gif"), ("cmyk", "CMYK", "jpg"), ("bw", "1", "bmp")]:
        paths[name] = folder / f"{name}.{ext}"
        picture(mode).save(paths[name])
    paths["gray16"] = folder / "gray16.png"
    Image.fromarray(np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).save(paths["gray16"])
    paths["tiny"] = folder / "tiny.png"
    picture(size=(1, 1)).save(paths["tiny"])
    paths["huge"] = folder / "huge.jpg"
    picture(size=(1500, 700)).save(paths["huge"])
    paths["animated"] = folder / "animated.gif"
    frames = [picture("P"), picture("P").rotate(90)]
    frames[0].save(paths["animated"], save_all=True, append_images=frames[1:])
    paths["exif"] = folder / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                       # orientation: rotate 90 degrees
    picture().save(paths["exif"], exif=exif)
    return paths


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_any_kind_of_image(images, weights, capsys):
    paths = [str(p) for p in images.values()]
    code, out, err = run_cli(["classify", *paths, "--weights", str(weights), "--json"], capsys)
    assert code == 0 and err == ""
    results = json.loads(out)
    assert [r["path"] for r in results] == paths
    for result in results:
        probabilities = [p["probability"] for p in result["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(p["label"] in CLASS_NAMES for p in result["predictions"])


def test_classify_text_output_and_top_k(images, weights, capsys):
    code, out, _ = run_cli(["classify", str(images["rgb"]), "--weights", str(weights),
                            "--top-k", "10"], capsys)
    assert code == 0
    line = out.strip()
    assert line.startswith(f"{images['rgb']}: ") and line.count("%") == 10


def test_exif_rotation_is_applied(images):
    from minicnn.images import load_image
    rotated = load_image(images["exif"])
    stored = Image.open(images["exif"])
    lanczos = Image.Resampling.LANCZOS
    upright = np.asarray(stored.transpose(Image.Transpose.ROTATE_270).resize((32, 32), lanczos))
    plain = np.asarray(stored.resize((32, 32), lanczos))
    upright, plain = upright.transpose(2, 0, 1), plain.transpose(2, 0, 1)
    assert np.abs(rotated.astype(int) - upright).mean() < np.abs(rotated.astype(int) - plain).mean()


def test_bad_images_are_reported_one_line_each(images, weights, tmp_path, capsys):
    bad = {"missing": tmp_path / "missing.png", "empty": tmp_path / "empty.png",
           "text": tmp_path / "notes.png", "folder": tmp_path, "truncated": tmp_path / "cut.png"}
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("hello, not an image")
    bad["truncated"].write_bytes(images["rgb"].read_bytes()[:200])
    argv = ["classify", str(images["rgb"]), *map(str, bad.values()), str(images["gray"]),
            "--weights", str(weights), "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code != 0
    assert [r["path"] for r in json.loads(out)] == [str(images["rgb"]), str(images["gray"])]
    lines = err.strip().splitlines()
    assert len(lines) == len(bad)
    for line, path in zip(lines, bad.values(), strict=True):
        assert str(path) in line and "Traceback" not in line


def test_bad_weights_file(images, tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_text("nope")
    code, out, err = run_cli(["classify", str(images["rgb"]), "--weights", str(junk)], capsys)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and str(junk) in err


@pytest.mark.parametrize("argv", [["classify", "x.png", "--top-k", "0"],
                                  ["classify", "x.png", "--backend", "tpu"],
                                  ["train", "--epochs", "many"], ["train", "--lr", "-1"],
                                  ["evaluate", "--nonsense"], ["frobnicate"]])
def test_bad_options_give_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_top_k_larger_than_classes(images, weights, capsys):
    code, _, err = run_cli(["classify", str(images["rgb"]), "--weights", str(weights),
                            "--top-k", "11"], capsys)
    assert code == 1 and "--top-k 11" in err


def test_train_evaluate_resume_and_no_overwrite(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run" / "model.npz"
    common = ["--data-dir", str(tiny_cifar), "--out", str(out), "--no-progress"]
    code, stdout, _ = run_cli(["train", "--epochs", "1", "--batch-size", "16", *common], capsys)
    assert code == 0 and "test accuracy" in stdout and out.is_file()
    assert (tmp_path / "run" / "model.resume.npz").is_file()

    before = out.read_bytes()
    code, _, err = run_cli(["train", "--epochs", "1", *common], capsys)
    assert code == 1 and "model.resume.npz exist;" in err and out.read_bytes() == before

    code, _, err = run_cli(["train", "--resume", "--lr", "0.5", *common], capsys)
    assert code == 1 and "--lr 0.5 (saved 0.05)" in err

    code, stdout, _ = run_cli(["train", "--resume", *common], capsys)
    assert code == 0 and "nothing to do" in stdout

    code, stdout, _ = run_cli(["evaluate", "--weights", str(out), "--data-dir", str(tiny_cifar),
                               "--json"], capsys)
    result = json.loads(stdout)
    assert code == 0 and result["n"] == 20
    assert set(result) >= {"accuracy", "per_class", "n", "confusion"}
    code, stdout, _ = run_cli(["evaluate", "--weights", str(out), "--data-dir", str(tiny_cifar)],
                              capsys)
    assert code == 0 and "confusion matrix" in stdout and "airplane" in stdout


def test_unwritable_out_fails_before_training(tmp_path, tiny_cifar, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["train", "--data-dir", str(tiny_cifar), "--out",
                            str(blocker / "sub" / "w.npz")], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run_cli(["train", "--data-dir", str(tiny_cifar), "--out", str(tmp_path)],
                           capsys)
    assert code == 1 and "is a folder" in err


def test_missing_data_is_one_line(tmp_path, capsys):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    (empty / "x").write_text("x")
    code, _, err = run_cli(["train", "--data-dir", str(empty), "--out", str(tmp_path / "w.npz")],
                           capsys)
    assert code == 1 and err.count("\n") == 1 and "no CIFAR-10" in err


def test_cupy_backend_without_cupy_is_one_line(images, weights, capsys, without_cupy):
    code, _, err = run_cli(["classify", str(images["rgb"]), "--weights", str(weights),
                            "--backend", "cupy"], capsys)
    assert code == 1 and err.count("\n") == 1 and "pip install" in err


@pytest.mark.parametrize("command", [[sys.executable, "-m", "minicnn"],
                                     [sys.executable, str(ROOT / "examples" / "classify.py")]])
def test_entry_points_run_as_scripts(command, images, weights):
    if command[-1] == "minicnn":
        command = [*command, "classify"]
    result = subprocess.run([*command, str(images["rgb"]), "--weights", str(weights)],
                            capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(images["rgb"]))


@pytest.mark.parametrize("mode,values,expected", [
    ("I;16", [[0, 65535]], [0, 255]),        # 16-bit: full scale is 65535
    ("I", [[0, 200]], [0, 200]),             # 32-bit holding 8-bit values: kept
    ("I", [[0, 4000]], [0, 16]),             # 32-bit holding 16-bit values
    ("F", [[0.0, 0.5]], [0, 128]),           # float in 0..1
])
def test_high_bit_depth_images_are_scaled_to_8_bits(tmp_path, mode, values, expected):
    from minicnn.images import _to_rgb
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.array(values, dtype=dtype), mode=None)
    assert image.mode == mode
    rgb = np.asarray(_to_rgb(image))
    assert rgb.shape == (1, 2, 3) and rgb[0, :, 0].tolist() == expected


def test_evaluate_and_classify_follow_the_recorded_tta(tiny_cifar, images, tmp_path, capsys):
    weights = save_model(build_model("lenet"), tmp_path / "t.npz", class_names=list(CLASS_NAMES),
                         normalization={"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
                         test_accuracy=0.1, tta=True)
    common = ["evaluate", "--weights", str(weights), "--data-dir", str(tiny_cifar)]
    code, stdout, _ = run_cli([*common, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["tta"] == "flip"     # a file from before the modes
    code, stdout, _ = run_cli([*common, "--json", "--no-tta"], capsys)
    assert code == 0 and json.loads(stdout)["tta"] == "none"
    code, stdout, _ = run_cli(common, capsys)
    assert "(test-time flips)" in stdout
    classify = ["classify", str(images["rgb"]), "--weights", str(weights), "--json"]
    with_flips = json.loads(run_cli(classify, capsys)[1])[0]["predictions"]
    without = json.loads(run_cli([*classify, "--no-tta"], capsys)[1])[0]["predictions"]
    assert with_flips != without


def test_the_tta_mode_recorded_in_a_file_is_applied_and_can_be_overridden(
        tiny_cifar, images, tmp_path, capsys):
    weights = save_model(build_model("lenet"), tmp_path / "t.npz", class_names=list(CLASS_NAMES),
                         normalization={"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
                         test_accuracy=0.1, tta="flip-translate")
    common = ["evaluate", "--weights", str(weights), "--data-dir", str(tiny_cifar)]
    code, stdout, _ = run_cli([*common, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["tta"] == "flip-translate"
    code, stdout, _ = run_cli([*common, "--json", "--tta"], capsys)      # bare --tta: flips
    assert code == 0 and json.loads(stdout)["tta"] == "flip"
    code, stdout, _ = run_cli(common, capsys)
    assert "(test-time flips and 1-pixel translations)" in stdout
    classify = ["classify", str(images["rgb"]), "--weights", str(weights), "--json"]
    six = json.loads(run_cli(classify, capsys)[1])[0]["predictions"]
    two = json.loads(run_cli([*classify, "--tta-mode", "flip"], capsys)[1])[0]["predictions"]
    assert six != two
    assert json.loads(run_cli([*classify, "--tta"], capsys)[1])[0]["predictions"] == two
    bare = ["classify", "--tta", str(images["rgb"]), "--weights", str(weights), "--json"]
    assert json.loads(run_cli(bare, capsys)[1])[0]["predictions"] == two   # --tta before IMG


def test_train_options_that_need_others_are_refused_in_one_line(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "new" / "m.npz"
    for options, message in [
            (["--model", "airnet", "--width", "4", "--widths", "4,8,8"], "--width or --widths"),
            (["--model", "airnet", "--whiten-bias-epochs", "2"], "needs --stem whiten"),
            (["--lr-end-factor", "0.1"], "need --schedule linear"),
            (["--flip-rule", "alternating", "--no-augment"], "--flip-rule needs flips"),
            (["--holdout", "100"], "--holdout must be between 1 and 99")]:
        code, _, err = run_cli(["train", *options, "--out", str(out), "--epochs", "1",
                                "--data-dir", str(tiny_cifar), "--no-progress"], capsys)
        assert code == 1 and message in err and len(err.splitlines()) == 1, (options, err)
        assert not out.exists()


def test_a_width_for_a_model_without_one_is_refused_before_anything_is_written(
        tiny_cifar, tmp_path, capsys):
    out = tmp_path / "new" / "m.npz"
    code, _, err = run_cli(["train", "--model", "lenet", "--width", "8", "--out", str(out),
                            "--data-dir", str(tiny_cifar)], capsys)
    assert code == 1 and "bad config for model 'lenet'" in err and len(err.splitlines()) == 1
    assert not out.parent.exists()
