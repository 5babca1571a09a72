"""Batch normalization over the channels of (N, C, H, W) maps, as PyTorch's BatchNorm2d.

Training, per channel c, with mean and variance over the M = N*H*W entries of
that channel in the batch::

    mu     = mean(x)                 var = mean((x - mu)^2)       (biased)
    xhat   = (x - mu) / sqrt(var + eps)
    y      = gamma * xhat + beta

and the running statistics that eval mode uses instead of the batch's, with
PyTorch's momentum convention (the running variance uses the unbiased var)::

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)

Backward, with every sum and mean over the M entries of a channel::

    dbeta  = sum(dy)
    dgamma = sum(dy * xhat)
    dx     = gamma / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat))

The last line is the chain rule through mu and var: every x moves the mean
and the variance that all the others are normalized with. The two mean
terms remove the parts of dy that a shift or a scaling of the whole channel
would absorb, so dx sums to zero and is orthogonal to xhat in every channel.

In eval mode BatchNorm is a fixed per-channel affine map,
y = x * gamma / sqrt(running_var + eps) + shift, and backward returns
dx = dy * gamma / sqrt(running_var + eps) without parameter gradients: enough
for a saliency map of a trained model.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.layers.base import Module


def _channel_sum(x):
    """Sum of (N, C, H, W) over N, H and W: the contiguous H*W axis first (fast)."""
    n, c = x.shape[:2]
    return x.reshape(n, c, -1).sum(axis=2).sum(axis=0)


def _per_channel(v):
    """(C,) -> (1, C, 1, 1), to broadcast against (N, C, H, W)."""
    return v.reshape(1, -1, 1, 1)


class BatchNorm2d(Module):
    """BatchNorm2d(num_features, eps=1e-5, momentum=0.1, weight=True, bias=True).

    params: "weight" (gamma, starts at 1) and "bias" (beta, starts at 0), each
    optional: without one, gamma is fixed at 1 or beta at 0. buffers:
    "running_mean" (starts at 0) and "running_var" (starts at 1).
    """

    batch_statistics = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 weight: bool = True, bias: bool = True):
        super().__init__()
        if not 0.0 <= momentum <= 1.0 or eps <= 0:
            raise ValueError(f"BatchNorm2d needs 0 <= momentum <= 1 and eps > 0, "
                             f"got {momentum}, {eps}")
        xp = backend.xp
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        if weight:
            self.params["weight"] = xp.ones(num_features, dtype=backend.float32)
        if bias:
            self.params["bias"] = xp.zeros(num_features, dtype=backend.float32)
        self.buffers = {"running_mean": xp.zeros(num_features, dtype=backend.float32),
                        "running_var": xp.ones(num_features, dtype=backend.float32)}
        self.cache = None

    def _times_gamma(self, v):
        """gamma * v for a (C,) array v; gamma is 1 without a "weight" parameter."""
        return v * self.params["weight"] if "weight" in self.params else v

    def forward(self, x):
        xp = backend.array_module(x)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d expected (N, {self.num_features}, H, W), "
                             f"got {tuple(x.shape)}")
        if not self.training:
            scale, shift = self.eval_affine(x.dtype)
            self.cache = ("eval", scale)
            y = x * _per_channel(scale)
            y += _per_channel(shift)
            return y
        m = x.size // self.num_features
        if m < 2:
            raise ValueError(f"BatchNorm2d in training needs more than one value per channel, "
                             f"got input {tuple(x.shape)}")
        mu = _channel_sum(x) / m
        xhat = x - _per_channel(mu)
        var = _channel_sum(xhat * xhat) / m
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat *= _per_channel(inv_std)
        self.cache = ("train", xhat, inv_std)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean *= 1.0 - self.momentum
        running_mean += self.momentum * mu.astype(running_mean.dtype)
        running_var *= 1.0 - self.momentum
        running_var += (self.momentum * m / (m - 1)) * var.astype(running_var.dtype)
        y = (xhat * _per_channel(self.params["weight"]) if "weight" in self.params
             else xhat.copy())
        if "bias" in self.params:
            y += _per_channel(self.params["bias"])
        return y

    def eval_affine(self, dtype):
        """Eval mode's fixed map y = x * scale + shift, per channel, as ``dtype``:
        scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale."""
        xp = backend.array_module(self.buffers["running_var"])
        inv_std = 1.0 / xp.sqrt(self.buffers["running_var"] + self.eps)
        scale = self._times_gamma(inv_std).astype(dtype)
        shift = -self.buffers["running_mean"] * scale
        if "bias" in self.params:
            shift = shift + self.params["bias"]
        return scale, shift.astype(dtype)

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("BatchNorm2d.backward needs a forward pass first")
        if self.cache[0] == "eval":                      # the fixed affine map, see above
            return dy * _per_channel(self.cache[1]) if self.needs_input_grad else None
        _, xhat, inv_std = self.cache
        m = dy.size // self.num_features
        d_beta = _channel_sum(dy)
        d_gamma = _channel_sum(dy * xhat)
        if "bias" in self.params:
            self.grads["bias"] = d_beta
        if "weight" in self.params:
            self.grads["weight"] = d_gamma
        if not self.needs_input_grad:
            return None
        # dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)), in place on one copy.
        dx = xhat * _per_channel(-d_gamma / m)
        dx += dy
        dx -= _per_channel(d_beta / m)
        dx *= _per_channel(self._times_gamma(inv_std))
        return dx

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"weight={'weight' in self.params}, bias={'bias' in self.params}")
