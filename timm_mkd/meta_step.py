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
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .loss import _is_soft, kd_logit_grad_norm, meta_loss_fn, two_temperature_kd_loss


@dataclass
class TrainBatch:
    """What the last training forward leaves for the meta step.

    Attributes:
        input: the student's input batch (detached).
        target: the training target (hard or mixup-soft), used only by the training-stream meta source.
        teacher_logits: teacher logits on ``input`` (detached), reused instead of a second teacher forward.
        rng_state: RNG state right before the student forward, so the perturbed forwards draw the
            training forward's dropout / drop-path masks.
    """
    input: torch.Tensor
    target: torch.Tensor
    teacher_logits: torch.Tensor
    rng_state: Tuple


def capture_rng_state(device: torch.device) -> Tuple:
    """CPU RNG state plus the accelerator's, enough to replay a forward's random masks."""
    cpu = torch.get_rng_state()
    accel = None
    if device.type == 'cuda':
        accel = torch.cuda.get_rng_state(device)
    return cpu, accel


@contextlib.contextmanager
def replay_rng(rng_state: Optional[Tuple], device: torch.device):
    """Run a block on a forked RNG (seeded from ``rng_state`` when given); the caller's stream is untouched."""
    devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else 'cuda'):
        if rng_state is not None:
            cpu, accel = rng_state
            torch.set_rng_state(cpu)
            if accel is not None:
                torch.cuda.set_rng_state(accel, device)
        yield


def lookahead_jacobian(optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict) -> torch.Tensor:
    """Diagonal of ``-d theta' / d g`` for one parameter, read from the optimizer *after* its step.

    Adam-family (state has ``exp_avg_sq``): ``lr * (1 - beta1) / (1 - beta1^t) / (sqrt(v_t / (1 - beta2^t)) + eps)``,
    the preconditioner treated as constant in g (as in DARTS and most look-ahead methods).
    SGD: ``lr`` (``lr * (1 + momentum)`` with Nesterov). Any other optimizer: ``lr``, the plain SGD look-ahead.

    Args:
        optimizer: the student optimizer, after ``step()``.
        param: one of its parameters.
        group: the param group holding ``param``.

    Returns:
        A scalar tensor or a tensor shaped like ``param``.
    """
    lr = float(group['lr'])
    state = optimizer.state.get(param, {})
    if 'exp_avg_sq' in state and 'betas' in group and 'step' in state:
        beta1, beta2 = group['betas'][:2]
        t = float(state['step'])
        eps = group.get('eps', 1e-8)
        bc1 = 1.0 - beta1 ** t
        bc2 = 1.0 - beta2 ** t
        denom = (state['exp_avg_sq'] / bc2).sqrt().add_(eps)
        return (lr * (1.0 - beta1) / bc1) / denom
    if group.get('nesterov', False):
        return torch.tensor(lr * (1.0 + group.get('momentum', 0.0)), device=param.device)
    return torch.tensor(lr, device=param.device)


def optimizer_params(module: nn.Module, optimizer: torch.optim.Optimizer):
    """(name, param, group) for every student parameter the optimizer updates."""
    by_id = {id(p): (n, p) for n, p in module.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group['params']:
            if id(p) in by_id and p.requires_grad:
                out.append((by_id[id(p)][0], p, group))
    return out


def _buffer_copies(module: nn.Module) -> Dict[str, torch.Tensor]:
    # Train-mode BatchNorm updates running stats in place; feeding copies keeps the real ones untouched.
    return {n: b.clone() for n, b in module.named_buffers()}


HYPERGRAD_MODES = ('shape', 'full')
ESTIMATORS = ('lookahead', 'neumann', 'calibration')


def _tau_grads(loss: torch.Tensor, taus) -> torch.Tensor:
    """``[2]`` gradient of ``loss`` w.r.t. the two log-temperatures; zero for one the loss does not use."""
    grads = torch.autograd.grad(loss, list(taus), allow_unused=True)
    return torch.stack([g if g is not None else torch.zeros_like(t) for g, t in zip(grads, taus)])


def _student_logits(student: nn.Module, params: Dict[str, torch.Tensor], batch: TrainBatch) -> torch.Tensor:
    """The training forward's logits at ``params``: same RNG (dropout masks), copied buffers, float32, no graph."""
    device = batch.input.device
    with replay_rng(batch.rng_state, device), torch.no_grad(), torch.autocast(device.type, enabled=False):
        return functional_call(student, {**params, **_buffer_copies(student)}, (batch.input,))


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
        return _tau_grads(diff, taus)


@dataclass
class HyperGradient:
    """Result of one hypergradient evaluation.

    Attributes:
        grad: ``[2]`` tensor, d L_meta / d (log tau_t, log tau_s).
        meta_loss: meta loss at the look-ahead parameters (float).
        epsilon: finite-difference step actually used along ``w`` (0 when ``w`` vanished).
    """
    grad: torch.Tensor
    meta_loss: float
    epsilon: float


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
        meta_loss: ``'ce'`` (default) or ``'calibrated'``; see ``timm_mkd.loss.meta_loss_fn``.

    Returns:
        ``HyperGradient``.
    """
    named, v, meta_loss_value = _meta_gradient(student, optimizer, theta, meta_input, meta_target, meta_autocast, meta_loss)
    w = [lookahead_jacobian(optimizer, p, group).to(w_i.dtype) * w_i for (_, p, group), w_i in zip(named, v)]
    return _directional_hypergradient(student, named, theta, w, batch, log_taus, kd_weight, fd_eps, kd_scale, mode,
                                      meta_loss_value)


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
            meta_logits = functional_call(student, _buffer_copies(student), (meta_input,))
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
                               meta_loss_value) -> HyperGradient:
    """``-grad_tau [w . g(theta, tau)]`` by a central finite difference of two forwards at ``theta +- e w``."""
    names = [n for n, _, _ in named]
    device = batch.input.device
    w_norm = _norm(w)
    if not torch.isfinite(w_norm) or w_norm == 0:
        grad = torch.full((2,), float('nan') if not torch.isfinite(w_norm) else 0.0, device=device)
        return HyperGradient(grad=grad, meta_loss=float(meta_loss_value), epsilon=0.0)
    eps = fd_eps / float(w_norm)
    logits_plus = _student_logits(student, _shifted(theta, names, w, eps), batch)
    logits_minus = _student_logits(student, _shifted(theta, names, w, -eps), batch)
    grad = -_kd_tau_grad(logits_plus, logits_minus, batch, log_taus, kd_weight, kd_scale, mode) / (2.0 * eps)
    return HyperGradient(grad=grad, meta_loss=float(meta_loss_value), epsilon=eps)


def _train_gradient(student, params, batch, criterion, task_weight, log_taus, kd_weight, kd_scale):
    """``grad_theta L_train`` at ``params`` on the training batch (training forward's RNG, copied buffers)."""
    with replay_rng(batch.rng_state, batch.input.device), torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        logits = functional_call(student, {**leaves, **_buffer_copies(student)}, (batch.input,))
        tau_t, tau_s = (lt.detach().exp() for lt in log_taus)
        loss = task_weight * criterion(logits, batch.target) + kd_weight * two_temperature_kd_loss(
            logits, batch.teacher_logits, tau_t, tau_s, kd_scale)
        return torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)


def neumann_hypergradient(
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        theta: Dict[str, torch.Tensor],
        batch: TrainBatch,
        meta_input: torch.Tensor,
        meta_target: torch.Tensor,
        log_taus: Tuple[torch.Tensor, torch.Tensor],
        kd_weight: float,
        criterion: Callable,
        task_weight: float,
        terms: int = 5,
        scale: float = 1.0,
        fd_eps: float = 1e-2,
        hvp_eps: float = 1e-2,
        meta_autocast: Optional[Callable] = None,
        kd_scale: str = 'student',
        mode: str = 'full',
        meta_loss: str = 'ce',
) -> HyperGradient:
    """Implicit-function hypergradient with a ``terms``-term Neumann series (Lorraine et al. 2020).

    ``d L_meta / d tau = -v^T H^{-1} B`` with ``H^{-1} ~ s P sum_{k=0..K} (I - s H P)^k``, ``P`` the
    optimizer's diagonal look-ahead Jacobian: ``w_0 = s P v``, ``w_{k+1} = w_k - s P H w_k``, then the
    same finite difference as the one-step estimator along ``sum_k w_k``. Each ``H w`` is a central
    finite difference of two training-batch gradients (no double backward). ``terms=0, scale=1`` is
    the one-step estimator exactly. Parameters: as ``finite_difference_hypergradient``, plus the
    training ``criterion`` and ``task_weight`` (the Hessian is that of the whole training loss).
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
    return _directional_hypergradient(student, named, theta, total, batch, log_taus, kd_weight, fd_eps, kd_scale,
                                      mode, meta_loss_value)


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
        logits = functional_call(student, {**params, **_buffer_copies(student)}, (batch.input,))
    train_loss = task_weight * criterion(logits, batch.target) + kd_term(
        logits, batch.teacher_logits, taus, kd_weight, kd_scale, mode, logits.detach())
    g = torch.autograd.grad(train_loss, list(params.values()), create_graph=True)
    lookahead = {}
    for (n, p, group), g_i in zip(named, g):
        jac = lookahead_jacobian(optimizer, p, group)
        lookahead[n] = p.detach() - jac * (g_i - g_i.detach())
    with replay_rng(None, batch.input.device):
        meta_logits = functional_call(student, {**lookahead, **_buffer_copies(student)}, (meta_input,))
    return _tau_grads(meta_loss_fn(meta_logits, meta_target, meta_loss), taus)

