"""The patches that build the task: the three distillation task names become factories, and the optimizer hook.

``TaskPatches`` is a mixin of ``MKDRun`` (``patches/run.py``). With ``--mkd`` the logit factory builds
``timm_mkd.MKDTask`` from train.py's keywords and the run's ``MKDConfig``; with ``--teacher-checkpoint``
any of them gets the locally loaded teacher. ``create_optimizer_v2`` attaches the meta step.
"""
import logging
from functools import partial
from typing import Any, Dict

from .common import MKDSetupError, cpu_ddp_safe

_logger = logging.getLogger('train_mkd')


class TaskPatches:
    """Mixin of ``MKDRun``: the task factories and the meta step's optimizer hook."""


    def patch_task_classes(self) -> None:
        """Replace the three distillation task names with factories (see the module docstring)."""
        self._replace('LogitDistillationTask', lambda original: partial(self._make_task, original, 'logit'))
        self._replace('FeatureDistillationTask', lambda original: partial(self._make_task, original, 'feature'))
        self._replace('TokenDistillationTask', lambda original: partial(self._make_task, original, 'token'))

    def _make_task(self, original, kind: str, *a, **kw):
        if self.opts is None:
            return original(*a, **kw)
        if a:
            raise MKDSetupError(
                f'train.py passed positional arguments to the {kind} distillation task; this train.py '
                f'is not one the patches know')
        student = kw['student_model']
        data_config = self._resolve_data_config(student)
        mean, std = data_config.get('mean'), data_config.get('std')
        device, dtype = kw.get('device'), kw.get('dtype')
        self.device = device
        self.img_dtype = dtype
        teacher_name = kw['teacher_model']
        source = f"teacher {teacher_name!r}" + (
            f' from {self.opts.teacher_checkpoint!r}' if self.opts.teacher_checkpoint else ' with hub weights')
        what = 'MKD' if kind == 'logit' and self.opts.mkd else f'{kind} distillation'
        from timm_mkd.teacher import TeacherLoadError
        try:
            if kind == 'logit' and self.opts.mkd:
                from timm_mkd import MKDTask
                task = MKDTask(
                    student_model=student,
                    teacher_model=teacher_name,
                    criterion=kw.get('criterion'),
                    teacher_pretrained_path=self.opts.teacher_checkpoint,
                    distill_loss_weight=kw.get('distill_loss_weight'),
                    task_loss_weight=kw.get('task_loss_weight'),
                    device=device,
                    dtype=dtype,
                    verbose=kw.get('verbose', True),
                    student_mean=mean,
                    student_std=std,
                    meta_autocast=self._meta_autocast(device),
                    config=self.opts.config,
                )
                self._track_kd_loss(task)
                self.task = task
                return cpu_ddp_safe(task)
            teacher = teacher_name
            if self.opts.teacher_checkpoint:
                from timm_mkd import build_teacher
                teacher = build_teacher(
                    teacher_name, student, checkpoint_path=self.opts.teacher_checkpoint,
                    device=device, dtype=dtype, student_mean=mean, student_std=std)
            task = original(**dict(kw, teacher_model=teacher))
            from timm_mkd.teacher import match_student_normalization
            match_student_normalization(task, student, mean, std)  # the loader's --mean/--std, --in-chans
            self.plain_task = task
            return cpu_ddp_safe(task)
        except (ValueError, OSError, TeacherLoadError) as e:
            # What the teacher and the MKD options raise about the user's inputs (MKDConfigError and the
            # checkpoint checks are ValueErrors, a missing file an OSError): one line. Anything else is a bug
            # and keeps its traceback.
            raise MKDSetupError(f'cannot set up {what} with the {source}: {e}') from e

    def _resolve_data_config(self, model) -> Dict[str, Any]:
        """train.py's own data config (same call, same args), for normalisation and meta transforms."""
        if self.data_config is None:
            self.data_config = self.module.resolve_data_config(vars(self.args), model=model, verbose=False)
        return self.data_config

    def _meta_autocast(self, device):
        """The autocast train.py uses for the training step (``--amp``), for the meta-batch forward."""
        if not getattr(self.args, 'amp', False) or device is None:
            return None
        import torch
        amp_dtype = torch.bfloat16 if self.args.amp_dtype == 'bfloat16' else torch.float16
        return partial(torch.autocast, device_type=device.type, dtype=amp_dtype)

    def _track_kd_loss(self, task) -> None:
        """Sum the KD loss of training forwards for the epoch mean (no host sync per step)."""
        import torch

        def hook(module, inputs, output):
            if torch.is_grad_enabled() and isinstance(output, dict) and 'kd_loss' in output:
                value = output['kd_loss'].detach().float()
                self._kd_sum = value if self._kd_sum is None else self._kd_sum + value
                self._kd_count += 1
        task.register_forward_hook(hook)

    def patch_create_optimizer(self) -> None:
        def factory(original):
            def create_optimizer_v2(*a, **kw):
                optimizer = original(*a, **kw)
                if self.task is not None:
                    self._attach(optimizer)
                return optimizer
            return create_optimizer_v2
        self._replace('create_optimizer_v2', factory)

    def _attach(self, optimizer) -> None:
        """Hook the meta step onto the student's optimizer, with the meta batches."""
        opts = self.opts
        self.task.attach(optimizer, self._meta_batches())
        self.task.add_meta_callback(self._on_meta_step)
        if self.is_primary():
            tau_t, tau_s = self.task.temperatures()
            _logger.info(
                f'MKD ({self.generation} train.py): meta step every {opts.meta_interval} updates on '
                f'{opts.meta_data.describe()}, meta batch {opts.meta_batch_size}; '
                f'tau_t={tau_t:.4g} tau_s={tau_s:.4g} in [{opts.tau_min:g}, {opts.tau_max:g}]')

    def _on_meta_step(self, record: Dict[str, Any]) -> None:
        if self.temp_log is not None:
            from timm_mkd.meta_log import COLUMNS
            row = {k: v for k, v in record.items() if k in COLUMNS}
            row['epoch'] = self.epoch
            self.temp_log.record(row)
