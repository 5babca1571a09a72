"""A hold-out set cut from the training images, to make choices on without the test set.

``split(train, n, seed)`` takes n images out of the training set, stratified: the
same number from every class (n / K each, the first n mod K classes one more),
chosen uniformly at random within each class by a generator of its own,
numpy.random.default_rng([SPLIT_STREAM, seed]). It depends on nothing but the
labels, n and this seed: not on the training seed, the backend or the batch
size, so every run with the same --holdout and --holdout-seed holds out the
same images. Both parts keep the original order of the images.
"""

from __future__ import annotations

import numpy

from minicnn.data import Dataset
from minicnn.errors import MinicnnError

SPLIT_STREAM = 21      # the generator's first seed word: this split's stream, no other's


def holdout_indices(labels, n: int, seed: int = 0, num_classes: int | None = None):
    """Sorted indices of the n held-out images (a stratified random choice)."""
    labels = numpy.asarray(labels)
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = numpy.random.default_rng([SPLIT_STREAM, seed])
    chosen = []
    for c in range(k):
        members = numpy.flatnonzero(labels == c)
        wanted = n // k + (c < n % k)
        if wanted > len(members):
            raise MinicnnError(f"--holdout {n} needs {wanted} images of class {c}, the "
                               f"training set has {len(members)}")
        chosen.append(rng.choice(members, size=wanted, replace=False))
    return numpy.sort(numpy.concatenate(chosen))


def split(train: Dataset, n: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(the training images left, the n held out), as described above."""
    if not 0 < n < len(train):
        raise MinicnnError(f"--holdout must be between 1 and {len(train) - 1} (the training "
                           f"set has {len(train)} images), got {n}")
    held = holdout_indices(train.labels, n, seed, len(train.class_names))
    keep = numpy.ones(len(train), dtype=bool)
    keep[held] = False
    return (Dataset(train.images[keep], train.labels[keep], train.class_names),
            Dataset(train.images[held], train.labels[held], train.class_names))
