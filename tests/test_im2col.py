"""im2col against a per-pixel reference loop; col2im is its exact adjoint.

The same for the fast kernels' stride-1 flat versions (minicnn/fast/im2col.py:
im2col_flat, col2im_flat, col2im_flat_rows), and the flat version with outputs in pairs
(im2col_flat_pairs, paired_weight).
"""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import backend
from minicnn.fast.im2col import (
    col2im_flat,
    col2im_flat_rows,
    im2col_flat,
    im2col_flat_pairs,
    paired_weight,
    unpaired_weight_grad,
)
from minicnn.im2col import col2im, im2col, output_size

CASES = [(5, 5, 1, 0), (3, 3, 2, 1), (1, 1, 1, 0), (2, 3, 2, 0), (3, 3, 1, 2)]


def reference_im2col(x, kh, kw, stride, padding):
    """The definition, one pixel at a time: cols[(c,i,j), (n,oh,ow)] = x_pad[n,c,oh*s+i,ow*s+j]."""
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    x_pad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.zeros((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                for ni in range(n):
                    for a in range(oh):
                        for b in range(ow):
                            cols[ci, i, j, ni, a, b] = x_pad[ni, ci, a * stride + i, b * stride + j]
    return cols.reshape(c * kh * kw, n * oh * ow)


@pytest.mark.parametrize("kh,kw,stride,padding", CASES)
def test_im2col_matches_definition(xp, kh, kw, stride, padding):
    x_host = np.arange(2 * 3 * 7 * 6, dtype=np.float64).reshape(2, 3, 7, 6)
    cols = im2col(backend.to_device(x_host), kh, kw, stride, padding)
    np.testing.assert_array_equal(backend.to_host(cols),
                                  reference_im2col(x_host, kh, kw, stride, padding))


@pytest.mark.parametrize("kh,kw,stride,padding", CASES)
def test_col2im_is_the_adjoint_of_im2col(xp, kh, kw, stride, padding):
    """<im2col(x), c> == <x, col2im(c)> for random x and c: the definition of the transpose."""
    rng = backend.make_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    cols = im2col(x, kh, kw, stride, padding)
    c = rng.standard_normal(cols.shape)
    lhs = float((cols * c).sum())
    rhs = float((x * col2im(c, x.shape, kh, kw, stride, padding)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_im2col_keeps_float32(xp):
    x = xp.ones((1, 2, 5, 5), dtype=xp.float32)
    assert im2col(x, 3, 3).dtype == xp.float32
    assert col2im(im2col(x, 3, 3), x.shape, 3, 3).dtype == xp.float32


def test_output_size():
    assert output_size(32, 5, 1, 0) == 28
    assert output_size(7, 3, 2, 1) == 4
    assert output_size(8, 3, 2, 0) == 3


FLAT_CASES = [(5, 5), (3, 3), (1, 1), (2, 3), (4, 1)]


@pytest.mark.parametrize("kh,kw", FLAT_CASES)
def test_im2col_flat_matches_definition(xp, kh, kw):
    """Column oh*Wp + ow of image n is window (oh, ow) for ow < OW; the last row's
    extra columns are 0 (the others wrap around and are never used)."""
    x_host = np.arange(2 * 3 * 7 * 6, dtype=np.float64).reshape(2, 3, 7, 6)
    n, c, hp, wp = x_host.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    cols = backend.to_host(im2col_flat(backend.to_device(x_host), kh, kw))
    assert cols.shape == (n, c * kh * kw, oh * wp)
    grid = cols.reshape(n, c * kh * kw, oh, wp)
    expected = reference_im2col(x_host, kh, kw, 1, 0).reshape(c * kh * kw, n, oh, ow)
    np.testing.assert_array_equal(grid[..., :ow], expected.transpose(1, 0, 2, 3))
    assert not grid[:, :, -1, ow:].any()


@pytest.mark.parametrize("kh,kw", FLAT_CASES)
def test_col2im_flat_is_the_adjoint_of_im2col_flat(xp, kh, kw):
    rng = backend.make_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    cols = im2col_flat(x, kh, kw)
    c = rng.standard_normal(cols.shape)
    lhs = float((cols * c).sum())
    rhs = float((x * col2im_flat(c, x.shape, kh, kw)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


@pytest.mark.parametrize("kh,kw", FLAT_CASES)
def test_col2im_flat_rows_matches_col2im_flat(xp, kh, kw):
    """The one strided sum against the kh*kw shifted adds, on rows padded with zeros."""
    rng = backend.make_rng(1)
    x_shape = (2, 3, 7, 6)
    n, c, hp, wp = x_shape
    oh, ow = hp - kh + 1, wp - kw + 1
    length = (oh - 1) * wp + ow
    dcols = rng.standard_normal((n, c * kh * kw, oh * wp))
    rows = xp.zeros((n, c * kh * kw, hp * wp))
    rows[..., :length] = dcols[..., :length]
    np.testing.assert_allclose(backend.to_host(col2im_flat_rows(rows, x_shape, kh, kw)),
                               backend.to_host(col2im_flat(dcols, x_shape, kh, kw)), rtol=1e-12)


def test_col2im_flat_rows_refuses_rows_of_the_wrong_length(xp):
    with pytest.raises(ValueError, match="rows of shape"):
        col2im_flat_rows(xp.zeros((1, 9, 12)), (1, 1, 5, 5), 3, 3)


def test_im2col_flat_refuses_a_view_it_cannot_read_by_offsets(xp):
    x = xp.zeros((1, 1, 5, 5))[..., ::-1]
    with pytest.raises(ValueError, match="C-contiguous"):
        im2col_flat(x, 3, 3)


PAIRS_CASES = [(5, 5), (3, 3), (1, 1), (2, 3), (4, 1), (1, 5)]      # kw odd


@pytest.mark.parametrize("kh,kw", PAIRS_CASES)
def test_im2col_flat_pairs_matches_definition(xp, kh, kw):
    """Column q2 of image n holds the kh x (kw+1) patch that starts at flat pixel 2*q2,
    for the pairs that hold the grid's L outputs; the rest are 0."""
    x_host = np.arange(2 * 3 * 7 * 8, dtype=np.float64).reshape(2, 3, 7, 8)
    n, c, hp, wp = x_host.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    pairs = ((oh - 1) * wp + ow) // 2
    cols = backend.to_host(im2col_flat_pairs(backend.to_device(x_host), kh, kw))
    assert cols.shape == (n, c * kh * (kw + 1), oh * wp // 2)
    flat = x_host.reshape(n, c, hp * wp)
    expected = np.zeros((n, c, kh, kw + 1, oh * wp // 2))
    for q2 in range(pairs):
        for i in range(kh):
            for j in range(kw + 1):
                expected[:, :, i, j, q2] = flat[:, :, 2 * q2 + i * wp + j]
    np.testing.assert_array_equal(cols, expected.reshape(cols.shape))


@pytest.mark.parametrize("kh,kw", PAIRS_CASES)
def test_outputs_in_pairs_are_the_flat_grid_even_columns_then_odd(xp, kh, kw):
    rng = backend.make_rng(2)
    x = rng.standard_normal((2, 3, 7, 8))
    weight = rng.standard_normal((4, 3, kh, kw))
    n, c, hp, wp = x.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    grid = (weight.reshape(4, -1) @ im2col_flat(x, kh, kw)).reshape(n, 4, oh, wp)
    pairs = (paired_weight(weight) @ im2col_flat_pairs(x, kh, kw)).reshape(n, 4, 2, oh, wp // 2)
    for parity in (0, 1):
        np.testing.assert_allclose(backend.to_host(pairs[:, :, parity, :, :ow // 2]),
                                   backend.to_host(grid[..., parity:ow:2]), rtol=1e-12)


def test_unpaired_weight_grad_is_the_adjoint_of_paired_weight(xp):
    rng = backend.make_rng(3)
    weight = rng.standard_normal((4, 3, 5, 3))
    d_paired = rng.standard_normal((8, 3 * 5 * 4))
    lhs = float((paired_weight(weight) * d_paired).sum())
    rhs = float((weight * unpaired_weight_grad(d_paired, weight.shape)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


@pytest.mark.parametrize("shape,kw", [((1, 1, 5, 7), 3), ((1, 1, 5, 6), 2)],
                         ids=["odd-width", "even-kernel"])
def test_im2col_flat_pairs_refuses_what_it_cannot_pair(xp, shape, kw):
    with pytest.raises(ValueError, match="Wp even and kw odd"):
        im2col_flat_pairs(xp.zeros(shape), 3, kw)
