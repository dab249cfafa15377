"""Plain KD (timm's logit, feature and token tasks) with a local teacher, as train_mkd.py builds it.

``--teacher-checkpoint`` without ``--mkd`` builds timm's own distillation task around a teacher
from ``build_teacher``, then ``match_student_normalization`` gives the task the normalisation the
student's loader applies (``--mean``/``--std`` reduced to ``--in-chans``). timm's tasks take it from
the student's ``pretrained_cfg``: three ImageNet values, which broadcast a 1-channel batch to three
channels (the teacher's conv refuses it), and mis-scale RGB batches normalised with ``--mean``/``--std``.

Real timm tasks, real timm models, real Fashion-MNIST images.
"""
import argparse

import pytest
import timm
import torch
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask

from small_models import fmnist_batches
from timm_mkd import build_teacher
from timm_mkd.teacher import match_student_normalization

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
VIT = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)


def _student(kind: str, chans: int):
    if kind == 'token':
        return timm.create_model('deit_tiny_distilled_patch16_224', num_classes=10, in_chans=chans, **VIT)
    return timm.create_model('resnet10t', num_classes=10, in_chans=chans)


def _teacher_file(tmp_path, chans: int) -> str:
    """A resnet18 checkpoint in train.py's layout, recording the --mean/--std it was trained with."""
    torch.manual_seed(0)
    teacher = timm.create_model('resnet18', num_classes=10, in_chans=chans)
    path = tmp_path / f'teacher{chans}.pth.tar'
    args = argparse.Namespace(model='resnet18', mean=(FMNIST_MEAN,) * chans, std=(FMNIST_STD,) * chans)
    torch.save({'state_dict': teacher.state_dict(), 'args': args}, path)
    return str(path)


def _task(kind: str, student, teacher):
    if kind == 'logit':
        return LogitDistillationTask(student, teacher, verbose=False)
    if kind == 'feature':
        return FeatureDistillationTask(student, teacher, verbose=False)
    return TokenDistillationTask(student, teacher, verbose=False)


@pytest.mark.parametrize('chans', [1, 3])
@pytest.mark.parametrize('kind', ['logit', 'feature', 'token'])
def test_plain_kd_task_sees_what_the_loader_gives(tmp_path, kind, chans):
    """A training step runs, and the teacher gets the images normalised as it was trained."""
    student = _student(kind, chans)
    loader_mean, loader_std = (FMNIST_MEAN,) * chans, (FMNIST_STD,) * chans  # train.py: --mean/--std
    teacher = build_teacher('resnet18', student, checkpoint_path=_teacher_file(tmp_path, chans),
                            student_mean=loader_mean, student_std=loader_std)
    task = match_student_normalization(_task(kind, student, teacher), student, loader_mean, loader_std)

    x, y = fmnist_batches(4)  # normalised with the Fashion-MNIST statistics, like the loader
    x = torch.nn.functional.interpolate(x, size=32).expand(-1, chans, -1, -1).contiguous()
    teacher_input = task.teacher.normalize_input(x, task.student_mean, task.student_std)
    torch.testing.assert_close(teacher_input, x)  # teacher trained with the same statistics: unchanged

    task.train()
    out = task(x, y)
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    assert any(p.grad is not None for p in student.parameters())


def test_imagenet_statistics_reduce_to_the_channel_count(tmp_path):
    """Without --mean/--std the loader applies the averaged pretrained_cfg values to one channel."""
    student = _student('logit', 1)
    teacher = build_teacher('resnet18', student, checkpoint_path=_teacher_file(tmp_path, 1))
    cfg = student.pretrained_cfg
    task = match_student_normalization(LogitDistillationTask(student, teacher, verbose=False), student,
                                       cfg['mean'], cfg['std'])
    assert task.student_mean.shape == (1, 1, 1, 1)
    assert task.student_mean.item() == pytest.approx(sum(cfg['mean']) / 3)
