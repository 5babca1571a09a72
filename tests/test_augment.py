"""airbench's augmentations (minicnn.augment, data.random_crop's reflect mode) against
their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import backend
from minicnn.augment import alternating_flips, tta_logits, tta_mode
from minicnn.data import random_crop


def test_alternating_flips_mirror_every_image_every_other_epoch(xp):
    """flip(i, e) = F_0[i] XOR (e odd), F_0 a fair coin per image fixed for the run."""
    first = backend.to_host(alternating_flips(1000, seed=3, epoch=0))
    assert 430 < first.sum() < 570                      # a fair coin (about 4.4 sigma)
    for epoch in range(1, 6):
        flips = backend.to_host(alternating_flips(1000, seed=3, epoch=epoch))
        np.testing.assert_array_equal(flips, first ^ (epoch % 2 == 1))
    other_seed = backend.to_host(alternating_flips(1000, seed=4, epoch=0))
    assert (other_seed != first).sum() > 400


def test_fit_uses_the_alternating_rule():
    from minicnn.train import TrainConfig, _plan_epoch
    config = TrainConfig(flip_rule="alternating", seed=2)
    plans = [_plan_epoch(50, config, epoch) for epoch in range(3)]
    np.testing.assert_array_equal(plans[1].flip, ~plans[0].flip)
    np.testing.assert_array_equal(plans[2].flip, plans[0].flip)
    assert not np.array_equal(plans[0].order, plans[1].order)      # shuffled as before
    random = [_plan_epoch(50, TrainConfig(seed=2), epoch) for epoch in range(2)]
    np.testing.assert_array_equal(random[0].order, plans[0].order)  # same stream otherwise


def test_reflect_crop_is_numpy_pad_reflect_then_a_window(xp):
    images = backend.make_rng(1).integers(0, 256, (4, 3, 5, 6)).astype(xp.uint8)
    offsets = backend.make_rng(2).integers(0, 5, (4, 2))
    out = backend.to_host(random_crop(images, offsets, 2, "reflect"))
    padded = np.pad(backend.to_host(images), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    for i, (r, c) in enumerate(backend.to_host(offsets)):
        np.testing.assert_array_equal(out[i], padded[i, :, r:r + 5, c:c + 6])
    centred = backend.to_host(random_crop(images, xp.full((4, 2), 2), 2, "reflect"))
    np.testing.assert_array_equal(centred, backend.to_host(images))     # offset 2: no shift
    shifted = backend.to_host(random_crop(images, xp.zeros((4, 2), dtype=int), 2, "reflect"))
    np.testing.assert_array_equal(shifted[..., 2:, 2:], backend.to_host(images)[..., :3, :4])
    np.testing.assert_array_equal(shifted[..., 0, 2:], backend.to_host(images)[..., 2, :4])
    with pytest.raises(ValueError, match="pad mode"):
        random_crop(images, offsets, 2, "edge")


class Recorder:
    """A "model" whose logits are a fixed linear function of its input, recording what it saw."""

    def __init__(self, xp):
        self.seen = []
        self.projection = backend.make_rng(5).standard_normal((3 * 4 * 4, 2))

    def forward(self, x):
        self.seen.append(x.copy())
        return x.reshape(len(x), -1) @ self.projection


def test_tta_modes_weigh_their_views_as_airbench(xp):
    x = backend.make_rng(1).standard_normal((2, 3, 4, 4))
    model = Recorder(xp)
    f = model.forward
    padded = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    down_right, up_left = padded[..., :4, :4], padded[..., 2:, 2:]
    host = backend.to_host
    np.testing.assert_allclose(host(tta_logits(model, x, "none")), host(f(x)))
    np.testing.assert_allclose(host(tta_logits(model, x, "flip")),
                               host((f(x) + f(x[..., ::-1])) / 2))
    expected = (0.25 * (f(x) + f(x[..., ::-1]))
                + 0.125 * (f(down_right) + f(down_right[..., ::-1])
                           + f(up_left) + f(up_left[..., ::-1])))
    model.seen.clear()
    np.testing.assert_allclose(host(tta_logits(model, x, "flip-translate")), host(expected),
                               rtol=1e-12)
    assert len(model.seen) == 6
    np.testing.assert_array_equal(host(down_right[..., 1:, 1:]), host(x[..., :3, :3]))  # down-right
    np.testing.assert_array_equal(host(up_left[..., :3, :3]), host(x[..., 1:, 1:]))     # up-left


def test_tta_modes_of_old_and_new_settings():
    assert [tta_mode(v) for v in (None, False, True, "none", "flip", "flip-translate")] == \
        ["none", "none", "flip", "none", "flip", "flip-translate"]
    with pytest.raises(ValueError, match="TTA must be one of"):
        tta_mode("rotate")
