"""Lookahead averaging of the weights, on airbench's schedule.

A running average theta_avg of the network's arrays (every parameter and every
buffer, BatchNorm's running statistics included) is kept from ``start_epoch`` on.
Every ``every`` steps, at global step s of T (counted from 1, after the update)::

    rho       = decay_base ** every * (s / T) ** decay_power
    theta_avg = rho * theta_avg + (1 - rho) * theta       # the first time: theta_avg = theta
    theta     = theta_avg                                 # pulled back, as in Lookahead

rho grows with s: early pulls barely move the weights, late ones average
strongly (airbench: 0.95**5 * (s/T)**3, from 0.02 at 30% of training to 0.77 at
the end). After every epoch, once the average exists, theta = theta_avg (rho = 1),
so the weights that are evaluated and saved are the averaged ones. The
optimizer's momentum is not touched.

After Keller Jordan's airbench94 (github.com/KellerJordan/cifar10-airbench,
``LookaheadState`` and its schedule in ``main``). Its state (the average) is saved
with the optimizer's so that --resume continues exactly.
"""

from __future__ import annotations

from minicnn import backend


class Lookahead:
    """airbench's lookahead; call :meth:`after_step` after every optimizer step and
    :meth:`end_epoch` after every epoch (the module docstring gives the rule)."""

    def __init__(self, total_steps: int, start_epoch: int = 3, every: int = 5,
                 decay_base: float = 0.95, decay_power: float = 3.0):
        if total_steps < 1 or every < 1 or start_epoch < 0:
            raise ValueError("Lookahead needs total_steps >= 1, every >= 1, start_epoch >= 0")
        self.total_steps, self.start_epoch, self.every = total_steps, start_epoch, every
        self.decay_base, self.decay_power = decay_base, decay_power
        self.average: dict | None = None       # array path -> its average, once started

    def decay(self, step: int) -> float:
        """rho at global step ``step`` (1-based)."""
        return self.decay_base ** self.every * (step / self.total_steps) ** self.decay_power

    def after_step(self, model, epoch: int, step: int) -> None:
        """After the update of global step ``step`` (1-based) in epoch ``epoch`` (0-based)."""
        if epoch < self.start_epoch or step % self.every:
            return
        if self.average is None:
            self.average = {name: holder[key].copy() for name, holder, key in
                            model.named_arrays()}
        else:
            self.pull(model, self.decay(step))

    def end_epoch(self, model) -> None:
        """Set the weights to the average (nothing before the average exists)."""
        if self.average is not None:
            self.pull(model, 1.0)

    def pull(self, model, rho: float) -> None:
        """theta_avg = rho * theta_avg + (1 - rho) * theta, then theta = theta_avg, in place
        (written as PyTorch's lerp, theta_avg += (1 - rho) * (theta - theta_avg))."""
        for name, holder, key in model.named_arrays():
            average, current = self.average[name], holder[key]
            if rho != 1.0:
                average += (1.0 - rho) * (current - average)
            current[...] = average

    def state_dict(self) -> dict:
        return dict(self.average or {})

    def load_state_dict(self, state: dict) -> None:
        self.average = {name: backend.to_device(value) for name, value in state.items()} or None
