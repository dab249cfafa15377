"""MKDTask: timm's logit distillation with learned teacher and student temperatures."""
import contextlib
import logging
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data.loader import adapt_to_chs
from timm.task import DistillationTeacher, TrainingTask
from timm.utils import unwrap_model

from .loss import KD_SCALES, META_LOSSES, two_temperature_kd_loss
from .meta_step import (ESTIMATORS, HYPERGRAD_MODES, HyperGradient, TrainBatch, calibrated_log_temperature,
                        calibration_hypergradient, capture_rng_state,
                        finite_difference_hypergradient, neumann_hypergradient, optimizer_params)
from .teacher import build_teacher
from .temperature import Temperatures

_logger = logging.getLogger(__name__)

TRAIN_STREAM = 'train'
"""Pass as ``meta_batches`` to ``attach`` to score the look-ahead on the training batch itself.

Needs no held-out data, but it is **biased**: the look-ahead has just descended on that very
batch, so the meta loss favours temperatures that help fit it rather than ones that generalise.
With mixup/cutmix its target is the soft ``[B, C]`` matrix, which ``meta_loss_fn`` accepts.
Prefer a held-out fraction (``timm_mkd.meta_data.split_holdout``) or another split.
"""


class MKDTask(TrainingTask):
    """Meta Knowledge Distillation task (Liu et al., 2022, arXiv 2202.07940).

    A sibling of timm's ``LogitDistillationTask``: the same leading arguments and loss weighting,
    but the softmax temperature is two learnable meta-parameters, a teacher temperature
    ``tau_t`` and a student temperature ``tau_s``. Every ``meta_interval`` optimizer updates a
    meta step moves them along the gradient of the student's loss on held-out meta data after
    a one-step look-ahead (see ``timm_mkd.meta_step``). The meta step runs inside hooks on the
    student optimizer, so any loop that drives timm tasks (train.py included) only needs
    ``task.attach(optimizer, meta_batches)``.

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
        tau_t: initial teacher temperature.
        tau_s: initial student temperature.
        tau_min: lower bound of both temperatures.
        tau_max: upper bound of both temperatures.
        learn_tau_t: let the meta step move ``tau_t`` (False: fixed, as timm's task).
        learn_tau_s: let the meta step move ``tau_s``.
        tie_temperatures: ``True`` (default): each meta step moves ``log tau_t`` and ``log tau_s`` by the same
            amount (driven by the sum of their hypergradients), so ``tau_t / tau_s`` keeps its initial value
            and the meta step learns one common temperature. ``False``: each moves on its own. Why tied:
            untied, the one-step meta-gradient drives tau_s above tau_t in every benchmark run (a student
            forced to be sharper than its teacher helps the next step), and such a mismatch costs 4-6 points
            of top-1 later (``benchmarks/results/README.md``). Ignored when one temperature is fixed.
        meta_interval: optimizer updates between meta steps (N >= 1).
        meta_lr: learning rate of the meta optimizer on the log-temperatures.
        meta_optimizer: ``'adam'`` (default; scale-free steps in log-tau) or ``'sgd'``.
        fd_eps: finite-difference step, relative to the norm of the look-ahead direction.
        kd_scale: ``'student'`` (``tau_s^2``, equals timm's ``T^2`` at equal temperatures) or ``'product'``
            (``tau_t * tau_s``); see ``timm_mkd.loss.two_temperature_kd_loss``.
        estimator: what the meta step follows. ``'calibration'`` (default): the teacher's held-out NLL at its
            temperature (``timm_mkd.meta_step.calibration_hypergradient``; one teacher forward per meta step), whose
            single minimum the temperature reaches from above and below. ``'lookahead'``: the student's meta loss
            after a one-step look-ahead (``finite_difference_hypergradient``); exact for the next step, but the
            next step always favours a higher temperature, so it drifts up from any start
            (``benchmarks/horizon.py``); use it with ``meta_interval=20, meta_lr=0.02``. ``'neumann'``: implicit
            differentiation with a ``neumann_terms``-term Neumann series scaled by ``neumann_scale``
            (``neumann_hypergradient``); a longer horizon in principle, the same upward sign measured.
        warm_start_batches: ``'calibration'`` estimator only: the first meta step sets ``tau_t`` to the exact minimiser
            of the teacher's NLL on this many meta batches (``calibrated_log_temperature``; ``tau_s`` moves with it when
            tied), so the run does not spend its first hundreds of updates walking from the initial value; later meta
            steps follow the gradient. 0: start from ``tau_t`` and walk.
        neumann_terms: Hessian-vector products of the ``'neumann'`` estimator (2 training gradients each).
        neumann_scale: step of the Neumann series relative to the optimizer's look-ahead Jacobian.
        hypergrad_mode: ``'full'`` (default): the plain one-step hypergradient, which also rewards a merely
            larger KD push (short-horizon bias); ``'shape'``: the meta step judges a temperature by the
            direction of the KD push it gives the student, with the push's size held fixed. See
            ``timm_mkd.meta_step.kd_term``.
        meta_loss: ``'calibrated'`` (default): cross-entropy on the meta batch at the batch's best single
            logit scale, blind to how confident the student is; ``'ce'``: plain cross-entropy. Why: in the
            benchmarks plain held-out CE is *lower* for fixed tau 4 than for tau 1 (a softer, better-calibrated
            student) while top-1 and the calibrated CE prefer tau 1, so a CE meta step pulls the temperature
            up for calibration's sake. See ``timm_mkd.loss.meta_loss_fn``.
        student_mean: normalisation mean the student's loader applies (default: the student's pretrained_cfg).
        student_std: normalisation std the student's loader applies.
        meta_autocast: optional callable returning an autocast context for the meta-batch forward/backward.
            The finite-difference forwards always run in float32 (their difference is tiny).
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
            tau_t: float = 1.0,
            tau_s: float = 1.0,
            tau_min: float = 0.5,
            tau_max: float = 20.0,
            learn_tau_t: bool = True,
            learn_tau_s: bool = True,
            tie_temperatures: bool = True,
            meta_interval: int = 10,
            meta_lr: float = 0.1,
            meta_optimizer: str = 'adam',
            fd_eps: float = 1e-2,
            kd_scale: str = 'student',
            hypergrad_mode: str = 'full',
            meta_loss: str = 'calibrated',
            estimator: str = 'calibration',
            warm_start_batches: int = 4,
            neumann_terms: int = 5,
            neumann_scale: float = 1.0,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            meta_autocast: Optional[Callable] = None,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if int(meta_interval) != meta_interval or meta_interval < 1:
            raise ValueError(f"meta_interval={meta_interval} must be an integer >= 1 (optimizer updates between meta steps).")
        if not (meta_lr > 0 and math.isfinite(meta_lr)):
            raise ValueError(f"meta_lr={meta_lr} must be a finite positive number.")
        if not (fd_eps > 0 and math.isfinite(fd_eps)):
            raise ValueError(f"fd_eps={fd_eps} must be a finite positive number.")

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

        self.tau = Temperatures(tau_t, tau_s, tau_min, tau_max, learn_tau_t, learn_tau_s, device=self.device)
        # Tying needs two learned temperatures; with one fixed (learn_tau_t or learn_tau_s False) it means nothing.
        self.tie_temperatures = bool(tie_temperatures) and learn_tau_t and learn_tau_s
        self.meta_interval = int(meta_interval)
        self.fd_eps = float(fd_eps)
        self.kd_scale = _choice('kd_scale', kd_scale, KD_SCALES)
        self.hypergrad_mode = _choice('hypergrad_mode', hypergrad_mode, HYPERGRAD_MODES)
        self.meta_loss = _choice('meta_loss', meta_loss, META_LOSSES)
        self.estimator = _choice('estimator', estimator, ESTIMATORS)
        if int(warm_start_batches) != warm_start_batches or warm_start_batches < 0:
            raise ValueError(f"warm_start_batches={warm_start_batches} must be an integer >= 0 (0: no warm start).")
        self.warm_start_batches = int(warm_start_batches)
        self.neumann_terms = int(neumann_terms)
        self.neumann_scale = float(neumann_scale)
        self.meta_autocast = meta_autocast
        self.meta_optimizer = _make_meta_optimizer(meta_optimizer, self.tau.learnable(), meta_lr)

        # Meta-step bookkeeping; the counters travel in task_state so resume keeps the cadence.
        self.updates = 0
        self.meta_steps = 0
        self.meta_skipped = 0
        self._consecutive_skips = 0
        self._optimizer = None
        self._hooks: List = []
        self._meta_source = None
        self._meta_iter = None
        self._pending_meta_data_state = None
        self._last_batch: Optional[TrainBatch] = None
        self._theta: Optional[Dict[str, torch.Tensor]] = None
        self._callbacks: List[Callable[[dict], None]] = []
        self._epoch_meta_losses: List[float] = []
        self.last_record: Dict[str, float] = {}

        if self.verbose:
            _logger.info(
                f"MKDTask: tau_t={tau_t}, tau_s={tau_s} in [{tau_min}, {tau_max}], meta_interval={meta_interval}, "
                f"meta_lr={meta_lr} ({meta_optimizer}), {'tied' if self.tie_temperatures else 'free'} temperatures, "
                f"{hypergrad_mode} hypergradient, {meta_loss} meta loss, task_weight={self.task_loss_weight}, "
                f"distill_weight={self.distill_loss_weight}")

    # ------------------------------------------------------------------ timm task API
    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'MKDTask':
        """Wrap the student in DDP; the frozen teacher and the temperatures stay outside.

        Temperatures are kept identical across ranks by averaging the hypergradient before each
        meta update, not by DDP.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP
        for p in self.teacher.parameters():
            p.requires_grad = False
        if device_ids and all(not isinstance(d, int) and torch.device(d).type == 'cpu' for d in device_ids):
            device_ids = None  # DDP refuses device_ids for CPU modules (gloo); train.py passes [cpu]
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student forward and the teacher's logit forward.

        The meta step runs the *unwrapped* student eagerly through ``torch.func.functional_call``
        (its parameters are swapped), so compilation only speeds up the ordinary training step.
        """
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module
        self.teacher.compile(backend=backend, mode=mode, compile_model=True, compile_features=False, **compile_kwargs)
        return self.trainable_module

    def no_sync(self):
        """Context in which backward skips DDP's gradient all-reduce (gradient-accumulation micro-batches).

        train.py enters it for every micro-batch of an update but the last. The meta step runs inside
        ``optimizer.step()``, after the synchronised backward, so it never sees unsynchronised gradients.
        timm >= 1.0.29's ``TrainingTask`` has the same method; defining it here keeps it on older timm.

        Returns:
            The DDP student's ``no_sync()`` context, or a no-op context when the student is not wrapped.
        """
        module = self.trainable_module
        return module.no_sync() if hasattr(module, 'no_sync') else contextlib.nullcontext()

    def train(self, mode: bool = True) -> 'MKDTask':
        """Set train/eval mode on the task; the teacher stays in eval mode (BN stats, no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict:
        """Temperatures, meta-optimizer state and step counters (nothing for the EMA model).

        Only tensors, numbers and dicts, so timm's ``weights_only=True`` resume can read it.
        """
        if ema:
            return {}
        return {'mkd': {
            'version': 1,
            'log_tau_t': self.tau.log_tau_t.detach().clone(),
            'log_tau_s': self.tau.log_tau_s.detach().clone(),
            'meta_optimizer': self.meta_optimizer.state_dict(),
            'updates': self.updates,
            'meta_steps': self.meta_steps,
            'meta_skipped': self.meta_skipped,
            # Where the meta loader stands (timm_mkd.meta_data.MetaBatches), so resume draws the next batch.
            'meta_data': self._meta_source.state_dict() if hasattr(self._meta_source, 'state_dict') else {},
        }}

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
        with torch.no_grad():
            self.tau.log_tau_t.copy_(mkd['log_tau_t'])
            self.tau.log_tau_s.copy_(mkd['log_tau_s'])
        try:
            self.meta_optimizer.load_state_dict(mkd['meta_optimizer'])
        except ValueError as e:
            raise RuntimeError(
                f"the checkpoint's MKD meta-optimizer state does not fit this run ({e}); were different "
                f"temperatures learnable when it was saved?") from e
        self.updates = int(mkd['updates'])
        self.meta_steps = int(mkd['meta_steps'])
        self.meta_skipped = int(mkd.get('meta_skipped', 0))
        self._pending_meta_data_state = mkd.get('meta_data') or None
        self._restore_meta_data_state()

    def _restore_meta_data_state(self) -> None:
        # train.py resumes after the optimizer (and hence attach) exists, a plain loop may resume before.
        state = self._pending_meta_data_state
        if state and hasattr(self._meta_source, 'load_state_dict'):
            self._meta_source.load_state_dict(state)
            self._meta_iter = None
            self._pending_meta_data_state = None

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
        # Only the look-ahead estimators replay the forward's random masks; the calibration step needs no RNG state.
        rng_state = capture_rng_state(input.device) if remember and self._needs_lookahead else None
        student_logits = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)

        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_logits = self.teacher(input_kd.detach(), return_features=False)
            tau_t, tau_s = self.tau()  # meta-parameters: the training loss must not move them

        kd_loss = two_temperature_kd_loss(student_logits, teacher_logits, tau_t, tau_s, self.kd_scale)
        total_loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        if remember:
            self._last_batch = TrainBatch(input.detach(), target, teacher_logits.detach(), rng_state)
        return {
            'loss': total_loss,
            'output': student_logits,
            'task_loss': task_loss,
            'kd_loss': kd_loss,
            'tau_t': tau_t,
            'tau_s': tau_s,
        }

    # ------------------------------------------------------------------ meta step
    def temperatures(self) -> Tuple[float, float]:
        """Current ``(tau_t, tau_s)`` as Python floats."""
        return self.tau.values()

    def attach(self, optimizer: torch.optim.Optimizer, meta_batches: Union[Iterable, str, None] = TRAIN_STREAM) -> 'MKDTask':
        """Bind the meta step to the student optimizer.

        Registers a step pre-hook (snapshots the parameters before the update that precedes a meta
        step) and a post-hook (counts updates, runs the meta step every ``meta_interval``).

        Args:
            optimizer: the optimizer that updates the student.
            meta_batches: iterable of ``(input, target)`` meta batches, re-iterated when exhausted;
                ``'train'`` (or ``None``) uses the current training batch (no held-out data).

        Returns:
            self
        """
        self.detach()
        self._optimizer = optimizer
        self._meta_source = None if meta_batches in (None, TRAIN_STREAM) else meta_batches
        self._meta_iter = None
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_update),
            optimizer.register_step_post_hook(self._after_update),
        ]
        self._restore_meta_data_state()
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (the task then behaves as fixed-temperature KD)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def add_meta_callback(self, fn: Callable[[dict], None]) -> None:
        """Call ``fn(record)`` after every meta step (applied or skipped), on every rank."""
        self._callbacks.append(fn)

    def _before_update(self, optimizer, args, kwargs) -> None:
        if (self.updates + 1) % self.meta_interval == 0 and self._needs_lookahead:
            student = unwrap_model(self.trainable_module)
            self._theta = {n: p.detach().clone() for n, p, _ in optimizer_params(student, optimizer)}

    def _after_update(self, optimizer, args, kwargs) -> None:
        self.updates += 1
        if self.updates % self.meta_interval == 0 and (self._theta is not None or not self._needs_lookahead):
            try:
                self.meta_step()
            finally:
                self._theta = None

    def _next_meta_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._meta_source is None:
            return self._last_batch.input, self._last_batch.target
        if self._meta_iter is None:
            self._meta_iter = iter(self._meta_source)
        try:
            input, target = next(self._meta_iter)
        except StopIteration:
            self._meta_iter = iter(self._meta_source)
            input, target = next(self._meta_iter)
        return input.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)

    def meta_step(self) -> Dict[str, float]:
        """One meta update of the temperatures (normally called by the optimizer hook).

        Returns:
            The record passed to meta callbacks: step, tau_t, tau_s, meta_loss, hypergrad_t, hypergrad_s, skipped.
        """
        if self._last_batch is None or (self._theta is None and self._needs_lookahead):
            raise RuntimeError("meta_step needs a training forward and the pre-update parameters; call it through attach().")
        student = unwrap_model(self.trainable_module)
        meta_input, meta_target = self._next_meta_batch()
        warm_start = self._warm_start_due
        if warm_start:
            hyper = self._warm_start(meta_input, meta_target)
        else:
            hyper = self._hypergradient(student, meta_input, meta_target)
        stats = torch.cat([hyper.grad.detach().to(torch.float64).reshape(2),
                           torch.tensor([hyper.meta_loss], dtype=torch.float64, device=hyper.grad.device)])
        stats = _average_across_ranks(stats)
        grad, meta_loss = stats[:2], float(stats[2])

        self.meta_steps += 1
        skipped = not bool(torch.isfinite(stats).all())
        if skipped:
            self.meta_skipped += 1
            self._consecutive_skips += 1
            message = (
                f"MKD meta step {self.meta_steps} skipped: non-finite hypergradient or meta loss "
                f"({grad.tolist()}, {meta_loss}); temperatures unchanged ({self.meta_skipped} skipped so far, "
                f"{self._consecutive_skips} in a row).")
            # warnings.warn shows a location once; the log line reports every repeat.
            warnings.warn(message, RuntimeWarning)
            if self._consecutive_skips >= 10:
                _logger.error(message + " The temperatures are frozen: check the teacher's logits, the meta data "
                              "(NaN inputs?) and the student's learning rate.")
            else:
                _logger.warning(message)
        else:
            self._consecutive_skips = 0
            if warm_start:
                before = self.temperatures()[0]
                self._jump_to(grad[0])
                grad = torch.zeros_like(grad)  # the record's hypergradient: none was followed
                _logger.info(f"MKD warm start (update {self.updates}): tau_t {before:.4f} -> {self.temperatures()[0]:.4f}, "
                             f"the teacher's calibrated temperature on the first meta batches (NLL {meta_loss:.4f})")
            else:
                self._apply_meta_grad(grad)
            self._epoch_meta_losses.append(meta_loss)

        tau_t, tau_s = self.temperatures()
        self.last_record = {
            'step': self.updates, 'tau_t': tau_t, 'tau_s': tau_s, 'meta_loss': meta_loss,
            'hypergrad_t': float(grad[0]), 'hypergrad_s': float(grad[1]), 'skipped': int(skipped),
        }
        if self.verbose and self.meta_steps % 10 == 0:
            _logger.info(f"MKD meta step {self.meta_steps} (update {self.updates}): tau_t={tau_t:.4f} "
                         f"tau_s={tau_s:.4f} meta_loss={meta_loss:.4f}")
        for fn in self._callbacks:
            fn(dict(self.last_record))
        return self.last_record

    @property
    def _needs_lookahead(self) -> bool:
        """Whether the estimator differentiates through the look-ahead (needs the pre-update parameters)."""
        return self.estimator != 'calibration'

    @property
    def _warm_start_due(self) -> bool:
        """The calibration estimator's first applied meta step solves for the temperature instead of stepping."""
        return (self.estimator == 'calibration' and self.warm_start_batches > 0 and self.tau.log_tau_t.requires_grad
                and self.meta_steps == self.meta_skipped)

    def _teacher_meta_logits(self, meta_input: torch.Tensor) -> torch.Tensor:
        if self._meta_source is None:
            # Training-stream meta batches: the teacher's logits on that batch are already at hand.
            return self._last_batch.teacher_logits
        # In the training step's precision (train.py's AMP autocast); the calibration maths upcasts to float32.
        autocast = self.meta_autocast() if self.meta_autocast is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            input_kd = self.teacher.normalize_input(meta_input, self.student_mean, self.student_std)
            return self.teacher(input_kd, return_features=False)

    def _warm_start(self, meta_input: torch.Tensor, meta_target: torch.Tensor):
        """Solve for ``log tau_t`` on ``warm_start_batches`` meta batches (this one and the next ones).

        Returns:
            ``HyperGradient`` whose ``grad[0]`` carries the solution ``log tau*`` (averaged over ranks by the
            caller, like a hypergradient) and whose ``meta_loss`` is the NLL there.
        """
        logits, targets = [self._teacher_meta_logits(meta_input)], [meta_target]
        for _ in range(self.warm_start_batches - 1 if self._meta_source is not None else 0):
            meta_input, meta_target = self._next_meta_batch()
            logits.append(self._teacher_meta_logits(meta_input))
            targets.append(meta_target)
        logits, targets = torch.cat(logits), torch.cat(targets)
        log_tau = calibrated_log_temperature(logits, targets, self.tau.tau_min, self.tau.tau_max).to(logits.device)
        nll = calibration_hypergradient(logits, targets, (log_tau, log_tau)).meta_loss
        return HyperGradient(grad=torch.stack([log_tau, torch.zeros_like(log_tau)]), meta_loss=nll, epsilon=0.0)

    def _jump_to(self, log_tau_t: torch.Tensor) -> None:
        """Set ``log tau_t`` (``tau_s`` keeps its ratio to it when tied), then project onto the bounds."""
        with torch.no_grad():
            delta = log_tau_t.to(self.tau.log_tau_t) - self.tau.log_tau_t
            self.tau.log_tau_t.add_(delta)
            if self.tie_temperatures:
                self.tau.log_tau_s.add_(delta.to(self.tau.log_tau_s))
        self.tau.project_()

    def _hypergradient(self, student: nn.Module, meta_input: torch.Tensor, meta_target: torch.Tensor):
        log_taus = (self.tau.log_tau_t, self.tau.log_tau_s)
        if self.estimator == 'calibration':
            return calibration_hypergradient(self._teacher_meta_logits(meta_input), meta_target, log_taus)
        common = dict(fd_eps=self.fd_eps, meta_autocast=self.meta_autocast, kd_scale=self.kd_scale,
                      mode=self.hypergrad_mode, meta_loss=self.meta_loss)
        args = (student, self._optimizer, self._theta, self._last_batch, meta_input, meta_target, log_taus,
                self.distill_loss_weight)
        if self.estimator == 'neumann':
            return neumann_hypergradient(*args, criterion=self.criterion, task_weight=self.task_loss_weight,
                                         terms=self.neumann_terms, scale=self.neumann_scale, **common)
        return finite_difference_hypergradient(*args, **common)

    def _apply_meta_grad(self, grad: torch.Tensor) -> None:
        if self.tie_temperatures:
            grad = grad.sum().expand(2)
        params = [(self.tau.log_tau_t, grad[0]), (self.tau.log_tau_s, grad[1])]
        for p, g in params:
            if p.requires_grad:
                p.grad = g.to(device=p.device, dtype=p.dtype).reshape(p.shape).clone()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.tau.project_()

    # ------------------------------------------------------------------ reporting
    def meta_summary(self) -> Dict[str, float]:
        """Temperatures and the mean meta loss since the last call (for per-epoch summaries)."""
        tau_t, tau_s = self.temperatures()
        losses = self._epoch_meta_losses
        self._epoch_meta_losses = []
        return {
            'tau_t': tau_t,
            'tau_s': tau_s,
            'meta_loss': sum(losses) / len(losses) if losses else float('nan'),
            'meta_steps': self.meta_steps,
            'meta_skipped': self.meta_skipped,
        }

    def check_synchronized(self) -> None:
        """Raise ``RuntimeError`` if the ranks of a distributed run hold different temperatures."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        mine = torch.stack([self.tau.log_tau_t.detach(), self.tau.log_tau_s.detach()]).to(torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, mine)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            values = [tuple(math.exp(x) for x in g.tolist()) for g in gathered]
            raise RuntimeError(
                f"MKD temperatures differ across ranks (tau_t, tau_s per rank: {values}). Every rank must run "
                f"the same number of optimizer updates; check for uneven data shards or per-rank skipped steps.")


def _choice(name: str, value: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}='{value}' is unknown; use one of {choices}.")
    return value


def _resolve_loss_weights(task_loss_weight: Optional[float], distill_loss_weight: Optional[float]) -> Tuple[float, float]:
    """timm's three weighting modes: independent, complementary, or both 1."""
    if distill_loss_weight is not None:
        return (task_loss_weight if task_loss_weight is not None else 1.0), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0


def _make_meta_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if not params:
        # Nothing learnable: keep an optimizer so task_state has a uniform shape.
        params = [nn.Parameter(torch.zeros(()), requires_grad=True)]
    name = name.lower()
    if name == 'adam':
        return torch.optim.Adam(params, lr=lr)
    if name == 'sgd':
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown meta optimizer '{name}'; use 'adam' or 'sgd'.")


def _average_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks when running distributed, so every rank applies the same update."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
        x /= torch.distributed.get_world_size()
    return x
