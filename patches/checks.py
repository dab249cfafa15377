"""Run-time checks that the patches took effect, before the run trains or saves without MKD.

``HookChecks`` is a mixin of ``MKDRun`` (``patches/run.py``): ``verify_setup`` at the first
``train_one_epoch``, a one-shot hook after the first optimizer step, ``verify_before_save`` before
the first checkpoint; each failure is an ``MKDSetupError`` naming the hook.
"""
from typing import Any, Callable, Dict, Optional

from .common import MKDSetupError, checkpoint_task_state


class HookChecks:
    """Mixin of ``MKDRun``: the run-time hook checks."""


    def _hook_failed(self, hook: str, detail: str) -> None:
        """Stop the run: a patch did not take effect in this train.py (before any checkpoint is written).

        Raises:
            MKDSetupError: naming the hook, what went wrong, and the fix.
        """
        from . import SUPPORTED_RELEASES_TEXT, how_to_get_train_py  # the package's, loaded by now (no import cycle)
        path = getattr(self.module, '__file__', 'train.py')
        raise MKDSetupError(
            f'the {hook} hook of train_mkd.py did not take effect in {path}: {detail}. This train.py differs '
            f'from the {self.generation} train.py in a way its structure checks cannot see; the run was stopped '
            f'before writing a checkpoint. Fix: use the unmodified train.py of a supported release '
            f'({SUPPORTED_RELEASES_TEXT}), e.g. the one matching the installed timm:\n' + how_to_get_train_py())

    def verify_setup(self, a: tuple, kw: Dict[str, Any]) -> None:
        """At the first ``train_one_epoch`` call: the task, the meta step and the checkpoint hooks are in place.

        Args:
            a: positional arguments of train.py's ``train_one_epoch`` after ``epoch``
                (``model, loader, optimizer, args``).
            kw: its keyword arguments (``task=``, ``saver=`` where train.py passes them).
        """
        if self.opts is None or self._updates_at_setup is not None:
            return
        built = self.task if self.mkd else self.plain_task
        kind = getattr(self.args, 'kd_distill_type', 'logit')
        what = 'MKD task (MKDTask)' if self.mkd else f'{kind} distillation task with the local teacher'
        if built is None:
            self._hook_failed('task', f'the {what} was never built; train.py created its task without calling '
                                      f'the LogitDistillationTask / FeatureDistillationTask / TokenDistillationTask '
                                      f'names of its module')
        if kw.get('task') is not None and kw['task'] is not built:
            self._hook_failed('task', f'train.py trains {type(kw["task"]).__name__}, not the {what} built for it')
        self._updates_at_setup = 0
        if not self.mkd:
            return
        task = self.task
        if task.meta.optimizer is None or not task.meta.hooks:
            self._hook_failed('meta step', 'the meta step is not attached to the student\'s optimizer (train.py did '
                                           'not create it through create_optimizer_v2 after building the task)')
        optimizer = kw.get('optimizer', a[2] if len(a) > 2 else None)
        if optimizer is not None and optimizer is not task.meta.optimizer:
            self._hook_failed('meta step', 'train.py steps another optimizer than the one the meta step is attached to')
        if self.is_primary():
            if self.saver is None:
                self._hook_failed('checkpoint', 'train.py did not build its CheckpointSaver through utils.CheckpointSaver, '
                                                'so checkpoints would not carry the temperatures')
            if getattr(self.saver, 'task', task) is not task or kw.get('saver', self.saver) is not self.saver:
                self._hook_failed('checkpoint', 'the CheckpointSaver train.py uses does not hold the MKD task, so its '
                                                'checkpoints would not carry the temperatures (task_state)')
            if 'mkd' not in checkpoint_task_state(task):
                self._hook_failed('checkpoint', 'the MKD task\'s checkpoint state has no \'mkd\' entry')
        self._updates_at_setup = task.updates
        holder = []

        def after_first_step(optimizer, args, kwargs):
            holder.pop().remove()
            self.verify_first_step()
        holder.append(task.meta.optimizer.register_step_post_hook(after_first_step))

    def verify_first_step(self) -> None:
        """After the first optimizer step: the meta-step hooks counted it, after a training forward of the task."""
        task = self.task
        if task.updates != self._updates_at_setup + 1:
            self._hook_failed('meta step', 'the first optimizer step did not reach the meta-step hooks')
        if task.meta.last_batch is None:
            self._hook_failed('meta step', 'the student\'s optimizer stepped without a training forward through the '
                                           'MKD task (train.py must call the task, in train mode, with gradients)')

    def watch_saver(self, saver) -> None:
        """Check the hooks before ``saver`` writes its first checkpoint (recovery or epoch)."""
        self.saver = saver
        for name in ('save_checkpoint', 'save_recovery'):
            method = getattr(saver, name, None)
            if callable(method):
                setattr(saver, name, self._checked_save(name, method))

    def _checked_save(self, name: str, method: Callable) -> Callable:
        def save(*a, **kw):
            if not self._saves_checked and self.mkd and self._updates_at_setup is not None:
                self._saves_checked = True
                self.verify_before_save(name, a[0] if a else kw.get('epoch'))
            return method(*a, **kw)
        return save

    def verify_before_save(self, name: str, epoch: Optional[int]) -> None:
        """Before the first checkpoint: the meta step saw updates and (for an epoch checkpoint) the summary columns."""
        if self.task.updates == self._updates_at_setup:
            self._hook_failed('meta step', 'no optimizer update reached the meta step before the first checkpoint '
                                           '(the optimizer train.py steps is not the one the meta step is attached to)')
        if name == 'save_checkpoint' and epoch is not None and epoch not in self.summary_epochs:
            self._hook_failed('summary columns', f'summary.csv of epoch {epoch} was not written through '
                                                 f'utils.update_summary, so it lacks tau_t, tau_s, kd_loss and meta_loss')
