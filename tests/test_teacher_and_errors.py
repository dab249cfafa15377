"""Teacher loading from every local format, and each bad input's clear error."""
import argparse
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_mkd import MKDTask, build_teacher
from timm_mkd.compat import UnsupportedTimmVersion, check_timm_version

from small_models import SmallCNN, fmnist_batches


def _student(num_classes=10):
    return timm.create_model('test_resnet', num_classes=num_classes, in_chans=1)


def _teacher(num_classes=10, name='test_resnet'):
    torch.manual_seed(7)
    return timm.create_model(name, num_classes=num_classes, in_chans=1).eval()


@pytest.mark.parametrize('fmt', ['safetensors', 'pth', 'state_dict', 'state_dict_ema', 'model'])
def test_local_teacher_checkpoint_formats_load(tmp_path, fmt):
    teacher = _teacher()
    sd = {f'module.{k}' if fmt == 'model' else k: v for k, v in teacher.state_dict().items()}  # DDP prefix too
    if fmt == 'safetensors':
        path = tmp_path / 't.safetensors'
        save_file(dict(teacher.state_dict()), str(path))
    elif fmt == 'pth':
        path = tmp_path / 't.pth'
        torch.save(sd, path)
    else:
        path = tmp_path / 't.pth.tar'
        torch.save({fmt: sd, 'epoch': 3, 'args': argparse.Namespace(model='test_resnet')}, path)
    wrapped = build_teacher('test_resnet', _student(), checkpoint_path=str(path))
    x, _ = fmnist_batches(4)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), teacher(x))
    assert not any(p.requires_grad for p in wrapped.parameters()) and not wrapped.training


def test_one_channel_student_keeps_one_channel_for_teacher():
    """The teacher's ImageNet 3-value mean must not broadcast a 1-channel batch to 3 channels."""
    task = MKDTask(_student(), _teacher(), verbose=False)
    x, _ = fmnist_batches(2)
    assert task.teacher.normalize_input(x, task.student_mean, task.student_std).shape == x.shape
    task(x, torch.tensor([0, 1]))  # runs end to end


def test_class_count_mismatch_module():
    with pytest.raises(ValueError, match='teacher predicts 5 classes but the student predicts 10'):
        MKDTask(_student(10), _teacher(5), verbose=False)


def test_class_count_mismatch_checkpoint(tmp_path):
    path = tmp_path / 't5.safetensors'
    save_file(dict(_teacher(5).state_dict()), str(path))
    with pytest.raises(ValueError, match=r"predicts 5 classes but the student predicts 10.*--num-classes 5"):
        MKDTask(_student(10), 'test_resnet', teacher_pretrained_path=str(path), verbose=False)


def test_missing_teacher_checkpoint_names_path(tmp_path):
    path = tmp_path / 'nowhere' / 'teacher.pth.tar'
    with pytest.raises(FileNotFoundError, match=str(path).replace('.', r'\.')):
        MKDTask(_student(), 'test_resnet', teacher_pretrained_path=str(path), verbose=False)


def test_corrupt_pth_checkpoint(tmp_path):
    good = tmp_path / 'good.pth.tar'
    torch.save({'state_dict': _teacher().state_dict()}, good)
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated, as after a crash
    with pytest.raises(ValueError, match=r"could not be read .*corrupt, truncated"):
        MKDTask(_student(), 'test_resnet', teacher_pretrained_path=str(bad), verbose=False)


def test_corrupt_safetensors_checkpoint(tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"not json')
    with pytest.raises(ValueError, match='not a readable safetensors file'):
        MKDTask(_student(), 'test_resnet', teacher_pretrained_path=str(bad), verbose=False)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / 'convnext.safetensors'
    save_file(dict(_teacher(name='test_convnext').state_dict()), str(path))
    with pytest.raises(ValueError, match=r"does not fit architecture .*missing.*--teacher"):
        MKDTask(_student(), 'test_resnet', teacher_pretrained_path=str(path), verbose=False)


def test_checkpoint_without_weights(tmp_path):
    path = tmp_path / 'empty.pth.tar'
    torch.save({'epoch': 1}, path)
    with pytest.raises(ValueError, match='holds no model weights'):
        MKDTask(_student(), 'test_resnet', teacher_pretrained_path=str(path), verbose=False)


@pytest.mark.parametrize('kwargs, match', [
    (dict(tau_min=4.0, tau_max=4.0), 'tau_min < tau_max'),
    (dict(tau_min=8.0, tau_max=2.0), 'tau_min < tau_max'),
    (dict(tau_min=0.0), 'must be > 0'),
    (dict(tau_t=30.0), 'outside the bounds'),
    (dict(tau_s=float('nan')), 'not finite'),
    (dict(meta_interval=0), 'meta_interval=0 must be an integer >= 1'),
    (dict(meta_lr=-1.0), 'meta_lr'),
    (dict(meta_optimizer='rmsprop'), 'unknown meta optimizer'),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MKDTask(SmallCNN(), SmallCNN(), verbose=False, **kwargs)


def test_timm_too_old_message():
    with pytest.raises(UnsupportedTimmVersion, match=r'timm >= 1\.0\.27.*timm 1\.0\.26 is installed.*pip install'):
        check_timm_version('1.0.26')
    check_timm_version('1.0.27')
    check_timm_version('1.0.29.dev0')
    check_timm_version('1.1.0')


def test_import_refuses_old_timm_in_real_interpreter():
    """A real interpreter whose timm reports 1.0.20 cannot import timm_mkd, and says why."""
    code = "import timm; timm.__version__ = '1.0.20'; import timm_mkd"
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert 'timm 1.0.20 is installed' in proc.stderr and 'timm>=1.0.27' in proc.stderr


def test_teacher_uses_the_normalisation_it_was_trained_with(tmp_path):
    """A train.py checkpoint records --mean/--std in its args; the teacher re-normalises to those."""
    path = tmp_path / 'teacher.pth.tar'
    torch.save({'state_dict': _teacher().state_dict(),
                'args': argparse.Namespace(model='test_resnet', mean=(0.2860,), std=(0.3530,))}, path)
    task = MKDTask(_student(), 'test_resnet', teacher_pretrained_path=str(path),
                   student_mean=(0.2860,), student_std=(0.3530,), verbose=False)
    assert task.teacher.mean_kd.flatten().tolist() == pytest.approx([0.2860])
    x, _ = fmnist_batches(2)
    assert torch.equal(task.teacher.normalize_input(x, task.student_mean, task.student_std), x)  # same stats
    # without recorded stats: the architecture's pretrained_cfg, reduced to one channel
    plain = tmp_path / 'plain.pth.tar'
    torch.save({'state_dict': _teacher().state_dict()}, plain)
    task = MKDTask(_student(), 'test_resnet', teacher_pretrained_path=str(plain), verbose=False)
    assert task.teacher.mean_kd.numel() == 1
