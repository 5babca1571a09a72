"""``minicnn visualize``: one image through a trained model, in pictures a learner can read.

:func:`study` draws the panels: the image and the top predictions, each conv
layer's feature maps, the saliency maps (gradient, SmoothGrad, gradient x
input), the first layer's filters and the training curves, each with a
title and a two-line caption (what it shows, what to notice).
:func:`write_pngs` saves them as PNG files; :func:`html_page` lays them
out as one self-contained page (the images inlined as data: URIs, no
scripts) that any browser opens without a network, and :func:`write_html`
saves it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minicnn import augment, backend, data
from minicnn.checkpoint import atomic_write
from minicnn.errors import MinicnnError
from minicnn.losses import softmax
from minicnn.study import figures
from minicnn.study.activations import conv_layers, conv_outputs
from minicnn.study.gradients import input_gradient, smoothgrad
from minicnn.study.inputs import check_metadata


@dataclass
class Panel:
    """One figure of the report."""

    name: str          # file name without .png, e.g. "features_3"
    title: str
    shows: str         # caption, first line: what the figure shows
    notice: str        # caption, second line: what to notice
    figure: object = None      # the matplotlib Figure, until it is drawn into png
    png: bytes = b""


# --- the panels ------------------------------------------------------------------------

def _panel(name: str, title: str, figure, shows: str, notice: str) -> Panel:
    return Panel(name, title, shows, notice, figure)


def _input_panel(image, image_name, class_names, probabilities, top_k, tta) -> Panel:
    top = probabilities.argsort()[::-1][:top_k]
    first, second = top[0], top[1] if len(top) > 1 else top[0]
    title = f"What the model sees in {image_name}, and what it answers"
    figure = figures.input_and_predictions(image, title, [class_names[i] for i in top],
                                           probabilities[top])
    shows = (f"The image as the model gets it ({image.shape[2]}x{image.shape[1]} pixels, each "
             f"drawn as a square), and the {len(top)} most probable classes: the softmax of "
             "the last layer's outputs (the logits), which sum to 100% over all "
             f"{len(class_names)} classes." + (" One pass, without the mirror image that "
                                               "classify also averages in." if tta else ""))
    notice = (f"The model answers {class_names[first]} ({probabilities[first]:.1%}); "
              f"runner-up {class_names[second]} ({probabilities[second]:.1%}). At this size "
              "much detail is gone: these few thousand numbers are all the network has.")
    return _panel("input", title, figure, shows, notice)


def _describe(conv) -> str:
    """A conv layer in a few words: "Conv2d, 6 -> 16 channels, 5x5 filters"."""
    kh, kw = conv.kernel_size
    return (f"{conv.layer_name()}, {conv.in_channels} -> {conv.out_channels} channels, "
            f"{kh}x{kw} filters" + (f", stride {conv.stride}" if conv.stride != 1 else "")
            + (f", padding {conv.padding}" if conv.padding else ""))


def _feature_panel(conv, first: bool, max_maps: int) -> Panel:
    maps = backend.to_host(conv.output[0])                          # (C, H, W)
    strength = abs(maps).mean(axis=(1, 2))
    chosen = sorted(int(c) for c in strength.argsort()[::-1][:max_maps])
    height, width = maps.shape[1:]
    title = (f"Feature maps of layer {conv.path} ({_describe(conv.layer)}): "
             f"{len(chosen)} of {len(maps)} channels, {height}x{width} pixels each")
    which = ("every channel" if len(chosen) == len(maps) else
             f"the {len(chosen)} channels with the largest mean |value|")
    shows = (f"What conv layer {conv.path} outputs for this image: {which}, one map per "
             "filter (the filter slid over its input), red positive, blue negative, one "
             "colour scale for all.")
    field = "x".join(map(str, conv.receptive_field))
    negative = float((maps < 0).mean())
    notice = (f"Each pixel here depends on a {field} patch of the image"
              + (" (the first layer sees only small patches: edges and colours)"
                 if first else ", so deeper maps are coarser and more abstract")
              + f". {negative:.0%} of the values are negative; a ReLU after the layer "
              "would set those to 0.")
    return _panel(f"features_{conv.path}", title,
                  figures.feature_maps(maps, chosen, title.replace(": ", ":\n", 1)),
                  shows, notice)


def _saliency_panel(model, image, x, label, class_names, normalization,
                    samples, noise, seed) -> Panel:
    """The three maps of minicnn.study.gradients, in units a learner can picture: the
    gradient per grey level of one pixel (0..255), and gradient x input in logits."""
    xp = backend.xp
    gradient = input_gradient(model, x, label)
    smooth = smoothgrad(model, x, label, samples=samples, noise=noise, seed=seed)
    per_level = 255 * xp.asarray(normalization["std"], dtype=x.dtype).reshape(1, -1, 1, 1)

    def magnitude(g):                        # max over colours of |dz / d grey level|
        return backend.to_host(xp.abs(g / per_level).max(axis=1)[0])

    times_input = backend.to_host((gradient * x).sum(axis=1)[0])
    name = class_names[label]
    title = f"Which pixels move the score of \"{name}\" (by minicnn's backward pass)"
    figure = figures.saliency(image, magnitude(gradient), magnitude(smooth), times_input,
                              title, samples=samples)
    shows = (f"How much the {name} logit changes per grey level of each pixel: the plain "
             f"gradient; SmoothGrad, its mean over {samples} copies of the image with noise "
             f"of sd {noise:.0%} of its range (alone, over the image, and its top pixels); "
             "and gradient x input, each pixel's first-order share of the logit.")
    notice = ("The plain gradient jumps from pixel to pixel, as each ReLU switches on or off; "
              "SmoothGrad keeps what the noisy copies agree on, often the object. In gradient "
              f"x input, red pixels raise the {name} score and blue ones lower it.")
    return _panel("saliency", title, figure, shows, notice)


def _filters_panel(model, max_filters: int) -> Panel | None:
    convs = conv_layers(model)
    if not convs:
        return None
    path, layer = convs[0]
    weight = backend.to_host(layer.params["weight"])               # (F, C, kh, kw)
    shown = weight[:max_filters]
    kh, kw = weight.shape[2:]
    title = (f"Filters of the first conv layer (layer {path}): {len(shown)} of "
             f"{len(weight)}, {weight.shape[1]}x{kh}x{kw} weights each")
    colour = ("the filter as a colour picture (grey = 0, all scaled together), then " if
              weight.shape[1] == 3 else "")
    shows = (f"What layer {path} looks for: per filter, {colour}its weights for each input "
             "channel, red positive, blue negative. A feature map above is large where the "
             "image looks like its filter.")
    notice = ("Look for light-dark splits (edge detectors) and filters dominated by one colour "
              "(colour detectors); a filter whose weights look like noise learned little.")
    return _panel("filters", title, figures.filters(shown, title), shows, notice)


def _curves_panel(history: dict, name: str) -> Panel:
    entries, config = history["history"], history["config"]
    title = f"Training of {name}: {len(entries)} epochs"
    shows = ("Per epoch: the training loss (mean over the epoch's batches), train and test "
             "accuracy, and the learning rate at the end of the epoch (its last step's; the "
             "schedule changes it every step).")
    rates = [e.get("lr") for e in entries]
    last = entries[-1]
    notice = (f"Last epoch: train {last['train_accuracy']:.1%}, test {last['test_accuracy']:.1%}; "
              "the gap is how much the model fits its training images better than new ones.")
    if None not in rates and max(rates) > min(rates):
        notice = ("Dashed line: the peak learning rate. Big steps around it can hold the loss "
                  "up or even raise it; that is the schedule, not a bug. " + notice)
    smoothing = config.get("label_smoothing") or 0
    if smoothing:
        notice += f" With label smoothing {smoothing} the loss cannot reach 0."
    return _panel("curves", title, figures.curves(entries, title), shows, notice)


def study(model, metadata: dict, image_uint8, *, image_name: str, weights_name: str,
          label: int | None = None, history: dict | None = None, top_k: int = 5,
          samples: int = 256, noise: float = 0.3, seed: int = 0, max_maps: int = 32,
          max_filters: int = 24, dpi: int = 100,
          progress: bool = False) -> tuple[list[Panel], int]:
    """The panels for one image (3, H, W uint8) through ``model`` (a Sequential of minicnn
    layers), explaining class ``label`` (default: the predicted one); and that label.
    ``dpi``: pixels per inch of the PNGs; ``progress``: a progress bar on stderr while
    the figures are drawn."""
    class_names, normalization = check_metadata(metadata, weights_name)
    x = data.normalize(backend.to_device(image_uint8[None]), **normalization)
    convs, logits = conv_outputs(model, x)
    if logits.shape != (1, len(class_names)):
        raise MinicnnError(f"{weights_name}: the model gives {tuple(logits.shape)} logits for "
                           f"one image, but the metadata names {len(class_names)} classes")
    if label is not None and not 0 <= label < len(class_names):
        raise MinicnnError(f"label {label} is not one of the {len(class_names)} classes")
    probabilities = backend.to_host(softmax(logits.astype(backend.xp.float64)))[0]
    label = int(probabilities.argmax()) if label is None else label
    steps = [  # one figure each, in the order of the page
        lambda: _input_panel(image_uint8, image_name, class_names, probabilities,
                             min(top_k, len(class_names)),
                             augment.tta_mode(metadata.get("tta")) != "none"),
        *[lambda conv=conv: _feature_panel(conv, conv is convs[0], max_maps) for conv in convs],
        lambda: _saliency_panel(model, image_uint8, x, label, class_names, normalization,
                                samples, noise, seed),
        lambda: _filters_panel(model, max_filters),
        *([lambda: _curves_panel(history, weights_name)] if history is not None else [])]
    panels = []
    for step in tqdm(steps, desc="drawing", unit="figure", leave=False, disable=not progress):
        panel = step()
        if panel is not None:
            panel.png, panel.figure = figures.png_bytes(panel.figure, dpi), None
            panels.append(panel)
    return panels, label


# --- writing ---------------------------------------------------------------------------

def write_pngs(panels: list[Panel], folder) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        path = folder / f"{panel.name}.png"
        with atomic_write(path) as f:
            f.write(panel.png)
        written.append(path)
    return written


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1280px; margin: 1.5em auto;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }}
h1 {{ font-size: 1.6em; }}
h2 {{ font-size: 1.2em; margin-top: 2.2em; border-bottom: 1px solid #ccc; }}
figure {{ margin: 0.8em 0; }}
figure img {{ max-width: 100%; height: auto; display: block; }}
figcaption p {{ margin: 0.3em 0; }}
nav li {{ margin: 0.15em 0; }}
footer {{ margin-top: 3em; color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{intro}</p>
<nav><ol>
{contents}
</ol></nav>
{sections}
<footer>{footer}</footer>
</body>
</html>
"""

SECTION = """<section id="{name}">
<h2>{title}</h2>
<figure>
<img src="data:image/png;base64,{data}" alt="{title}">
<figcaption>
<p><b>What it shows.</b> {shows}</p>
<p><b>What to notice.</b> {notice}</p>
</figcaption>
</figure>
</section>"""


def html_page(panels: list[Panel], title: str, intro: str, footer: str) -> str:
    """One self-contained page: every image inlined, no scripts, nothing fetched."""
    e = html.escape
    contents = "\n".join(f'<li><a href="#{e(p.name)}">{e(p.title)}</a></li>' for p in panels)
    sections = "\n".join(
        SECTION.format(name=e(p.name), title=e(p.title), shows=e(p.shows), notice=e(p.notice),
                       data=base64.b64encode(p.png).decode("ascii"))
        for p in panels)
    return PAGE.format(title=e(title), intro=e(intro), contents=contents, sections=sections,
                       footer=e(footer))


def write_html(page: str, path) -> Path:
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(page)
    return path
