"""Named architectures, built by ``build_model(name, **config)``.

Register a new one with the ``@register("name")`` decorator; its keyword
arguments are its config, saved in weights files so ``load_model`` can
rebuild it.
"""

from __future__ import annotations

from minicnn.errors import MinicnnError
from minicnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential

MODELS: dict = {}


def register(name: str):
    def decorator(builder):
        MODELS[name] = builder
        return builder
    return decorator


def build_model(name: str, **config):
    """Build a registered model with fresh parameters from the backend's generator."""
    if name not in MODELS:
        raise MinicnnError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    try:
        model = MODELS[name](**config)
    except TypeError as exc:
        raise MinicnnError(f"bad config for model {name!r}: {exc}") from None
    model.name, model.config = name, dict(config)
    return model


@register("lenet")
def lenet(num_classes: int = 10, in_channels: int = 3) -> Sequential:
    """The seed network for 32x32 images (LeNet-5 style), without a ReLU on the logits.

    conv 3->6 5x5, ReLU, maxpool 2, conv 6->16 5x5, ReLU, maxpool 2, flatten,
    fc 400->128, ReLU, fc 128->84, ReLU, fc 84->num_classes.
    """
    return Sequential(
        Conv2d(in_channels, 6, 5), ReLU(), MaxPool2d(2),
        Conv2d(6, 16, 5), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(16 * 5 * 5, 128), ReLU(),
        Linear(128, 84), ReLU(),
        Linear(84, num_classes),
    )
