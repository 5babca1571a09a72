"""The figures of a study report, drawn with matplotlib (an optional extra: minicnn[plot]).

Every figure has a title, labelled axes with units, and a colour bar where
colours stand for values. Arrays are drawn with nearest-neighbour upscaling
(``interpolation="nearest"``), so each entry is a visible square: a learner
sees the pixels the network sees. Signed values use a blue-white-red map
centred on 0 (red positive); magnitudes a dark-to-bright one.

All functions take host (NumPy) arrays and return a matplotlib Figure;
:func:`png_bytes` renders one.
"""

from __future__ import annotations

import io

import numpy
from PIL import Image

from minicnn.errors import MinicnnError

try:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator
except ImportError:                                 # the optional extra is not installed
    raise MinicnnError("drawing the figures needs matplotlib: pip install 'minicnn[plot]'") \
        from None

SIGNED, MAGNITUDE = "RdBu_r", "inferno"
TILE_INCHES = 1.0             # each map or filter of a grid: 100 pixels at 100 dpi
WIDE_INCHES = 12.6            # the widest figure: 1260 pixels, the HTML page's width


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as a PNG file: RGB (the background is opaque white), compressed hard."""
    drawn, packed = io.BytesIO(), io.BytesIO()
    figure.savefig(drawn, format="png", dpi=dpi)
    Image.open(drawn).convert("RGB").save(packed, format="PNG", optimize=True)
    return packed.getvalue()


def _pixel_axes(axes, unit: str = "pixel") -> None:
    axes.set_xlabel(f"x ({unit})")
    axes.set_ylabel(f"y ({unit})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))


def _signed_limit(values) -> float:
    """The colour range +-limit that centres a signed map on 0 (1 for an all-zero map)."""
    limit = float(numpy.abs(values).max())
    return limit if limit > 0 else 1.0


def _tile_ticks(size: int) -> list[int]:
    """A few whole pixel positions 0..size-1 to label on a tile's edge."""
    return [int(t) for t in MaxNLocator(integer=True, nbins=3).tick_values(0, size - 1)
            if 0 <= t <= size - 1]


def _image_grid(tiles: list, titles: list[str], columns: int, *, title: str,
                row_labels: list[str] | None = None, limit: float, colour_label: str,
                unit: str, tile_inches: float = TILE_INCHES) -> Figure:
    """A figure of equally sized tiles on a grid, all in one axes (one axes draws much
    faster than one per tile): (H, W) tiles with one signed colour scale +-limit and a
    colour bar, (H, W, 3) tiles as RGB in 0..1, None as an empty cell. Each tile's pixel
    coordinates are on the left and bottom edges; rows with a title get room for it."""
    height, width = next(t for t in tiles if t is not None).shape[:2]
    rows = -(-len(tiles) // columns)
    gap = 0.3 * max(height, width)                          # in tile pixels
    title_room = [0.35 * max(height, width) if any(titles[r * columns:(r + 1) * columns])
                  else 0.0 for r in range(rows)]
    tops = [sum(title_room[:r + 1]) + r * (height + gap) for r in range(rows)]
    step_x = width + gap
    inches = tile_inches / max(height, width)               # per tile pixel
    figure = Figure(figsize=(columns * step_x * inches + 2.2,
                             (tops[-1] + height) * inches + 1.3), layout="constrained")
    axes = figure.subplots()
    norm = Normalize(-limit, limit)
    for index, tile in enumerate(tiles):
        if tile is None:
            continue
        row, column = divmod(index, columns)
        left, top = column * step_x, tops[row]
        extent = (left - 0.5, left + width - 0.5, top + height - 0.5, top - 0.5)
        if tile.ndim == 3:
            axes.imshow(tile, interpolation="nearest", extent=extent)
        else:
            axes.imshow(tile, cmap=SIGNED, norm=norm, interpolation="nearest", extent=extent)
        axes.add_patch(Rectangle((extent[0], extent[3]), width, height, fill=False,
                                 edgecolor="0.5", linewidth=0.6))
        if titles[index]:
            axes.text(left + width / 2 - 0.5, top - 0.5 - 0.1 * title_room[row],
                      titles[index], ha="center", va="bottom", fontsize=9)
    x_ticks, y_ticks = _tile_ticks(width), _tile_ticks(height)
    axes.set_xticks([c * step_x + t for c in range(columns) for t in x_ticks],
                    [str(t) for _ in range(columns) for t in x_ticks])
    axes.set_yticks([top + t for top in tops for t in y_ticks],
                    [str(t) for _ in tops for t in y_ticks])
    axes.set_xlim(-0.5 - gap / 4, (columns - 1) * step_x + width - 0.5 + gap / 4)
    axes.set_ylim(tops[-1] + height - 0.5 + gap / 4, -0.5)
    axes.set_aspect("equal")
    axes.tick_params(labelsize=8)
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.set_xlabel(f"x ({unit}), in each tile")
    if row_labels:
        for top, label in zip(tops, row_labels, strict=True):
            axes.annotate(f"{label}\ny ({unit})", xy=(0, top + (height - 1) / 2),
                          xycoords=("axes fraction", "data"), xytext=(-34, 0),
                          textcoords="offset points", rotation=90, ha="center", va="center")
    else:
        axes.set_ylabel(f"y ({unit}), in each tile")
    if any(t is not None and t.ndim == 2 for t in tiles):
        figure.colorbar(ScalarMappable(norm, SIGNED), ax=axes, shrink=0.9, label=colour_label)
    figure.suptitle(title)
    return figure


# --- the input and the predictions ---------------------------------------------------

def input_and_predictions(image_uint8, title: str, labels: list[str],
                          probabilities) -> Figure:
    """The image (3, H, W) as the model gets it, and the top classes' probabilities."""
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    picture, bars = figure.subplots(1, 2, width_ratios=(1, 1.5))
    picture.imshow(image_uint8.transpose(1, 2, 0), interpolation="nearest")
    picture.set_title(f"input, {image_uint8.shape[2]}x{image_uint8.shape[1]} pixels")
    _pixel_axes(picture)
    percent = 100 * numpy.asarray(probabilities, dtype=float)
    rows = numpy.arange(len(labels))
    bars.barh(rows, percent, color=["tab:red"] + ["tab:gray"] * (len(labels) - 1))
    bars.set_yticks(rows, labels)
    bars.invert_yaxis()
    bars.set_xlim(0, 100)
    bars.set_xlabel("probability (%)")
    bars.set_title(f"top {len(labels)} predictions (softmax of the logits)")
    for row, value in zip(rows, percent, strict=True):
        bars.text(min(value + 1, 88), row, f"{value:.1f}%", va="center")
    figure.suptitle(title)
    return figure


# --- feature maps and filters --------------------------------------------------------

def feature_maps(maps, channels: list[int], title: str, columns: int = 8) -> Figure:
    """The maps (C, H, W) of the listed channels, one signed colour scale for all."""
    tiles = [maps[c] for c in channels]
    return _image_grid(tiles, [f"channel {c}" for c in channels], min(columns, len(channels)),
                       title=title, limit=_signed_limit(numpy.stack(tiles)),
                       colour_label="conv output (no unit)", unit="pixel")


def filters(weight, title: str, columns: int = 8) -> Figure:
    """First-layer filters (F, C, kh, kw): per filter a column with, for C = 3, the filter
    as a colour picture (grey = 0) and then its weights per input channel."""
    count, channels = weight.shape[:2]
    limit = _signed_limit(weight)
    names = ("red", "green", "blue") if channels == 3 else \
        [f"channel {c}" for c in range(channels)]
    row_labels = (["colour"] if channels == 3 else []) + list(names)
    columns = min(columns, count)
    tiles, titles, labels = [], [], []
    for first in range(0, count, columns):          # a block of rows per `columns` filters
        block = range(first, min(first + columns, count))
        rows = []
        if channels == 3:
            rows.append([numpy.clip(0.5 + weight[f].transpose(1, 2, 0) / (2 * limit), 0, 1)
                         for f in block])
        rows += [[weight[f, c] for f in block] for c in range(channels)]
        for row_index, row in enumerate(rows):
            padding = columns - len(row)
            tiles += row + [None] * padding
            titles += [f"filter {f}" if row_index == 0 else "" for f in block] + [""] * padding
        labels += row_labels
    return _image_grid(tiles, titles, columns, title=title, row_labels=labels, limit=limit,
                       colour_label="weight", unit="px")


# --- saliency ------------------------------------------------------------------------

def saliency(image_uint8, gradient_map, smooth_map, times_input_map, title: str, *,
             samples: int, top_fraction: float = 0.2) -> Figure:
    """Six panels: the image; |gradient| and SmoothGrad (H, W magnitudes, per grey level);
    SmoothGrad over a grey copy of the image; the image where SmoothGrad is in its top
    ``top_fraction``; gradient x input (H, W, signed, in logits)."""
    figure = Figure(figsize=(WIDE_INCHES, 7.8), layout="constrained")
    (picture, plain, smooth), (over, kept, times_input) = figure.subplots(2, 3)
    rgb = image_uint8.transpose(1, 2, 0)
    unit = "|d logit / d grey level|"
    picture.imshow(rgb, interpolation="nearest")
    picture.set_title("input")
    for axes, values, panel_title in (
            (plain, gradient_map, "|gradient|, max over colours"),
            (smooth, smooth_map, f"SmoothGrad: |mean gradient|\nover {samples} noisy copies")):
        shown = axes.imshow(values, cmap=MAGNITUDE, vmin=0, interpolation="nearest")
        axes.set_title(panel_title)
        figure.colorbar(shown, ax=axes, shrink=0.85, label=unit)
    over.imshow(rgb.mean(axis=2), cmap="gray", interpolation="nearest")
    shown = over.imshow(smooth_map, cmap=MAGNITUDE, vmin=0, alpha=0.6, interpolation="nearest")
    over.set_title("SmoothGrad over the image (grey)")
    figure.colorbar(shown, ax=over, shrink=0.85, label=unit)
    threshold = numpy.quantile(smooth_map, 1 - top_fraction)
    faded = (0.3 * rgb + 0.7 * 230).astype(numpy.uint8)
    kept.imshow(numpy.where((smooth_map >= threshold)[..., None], rgb, faded),
                interpolation="nearest")
    kept.set_title(f"the {top_fraction:.0%} of pixels SmoothGrad ranks highest")
    limit = _signed_limit(times_input_map)
    shown = times_input.imshow(times_input_map, cmap=SIGNED, vmin=-limit, vmax=limit,
                               interpolation="nearest")
    times_input.set_title("gradient x input, summed over colours")
    figure.colorbar(shown, ax=times_input, shrink=0.85, label="logit (first-order share)")
    for axes in (picture, plain, smooth, over, kept, times_input):
        _pixel_axes(axes)
    figure.suptitle(title)
    return figure


# --- training curves -----------------------------------------------------------------

def curves(history: list[dict], title: str) -> Figure:
    """Loss, accuracy and learning rate per epoch; a dashed line at the epoch of the peak
    learning rate when the rate changes during training."""
    epochs = [entry["epoch"] for entry in history]
    figure = Figure(figsize=(WIDE_INCHES, 3.9), layout="constrained")
    loss, accuracy, rate = figure.subplots(1, 3, sharex=True)
    loss.plot(epochs, [e["train_loss"] for e in history], marker="o", color="tab:purple")
    loss.set(ylabel="training loss (cross-entropy, nats)", title="loss (mean over the epoch)")
    for key, label in (("train_accuracy", "train (mean over the epoch)"),
                       ("test_accuracy", "test (after the epoch)")):
        accuracy.plot(epochs, [100 * e[key] for e in history], marker="o", label=label)
    accuracy.set(ylabel="accuracy (%)", title="accuracy")
    accuracy.legend()
    rates = [e.get("lr") for e in history]
    if all(r is not None for r in rates):
        rate.plot(epochs, rates, marker="o", color="tab:green")
        rate.set(ylabel="learning rate (per step)", title="learning rate (end of each epoch)")
        rate.set_ylim(bottom=0)
        if max(rates) > min(rates):
            peak = epochs[int(numpy.argmax(rates))]
            for axes in (loss, accuracy, rate):
                axes.axvline(peak, color="gray", linestyle="--", linewidth=1)
            rate.annotate("peak", (peak, 0), xytext=(4, 4), textcoords="offset points",
                          color="gray")
    else:
        rate.text(0.5, 0.5, "no learning rate\nin this history", ha="center", va="center",
                  transform=rate.transAxes)
        rate.set(title="learning rate", yticks=[])
    for axes in (loss, accuracy, rate):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    return figure
