"""Input gradients: which pixels a class's score depends on, by minicnn's own backward.

For an image x (normalised, shape (1, C, H, W)) and a class c with logit z_c(x):

- gradient (Simonyan et al., 2014)::

      g = dz_c/dx            one backward pass from the upstream gradient e_c
                             (1 at class c, 0 elsewhere)

  A large |g| at a pixel: a small change there moves the score most.

- SmoothGrad (Smilkov et al., 2017)::

      s = (1/n) sum_i dz_c/dx (x + e_i),     e_i ~ Normal(0, sigma^2),
                                             sigma = noise * (max x - min x)

  A ReLU network's gradient jumps from pixel to pixel (each ReLU is on or
  off); the mean over noisy copies keeps what they agree on.

- gradient x input (Shrikumar et al., 2016)::

      g * x                  entry by entry

  The first-order share of each input value in the score, measured from
  x = 0, which after normalisation is the training set's mean colour.

BatchNorm layers use their running statistics (as in eval mode), so each
image of a batch gets the gradient of its own logit alone: a batch of noisy
copies is one forward and one backward.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.layers import BatchNorm2d


def _set_up_for_input_gradients(model) -> None:
    """Training mode, so every layer keeps what its backward needs, except that
    BatchNorm uses its running statistics; and a gradient for the input."""
    model.train()
    for _, module in model.modules():
        if isinstance(module, BatchNorm2d):
            module.training = False
    model.set_needs_input_grad(True)


def input_gradient(model, x, class_index: int):
    """dz_c/dx for every image of x (N, C, H, W): forward, then backward from e_c."""
    _set_up_for_input_gradients(model)
    logits = model.forward(x)
    upstream = backend.xp.zeros_like(logits)
    upstream[:, class_index] = 1.0
    gradient = model.backward(upstream)
    model.eval()
    return gradient


def noise_sigma(x, noise: float) -> float:
    """SmoothGrad's noise level: ``noise`` times the range of x's values."""
    return noise * float(x.max() - x.min())


def noisy_copies(x, count: int, sigma: float, rng):
    """``count`` copies of one image x (1, C, H, W), each plus Normal(0, sigma^2) noise."""
    noise = rng.standard_normal((count, *x.shape[1:])).astype(x.dtype)
    return x + sigma * noise


def smoothgrad(model, x, class_index: int, samples: int = 256, noise: float = 0.3,
               seed: int = 0, batch_size: int = 32):
    """The mean of dz_c/dx over ``samples`` noisy copies of x (1, C, H, W); shape of x.

    The copies are drawn ``batch_size`` at a time from a generator seeded with
    ``seed``, so the same call gives the same map."""
    sigma, rng = noise_sigma(x, noise), backend.make_rng(seed)
    total = backend.xp.zeros_like(x)
    for start in range(0, samples, batch_size):
        copies = noisy_copies(x, min(batch_size, samples - start), sigma, rng)
        total += input_gradient(model, copies, class_index).sum(axis=0, keepdims=True)
    return total / samples


def gradient_times_input(model, x, class_index: int):
    """(dz_c/dx) * x, entry by entry, for x (N, C, H, W)."""
    return input_gradient(model, x, class_index) * x
