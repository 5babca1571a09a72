"""The hold-out split (minicnn.holdout): stratified, disjoint, fixed by its own seed."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn.data import CLASS_NAMES, Dataset
from minicnn.errors import MinicnnError
from minicnn.holdout import holdout_indices, split


def labelled(n=1000, seed=0):
    labels = np.random.default_rng(seed).integers(0, 10, n).astype(np.int64)
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256                # each image names its index
    return Dataset(images, labels, CLASS_NAMES)


def index_of(dataset):
    return dataset.images[:, 0, 0, 0].astype(int) + 256 * dataset.images[:, 0, 0, 1].astype(int)


def test_split_is_stratified_disjoint_and_ordered():
    data = labelled()
    rest, held = split(data, 105, seed=0)
    assert len(held) == 105 and len(rest) == 895
    counts = np.bincount(held.labels, minlength=10)
    assert counts.tolist() == [11] * 5 + [10] * 5           # 105 = 10 * 10 + 5
    rest_index, held_index = index_of(rest), index_of(held)
    assert set(rest_index).isdisjoint(held_index)
    assert sorted(set(rest_index) | set(held_index)) == list(range(1000))
    assert list(held_index) == sorted(held_index) and list(rest_index) == sorted(rest_index)
    np.testing.assert_array_equal(held.labels, data.labels[held_index])


def test_split_depends_on_its_own_seed_only():
    data = labelled()
    a = holdout_indices(data.labels, 100, seed=0)
    np.testing.assert_array_equal(a, holdout_indices(data.labels, 100, seed=0))
    assert len(set(a) & set(holdout_indices(data.labels, 100, seed=1))) < 50
    np.random.seed(5)                       # global NumPy state plays no part
    np.testing.assert_array_equal(a, holdout_indices(data.labels, 100, seed=0))


def test_split_refuses_impossible_sizes():
    data = labelled(50)
    with pytest.raises(MinicnnError, match="--holdout must be between 1 and 49"):
        split(data, 50)
    few = Dataset(data.images[:12], np.array([0] * 11 + [1]), CLASS_NAMES)
    with pytest.raises(MinicnnError, match="needs 1 images of class 2"):
        split(few, 10)
