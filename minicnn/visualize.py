"""Pictures of what a trained network does, as PNG files.

- :func:`filter_grid`: the first conv layer's filters, one RGB tile each.
- :func:`feature_map_grids`: every conv layer's output for one image, one
  grayscale tile per channel.
- :func:`saliency`: |d logit_c / d x|, the gradient of the predicted class's
  logit with respect to the input pixels, by minicnn's own backward pass
  (the upstream gradient is one-hot on class c), maximum over the 3 colour
  channels. Bright pixels are those whose change would move the score most.
- :func:`curves`: loss and accuracy per epoch from a training history JSON
  (needs matplotlib, an optional extra).

Everything here works on host (NumPy) arrays; tiles are scaled up with
nearest-neighbour so each pixel stays a visible square.
"""

from __future__ import annotations

import numpy
from PIL import Image

from minicnn import backend
from minicnn.errors import MinicnnError
from minicnn.layers import BatchNorm2d, Conv2d, Sequential


def _to_uint8(tile) -> numpy.ndarray:
    """Stretch an array to 0..255 (a constant array becomes mid-gray)."""
    tile = numpy.asarray(tile, dtype=numpy.float64)
    low, high = tile.min(), tile.max()
    if high == low:
        return numpy.full(tile.shape, 128, numpy.uint8)
    return numpy.round(255 * (tile - low) / (high - low)).astype(numpy.uint8)


def tile_grid(tiles: list, columns: int, scale: int, gap: int = 2) -> Image.Image:
    """Lay out equally sized (H, W) or (H, W, 3) uint8 tiles on a white grid, scaled up."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    mode = "RGB" if tiles[0].ndim == 3 else "L"
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = Image.new(mode, (columns * cell_w + gap, rows * cell_h + gap), "white")
    for index, tile in enumerate(tiles):
        image = Image.fromarray(tile).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        row, column = divmod(index, columns)
        grid.paste(image, (gap + column * cell_w, gap + row * cell_h))
    return grid


def conv_layers(model: Sequential) -> list[tuple[int, Conv2d]]:
    return [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, Conv2d)]


def filter_grid(model: Sequential, scale: int = 12) -> Image.Image:
    """The first conv layer's filters; RGB tiles when it reads 3 channels, else one per input."""
    if not conv_layers(model):
        raise MinicnnError("the model has no Conv2d layer to show")
    weight = backend.to_host(conv_layers(model)[0][1].weight_and_bias()[0])   # (OC, C, kh, kw)
    if weight.shape[1] == 3:
        tiles = [_to_uint8(f.transpose(1, 2, 0)) for f in weight]
    else:
        tiles = [_to_uint8(f) for filters in weight for f in filters]
    return tile_grid(tiles, columns=min(len(tiles), 8), scale=scale)


def feature_map_grids(model: Sequential, x, scale: int = 4) -> dict[int, Image.Image]:
    """{layer index: grid of that conv layer's output channels} for one image x (1, C, H, W)."""
    model.eval()
    wanted = dict(conv_layers(model))
    grids = {}
    out = x
    for index, layer in enumerate(model.layers):
        out = layer.forward(out)
        if index in wanted:
            maps = backend.to_host(out[0])
            grids[index] = tile_grid([_to_uint8(m) for m in maps],
                                     columns=min(len(maps), 8), scale=scale)
    return grids


def saliency(model: Sequential, x, class_index: int):
    """d logit[class_index] / dx for one image x (1, C, H, W), by backward; same shape as x."""
    model.train()          # keep the caches backward needs; BatchNorm layers stay in
    for _, module in model.modules():      # eval mode (running statistics, not the
        if isinstance(module, BatchNorm2d):   # one image's), so the logits are the eval ones
            module.training = False
    logits = model.forward(x)
    upstream = backend.xp.zeros_like(logits)
    upstream[0, class_index] = 1.0
    model.set_needs_input_grad(True)
    return model.backward(upstream)


def saliency_image(image_uint8: numpy.ndarray, gradient, scale: int = 8) -> Image.Image:
    """The image and max_c |gradient| side by side, both scaled up."""
    heat = _to_uint8(numpy.abs(backend.to_host(gradient)[0]).max(axis=0))
    picture = image_uint8.transpose(1, 2, 0)
    return tile_grid([picture, numpy.stack([heat] * 3, axis=-1)], columns=2, scale=scale)


def curves(history: list[dict], title: str = ""):
    """A matplotlib figure: training loss, and train and test (or hold-out) accuracy per
    epoch (epochs that were not evaluated are left out)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional extra
        matplotlib.use("Agg")
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        raise MinicnnError("plotting curves needs matplotlib: pip install 'minicnn[plot]'") \
            from None
    epochs = [entry["epoch"] for entry in history]
    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [entry["train_loss"] for entry in history], marker="o")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("train_accuracy", "train"), ("test_accuracy", "test"),
                       ("holdout_accuracy", "holdout")):
        points = [(entry["epoch"], 100 * entry[key]) for entry in history
                  if entry.get(key) is not None]           # epochs that were not evaluated
        if points:
            accuracy_axes.plot(*zip(*points, strict=True), marker="o", label=label)
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    accuracy_axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure
