"""The launcher's run-time hook checks, in CI (no train.py needed).

``patches.common.MKDRun`` checks, while train.py runs, that its patches took effect: at the first
``train_one_epoch`` call (``verify_setup``), after the first optimizer step, and before the first
checkpoint. Here the run object is driven the way train.py's ``main()`` drives it, with a real
MKDTask, a real optimizer and timm's real CheckpointSaver; ``test_train_mkd_trainpy.py`` defeats
each hook inside a real, edited train.py.
"""
import argparse
import os
import types

import pytest
import torch
from timm.utils import CheckpointSaver

from small_models import SmallCNN, fmnist_batches
from timm_mkd import MKDTask
from timm_mkd.cli import validate_mkd_args



def _patches():
    from timm_mkd.launcher import load_adapters
    return load_adapters()


patches = _patches()


class Setup:
    """What train.py's main() has built by its first train_one_epoch call, wired into an MKDRun."""

    def __init__(self, tmp_path, saver_task=True):
        torch.manual_seed(0)
        self.student = SmallCNN(drop=0.1)
        self.task = MKDTask(self.student, SmallCNN(width=16, drop=0.0), meta_interval=2, verbose=False)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.05)
        self.task.attach(self.optimizer, 'train')
        self.args = argparse.Namespace(mkd=True, teacher='resnet18', batch_size=16, rank=0, local_rank=0,
                                       distributed=False, kd_distill_type='logit', model='small')
        self.run = patches.MKDRun(types.ModuleType('train_under_test'), 'test')
        self.run.args, self.run.opts, self.run.task = self.args, validate_mkd_args(self.args), self.task
        self.out = tmp_path
        self.saver = CheckpointSaver(self.student, self.optimizer, args=self.args, checkpoint_dir=str(tmp_path),
                                     recovery_dir=str(tmp_path), task=self.task if saver_task else None)
        self.run.watch_saver(self.saver)

    def start_epoch(self, optimizer=None):
        self.run.verify_setup((self.student, None, optimizer or self.optimizer, self.args),
                              {'task': self.task, 'saver': self.saver})

    def step(self, through_task=True):
        x, y = fmnist_batches(16)
        self.task.train()
        if through_task:
            loss = self.task(x, y)['loss']
        else:
            loss = torch.nn.functional.cross_entropy(self.student(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def checkpoints(self):
        return [f for f in os.listdir(self.out) if f.endswith('.pth.tar')]


def test_every_hook_in_place_passes(tmp_path):
    s = Setup(tmp_path)
    s.start_epoch()
    for _ in range(3):
        s.step()
    s.run.summary_epochs.add(0)  # train.py wrote epoch 0's summary row through the utils proxy
    s.saver.save_checkpoint(0, metric=1.0)
    assert 'last.pth.tar' in s.checkpoints() and s.task.meta_steps == 1


def test_optimizer_step_without_a_task_forward_is_stopped(tmp_path):
    s = Setup(tmp_path)
    s.start_epoch()
    with pytest.raises(patches.MKDSetupError, match='the meta step hook .* without a training forward'):
        s.step(through_task=False)


def test_another_optimizer_is_stopped(tmp_path):
    s = Setup(tmp_path)
    other = torch.optim.SGD(s.student.parameters(), lr=0.05)
    with pytest.raises(patches.MKDSetupError, match='the meta step hook .* another optimizer'):
        s.start_epoch(optimizer=other)


def test_saver_without_the_task_is_stopped(tmp_path):
    s = Setup(tmp_path, saver_task=False)
    with pytest.raises(patches.MKDSetupError, match='the checkpoint hook .* would not carry the temperatures'):
        s.start_epoch()


def test_summary_without_mkd_columns_is_stopped_before_the_checkpoint(tmp_path):
    s = Setup(tmp_path)
    s.start_epoch()
    s.step()
    with pytest.raises(patches.MKDSetupError, match='the summary columns hook .* epoch 0') as e:
        s.saver.save_checkpoint(0, metric=1.0)
    assert 'Fix: use the unmodified train.py' in str(e.value)
    assert s.checkpoints() == []


# ------------------------------------------------------------------ a run going on in an earlier run's folder

def _log_steps(path_dir, steps, torn=False):
    from timm_mkd.meta_log import TemperatureLog
    log = TemperatureLog.in_dir(str(path_dir), enabled=True)
    for step in steps:
        log.record({'step': step, 'epoch': step // 11, 'tau_t': 1.0, 'tau_s': 1.0, 'meta_loss': 2.0,
                    'hypergrad_t': 0.0, 'hypergrad_s': 0.0, 'skipped': 0})
    log.close()
    if torn:
        with open(path_dir / 'temperatures.csv', 'a') as f:
            f.write('24,2,1.0')  # a kill mid-write


@pytest.mark.parametrize('updates, kept', [(11, [2, 4, 6, 8, 10]), (0, []), (30, list(range(2, 23, 2)))])
def test_steps_after_the_resumed_update_are_dropped(tmp_path, updates, kept):
    """In-place resume (train.py reuses --experiment's folder; timm 1.0.31: --resume auto) from update
    ``updates``: the earlier run's rows after it would be logged twice; a fresh run (0) starts a new log."""
    import csv
    from timm_mkd.meta_log import TemperatureLog
    _log_steps(tmp_path, range(2, 23, 2), torn=True)
    run = Setup(tmp_path).run
    run.task.updates = updates
    run.forget_steps_after_resume(str(tmp_path / 'temperatures.csv'))
    with open(tmp_path / 'temperatures.csv') as f:
        assert [int(r['step']) for r in csv.DictReader(f)] == kept
    log = TemperatureLog.in_dir(str(tmp_path), enabled=True)  # the resumed run appends to what is left
    log.record({'step': updates + 2})
    log.close()
    with open(tmp_path / 'temperatures.csv') as f:
        assert [int(r['step']) for r in csv.DictReader(f)] == kept + [updates + 2]
