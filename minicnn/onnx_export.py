"""ONNX export: a minicnn model as a graph any ONNX runtime runs (onnxruntime, ...).

    export_onnx(model, "mine.onnx", class_names=[...], normalization={...})

The graph computes the model in eval mode, in float32, from one input
"input" (N, C, H, W), images normalized as in training, to "logits" (N, K),
for any batch size N. Each layer becomes standard operators of opset 17:

    Conv2d           Conv (strides, pads; B only where the layer has a bias)
    Linear           Gemm with transB=1 (the weight is (out, in), as in minicnn)
    ReLU             Relu
    MaxPool2d        MaxPool (ONNX ignores padded cells, as minicnn's -inf padding)
    GlobalAvgPool2d  GlobalAveragePool, then Flatten
    Flatten          Flatten(axis=1)
    BatchNorm2d      BatchNormalization with the running statistics (eval mode); a
                     gamma of 1 / beta of 0 where the layer has none
    Scale            Mul by a constant
    Residual         its body, then Add of the body's input
    Sequential       its layers in order

Initializers are named as the state_dict ("0.weight", "3.body.0.bias"). Any
other keyword of export_onnx (class names, normalization) goes into the
file's metadata_props as JSON. Exporting needs the onnx package
(``pip install "minicnn[onnx]"``); the graph is built with its helper API and
checked with its checker before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy

from minicnn import __version__, backend
from minicnn.architecture import known_layer, output_shape
from minicnn.checkpoint import atomic_write
from minicnn.errors import MinicnnError
from minicnn.interop import optional_import

OPSET = 17
IR_VERSION = 8            # the IR of opset 17: files that older runtimes still read
EXPORTED = ("Sequential", "Residual", "Conv2d", "Linear", "ReLU", "MaxPool2d",
            "GlobalAvgPool2d", "Flatten", "BatchNorm2d", "Scale")


class _Graph:
    """The nodes and initializers of the graph being written."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.initializers = [], []

    def constant(self, name: str, value) -> str:
        array = numpy.asarray(backend.to_host(value), dtype=numpy.float32)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list, output: str, **attributes) -> str:
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=output,
                                                     **attributes))
        return output


def _add_layer(graph: _Graph, module, path: str, x: str) -> str:
    """Add the nodes that compute ``module`` (at ``path`` in the model) from the tensor
    named ``x``; returns the name of its output."""
    kind = known_layer(module)
    prefix = f"{path}." if path else ""
    at = path or "model"
    if kind not in EXPORTED:
        raise MinicnnError(f"cannot export {at} ({module.layer_name()}) to ONNX: the layers "
                           f"minicnn exports are {', '.join(EXPORTED)}")
    if kind == "Sequential":
        for index, layer in enumerate(module.layers):
            x = _add_layer(graph, layer, f"{prefix}{index}", x)
        return x
    if kind == "Residual":
        body = _add_layer(graph, module.body, f"{prefix}body", x)
        return graph.node("Add", [x, body], f"{at}.Add")
    params = {key: graph.constant(prefix + key, value) for key, value in module.params.items()}
    if kind == "Conv2d":
        p, s = module.padding, module.stride
        return graph.node("Conv", [x, params["weight"], *([params["bias"]] if "bias" in params
                                                          else [])],
                          f"{at}.Conv", kernel_shape=list(module.kernel_size), strides=[s, s],
                          pads=[p, p, p, p])
    if kind == "Linear":
        return graph.node("Gemm", [x, params["weight"], *([params["bias"]] if "bias" in params
                                                          else [])],
                          f"{at}.Gemm", transB=1)
    if kind == "MaxPool2d":
        k, s, p = module.kernel_size, module.stride, module.padding
        return graph.node("MaxPool", [x], f"{at}.MaxPool", kernel_shape=[k, k], strides=[s, s],
                          pads=[p, p, p, p])
    if kind == "BatchNorm2d":
        n = module.num_features
        scale = params.get("weight") or graph.constant(prefix + "weight", numpy.ones(n))
        shift = params.get("bias") or graph.constant(prefix + "bias", numpy.zeros(n))
        mean = graph.constant(prefix + "running_mean", module.buffers["running_mean"])
        var = graph.constant(prefix + "running_var", module.buffers["running_var"])
        return graph.node("BatchNormalization", [x, scale, shift, mean, var],
                          f"{at}.BatchNormalization", epsilon=float(module.eps))
    if kind == "Scale":
        factor = graph.constant(prefix + "factor", numpy.float32(module.factor))
        return graph.node("Mul", [x, factor], f"{at}.Mul")
    if kind == "GlobalAvgPool2d":
        pooled = graph.node("GlobalAveragePool", [x], f"{at}.GlobalAveragePool")
        return graph.node("Flatten", [pooled], f"{at}.Flatten", axis=1)
    if kind == "Flatten":
        return graph.node("Flatten", [x], f"{at}.Flatten", axis=1)
    return graph.node("Relu", [x], f"{at}.Relu")


def default_input_shape(model) -> tuple:
    """(C, 32, 32): the channels of the first Conv2d or BatchNorm2d the input meets (3 if
    a Linear or nothing comes first), at CIFAR-10's size."""
    for _, module in model.modules():
        kind = known_layer(module)
        if kind == "Conv2d":
            return module.in_channels, 32, 32
        if kind == "BatchNorm2d":
            return module.num_features, 32, 32
        if kind == "Linear":
            break
    return 3, 32, 32


def to_onnx(model, input_shape=None, **metadata):
    """The ONNX ModelProto of ``model`` for inputs (N, *input_shape) (default:
    :func:`default_input_shape`); MinicnnError for a layer it cannot export or an input
    the model cannot take."""
    onnx = optional_import("onnx", 'ONNX export needs the onnx package (pip install '
                                   '"minicnn[onnx]")')
    helper = onnx.helper
    graph = _Graph(onnx)
    logits = graph.node("Identity", [_add_layer(graph, model, "", "input")], "logits")
    input_shape = tuple(input_shape or default_input_shape(model))
    shape = output_shape(model, input_shape)
    float32 = onnx.TensorProto.FLOAT
    proto = helper.make_model(
        helper.make_graph(graph.nodes, "minicnn",
                          [helper.make_tensor_value_info("input", float32, ["N", *input_shape])],
                          [helper.make_tensor_value_info(logits, float32, ["N", *shape])],
                          initializer=graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="minicnn", producer_version=__version__,
        doc_string="a minicnn model in eval mode; input: float32 images normalized as the "
                   "metadata's normalization says")
    helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:      # a bug here, not the user's input
        raise MinicnnError(f"the ONNX graph does not check: {exc}") from None
    return proto


def export_onnx(model, path, input_shape=None, **metadata) -> Path:
    """Write ``model`` as an ONNX file at ``path``, atomically (see :func:`to_onnx`)."""
    content = to_onnx(model, input_shape, **metadata).SerializeToString()
    with atomic_write(path) as f:
        f.write(content)
    return Path(path)
