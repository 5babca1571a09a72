"""Lookahead averaging (minicnn.averaging) against its definition; the PyTorch
comparison is in test_vs_pytorch.py, exact resume in test_train.py."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import BatchNorm2d, Linear, Sequential
from minicnn.averaging import Lookahead


def small_model():
    model = Sequential(Linear(3, 2, bias=False), BatchNorm2d(2))
    model.layers[1].buffers["running_mean"][:] = [0.5, -0.5]
    return model


def set_all(model, value):
    for _, holder, key in model.named_arrays():
        holder[key][...] = value


def test_lookahead_schedule_and_pull():
    model = small_model()
    lookahead = Lookahead(total_steps=20, start_epoch=1, every=5)
    assert lookahead.decay(20) == pytest.approx(0.95 ** 5)
    assert lookahead.decay(10) == pytest.approx(0.95 ** 5 / 8)
    lookahead.after_step(model, epoch=0, step=5)         # before start_epoch: nothing
    assert lookahead.average is None
    lookahead.end_epoch(model)                           # nothing to copy back yet
    set_all(model, 2.0)
    lookahead.after_step(model, epoch=1, step=7)         # not a multiple of every
    assert lookahead.average is None
    lookahead.after_step(model, epoch=1, step=10)        # the first: a copy
    assert set(lookahead.average) == set(model.state_dict())     # BN's statistics too
    set_all(model, 4.0)
    lookahead.after_step(model, epoch=1, step=15)
    rho = 0.95 ** 5 * (15 / 20) ** 3
    for name, value in model.state_dict().items():       # theta_avg = rho*2 + (1-rho)*4 = theta
        np.testing.assert_allclose(value, rho * 2 + (1 - rho) * 4, rtol=1e-6)
        np.testing.assert_array_equal(lookahead.average[name], value)
    set_all(model, 7.0)                                  # steps since the last pull are dropped
    lookahead.end_epoch(model)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, lookahead.average[name])
        assert float(value.max()) < 4.0


def test_lookahead_state_round_trip():
    model = small_model()
    lookahead = Lookahead(10, start_epoch=0, every=1)
    lookahead.after_step(model, 0, 1)
    restored = Lookahead(10, start_epoch=0, every=1)
    restored.load_state_dict({k: v.copy() for k, v in lookahead.state_dict().items()})
    assert set(restored.average) == set(lookahead.average)
    empty = Lookahead(10)
    empty.load_state_dict(Lookahead(10).state_dict())
    assert empty.average is None


def test_lookahead_refuses_bad_settings():
    with pytest.raises(ValueError):
        Lookahead(0)
    with pytest.raises(ValueError):
        Lookahead(10, every=0)
