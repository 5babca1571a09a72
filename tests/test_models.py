"""The model registry, the seed network and the Module contract."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import (MODELS, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, backend,
                     build_model, register)
from minicnn.errors import MinicnnError


def test_lenet_is_the_seed_network_without_relu_on_logits():
    model = build_model("lenet")
    kinds = [layer.layer_name() for layer in model.layers]
    assert kinds == [cls.__name__ for cls in (Conv2d, ReLU, MaxPool2d, Conv2d, ReLU, MaxPool2d,
                                              Flatten, Linear, ReLU, Linear, ReLU, Linear)]
    shapes = {name: tuple(v.shape) for name, v in model.state_dict().items()}
    assert shapes == {"0.weight": (6, 3, 5, 5), "0.bias": (6,), "3.weight": (16, 6, 5, 5),
                      "3.bias": (16,), "7.weight": (128, 400), "7.bias": (128,),
                      "9.weight": (84, 128), "9.bias": (84,), "11.weight": (10, 84),
                      "11.bias": (10,)}
    assert model.num_parameters() == 65_886


def test_lenet_logits_can_be_negative(xp):
    model = build_model("lenet")
    logits = model.forward(backend.make_rng(0).standard_normal((8, 3, 32, 32)).astype(xp.float32))
    assert logits.shape == (8, 10) and logits.dtype == xp.float32
    assert float(logits.min()) < 0


def test_same_seed_same_weights():
    backend.use("numpy", seed=3)
    a = build_model("lenet").state_dict()
    backend.use("numpy", seed=3)
    b = build_model("lenet").state_dict()
    backend.use("numpy", seed=4)
    c = build_model("lenet").state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_unknown_model_and_bad_config():
    with pytest.raises(MinicnnError, match="unknown model"):
        build_model("resnet9000")
    with pytest.raises(MinicnnError, match="bad config"):
        build_model("lenet", depth=3)


def test_register_a_model():
    @register("tiny-test-net")
    def tiny(num_classes=2):
        return Sequential(Flatten(), Linear(12, num_classes))

    try:
        model = build_model("tiny-test-net", num_classes=3)
        assert model.config == {"num_classes": 3}
        assert model.forward(np.zeros((1, 3, 2, 2), np.float32)).shape == (1, 3)
    finally:
        del MODELS["tiny-test-net"]


def test_train_eval_modes_reach_every_layer():
    model = build_model("lenet")
    model.eval()
    assert not any(m.training for _, m in model.modules())
    model.train()
    assert all(m.training for _, m in model.modules())


def test_replacing_a_param_takes_effect_on_next_forward():
    layer = Linear(3, 2)
    x = np.ones((1, 3), np.float32)
    layer.params["weight"] = np.zeros((2, 3), np.float32)
    layer.params["bias"] = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(layer.forward(x), [[1.0, -2.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_honour_the_input_dtype(xp, dtype):
    model = build_model("lenet").astype(dtype)
    x = backend.make_rng(0).standard_normal((2, 3, 32, 32)).astype(dtype)
    y = model.forward(x)
    model.set_needs_input_grad(True)
    dx = model.backward(xp.ones_like(y))
    assert y.dtype == dtype and dx.dtype == dtype
    assert all(g.dtype == dtype for _, m in model.modules() for g in m.grads.values())


def test_first_layer_skips_the_input_gradient():
    model = build_model("lenet")
    model.set_needs_input_grad(False)
    y = model.forward(np.zeros((1, 3, 32, 32), np.float32))
    assert model.backward(np.ones_like(y)) is None
    assert model.layers[0].grads["weight"].shape == (6, 3, 5, 5)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"Conv2d expected input \(N, 3, H, W\)"):
        Conv2d(3, 4, 3).forward(np.zeros((1, 2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="Linear expected"):
        Linear(4, 2).forward(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="padding"):
        MaxPool2d(2, padding=2)


def test_airnet_shapes_width_and_buffers(xp):
    model = build_model("airnet", width=8)
    assert model.config == {"width": 8}
    logits = model.forward(backend.make_rng(0).standard_normal((2, 3, 32, 32)).astype(xp.float32))
    assert logits.shape == (2, 10) and logits.dtype == xp.float32
    convs = [layer for layer in model.layers if isinstance(layer, Conv2d)]
    assert [c.out_channels for c in convs] == [24, 8, 8, 32, 32, 32, 32]
    state = model.state_dict()
    assert "1.running_mean" in state and "1.running_var" in state
    assert model.num_parameters() < sum(v.size for v in state.values())   # buffers aren't trained
    assert build_model("airnet", width=16).num_parameters() > model.num_parameters()
    with pytest.raises(MinicnnError, match="width must be"):
        build_model("airnet", width=0)


def test_buffers_are_saved_and_loaded(tmp_path):
    from minicnn import load_model, save_model
    model = build_model("airnet", width=4)
    model.forward(backend.make_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32) + 2)
    assert float(model.layers[1].buffers["running_mean"].std()) > 0   # moved off its start
    save_model(model, tmp_path / "a.npz")
    loaded, _ = load_model(tmp_path / "a.npz")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value)


def test_airnet_options_of_the_airbench_recipe(tmp_path):
    """widths, the whitening stem, dirac init and BatchNorm's settings; saved in the config
    and rebuilt from it, the whitening filters and a frozen bias included."""
    from minicnn import PatchWhitening, load_model, save_model
    model = build_model("airnet", widths=[8, 16, 12], stem="whiten", dirac=True,
                        bn_momentum=0.4, bn_eps=1e-12)
    convs = [layer for layer in model.layers if isinstance(layer, Conv2d)]
    assert isinstance(convs[0], PatchWhitening) and model.layers[1].layer_name() == "ReLU"
    assert [c.out_channels for c in convs] == [24, 8, 8, 16, 16, 12, 12]
    assert all(m.momentum == 0.4 and m.eps == 1e-12 for _, m in model.modules()
               if m.layer_name() == "BatchNorm2d")
    for conv in convs[1:]:                 # the first min(in, out) filters copy their channel
        weight = conv.params["weight"]
        for i in range(min(conv.in_channels, conv.out_channels)):
            expected = np.zeros(weight.shape[1:], np.float32)
            expected[i, 1, 1] = 1
            np.testing.assert_array_equal(weight[i], expected)
    assert np.abs(convs[3].params["weight"][8:]).max() > 0     # the rest stay random
    convs[0].fit_to(backend.make_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32))
    convs[0].params["bias"] += 0.5
    convs[0].freeze_bias()
    assert model.num_parameters() == sum(
        int(v.size) for k, v in model.state_dict().items()
        if k not in ("0.weight", "0.bias") and "running" not in k)
    save_model(model, tmp_path / "a.npz")
    loaded, card = load_model(tmp_path / "a.npz")
    assert card["config"] == {"widths": [8, 16, 12], "stem": "whiten", "dirac": True,
                              "bn_momentum": 0.4, "bn_eps": 1e-12}
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value)
    with pytest.raises(MinicnnError, match="widths must be three"):
        build_model("airnet", widths=[8, 16])
    with pytest.raises(MinicnnError, match="stem must be"):
        build_model("airnet", stem="patch")


def test_layers_after_a_frozen_stem_skip_their_input_gradient():
    """Nothing before the first learning layer needs a gradient: it returns no dx, the
    backward stops there, and the parameters' gradients are those of a full backward."""
    from minicnn import PatchWhitening
    model = build_model("airnet", widths=[4, 8, 8], stem="whiten")
    x = backend.make_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model.forward(x)
    full_dx = model.backward(np.ones((2, 10), np.float32))
    expected = {name: m.grads[k].copy() for name, m, k in model.named_parameters()
                if name != "0.bias"}
    assert full_dx.shape == x.shape
    stem = model.layers[0]
    assert isinstance(stem, PatchWhitening)
    stem.freeze_bias()
    model.set_needs_input_grad(False)
    assert [layer.needs_input_grad for layer in model.layers[:4]] == [False, False, False, True]
    model.forward(x)
    assert model.backward(np.ones((2, 10), np.float32)) is None
    for name, m, k in model.named_parameters():
        np.testing.assert_array_equal(m.grads[k], expected[name])
    assert stem.grads == {}
