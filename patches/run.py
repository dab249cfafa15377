"""Running train.py with MKD: ``MKDRun`` installs the patches into the loaded train.py module.

Why patch at all: timm's train.py picks its training task in a hard-coded if/elif inside
``main()`` and offers no registry or hook. So ``train_mkd.py`` loads train.py as a module
(without running ``main()``), replaces a handful of *module globals* of that one module, and
then calls ``main()``. timm's own modules are never modified: the replacements live only in the
loaded train.py's namespace, and ``utils`` there becomes a proxy that forwards to ``timm.utils``.

The globals we replace, and why (each one is a call train.py makes by its global name, so a
replacement sees exactly the arguments train.py passes):

``_parse_args``
    wrapped to validate the MKD flags (``parser.error`` on contradictions) and to keep ``args``,
    which is local to ``main()``.
``create_dataset``
    wrapped to see the training-split call: with a held-out meta fraction it returns the
    training subset and keeps the meta subset; with ``split:``/``folder:`` it builds the meta set.
``LogitDistillationTask`` / ``FeatureDistillationTask`` / ``TokenDistillationTask``
    replaced by factories: with ``--mkd`` the logit one builds ``timm_mkd.MKDTask``; with
    ``--teacher-checkpoint`` the teacher is loaded from the local file for any of them.
``create_optimizer_v2``
    wrapped so that, once the student's optimizer exists, the meta step is attached to it.
``resume_task_checkpoint``
    wrapped to log the temperatures a resumed run continues from.
``train_one_epoch``
    wrapped to close each epoch's MKD bookkeeping on every rank (rank-consistency check, the
    epoch's mean KD loss, a log line).
``utils`` (proxy) ``.CheckpointSaver`` / ``.update_summary``
    to learn the output folder (``temperatures.csv``) and to add ``tau_t``, ``tau_s``,
    ``kd_loss``, ``meta_loss``, ``meta_skipped`` columns to ``summary.csv``.

The generation probes (``probe.py``) read train.py's structure before it runs; while it runs, ``MKDRun`` also
checks that each replacement took effect (``verify_setup`` at the first ``train_one_epoch``, a
one-shot hook after the first optimizer step, ``verify_before_save`` before the first checkpoint)
and stops the run with ``MKDSetupError`` naming the hook that did not, so a train.py that merely
looks right never trains or saves without MKD.

One fix outside train.py, applied whatever the flags: when the installed Pillow refuses to
posterize to 0 bits (Pillow >= 13), timm's posterize augmentation ops get the old result for 0 bits
(``timm_mkd.augment_compat``), so DeiT-style ``rand-m9-mstd0.5-inc1`` recipes do not crash.

Without ``--mkd`` / ``--teacher-checkpoint`` every replacement passes straight through, so the
run is train.py's own (``args.yaml`` included: the MKD keys are left out of it).

The generation adapters (``gen_*.py``) decide which of these apply to their train.py and
verify, before anything runs, that the file still has the structure the patches rely on.

The patches are grouped by job, one mixin each: ``run_data.py`` (the training split and the meta
data), ``run_task.py`` (the task factories and the meta step's optimizer), ``outputs.py``
(``utils``: checkpoints, ``summary.csv``, ``temperatures.csv``), ``checks.py`` (the run-time hook
checks); ``args.py`` checks train.py's own arguments against the MKD flags.
"""
import logging
import os
import types
from typing import Any, Callable, Dict, Optional, Set

from .args import validate_train_args
from .checks import HookChecks
from .common import MKDSetupError, dump_args
from .outputs import OutputPatches
from .run_data import DataPatches
from .run_task import TaskPatches

_logger = logging.getLogger('train_mkd')


class MKDRun(OutputPatches, TaskPatches, DataPatches, HookChecks):
    """The state one patched ``main()`` shares between its patches.

    Args:
        module: the loaded train.py module.
        generation: the adapter's generation label (for log lines).
    """

    def __init__(self, module: types.ModuleType, generation: str):
        self.module = module
        self.generation = generation
        self.args = None
        self.opts = None  # timm_mkd.cli.MKDOptions or None
        self.meta_dataset = None
        self.data_config = None
        self.task = None  # the MKDTask, once built
        self.device = None
        self.img_dtype = None
        self.temp_log = None
        self.epoch = 0
        self.epoch_stats = None
        self._kd_sum = None
        self._kd_count = 0
        self.posterize_fixed = False
        self.originals: Dict[str, Any] = {}
        # run-time hook checks (``verify_setup`` and friends)
        self.plain_task = None  # timm's own task built with the local teacher (plain KD)
        self.saver = None  # the CheckpointSaver built through the utils proxy
        self.summary_epochs: Set[int] = set()  # epochs whose summary row carries the MKD columns
        self._updates_at_setup: Optional[int] = None
        self._saves_checked = False

    # ------------------------------------------------------------------ helpers
    @property
    def mkd(self) -> bool:
        return self.opts is not None and self.opts.mkd

    def _replace(self, name: str, factory: Callable[[Any], Any]) -> None:
        original = getattr(self.module, name)
        self.originals[name] = original
        setattr(self.module, name, factory(original))

    def is_primary(self) -> bool:
        from timm import utils
        return self.args is None or utils.is_primary(self.args)

    # ------------------------------------------------------------------ patches
    @classmethod
    def install(cls, module, generation: str) -> 'MKDRun':
        """Apply every patch to the loaded train.py ``module`` (the same set for each generation)."""
        run = cls(module, generation)
        from timm_mkd.augment_compat import fix_posterize_zero_bits
        run.posterize_fixed = fix_posterize_zero_bits()  # before train.py builds its transforms
        run.add_flags()
        run.patch_parse_args()
        run.patch_create_dataset()
        run.patch_task_classes()
        run.patch_create_optimizer()
        run.patch_resume()
        run.patch_train_one_epoch()
        run.patch_utils()
        return run

    def add_flags(self) -> None:
        """Add the MKD argument group to train.py's ``parser`` (``--help`` and ``-c`` YAML see it)."""
        from timm_mkd.cli import add_mkd_args
        parser = self.module.parser
        add_mkd_args(parser)
        note = (f'train_mkd.py runs this train.py ({getattr(self.module, "__file__", "?")}, timm {self.generation} '
                f'generation); choose another with --timm-train PATH or $TIMM_TRAIN_PY.')
        parser.epilog = f'{parser.epilog}\n\n{note}' if parser.epilog else note

    def patch_parse_args(self) -> None:
        from timm_mkd.cli import MKD_DESTS, MKDArgumentError, mkd_flags_in_use

        def factory(original):
            def _parse_args():
                args, args_text = original()
                if self.posterize_fixed and getattr(args, 'aa', None) and os.environ.get('RANK', '0') == '0':
                    _logger.info(
                        'train_mkd: the installed Pillow refuses to posterize to 0 bits, which timm\'s '
                        'RandAugment asks for at magnitude 10 (PosterizeIncreasing); timm_mkd.augment_compat '
                        'gives the black image older Pillow gave instead')
                try:
                    opts = validate_train_args(args)
                except MKDArgumentError as e:
                    self.module.parser.error(str(e))
                self.args, self.opts = args, opts
                if opts is None and not mkd_flags_in_use(args):
                    # A plain train.py run: drop the (default) MKD attributes so that args, the
                    # args.yaml text and the args pickled into checkpoints are train.py's own.
                    for dest in MKD_DESTS:
                        if hasattr(args, dest):
                            delattr(args, dest)
                # record the normalised values (kd_model_name from --teacher, meta batch size)
                args_text = dump_args(vars(args))
                if opts is not None and opts.mkd:
                    if getattr(args, 'kd_temperature', None) != self.module.parser.get_default('kd_temperature'):
                        _logger.warning(
                            f'--kd-temperature {args.kd_temperature} is ignored with --mkd: the temperatures are '
                            f'learned, starting from --mkd-tau-t {opts.tau_t} and --mkd-tau-s {opts.tau_s}')
                return args, args_text
            return _parse_args
        self._replace('_parse_args', factory)

    def patch_resume(self) -> None:
        def factory(original):
            def resume_task_checkpoint(task, *a, **kw):
                try:
                    result = original(task, *a, **kw)
                except RuntimeError as e:
                    if self.task is None or task is not self.task:
                        raise
                    path = a[0] if a else kw.get('checkpoint_path')
                    raise MKDSetupError(f'--resume {path}: {e}') from e
                if task is self.task and self.task is not None and self.is_primary():
                    tau_t, tau_s = self.task.temperatures()
                    _logger.info(
                        f'MKD: resumed temperatures tau_t={tau_t:.6g} tau_s={tau_s:.6g} '
                        f'(after {self.task.meta_steps} meta steps, {self.task.updates} updates)')
                return result
            return resume_task_checkpoint
        self._replace('resume_task_checkpoint', factory)

    def patch_train_one_epoch(self) -> None:
        def factory(original):
            def train_one_epoch(epoch, *a, **kw):
                self.epoch = epoch
                self.verify_setup(a, kw)
                metrics = original(epoch, *a, **kw)
                if self.task is not None:
                    self._end_epoch(epoch)
                return metrics
            return train_one_epoch
        self._replace('train_one_epoch', factory)

    def _end_epoch(self, epoch: int) -> None:
        """Runs on every rank: consistency check, epoch means, one log line on the primary."""
        args = self.args
        if getattr(args, 'distributed', False):
            self.task.check_synchronized()
        kd = float('nan')
        if self._kd_sum is not None and self._kd_count:
            mean = (self._kd_sum / self._kd_count).reshape(1)
            if getattr(args, 'distributed', False):
                from timm import utils
                mean = utils.reduce_tensor(mean, args.world_size)
            kd = float(mean.item())
        self._kd_sum, self._kd_count = None, 0
        summary = self.task.meta_summary()
        self.epoch_stats = {
            'tau_t': summary['tau_t'],
            'tau_s': summary['tau_s'],
            'kd_loss': kd,
            'meta_loss': summary['meta_loss'],
            'meta_skipped': summary.get('meta_skipped', 0),
        }
        if self.is_primary():
            _logger.info(
                f'MKD epoch {epoch}: tau_t={summary["tau_t"]:.4f} tau_s={summary["tau_s"]:.4f} '
                f'kd_loss={kd:.4f} meta_loss={summary["meta_loss"]:.4f} '
                f'meta_steps={summary.get("meta_steps")} skipped={summary.get("meta_skipped")}')
