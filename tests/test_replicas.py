"""minicnn.replicas: a batch split over processes gives the loss, logits and grads of
the whole batch in one process (the plain version), step after step."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import kernels, models
from minicnn.errors import MinicnnError
from minicnn.fast import replicas
from minicnn.fast.replicas import Replicas
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.optim import SGD
from minicnn.train import forward_backward

TOLERANCE = {np.float64: 1e-12, np.float32: 2e-5}     # relative to each array's largest entry


def twin_models(dtype, name="lenet", **config):
    """Two copies of one model (same parameters), first layer without input gradient."""
    first = models.build_model(name, **config).astype(dtype)
    second = models.build_model(name, **config).astype(dtype)
    for (_, a, key), (_, b, _) in zip(first.named_parameters(), second.named_parameters()):
        b.params[key] = a.params[key].copy()
    for model in (first, second):
        model.set_needs_input_grad(False)
    return first, second


def batch(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 32, 32)).astype(dtype), rng.integers(0, 10, n)


def plain_step(model, criterion, x, labels):
    logits = model.forward(x)
    loss = criterion.forward(logits, labels)
    model.backward(criterion.backward())
    return loss, logits


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert float(np.abs(actual - expected).max()) <= TOLERANCE[dtype] * scale


def assert_same_grads(first, second, dtype):
    for (name, a, key), (_, b, _) in zip(first.named_parameters(), second.named_parameters()):
        assert_close(b.grads[key], a.grads[key], dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_split_batch_gives_the_whole_batchs_loss_logits_and_grads(dtype):
    plain, split = twin_models(dtype)
    x, labels = batch(37, dtype)               # 12 + 12 + 13 images: parts of unequal size
    loss, logits = plain_step(plain, SoftmaxCrossEntropy(), x, labels)
    with Replicas(split, SoftmaxCrossEntropy(), processes=3) as group:
        split_loss, split_logits = group.forward_backward(x, labels)
    assert_close(split_loss, loss, dtype)
    assert split_logits.shape == (37, 10)
    assert_close(split_logits, logits, dtype)
    assert_same_grads(plain, split, dtype)


def test_sgd_steps_in_the_calling_process_reach_the_workers():
    """Three steps with SGD in between, and a smaller last batch, as in an epoch."""
    plain, split = twin_models(np.float64)
    criterion = SoftmaxCrossEntropy(label_smoothing=0.1)
    steps = [batch(16, np.float64, seed) for seed in (1, 2)] + [batch(5, np.float64, 3)]
    optimizers = [SGD(model, 0.1, momentum=0.9, weight_decay=5e-4) for model in (plain, split)]
    with Replicas(split, SoftmaxCrossEntropy(label_smoothing=0.1), processes=2) as group:
        for x, labels in steps:
            loss, _ = plain_step(plain, criterion, x, labels)
            split_loss, _ = group.forward_backward(x, labels)
            assert_close(split_loss, loss, np.float64)
            assert_same_grads(plain, split, np.float64)
            for optimizer in optimizers:
                optimizer.step()


def test_a_replaced_parameter_is_used_and_a_reshaped_one_refused():
    plain, split = twin_models(np.float64)
    x, labels = batch(8, np.float64)
    with Replicas(split, SoftmaxCrossEntropy(), processes=2) as group:
        new_bias = np.linspace(-1, 1, 10)                 # as loading weights would do
        plain.layers[-1].params["bias"] = new_bias.copy()
        split.layers[-1].params["bias"] = new_bias.copy()
        loss, _ = plain_step(plain, SoftmaxCrossEntropy(), x, labels)
        split_loss, _ = group.forward_backward(x, labels)
        assert_close(split_loss, loss, np.float64)
        assert_same_grads(plain, split, np.float64)
        split.layers[-1].params["bias"] = np.zeros(11)
        with pytest.raises(ValueError, match="changed shape"):
            group.forward_backward(x, labels)


def test_fewer_images_than_processes_and_a_workers_error():
    plain, split = twin_models(np.float64)
    x, labels = batch(4, np.float64)
    with Replicas(split, SoftmaxCrossEntropy(), processes=3) as group:
        loss, _ = plain_step(plain, SoftmaxCrossEntropy(), x[:1], labels[:1])
        split_loss, logits = group.forward_backward(x[:1], labels[:1])   # all in this process
        assert logits.shape == (1, 10)
        assert_close(split_loss, loss, np.float64)
        bad = labels.copy()
        bad[-1] = 99                                      # in the last worker's part
        with pytest.raises(replicas.ReplicaError, match="replica's step failed: .*0..9, got 99"):
            group.forward_backward(x, bad)
        group.forward_backward(x, labels)                 # and it goes on working
        with pytest.raises(ValueError, match="4 images but 3 labels"):
            group.forward_backward(x, labels[:3])


def test_close_gives_the_model_ordinary_arrays_and_stops_the_workers():
    _, split = twin_models(np.float32)
    before = {name: module.params[key].copy() for name, module, key in split.named_parameters()}
    group = Replicas(split, SoftmaxCrossEntropy(), processes=2)
    processes = [worker["process"] for worker in group._workers]
    group.close()
    assert all(not process.is_alive() for process in processes)
    for name, module, key in split.named_parameters():
        param = module.params[key]
        assert param.base is None                 # its own memory, not a view of shared memory
        np.testing.assert_array_equal(param, before[name])
    group.close()                                         # a second close does nothing


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batchnorm_statistics_are_those_of_the_whole_batch(dtype):
    """airnet's BatchNorm layers add up their parts' sums across the processes: the
    same loss, logits, grads and running statistics as the whole batch in one process."""
    plain, split = twin_models(dtype, "airnet", width=4)
    for (_, a, key), (_, b, _) in zip(plain.named_buffers(), split.named_buffers()):
        b.buffers[key] = a.buffers[key].copy()
    x, labels = batch(11, dtype)                     # 4 + 3 + 4 images
    with Replicas(split, SoftmaxCrossEntropy(), processes=3) as group:
        for _ in range(2):
            loss, logits = plain_step(plain, SoftmaxCrossEntropy(), x, labels)
            split_loss, split_logits = group.forward_backward(x, labels)
            assert_close(split_loss, loss, dtype)
            assert_close(split_logits, logits, dtype)
            assert_same_grads(plain, split, dtype)
        for (_, a, key), (_, b, _) in zip(plain.named_buffers(), split.named_buffers()):
            assert_close(b.buffers[key], a.buffers[key], dtype)
        one, _ = plain_step(plain, SoftmaxCrossEntropy(), x[:2], labels[:2])
        alone, _ = group.forward_backward(x[:2], labels[:2])   # fewer images than processes
        assert_close(alone, one, dtype)
        assert_same_grads(plain, split, dtype)


def test_a_workers_error_in_a_batchnorm_step_is_raised_and_the_next_step_works():
    plain, split = twin_models(np.float64, "airnet", width=2)
    x, labels = batch(6, np.float64)
    bad = labels.copy()
    bad[-1] = 99                                          # in the worker's part
    with Replicas(split, SoftmaxCrossEntropy(), processes=2) as group:
        with pytest.raises(RuntimeError, match="replica's step failed"):
            group.forward_backward(x, bad)
        loss, _ = plain_step(plain, SoftmaxCrossEntropy(), x, labels)
        assert_close(group.forward_backward(x, labels)[0], loss, np.float64)


def test_a_worker_that_dies_during_a_batchnorm_step_is_reported_not_waited_for():
    _, split = twin_models(np.float32, "airnet", width=2)
    x, labels = batch(6, np.float32)
    with Replicas(split, SoftmaxCrossEntropy(), processes=2) as group:
        group.forward_backward(x, labels)
        group._workers[0]["process"].kill()
        with pytest.raises(RuntimeError, match="process has exited|barrier|replica"):
            group.forward_backward(x, labels)


def test_models_the_processes_cannot_share_are_refused():
    airnet = kernels.prepare(models.build_model("airnet"), "reference")   # plain BatchNorm
    assert "BatchNorm2d layer keeps batch statistics" in replicas.refusal(airnet)
    assert replicas.default_processes(airnet) == 1
    with pytest.raises(ValueError, match="cannot share"):
        Replicas(airnet, SoftmaxCrossEntropy(), processes=2)


def test_minicnn_processes_sets_the_default(monkeypatch):
    lenet = models.build_model("lenet")
    monkeypatch.setenv("MINICNN_PROCESSES", "3")
    assert replicas.default_processes(lenet) == 3
    monkeypatch.setenv("MINICNN_PROCESSES", "1")
    assert replicas.default_processes(lenet) == 1


def test_a_bad_minicnn_processes_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("MINICNN_PROCESSES", "two")
    with pytest.raises(MinicnnError, match="MINICNN_PROCESSES must be a whole number"):
        replicas.default_processes(models.build_model("lenet"))


def test_a_worker_that_dies_is_reported_not_waited_for():
    _, split = twin_models(np.float32)
    x, labels = batch(8, np.float32)
    with Replicas(split, SoftmaxCrossEntropy(), processes=2) as group:
        group.forward_backward(x, labels)
        group._workers[0]["process"].kill()
        group._workers[0]["process"].join()
        with pytest.raises(replicas.ReplicaError, match="process was killed by SIGKILL"):
            group.forward_backward(x, labels)


def test_a_script_without_a_main_guard_is_not_run_again_by_the_workers(tmp_path):
    """Python's spawn imports the main module in each worker: a script that trains at
    its top level would train again there. The workers need nothing from it here."""
    import subprocess
    import sys
    script = tmp_path / "train_me.py"
    script.write_text(
        "import numpy as np\n"
        "from minicnn import models\n"
        "from minicnn.fast.replicas import Replicas\n"
        "from minicnn.losses import SoftmaxCrossEntropy\n"
        "print('script runs', flush=True)\n"
        "with Replicas(models.build_model('lenet'), SoftmaxCrossEntropy(), 2) as group:\n"
        "    loss, _ = group.forward_backward(np.zeros((4, 3, 32, 32), np.float32),\n"
        "                                     np.array([0, 1, 2, 3]))\n"
        "print('loss', float(loss))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("script runs") == 1 and "loss" in result.stdout
