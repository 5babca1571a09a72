"""One training step of one image, layer by layer, for a learner to follow.

``python -m minicnn trace [IMAGE]`` runs the image through a Sequential
model, printing each layer's output shape and statistics; then the loss for
a label; then the backward pass from the loss to the image, printing the
shape and norm of every gradient: dL/d(input of each layer), and dL/dW,
dL/db of the layers that have parameters. Nothing is updated.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.errors import MinicnnError
from minicnn.layers.base import Sequential
from minicnn.losses import SoftmaxCrossEntropy


def _stats(array) -> str:
    return (f"mean {float(array.mean()):+.4f}  std {float(array.std()):.4f}  "
            f"min {float(array.min()):+.4f}  max {float(array.max()):+.4f}  "
            f"zeros {float((array == 0).mean()):.0%}")


def _row(what: str, array, text: str) -> str:
    """An indented line: what was computed, its shape, and ``text``, in columns."""
    return f"     {what:<12} {tuple(array.shape)!s:<18} {text}"


def _norm(array) -> float:
    xp = backend.array_module(array)
    return float(xp.sqrt((array.astype(xp.float64) ** 2).sum()))


def _label(layer) -> str:
    """The layer's repr on one line (a Sequential or Residual inside spans several)."""
    return " ".join(repr(layer).split())


def trace_step(model: Sequential, x, label: int, class_names=None) -> list[str]:
    """Forward and backward of one batch ``x`` (1, C, H, W) with ``label``; returns the lines.

    Each layer gets a line with its whole name, then indented lines with what
    it computed: its output on the way forward, dL/d(its input) and its
    parameters' gradients on the way back."""
    if not isinstance(model, Sequential):
        raise MinicnnError(f"trace follows a Sequential model layer by layer; this model is "
                           f"a {model.layer_name()}")
    model.train()                       # as in a training step: caches for backward, and
                                        # BatchNorm uses the statistics of this one image
    lines = ["forward: each layer's output",
             _row("input", x, _stats(x))]
    out = x
    for index, layer in enumerate(model.layers):
        out = layer.forward(out)
        lines += [f"{index:>2} {_label(layer)}", _row("output", out, _stats(out))]
    criterion = SoftmaxCrossEntropy()
    labels = backend.xp.asarray([label])
    loss = float(criterion.forward(out, labels))
    name = class_names[label] if class_names else str(label)
    lines += ["", f"loss: softmax cross-entropy for label {label} ({name}) = {loss:.4f}", "",
              "backward: dL/d(each layer's input), then dL/d(its parameters)"]
    grad = criterion.backward()
    lines.append(_row("dL/dlogits", grad, f"norm {_norm(grad):.4g}"))
    model.set_needs_input_grad(True)
    for index in reversed(range(len(model.layers))):
        layer = model.layers[index]
        grad = layer.backward(grad)
        lines += [f"{index:>2} {_label(layer)}",
                  _row("dL/dx", grad, f"norm {_norm(grad):.4g}")]
        for name, module, key in layer.named_parameters():     # a container's: its layers'
            g = module.grads[key]
            lines.append(_row(f"dL/d{name}", g, f"norm {_norm(g):.4g}"))
    return lines
