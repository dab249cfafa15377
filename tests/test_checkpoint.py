"""Temperatures and meta-optimizer state through timm's CheckpointSaver and resume_task_checkpoint."""
import argparse

import pytest
import torch
from timm.task import resume_task_checkpoint, load_task_ema_checkpoint
from timm.utils import CheckpointSaver

from timm_mkd import MKDTask

from small_models import SmallCNN, fmnist_batches


def _make(seed=0):
    torch.manual_seed(seed)
    student = SmallCNN(drop=0.0)
    teacher = SmallCNN(width=16, drop=0.0)
    torch.manual_seed(123)  # same teacher weights in every call
    teacher = SmallCNN(width=16, drop=0.0)
    task = MKDTask(student, teacher, meta_interval=2, meta_lr=0.1, tau_t=3.0, tau_s=5.0, verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    task.setup_ema(decay=0.9)
    # One meta batch: the meta loader's position is not checkpointed (as timm restarts its train loader).
    task.attach(opt, [fmnist_batches(32, offset=2000)])
    return task, opt


def _train(task, opt, steps, offset):
    for i in range(steps):
        x, y = fmnist_batches(32, offset=offset + 32 * i)
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
        task.update_ema(step=task.updates)


def test_round_trip_through_checkpoint_saver(tmp_path):
    task, opt = _make()
    _train(task, opt, 6, 0)
    assert task.meta_steps == 1 + 3 and task.temperatures() != (3.0, 5.0)  # the warm start, then 3
    saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=opt, args=argparse.Namespace(model='small'),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task)
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = tmp_path / 'last.pth.tar'

    resumed, opt2 = _make(seed=1)
    epoch = resume_task_checkpoint(resumed, str(path), optimizer=opt2, log_info=False)
    load_task_ema_checkpoint(resumed, str(path))
    assert epoch == 1
    assert resumed.temperatures() == task.temperatures()
    assert torch.equal(resumed.tau.log_tau_t, task.tau.log_tau_t) and torch.equal(resumed.tau.log_tau_s, task.tau.log_tau_s)
    a, b = task.meta_optimizer.state_dict(), resumed.meta_optimizer.state_dict()
    assert a['param_groups'] == b['param_groups']
    for k in a['state']:
        for name, value in a['state'][k].items():
            assert torch.equal(value, b['state'][k][name]), name
    assert (resumed.updates, resumed.meta_steps) == (task.updates, task.meta_steps)

    # Continuing both gives bit-identical temperatures: nothing the meta step depends on was lost.
    _train(task, opt, 4, 1000)
    _train(resumed, opt2, 4, 1000)
    assert resumed.temperatures() == task.temperatures()


def test_student_checkpoint_stays_plain(tmp_path):
    task, opt = _make()
    _train(task, opt, 2, 0)
    saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=opt, args=argparse.Namespace(model='small'),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task)
    saver.save_checkpoint(epoch=0, metric=1.0)
    ckpt = torch.load(tmp_path / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert 'mkd' in ckpt['task_state'] and 'task_state_ema' not in ckpt
    fresh = SmallCNN(drop=0.0)
    fresh.load_state_dict(ckpt['state_dict'], strict=True)  # no teacher or temperature keys
    fresh.load_state_dict(ckpt['state_dict_ema'], strict=True)


def test_resume_from_plain_checkpoint_keeps_initial_temperatures(tmp_path):
    task, opt = _make()
    torch.save({'state_dict': task.trainable_module.state_dict(), 'epoch': 3}, tmp_path / 'plain.pth')
    fresh, opt2 = _make()
    resume_task_checkpoint(fresh, str(tmp_path / 'plain.pth'), optimizer=opt2, log_info=False)
    assert fresh.temperatures() == (3.0, 5.0)


def test_loaded_temperatures_are_projected_onto_the_bounds(caplog):
    """A state saved at tau_t 10 resumed by a run with tau_max 4 trains at 4, and the log names the bound."""
    torch.manual_seed(123)
    teacher = SmallCNN(width=16, drop=0.0)
    saved = MKDTask(SmallCNN(drop=0.0), teacher, tau_t=10.0, tau_s=1.0, learn_tau_s=False, verbose=False)
    state = saved.get_task_state()
    resumed = MKDTask(SmallCNN(drop=0.0), teacher, tau_t=2.0, tau_s=1.0, tau_max=4.0, learn_tau_s=False,
                      verbose=False)
    with caplog.at_level('WARNING', logger='timm_mkd'):
        resumed.load_task_state(state)
    assert resumed.temperatures() == (4.0, 1.0)
    assert any('tau_t=10' in r.getMessage() and 'tau_max=4' in r.getMessage() for r in caplog.records), caplog.text
    x, y = fmnist_batches(8)
    assert float(resumed(x, y)['tau_t']) == 4.0


def _skipping_task():
    """A task whose every meta step is skipped: the one meta batch holds an infinite pixel in every image."""
    torch.manual_seed(123)
    teacher = SmallCNN(width=16, drop=0.0)
    torch.manual_seed(0)
    student = SmallCNN(drop=0.0)
    task = MKDTask(student, teacher, meta_interval=1, verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    xm, ym = fmnist_batches(16, offset=4000)
    xm = xm.clone()
    xm[:, 0, 0, 0] = float('inf')
    task.attach(opt, [(xm, ym)])
    return task, opt


def test_skips_in_a_row_travel_in_the_task_state():
    """The skip policy's in-a-row count survives a resume, so 10 skips in a row are reported across it."""
    task, opt = _skipping_task()
    with pytest.warns(RuntimeWarning, match='skipped'):
        _train(task, opt, 3, 0)
    assert task.meta.skips.in_a_row == 4  # the warm start before the first update and 3 meta steps
    state = task.get_task_state()
    resumed, _ = _skipping_task()
    resumed.load_task_state(state)
    assert resumed.meta.skips.in_a_row == 4 and resumed.meta_skipped == 4

    del state['mkd']['meta_skipped_in_a_row']  # a state saved before the count was in it
    older, _ = _skipping_task()
    older.load_task_state(state)
    assert older.meta.skips.in_a_row == 0 and older.meta_skipped == 4


def test_a_state_saved_with_tau_s_held_names_the_setting_to_resume_with():
    """A checkpoint of a run that held tau_s (the default before 0.3.0) resumed under the tied default: one error
    naming learn_tau_s=False, raised before any temperature changes; with that setting it resumes."""
    import pytest
    teacher = SmallCNN(width=16, drop=0.0)
    saved = MKDTask(SmallCNN(drop=0.0), teacher, tau_t=3.0, learn_tau_s=False, verbose=False)
    state = saved.get_task_state()
    tied = MKDTask(SmallCNN(drop=0.0), teacher, verbose=False)
    with pytest.raises(RuntimeError, match=r'saved with 1 learnable temperature\(s\), this run learns 2; resume with '
                                           r'learn_tau_s=False'):
        tied.load_task_state(state)
    assert tied.temperatures() == (1.0, 1.0)
    held = MKDTask(SmallCNN(drop=0.0), teacher, learn_tau_s=False, verbose=False)
    held.load_task_state(state)
    assert held.temperatures() == (3.0, 1.0)
    with pytest.raises(RuntimeError, match=r'saved with 2 learnable .* learns 1; resume with learn_tau_t=True and '
                                           r'learn_tau_s=True'):
        held.load_task_state(tied.get_task_state())


def test_a_resume_takes_this_runs_meta_lr_and_keeps_the_moments(caplog):
    """A checkpoint saved at another meta lr (an earlier default, or a changed --mkd-meta-lr): the Adam moments come
    back, the learning rate is this run's, and a warning names both."""
    import logging
    task, opt = _make()
    _train(task, opt, 6, 0)
    state = task.get_task_state()
    teacher = SmallCNN(width=16, drop=0.0)
    resumed = MKDTask(SmallCNN(drop=0.0), teacher, meta_interval=2, meta_lr=0.005, tau_t=3.0, tau_s=5.0,
                      verbose=False)
    with caplog.at_level(logging.WARNING, logger='timm_mkd'):
        resumed.load_task_state(state)
    assert [g['lr'] for g in resumed.meta_optimizer.param_groups] == [0.005]
    saved, now = task.meta_optimizer.state_dict()['state'], resumed.meta_optimizer.state_dict()['state']
    assert saved.keys() == now.keys() and all(torch.equal(saved[k]['exp_avg'], now[k]['exp_avg']) for k in saved)
    assert "ran at meta_lr=0.1; this run continues at meta_lr=0.005" in caplog.text

    caplog.clear()
    same = MKDTask(SmallCNN(drop=0.0), teacher, meta_interval=2, meta_lr=0.1, tau_t=3.0, tau_s=5.0, verbose=False)
    with caplog.at_level(logging.WARNING, logger='timm_mkd'):
        same.load_task_state(state)
    assert [g['lr'] for g in same.meta_optimizer.param_groups] == [0.1] and 'meta_lr' not in caplog.text
