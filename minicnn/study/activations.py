"""What the conv layers of a model compute for one image, and what each of their pixels sees.

Works on any Sequential of minicnn layers, also with Sequential and Residual
blocks inside: conv layers are found with isinstance against
:class:`~minicnn.layers.Conv2d` (the fast kernels subclass it). A container
of another kind runs as one step, and the conv layers inside it are not shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from minicnn.layers import Conv2d, GlobalAvgPool2d, MaxPool2d, Residual, Sequential


@dataclass
class ConvOutput:
    """One conv layer's output for an image."""

    path: str              # where the layer sits, as in the weights file ("3", "5.body.0")
    layer: Conv2d
    output: object         # (1, out_channels, H, W) array
    receptive_field: tuple[int, int]   # height, width of the input patch one pixel depends on


def conv_layers(model) -> list[tuple[str, Conv2d]]:
    """(path, layer) of every conv layer in ``model``, in the order they run."""
    return [(path, m) for path, m in model.modules() if isinstance(m, Conv2d)]


def _grow(field, jump, kernel, stride):
    """Receptive field after a window of ``kernel`` moved by ``stride``: each output pixel
    sees kernel - 1 more input pixels, spaced ``jump`` apart in the image."""
    return (tuple(f + (k - 1) * j for f, k, j in zip(field, kernel, jump, strict=True)),
            tuple(j * s for j, s in zip(jump, (stride, stride), strict=True)))


def conv_outputs(model, x) -> tuple[list[ConvOutput], object]:
    """Run one image x (1, C, H, W) through ``model`` in eval mode, layer by layer;
    return every conv layer's output, and the logits."""
    model.eval()
    image_size = tuple(x.shape[2:])
    found = []

    def run(module, x, path, field, jump):
        if isinstance(module, Sequential):
            for name, child in module.children():
                x, field, jump = run(child, x, f"{path}.{name}" if path else name, field, jump)
            return x, field, jump
        if isinstance(module, Residual):        # y = x + body(x): the body sees the most
            y, field, jump = run(module.body, x, f"{path}.body", field, jump)
            return x + y, field, jump
        y = module.forward(x)
        if isinstance(module, Conv2d):
            field, jump = _grow(field, jump, module.kernel_size, module.stride)
            seen = tuple(min(f, s) for f, s in zip(field, image_size, strict=True))
            found.append(ConvOutput(path, module, y, seen))
        elif isinstance(module, MaxPool2d):
            field, jump = _grow(field, jump, (module.kernel_size,) * 2, module.stride)
        elif isinstance(module, GlobalAvgPool2d):
            field = image_size
        return y, field, jump

    logits, _, _ = run(model, x, "", (1, 1), (1, 1))
    return found, logits
