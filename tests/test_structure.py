"""The shape of the code: file and class sizes, ``--help`` without torch, one MKDConfig, estimators."""
import ast
import math
import os
import subprocess
import sys

import pytest
import torch

from small_models import SmallCNN, fmnist_batches
from test_train_mkd import skeleton, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(*tops):
    """Every ``.py`` file under ``tops`` (subpackages included), sorted."""
    found = []
    for top in tops:
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = sorted(d for d in dirs if d != '__pycache__')
            found += [os.path.join(folder, f) for f in sorted(files) if f.endswith('.py')]
    return found


SOURCES = _sources('timm_mkd', 'patches')


@pytest.mark.parametrize('path', SOURCES, ids=lambda p: os.path.relpath(p, REPO))
def test_files_and_classes_are_small(path):
    with open(path) as f:
        text = f.read()
    assert len(text.splitlines()) <= 350
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= 200, node.name


def test_every_package_folder_is_a_listed_package():
    """Each folder of ``timm_mkd`` with Python files has an ``__init__.py`` and is in setup.cfg's ``packages``
    (else the wheel would leave it out)."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, 'setup.cfg'))
    listed = set(cfg['options']['packages'].split())
    folders = {os.path.dirname(p) for p in _sources('timm_mkd')}
    assert SOURCES and any(os.sep + 'meta' + os.sep in p for p in SOURCES)  # the walk reaches the subpackages
    for folder in folders:
        assert os.path.isfile(os.path.join(folder, '__init__.py')), folder
        assert os.path.relpath(folder, REPO).replace(os.sep, '.') in listed, folder


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), **extra)
    env.pop('TIMM_TRAIN_PY', None)
    env.update(extra)
    return env


def test_help_without_train_py_imports_neither_torch_nor_timm(tmp_path):
    """``python -X importtime train_mkd.py --help`` with no train.py to find: MKD's help, no torch, no timm."""
    proc = subprocess.run([sys.executable, '-X', 'importtime', os.path.join(REPO, 'train_mkd.py'), '--help'],
                          capture_output=True, text=True, cwd=str(tmp_path),
                          env=_env(TIMM_TRAIN_PY=str(tmp_path / 'absent.py')))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '--mkd-tau-t' in proc.stdout
    imported = [line.rsplit('|', 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith('import time:')]
    assert 'timm_mkd.cli' in imported and 'timm_mkd._patches.probe' in imported  # the adapters were loaded
    heavy = [m for m in imported if m.split('.')[0] in ('torch', 'timm')]
    assert not heavy, heavy[:5]


_FIRST_IMPORT = '''
import runpy, sys, traceback
found = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm') and not found:
            stack = traceback.extract_stack()
            if not any(f.name == 'find_spec' and 'importlib' in f.filename for f in stack[:-1]):
                found.append([f.filename for f in stack])
        return None
sys.meta_path.insert(0, Watch())
sys.argv = [sys.argv[1], '--help']
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
except SystemExit:
    pass
print('FIRST-HEAVY-IMPORT-FROM', found[0] if found else None)
'''


def test_torch_and_timm_are_first_imported_by_train_py(tmp_path):
    """With a train.py found, the first import of torch or timm happens inside that file's own imports."""
    train_py = write(tmp_path, 'train.py', skeleton())
    proc = subprocess.run([sys.executable, '-c', _FIRST_IMPORT, os.path.join(REPO, 'train_mkd.py')],
                          capture_output=True, text=True, cwd=str(tmp_path), env=_env(TIMM_TRAIN_PY=train_py))
    line = [x for x in proc.stdout.splitlines() if x.startswith('FIRST-HEAVY-IMPORT-FROM')]
    assert line and train_py in line[0], proc.stdout[-2000:] + proc.stderr[-2000:]


def test_one_config_holds_the_defaults():
    from timm_mkd import MKDConfig, MKDTask
    from timm_mkd.cli import CONFIG_FIELDS, MKD_DESTS, temperature_mode
    import inspect
    defaults = MKDConfig.defaults()
    for dest, name in CONFIG_FIELDS.items():
        expected = temperature_mode(defaults[name], defaults['learn_tau_s']) if name == 'tie_temperatures' \
            else defaults[name]
        assert MKD_DESTS[dest] == expected, dest
    params = inspect.signature(MKDTask).parameters
    assert {name: params[name].default for name in defaults} == defaults
    assert all(params[name].kind == inspect.Parameter.KEYWORD_ONLY for name in defaults)
    assert not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert '__signature__' not in vars(MKDTask.__init__)  # the real signature, not a patched one
    with pytest.raises(TypeError, match="unexpected keyword argument 'tau'"):
        MKDTask(SmallCNN(), SmallCNN(width=16), verbose=False, tau=2.0)
    task = MKDTask(SmallCNN(), SmallCNN(width=16), verbose=False, config=MKDConfig(tau_t=2.0, tau_s=2.0), meta_lr=0.3)
    assert task.config == MKDConfig(tau_t=2.0, tau_s=2.0, meta_lr=0.3)
    assert task.temperatures() == (2.0, 2.0) and task.meta_optimizer.param_groups[0]['lr'] == 0.3
    with pytest.raises(Exception):
        task.config.tau_t = 3.0  # frozen
    # Next to a config, an option at MKDConfig's default cannot be told from an absent one: the config's value stays.
    config = MKDConfig(tau_t=2.0, tau_s=2.0)
    assert MKDTask(SmallCNN(), SmallCNN(width=16), verbose=False, config=config, tau_t=1.0).config is config
    task = MKDTask(SmallCNN(), SmallCNN(width=16), verbose=False, config=config.replace(meta_interval=20),
                   meta_interval=10.0)  # a value of another type than the default's is a given option
    assert task.config == config.replace(meta_interval=10) and type(task.config.meta_interval) is int


@pytest.mark.parametrize('kwargs, core, flags', [
    (dict(tau_t=30.0), 'tau_t=30.0 is outside the bounds [tau_min=1.0, tau_max=20.0]',
     '--mkd-tau-t 30.0 is outside the bounds [--mkd-tau-min 1.0, --mkd-tau-max 20.0]'),
    (dict(meta_interval=0), 'meta_interval=0 must be an integer >= 1', '--mkd-meta-interval 0 must be an integer >= 1'),
    (dict(warm_start_batches=-1), 'warm_start_batches=-1 must be', '--mkd-warm-start -1 must be'),
    (dict(tau_min=3.0, tau_max=2.0), 'tau_min=3.0 must be smaller than tau_max=2.0',
     '--mkd-tau-min 3.0 must be smaller than --mkd-tau-max 2.0'),
])
def test_config_errors_name_options_and_the_cli_names_flags(kwargs, core, flags):
    from timm_mkd.cli import config_error_in_flags
    from timm_mkd.config import MKDConfig, MKDConfigError
    with pytest.raises(MKDConfigError) as info:
        MKDConfig(**kwargs)
    assert core in str(info.value) and '--mkd' not in str(info.value)
    assert flags in config_error_in_flags(str(info.value))


class _ConstantEstimator:
    """A new estimator, slotted in through ``MKDTask(hypergradient=...)``: a fixed hypergradient."""
    needs_lookahead = False
    warm_start_batches = 0

    def __init__(self):
        self.calls = 0

    def __call__(self, inputs):
        from timm_mkd.meta.meta_parts import HyperGradient
        self.calls += 1
        assert inputs.meta_input.shape[0] == 16 and inputs.loss.kd_weight == 1.0
        return HyperGradient(grad=torch.tensor([1.0, 0.0]), meta_loss=0.5, epsilon=0.0)


def test_a_new_estimator_needs_no_change_to_task_or_controller():
    from timm_mkd import MKDTask
    torch.manual_seed(0)
    estimator = _ConstantEstimator()
    task = MKDTask(SmallCNN(), SmallCNN(width=16), verbose=False, tau_t=4.0, tau_s=2.0, meta_interval=1,
                   learn_tau_s=True, meta_optimizer='sgd', meta_lr=0.1, hypergradient=estimator)
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.01)
    task.attach(opt, [fmnist_batches(16, offset=500)])
    x, y = fmnist_batches(16)
    for _ in range(2):
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
    assert estimator.calls == 2 and task.meta_steps == 2
    tau_t, tau_s = task.temperatures()  # tied: both log-temperatures move by -lr * (1 + 0) per step
    assert math.isclose(math.log(tau_t), math.log(4.0) - 0.2, rel_tol=1e-5)
    assert math.isclose(math.log(tau_s), math.log(2.0) - 0.2, rel_tol=1e-5)
