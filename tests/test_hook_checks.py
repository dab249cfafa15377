"""The launcher's run-time hook checks, in CI (no train.py needed).

``patches.common.MKDRun`` checks, while train.py runs, that its patches took effect: at the first
``train_one_epoch`` call (``verify_setup``), after the first optimizer step, and before the first
checkpoint. Here the run object is driven the way train.py's ``main()`` drives it, with a real
MKDTask, a real optimizer and timm's real CheckpointSaver; ``test_train_mkd_trainpy.py`` defeats
each hook inside a real, edited train.py.
"""
import argparse
import importlib.util
import os
import types

import pytest
import torch
from timm.utils import CheckpointSaver

from small_models import SmallCNN, fmnist_batches
from timm_mkd import MKDTask
from timm_mkd.cli import validate_mkd_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _patches():
    spec = importlib.util.spec_from_file_location('train_mkd_for_hooks', os.path.join(REPO, 'train_mkd.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_patches()


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

