"""MKD under real DDP: two processes, gloo backend on CPU, no mocks."""
import json
import os
import socket
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_mkd import MKDTask

from fmnist import fashion_mnist_root
from small_models import SmallCNN, fmnist_batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class _RecordingMeta:
    """Per-rank meta batches (a different slice per rank), remembering what was drawn."""

    def __init__(self, rank):
        self.rank, self.drawn, self.i = rank, [], 0

    def __iter__(self):
        return self

    def __next__(self):
        x, y = fmnist_batches(16, offset=10000 + 1000 * self.rank + 16 * self.i)
        self.i += 1
        self.drawn.append(float(x.sum()))
        return x, y


def _worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.manual_seed(0)  # identical initial student and teacher on every rank
    student, teacher = SmallCNN(drop=0.1), SmallCNN(width=16, drop=0.0)
    task = MKDTask(student, teacher, meta_interval=2, meta_lr=0.1, verbose=False)
    task.prepare_distributed()
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05, momentum=0.9)
    meta = _RecordingMeta(rank)
    temps = []
    task.add_meta_callback(lambda r: temps.append([r['tau_t'], r['tau_s']]))
    task.attach(opt, meta)
    torch.manual_seed(100 + rank)  # different dropout masks per rank
    for i in range(8):
        x, y = fmnist_batches(16, offset=2000 * rank + 16 * i)  # each rank its own data
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
    task.check_synchronized()
    mismatch_error = ''
    with torch.no_grad():
        if rank == 1:
            task.tau.log_tau_t.add_(0.01)
    try:
        task.check_synchronized()
    except RuntimeError as e:
        mismatch_error = str(e)
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump({'temps': temps, 'meta_drawn': meta.drawn, 'mismatch_error': mismatch_error}, f)
    # Tear down while the interpreter is fully alive. destroy_process_group() only unregisters the
    # group: DDP (inside the task) keeps the C++ ProcessGroupGloo alive, and task <-> optimizer form a
    # reference cycle (the meta-step hooks are bound methods of the task), so without this the group
    # died in the garbage collection of interpreter shutdown, where gloo's worker threads can hit a
    # half torn-down interpreter and abort ("terminate called without an active exception", SIGABRT).
    dist.barrier()
    ddp = weakref.ref(task.trainable_module)
    task.detach()  # breaks the cycle: the optimizer no longer holds the task
    del task, opt
    assert ddp() is None, 'the DDP wrapper (and its process group) outlived the task'
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_hold_identical_temperatures(tmp_path):
    fashion_mnist_root()  # skips here: a pytest.skip inside a spawned worker is an error of mp.spawn
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2))
    assert len(r0['temps']) == 1 + 4  # the warm start before the first update, then 4 meta steps
    assert r0['temps'] == r1['temps']  # bit-identical after every meta step
    assert r0['temps'][-1] != [1.0, 1.0]
    assert set(r0['meta_drawn']).isdisjoint(r1['meta_drawn'])  # each rank its own meta samples
    for r in (r0, r1):
        assert 'temperatures differ across ranks' in r['mismatch_error']


def test_release_frees_the_task_held_by_a_finished_run():
    """What train-mkd does after train.py's main(): the task (and any DDP group in it) is freed at once."""
    import gc
    import types

    from timm_mkd.launcher import load_adapters
    student, teacher = SmallCNN(), SmallCNN(width=16)
    task = MKDTask(student, teacher, meta_interval=2, verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    task.attach(opt, [fmnist_batches(8)])
    run = types.SimpleNamespace(task=task)
    alive = weakref.ref(task)
    del task
    gc.collect()
    assert alive() is not None  # the run and the optimizer's hooks hold it
    gc.disable()  # prove release() itself frees it, not a later automatic collection
    try:
        load_adapters().release(run)
        assert alive() is None and run.task is None
    finally:
        gc.enable()
    assert not opt._optimizer_step_post_hooks


_NO_FASHION_MNIST = """import timm_mkd.data.fashion_mnist
timm_mkd.data.fashion_mnist.DEBIAN_DIR = {missing!r}
"""


def test_distributed_test_skips_without_fashion_mnist(tmp_path):
    """Without Fashion-MNIST (in this process and in the workers it would spawn) the DDP test skips, not fails."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / 'sitecustomize.py').write_text(_NO_FASHION_MNIST.format(missing=str(tmp_path / 'absent')))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), repo, os.environ.get('PYTHONPATH', '')]),
               XDG_CACHE_HOME=str(tmp_path / 'cache'))
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider',
                           'tests/test_distributed.py::test_ranks_hold_identical_temperatures'],
                          capture_output=True, text=True, cwd=repo, env=env, timeout=300)
    assert proc.returncode == 0 and '1 skipped' in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Fashion-MNIST not found' in proc.stdout
