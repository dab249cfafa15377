"""Hypergradient estimators: what the meta step follows, behind one small interface.

An estimator is any object with

- ``needs_lookahead`` (bool): whether it differentiates through the optimizer's look-ahead, so the
  controller must snapshot the parameters before the update and the task must keep the training
  forward's RNG state;
- ``warm_start_batches`` (int): meta batches ``solve`` wants for the first meta step (0: none);
- ``__call__(inputs: MetaInputs) -> HyperGradient``: d meta objective / d (log tau_t, log tau_s);
- ``solve(teacher_logits, targets, tau_min, tau_max) -> HyperGradient`` (only if ``warm_start_batches``):
  the log-temperature to jump to, carried in ``grad[0]``;
- ``needs_student`` (bool, optional): the estimator reads the student's predictions on meta batches
  (``MetaInputs.student_probs``), and ``solve`` also takes them as ``student_probs=`` with ``loss=`` (the
  training loss's ``LossTerms``).

``build_estimator(config)`` returns the built-in one that ``MKDConfig.estimator`` names;
``MKDTask(hypergradient=...)`` takes any other object with this interface, so a new estimator
needs no change to the task or the meta controller.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .calibration import calibrated_log_temperature, calibration_hypergradient
from .mixture import mixture_hypergradient, mixture_log_temperature
from ..config import MKDConfig
from .meta_parts import HyperGradient, TrainBatch
from .meta_step import finite_difference_hypergradient

__all__ = ['LossTerms', 'MetaInputs', 'Estimator', 'LookaheadEstimator', 'CalibrationEstimator', 'MixtureEstimator',
           'ESTIMATOR_TYPES', 'build_estimator', 'fd_autocast']


@dataclass(frozen=True)
class LossTerms:
    """The training loss the look-ahead differentiates: ``task_weight * criterion + kd_weight * KD(kd_scale)``."""
    criterion: Callable
    task_weight: float
    kd_weight: float
    kd_scale: str


@dataclass
class MetaInputs:
    """Everything one hypergradient evaluation may read.

    Attributes:
        student: the unwrapped student, after the optimizer step (parameters ``theta'``).
        optimizer: the student optimizer, right after its step.
        theta: parameters before the step, by name (None when no estimator needs them).
        batch: the training batch of that step.
        meta_input: meta batch input.
        meta_target: meta batch target.
        log_taus: ``(log tau_t, log tau_s)``.
        loss: the training loss's terms.
        teacher_logits: ``fn(meta_input)``: the teacher's logits on a meta batch.
        meta_autocast: optional autocast context factory for meta-batch forwards.
        student_probs: ``fn(meta_input)``: the student's predicted probabilities on a meta batch (eval mode, no
            graph, nothing in the student or the RNG stream changed); None when the caller has none.
    """
    student: nn.Module
    optimizer: torch.optim.Optimizer
    theta: Optional[Dict[str, torch.Tensor]]
    batch: TrainBatch
    meta_input: torch.Tensor
    meta_target: torch.Tensor
    log_taus: Tuple[torch.Tensor, torch.Tensor]
    loss: LossTerms
    teacher_logits: Callable[[torch.Tensor], torch.Tensor]
    meta_autocast: Optional[Callable] = None
    student_probs: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class Estimator:
    """Base of the built-in estimators (see the module docstring for the interface)."""
    needs_lookahead = True
    needs_student = False
    warm_start_batches = 0

    def __call__(self, inputs: MetaInputs) -> HyperGradient:
        raise NotImplementedError

    def solve(self, teacher_logits: torch.Tensor, targets: torch.Tensor, tau_min: float,
              tau_max: float) -> HyperGradient:
        raise NotImplementedError(f'{type(self).__name__} has no warm start')


class LookaheadEstimator(Estimator):
    """The student's calibrated meta loss after a one-step look-ahead (``finite_difference_hypergradient``).

    Args:
        config: ``fd_eps`` and ``fd_precision`` are read.
    """

    def __init__(self, config: MKDConfig):
        self.fd_eps = config.fd_eps
        self.fd_precision = config.fd_precision

    def __call__(self, inputs: MetaInputs) -> HyperGradient:
        i = inputs
        return finite_difference_hypergradient(
            i.student, i.optimizer, i.theta, i.batch, i.meta_input, i.meta_target, i.log_taus, i.loss.kd_weight,
            fd_eps=self.fd_eps, meta_autocast=i.meta_autocast, kd_scale=i.loss.kd_scale,
            fd_autocast=fd_autocast(self.fd_precision, i.meta_autocast, i.batch.input.device))


class CalibrationEstimator(Estimator):
    """The teacher's held-out NLL at its temperature (``calibration_hypergradient``), with a warm start.

    Hard meta labels are used as they are; soft ``[B, C]`` meta targets (the training stream under mixup) as
    probabilities.

    Args:
        config: ``warm_start_batches`` is read.
    """
    needs_lookahead = False

    def __init__(self, config: MKDConfig):
        self.warm_start_batches = config.warm_start_batches

    def __call__(self, inputs: MetaInputs) -> HyperGradient:
        logits = inputs.teacher_logits(inputs.meta_input)
        return calibration_hypergradient(logits, inputs.meta_target, inputs.log_taus)

    def solve(self, teacher_logits: torch.Tensor, targets: torch.Tensor, tau_min: float,
              tau_max: float) -> HyperGradient:
        """The exact minimiser of the teacher's NLL on the given meta batches.

        Returns:
            ``HyperGradient`` whose ``grad[0]`` is ``log tau*`` and whose ``meta_loss`` is the NLL there.
        """
        log_tau = calibrated_log_temperature(teacher_logits, targets, tau_min, tau_max).to(teacher_logits.device)
        nll = calibration_hypergradient(teacher_logits, targets, (log_tau, log_tau)).meta_loss
        return HyperGradient(grad=torch.stack([log_tau, torch.zeros_like(log_tau)]), meta_loss=nll, epsilon=0.0)


class MixtureEstimator(CalibrationEstimator):
    """The held-out NLL of the student's effective target ``alpha q + (1 - alpha) p_t(tau_t)`` (``timm_mkd.meta.mixture``).

    ``alpha = task_weight / (task_weight + kd_weight)`` is the label's share of the training loss and ``q`` the
    student's prediction on the meta batch, so the temperature follows the student as well as the teacher; with
    no task term it is ``CalibrationEstimator``. Exact for the student at temperature 1; tied (the default) it picks
    the shared temperature.

    Args:
        config: ``warm_start_batches`` is read.
    """
    needs_student = True

    @staticmethod
    def alpha(loss: LossTerms) -> float:
        total = loss.task_weight + loss.kd_weight
        return loss.task_weight / total if total > 0 else 0.0

    def __call__(self, inputs: MetaInputs) -> HyperGradient:
        if inputs.student_probs is None:
            raise RuntimeError("the 'mixture' estimator needs the student's predictions on the meta batch "
                               "(MetaInputs.student_probs); use it through MKDTask.")
        logits = inputs.teacher_logits(inputs.meta_input)
        return mixture_hypergradient(logits, inputs.student_probs(inputs.meta_input),
                                     inputs.meta_target, inputs.log_taus, self.alpha(inputs.loss))

    def solve(self, teacher_logits: torch.Tensor, targets: torch.Tensor, tau_min: float, tau_max: float, *,
              student_probs: torch.Tensor, loss: LossTerms) -> HyperGradient:
        """The exact minimiser on the given meta batches, for the student's predicted probabilities there.

        Returns:
            ``HyperGradient`` whose ``grad[0]`` is ``log tau*`` and whose ``meta_loss`` is the NLL there.
        """
        alpha = self.alpha(loss)
        log_tau = mixture_log_temperature(teacher_logits, student_probs, targets, alpha, tau_min, tau_max)
        log_tau = log_tau.to(teacher_logits.device)
        nll = mixture_hypergradient(teacher_logits, student_probs, targets, (log_tau, log_tau), alpha).meta_loss
        return HyperGradient(grad=torch.stack([log_tau, torch.zeros_like(log_tau)]), meta_loss=nll, epsilon=0.0)


def fd_autocast(precision: str, meta_autocast: Optional[Callable], device: torch.device) -> Optional[Callable]:
    """The autocast factory for the finite-difference forwards, or None for float32 (see ``MKDConfig.fd_precision``)."""
    if meta_autocast is None or precision == 'float32':
        return None
    if precision == 'autocast':
        return meta_autocast
    with meta_autocast():
        low = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    return meta_autocast if low else None


ESTIMATOR_TYPES = {'lookahead': LookaheadEstimator, 'calibration': CalibrationEstimator, 'mixture': MixtureEstimator}


def build_estimator(config: MKDConfig) -> Estimator:
    """The built-in estimator ``config.estimator`` names."""
    return ESTIMATOR_TYPES[config.estimator](config)
