"""The fast kernel of BatchNorm2d: the reference's formulas, with the batch statistics
summed over parts of the batch, one per CPU thread, and over every process that holds
a part of it.

Training splits the batch twice over: minicnn.fast.replicas gives each process a
part, and within a process each worker thread takes a part of that
(parallel.batch_parts; a process of the replicas runs one thread, so one part).
BatchNorm normalizes with the mean and variance of the whole batch, so each
thread sums its part, the threads' sums are added, and the processes' sums are
added up across the processes (``sync.all_sum``, an all-reduce) before they are
used::

    mu     = all_sum(sum of x) / M                    M = entries of a channel, whole batch
    var    = all_sum(sum of (x - mu)^2) / M
    dx     = gamma / sqrt(var + eps) * (dy - all_sum(sum dy) / M
                                           - xhat * all_sum(sum dy * xhat) / M)

Everything else is per entry, so each thread computes its part of xhat, y and dx.
The parameter gradients stay each process's own sums (dbeta = sum dy, dgamma =
sum dy * xhat over its part): replicas add up the parts' gradients, as for
every other layer. The per-channel sums are einsum's (_sums), which reads its
operands once: no array of products first (sum dy * xhat), and a faster loop
than sum over two axes. On CuPy with one part and no ``sync`` the kernel is the
reference; so is eval mode (inference already runs in parts, minicnn.fast.fused).
"""

from __future__ import annotations

from minicnn import backend
from minicnn.fast import parallel
from minicnn.layers.norm import BatchNorm2d, _per_channel


def _sums(a, b=None):
    """Per-channel sums of (N, C, H, W) a (or of a * b), float64: einsum's loop, without
    the temporary a * b."""
    n, c = a.shape[:2]
    xp = backend.array_module(a)
    if b is None:
        sums = xp.einsum("ncl->c", a.reshape(n, c, -1))
    else:
        sums = xp.einsum("ncl,ncl->c", a.reshape(n, c, -1), b.reshape(n, c, -1))
    return sums.astype(xp.float64)


def _over_parts(work, parts: list, array) -> list:
    """[work(part) for part in parts], the parts on minicnn's threads, one each."""
    return parallel.run_chunks(lambda part, _: work(part), parts, array)


class FastBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over the threads' parts of the
    batch and across processes (``sync``)."""

    reference_layer = BatchNorm2d
    transient = {**BatchNorm2d.transient, "sync": lambda: None}
    sync = None          # an object with all_sum(vector) -> vector, set by the replicas

    def _all_sum(self, vector):
        return vector if self.sync is None else self.sync.all_sum(vector)

    def forward(self, x):
        parts = parallel.batch_parts(x) if x.ndim else []
        whole = self.sync is None and len(parts) < 2 and not backend.on_cpu(x)
        if not self.training or whole:
            return super().forward(x)
        xp = backend.array_module(x)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d expected (N, {self.num_features}, H, W), "
                             f"got {tuple(x.shape)}")
        c = self.num_features
        sums = _over_parts(lambda part: _sums(x[part]), parts, x)
        total = self._all_sum(xp.concatenate([sum(sums),
                                              xp.asarray([x.size // c], dtype=xp.float64)]))
        m = int(total[c])
        if m < 2:
            raise ValueError(f"BatchNorm2d in training needs more than one value per channel, "
                             f"got input {tuple(x.shape)}")
        mu = (total[:c] / m).astype(x.dtype)
        xhat = xp.empty_like(x)

        def center(part):
            xp.subtract(x[part], _per_channel(mu), out=xhat[part])
            return _sums(xhat[part], xhat[part])

        var = (self._all_sum(sum(_over_parts(center, parts, x))) / m).astype(x.dtype)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        y = xp.empty_like(x)

        def scale(part):
            xhat[part] *= _per_channel(inv_std)
            if "weight" in self.params:
                xp.multiply(xhat[part], _per_channel(self.params["weight"]), out=y[part])
                if "bias" in self.params:
                    y[part] += _per_channel(self.params["bias"])
            elif "bias" in self.params:                # y = xhat + beta in one pass
                xp.add(xhat[part], _per_channel(self.params["bias"]), out=y[part])
            else:
                y[part] = xhat[part]

        _over_parts(scale, parts, x)
        self.cache = ("train", xhat, inv_std, m)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean *= 1.0 - self.momentum
        running_mean += self.momentum * mu.astype(running_mean.dtype)
        running_var *= 1.0 - self.momentum
        running_var += (self.momentum * m / (m - 1)) * var.astype(running_var.dtype)
        return y

    def backward(self, dy):
        if self.cache is None or len(self.cache) != 4:      # eval, or the reference's forward
            return super().backward(dy)
        xp = backend.array_module(dy)
        _, xhat, inv_std, m = self.cache
        c = self.num_features
        parts = parallel.batch_parts(dy)

        def part_sums(part):
            return xp.concatenate([_sums(dy[part]), _sums(dy[part], xhat[part])])

        sums = sum(_over_parts(part_sums, parts, dy))                      # float64
        d_beta, d_gamma = (sums[:c].astype(dy.dtype),
                           sums[c:].astype(dy.dtype))         # this process's sums
        if "bias" in self.params:
            self.grads["bias"] = d_beta
        if "weight" in self.params:
            self.grads["weight"] = d_gamma
        if not self.needs_input_grad:          # the same in every process: none all-sums
            return None
        total = self._all_sum(sums)
        mean_dy, mean_dy_xhat = (total[:c] / m).astype(dy.dtype), (total[c:] / m).astype(dy.dtype)
        times_gamma = self._times_gamma(inv_std)
        dx = xp.empty_like(dy)

        def gradient(part):
            xp.multiply(xhat[part], _per_channel(-mean_dy_xhat), out=dx[part])
            dx[part] += dy[part]
            dx[part] -= _per_channel(mean_dy)
            dx[part] *= _per_channel(times_gamma)

        _over_parts(gradient, parts, dy)
        return dx
