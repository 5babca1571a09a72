"""airbench's augmentation rules: alternating flips in training, and test-time
augmentation (TTA) with flips and 1-pixel translations.

Alternating flips. Plain random flips mirror each image with probability 1/2
in every epoch, so over two epochs an image is seen in one orientation only a
quarter of the time. Alternating flips draw each image's flip once, F_0 (a fair
coin per image, fixed for the run), and then mirror everything every other
epoch::

    flip(image i, epoch e) = F_0[i] XOR (e is odd)

so every image is seen both ways in every two consecutive epochs.

Test-time augmentation: the logits f(view) of several views of an image,
averaged with weights (the network in eval mode)::

    "none":            f(x)
    "flip":            pair(x) = (f(x) + f(mirror(x))) / 2
    "flip-translate":  pair(x) / 2 + (pair(t1(x)) + pair(t2(x))) / 4

with t1, t2 the diagonal 1-pixel translations: pad x by 1 (reflect) and cut
the window at rows/columns 0..H-1 (content moved down-right) or 2..H+1
(up-left). Six forward passes per image: weights 1/4, 1/4 on x and its mirror,
1/8 on each of the four translated views.

Both after Keller Jordan's airbench94 (github.com/KellerJordan/cifar10-airbench:
the loader's every-other-epoch flip, ``infer_mirror_translate`` for tta_level 2).
"""

from __future__ import annotations

from minicnn import backend

FLIP_RULES = ("random", "alternating")
TTA_MODES = ("none", "flip", "flip-translate")
_ALTERNATING_STREAM = 1_000_003     # keeps F_0's generator apart from the epochs' (seed, e)


def alternating_flips(n: int, seed: int, epoch: int):
    """Boolean (N,) on the backend: which of the n images are mirrored in ``epoch``."""
    first = backend.make_rng([seed, _ALTERNATING_STREAM]).random(n) < 0.5
    return first ^ (epoch % 2 == 1)


def tta_mode(value) -> str:
    """The TTA mode a setting means: True (files before the modes) is "flip", False and
    None are "none"; a mode's name is itself."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "flip"
    if value not in TTA_MODES:
        raise ValueError(f"TTA must be one of {', '.join(TTA_MODES)}, got {value!r}")
    return value


def mirror(x):
    return backend.array_module(x).ascontiguousarray(x[..., ::-1])


def tta_logits(model, x, mode):
    """The logits of ``model`` (in eval mode) for the batch x under TTA ``mode``."""
    mode = tta_mode(mode)
    logits = model.forward(x)
    if mode == "none":
        return logits
    logits += model.forward(mirror(x))
    logits *= 0.5                                      # pair(x)
    if mode == "flip":
        return logits
    xp = backend.array_module(x)
    h, w = x.shape[2:]
    padded = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    for shifted in (padded[..., :h, :w], padded[..., 2:, 2:]):
        shifted = xp.ascontiguousarray(shifted)
        pair = model.forward(shifted)
        pair += model.forward(mirror(shifted))
        logits += 0.25 * pair                          # 1/2 * 1/2 * pair(t(x))
    logits *= 0.5
    return logits
