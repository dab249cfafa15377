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
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call

from .calibration import calibrated_log_temperature, calibration_hypergradient  # noqa: F401 (re-exported)
from .config import ESTIMATORS, HYPERGRAD_MODES  # noqa: F401 (re-exported)
from .loss import kd_logit_grad_norm, meta_loss_fn, two_temperature_kd_loss
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


def fd_subset(batch: TrainBatch, rows: int) -> TrainBatch:
    """The first ``rows`` samples of ``batch`` for the finite-difference forwards (0 or more than the batch: all).

    Both forwards replay ``batch.rng_state`` on the same rows, so they still see identical masks.
    """
    if rows <= 0 or rows >= batch.input.shape[0]:
        return batch
    return TrainBatch(batch.input[:rows], batch.target[:rows], batch.teacher_logits[:rows], batch.rng_state)


def kd_term(
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float,
        kd_scale: str,
        mode: str,
        reference_logits: torch.Tensor,
) -> torch.Tensor:
    """``kd_weight * KD`` as the hypergradient sees it, from log-temperatures ``taus``.

    ``'full'``: the KD loss itself. ``'shape'``: the KD loss divided by its own strength
    ``|dKD/dz_s|`` at ``reference_logits`` (and multiplied by that strength's value, held
    constant). The value, and so the student's training step, is unchanged; only the
    derivative w.r.t. tau differs: the part of it that merely scales the KD push up or down
    is removed. Why: a one-step look-ahead rewards any larger step on the student (short-
    horizon bias), so in ``'full'`` mode the temperatures drift to whatever makes the KD
    gradient biggest (tau_s up, tau_t down) rather than to the target that helps.
    """
    tau_t, tau_s = taus[0].exp(), taus[1].exp()
    kd = kd_weight * two_temperature_kd_loss(logits, teacher_logits, tau_t, tau_s, kd_scale)
    if mode == 'full':
        return kd
    if mode != 'shape':
        raise ValueError(f"unknown hypergradient mode '{mode}'; use one of {HYPERGRAD_MODES}")
    strength = kd_logit_grad_norm(reference_logits, teacher_logits, tau_t, tau_s, kd_scale)
    return kd * (strength.detach() / strength)


def _kd_tau_grad(
        logits_plus: torch.Tensor,
        logits_minus: torch.Tensor,
        batch: TrainBatch,
        log_taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float,
        kd_scale: str,
        mode: str,
) -> torch.Tensor:
    """``grad_tau [KD(theta + e w) - KD(theta - e w)]`` w.r.t. (log tau_t, log tau_s), from the two forwards' logits.

    The ``'shape'`` reference point is the midpoint of the two logits, ``z(theta) + O(e^2)``: the
    same constant on both sides, so the difference carries no derivative of the reference itself.
    """
    dtype = torch.promote_types(logits_plus.dtype, torch.float32)
    reference = 0.5 * (logits_plus.to(dtype) + logits_minus.to(dtype))
    with torch.enable_grad():
        taus = tuple(lt.detach().to(dtype).requires_grad_(True) for lt in log_taus)
        diff = (kd_term(logits_plus, batch.teacher_logits, taus, kd_weight, kd_scale, mode, reference)
                - kd_term(logits_minus, batch.teacher_logits, taus, kd_weight, kd_scale, mode, reference))
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
        mode: str = 'full',
        meta_loss: str = 'ce',
        fd_autocast: Optional[Callable] = None,
        fd_batch_size: int = 0,
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
        meta_target: meta batch target (class indices, or soft ``[B, C]``).
        log_taus: (log tau_t, log tau_s) tensors.
        kd_weight: weight of the KD term in the training loss.
        fd_eps: finite-difference step relative to ``|w|``.
        meta_autocast: optional autocast context factory for the meta-batch forward/backward.
        kd_scale: the KD loss's temperature scale (``two_temperature_kd_loss``).
        mode: ``'full'`` (default) or ``'shape'``; see ``kd_term``.
        meta_loss: ``'ce'`` or ``'calibrated'``; see ``timm_mkd.loss.meta_loss_fn``. This function's default is
            ``'ce'``; ``MKDTask``'s look-ahead estimators pass ``MKDConfig.meta_loss``, ``'calibrated'`` by default.
        fd_autocast: optional autocast context factory for the two finite-difference forwards (float16: see
            ``LOW_PRECISION_FD_EPS``); None (this function's default): they run in float32. ``MKDTask``'s
            estimators pass what ``MKDConfig.fd_precision`` picks (``'auto'``: the training autocast when it is
            float16).
        fd_batch_size: the finite difference uses the first this many training samples (0: the whole batch).

    Returns:
        ``HyperGradient``.
    """
    named, v, meta_loss_value = _meta_gradient(student, optimizer, theta, meta_input, meta_target, meta_autocast, meta_loss)
    w = [lookahead_jacobian(optimizer, p, group).to(w_i.dtype) * w_i for (_, p, group), w_i in zip(named, v)]
    return _directional_hypergradient(student, named, theta, w, fd_subset(batch, fd_batch_size), log_taus, kd_weight,
                                      fd_eps, kd_scale, mode, meta_loss_value, fd_autocast)


def _meta_gradient(student, optimizer, theta, meta_input, meta_target, meta_autocast, meta_loss):
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
        meta_loss_value = meta_loss_fn(meta_logits, meta_target, meta_loss)
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


def _directional_hypergradient(student, named, theta, w, batch, log_taus, kd_weight, fd_eps, kd_scale, mode,
                               meta_loss_value, fd_autocast=None) -> HyperGradient:
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
    grad = -_kd_tau_grad(logits_plus, logits_minus, batch, log_taus, kd_weight, kd_scale, mode) / (2.0 * eps)
    return HyperGradient(grad=grad, meta_loss=float(meta_loss_value), epsilon=eps)


def _train_gradient(student, params, batch, criterion, task_weight, log_taus, kd_weight, kd_scale):
    """``grad_theta L_train`` at ``params`` on the training batch (training forward's RNG, copied buffers)."""
    with replay_rng(batch.rng_state, batch.input.device), torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        logits = functional_call(student, {**leaves, **buffer_copies(student)}, (batch.input,))
        tau_t, tau_s = (lt.detach().exp() for lt in log_taus)
        loss = task_weight * criterion(logits, batch.target) + kd_weight * two_temperature_kd_loss(
            logits, batch.teacher_logits, tau_t, tau_s, kd_scale)
        return torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)


def neumann_hypergradient(
        student: nn.Module, optimizer: torch.optim.Optimizer, theta: Dict[str, torch.Tensor], batch: TrainBatch,
        meta_input: torch.Tensor, meta_target: torch.Tensor, log_taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float, criterion: Callable, task_weight: float, terms: int = 5, scale: float = 1.0,
        fd_eps: float = 1e-2, hvp_eps: float = 1e-2, meta_autocast: Optional[Callable] = None,
        kd_scale: str = 'student', mode: str = 'full', meta_loss: str = 'ce',
        fd_autocast: Optional[Callable] = None, fd_batch_size: int = 0,
) -> HyperGradient:
    """Implicit-function hypergradient with a ``terms``-term Neumann series (Lorraine et al. 2020).

    ``d L_meta / d tau = -v^T H^{-1} B`` with ``H^{-1} ~ s P sum_{k=0..K} (I - s H P)^k``, ``P`` the
    optimizer's diagonal look-ahead Jacobian: ``w_0 = s P v``, ``w_{k+1} = w_k - s P H w_k``, then the
    same finite difference as the one-step estimator along ``sum_k w_k``. Each ``H w`` is a central
    finite difference of two training-batch gradients (no double backward). ``terms=0, scale=1`` is
    the one-step estimator exactly. Parameters: as ``finite_difference_hypergradient``, plus the
    training ``criterion`` and ``task_weight`` (the Hessian is that of the whole training loss, on the whole
    batch; ``fd_autocast`` and ``fd_batch_size`` apply to the final finite difference only). ``meta_loss`` defaults
    to ``'ce'`` here; ``MKDTask`` passes ``MKDConfig.meta_loss`` (``'calibrated'`` by default).
    """
    named, v, meta_loss_value = _meta_gradient(student, optimizer, theta, meta_input, meta_target, meta_autocast,
                                               meta_loss)
    names = [n for n, _, _ in named]
    jac = [lookahead_jacobian(optimizer, p, group).to(v_i.dtype) for (_, p, group), v_i in zip(named, v)]
    w = [scale * j * v_i for j, v_i in zip(jac, v)]
    total = [w_i.clone() for w_i in w]
    current = {n: p.detach() for n, p, _ in named}
    for _ in range(int(terms)):
        norm = float(_norm(w))
        if not math.isfinite(norm) or norm == 0:
            break
        e = hvp_eps / norm
        sides = [_train_gradient(student, _shifted(current, names, w, step), batch, criterion, task_weight, log_taus,
                                 kd_weight, kd_scale) for step in (e, -e)]
        hw = [(gp - gm).to(w_i.dtype) / (2 * e) if gp is not None else torch.zeros_like(w_i)
              for gp, gm, w_i in zip(sides[0], sides[1], w)]
        w = [w_i - scale * j * h for w_i, j, h in zip(w, jac, hw)]
        total = [t + w_i for t, w_i in zip(total, w)]
    return _directional_hypergradient(student, named, theta, total, fd_subset(batch, fd_batch_size), log_taus,
                                      kd_weight, fd_eps, kd_scale, mode, meta_loss_value, fd_autocast)


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
        mode: str = 'full',
        meta_loss: str = 'ce',
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
        logits, batch.teacher_logits, taus, kd_weight, kd_scale, mode, logits.detach())
    g = torch.autograd.grad(train_loss, list(params.values()), create_graph=True)
    lookahead = {}
    for (n, p, group), g_i in zip(named, g):
        jac = lookahead_jacobian(optimizer, p, group)
        lookahead[n] = p.detach() - jac * (g_i - g_i.detach())
    with replay_rng(None, batch.input.device):
        meta_logits = functional_call(student, {**lookahead, **buffer_copies(student)}, (meta_input,))
    return tau_grads(meta_loss_fn(meta_logits, meta_target, meta_loss), taus)
