"""The ``'mixture'`` objective: the held-out NLL of the target the student actually trains toward.

With the student at temperature 1 the training loss ``a * CE(z_s, y) + b * KL(p_t(tau_t) || softmax(z_s))``
has, per sample, its minimum over the student's logits where

    softmax(z_s) = m = (a * y + b * p_t(tau_t)) / (a + b)

(its logit gradient is ``a (q - y) + b (q - p_t)``). The student does not learn ``p_t``: it learns this
mixture of the label and the teacher. Calibrating ``p_t`` alone (``timm_mkd.meta.calibration``) is right for pure
distillation (``a = 0``) and wrong otherwise: in the mixture a confidently wrong teacher costs at most
``log((a + b) / a)`` nats where the label part is right, so the best teacher temperature for the mixture is
usually sharper than the teacher's own calibrated one, and how much sharper depends on the student.

On held-out images the label is what the student must predict, so its part of the mixture is the student's own
prediction ``q`` there. The objective is

    NLL(tau_t) = - mean_i log( alpha q_i[y_i] + (1 - alpha) softmax(z_t,i / tau_t)[y_i] ),  alpha = a / (a + b)

on held-out meta views, which depends on the student (through ``q``) and on the teacher, needs no look-ahead
(no short-horizon bias), and is ``timm_mkd.meta.calibration``'s objective exactly when ``alpha = 0``. With the
temperatures tied (``MKDTask``'s default) the same objective picks the shared temperature: a choice measured on
the validation split (``benchmarks/results``), not derived; ``q`` stays the student's prediction at temperature 1.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F

from ..loss import _is_soft
from .meta_parts import HyperGradient


def _prepare(teacher_logits, student_probs, meta_target):
    """float64 (or float32+) copies with non-finite rows dropped, and the targets as probabilities."""
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    z, q = teacher_logits.detach().to(dtype), student_probs.detach().to(dtype)
    finite = torch.isfinite(z).all(dim=-1) & torch.isfinite(q).all(dim=-1)
    y = meta_target.to(dtype) if _is_soft(meta_target, z) else F.one_hot(meta_target, z.shape[-1]).to(dtype)
    return z[finite], q[finite], y[finite]


def mixture_nll(z: torch.Tensor, q: torch.Tensor, y: torch.Tensor, log_tau: torch.Tensor,
                alpha: float) -> torch.Tensor:
    """``-mean sum_c y_c log(alpha q_c + (1 - alpha) softmax(z / tau)_c)`` (differentiable in ``log_tau``)."""
    p = F.softmax(z / log_tau.exp(), dim=-1)
    m = alpha * q + (1.0 - alpha) * p
    return -(y * torch.log(m.clamp_min(1e-30))).sum(-1).mean()


def mixture_hypergradient(
        teacher_logits: torch.Tensor,
        student_probs: torch.Tensor,
        meta_target: torch.Tensor,
        log_taus: Tuple[torch.Tensor, torch.Tensor],
        alpha: float,
) -> HyperGradient:
    """``d NLL(tau_t) / d log tau_t`` of the module docstring's objective on one meta batch.

    Args:
        teacher_logits: ``[B, C]`` teacher logits on the meta batch.
        student_probs: ``[B, C]`` the student's predicted probabilities on the same batch (no graph).
        meta_target: class indices ``[B]`` or probabilities ``[B, C]``.
        log_taus: ``(log tau_t, log tau_s)``.
        alpha: the label's share ``a / (a + b)`` of the training loss.

    Returns:
        ``HyperGradient`` with ``grad = [dNLL/dlog tau_t, 0]`` and the NLL as ``meta_loss`` (NaN when no row is finite).
    """
    z, q, y = _prepare(teacher_logits, student_probs, meta_target)
    with torch.enable_grad():
        log_tau_t = log_taus[0].detach().to(z.dtype).requires_grad_(True)
        nll = mixture_nll(z, q, y, log_tau_t, alpha)
        (g,) = torch.autograd.grad(nll, log_tau_t, allow_unused=True)
    g = torch.full_like(log_tau_t, float('nan')) if z.shape[0] == 0 or g is None else g
    return HyperGradient(grad=torch.stack([g, torch.zeros_like(g)]), meta_loss=float(nll.detach()), epsilon=0.0)


def mixture_log_temperature(
        teacher_logits: torch.Tensor,
        student_probs: torch.Tensor,
        meta_target: torch.Tensor,
        alpha: float,
        tau_min: float,
        tau_max: float,
        grid: int = 97,
        iters: int = 40,
) -> torch.Tensor:
    """The minimiser of ``NLL(tau_t)`` in ``[log tau_min, log tau_max]`` (the warm start).

    One-dimensional but not convex in general: the best of ``grid`` log-spaced points, then golden-section search
    in the interval between its neighbours.

    Returns:
        0-dim float64 tensor ``log tau*`` (NaN when no row is finite).
    """
    z, q, y = (t.to(torch.float64) for t in _prepare(teacher_logits, student_probs, meta_target))
    if z.shape[0] == 0:
        return torch.tensor(float('nan'), dtype=torch.float64)

    def f(lt: float) -> float:
        return float(mixture_nll(z, q, y, torch.tensor(lt, dtype=torch.float64), alpha))

    lo, hi = math.log(tau_min), math.log(tau_max)
    points = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    values = [f(p) for p in points]
    best = min(range(grid), key=values.__getitem__)
    a, b = points[max(best - 1, 0)], points[min(best + 1, grid - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    x = 0.5 * (a + b)
    return torch.tensor(x if f(x) <= values[best] else points[best], dtype=torch.float64)
