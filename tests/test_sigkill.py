"""A training process killed with SIGKILL mid-epoch resumes from its checkpoints with its temperatures.

The child is a real timm training loop (MKDTask + CheckpointSaver recovery checkpoints every few
steps + temperatures.csv); the parent kills it at an arbitrary moment, checks that every file it
left is readable (timm writes a temporary file and renames it; our CSV log flushes whole rows),
resumes from the newest recovery checkpoint with timm's resume_task_checkpoint, and compares the
temperatures and meta-optimizer state with what that checkpoint holds.
"""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from timm.task import resume_task_checkpoint

from timm_mkd import MKDTask

from small_models import SmallCNN, inside_bounds

CHILD = textwrap.dedent('''
    import argparse, sys, torch
    sys.path.insert(0, {tests!r})
    from timm.utils import CheckpointSaver
    from timm_mkd import MKDTask
    from timm_mkd.meta_log import TemperatureLog
    from small_models import SmallCNN, briefly_trained_teacher, fmnist_batches

    out = {out!r}
    teacher = briefly_trained_teacher()
    torch.manual_seed(0)
    student = SmallCNN(drop=0.1)
    task = MKDTask(student, teacher, meta_interval=2, meta_lr=0.05, tau_min=0.1, verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    task.attach(opt, [fmnist_batches(32, offset=9000)])
    log = TemperatureLog.in_dir(out, enabled=True)
    task.add_meta_callback(log.record)
    saver = CheckpointSaver(student, opt, args=argparse.Namespace(model='small'), checkpoint_dir=out,
                            recovery_dir=out, task=task, max_history=2)
    for step in range(100000):
        x, y = fmnist_batches(32, offset=(32 * step) % 8000)
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
        if step % 3 == 2:
            saver.save_recovery(epoch=0, batch_idx=step)
            print('saved', step, flush=True)
''')


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    out = str(tmp_path)
    script = CHILD.format(tests=os.path.dirname(__file__), out=out)
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    saves = 0
    deadline = time.time() + 120
    while saves < 5 and time.time() < deadline:  # let it write several recovery checkpoints
        line = proc.stdout.readline()
        saves += line.startswith('saved')
    time.sleep(0.37)  # then kill it at an arbitrary point, likely mid-step or mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and saves >= 5

    recoveries = sorted(glob.glob(os.path.join(out, 'recovery-*.pth.tar')), key=os.path.getmtime)
    assert recoveries
    for path in recoveries:  # every checkpoint left behind is complete
        torch.load(path, map_location='cpu', weights_only=False)
    newest = recoveries[-1]
    saved = torch.load(newest, map_location='cpu', weights_only=False)['task_state']['mkd']
    assert saved['meta_steps'] >= 1

    torch.manual_seed(1)
    student = SmallCNN(drop=0.1)
    task = MKDTask(student, SmallCNN(width=16, drop=0.0), meta_interval=2, meta_lr=0.05, tau_min=0.1, verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    resume_task_checkpoint(task, newest, optimizer=opt, log_info=False)
    assert torch.equal(task.tau.log_tau_t, saved['log_tau_t']) and torch.equal(task.tau.log_tau_s, saved['log_tau_s'])
    # the child's teacher calibrates inside the bounds, so the restored value is neither the initial 1 nor a bound
    assert task.temperatures()[0] != 1.0 and inside_bounds(task, task.temperatures()[0])
    state = task.meta_optimizer.state_dict()['state']
    for k, v in saved['meta_optimizer']['state'].items():
        for name, value in v.items():
            assert torch.equal(state[k][name], value)
    assert task.updates == saved['updates'] and task.meta_steps == saved['meta_steps']

    # The temperature log is whole rows, and holds the saved temperatures at the saved step.
    with open(os.path.join(out, 'temperatures.csv')) as f:
        rows = f.read().splitlines()
    header = rows[0].split(',')
    parsed = [dict(zip(header, r.split(','))) for r in rows[1:] if len(r.split(',')) == len(header)]
    at_save = [r for r in parsed if int(r['step']) == saved['updates']]
    if at_save:  # the save happens after the meta step of that update when both coincide
        assert float(at_save[-1]['tau_t']) == pytest.approx(task.temperatures()[0], rel=1e-6)
