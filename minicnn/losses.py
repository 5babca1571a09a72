"""Softmax cross-entropy, fused and numerically stable.

For logits z (N, K) and integer labels t (N,)::

    log p[n, k] = z[n, k] - m[n] - log(sum_k exp(z[n, k] - m[n])),   m[n] = max_k z[n, k]
    L = -(1/N) * sum_n log p[n, t[n]]

Subtracting the row maximum m changes nothing mathematically but keeps exp()
from overflowing, so logits of +-1000 still give finite values.

Backward (softmax and log fused, which is why the gradient is so simple)::

    dL/dz[n, k] = (p[n, k] - [k == t[n]]) / N

Label smoothing eps (as PyTorch's ``label_smoothing``) trains against the
target distribution q = (1 - eps) * onehot(t) + eps / K instead of onehot(t)::

    L = -(1/N) * sum_n sum_k q[n, k] * log p[n, k]
      = (1 - eps) * (plain loss) + eps * mean over n and k of (-log p[n, k])
    dL/dz[n, k] = (p[n, k] - q[n, k]) / N

The model is no longer pushed to make one logit infinitely larger than the
others, which makes it less over-confident and often more accurate.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.validation import check_backward, check_input, check_labels


def softmax(logits):
    """p[n, k] = exp(z[n, k] - m[n]) / sum_k exp(z[n, k] - m[n]), row-wise and stable."""
    xp = backend.array_module(logits)
    shifted = xp.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class SoftmaxCrossEntropy:
    """forward(logits, labels) -> mean loss (a 0-d array); backward() -> dlogits."""

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0 and 1, got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.cache = None

    def forward(self, logits, labels):
        check_input(self, logits, ndim=2, expected="of logits (N, K)")
        check_labels(self, labels, *logits.shape)
        xp = backend.array_module(logits)
        n = logits.shape[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        rows = xp.arange(n)
        self.cache = (log_probs, labels, rows)
        loss = -log_probs[rows, labels].mean()
        eps = self.label_smoothing
        if eps:
            loss = (1 - eps) * loss - eps * log_probs.mean()
        return loss

    def backward(self):
        check_backward(self, self.cache is not None)
        log_probs, labels, rows = self.cache
        n, k = log_probs.shape
        eps = self.label_smoothing
        dlogits = backend.array_module(log_probs).exp(log_probs)      # p
        if eps:
            dlogits -= eps / k                                         # p - q, off the labels
        dlogits[rows, labels] -= 1 - eps                               # p - q, on the labels
        dlogits /= n
        return dlogits

    __call__ = forward
