"""The two learnable softmax temperatures of MKD.

Parameterisation: each temperature is stored as its logarithm, ``tau = exp(log_tau)``, and
after every meta update ``log_tau`` is projected back into ``[log tau_min, log tau_max]``.

Why log space: a temperature must stay positive, and the useful range spans more than an
order of magnitude (1 ... 20). In log space an Adam step of size ``meta_lr`` changes tau by
the same *factor* whether tau is 1 or 16, so one meta learning rate fits every initial value.
Why projection rather than a sigmoid squash: a squash flattens the gradient near the bounds,
so a temperature that drifts to a bound sticks there; the projection leaves the gradient
untouched inside the bounds and simply refuses to leave them.
"""
import math
from typing import Tuple

import torch
import torch.nn as nn


class Temperatures(nn.Module):
    """Teacher temperature ``tau_t`` and student temperature ``tau_s`` as meta-parameters.

    Args:
        tau_t: initial teacher temperature.
        tau_s: initial student temperature.
        tau_min: lower bound for both temperatures (> 0).
        tau_max: upper bound for both temperatures (> tau_min).
        learn_tau_t: whether the meta step may change ``tau_t``.
        learn_tau_s: whether the meta step may change ``tau_s``.
        device: device of the parameters.
    """

    def __init__(
            self,
            tau_t: float = 1.0,
            tau_s: float = 1.0,
            tau_min: float = 0.5,
            tau_max: float = 20.0,
            learn_tau_t: bool = True,
            learn_tau_s: bool = True,
            device=None,
    ):
        super().__init__()
        check_bounds(tau_t, tau_s, tau_min, tau_max)
        self.tau_min = float(tau_min)
        self.tau_max = float(tau_max)
        # float32 always: the temperatures must not be quantised by a bf16/fp16 model dtype.
        self.log_tau_t = nn.Parameter(
            torch.tensor(math.log(tau_t), device=device, dtype=torch.float32), requires_grad=learn_tau_t)
        self.log_tau_s = nn.Parameter(
            torch.tensor(math.log(tau_s), device=device, dtype=torch.float32), requires_grad=learn_tau_s)

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(tau_t, tau_s)`` as 0-dim float32 tensors, differentiable w.r.t. the log-parameters."""
        return self.log_tau_t.exp(), self.log_tau_s.exp()

    def learnable(self):
        """The log-temperature parameters the meta optimizer updates."""
        return [p for p in (self.log_tau_t, self.log_tau_s) if p.requires_grad]

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp both log-temperatures into ``[log tau_min, log tau_max]`` in place."""
        lo, hi = math.log(self.tau_min), math.log(self.tau_max)
        self.log_tau_t.clamp_(lo, hi)
        self.log_tau_s.clamp_(lo, hi)

    def values(self) -> Tuple[float, float]:
        """Current ``(tau_t, tau_s)`` as Python floats."""
        with torch.no_grad():
            tau_t, tau_s = self()
        return float(tau_t), float(tau_s)

    def extra_repr(self) -> str:
        tau_t, tau_s = self.values()
        return f'tau_t={tau_t:.4g}, tau_s={tau_s:.4g}, bounds=[{self.tau_min:g}, {self.tau_max:g}]'


def check_bounds(tau_t: float, tau_s: float, tau_min: float, tau_max: float) -> None:
    """Raise ``ValueError`` naming the problem when bounds or initial values are unusable."""
    for name, value in (('tau_t', tau_t), ('tau_s', tau_s), ('tau_min', tau_min), ('tau_max', tau_max)):
        if not math.isfinite(value):
            raise ValueError(f"MKD temperature {name}={value} is not finite; give a finite positive number.")
    if tau_min <= 0:
        raise ValueError(f"MKD temperature lower bound tau_min={tau_min} must be > 0 (temperatures divide logits).")
    if tau_min >= tau_max:
        raise ValueError(
            f"MKD temperature bounds need tau_min < tau_max, got tau_min={tau_min} >= tau_max={tau_max}; "
            f"swap or widen them (e.g. --mkd-tau-min 0.5 --mkd-tau-max 20).")
    for name, value in (('tau_t', tau_t), ('tau_s', tau_s)):
        if not tau_min <= value <= tau_max:
            raise ValueError(
                f"initial MKD temperature {name}={value} lies outside the bounds [{tau_min}, {tau_max}]; "
                f"choose an initial value inside them or widen the bounds.")
