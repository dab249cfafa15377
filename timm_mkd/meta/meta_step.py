"""The MKD hypergradient: d L_meta(theta') / d log-tau for a one-step look-ahead.

With ``g(theta, tau) = grad_theta L_train(theta, tau)`` and the optimizer's real update
``theta' = step(theta, g)``, linearised as ``d theta' / d g = -J`` (``J`` diagonal, see
``lookahead_jacobian``), the chain rule gives

    d L_meta / d tau = -grad_tau [ (J v) . g(theta, tau) ],        v = grad_theta' L_meta(theta')

and the mixed second derivative is a directional derivative along ``w = J v``:

    grad_tau [ w . g(theta, tau) ] ~= ( grad_tau L_train(theta + e w) - grad_tau L_train(theta - e w) ) / 2e

(DARTS' ``architect.py`` does the same for architecture weights.) Each side is one student
*forward*: tau enters ``L_train`` only through the KD term on the logits, so ``grad_tau`` needs
no backward through the network. This is why the meta step works on timm ViTs with fused
attention and under ``torch.compile``, where double backward does not exist.

What the training step already computed is reused: ``theta'`` is the optimizer's real update
(its momentum, Adam preconditioning and weight decay included), the training batch and its
teacher logits come from the task's forward. The meta step adds one forward+backward on the
meta batch and two forwards on the training batch.

``exact_hypergradient`` computes the same quantity by double backward; it is the oracle the
tests check the finite difference against (small models without fused attention only).
"""
import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call

from .calibration import calibrated_log_temperature, calibration_hypergradient  # noqa: F401 (re-exported)
from ..config import ESTIMATORS  # noqa: F401 (re-exported)
from ..loss import meta_loss_fn, two_temperature_kd_loss
from .meta_parts import (HyperGradient, TrainBatch, buffer_copies, capture_rng_state,  # noqa: F401 (re-exported)
                         lookahead_jacobian, optimizer_params, replay_rng, tau_grads)


#: Finite-difference step (relative to ``|w|``) when the two forwards run in float16: float16 rounding
#: swamps a smaller difference. Measured on the oracle tests' float32 CNN under CPU float16 autocast
#: (SGD and AdamW, 2 seeds): error against the exact float32 oracle 0.05-0.7% at 3e-2, up to 2% at 1e-2.
LOW_PRECISION_FD_EPS = 3e-2


def _student_logits(student: nn.Module, params: Dict[str, torch.Tensor], batch: TrainBatch,
                    fd_autocast: Optional[Callable] = None) -> torch.Tensor:
    """The training forward's logits at ``params``: same RNG (dropout masks), copied buffers, no graph.

    In float32 with autocast off, or under ``fd_autocast()`` (low precision) with the logits upcast to float32.
    """
    device = batch.input.device
    autocast = fd_autocast() if fd_autocast is not None else torch.autocast(device.type, enabled=False)
    with replay_rng(batch.rng_state, device), torch.no_grad(), autocast:
        logits = functional_call(student, {**params, **buffer_copies(student)}, (batch.input,))
    return logits if fd_autocast is None else logits.float()


def kd_term(
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float,
        kd_scale: str,
) -> torch.Tensor:
    """``kd_weight * KD`` from log-temperatures ``taus`` (the training loss's KD term, as the hypergradient sees it)."""
    return kd_weight * two_temperature_kd_loss(logits, teacher_logits, taus[0].exp(), taus[1].exp(), kd_scale)


def _kd_tau_grad(
        logits_plus: torch.Tensor,
        logits_minus: torch.Tensor,
        batch: TrainBatch,
        log_taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float,
        kd_scale: str,
) -> torch.Tensor:
    """``grad_tau [KD(theta + e w) - KD(theta - e w)]`` w.r.t. (log tau_t, log tau_s), from the two forwards' logits."""
    dtype = torch.promote_types(logits_plus.dtype, torch.float32)
    with torch.enable_grad():
        taus = tuple(lt.detach().to(dtype).requires_grad_(True) for lt in log_taus)
        diff = (kd_term(logits_plus, batch.teacher_logits, taus, kd_weight, kd_scale)
                - kd_term(logits_minus, batch.teacher_logits, taus, kd_weight, kd_scale))
        return tau_grads(diff, taus)


def finite_difference_hypergradient(
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        theta: Dict[str, torch.Tensor],
        batch: TrainBatch,
        meta_input: torch.Tensor,
        meta_target: torch.Tensor,
        log_taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float,
        fd_eps: float = 1e-2,
        meta_autocast: Optional[Callable] = None,
        kd_scale: str = 'student',
        fd_autocast: Optional[Callable] = None,
) -> HyperGradient:
    """The MKD hypergradient by a central finite difference along ``w = J v``.

    Called after the optimizer step: the student's parameters are ``theta'``. Nothing is written
    to the student's parameters, buffers, ``.grad`` or the caller's RNG stream.

    Args:
        student: the unwrapped student (no DDP / compile wrapper).
        optimizer: the student optimizer, right after its step.
        theta: parameters before the step, by name (for the optimizer's parameters).
        batch: the training batch of that step.
        meta_input: meta batch input.
        meta_target: meta batch target (class indices, or soft ``[B, C]``); the meta loss is
            ``timm_mkd.loss.meta_loss_fn`` (cross-entropy at the batch's best logit scale).
        log_taus: (log tau_t, log tau_s) tensors.
        kd_weight: weight of the KD term in the training loss.
        fd_eps: finite-difference step relative to ``|w|``.
        meta_autocast: optional autocast context factory for the meta-batch forward/backward.
        kd_scale: the KD loss's temperature scale (``two_temperature_kd_loss``).
        fd_autocast: optional autocast context factory for the two finite-difference forwards (float16: see
            ``LOW_PRECISION_FD_EPS``); None (this function's default): they run in float32. ``MKDTask``'s
            look-ahead estimator passes what ``MKDConfig.fd_precision`` picks (``'auto'``: the training autocast
            when it is float16).

    Returns:
        ``HyperGradient``.
    """
    named, v, meta_loss_value = _meta_gradient(student, optimizer, theta, meta_input, meta_target, meta_autocast)
    w = [lookahead_jacobian(optimizer, p, group).to(w_i.dtype) * w_i for (_, p, group), w_i in zip(named, v)]
    return _directional_hypergradient(student, named, theta, w, batch, log_taus, kd_weight, fd_eps, kd_scale,
                                      meta_loss_value, fd_autocast)


def _meta_gradient(student, optimizer, theta, meta_input, meta_target, meta_autocast):
    """``v = grad L_meta(theta')`` (at least float32, zeros for unused parameters) via ``autograd.grad``: ``.grad`` untouched.

    Returns:
        ``(named, v, meta_loss_value)``: the optimizer's ``(name, param, group)`` triples present in ``theta``,
        the gradient per parameter, and the detached meta loss.
    """
    named = [(n, p, g) for n, p, g in optimizer_params(student, optimizer) if n in theta]
    current = [p for _, p, _ in named]
    autocast = meta_autocast() if meta_autocast is not None else contextlib.nullcontext()
    with replay_rng(None, meta_input.device), torch.enable_grad():
        with autocast:
            meta_logits = functional_call(student, buffer_copies(student), (meta_input,))
        meta_loss_value = meta_loss_fn(meta_logits, meta_target)
        v = torch.autograd.grad(meta_loss_value, current, allow_unused=True)
    # v in at least float32 (float64 stays float64): the perturbation must not round away.
    out = []
    for (_, p, _), v_i in zip(named, v):
        dtype = torch.promote_types(p.dtype, torch.float32)
        out.append(torch.zeros_like(p, dtype=dtype) if v_i is None else v_i.to(dtype))
    return named, out, meta_loss_value.detach()


def _norm(tensors) -> torch.Tensor:
    """Euclidean norm of a list of tensors, in float64."""
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def _shifted(base: Dict[str, torch.Tensor], names, w, step: float) -> Dict[str, torch.Tensor]:
    """``base + step * w`` per name, computed in ``w``'s (at least float32) dtype and returned in ``base``'s."""
    return {n: (base[n].to(w_i.dtype) + step * w_i).to(base[n].dtype) for n, w_i in zip(names, w)}


def _directional_hypergradient(student, named, theta, w, batch, log_taus, kd_weight, fd_eps, kd_scale, meta_loss_value,
                               fd_autocast=None) -> HyperGradient:
    """``-grad_tau [w . g(theta, tau)]`` by a central finite difference of two forwards at ``theta +- e w``."""
    names = [n for n, _, _ in named]
    device = batch.input.device
    w_norm = _norm(w)
    if not torch.isfinite(w_norm) or w_norm == 0:
        grad = torch.full((2,), float('nan') if not torch.isfinite(w_norm) else 0.0, device=device)
        return HyperGradient(grad=grad, meta_loss=float(meta_loss_value), epsilon=0.0)
    eps = (fd_eps if fd_autocast is None else max(fd_eps, LOW_PRECISION_FD_EPS)) / float(w_norm)
    logits_plus = _student_logits(student, _shifted(theta, names, w, eps), batch, fd_autocast)
    logits_minus = _student_logits(student, _shifted(theta, names, w, -eps), batch, fd_autocast)
    grad = -_kd_tau_grad(logits_plus, logits_minus, batch, log_taus, kd_weight, kd_scale) / (2.0 * eps)
    return HyperGradient(grad=grad, meta_loss=float(meta_loss_value), epsilon=eps)


def exact_hypergradient(
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        theta: Dict[str, torch.Tensor],
        batch: TrainBatch,
        criterion: Callable,
        task_weight: float,
        meta_input: torch.Tensor,
        meta_target: torch.Tensor,
        log_taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float,
        kd_scale: str = 'student',
) -> torch.Tensor:
    """Oracle: the same hypergradient by double backward (no finite difference).

    ``theta'(tau) = theta'_real - J (g(theta, tau) - stop_grad(g))`` has the real post-step value
    and the linearised dependence on tau; ``L_meta(theta'(tau))`` is then differentiated w.r.t.
    tau exactly. Needs double backward, so it only runs on models whose ops support it (no
    fused attention, no torch.compile); tests use it on small float64 models.

    Returns:
        ``[2]`` tensor, d L_meta / d (log tau_t, log tau_s).
    """
    named = [(n, p, g) for n, p, g in optimizer_params(student, optimizer) if n in theta]
    params = {n: theta[n].detach().requires_grad_(True) for n, _, _ in named}
    dtype = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
    taus = [lt.detach().to(dtype).requires_grad_(True) for lt in log_taus]
    with replay_rng(batch.rng_state, batch.input.device):
        logits = functional_call(student, {**params, **buffer_copies(student)}, (batch.input,))
    train_loss = task_weight * criterion(logits, batch.target) + kd_term(
        logits, batch.teacher_logits, taus, kd_weight, kd_scale)
    g = torch.autograd.grad(train_loss, list(params.values()), create_graph=True)
    lookahead = {}
    for (n, p, group), g_i in zip(named, g):
        jac = lookahead_jacobian(optimizer, p, group)
        lookahead[n] = p.detach() - jac * (g_i - g_i.detach())
    with replay_rng(None, batch.input.device):
        meta_logits = functional_call(student, {**lookahead, **buffer_copies(student)}, (meta_input,))
    return tau_grads(meta_loss_fn(meta_logits, meta_target), taus)
