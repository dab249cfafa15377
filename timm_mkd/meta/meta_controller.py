"""The meta controller: when a meta step runs, on which meta batch, and what it does with the result.

``MetaController`` hooks the student optimizer (a step pre-hook snapshots the parameters before the
update that precedes a meta step, a post-hook counts updates and runs the meta step every
``meta_interval``), draws meta batches (``MetaBatchStream``), asks the estimator for the
hypergradient (or, on the first applied step, for its warm-start solution), averages it over ranks,
skips a non-finite one (``SkipPolicy``) and hands the rest to ``Temperatures``. It also owns its
part of the checkpoint state and the per-meta-step record and per-epoch summary.
"""
import logging
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .estimators import LossTerms, MetaInputs
from .meta_parts import TrainBatch, optimizer_params
from .temperature import Temperatures

_logger = logging.getLogger(__name__)

TRAIN_STREAM = 'train'
"""Pass as ``meta_batches`` to ``attach`` to score the look-ahead on the training batch itself.

Needs no held-out data, but it is **biased**: the look-ahead has just descended on that very
batch, so the meta loss favours temperatures that help fit it rather than ones that generalise.
With mixup/cutmix its target is the soft ``[B, C]`` matrix, which ``meta_loss_fn`` accepts.
Prefer a held-out fraction (``timm_mkd.data.meta_data.split_holdout``) or another split.
"""


class MetaBatchStream:
    """Meta batches from an iterable (re-iterated when exhausted) or, for ``TRAIN_STREAM``, the training batch.

    Args:
        batches: iterable of ``(input, target)``, or ``TRAIN_STREAM`` / None.
        device: device the batches are moved to.
    """

    def __init__(self, batches: Union[Iterable, str, None], device: torch.device):
        self.source = None if batches in (None, TRAIN_STREAM) else batches
        self.device = device
        self._iter = None

    @property
    def train_stream(self) -> bool:
        return self.source is None

    def next(self, last_batch: TrainBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next meta batch ``(input, target)`` on the device."""
        if self.source is None:
            return last_batch.input, last_batch.target
        if self._iter is None:
            self._iter = iter(self.source)
        try:
            input, target = next(self._iter)
        except StopIteration:
            self._iter = iter(self.source)
            input, target = next(self._iter)
        return input.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)

    def state_dict(self) -> Dict:
        """Where the source stands (``timm_mkd.data.meta_data.MetaBatches``); {} for other sources."""
        return self.source.state_dict() if hasattr(self.source, 'state_dict') else {}

    def load_state_dict(self, state: Dict) -> bool:
        """Resume the source at ``state``; returns False when this source cannot (nothing changed)."""
        if not (state and hasattr(self.source, 'load_state_dict')):
            return False
        self.source.load_state_dict(state)
        self._iter = None
        return True


class SkipPolicy:
    """A non-finite hypergradient or meta loss skips the update: a warning each time, an error after 10 in a row."""

    def __init__(self):
        self.skipped = 0
        self.in_a_row = 0

    def check(self, stats: torch.Tensor, meta_step: int) -> bool:
        """Whether ``stats`` (``[grad_t, grad_s, meta_loss]``) skips meta step ``meta_step``; warns if so."""
        if bool(torch.isfinite(stats).all()):
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        message = (
            f"MKD meta step {meta_step} skipped: non-finite hypergradient or meta loss "
            f"({stats[:2].tolist()}, {float(stats[2])}); temperatures unchanged ({self.skipped} skipped so far, "
            f"{self.in_a_row} in a row).")
        # warnings.warn shows a location once; the log line reports every repeat.
        warnings.warn(message, RuntimeWarning)
        if self.in_a_row >= 10:
            _logger.error(message + " The temperatures are frozen: check the teacher's logits, the meta data "
                          "(NaN inputs?) and the student's learning rate.")
        else:
            _logger.warning(message)
        return True


class MetaController:
    """Runs the MKD meta step inside the student optimizer's hooks.

    Args:
        temperatures: the ``Temperatures`` the meta step moves.
        estimator: the hypergradient estimator (``timm_mkd.meta.estimators``).
        meta_interval: optimizer updates between meta steps.
        student: ``fn()``: the unwrapped student.
        loss_terms: ``fn()``: the training loss's ``LossTerms``.
        teacher_logits: ``fn(meta_input)``: the teacher's logits on a held-out meta batch.
        device: device of meta batches.
        verbose: log a line every 10 meta steps.
    """

    def __init__(self, temperatures: Temperatures, estimator, meta_interval: int, student: Callable[[], nn.Module],
                 loss_terms: Callable[[], LossTerms], teacher_logits: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device, verbose: bool = True,
                 student_probs: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.tau, self.estimator, self.meta_interval = temperatures, estimator, meta_interval
        self._student, self._loss_terms, self._teacher_logits = student, loss_terms, teacher_logits
        self._student_probs = student_probs
        self.device, self.verbose = device, verbose
        # The counters travel in task_state so resume keeps the cadence.
        self.updates = 0
        self.meta_steps = 0
        self.skips = SkipPolicy()
        self.optimizer = None
        self.hooks: List = []
        self.batches = MetaBatchStream(None, device)
        self._pending_meta_data_state = None
        self.last_batch: Optional[TrainBatch] = None
        self.theta: Optional[Dict[str, torch.Tensor]] = None
        self.callbacks: List[Callable[[dict], None]] = []
        self._epoch_meta_losses: List[float] = []
        self.last_record: Dict[str, float] = {}

    def attach(self, optimizer: torch.optim.Optimizer, meta_batches: Union[Iterable, str, None]) -> None:
        """Hook the meta step onto ``optimizer``, drawing meta batches from ``meta_batches``."""
        self.detach()
        self.optimizer = optimizer
        self.batches = MetaBatchStream(meta_batches, self.device)
        self.hooks = [optimizer.register_step_pre_hook(self.before_update),
                      optimizer.register_step_post_hook(self.after_update)]
        self._restore_meta_data_state()

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    @property
    def lookahead_due(self) -> bool:
        """Whether the next update needs what a look-ahead meta step reads (the training forward's RNG state, the
        pre-update parameters): only the update before a meta step, or every one while no optimizer is hooked
        (a caller driving ``meta_step`` itself). Other steps capture and copy nothing."""
        return self.estimator.needs_lookahead and (not self.hooks or (self.updates + 1) % self.meta_interval == 0)

    def before_update(self, optimizer, args, kwargs) -> None:
        if self.lookahead_due:
            self.theta = {n: p.detach().clone() for n, p, _ in optimizer_params(self._student(), optimizer)}

    def after_update(self, optimizer, args, kwargs) -> None:
        self.updates += 1
        if self.updates % self.meta_interval == 0 and (self.theta is not None or not self.estimator.needs_lookahead):
            try:
                self.meta_step()
            finally:
                self.theta = None

    @property
    def warm_start_due(self) -> bool:
        """The first applied meta step of an estimator with a warm start solves for the temperature instead."""
        return (self.estimator.warm_start_batches > 0 and self.tau.log_tau_t.requires_grad
                and self.meta_steps == self.skips.skipped)

    def meta_step(self) -> Dict[str, float]:
        """One meta update of the temperatures; returns the record passed to meta callbacks."""
        if self.last_batch is None or (self.theta is None and self.estimator.needs_lookahead):
            raise RuntimeError("meta_step needs a training forward and the pre-update parameters; call it through attach().")
        meta_input, meta_target = self.batches.next(self.last_batch)
        warm_start = self.warm_start_due
        hyper = self._warm_start(meta_input, meta_target) if warm_start else self.hypergradient(meta_input, meta_target)
        return self._apply(hyper, warm_start)

    def warm_start_before_training(self) -> Optional[Dict[str, float]]:
        """The warm start before the first update, so that no update trains at the initial temperature.

        Runs once, from the first training forward, when the estimator has a warm start, the meta batches are
        held out (the training stream has no batch yet) and nothing has been trained (a resumed run has); it counts
        as the first meta step. Returns its record, or None when it did not run.
        """
        if self.updates or not self.hooks or self.batches.train_stream or not self.warm_start_due:
            return None
        meta_input, meta_target = self.batches.next(self.last_batch)
        return self._apply(self._warm_start(meta_input, meta_target), warm_start=True)

    def _apply(self, hyper, warm_start: bool) -> Dict[str, float]:
        """Average ``hyper`` over ranks, skip it if non-finite, else jump (warm start) or step; report."""
        stats = torch.cat([hyper.grad.detach().to(torch.float64).reshape(2),
                           torch.tensor([hyper.meta_loss], dtype=torch.float64, device=hyper.grad.device)])
        stats = average_across_ranks(stats)
        grad, meta_loss = stats[:2], float(stats[2])
        self.meta_steps += 1
        skipped = self.skips.check(stats, self.meta_steps)
        if not skipped:
            if warm_start:
                before = self.tau.values()[0]
                self.tau.jump_to(grad[0])
                grad = torch.zeros_like(grad)  # the record's hypergradient: none was followed
                _logger.info(f"MKD warm start (after update {self.updates}): tau_t {before:.4f} -> {self.tau.values()[0]:.4f}, "
                             f"the minimiser of the meta objective on the first meta batches (NLL {meta_loss:.4f})")
            else:
                self.tau.step(grad)
            self._epoch_meta_losses.append(meta_loss)
        return self._report(grad, meta_loss, skipped)

    def _report(self, grad: torch.Tensor, meta_loss: float, skipped: bool) -> Dict[str, float]:
        tau_t, tau_s = self.tau.values()
        self.last_record = {
            'step': self.updates, 'tau_t': tau_t, 'tau_s': tau_s, 'meta_loss': meta_loss,
            'hypergrad_t': float(grad[0]), 'hypergrad_s': float(grad[1]), 'skipped': int(skipped),
        }
        if self.verbose and self.meta_steps % 10 == 0:
            _logger.info(f"MKD meta step {self.meta_steps} (update {self.updates}): tau_t={tau_t:.4f} "
                         f"tau_s={tau_s:.4f} meta_loss={meta_loss:.4f}")
        for fn in self.callbacks:
            fn(dict(self.last_record))
        return self.last_record

    def _meta_logits(self, meta_input: torch.Tensor) -> torch.Tensor:
        # Training-stream meta batches: the teacher's logits on that batch are already at hand.
        return self.last_batch.teacher_logits if self.batches.train_stream else self._teacher_logits(meta_input)

    def hypergradient(self, meta_input: torch.Tensor, meta_target: torch.Tensor):
        """The estimator's hypergradient on one meta batch (the last training batch and ``theta`` as they are)."""
        return self.estimator(MetaInputs(
            self._student(), self.optimizer, self.theta, self.last_batch, meta_input, meta_target,
            (self.tau.log_tau_t, self.tau.log_tau_s), self._loss_terms(), self._meta_logits,
            student_probs=self._student_probs))

    def _warm_start(self, meta_input: torch.Tensor, meta_target: torch.Tensor):
        """The estimator's solution on ``warm_start_batches`` meta batches (this one and the next ones)."""
        student = getattr(self.estimator, 'needs_student', False)  # optional for estimators not built on Estimator
        logits, targets, probs = [], [], []
        for i in range(self.estimator.warm_start_batches if not self.batches.train_stream else 1):
            if i:
                meta_input, meta_target = self.batches.next(self.last_batch)
            logits.append(self._meta_logits(meta_input))
            targets.append(meta_target)
            if student:
                probs.append(self._student_probs(meta_input))
        extra = dict(student_probs=torch.cat(probs), loss=self._loss_terms()) if student else {}
        return self.estimator.solve(torch.cat(logits), torch.cat(targets), self.tau.tau_min, self.tau.tau_max, **extra)

    def summary(self) -> Dict[str, float]:
        """Temperatures and the mean meta loss since the last call (for per-epoch summaries)."""
        tau_t, tau_s = self.tau.values()
        losses, self._epoch_meta_losses = self._epoch_meta_losses, []
        return {'tau_t': tau_t, 'tau_s': tau_s, 'meta_loss': sum(losses) / len(losses) if losses else float('nan'),
                'meta_steps': self.meta_steps, 'meta_skipped': self.skips.skipped}

    def state(self) -> Dict:
        """The counters (the skip policy's included) and the meta loader's position."""
        return {'updates': self.updates, 'meta_steps': self.meta_steps, 'meta_skipped': self.skips.skipped,
                'meta_skipped_in_a_row': self.skips.in_a_row,
                # Where the meta loader stands (timm_mkd.data.meta_data.MetaBatches), so resume draws the next batch.
                'meta_data': self.batches.state_dict()}

    def load_state(self, state: Dict) -> None:
        """Restore what ``state`` saved (the meta loader's position once it is attached).

        A state saved before the skip counts were in it restores them as 0.
        """
        self.updates = int(state['updates'])
        self.meta_steps = int(state['meta_steps'])
        self.skips.skipped = int(state.get('meta_skipped', 0))
        self.skips.in_a_row = int(state.get('meta_skipped_in_a_row', 0))
        self._pending_meta_data_state = state.get('meta_data') or None
        self._restore_meta_data_state()

    def _restore_meta_data_state(self) -> None:
        # train.py resumes after the optimizer (and hence attach) exists, a plain loop may resume before.
        if self.batches.load_state_dict(self._pending_meta_data_state):
            self._pending_meta_data_state = None


def average_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks when running distributed, so every rank applies the same update."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
        x /= torch.distributed.get_world_size()
    return x


def check_synchronized(temperatures: Temperatures) -> None:
    """Raise ``RuntimeError`` if the ranks of a distributed run hold different temperatures."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    mine = torch.stack([temperatures.log_tau_t.detach(), temperatures.log_tau_s.detach()]).to(torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        values = [tuple(math.exp(x) for x in g.tolist()) for g in gathered]
        raise RuntimeError(
            f"MKD temperatures differ across ranks (tau_t, tau_s per rank: {values}). Every rank must run "
            f"the same number of optimizer updates; check for uneven data shards or per-rank skipped steps.")
