"""Set-up failures inside train.py's main(): a user's mistake is one ``MKDSetupError`` line, a bug keeps its type.

``train_mkd.py`` prints an ``MKDSetupError`` as one line without a traceback, so only what the project and timm
raise about the user's inputs (bad values, missing files or folders, a teacher that does not fit) may become one;
a TypeError, KeyError or AssertionError from a bug must reach the user with its traceback. The run object is
driven the way train.py's ``main()`` drives it (as in ``test_hook_checks.py``), with real timm, a real MKDTask and
real Fashion-MNIST.
"""
import argparse
import re
import types

import pytest
import torch
from timm.data import create_dataset
from timm.task import LogitDistillationTask

from fmnist import fashion_mnist_root
from small_models import SmallCNN
from timm_mkd.cli import validate_mkd_args
from timm_mkd.launcher import load_adapters
from timm_mkd.data.meta_data import IndexSubset

patches = load_adapters()


def _run(**flags):
    """An MKDRun after train.py's argument parsing, with the data config train.py resolves for Fashion-MNIST."""
    args = argparse.Namespace(**{**dict(mkd=True, teacher='resnet18', batch_size=16, rank=0, local_rank=0,
                                        distributed=False, kd_distill_type='logit', model='small', seed=0, workers=0),
                                 **flags})
    run = patches.MKDRun(types.ModuleType('train_under_test'), 'test')
    run.args, run.opts = args, validate_mkd_args(args)
    run.data_config = {'mean': (0.2860,), 'std': (0.3530,), 'input_size': (1, 28, 28), 'crop_pct': 1.0,
                       'interpolation': 'bilinear'}
    return run


def _make_task(run, teacher):
    """train.py's ``LogitDistillationTask(...)`` call, through the patched factory."""
    torch.manual_seed(0)
    return run._make_task(LogitDistillationTask, 'logit', student_model=SmallCNN(), teacher_model=teacher,
                          criterion=torch.nn.CrossEntropyLoss(), device=torch.device('cpu'), dtype=torch.float32,
                          verbose=False)


def test_an_unknown_teacher_name_is_one_setup_line_naming_it():
    with pytest.raises(patches.MKDSetupError, match="unknown teacher model 'resnt18'"):
        _make_task(_run(teacher='resnt18'), 'resnt18')


def test_a_programming_error_building_the_task_keeps_its_type():
    """A teacher object of the wrong type can only come from code, not from a flag: TypeError, not a setup line;
    a teacher that does not fit the student stays one line."""
    with pytest.raises(TypeError, match='teacher must be a timm model name') as info:
        _make_task(_run(), 12345)
    assert not isinstance(info.value, patches.MKDSetupError)
    with pytest.raises(patches.MKDSetupError, match='teacher predicts 5 classes but the student predicts 10'):
        _make_task(_run(), SmallCNN(num_classes=5))


def _meta_set():
    ds = create_dataset('torch/fashion_mnist', root=fashion_mnist_root(), split='train', is_training=False,
                        download=False)
    return IndexSubset(ds, range(64))


def test_a_programming_error_building_the_meta_loader_keeps_its_type():
    """train.py always sets --seed; a namespace without one is a bug in the caller, reported as the TypeError it is."""
    run = _run(mkd_meta_data='0.05')
    run.meta_dataset = _meta_set()
    run.args.seed = None
    with pytest.raises(TypeError) as info:
        run._meta_batches()
    assert not isinstance(info.value, patches.MKDSetupError)


def test_a_meta_folder_that_does_not_exist_is_one_setup_line_naming_it(tmp_path):
    missing = tmp_path / 'no_meta_here'
    run = _run(mkd_meta_data=f'folder:{missing}')
    with pytest.raises(patches.MKDSetupError, match=re.escape(f'folder:{missing}: no such folder')):
        run._build_train_and_meta(create_dataset, ('torch/fashion_mnist',),
                                  dict(root=fashion_mnist_root(), split='train', is_training=True, download=False))
