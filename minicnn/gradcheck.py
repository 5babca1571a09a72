"""Numerical gradient checking: central finite differences in float64.

To test a layer's backward we turn its output into a scalar with a *random*
upstream gradient g (a gradient of ones would hide bugs in how dy is used)::

    L(x, params) = sum(forward(x) * g)          so that dL/dy = g

The analytic gradients are backward(g) (for x) and the layer's grads. The
numerical ones perturb one entry at a time::

    dL/dx[i] ~ (L(x + eps*e_i) - L(x - eps*e_i)) / (2*eps)

whose error is O(eps^2). Both are compared with the relative error
max|analytic - numeric| / max(max|analytic|, max|numeric|); in float64 with
eps = 1e-6 a correct backward gives about 1e-9 or less.

Inputs must keep the function smooth within +-eps: keep ReLU inputs away
from 0 and max-pooling windows free of ties.
"""

from __future__ import annotations

import random

from minicnn import backend


def relative_error(analytic, numeric) -> float:
    """max|a - n| / max(max|a|, max|n|), and 0 when both are zero."""
    xp = backend.array_module(analytic)
    scale = float(max(xp.abs(analytic).max(), xp.abs(numeric).max()))
    if scale == 0.0:
        return 0.0
    return float(xp.abs(analytic - numeric).max()) / scale


def numerical_gradient(loss_fn, array, eps: float = 1e-6, entries=None):
    """dL/d(array) by central differences; ``loss_fn()`` reads ``array`` (changed in place).

    ``entries`` (flat indices) limits the work to those entries; the others stay 0.
    """
    xp = backend.array_module(array)
    grad = xp.zeros_like(array)
    flat, grad_flat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size) if entries is None else entries:
        original = flat[i].copy()
        flat[i] = original + eps
        plus = float(loss_fn())
        flat[i] = original - eps
        minus = float(loss_fn())
        flat[i] = original
        grad_flat[i] = (plus - minus) / (2 * eps)
    return grad


def _sample_entries(size: int, max_entries: int | None, seed: int):
    """All flat indices, or ``max_entries`` of them drawn without replacement: drawn
    by Python's generator, so every backend checks the same entries."""
    if max_entries is None or size <= max_entries:
        return None
    return random.Random(seed).sample(range(size), max_entries)


def _compare(analytic, numeric, entries) -> float:
    if entries is None:
        return relative_error(analytic, numeric)
    index = backend.xp.asarray(entries)
    return relative_error(analytic.reshape(-1)[index], numeric.reshape(-1)[index])


def check_module(module, x, upstream=None, eps: float = 1e-6, seed: int = 0,
                 max_entries: int | None = None, input_grad: bool = True) -> dict:
    """Relative errors of ``module``'s gradients: {"input": e, "weight": e, "0.bias": e, ...}.

    Every parameter of the module and its sub-modules is checked, keyed by its
    path. ``x`` and the parameters must be float64. ``upstream`` is the random
    upstream gradient g (drawn from a seeded generator if omitted).
    ``max_entries`` checks only that many randomly chosen entries per array
    (for whole networks, where checking every weight would take long).
    ``input_grad=False`` runs backward as for a network's first layer, with no
    gradient for x (which may take a different path: Conv2d's outputs in pairs),
    and checks the parameters only.
    """
    xp = backend.array_module(x)
    parameters = list(module.named_parameters())
    if x.dtype != xp.float64 or any(m.params[k].dtype != xp.float64 for _, m, k in parameters):
        raise TypeError("gradient checks need float64 inputs and parameters (module.astype)")
    y = module.forward(x)
    if upstream is None:
        upstream = backend.make_rng(seed).standard_normal(y.shape)
    module.set_needs_input_grad(input_grad)
    analytic_input = module.backward(upstream)
    analytic = {name: m.grads[k].copy() for name, m, k in parameters}

    def loss():
        return (module.forward(x) * upstream).sum()

    errors = {}
    if input_grad:
        entries = _sample_entries(x.size, max_entries, seed)
        errors["input"] = _compare(analytic_input,
                                   numerical_gradient(loss, x, eps, entries), entries)
    for number, (name, m, k) in enumerate(parameters):
        entries = _sample_entries(m.params[k].size, max_entries, seed + number + 1)
        numeric = numerical_gradient(loss, m.params[k], eps, entries)
        errors[name] = _compare(analytic[name], numeric, entries)
    return errors


def check_loss(criterion, logits, labels, eps: float = 1e-6) -> float:
    """Relative error of criterion.backward() against finite differences of the loss."""
    criterion.forward(logits, labels)
    analytic = criterion.backward()
    numeric = numerical_gradient(lambda: criterion.forward(logits, labels), logits, eps)
    return relative_error(analytic, numeric)
