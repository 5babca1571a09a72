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
               label_smoothing: float = 0.0, rtol: float = 1e-5, steps: int = 3,
               before_step=None, after_step=None) -> None:
    """The same training steps on the same random batches in minicnn and PyTorch;
    the losses must agree at every step. Each PyTorch group's lr follows the schedule
    times its lr's ratio to the optimizer's; before_step(step) and after_step(step)
    run around each step of both."""
    criterion = SoftmaxCrossEntropy(label_smoothing)
    rng = backend.make_rng(7)
    ratios = [group["lr"] / optimizer.lr for group in torch_optimizer.param_groups]
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x = rng.standard_normal((batch_size, 3, 32, 32)).astype(np.float32)
        t = rng.integers(0, 10, batch_size)
        loss = criterion.forward(model.forward(x), t)
        model.backward(criterion.backward())
        optimizer.lr = schedule(step)
        optimizer.step()
        torch_optimizer.zero_grad()
        tloss = F.cross_entropy(net(to_torch(x)), to_torch(t), label_smoothing=label_smoothing)
        tloss.backward()
        for group, ratio in zip(torch_optimizer.param_groups, ratios, strict=True):
            group["lr"] = schedule(step) * ratio
        torch_optimizer.step()
        if after_step is not None:
            after_step(step)
        np.testing.assert_allclose(float(loss), tloss.item(), rtol=rtol)


def assert_same_weights_and_eval_logits(model, net):
    """After training both: every minicnn array equals PyTorch's of the same name (which
    also has BN weights fixed at 1), and so do the eval-mode logits."""
    reference = net.state_dict()
    assert set(model.state_dict()) <= set(reference)
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(host(value), reference[name].numpy(), rtol=1e-3, atol=1e-5)
    model.eval()
    net.eval()
    x = backend.make_rng(9).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(host(model.forward(x)), net(to_torch(x)).detach().numpy(),
                               rtol=1e-3, atol=1e-5)


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
    assert_same_weights_and_eval_logits(model, net)


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


# --- airbench's recipe (docs/accuracy.md), against airbench's own PyTorch code --------

def airbench_whitening_weight(images, eps=5e-4):
    """airbench94's init_whitening_conv (get_patches, get_whitening_parameters), in float64."""
    x = to_torch(images).double()
    c = x.shape[1]
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, c, 2, 2)
    flat = patches.reshape(len(patches), -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
    eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
    eigenvectors = eigenvectors.T.reshape(c * 4, c, 2, 2).flip(0)
    scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
    return torch.cat((scaled, -scaled)).numpy()


def test_whitening_filters_match_airbench(xp):
    """The same 24 filters as airbench's construction, each up to its sign (an
    eigenvector's sign is arbitrary), in the same order."""
    from minicnn import PatchWhitening
    images = (backend.make_rng(3).standard_normal((40, 3, 9, 9))
              * xp.asarray([1.0, 0.5, 2.0])[:, None, None] + 0.3)
    layer = PatchWhitening(3, 2)
    layer.fit_to(images)
    ours = host(layer.buffers["weight"]).astype(np.float64).reshape(24, -1)
    theirs = airbench_whitening_weight(images).reshape(24, -1)
    signs = np.sign((ours * theirs).sum(axis=1))
    assert np.all(signs != 0)
    np.testing.assert_allclose(ours, theirs * signs[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(signs[:12], signs[12:])     # f_i and -f_i stay a pair


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_whitening_forward_backward(xp, dtype):
    """A conv whose weight PyTorch does not train: output, dx and the bias's gradient."""
    from minicnn import PatchWhitening
    layer = PatchWhitening(3, 2)
    layer.fit_to(backend.make_rng(2).standard_normal((4, 3, 8, 8)))
    layer.params["bias"] = backend.make_rng(6).standard_normal(24)
    weight = to_torch(layer.buffers["weight"].astype(dtype))

    def torch_whitening(x, bias):
        return F.conv2d(x, weight, bias)

    compare_layer(layer, torch_whitening, backend.make_rng(1).standard_normal((2, 3, 7, 6)),
                  dtype)


def test_dirac_init_matches_pytorch(xp):
    from minicnn.layers.init import dirac_
    for out_channels, in_channels in [(8, 3), (4, 4), (2, 5)]:
        ours = backend.make_rng(1).standard_normal((out_channels, in_channels, 3, 3))
        theirs = to_torch(ours).clone()
        torch.nn.init.dirac_(theirs[:in_channels])         # airbench's Conv.reset_parameters
        np.testing.assert_array_equal(host(dirac_(ours)), theirs.numpy())


def test_linear_schedule_with_factors_matches_airbench_triangle():
    """airbench's triangle(steps, start=0.2, end=0.07, peak=0.23), where the peak step
    0.23 * T is a whole number (airbench rounds it down, minicnn does not)."""
    total = 100
    knots_x = torch.tensor([0, int(0.23 * total), total])
    knots_y = torch.tensor([0.2, 1.0, 0.07], dtype=torch.float64)
    steps = torch.arange(total + 1)
    index = torch.clamp(torch.sum(steps[:, None] >= knots_x[None, :], 1) - 1, 0, 1)
    slope = (knots_y[1:] - knots_y[:-1]) / (knots_x[1:] - knots_x[:-1])
    reference = slope[index] * steps + (knots_y[:-1] - slope * knots_x[:-1])[index]
    ours = make_schedule("linear", 1.5, total, warmup_fraction=0.23, start_factor=0.2,
                         end_factor=0.07)
    np.testing.assert_allclose([ours(s) for s in range(total + 1)], 1.5 * reference.numpy(),
                               rtol=1e-9)


def test_reflect_crop_matches_pytorch_reflect_padding(xp):
    from minicnn.data import random_crop
    images = backend.make_rng(1).integers(0, 256, (5, 3, 6, 7)).astype(np.uint8)
    offsets = backend.make_rng(2).integers(0, 5, (5, 2))
    padded = F.pad(to_torch(images).double(), (2, 2, 2, 2), mode="reflect").numpy()
    expected = np.stack([padded[i, :, r:r + 6, c:c + 7]
                         for i, (r, c) in enumerate(host(offsets))])
    np.testing.assert_array_equal(host(random_crop(images, offsets, 2, "reflect")), expected)


def test_flip_translate_tta_matches_airbench(xp):
    """airbench94's infer_mirror_translate (tta_level 2) on the PyTorch mirror."""
    from minicnn.augment import tta_logits
    model = build_model("airnet", width=4).eval()
    net = torch_mirror(model).eval()
    x = backend.make_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)

    def infer_mirror(inputs):
        return 0.5 * net(inputs) + 0.5 * net(inputs.flip(-1))

    with torch.no_grad():
        inputs = to_torch(x)
        logits = infer_mirror(inputs)
        padded = F.pad(inputs, (1,) * 4, "reflect")
        translated = [infer_mirror(padded[:, :, 0:32, 0:32]),
                      infer_mirror(padded[:, :, 2:34, 2:34])]
        reference = 0.5 * logits + 0.5 * torch.stack(translated).mean(0)
    np.testing.assert_allclose(host(tta_logits(model, x, "flip-translate")), reference.numpy(),
                               rtol=1e-4, atol=1e-5)


class AirbenchLookahead:
    """airbench94's LookaheadState, verbatim in substance."""

    def __init__(self, net):
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, net, decay):
        for ema_param, net_param in zip(self.net_ema.values(), net.state_dict().values(),
                                        strict=True):
            if net_param.dtype in (torch.half, torch.float):
                ema_param.lerp_(net_param, 1 - decay)
                net_param.copy_(ema_param)


def test_airbench_recipe_training_steps_match_pytorch(xp):
    """Steps of the recipe in both engines, as airbench94's main() runs them: the
    whitening stem (frozen filters, trained bias), dirac init, BatchNorm momentum 0.4
    and eps 1e-12, Nesterov SGD with BatchNorm's lr 64 times the rest and its decay
    divided by 64, the linear schedule 0.2 -> 1 -> 0.07, label smoothing, and the
    lookahead (here from step 2, every 2 steps); the bias frozen for the last
    steps. Loss at every step, then weights, BatchNorm statistics and eval logits."""
    from minicnn.averaging import Lookahead
    from minicnn.layers.whitening import whitening_layers
    from minicnn.optim import ParamGroup, batchnorm_names
    model = build_model("airnet", widths=[4, 8, 8], stem="whiten", dirac=True,
                        bn_momentum=0.4, bn_eps=1e-12)
    stem = whitening_layers(model)[0]
    stem.fit_to(backend.make_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32))
    net = torch_mirror(model)
    lr, wd, scale, total, batch = 0.2, 5e-3, 64.0, 7, 8
    norm = batchnorm_names(model)
    optimizer = SGD(model, lr, momentum=0.85, nesterov=True, weight_decay=wd,
                    groups=[ParamGroup(frozenset(norm), scale, wd / scale)])
    named = dict(net.named_parameters())
    torch_optimizer = torch.optim.SGD(
        [{"params": [named[n] for n in norm], "lr": lr * scale, "weight_decay": wd / scale},
         {"params": [p for n, p in named.items() if n not in norm and p.requires_grad],
          "lr": lr, "weight_decay": wd}], momentum=0.85, nesterov=True)
    schedule = make_schedule("linear", lr, total, warmup_fraction=0.3, start_factor=0.2,
                             end_factor=0.07)
    lookahead, torch_lookahead = Lookahead(total, start_epoch=0, every=2), []
    model.set_needs_input_grad(False)

    def freeze_bias(step):                          # whiten_bias_epochs, as 4 steps
        if step == 4:
            stem.freeze_bias()
            model.set_needs_input_grad(False)
            net[0].bias.requires_grad_(False)

    def pull(step):
        lookahead.after_step(model, epoch=0, step=step + 1)
        if (step + 1) % 2 == 0:                      # airbench's lookahead rule
            if not torch_lookahead:
                torch_lookahead.append(AirbenchLookahead(net))
            else:
                torch_lookahead[0].update(net, 0.95 ** 2 * ((step + 1) / total) ** 3)

    train_both(model, net, optimizer, torch_optimizer, schedule, batch, label_smoothing=0.2,
               rtol=1e-4, steps=total, before_step=freeze_bias, after_step=pull)
    lookahead.end_epoch(model)
    torch_lookahead[0].update(net, decay=1.0)
    assert_same_weights_and_eval_logits(model, net)
