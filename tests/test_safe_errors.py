"""Error texts never recommend unsafe loading, and each names one fix."""
import argparse
import re

import pytest
import torch

from timm_mkd.safe_load import describe_load_error
from timm_mkd.teacher import read_checkpoint

UNSAFE = re.compile(r'weights_only`? (set to `?)?=?\s*`?False|weights_only=False|trusted source|trust the source')


class _NotATensor:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def _good(path):
    torch.save({'state_dict': {'w': torch.zeros(3)}, 'args': argparse.Namespace(model='resnet18')}, path)
    return path


def _truncated(path):
    data = open(_good(path), 'rb').read()
    open(path, 'wb').write(data[: len(data) // 2])


def _garbage(path):
    open(path, 'wb').write(b'\x80\x02not a checkpoint' * 8)


def _foreign_object(path):
    torch.save({'state_dict': {'w': torch.zeros(3)}, 'extra': _NotATensor()}, path)


@pytest.mark.parametrize('make, detail', [
    (_truncated, 'central directory'),
    (_garbage, 'UnpicklingError'),
    (_foreign_object, 'Unsupported global'),
])
def test_corrupt_teacher_checkpoint_message_is_safe(tmp_path, make, detail):
    path = str(tmp_path / 'teacher.pth.tar')
    make(path)
    with pytest.raises(Exception) as torch_error:  # torch's own text does carry the unsafe advice ...
        torch.load(path, map_location='cpu', weights_only=True)
    if make is not _truncated:
        assert UNSAFE.search(str(torch_error.value))
    with pytest.raises(ValueError) as info:  # ... ours does not
        read_checkpoint(path)
    message = str(info.value)
    assert not UNSAFE.search(message), message
    assert detail in message and path in message
    assert message.count('Fix:') == 1


def test_good_checkpoint_still_reads(tmp_path):
    path = _good(str(tmp_path / 'ok.pth.tar'))
    assert read_checkpoint(path)['args'].model == 'resnet18'


def test_describe_load_error_keeps_only_the_problem():
    error = RuntimeError('Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` '
                         'will likely succeed')
    assert describe_load_error(error) == 'RuntimeError: the file is not a checkpoint torch can read'
