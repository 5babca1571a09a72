"""The CuPy backend end to end: training with Ctrl-C and --resume, evaluation with
test-time flips, the command line and the study tools, each against NumPy on the
same weights.

These run where CuPy runs: on a GPU, or on the test suite's strict stand-in
(``MINICNN_FAKE_CUPY=tests.fake_cupy``, as CI runs the suite a second time),
and skip elsewhere. The layers' CuPy cases are in the other test files,
parametrized over both backends (the ``xp`` fixture).
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from minicnn import backend, build_model, cli, data, load_model
from minicnn.images import load_image
from minicnn.resume import resume_path
from minicnn.train import TrainConfig, TrainingInterrupted, fit, predict_logits
from minicnn.trace import trace_step
from minicnn.study.activations import conv_outputs
from minicnn.study.gradients import input_gradient

NORMALIZATION = {"mean": list(data.CIFAR10_MEAN), "std": list(data.CIFAR10_STD)}


@pytest.fixture
def cupy_backend():
    if not backend.cupy_available():
        pytest.skip("CuPy or a CUDA GPU is not available (the stand-in: MINICNN_FAKE_CUPY)")
    backend.use("cupy", seed=0)
    yield backend.xp
    backend.use("numpy", seed=0)


def on_numpy(model):
    """A copy of ``model``'s weights in a NumPy model (the backend switched to NumPy)."""
    arrays = {name: backend.to_host(value) for name, value in model.state_dict().items()}
    backend.use("numpy", seed=0)
    copy = build_model(model.name, **model.config)
    for name, holder, key in copy.named_arrays():
        holder[key] = arrays[name]
    return copy


def assert_close(actual, expected, rtol=1e-4):
    """Equal up to float32 rounding in another order (a GPU's kernels sum differently)."""
    actual, expected = backend.to_host(actual), backend.to_host(expected)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def test_fit_interrupted_and_resumed_matches_an_uninterrupted_run(cupy_backend, tiny_cifar,
                                                                   tmp_path, monkeypatch):
    """Device-side shuffling, flips and crops, the saved state copied back to the host and
    the momentum buffers back to the device: exactly the uninterrupted run."""
    train, test = data.load_cifar10(tiny_cifar)
    config = TrainConfig(epochs=2, batch_size=16, crop_padding=2, label_smoothing=0.1,
                         nesterov=True, seed=3)

    def run(name, resume=False):
        backend.use("cupy", seed=config.seed)
        model = build_model("lenet")
        metadata = fit(model, train, test, config, tmp_path / name, resume=resume,
                       progress=False, log=lambda line: None)
        return model, metadata

    reference, metadata = run("ref.npz")
    assert metadata["training"]["backend"] == "cupy"
    assert all(backend.array_module(v) is cupy_backend for v in reference.state_dict().values())

    import minicnn.train as train_module
    real_step, calls = train_module.SGD.step, {"n": 0}

    def step_then_ctrl_c(self):
        real_step(self)
        calls["n"] += 1
        if calls["n"] == 10:              # epoch 2, its step 3 (7 steps per epoch)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module.SGD, "step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted):
        run("w.npz")
    monkeypatch.setattr(train_module.SGD, "step", real_step)
    state = json.loads(str(np.load(resume_path(tmp_path / "w.npz"))["__metadata__"]))
    assert (state["epoch"], state["step"]) == (1, 3)
    resumed, _ = run("w.npz", resume=True)
    for name, value in reference.state_dict().items():
        np.testing.assert_array_equal(backend.to_host(resumed.state_dict()[name]),
                                      backend.to_host(value))

    loaded, _ = load_model(tmp_path / "ref.npz")          # the GPU's file, on the GPU ...
    x = backend.to_device(test.images[:8])
    logits = predict_logits(loaded, x, NORMALIZATION)
    cpu = on_numpy(reference)                              # ... and the same weights on NumPy
    assert_close(logits, predict_logits(cpu, test.images[:8], NORMALIZATION))


def test_batchnorm_model_and_test_time_flips_agree_with_numpy(cupy_backend, tiny_cifar,
                                                              tmp_path):
    train, test = data.load_cifar10(tiny_cifar)
    config = TrainConfig(model="airnet", width=4, epochs=1, batch_size=16, tta=True,
                         crop_padding=2, decay_norm_and_bias=False, seed=1)
    backend.use("cupy", seed=config.seed)
    model = build_model("airnet", width=4)
    metadata = fit(model, train, test, config, tmp_path / "a.npz", progress=False,
                   log=lambda line: None)
    assert metadata["tta"] == "flip" and 0.0 <= metadata["test_accuracy"] <= 1.0
    images = backend.to_device(test.images)
    logits = {tta: predict_logits(model, images, NORMALIZATION, batch_size=8, tta=tta)
              for tta in (False, True)}
    cpu = on_numpy(model)
    for tta, device_logits in logits.items():
        assert_close(device_logits, predict_logits(cpu, test.images, NORMALIZATION,
                                                   batch_size=8, tta=tta))


def test_command_line_trains_evaluates_and_classifies_on_the_gpu(cupy_backend, tiny_cifar,
                                                                 tmp_path, capsys):
    out = tmp_path / "m.npz"
    code = cli.main(["train", "--backend", "cupy", "--data-dir", str(tiny_cifar), "--epochs",
                     "1", "--batch-size", "16", "--crop-padding", "2", "--out", str(out),
                     "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "backend cupy" in stdout and out.is_file()

    results = {}
    for name in ("cupy", "numpy"):
        assert cli.main(["evaluate", "--backend", name, "--weights", str(out), "--data-dir",
                         str(tiny_cifar), "--json", "--tta"]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert cli.main(["classify", "--backend", name, "--weights", str(out), "--json",
                         "--top-k", "10", str(cli.EXAMPLE_IMAGE)]) == 0
        classified = json.loads(capsys.readouterr().out)[0]["predictions"]
        results[name] = evaluated, {p["label"]: p["probability"] for p in classified}
    (gpu, gpu_probabilities), (cpu, cpu_probabilities) = results["cupy"], results["numpy"]
    assert gpu["n"] == cpu["n"] == 20 and gpu["tta"] == "flip"
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 0.05      # one near tie may flip
    assert gpu_probabilities == pytest.approx(cpu_probabilities, rel=1e-4, abs=1e-6)


def test_study_tools_on_the_gpu(cupy_backend):
    """trace, feature maps and saliency take device arrays and give host results."""
    model, metadata = load_model(cli.WEIGHTS_DIR / "lenet_cifar10.npz")
    image = load_image(cli.EXAMPLE_IMAGE)
    x = data.normalize(backend.to_device(image[None]), **metadata["normalization"])
    lines = trace_step(model, x, label=3)
    gradient = input_gradient(model, x, class_index=3)
    outputs, _ = conv_outputs(model, x)

    cpu = on_numpy(model)
    x_cpu = data.normalize(image[None], **metadata["normalization"])
    cpu_lines = trace_step(cpu, x_cpu, label=3)
    assert [line.split()[:2] for line in lines] == [line.split()[:2] for line in cpu_lines]
    assert_close(gradient, input_gradient(cpu, x_cpu, class_index=3))
    for gpu_output, cpu_output in zip(outputs, conv_outputs(cpu, x_cpu)[0], strict=True):
        assert gpu_output.path == cpu_output.path
        assert_close(gpu_output.output, cpu_output.output)

