"""The two-temperature knowledge-distillation loss.

    p_t = softmax(z_t / tau_t)                 teacher distribution at the teacher temperature
    log p_s = log_softmax(z_s / tau_s)         student distribution at the student temperature
    KD = tau_s^2 * (1/B) * sum_b KL(p_t || p_s)

Direction: KL(teacher || student), as in Hinton et al. and timm's ``LogitDistillationTask``:
the student is pulled to cover the teacher's whole distribution (the "dark knowledge").

Reduction: ``batchmean`` (sum over classes, mean over the batch), the mathematically correct
KL per sample, again as timm does.

Scale ``tau_s^2``: the gradient reaching the student logits is
``dKD/dz_s = tau_s * (p_s - p_t)``, which for large temperatures tends to
``(z_s - (tau_s / tau_t) z_t) / C``, independent of tau_s. So changing a temperature changes
the *shape* of the target, not the effective weight of the KD term; otherwise the meta step
could "learn" a temperature merely as a disguised loss weight. With ``tau_t == tau_s == T``
the factor is timm's ``T^2``, so MKD at its initial values reproduces timm's loss exactly.

The KD term only needs logits, so it is indifferent to mixup/cutmix soft targets: the task
criterion alone consumes the targets.

Rows whose teacher logits are not finite (a teacher overflowing in fp16, a corrupt sample)
contribute zero instead of turning the whole loss, the student's gradient and the
hypergradient into NaN. This is done with ``torch.where``, without a host sync.
"""
import math

import torch
import torch.nn.functional as F

from .config import KD_SCALES


def two_temperature_kd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        tau_t: torch.Tensor,
        tau_s: torch.Tensor,
        scale: str = 'student',
) -> torch.Tensor:
    """KL(softmax(z_t / tau_t) || softmax(z_s / tau_s)) * tau_s^2, batch-mean.

    Computed in float32 whatever the autocast dtype: temperatures divide the logits, and
    bf16 rounding of the softened distributions would swamp the meta-gradient signal.

    Args:
        student_logits: ``[B, C]`` student logits.
        teacher_logits: ``[B, C]`` teacher logits (no gradient needed).
        tau_t: teacher temperature, a positive 0-dim tensor (may require grad).
        tau_s: student temperature, a positive 0-dim tensor (may require grad).
        scale: ``'student'`` multiplies by ``tau_s^2`` (default, see module docstring); ``'product'``
            by ``tau_t * tau_s``, which makes the student-logit gradient independent of *both*
            temperatures while the student is still near-uniform (``tau_t (p_s - p_t) ~ -(z_t - mean)/C``),
            so early in training no temperature acts as a KD step size for the one-step meta objective.

    Returns:
        0-dim float32 loss tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            f"differ: teacher and student must predict the same classes.")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32, or float64 in oracle tests
    teacher_logits = teacher_logits.to(dtype)
    finite = torch.isfinite(teacher_logits).all(dim=-1, keepdim=True)
    teacher_logits = torch.where(finite, teacher_logits, torch.zeros_like(teacher_logits))
    log_p_s = F.log_softmax(student_logits.to(dtype) / tau_s, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / tau_t, dim=-1)
    kl_rows = F.kl_div(log_p_s, log_p_t, reduction='none', log_target=True).sum(-1, keepdim=True)
    kl = torch.where(finite, kl_rows, torch.zeros_like(kl_rows)).sum() / student_logits.shape[0]
    if scale == 'student':
        return kl * tau_s * tau_s
    if scale == 'product':
        return kl * tau_t * tau_s
    raise ValueError(f"unknown KD scale '{scale}'; use one of {KD_SCALES}")


def _is_soft(target: torch.Tensor, logits: torch.Tensor) -> bool:
    """Mixup-style ``[B, C]`` probability targets, as opposed to class indices."""
    return target.dtype.is_floating_point and target.dim() == logits.dim()


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if _is_soft(target, logits):
        return -(target.to(logits.dtype) * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, target)


def best_logit_scale(logits: torch.Tensor, target: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """The scalar ``s > 0`` minimising ``CE(s * logits, target)`` over the batch (Newton in log s; no graph).

    ``CE(s z)`` is convex in ``s``: ``d/ds = mean(E_p[z] - z_y)``, ``d2/ds2 = mean(Var_p[z])``.
    """
    z = logits.detach().double()
    y = target.detach().double() if _is_soft(target, z) else F.one_hot(target, z.shape[-1]).double()
    log_s = torch.zeros((), dtype=torch.float64, device=z.device)
    for _ in range(steps):
        s = log_s.exp()
        p = F.softmax(s * z, dim=-1)
        mean_z = (p * z).sum(-1)
        d1 = (mean_z - (y * z).sum(-1)).mean()
        d2 = ((p * z * z).sum(-1) - mean_z ** 2).mean()
        # Newton on log s: f' = s d1, f'' = s d1 + s^2 d2 (> 0 near the optimum); damped to 1 per step.
        step = (s * d1) / (s * d1 + s * s * d2).clamp_min(1e-12)
        log_s = (log_s - step.clamp(-1.0, 1.0)).clamp(math.log(1e-2), math.log(1e2))
    return log_s.exp().to(logits.dtype)


def meta_loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of the look-ahead student on a meta batch: cross-entropy at the batch's best single logit scale.

    ``min_s CE(s z, y)``. Its gradient (envelope theorem: the scale held at its optimum) has no component that
    merely makes the student more or less confident, so the meta step is judged on ranking the right class first,
    which top-1 measures, rather than on calibration. (Plain cross-entropy, measured as an option, gave
    hypergradients of the same sign and size.)

    Hard integer targets are the normal case (held-out data, eval transforms, no mixup);
    float ``[B, C]`` targets (the training-stream meta source under mixup) use soft-target CE.

    Args:
        logits: ``[B, C]`` student logits on the meta batch.
        target: class indices or soft ``[B, C]`` targets.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return _soft_ce(best_logit_scale(logits, target) * logits, target)
