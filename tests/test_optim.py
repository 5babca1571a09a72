"""SGD's update rule and the learning-rate schedules."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import SGD, Linear, make_schedule
from minicnn.optim import SCHEDULES


def layer_with_grads(weight, grad):
    layer = Linear(2, 1, bias=False)
    layer.params["weight"] = np.array(weight, dtype=np.float64)
    layer.grads["weight"] = np.array(grad, dtype=np.float64)
    return layer


def test_plain_sgd_step():
    layer = layer_with_grads([[1.0, 2.0]], [[0.5, -1.0]])
    SGD(layer, lr=0.1).step()
    np.testing.assert_allclose(layer.params["weight"], [[0.95, 2.1]])


def test_momentum_nesterov_and_weight_decay_by_hand():
    layer = layer_with_grads([[1.0]], [[1.0]])
    opt = SGD(layer, lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.1)
    opt.step()   # g = 1 + 0.1*1 = 1.1; v = 1.1; step = g + 0.5 v = 1.65
    np.testing.assert_allclose(layer.params["weight"], [[1 - 0.165]])
    opt.step()   # g = 1 + 0.1*0.835 = 1.0835; v = 0.55 + 1.0835; step = g + 0.5 v
    v = 0.5 * 1.1 + 1.0835
    np.testing.assert_allclose(layer.params["weight"], [[0.835 - 0.1 * (1.0835 + 0.5 * v)]])


def test_sgd_reads_replaced_params():
    """params is the one source of truth: the optimizer updates whatever array is there now."""
    layer = layer_with_grads([[1.0]], [[1.0]])
    opt = SGD(layer, lr=1.0)
    layer.params["weight"] = np.array([[5.0]])
    opt.step()
    np.testing.assert_allclose(layer.params["weight"], [[4.0]])


def test_sgd_rejects_bad_settings():
    layer = layer_with_grads([[1.0]], [[1.0]])
    with pytest.raises(ValueError):
        SGD(layer, lr=-1)
    with pytest.raises(ValueError):
        SGD(layer, lr=0.1, nesterov=True)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_stay_within_peak(name):
    schedule = make_schedule(name, 0.1, total_steps=100)
    values = [schedule(step) for step in range(100)]
    assert max(values) == pytest.approx(0.1)
    assert min(values) >= 0


def test_schedule_shapes():
    assert make_schedule("constant", 0.1, 10)(7) == 0.1
    step = make_schedule("step", 0.1, 100)
    assert (step(0), step(50), step(75)) == pytest.approx((0.1, 0.01, 0.001))
    cosine = make_schedule("cosine", 0.1, 100)
    assert cosine(0) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.05)
    onecycle = make_schedule("onecycle", 0.1, 100)
    assert onecycle(0) == pytest.approx(0.1 / 25)
    assert max(range(100), key=onecycle) == 29
    assert onecycle(99) == pytest.approx(0.1 / 25e4)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("triangle", 0.1, 10)


def test_linear_schedule_is_a_triangle():
    schedule = make_schedule("linear", 0.4, total_steps=100, warmup_fraction=0.2, div_factor=8)
    assert schedule(0) == pytest.approx(0.05)
    assert schedule(10) == pytest.approx(0.05 + 0.35 * 0.5)
    assert schedule(20) == pytest.approx(0.4)
    assert schedule(60) == pytest.approx(0.2)
    assert schedule(100) == 0.0


def test_weight_decay_skips_biases_and_batchnorm():
    """With zero gradients only decay moves a parameter: the skipped ones stay put."""
    from minicnn import BatchNorm2d, Sequential
    from minicnn.optim import norm_and_bias_names
    model = Sequential(Linear(2, 3), BatchNorm2d(3))
    skip = norm_and_bias_names(model)
    assert skip == ["0.bias", "1.weight", "1.bias"]
    before = {k: v.copy() for k, v in model.state_dict().items()}
    for _, module, key in model.named_parameters():
        module.grads[key] = np.zeros_like(module.params[key])
    SGD(model, lr=0.1, weight_decay=0.5, skip_decay=skip).step()
    after = model.state_dict()
    np.testing.assert_allclose(after["0.weight"], before["0.weight"] * 0.95)
    for name in [*skip, "1.running_mean", "1.running_var"]:
        np.testing.assert_array_equal(after[name], before[name])


def test_parameter_groups_scale_the_lr_and_set_their_decay():
    """airbench's BatchNorm group: lr * 64, decay / 64, so lr * wd (the shrinkage per
    step) is the same as the others'."""
    from minicnn import BatchNorm2d, Sequential
    from minicnn.optim import ParamGroup, batchnorm_names
    model = Sequential(Linear(2, 3, bias=False), BatchNorm2d(3))
    assert batchnorm_names(model) == ["1.weight", "1.bias"]
    group = ParamGroup(frozenset(["1.bias"]), lr_scale=64.0, weight_decay=0.01 / 64)
    opt = SGD(model, lr=0.1, weight_decay=0.01, groups=[group])
    assert opt.settings("1.bias") == (pytest.approx(6.4), pytest.approx(0.01 / 64))
    assert opt.settings("0.weight") == (0.1, 0.01)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    for _, module, key in model.named_parameters():
        module.grads[key] = np.ones_like(module.params[key])
    opt.step()
    after = model.state_dict()
    np.testing.assert_allclose(after["0.weight"], before["0.weight"] - 0.1 * (1 + 0.01 * before["0.weight"]),
                               rtol=1e-6)
    np.testing.assert_allclose(after["1.bias"], -6.4 * 1, rtol=1e-6)        # beta started at 0
    np.testing.assert_allclose(after["1.weight"], 1 - 0.1 * (1 + 0.01), rtol=1e-6)
    skip = SGD(model, lr=0.1, weight_decay=0.01, skip_decay=["1.bias"], groups=[group])
    assert skip.settings("1.bias")[1] == 0.0                 # skip_decay wins
    with pytest.raises(ValueError, match="two groups"):
        SGD(model, lr=0.1, groups=[group, ParamGroup(frozenset(["1.bias"]))])


def test_linear_schedule_start_and_end_factors():
    schedule = make_schedule("linear", 1.5, total_steps=100, warmup_fraction=0.25,
                             start_factor=0.2, end_factor=0.07)
    assert schedule(0) == pytest.approx(0.3)
    assert schedule(25) == pytest.approx(1.5)
    assert schedule(100) == pytest.approx(1.5 * 0.07)
    assert schedule(62.5) == pytest.approx(1.5 * (0.07 + 0.93 * 0.5))
    assert schedule(99) > schedule(100)
    default = make_schedule("linear", 0.4, 100, warmup_fraction=0.2)
    assert default(0) == pytest.approx(0.4 / 25) and default(100) == 0.0
    with pytest.raises(ValueError, match="linear schedule"):
        make_schedule("cosine", 0.1, 10, end_factor=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        make_schedule("linear", 0.1, 10, start_factor=-1)
