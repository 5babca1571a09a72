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
None: the first layer of a network needs no gradient for the image.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.validation import check_backward, check_input


class Module:
    """Base class of all layers; see the module docstring for the contract."""

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
        the last forward and backward left behind (caches, grads, scratch buffers).
        minicnn.replicas sends the model to its worker processes this way."""
        state = dict(self.__dict__)
        for name, empty in _LEFT_BEHIND.items():
            if name in state:
                state[name] = empty()
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


_LEFT_BEHIND = {"cache": lambda: None, "grads": dict, "_scratch": dict, "_steps": lambda: None}


class Sequential(Module):
    """Layers applied one after the other: y = f_n(... f_2(f_1(x))).

    With ``fuse`` True (the default), each Conv2d, ReLU, MaxPool2d(2) run is
    computed in one pass per chunk of images, with the same results
    (:mod:`minicnn.layers.fused`); False runs every layer on its own, the
    plain reference.
    """

    def __init__(self, *layers: Module):
        super().__init__()
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        self.layers = list(layers)
        self.fuse = True
        self._steps = None          # what the last forward ran, for backward

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def steps(self) -> list:
        """What forward runs, in order: the layers, with fused runs as single steps."""
        if not self.fuse:
            return list(self.layers)
        # imported here: fused imports the layers, and they import this module
        from minicnn.layers.fused import plan
        return plan(self.layers)

    def forward(self, x):
        check_input(self, x)
        self._steps = self.steps()
        for step in self._steps:
            x = step.forward(x)
        return x

    def backward(self, dy):
        """Chain rule backwards: dL/dx_i = backward_i(dL/dx_{i+1})."""
        check_backward(self, self._steps is not None, dy)
        self.layers[0].needs_input_grad = self.needs_input_grad
        for step in reversed(self._steps):
            dy = step.backward(dy)
        return dy

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def __repr__(self) -> str:
        lines = [f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers)]
        return "Sequential(\n" + "\n".join(lines) + "\n)"
