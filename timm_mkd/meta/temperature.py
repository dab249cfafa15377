"""The two learnable softmax temperatures of MKD, and their meta update.

Parameterisation: each temperature is stored as its logarithm, ``tau = exp(log_tau)``, and
after every meta update ``log_tau`` is projected back into ``[log tau_min, log tau_max]``.

Why log space: a temperature must stay positive, and the useful range spans more than an
order of magnitude (1 ... 20). In log space an Adam step of size ``meta_lr`` changes tau by
the same *factor* whether tau is 1 or 16, so one meta learning rate fits every initial value.
Why projection rather than a sigmoid squash: a squash flattens the gradient near the bounds,
so a temperature that drifts to a bound sticks there; the projection leaves the gradient
untouched inside the bounds and simply refuses to leave them.
"""
import logging
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn

from ..config import MKDConfig

_logger = logging.getLogger(__name__)


class Temperatures(nn.Module):
    """Teacher temperature ``tau_t`` and student temperature ``tau_s`` as meta-parameters.

    Owns the two log-temperature parameters, their meta optimizer and their update: tying (both move
    by the sum of their hypergradients, so ``tau_t / tau_s`` keeps its initial value) and the bounds.

    Args:
        config: initial values, bounds, which temperatures learn, tying, meta optimizer and its lr
            (already validated by ``MKDConfig``).
        device: device of the parameters.
    """

    def __init__(self, config: MKDConfig = MKDConfig(), device=None):
        super().__init__()
        self.tau_min = config.tau_min
        self.tau_max = config.tau_max
        self.tied = config.tied
        # float32 always: the temperatures must not be quantised by a bf16/fp16 model dtype.
        self.log_tau_t = nn.Parameter(
            torch.tensor(math.log(config.tau_t), device=device, dtype=torch.float32), requires_grad=config.learn_tau_t)
        self.log_tau_s = nn.Parameter(
            torch.tensor(math.log(config.tau_s), device=device, dtype=torch.float32), requires_grad=config.learn_tau_s)
        self.optimizer = _make_meta_optimizer(config.meta_optimizer, self.learnable(), config.meta_lr)

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(tau_t, tau_s)`` as 0-dim float32 tensors, differentiable w.r.t. the log-parameters."""
        return self.log_tau_t.exp(), self.log_tau_s.exp()

    def learnable(self):
        """The log-temperature parameters the meta optimizer updates."""
        return [p for p in (self.log_tau_t, self.log_tau_s) if p.requires_grad]

    @torch.no_grad()
    def project_(self) -> None:
        """Bring both log-temperatures into ``[log tau_min, log tau_max]`` in place.

        Tied, both are shifted by the same amount (the ratio is kept: the initial values lie within the
        bounds, so it fits); untied, each is clamped on its own.
        """
        lo, hi = math.log(self.tau_min), math.log(self.tau_max)
        if self.tied:
            pair = torch.stack([self.log_tau_t.detach(), self.log_tau_s.detach().to(self.log_tau_t)])
            shift = (hi - pair.max()).clamp(max=0) + (lo - pair.min()).clamp(min=0)
            self.log_tau_t.add_(shift)
            self.log_tau_s.add_(shift.to(self.log_tau_s))
        self.log_tau_t.clamp_(lo, hi)
        self.log_tau_s.clamp_(lo, hi)

    def step(self, grad: torch.Tensor) -> None:
        """One meta-optimizer step along ``grad`` (``[2]``: d/d log tau_t, d/d log tau_s), then the bounds.

        Tied, both parameters get the sum of the two components.
        """
        if self.tied:
            grad = grad.sum().expand(2)
        for p, g in ((self.log_tau_t, grad[0]), (self.log_tau_s, grad[1])):
            if p.requires_grad:
                p.grad = g.to(device=p.device, dtype=p.dtype).reshape(p.shape).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.project_()

    def jump_to(self, log_tau_t: torch.Tensor) -> None:
        """Set ``log tau_t`` (``tau_s`` keeps its ratio to it when tied), then project onto the bounds.

        ``log tau_t`` is copied, not reached by adding a difference, so the result is bit-identical whatever the
        value before (a warm start from tau 4 and one from tau 1 then train identically).
        """
        with torch.no_grad():
            target = log_tau_t.to(self.log_tau_t)
            if self.tied:  # the log-ratio is added to the copy: equal temperatures land bit-identically on target
                self.log_tau_s.copy_(target + (self.log_tau_s - self.log_tau_t).to(target))
            self.log_tau_t.copy_(target)
        self.project_()

    def values(self) -> Tuple[float, float]:
        """Current ``(tau_t, tau_s)`` as Python floats."""
        with torch.no_grad():
            tau_t, tau_s = self()
        return float(tau_t), float(tau_s)

    def state(self) -> Dict:
        """The log-temperatures and the meta-optimizer state (tensors and dicts only)."""
        return {'log_tau_t': self.log_tau_t.detach().clone(), 'log_tau_s': self.log_tau_s.detach().clone(),
                'meta_optimizer': self.optimizer.state_dict()}

    def load_state(self, state: Dict) -> None:
        """Restore what ``state`` returned, projected onto this run's bounds.

        A state saved under other bounds (a resume with a lower ``tau_max``, say) can hold temperatures outside
        ``[tau_min, tau_max]``; they are brought inside as after a meta update (``project_``), with a warning naming
        the bound that moved them. The meta optimizer keeps its moments but takes this run's ``meta_lr``, with a
        warning when the checkpoint was saved with another.

        Raises:
            RuntimeError: when the meta-optimizer state does not fit (other learnable temperatures), before anything
                is changed; the message names the ``learn_tau_s`` setting the checkpoint was saved with.
        """
        self._check_fits(state['meta_optimizer'])
        with torch.no_grad():
            self.log_tau_t.copy_(state['log_tau_t'])
            self.log_tau_s.copy_(state['log_tau_s'])
        saved = self.values()
        self.project_()
        for name, before, after in zip(('tau_t', 'tau_s'), saved, self.values()):
            if after != before:
                bound = (f'tau_max={self.tau_max:g}' if before > self.tau_max else
                         f'tau_min={self.tau_min:g}' if before < self.tau_min else
                         f'the bounds [{self.tau_min:g}, {self.tau_max:g}] (tied to the other temperature)')
                _logger.warning(f"MKD: the loaded {name}={before:.6g} lies outside this run's bounds; projected "
                                f"onto {bound}: {name}={after:.6g}")
        meta_lr = self.optimizer.param_groups[0]['lr']  # this run's, before the checkpoint's replaces it
        self.optimizer.load_state_dict(state['meta_optimizer'])
        saved_lr = self.optimizer.param_groups[0]['lr']
        if saved_lr != meta_lr:
            _logger.warning(f"MKD: the checkpoint's meta optimizer ran at meta_lr={saved_lr:g}; this run continues "
                            f"at meta_lr={meta_lr:g}")
        for group in self.optimizer.param_groups:
            group['lr'] = meta_lr

    def _check_fits(self, optimizer_state: Dict) -> None:
        """Refuse a meta-optimizer state saved with another number of learnable temperatures, naming the fix."""
        saved = sum(len(g['params']) for g in optimizer_state['param_groups'])
        here = len(self.learnable())
        if saved == here or (saved == 1 and here == 0):  # nothing learnable keeps one placeholder parameter
            return
        fix = ('learn_tau_s=False (tau_s held, the default before 0.3.0)' if saved == 1 else
               'learn_tau_t=True and learn_tau_s=True (the default)')
        raise RuntimeError(f"the checkpoint's MKD state was saved with {saved} learnable temperature(s), this run "
                           f"learns {here}; resume with {fix}, as the run that saved it.")

    def extra_repr(self) -> str:
        tau_t, tau_s = self.values()
        return f'tau_t={tau_t:.4g}, tau_s={tau_s:.4g}, bounds=[{self.tau_min:g}, {self.tau_max:g}]'


def _make_meta_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if not params:
        # Nothing learnable: keep an optimizer so task_state has a uniform shape.
        params = [nn.Parameter(torch.zeros(()), requires_grad=True)]
    if name.lower() == 'sgd':
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)
