"""What the run writes beside train.py's own outputs: the ``utils`` proxy, ``summary.csv``'s MKD columns, ``temperatures.csv``.

``OutputPatches`` is a mixin of ``MKDRun`` (``patches/run.py``): train.py's ``utils`` becomes a proxy
(``_UtilsProxy``) whose ``CheckpointSaver`` and ``update_summary`` learn the output folder and add
the MKD columns; timm's own ``timm.utils`` is untouched.
"""
import logging
import os
import types
from typing import Any, Dict, Optional

_logger = logging.getLogger('train_mkd')


class _UtilsProxy(types.ModuleType):
    """Stands in for ``timm.utils`` inside the loaded train.py only.

    Attribute reads fall through to ``timm.utils``; the overrides set on the proxy win. timm's
    own ``timm.utils`` module is left untouched for every other user in the process.
    """

    def __init__(self, base: types.ModuleType):
        super().__init__(base.__name__, getattr(base, '__doc__', None))
        self.__dict__['_base'] = base

    def __getattr__(self, name: str):
        return getattr(self.__dict__['_base'], name)


class OutputPatches:
    """Mixin of ``MKDRun``: ``utils.CheckpointSaver`` / ``utils.update_summary`` and the temperature log."""

    def forget_steps_after_resume(self, path: str) -> None:
        """Drop the meta steps an earlier run in this folder logged after the update this run starts from.

        train.py reuses the folder of ``--experiment``, and timm 1.0.31's ``--resume auto`` resumes in
        place: the rows the earlier run wrote after its checkpoint (until it was killed or ended)
        would otherwise be followed by the same steps logged again, and a fresh run (0 updates)
        would continue another run's log.
        """
        dropped = drop_logged_steps_after(path, self.task.updates)
        if dropped:
            _logger.info(f'MKD: dropped {dropped} meta steps after update {self.task.updates} from {path} '
                         f'(logged by an earlier run in this folder)')

    def patch_utils(self) -> None:
        """Install the ``utils`` proxy with the CheckpointSaver and update_summary overrides."""
        base = self.module.utils
        proxy = _UtilsProxy(base)
        run = self

        def CheckpointSaver(*a, **kw):  # noqa: N802 - stands in for the class
            saver = base.CheckpointSaver(*a, **kw)
            if run.opts is not None:
                run.watch_saver(saver)
            if run.task is not None:
                from timm_mkd.meta_log import TemperatureLog
                out = kw.get('checkpoint_dir')
                if out:
                    if run.is_primary():
                        run.forget_steps_after_resume(os.path.join(out, 'temperatures.csv'))
                    run.temp_log = TemperatureLog.in_dir(out, enabled=run.is_primary())
            return saver

        def update_summary(epoch, train_metrics, eval_metrics, filename, lr=None, write_header=None,
                           log_wandb=False):
            if run.epoch_stats is None:
                return base.update_summary(
                    epoch, train_metrics, eval_metrics, filename, lr=lr, write_header=write_header,
                    log_wandb=log_wandb)
            write_summary_row(
                epoch, train_metrics, eval_metrics, filename, lr=lr, write_header=write_header,
                log_wandb=log_wandb, extra=run.epoch_stats)
            run.summary_epochs.add(epoch)

        proxy.CheckpointSaver = CheckpointSaver
        proxy.update_summary = update_summary
        self.originals['utils'] = base
        self.module.utils = proxy


def drop_logged_steps_after(path: str, updates: int) -> int:
    """Remove the rows of ``temperatures.csv`` at ``path`` whose ``step`` is beyond ``updates``.

    A torn last row (a killed writer) goes too. The file is replaced atomically; a missing file
    or one without a ``step`` column is left alone (``TemperatureLog`` refuses a foreign header).

    Args:
        path: the ``temperatures.csv`` of the output folder.
        updates: optimizer updates the run starts from (0 for a fresh run).

    Returns:
        The number of rows removed.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, newline='') as f:
        lines = f.read().splitlines(keepends=True)
    columns = lines[0].strip().split(',') if lines else []
    if 'step' not in columns:
        return 0
    at = columns.index('step')
    keep = [lines[0]]
    for line in lines[1:]:
        fields = line.rstrip('\r\n').split(',')
        if line.endswith('\n') and len(fields) == len(columns) and fields[at].isdigit() and int(fields[at]) <= updates:
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)


def write_summary_row(epoch, train_metrics, eval_metrics, filename, lr=None, write_header=None,
                      log_wandb=False, extra: Optional[Dict[str, Any]] = None) -> None:
    """Append one epoch to ``summary.csv`` in timm's layout plus MKD columns at the end.

    timm's ``update_summary`` prefixes every training metric with ``train_``; the MKD values are
    the state of the run rather than training metrics, so they get their own unprefixed columns
    (``tau_t``, ``tau_s``, ``kd_loss``, ``meta_loss``, ``meta_skipped``) after timm's. The same row
    goes to wandb when train.py logs there.
    """
    import csv
    from collections import OrderedDict
    row = OrderedDict(epoch=epoch)
    row.update(('train_' + k, v) for k, v in train_metrics.items())
    if eval_metrics:
        row.update(('eval_' + k, v) for k, v in eval_metrics.items())
    if lr is not None:
        row['lr'] = lr
    for key, value in (extra or {}).items():
        row[key] = value
    if log_wandb:
        import wandb
        wandb.log(row)
    if write_header is None:
        write_header = not os.path.exists(filename) or os.path.getsize(filename) == 0
    with open(filename, mode='a') as f:
        writer = csv.DictWriter(f, fieldnames=list(row.keys()))
        if write_header:
            writer.writeheader()
        writer.writerow(row)
