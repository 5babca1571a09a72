"""Forward and backward compared with PyTorch (CPU), float32 and float64.
Skipped where torch is not installed; it is never a dependency of minicnn."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from minicnn import (SGD, BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, MaxPool2d,
                     SoftmaxCrossEntropy, backend, build_model, make_schedule)
from minicnn.optim import norm_and_bias_names

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
F = torch.nn.functional
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_mirror import torch_mirror  # after the path above, and only where torch is


def to_torch(a):
    return torch.from_numpy(np.array(backend.to_host(a)))


def host(a):
    return backend.to_host(a)


def tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def compare_layer(layer, torch_fn, x, dtype, upstream_seed=5):
    layer.astype(dtype)
    x = x.astype(dtype)
    y = layer.forward(x)
    dy = backend.make_rng(upstream_seed).standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    tx = to_torch(x).requires_grad_()
    tparams = {k: to_torch(v).requires_grad_() for k, v in layer.params.items()}
    ty = torch_fn(tx, **tparams)
    ty.backward(to_torch(dy))
    np.testing.assert_allclose(host(y), ty.detach().numpy(), **tolerance(dtype))
    np.testing.assert_allclose(host(dx), tx.grad.numpy(), **tolerance(dtype))
    for key, tparam in tparams.items():
        np.testing.assert_allclose(host(layer.grads[key]), tparam.grad.numpy(), **tolerance(dtype))
        assert layer.grads[key].dtype == dtype


DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride,padding,hw", [(5, 1, 0, (12, 12)), (3, 2, 1, (9, 11)),
                                                 (1, 1, 0, (4, 4)), (3, 1, 1, (6, 5))])
def test_conv2d(xp, dtype, k, stride, padding, hw):
    conv = Conv2d(3, 4, k, stride=stride, padding=padding)
    x = backend.make_rng(1).standard_normal((2, 3, *hw))

    def torch_conv(x, weight, bias):
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    compare_layer(conv, torch_conv, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride,padding,hw", [(2, None, 0, (8, 8)), (3, 2, 1, (9, 7)),
                                                 (3, 1, 1, (5, 5)), (2, 2, 0, (7, 7))])
def test_maxpool2d(xp, dtype, k, stride, padding, hw):
    pool = MaxPool2d(k, stride=stride, padding=padding)
    x = backend.make_rng(2).standard_normal((2, 3, *hw))

    def torch_pool(x):
        return F.max_pool2d(x, k, stride=stride, padding=padding)

    compare_layer(pool, torch_pool, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(xp, dtype):
    compare_layer(Linear(6, 4), F.linear, backend.make_rng(3).standard_normal((5, 6)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [True, False])
def test_batchnorm2d(xp, dtype, weight):
    """Training mode: output, input and parameter gradients, running statistics after
    two batches; then eval mode with those statistics."""
    bn = BatchNorm2d(3, momentum=0.3, weight=weight).astype(dtype)
    for offset, key in enumerate(bn.params):
        bn.params[key] = backend.make_rng(8 + offset).standard_normal(3).astype(dtype)
    mirror = torch_mirror(bn, torch.float64 if dtype == np.float64 else torch.float32)
    x = backend.make_rng(1).standard_normal((4, 3, 5, 6)) * 2 + 1

    def torch_bn(x, weight=None, bias=None):
        return F.batch_norm(x, mirror.running_mean, mirror.running_var, weight, bias,
                            training=True, momentum=0.3, eps=bn.eps)

    compare_layer(bn, torch_bn, x, dtype)
    mirror(to_torch(x.astype(dtype) * 3))
    bn.forward(x.astype(dtype) * 3)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(host(bn.buffers[key]), getattr(mirror, key).numpy(),
                                   **tolerance(dtype))
    bn.eval()
    mirror.eval()
    np.testing.assert_allclose(host(bn.forward(x.astype(dtype))),
                               mirror(to_torch(x.astype(dtype))).detach().numpy(),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_avg_pool(xp, dtype):
    def torch_pool(x):
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    compare_layer(GlobalAvgPool2d(), torch_pool, backend.make_rng(3).standard_normal((2, 3, 4, 5)),
                  dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_cross_entropy(xp, dtype, smoothing):
    logits = (backend.make_rng(4).standard_normal((6, 10)) * 4).astype(dtype)
    labels = backend.make_rng(5).integers(0, 10, 6)
    loss_fn = SoftmaxCrossEntropy(smoothing)
    loss = loss_fn.forward(logits, labels)
    dlogits = loss_fn.backward()
    tl = to_torch(logits).requires_grad_()
    tloss = F.cross_entropy(tl, to_torch(labels), label_smoothing=smoothing)
    tloss.backward()
    np.testing.assert_allclose(float(loss), tloss.item(), **tolerance(dtype))
    np.testing.assert_allclose(host(dlogits), tl.grad.numpy(), **tolerance(dtype))


def torch_lenet(model):
    """The seed network written out in PyTorch, with minicnn's weights loaded by name."""
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 128), nn.ReLU(),
                        nn.Linear(128, 84), nn.ReLU(), nn.Linear(84, 10))
    net.load_state_dict({k: to_torch(v) for k, v in model.state_dict().items()})
    return net


def test_lenet_state_dict_matches_pytorch_one_to_one(xp):
    model = build_model("lenet")
    reference = torch_lenet(model).state_dict()
    assert list(model.state_dict()) == list(reference)
    for name, value in model.state_dict().items():
        assert tuple(value.shape) == tuple(reference[name].shape)


def train_both(model, net, optimizer, torch_optimizer, schedule, batch_size: int,
               label_smoothing: float = 0.0, rtol: float = 1e-5, steps: int = 3) -> None:
    """The same training steps on the same random batches in minicnn and PyTorch;
    the losses must agree at every step."""
    criterion = SoftmaxCrossEntropy(label_smoothing)
    rng = backend.make_rng(7)
    for step in range(steps):
        x = rng.standard_normal((batch_size, 3, 32, 32)).astype(np.float32)
        t = rng.integers(0, 10, batch_size)
        loss = criterion.forward(model.forward(x), t)
        model.backward(criterion.backward())
        optimizer.lr = schedule(step)
        optimizer.step()
        torch_optimizer.zero_grad()
        tloss = F.cross_entropy(net(to_torch(x)), to_torch(t), label_smoothing=label_smoothing)
        tloss.backward()
        for group in torch_optimizer.param_groups:
            group["lr"] = schedule(step)
        torch_optimizer.step()
        np.testing.assert_allclose(float(loss), tloss.item(), rtol=rtol)


def test_airnet_training_steps_match_pytorch(xp):
    """Three steps of the airnet recipe (BatchNorm, Nesterov, weight decay that skips
    biases and BatchNorm, label smoothing, the linear schedule) match PyTorch: loss,
    weights and running statistics; then the eval-mode logits with flips."""
    model = build_model("airnet", width=4)
    net = torch_mirror(model)
    skip = set(norm_and_bias_names(model))
    named = dict(net.named_parameters())
    assert skip and set(named) >= skip
    optimizer = SGD(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3,
                    skip_decay=skip)
    torch_optimizer = torch.optim.SGD(
        [{"params": [p for n, p in named.items() if n not in skip and p.requires_grad]},
         {"params": [p for n, p in named.items() if n in skip and p.requires_grad],
          "weight_decay": 0.0}],
        lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3)
    schedule = make_schedule("linear", 0.1, total_steps=3, warmup_fraction=0.4)
    train_both(model, net, optimizer, torch_optimizer, schedule, batch_size=8,
               label_smoothing=0.2, rtol=1e-4)
    reference = net.state_dict()
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(host(value), reference[name].numpy(), rtol=1e-3, atol=1e-5)
    model.eval()
    net.eval()
    x = backend.make_rng(9).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(host(model.forward(x)), net(to_torch(x)).detach().numpy(),
                               rtol=1e-3, atol=1e-5)


def test_lenet_training_steps_match_pytorch(xp):
    """Three SGD steps (momentum, Nesterov, weight decay, scheduled lr) on the whole
    seed network give the same loss and weights as PyTorch."""
    model = build_model("lenet")
    net = torch_lenet(model)
    optimizer = SGD(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch_optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                      weight_decay=5e-4)
    schedule = make_schedule("onecycle", 0.05, total_steps=3)
    train_both(model, net, optimizer, torch_optimizer, schedule, batch_size=16)
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(host(model.state_dict()[name]), value.numpy(),
                                   rtol=1e-4, atol=1e-6)


def test_onecycle_matches_pytorch():
    peak, total = 0.05, 200
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=peak)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total,
                                                    cycle_momentum=False)
    ours = make_schedule("onecycle", peak, total)
    for step in range(total):
        np.testing.assert_allclose(ours(step), optimizer.param_groups[0]["lr"], rtol=1e-6)
        optimizer.step()
        reference.step()


def test_default_init_matches_pytorch_bounds():
    """Kaiming-uniform (a=sqrt(5)) as PyTorch: U(-b, b) with b = 1/sqrt(fan_in).

    Both weights (2,400 values) must have the std of that uniform, b/sqrt(3),
    within 5% (about 5.5 standard errors of a sample std at this size)."""
    conv = Conv2d(6, 16, 5)
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(6, 16, 5)
    bound = 1 / np.sqrt(6 * 5 * 5)
    for ours, theirs in [(conv.params["weight"], reference.weight),
                         (conv.params["bias"], reference.bias)]:
        theirs = theirs.detach().numpy()
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
    for weight in (conv.params["weight"], reference.weight.detach().numpy()):
        np.testing.assert_allclose(np.std(weight), bound / np.sqrt(3), rtol=0.05)
