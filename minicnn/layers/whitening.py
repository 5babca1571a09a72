"""Patch whitening: a first conv layer with fixed filters computed from the data (airbench).

The filters are not learned. They are set once, before training, so that the
layer's outputs are the image's k x k patches in decorrelated coordinates of
unit variance. For images X (N, C, H, W), normalized as the network sees them::

    cols  = im2col(X)                        # (C*k*k, P): one column per patch, P = N*OH*OW
    Sigma = cols @ cols.T / P                # the patches' second moment (not centred)
    Sigma = V diag(lambda) V.T               # eigenvectors v_i, lambda_1 >= lambda_2 >= ...
    f_i   = v_i / sqrt(lambda_i + eps)       # filter i: the patch's coordinate along v_i,
                                             # of variance lambda_i / (lambda_i + eps) <= 1
    W     = [f_1, ..., f_d, -f_1, ..., -f_d] # each twice, with both signs (d = C*k*k)

The two signs are for the ReLU that follows: relu(z) and relu(-z) together still
hold z (z = relu(z) - relu(-z)), so no information is lost before the first
learned layer. eps caps the gain of the directions of least variance (pixel
noise) at 1/sqrt(eps).

Forward is the convolution's, y = W (*) x + b, with the fixed W. Backward, with
dY = dy as (OC, N*OH*OW) and cols = im2col(x)::

    db = dY.sum(axis=1)                      # the bias is added at every output position
    dx = col2im(W.T @ dY)                    # only if asked; as a first layer it never is

and no dW: W is not trained. So W lives in ``buffers`` (saved in the weights file,
unseen by the optimizer, the gradient checks and weight decay), and so does the
bias once :meth:`PatchWhitening.freeze_bias` has fixed it too.

After Keller Jordan's airbench (github.com/KellerJordan/cifar10-airbench, its
``init_whitening_conv``), with its eps of 5e-4 and 2x2 patches.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.im2col import col2im, im2col
from minicnn.layers.conv import Conv2d

EPS = 5e-4                 # airbench's
IMAGES_PER_CHUNK = 500     # patches of this many images at a time when measuring Sigma


class PatchWhitening(Conv2d):
    """PatchWhitening(in_channels=3, kernel_size=2, eps=5e-4): a k x k conv, stride 1, no
    padding, with 2 * in_channels * k * k fixed filters and a trainable bias (starts at 0).

    buffers: "weight" (OC, C, k, k), set by :meth:`fit_to`; params: "bias" (OC,), which
    :meth:`freeze_bias` moves to the buffers. The names are those of PyTorch's Conv2d.
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = EPS):
        if eps <= 0:
            raise ValueError(f"PatchWhitening needs eps > 0, got {eps}")
        super().__init__(in_channels, 2 * in_channels * kernel_size ** 2, kernel_size)
        self.eps = eps
        self.buffers["weight"] = self.params.pop("weight")    # random until fit_to
        self.params["bias"] = backend.xp.zeros(self.out_channels, dtype=backend.float32)

    @property
    def bias_trainable(self) -> bool:
        return "bias" in self.params

    def freeze_bias(self) -> None:
        """Stop training the bias: it keeps its value, moves to the buffers, and the
        optimizer no longer sees it (no gradient, no momentum, no decay)."""
        if self.bias_trainable:
            self.buffers["bias"] = self.params.pop("bias")
            self.grads.pop("bias", None)

    def weight_and_bias(self):
        return self.buffers["weight"], self.params.get("bias", self.buffers.get("bias"))

    def fit_to(self, images) -> None:
        """Set the filters from ``images`` (N, C, H, W), float, normalized as the network
        will see them (the module docstring's formulas)."""
        xp = backend.array_module(images)
        kh, kw = self.kernel_size
        d = self.in_channels * kh * kw
        sigma, patches = xp.zeros((d, d), dtype=xp.float64), 0
        for start in range(0, len(images), IMAGES_PER_CHUNK):
            cols = im2col(images[start:start + IMAGES_PER_CHUNK].astype(xp.float64), kh, kw)
            sigma += cols @ cols.T
            patches += cols.shape[1]
        if patches == 0:
            raise ValueError("PatchWhitening.fit_to needs at least one image")
        eigenvalues, eigenvectors = xp.linalg.eigh(sigma / patches)    # ascending
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
        filters = (eigenvectors / xp.sqrt(eigenvalues + self.eps)).T   # row i: f_i
        weight = xp.concatenate([filters, -filters]).reshape(self.out_channels, -1, kh, kw)
        self.buffers["weight"] = weight.astype(self.buffers["weight"].dtype)

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("PatchWhitening.backward needs a forward pass in training mode "
                               "first")
        x_shape, _ = self.cache
        kh, kw = self.kernel_size
        weight, _ = self.weight_and_bias()
        dy_mat = dy.transpose(1, 0, 2, 3).reshape(self.out_channels, -1)   # dY: (OC, N*OH*OW)
        if self.bias_trainable:
            self.grads["bias"] = dy_mat.sum(axis=1)
        if not self.needs_input_grad:
            return None
        d_cols = weight.reshape(self.out_channels, -1).T @ dy_mat
        return col2im(d_cols, x_shape, kh, kw, self.stride, self.padding)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"eps={self.eps}, bias_trainable={self.bias_trainable}")


def whitening_layers(model) -> list[PatchWhitening]:
    return [module for _, module in model.modules() if isinstance(module, PatchWhitening)]
