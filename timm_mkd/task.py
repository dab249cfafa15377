"""MKDTask: timm's logit distillation with learned teacher and student temperatures."""
import contextlib
import logging
import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.data.loader import adapt_to_chs
from timm.task import DistillationTeacher, LogitDistillationTask, TrainingTask
from timm.utils import unwrap_model

from .compat import check_timm_version
from .config import MKDConfig
from .meta.estimators import LossTerms, build_estimator
from .loss import two_temperature_kd_loss
from .meta.meta_controller import TRAIN_STREAM, MetaController, check_synchronized
from .meta.meta_parts import TrainBatch, capture_rng_state, replay_rng
from .teacher import build_teacher
from .meta.temperature import Temperatures

check_timm_version(timm.__version__)
_logger = logging.getLogger(__name__)


def _controller_attribute(name: str, doc: str, settable: bool = False) -> property:
    """A property of ``MKDTask`` that reads (and writes) ``self.meta.<name>``."""
    def fset(self, value):
        setattr(self.meta, name, value)
    return property(lambda self: getattr(self.meta, name), fset if settable else None, doc=doc)


class _MetaStepAPI:
    """``MKDTask``'s meta-step methods and counters, which hand over to ``self.meta`` (the ``MetaController``), and the
    task's forwards on meta batches that the controller calls back."""

    def attach(self, optimizer: torch.optim.Optimizer, meta_batches: Union[Iterable, str, None] = TRAIN_STREAM) -> 'MKDTask':
        """Bind the meta step to the student optimizer (``MetaController.attach``).

        Args:
            optimizer: the optimizer that updates the student.
            meta_batches: iterable of ``(input, target)`` meta batches, re-iterated when exhausted;
                ``'train'`` (or ``None``) uses the current training batch (no held-out data).

        Returns:
            self
        """
        self.meta.attach(optimizer, meta_batches)
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (the task then behaves as fixed-temperature KD)."""
        self.meta.detach()

    def add_meta_callback(self, fn: Callable[[dict], None]) -> None:
        """Call ``fn(record)`` after every meta step (applied or skipped), on every rank."""
        self.meta.callbacks.append(fn)

    def meta_step(self) -> Dict[str, float]:
        """One meta update of the temperatures (normally called by the optimizer hook); returns its record."""
        return self.meta.meta_step()

    def temperatures(self) -> Tuple[float, float]:
        """Current ``(tau_t, tau_s)`` as Python floats."""
        return self.tau.values()

    def meta_summary(self) -> Dict[str, float]:
        """Temperatures and the mean meta loss since the last call (for per-epoch summaries)."""
        return self.meta.summary()

    def check_synchronized(self) -> None:
        """Raise ``RuntimeError`` if the ranks of a distributed run hold different temperatures."""
        check_synchronized(self.tau)

    def _meta_teacher_logits(self, meta_input: torch.Tensor) -> torch.Tensor:
        # In the training step's precision (train.py's AMP autocast); the calibration maths upcasts to float32.
        autocast = self.meta_autocast() if self.meta_autocast is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            return self._teacher_logits(meta_input)

    def _meta_student_probs(self, meta_input: torch.Tensor) -> torch.Tensor:
        """The student's predicted probabilities on a meta batch: eval mode (running BN statistics, no dropout), no
        graph, the training precision; the student's mode and the RNG stream are restored."""
        student = unwrap_model(self.trainable_module)
        was_training = student.training
        autocast = self.meta_autocast() if self.meta_autocast is not None else contextlib.nullcontext()
        try:
            student.eval()
            with replay_rng(None, meta_input.device), torch.no_grad(), autocast:
                logits = student(meta_input)
        finally:
            student.train(was_training)
        return torch.softmax(logits.float(), dim=-1)

    updates = _controller_attribute('updates', 'Optimizer updates counted so far.', settable=True)
    meta_steps = _controller_attribute('meta_steps', 'Meta steps run so far (applied or skipped).')
    meta_interval = _controller_attribute('meta_interval', 'Optimizer updates between meta steps.')
    last_record = _controller_attribute('last_record', 'The record of the last meta step.')
    _last_batch = _controller_attribute('last_batch', 'What the last training forward left for the meta step.')
    meta_skipped = property(lambda self: self.meta.skips.skipped, doc='Meta steps skipped (non-finite).')
    meta_optimizer = property(lambda self: self.tau.optimizer, doc='The optimizer of the log-temperatures.')
    tie_temperatures = property(lambda self: self.config.tied, doc='Whether the meta step ties the temperatures.')
    estimator = property(lambda self: self.config.estimator, doc="The built-in estimator's name.")
    kd_scale = property(lambda self: self.config.kd_scale, doc="The KD loss's temperature scale (``config.kd_scale``).")


class MKDTask(_MetaStepAPI, LogitDistillationTask):
    """Meta Knowledge Distillation task (Liu et al., 2022, arXiv 2202.07940).

    timm's ``LogitDistillationTask`` (its ``prepare_distributed`` and ``compile`` are inherited as they
    are) whose one fixed temperature becomes two learnable meta-parameters, a teacher temperature
    ``tau_t`` and a student temperature ``tau_s`` (``timm_mkd.meta.temperature.Temperatures``). Every
    ``meta_interval`` optimizer updates a meta step, run by ``timm_mkd.meta.meta_controller.MetaController``
    inside hooks on the student optimizer, moves them; any loop that drives timm tasks (train.py
    included) only needs ``task.attach(optimizer, meta_batches)``.

    Loss: ``task_loss_weight * criterion(z_s, target) + distill_loss_weight * KD(z_s, z_t; tau_t, tau_s)``
    with ``KD`` from ``timm_mkd.loss.two_temperature_kd_loss``. The weighting modes are timm's:
    both weights given -> independent; only ``task_loss_weight`` -> complementary; neither -> 1 and 1.

    Args:
        student_model: student model to train.
        teacher_model: timm model name, ``nn.Module`` or ``DistillationTeacher``.
        criterion: task loss (default ``CrossEntropyLoss``); receives the (possibly mixup) targets.
        teacher_pretrained_path: local teacher weights (``.safetensors``, ``.pth``, ``.pth.tar``) for a named
            teacher; without it a named teacher loads timm's hub weights.
        distill_loss_weight: weight of the KD term.
        task_loss_weight: weight of the task term.
        device: device for task tensors/buffers.
        dtype: dtype for task tensors/buffers (temperatures are always float32).
        verbose: log set-up and periodic meta-step lines.
        config: the MKD options (``timm_mkd.config.MKDConfig``); the keyword arguments named like its fields
            (``tau_t=4.0``, ``estimator='lookahead'``, ...) that differ from ``MKDConfig``'s defaults override it.
        student_mean: normalisation mean the student's loader applies (default: the student's pretrained_cfg).
        student_std: normalisation std the student's loader applies.
        meta_autocast: optional callable returning an autocast context for the meta-batch forward/backward.
            The look-ahead estimator's two finite-difference forwards run in the precision ``config.fd_precision``
            picks (default ``'auto'``: this autocast when it is float16, float32 otherwise).
        hypergradient: an estimator object (``timm_mkd.meta.estimators``) instead of the one ``config.estimator`` names.
        tau_t, tau_s, tau_min, tau_max, learn_tau_t, learn_tau_s, tie_temperatures, meta_interval, meta_lr,
        meta_optimizer, fd_eps, fd_precision, kd_scale, estimator, warm_start_batches: the ``MKDConfig`` fields,
            with its defaults (see its docstring for what each one means).
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            criterion: Optional[nn.Module] = None,
            teacher_pretrained_path: Optional[str] = None,
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            *,
            config: Optional[MKDConfig] = None,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            meta_autocast: Optional[Callable] = None,
            hypergradient=None,
            tau_t: float = MKDConfig.tau_t,
            tau_s: Optional[float] = MKDConfig.tau_s,
            tau_min: float = MKDConfig.tau_min,
            tau_max: float = MKDConfig.tau_max,
            learn_tau_t: bool = MKDConfig.learn_tau_t,
            learn_tau_s: bool = MKDConfig.learn_tau_s,
            tie_temperatures: bool = MKDConfig.tie_temperatures,
            meta_interval: int = MKDConfig.meta_interval,
            meta_lr: float = MKDConfig.meta_lr,
            meta_optimizer: str = MKDConfig.meta_optimizer,
            fd_eps: float = MKDConfig.fd_eps,
            fd_precision: str = MKDConfig.fd_precision,
            kd_scale: str = MKDConfig.kd_scale,
            estimator: str = MKDConfig.estimator,
            warm_start_batches: int = MKDConfig.warm_start_batches,
    ):
        options = {name: value for name, value in locals().items() if name in MKDConfig.field_names()}
        # timm's LogitDistillationTask.__init__ builds its own teacher and loss; only TrainingTask's is ours.
        TrainingTask.__init__(self, device=device, dtype=dtype, verbose=verbose)
        self.config = config = _task_config(config, options)
        student = unwrap_model(student_model)
        in_chans = getattr(student, 'in_chans', 3)
        cfg = getattr(student, 'pretrained_cfg', {}) or {}
        mean = adapt_to_chs(tuple(student_mean if student_mean is not None else cfg.get('mean', (0.485, 0.456, 0.406))), in_chans)
        std = adapt_to_chs(tuple(student_std if student_std is not None else cfg.get('std', (0.229, 0.224, 0.225))), in_chans)
        self.register_buffer('student_mean', torch.tensor(mean, device=self.device, dtype=self.dtype).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('student_std', torch.tensor(std, device=self.device, dtype=self.dtype).view(1, -1, 1, 1), persistent=False)

        self.teacher = build_teacher(
            teacher_model, student_model, checkpoint_path=teacher_pretrained_path,
            device=self.device, dtype=self.dtype, student_mean=mean, student_std=std)
        self.trainable_module = student_model
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.task_loss_weight, self.distill_loss_weight = _resolve_loss_weights(task_loss_weight, distill_loss_weight)
        self.meta_autocast = meta_autocast
        self.tau = Temperatures(config, device=self.device)
        owner = weakref.ref(self)  # no task <-> controller cycle: a finished run frees the task (and DDP) at once
        self.meta = MetaController(
            self.tau, hypergradient or build_estimator(config), config.meta_interval,
            student=lambda: unwrap_model(owner().trainable_module), loss_terms=lambda: owner().loss_terms(),
            teacher_logits=lambda x: owner()._meta_teacher_logits(x), device=self.device, verbose=self.verbose,
            student_probs=lambda x: owner()._meta_student_probs(x))
        if self.verbose:
            _logger.info(
                f"MKDTask: tau_t={config.tau_t}, tau_s={config.tau_s} in [{config.tau_min}, {config.tau_max}], "
                f"meta_interval={config.meta_interval}, meta_lr={config.meta_lr} ({config.meta_optimizer}), "
                f"learned: {config.learned_description}, {config.estimator} estimator, "
                f"task_weight={self.task_loss_weight}, "
                f"distill_weight={self.distill_loss_weight}")

    # ------------------------------------------------------------------ timm task API
    def no_sync(self):
        """Context in which backward skips DDP's gradient all-reduce (gradient-accumulation micro-batches).

        The meta step runs inside ``optimizer.step()``, after the synchronised backward, so it never sees
        unsynchronised gradients. timm >= 1.0.29's ``TrainingTask`` has the same method; this keeps it on older timm.

        Returns:
            The DDP student's ``no_sync()`` context, or a no-op context when the student is not wrapped.
        """
        module = self.trainable_module
        return module.no_sync() if hasattr(module, 'no_sync') else contextlib.nullcontext()

    def train(self, mode: bool = True) -> 'MKDTask':
        """Set train/eval mode on the task; the teacher stays in eval mode (BN stats, no dropout)."""
        TrainingTask.train(self, mode)
        self.teacher.eval()
        return self

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict:
        """Temperatures, meta-optimizer state, step counters and meta-loader position (nothing for the EMA model).

        Only tensors, numbers and dicts, so timm's ``weights_only=True`` resume can read it.
        """
        if ema:
            return {}
        return {'mkd': {'version': 1, **self.tau.state(), **self.meta.state()}}

    def load_task_state(self, state: Optional[Dict], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        """Restore what ``get_task_state`` saved; a checkpoint without task state keeps the initial values."""
        if ema or not state:
            return
        mkd = state.get('mkd')
        if mkd is None:
            if strict:
                raise RuntimeError(
                    f"checkpoint task_state holds {sorted(state)} but no 'mkd' entry: it was written by another task. "
                    f"Fix: resume an MKD checkpoint, or load the weights only (--initial-checkpoint).")
            return
        self.tau.load_state(mkd)
        self.meta.load_state(mkd)

    # ------------------------------------------------------------------ training step
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward pass with two-temperature logit distillation.

        Args:
            input: input batch ``[B, C, H, W]``, normalised for the student.
            target: targets for the criterion (class indices or mixup soft targets).

        Returns:
            Dict with ``loss``, ``output`` (student logits), ``task_loss``, ``kd_loss``, ``tau_t``, ``tau_s``.
        """
        remember = self.trainable_module.training and torch.is_grad_enabled()
        if remember:
            self.meta.warm_start_before_training()  # once, before anything trains at the initial temperature
        # Only a look-ahead meta step after this update replays the forward's random masks.
        rng_state = capture_rng_state(input.device) if remember and self.meta.lookahead_due else None
        student_logits = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)

        with torch.no_grad():
            teacher_logits = self._teacher_logits(input.detach())
            tau_t, tau_s = self.tau()  # meta-parameters: the training loss must not move them

        kd_loss = two_temperature_kd_loss(student_logits, teacher_logits, tau_t, tau_s, self.kd_scale)
        total_loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        if remember:
            self.meta.last_batch = TrainBatch(input.detach(), target, teacher_logits.detach(), rng_state)
        return {
            'loss': total_loss,
            'output': student_logits,
            'task_loss': task_loss,
            'kd_loss': kd_loss,
            'tau_t': tau_t,
            'tau_s': tau_s,
        }

    def _teacher_logits(self, input: torch.Tensor) -> torch.Tensor:
        input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
        return self.teacher(input_kd.detach(), return_features=False)

    def loss_terms(self) -> LossTerms:
        """The training loss's terms, as the look-ahead estimator differentiates them."""
        return LossTerms(self.criterion, self.task_loss_weight, self.distill_loss_weight, self.kd_scale)


def _resolve_loss_weights(task_loss_weight: Optional[float], distill_loss_weight: Optional[float]) -> Tuple[float, float]:
    """timm's three weighting modes: independent, complementary, or both 1."""
    if distill_loss_weight is not None:
        return (task_loss_weight if task_loss_weight is not None else 1.0), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0


def _task_config(config: Optional[MKDConfig], options: Dict[str, Any]) -> MKDConfig:
    """``MKDConfig(**options)``, or with ``config`` given, ``config`` with the options that differ from the defaults
    (a value of another type counts as different: ``meta_interval=10.0`` overrides)."""
    if config is None:
        return MKDConfig(**options)
    defaults = MKDConfig.defaults()
    changed = {name: value for name, value in options.items()
               if type(value) is not type(defaults[name]) or value != defaults[name]}
    return config.replace(**changed) if changed else config
