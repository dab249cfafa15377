"""What every MKD hypergradient shares: the training batch it reuses, its result, RNG replay, the look-ahead Jacobian.

``TrainBatch`` is what the task's training forward leaves for the meta step; ``HyperGradient`` is
what an estimator returns. ``replay_rng`` and ``buffer_copies`` keep a meta step from moving the
training RNG stream or BatchNorm's running statistics; ``lookahead_jacobian`` reads the diagonal
``-d theta' / d g`` of the real optimizer step from the optimizer's state.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn


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


def buffer_copies(module: nn.Module) -> Dict[str, torch.Tensor]:
    # Train-mode BatchNorm updates running stats in place; feeding copies keeps the real ones untouched.
    return {n: b.clone() for n, b in module.named_buffers()}


def tau_grads(loss: torch.Tensor, taus) -> torch.Tensor:
    """``[2]`` gradient of ``loss`` w.r.t. the two log-temperatures; zero for one the loss does not use."""
    grads = torch.autograd.grad(loss, list(taus), allow_unused=True)
    return torch.stack([g if g is not None else torch.zeros_like(t) for g, t in zip(grads, taus)])


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
