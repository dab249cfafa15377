"""MKDTask under the task API of newer timm (checkpoint state, EMA, milestones, no_sync, evaluator).

timm >= 1.0.29 saves and restores a task through ``TrainingTask.get_checkpoint_state`` /
``load_checkpoint_state``, train.py runs gradient-accumulation micro-batches under ``task.no_sync()``,
validates with ``task.create_evaluator()``, and timm 1.0.31's train.py adds milestone checkpoints
(``CheckpointSaver.save_milestone``) read back with ``load_checkpoint_metadata``. Each test skips
(naming what is missing) on a timm without that API, e.g. 1.0.27. Real timm, real torch, real
Fashion-MNIST; DDP is a real one-process gloo group.
"""
import argparse
import os
import socket

import pytest
import torch
import torch.distributed as dist
import timm.task
import timm.utils
from timm.data import create_dataset
from timm.task import TrainingTask, resume_task_checkpoint

from fmnist import fashion_mnist_root
from small_models import SmallCNN, fmnist_batches
from timm_mkd import MKDTask
from timm_mkd.data.meta_data import IndexSubset, build_meta_loader


def needs(owner, *names):
    missing = [n for n in names if not hasattr(owner, n)]
    return pytest.mark.skipif(bool(missing), reason=f'this timm has no {", ".join(missing)}')


def _meta_loader():
    ds = create_dataset('torch/fashion_mnist', root=fashion_mnist_root(), split='train', is_training=False,
                        download=False)
    return build_meta_loader(IndexSubset(ds, range(20000, 20064)), input_size=(1, 28, 28), batch_size=16,
                             mean=(0.2860,), std=(0.3530,), seed=0)


def _task(seed=0, ema=False):
    torch.manual_seed(100)
    teacher = SmallCNN(width=16, drop=0.0)  # the same teacher in every run (it is not in checkpoints)
    torch.manual_seed(seed)
    student = SmallCNN(drop=0.1)
    task = MKDTask(student, teacher, meta_interval=2, meta_lr=0.05, verbose=False)
    if ema:
        task.setup_ema(decay=0.9)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05, momentum=0.9)
    task.attach(optimizer, _meta_loader())
    return task, optimizer


def _train(task, optimizer, updates, accum=1, offset=0):
    """train.py's loop: ``accum`` micro-batches per update, all but the last under ``task.no_sync()``."""
    task.train()
    for i in range(updates * accum):
        x, y = fmnist_batches(16, offset=offset + 16 * i)
        last = (i + 1) % accum == 0
        with (task.no_sync() if not last else torch.enable_grad()):
            (task(x, y)['loss'] / accum).backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()
            task.update_ema()


@needs(TrainingTask, 'get_checkpoint_state', 'load_checkpoint_state')
@needs(timm.utils.CheckpointSaver, 'save_milestone')
@needs(timm.utils, 'load_checkpoint_metadata')
def test_milestone_checkpoint_carries_mkd_state_and_resumes(tmp_path):
    task, optimizer = _task(ema=True)
    _train(task, optimizer, updates=5)  # the warm start before update 1, meta steps at updates 2 and 4
    state = task.get_checkpoint_state()
    assert 'mkd' in state['task_state'] and state['task_state']['mkd']['meta_steps'] == 3
    assert not any(k.startswith(('teacher', 'tau')) for k in state['state_dict'])
    ema_state = task.get_checkpoint_state(ema=True)
    assert set(ema_state) == {'state_dict_ema'}  # the temperatures belong to the training state only
    assert set(ema_state['state_dict_ema']) == set(state['state_dict'])

    saver = timm.utils.CheckpointSaver(task.get_trainable_module(), optimizer, args=argparse.Namespace(model='small'),
                                       checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task)
    saver.save_checkpoint(0, metric=1.0)
    milestone = saver.save_milestone(1)
    metadata = timm.utils.load_checkpoint_metadata(milestone)  # weights_only=True read
    assert metadata['task_state']['mkd']['meta_data'] == task.get_task_state()['mkd']['meta_data']

    fresh, fresh_optimizer = _task(seed=1, ema=True)
    resume_task_checkpoint(fresh, milestone, optimizer=fresh_optimizer, log_info=False)
    timm.task.load_task_ema_checkpoint(fresh, milestone)
    assert fresh.temperatures() == task.temperatures() and fresh.temperatures() != (1.0, 1.0)
    assert (fresh.updates, fresh.meta_steps) == (5, 3)
    for a, b in zip(fresh.get_trainable_module(ema=True).state_dict().values(),
                    task.get_trainable_module(ema=True).state_dict().values()):
        assert torch.equal(a, b)
    # both continue identically: same next meta batch, same temperatures after the next meta step
    for t, opt in ((task, optimizer), (fresh, fresh_optimizer)):
        torch.manual_seed(7)  # the same dropout masks
        _train(t, opt, updates=1, offset=4000)
    assert fresh.meta_steps == task.meta_steps == 4
    assert fresh.temperatures() == pytest.approx(task.temperatures(), rel=1e-6)


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_no_sync_with_gradient_accumulation(one_process_group):
    """Micro-batches under task.no_sync() skip DDP's all-reduce; the meta step counts optimizer updates."""
    task, _ = _task()
    task.prepare_distributed()
    ddp = task.get_trainable_module()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    task.attach(optimizer, _meta_loader())
    with task.no_sync():
        assert ddp.require_backward_grad_sync is False
    assert ddp.require_backward_grad_sync is True
    _train(task, optimizer, updates=4, accum=3)  # 12 micro-batches, 4 updates
    assert (task.updates, task.meta_steps, task.meta_skipped) == (4, 1 + 2, 0)
    assert task.temperatures() != (1.0, 1.0)


@needs(TrainingTask, 'create_evaluator')
def test_evaluator_scores_the_student():
    task, optimizer = _task()
    _train(task, optimizer, updates=4)
    evaluator = task.create_evaluator()
    model = task.get_eval_model()
    assert model is task.get_trainable_module()  # the student, never the teacher
    model.eval()
    with torch.no_grad():
        x, y = fmnist_batches(64, split='test')
        evaluator.update(model(x), y)
    metrics = evaluator.compute()
    assert 0.0 <= metrics['top1'] <= 100.0 and torch.isfinite(torch.tensor(metrics['loss']))
