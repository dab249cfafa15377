"""The ``'calibration'`` objective: the teacher's held-out NLL at its temperature, its gradient and its exact minimiser.

``calibration_hypergradient`` is what the default meta step follows; ``calibrated_log_temperature``
solves for the minimum at once (the warm start). Neither touches the student.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F

from ..loss import _is_soft
from .meta_parts import HyperGradient


def calibration_hypergradient(
        teacher_logits: torch.Tensor,
        meta_target: torch.Tensor,
        log_taus: Tuple[torch.Tensor, torch.Tensor],
) -> HyperGradient:
    """Gradient of the teacher's held-out NLL at its temperature, ``d CE(z_t / tau_t, y) / d log tau_t``.

    The meta objective here is the quality of the KD *target* rather than a look-ahead of the
    student: the teacher's softened distribution ``softmax(z_t / tau_t)`` on held-out meta data should
    be the best available estimate of the class posterior (Menon et al. 2021, "A statistical perspective
    on distillation": a student distils best from the teacher closest to the Bayes class-probabilities),
    and within the temperature family the held-out NLL measures exactly that. The objective is convex in
    ``1 / tau_t``, has one minimum, and needs one teacher forward on the meta batch. The student
    temperature gets no gradient of its own (it follows ``tau_t`` when the temperatures are tied).

    Returns:
        ``HyperGradient`` with ``grad = [dNLL/dlog tau_t, 0]`` and the NLL as ``meta_loss``.
    """
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    z = teacher_logits.detach().to(dtype)
    # Rows whose teacher logits are not finite (fp16 overflow) are left out, as in the KD loss; no host sync.
    finite = torch.isfinite(z).all(dim=-1)
    z = torch.where(finite[:, None], z, torch.zeros_like(z))
    with torch.enable_grad():
        log_tau_t = log_taus[0].detach().to(dtype).requires_grad_(True)
        log_p = F.log_softmax(z / log_tau_t.exp(), dim=-1)
        target = meta_target.to(dtype) if _is_soft(meta_target, z) else F.one_hot(meta_target, z.shape[-1]).to(dtype)
        rows = -(target * log_p).sum(-1)
        nll = torch.where(finite, rows, torch.zeros_like(rows)).sum() / finite.sum()  # NaN when no row is finite
        (g,) = torch.autograd.grad(nll, log_tau_t)
    grad = torch.stack([g, torch.zeros_like(g)])
    return HyperGradient(grad=grad, meta_loss=float(nll.detach()), epsilon=0.0)


def calibrated_log_temperature(
        teacher_logits: torch.Tensor,
        meta_target: torch.Tensor,
        tau_min: float,
        tau_max: float,
        iters: int = 50,
) -> torch.Tensor:
    """The minimiser in ``[log tau_min, log tau_max]`` of the teacher's NLL ``CE(z_t / tau, y)``, solved exactly.

    The objective ``calibration_hypergradient`` follows, minimised in one go (the warm start of the
    ``'calibration'`` estimator: the temperature no longer has to walk there from its initial value).
    In ``v = 1 / tau`` the NLL is convex, with

        f'(v) = mean_i( E_{p_v}[z_i] - y_i . z_i ),        f''(v) = mean_i( Var_{p_v}[z_i] ) >= 0,

    so a Newton iteration safeguarded by bisection on the sign of ``f'`` finds the minimum; when it
    lies outside the bounds the nearer bound is returned. Non-finite teacher rows are left out.

    Returns:
        0-dim float64 tensor ``log tau*`` (NaN when no row is finite).
    """
    z = teacher_logits.detach().to(torch.float64)
    finite = torch.isfinite(z).all(dim=-1)
    z = z[finite]
    y = meta_target[finite].to(torch.float64) if _is_soft(meta_target, teacher_logits) \
        else F.one_hot(meta_target[finite], z.shape[-1]).to(torch.float64)
    if z.shape[0] == 0:
        return torch.tensor(float('nan'), dtype=torch.float64)
    z_y = (y * z).sum(-1)

    def slope_curvature(v: float) -> Tuple[float, float]:
        p = F.softmax(v * z, dim=-1)
        mean = (p * z).sum(-1)
        var = (p * (z - mean[:, None]) ** 2).sum(-1)
        return float((mean - z_y).mean()), float(var.mean())

    lo, hi = 1.0 / tau_max, 1.0 / tau_min
    if slope_curvature(lo)[0] >= 0:
        return torch.tensor(math.log(tau_max), dtype=torch.float64)
    if slope_curvature(hi)[0] <= 0:
        return torch.tensor(math.log(tau_min), dtype=torch.float64)
    v = 0.5 * (lo + hi)
    for _ in range(iters):
        slope, curvature = slope_curvature(v)
        if slope > 0:
            hi = v
        else:
            lo = v
        newton = v - slope / curvature if curvature > 0 else float('nan')
        v_next = newton if lo < newton < hi else 0.5 * (lo + hi)
        converged = abs(v_next - v) <= 1e-12 * v
        v = v_next
        if converged:
            break
    return torch.tensor(-math.log(v), dtype=torch.float64)
