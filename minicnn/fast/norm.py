"""The fast kernel of BatchNorm2d: the reference's formulas, with the batch statistics
summed over every process that holds a part of the batch.

minicnn.fast.replicas splits each training batch over processes. BatchNorm
normalizes with the mean and variance of the whole batch, so each process
sums its own part and the parts' sums are added up across the processes
(``sync.all_sum``, an all-reduce) before they are used::

    mu     = all_sum(sum of x) / M                    M = entries of a channel, whole batch
    var    = all_sum(sum of (x - mu)^2) / M
    dx     = gamma / sqrt(var + eps) * (dy - all_sum(sum dy) / M
                                           - xhat * all_sum(sum dy * xhat) / M)

The parameter gradients stay each process's own sums (dbeta = sum dy, dgamma =
sum dy * xhat over its part): replicas add up the parts' gradients, as for
every other layer. Without ``sync`` (one process) the kernel is the reference.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.layers.norm import BatchNorm2d, _channel_sum, _per_channel


class FastBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose training statistics can span processes (``sync``)."""

    reference_layer = BatchNorm2d
    transient = {**BatchNorm2d.transient, "sync": lambda: None}
    sync = None          # an object with all_sum(vector) -> vector, set by the replicas

    def forward(self, x):
        if self.sync is None or not self.training:
            return super().forward(x)
        xp = backend.array_module(x)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d expected (N, {self.num_features}, H, W), "
                             f"got {tuple(x.shape)}")
        c = self.num_features
        local = xp.concatenate([_channel_sum(x).astype(xp.float64),
                                xp.asarray([x.size // c], dtype=xp.float64)])
        total = self.sync.all_sum(local)
        m = int(total[c])
        if m < 2:
            raise ValueError(f"BatchNorm2d in training needs more than one value per channel, "
                             f"got input {tuple(x.shape)}")
        mu = (total[:c] / m).astype(x.dtype)
        xhat = x - _per_channel(mu)
        var = (self.sync.all_sum(_channel_sum(xhat * xhat).astype(xp.float64)) / m).astype(x.dtype)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat *= _per_channel(inv_std)
        self.cache = ("train", xhat, inv_std, m)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean *= 1.0 - self.momentum
        running_mean += self.momentum * mu.astype(running_mean.dtype)
        running_var *= 1.0 - self.momentum
        running_var += (self.momentum * m / (m - 1)) * var.astype(running_var.dtype)
        y = xhat * _per_channel(self.params["weight"]) if "weight" in self.params else xhat.copy()
        if "bias" in self.params:
            y += _per_channel(self.params["bias"])
        return y

    def backward(self, dy):
        if self.cache is None or len(self.cache) != 4:      # eval, or statistics of one process
            return super().backward(dy)
        xp = backend.array_module(dy)
        _, xhat, inv_std, m = self.cache
        c = self.num_features
        d_beta, d_gamma = _channel_sum(dy), _channel_sum(dy * xhat)   # this part's sums
        if "bias" in self.params:
            self.grads["bias"] = d_beta
        if "weight" in self.params:
            self.grads["weight"] = d_gamma
        if not self.needs_input_grad:          # the same in every process: none all-sums
            return None
        total = self.sync.all_sum(xp.concatenate([d_beta, d_gamma]).astype(xp.float64))
        mean_dy, mean_dy_xhat = (total[:c] / m).astype(dy.dtype), (total[c:] / m).astype(dy.dtype)
        dx = xhat * _per_channel(-mean_dy_xhat)
        dx += dy
        dx -= _per_channel(mean_dy)
        dx *= _per_channel(self._times_gamma(inv_std))
        return dx
