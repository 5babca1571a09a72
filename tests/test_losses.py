"""softmax and softmax-cross-entropy: values, stability, shapes.
(The gradient check of the loss is in test_gradcheck_layers.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minicnn import SoftmaxCrossEntropy, backend, softmax


def test_value_by_hand(xp):
    logits = xp.asarray([[0.0, math.log(3.0)], [2.0, 2.0]])
    loss = SoftmaxCrossEntropy().forward(logits, xp.asarray([1, 0]))
    # p = (1/4, 3/4) and (1/2, 1/2): L = -(log 3/4 + log 1/2) / 2
    assert float(loss) == pytest.approx(-(math.log(0.75) + math.log(0.5)) / 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_stay_finite(xp, dtype):
    logits = xp.asarray([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, 1000.0]], dtype=dtype)
    criterion = SoftmaxCrossEntropy()
    loss = criterion.forward(logits, xp.asarray([1, 2]))
    grad = criterion.backward()
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(1000.0, rel=1e-6)
    assert bool(xp.isfinite(grad).all()) and grad.dtype == dtype
    np.testing.assert_allclose(backend.to_host(grad), [[0.5, -0.5, 0], [0, 0, 0]], atol=1e-6)


def test_softmax_rows_sum_to_one(xp):
    p = softmax(backend.make_rng(0).standard_normal((4, 7)) * 50)
    np.testing.assert_allclose(backend.to_host(p.sum(axis=1)), 1.0, rtol=1e-12)


def test_shape_mismatch_is_an_error(xp):
    with pytest.raises(ValueError, match=r"expects labels of shape \(3,\)"):
        SoftmaxCrossEntropy().forward(xp.zeros((3, 10)), xp.zeros(4, dtype=xp.int64))
