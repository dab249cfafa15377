"""Student export: checkpoint -> model.safetensors + mkd_student.json -> timm.create_model, bit-exact.

The checkpoint is written by timm's own CheckpointSaver around a real MKDTask whose temperatures
moved through real meta steps on Fashion-MNIST, with train.py-shaped args (a ViT student built
with --model-kwargs, 1 input channel, 10 classes): the layout train-mkd runs write.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from timm.utils import CheckpointSaver

from timm_mkd import MKDTask
from timm_mkd.export import EXPORT_JSON, WEIGHTS_FILE, ExportError, export_run, load_student

from small_models import briefly_trained_teacher, fmnist_batches, inside_bounds

MODEL = 'vit_tiny_patch16_224'
MODEL_KWARGS = {'img_size': 28, 'patch_size': 7, 'depth': 2, 'embed_dim': 48, 'num_heads': 3}
ARGS = argparse.Namespace(model=MODEL, model_kwargs=MODEL_KWARGS, num_classes=10, in_chans=1, input_size=None,
                          img_size=28, mean=[0.2860], std=[0.3530], crop_pct=None, interpolation='',
                          mkd=True, kd_model_name='smallcnn', mkd_meta_interval=2, lr=0.01, epochs=1)


def _student():
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=10, in_chans=1, **MODEL_KWARGS)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A run folder with model_best.pth.tar of an MKD student after 3 meta steps."""
    out = tmp_path_factory.mktemp('run')
    teacher = briefly_trained_teacher()  # calibrates inside [tau_min, tau_max], so the exported tau_t is not a bound
    student = _student()
    torch.manual_seed(1)
    task = MKDTask(student, teacher, meta_interval=2, meta_lr=0.1, tau_t=2.0, tau_s=3.0, tau_min=0.25,
                   learn_tau_s=False, verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    task.attach(opt, [fmnist_batches(16, offset=5000)])
    for i in range(6):
        x, y = fmnist_batches(16, offset=16 * i)
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
    assert task.meta_steps == 1 + 3  # the warm start before the first update, then updates 2, 4, 6
    assert inside_bounds(task, task.temperatures()[0]) and task.temperatures()[1] == 3.0
    saver = CheckpointSaver(model=student, optimizer=opt, args=ARGS, checkpoint_dir=str(out),
                            recovery_dir=str(out), task=task)
    saver.save_checkpoint(epoch=0, metric=42.5)
    assert (out / 'model_best.pth.tar').is_file()
    return str(out), student.eval(), task.temperatures()


def test_round_trip_through_timm_create_model(run_dir, tmp_path):
    src, student, (tau_t, tau_s) = run_dir
    weights = export_run(src, str(tmp_path / 'export'))
    assert weights == str(tmp_path / 'export' / WEIGHTS_FILE)
    info = json.loads((tmp_path / 'export' / EXPORT_JSON).read_text())
    assert info['temperatures']['tau_t'] == pytest.approx(tau_t, rel=1e-6)
    assert info['temperatures']['tau_s'] == pytest.approx(tau_s, rel=1e-6)
    assert (tau_t, tau_s) != (2.0, 3.0) and info['temperatures']['meta_steps'] == 1 + 3
    assert info['metric'] == 42.5 and info['epoch'] == 0
    assert info['train_args']['model_kwargs'] == MODEL_KWARGS and info['train_args']['mkd'] is True

    cfg = info['create_model']
    assert cfg['pretrained_cfg_overlay']['file'] == weights
    assert timm.models.get_pretrained_cfg(MODEL).custom_load  # the .npz loader the overlay must switch off
    model = timm.create_model(**cfg).eval()  # the documented route: pretrained_cfg_overlay=dict(file=...)
    x, _ = fmnist_batches(8, split='test')
    with torch.no_grad():
        assert torch.equal(model(x), student(x))
    assert tuple(timm.data.resolve_data_config(model=model)['mean']) == (0.2860,)


def test_load_student_after_moving_the_folder(run_dir, tmp_path):
    src, student, _ = run_dir
    export_run(src, str(tmp_path / 'a'))
    shutil.move(str(tmp_path / 'a'), str(tmp_path / 'b'))
    model = load_student(str(tmp_path / 'b')).eval()
    x, _ = fmnist_batches(4, split='test')
    with torch.no_grad():
        assert torch.equal(model(x), student(x))


def test_command_line(run_dir, tmp_path):
    src, _, _ = run_dir
    out = tmp_path / 'cli'
    result = subprocess.run([sys.executable, '-m', 'timm_mkd.export', src, '--out', str(out)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr
    assert 'tau_t=' in result.stdout and (out / WEIGHTS_FILE).is_file() and (out / EXPORT_JSON).is_file()


def test_errors_name_the_fix(tmp_path, run_dir):
    with pytest.raises(ExportError, match='holds neither model_best.pth.tar nor last.pth.tar.*Fix:'):
        export_run(str(tmp_path))
    with pytest.raises(ExportError, match='run folder not found.*Fix:'):
        export_run(str(tmp_path / 'missing'))
    with pytest.raises(ExportError, match='no EMA weights.*Fix: drop --ema'):
        export_run(run_dir[0], str(tmp_path / 'x'), ema=True)
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'last.pth.tar').write_bytes(b'\x80\x02not a checkpoint' * 4)
    with pytest.raises(ExportError) as info:
        export_run(str(bad))
    assert 'weights_only=False' not in str(info.value) and 'Fix:' in str(info.value)
