"""The layer contract: Module and Sequential.

Every layer is a Module::

    params:  dict[str, array]  # e.g. {"weight": ..., "bias": ...}
    grads:   dict[str, array]  # same keys and shapes, written by backward
    buffers: dict[str, array]  # state that is saved but not trained (BatchNorm's
                               # running statistics); most layers have none
    forward(x)  -> y           # caches what backward needs
    backward(dy) -> dx         # dy = dL/dy, returns dL/dx, fills grads

``params`` is the one source of truth: layers read their parameters from it
on every forward, so replacing an entry (loading weights, switching to
float64) takes effect at once. ``backward`` overwrites ``grads``; it never
accumulates. Layers work in the dtype of their input.

A module whose ``needs_input_grad`` is False skips computing dx and returns
None: the first layer of a network needs no gradient for the image. It is
decided when a model is set up (and again when a layer stops learning), by
:meth:`Module.set_needs_input_grad`.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.validation import check_input


class Module:
    """Base class of all layers; see the module docstring for the contract."""

    #: what forward and backward leave behind, reset when a module is pickled (the
    #: replicas send models to worker processes): attribute -> makes its empty value
    transient = {"cache": lambda: None, "grads": dict}
    #: whether training forward computes statistics of the whole batch (BatchNorm): a
    #: batch split over processes must then share them (minicnn.fast.replicas)
    batch_statistics = False

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.training = True
        self.needs_input_grad = True

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def set_needs_input_grad(self, needed: bool) -> Module:
        """Whether backward must return dL/dx (else it returns None). Containers pass
        it on to the children that compute their own input's gradient."""
        self.needs_input_grad = bool(needed)
        return self

    # --- tree walking -----------------------------------------------------
    def children(self) -> list[tuple[str, Module]]:
        """Named sub-modules, in order. Leaf layers have none."""
        return []

    def modules(self, prefix: str = ""):
        """Yield (path, module) for this module and every descendant."""
        yield prefix, self
        for child_name, child in self.children():
            yield from child.modules(f"{prefix}.{child_name}" if prefix else child_name)

    def _named(self, attribute: str):
        """Yield (path, module, key) for every key of each module's ``attribute`` dict."""
        for path, module in self.modules():
            for key in getattr(module, attribute):
                yield (f"{path}.{key}" if path else key), module, key

    def named_parameters(self):
        """Yield (path, module, key) for every parameter, e.g. ("0.weight", conv, "weight")."""
        return self._named("params")

    def named_buffers(self):
        """Yield (path, module, key) for every buffer, e.g. ("1.running_mean", bn, ...)."""
        return self._named("buffers")

    def named_arrays(self):
        """Yield (path, holder dict, key) for every parameter and buffer: what a
        weights file holds."""
        for name, module, key in self.named_parameters():
            yield name, module.params, key
        for name, module, key in self.named_buffers():
            yield name, module.buffers, key

    def state_dict(self) -> dict:
        """{path: array} of every parameter and buffer, keyed like PyTorch's state_dict."""
        return {name: holder[key] for name, holder, key in self.named_arrays()}

    def num_parameters(self) -> int:
        return sum(int(module.params[key].size) for _, module, key in self.named_parameters())

    # --- modes and conversions ---------------------------------------------
    def train(self, mode: bool = True):
        """Set training mode here and in every descendant (eval() is train(False))."""
        for _, module in self.modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def astype(self, dtype):
        """Cast every parameter and buffer to ``dtype`` (e.g. float64 for gradient checks)."""
        for _, holder, key in list(self.named_arrays()):
            holder[key] = holder[key].astype(dtype)
        return self

    def to_backend(self):
        """Move every parameter and buffer to the current backend (NumPy or CuPy)."""
        for _, holder, key in list(self.named_arrays()):
            holder[key] = backend.to_device(backend.to_host(holder[key]))
        return self

    def __getstate__(self) -> dict:
        """What pickling a module keeps: its parameters, buffers and settings, not what
        the last forward and backward left behind (``transient``)."""
        state = dict(self.__dict__)
        for name, empty in self.transient.items():
            if name in state:
                state[name] = empty()
        return state

    def __repr__(self) -> str:
        return f"{self.layer_name()}({self.extra_repr()})"

    @classmethod
    def layer_name(cls) -> str:
        """The layer's name: its class's, or for a fast kernel (minicnn.fast) the name of
        the reference layer it computes, so that both print as "Conv2d"."""
        return getattr(cls, "reference_layer", cls).__name__

    def extra_repr(self) -> str:
        return ""


class Sequential(Module):
    """Layers applied one after the other: y = f_n(... f_2(f_1(x))).

    Backward is the chain rule, in reverse order:
    dL/dx_i = backward_i(dL/dx_{i+1}), from dy = dL/dy of the last layer down to
    the first, whose dx is the model's (None when it needs none). It stops early
    where a layer returns None: the layers before it learn nothing.
    """

    def __init__(self, *layers: Module):
        super().__init__()
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for index, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {index} is {type(layer).__name__}, "
                                "not a minicnn layer (Module)")
        self.layers = list(layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def set_needs_input_grad(self, needed: bool) -> Sequential:
        """The first layer's dx is the model's. A later layer's dx is needed if the
        model's is, or if a layer before it has parameters to learn: layers that
        learn nothing at the front of a network (a frozen stem) need no dx, nor
        does the first layer after them."""
        super().set_needs_input_grad(needed)
        for layer in self.layers:
            layer.set_needs_input_grad(needed)
            needed = needed or next(layer.named_parameters(), None) is not None
        return self

    def forward(self, x):
        check_input(self, x)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            if dy is None:          # a layer returned no dx: nothing before it learns
                break
            dy = layer.backward(dy)
        return dy

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def __repr__(self) -> str:
        lines = [f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers)]
        return f"{self.layer_name()}(\n" + "\n".join(lines) + "\n)"
