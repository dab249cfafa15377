"""The benchmarks' teacher is a function of its draw seed (``benchmarks/quality.py``, ``--teacher-seed``).

torch's default generator starts each process from a random seed, so a teacher whose initialisation is drawn
before seeding differs from run to run, and a study's rows could not be re-run against the same teacher. Real
timm model, real Fashion-MNIST, two optimizer steps; the teacher cache goes to a temporary ``XDG_CACHE_HOME``.
"""
import os
import sys

import torch

from fmnist import fashion_mnist_root

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import quality  # noqa: E402


def _teacher_sha(tmp_path, monkeypatch, seed, cache):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / cache))
    args = quality.parse_args(['--tune', '--teacher', 'resnet10t', '--teacher-steps', '2', '--teacher-seed', str(seed)])
    _, _, teacher_train, _ = quality.datasets(args)
    quality.get_teacher(args, teacher_train, eval_loader=None)
    return args.teacher_sha


def test_teacher_depends_on_its_seed_only(tmp_path, monkeypatch):
    fashion_mnist_root()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    first = _teacher_sha(tmp_path, monkeypatch, 1000, 'a')
    torch.rand(100)  # the process's generator is elsewhere now; the teacher must not notice
    torch.manual_seed(2)
    assert _teacher_sha(tmp_path, monkeypatch, 1000, 'b') == first
    assert _teacher_sha(tmp_path, monkeypatch, 1001, 'c') != first


def test_teacher_hash_is_of_the_weights_not_the_file(tmp_path):
    """torch.save writes a random id into each file; the recorded hash must not see it."""
    from common import teacher_model
    model = teacher_model('resnet10t')
    for name in ('a.pth', 'b.pth'):
        torch.save(model.state_dict(), tmp_path / name)
    assert quality.weights_sha(tmp_path / 'a.pth') == quality.weights_sha(tmp_path / 'b.pth')
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1
    torch.save(model.state_dict(), tmp_path / 'c.pth')
    assert quality.weights_sha(tmp_path / 'c.pth') != quality.weights_sha(tmp_path / 'a.pth')
