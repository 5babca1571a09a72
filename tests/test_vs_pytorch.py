"""Forward and backward compared with PyTorch (CPU), float32 and float64.
Skipped where torch is not installed; it is never a dependency of minicnn."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import (SGD, Conv2d, Linear, MaxPool2d, SoftmaxCrossEntropy, backend, build_model,
                     make_schedule)

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
F = torch.nn.functional


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
def test_softmax_cross_entropy(xp, dtype):
    logits = (backend.make_rng(4).standard_normal((6, 10)) * 4).astype(dtype)
    labels = backend.make_rng(5).integers(0, 10, 6)
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, labels)
    dlogits = loss_fn.backward()
    tl = to_torch(logits).requires_grad_()
    tloss = F.cross_entropy(tl, to_torch(labels))
    tloss.backward()
    np.testing.assert_allclose(float(loss), tloss.item(), **tolerance(dtype))
    np.testing.assert_allclose(host(dlogits), tl.grad.numpy(), **tolerance(dtype))


def torch_lenet(model):
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


def test_lenet_training_steps_match_pytorch(xp):
    """Three SGD steps (momentum, Nesterov, weight decay, scheduled lr) on the whole
    seed network give the same loss and weights as PyTorch."""
    model = build_model("lenet")
    net = torch_lenet(model)
    optimizer = SGD(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch_optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                      weight_decay=5e-4)
    schedule = make_schedule("onecycle", 0.05, total_steps=3)
    criterion = SoftmaxCrossEntropy()
    rng = backend.make_rng(7)
    for step in range(3):
        x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
        t = rng.integers(0, 10, 16)
        loss = criterion.forward(model.forward(x), t)
        model.backward(criterion.backward())
        optimizer.lr = schedule(step)
        optimizer.step()
        torch_optimizer.zero_grad()
        tloss = F.cross_entropy(net(to_torch(x)), to_torch(t))
        tloss.backward()
        for group in torch_optimizer.param_groups:
            group["lr"] = schedule(step)
        torch_optimizer.step()
        np.testing.assert_allclose(float(loss), tloss.item(), rtol=1e-5)
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
