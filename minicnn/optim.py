"""Stochastic gradient descent and learning-rate schedules.

SGD follows PyTorch's convention, for each parameter p with gradient g::

    g = g + weight_decay * p                  # L2 penalty (weight_decay/2)*|p|^2,
                                              # except for the names in skip_decay
    v = momentum * v + g                      # v starts as the first g
    g = g + momentum * v   if nesterov else v
    p = p - lr * g                            # in place

Parameter groups (:class:`ParamGroup`) change lr and weight_decay for the
parameters they name: such a parameter is updated with ``lr * lr_scale`` and its
group's weight decay (airbench trains BatchNorm's shifts at 64 times the lr).

Schedules map a step number to a learning rate; they are plain callables so
the training loop sets ``optimizer.lr = schedule(step)`` before every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minicnn.layers.base import Module
from minicnn.layers.norm import BatchNorm2d


@dataclass(frozen=True)
class ParamGroup:
    """Parameters (by path, e.g. "4.bias") updated with lr * lr_scale and with their own
    weight decay (None: the optimizer's)."""
    names: frozenset
    lr_scale: float = 1.0
    weight_decay: float | None = None


class SGD:
    def __init__(self, model: Module, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, skip_decay=(), groups=()):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.model = model
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay = weight_decay
        self.skip_decay = frozenset(skip_decay)
        self.groups = {}              # parameter path -> its ParamGroup
        for group in groups:
            if group.lr_scale < 0 or (group.weight_decay or 0) < 0:
                raise ValueError("a group's lr_scale and weight_decay must be >= 0")
            for name in group.names:
                if name in self.groups:
                    raise ValueError(f"parameter {name} is in two groups")
                self.groups[name] = group
        self.velocity: dict = {}      # parameter path -> momentum buffer

    def settings(self, name: str) -> tuple[float, float]:
        """(lr, weight_decay) of the parameter ``name`` at this step."""
        group = self.groups.get(name)
        lr = self.lr * group.lr_scale if group else self.lr
        decay = self.weight_decay if group is None or group.weight_decay is None \
            else group.weight_decay
        return lr, 0.0 if name in self.skip_decay else decay

    def step(self) -> None:
        for name, module, key in self.model.named_parameters():
            param, grad = module.params[key], module.grads[key]
            lr, weight_decay = self.settings(name)
            if weight_decay:
                grad = grad + weight_decay * param
            if self.momentum:
                velocity = self.velocity.get(name)
                if velocity is None:
                    velocity = self.velocity[name] = grad.copy()
                else:
                    velocity *= self.momentum
                    velocity += grad
                grad = grad + self.momentum * velocity if self.nesterov else velocity
            param -= lr * grad

    def state_dict(self) -> dict:
        return dict(self.velocity)

    def load_state_dict(self, state: dict) -> None:
        self.velocity = dict(state)


def batchnorm_names(model: Module) -> list[str]:
    """Names of every BatchNorm parameter (airbench's "norm" group, whose lr it scales)."""
    return [name for name, module, _ in model.named_parameters()
            if isinstance(module, BatchNorm2d)]


def norm_and_bias_names(model: Module) -> list[str]:
    """Names of the biases and of every BatchNorm parameter: the usual set to exempt
    from weight decay (shrinking a shift or a normalization scale towards 0 is
    not a useful prior; shrinking the conv and linear weights is)."""
    return [name for name, module, key in model.named_parameters()
            if key == "bias" or isinstance(module, BatchNorm2d)]


# --- learning-rate schedules ---------------------------------------------------

SCHEDULES = ("constant", "step", "cosine", "onecycle", "linear")


def _cosine(start: float, end: float, t: float) -> float:
    """Half a cosine from start (t=0) to end (t=1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_schedule(name: str, lr: float, total_steps: int, *, warmup_fraction: float = 0.3,
                  div_factor: float = 25.0, final_div_factor: float = 1e4,
                  step_milestones=(0.5, 0.75), step_gamma: float = 0.1,
                  start_factor: float | None = None, end_factor: float = 0.0):
    """A callable step -> learning rate, for ``total_steps`` steps peaking at ``lr``.

    constant: lr throughout.
    step:     lr, times step_gamma at each milestone (fractions of training).
    cosine:   lr decaying to 0 along half a cosine.
    onecycle: as PyTorch's OneCycleLR (cosine annealing, momentum not cycled):
              from lr/div_factor up to lr over the warm-up fraction, then down
              to lr/(div_factor*final_div_factor).
    linear:   a triangle: straight up from lr * start_factor (default 1/div_factor)
              to lr over the warm-up fraction, then straight down to lr * end_factor
              (default 0) at step total_steps. airbench: start 0.2, peak at 23%,
              end 0.07.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if name != "linear" and (start_factor is not None or end_factor):
        raise ValueError(f"start and end factors are for the linear schedule, not {name!r}")
    if (start_factor is not None and start_factor < 0) or end_factor < 0:
        raise ValueError("start_factor and end_factor must be >= 0")
    total = max(int(total_steps), 1)

    def constant(step: int) -> float:
        return lr

    def step_decay(step: int) -> float:
        passed = sum(step >= m * total for m in step_milestones)
        return lr * step_gamma ** passed

    def cosine(step: int) -> float:
        return _cosine(lr, 0.0, min(step / total, 1.0))

    def onecycle(step: int) -> float:
        # Phase boundaries as in PyTorch: the peak is reached at step warmup_end.
        warmup_end = max(warmup_fraction * total - 1, 1.0)
        start, end = lr / div_factor, lr / (div_factor * final_div_factor)
        if step <= warmup_end:
            return _cosine(start, lr, step / warmup_end)
        return _cosine(lr, end, min((step - warmup_end) / max(total - 1 - warmup_end, 1.0), 1.0))

    def linear(step: int) -> float:
        warmup_end = warmup_fraction * total
        if step < warmup_end:
            start = lr / div_factor if start_factor is None else lr * start_factor
            return start + (lr - start) * step / warmup_end
        end = lr * end_factor
        return end + (lr - end) * max(total - step, 0) / max(total - warmup_end, 1.0)

    return {"constant": constant, "step": step_decay, "cosine": cosine,
            "onecycle": onecycle, "linear": linear}[name]
