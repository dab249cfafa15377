"""The built wheel, installed into a fresh venv outside the checkout, is a working plugin.

One slow test (marker ``wheel``; CI runs it): build the wheel from a copy of the checkout, install
it with ``--no-deps`` into a new venv that sees this interpreter's torch and timm through a
``.pth`` line (nothing downloaded), then, from a folder outside the checkout and without the
checkout on ``sys.path``, run ``train-mkd`` and ``python -m timm_mkd``. With ``TIMM_TRAIN_PY``
set, the real train.py's ``--help`` is also run through the installed command.
"""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

pytestmark = [pytest.mark.wheel, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_IN_COPY = shutil.ignore_patterns('.git', '.venv', 'output', '.cache', 'build', 'dist', '*.egg-info',
                                      '__pycache__', '.pytest_cache')


def _check(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f'{cmd}\n{result.stdout}\n{result.stderr}'
    return result


def _build_wheel(tmp) -> str:
    """Build the wheel from a clean copy of the checkout (the checkout gets no build/ or egg-info)."""
    src = os.path.join(tmp, 'src')
    shutil.copytree(REPO, src, ignore=SKIP_IN_COPY)
    out = os.path.join(tmp, 'dist')
    cmd = [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', out, src]
    try:
        import setuptools
        if int(setuptools.__version__.split('.')[0]) >= 70:  # builds wheels without the `wheel` package
            cmd.insert(4, '--no-build-isolation')  # offline: use this interpreter's setuptools
    except ImportError:
        pass
    _check(cmd)
    (wheel,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith('.whl')]
    return wheel


def _venv_seeing_this_torch(tmp) -> str:
    """A fresh venv whose site-packages ends with this interpreter's (torch, timm, ...) via a .pth line."""
    venv = os.path.join(tmp, 'venv')
    _check([sys.executable, '-m', 'venv', venv])
    py = os.path.join(venv, 'bin', 'python')
    venv_site = _check([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).stdout.strip()
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()['purelib']] if os.path.isdir(p)]
    with open(os.path.join(venv_site, 'zz_host_site.pth'), 'w') as f:
        f.write('\n'.join(dict.fromkeys(ours)) + '\n')
    return py


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp('wheel'))
    wheel = _build_wheel(tmp)
    py = _venv_seeing_this_torch(tmp)
    _check([py, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', '--ignore-installed', wheel])
    elsewhere = os.path.join(tmp, 'elsewhere')
    os.mkdir(elsewhere)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'TIMM_TRAIN_PY')}
    env['OMP_NUM_THREADS'] = '1'
    return dict(wheel=wheel, py=py, bin=os.path.dirname(py), cwd=elsewhere, env=env)


def test_wheel_ships_the_adapters_privately(installed):
    names = zipfile.ZipFile(installed['wheel']).namelist()
    assert 'timm_mkd/_patches/__init__.py' in names and 'timm_mkd/_patches/common.py' in names
    assert 'timm_mkd/launcher.py' in names and 'timm_mkd/__main__.py' in names
    tops = {n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')}
    assert tops == {'timm_mkd'}  # no top-level `patches`, no train_mkd.py
    sources = {os.path.relpath(os.path.join(folder, f), REPO).replace(os.sep, '/')
               for folder, _, files in os.walk(os.path.join(REPO, 'timm_mkd')) for f in files if f.endswith('.py')}
    assert 'timm_mkd/meta/meta_controller.py' in sources and 'timm_mkd/data/meta_loader.py' in sources
    assert sources <= set(names), sorted(sources - set(names))  # the subpackages too
    entry = [n for n in names if n.endswith('entry_points.txt')]
    assert 'train-mkd = timm_mkd.launcher:main' in zipfile.ZipFile(installed['wheel']).read(entry[0]).decode()


def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    probe = textwrap.dedent(f'''
        import importlib.util, os, sys
        repo = {REPO!r}
        assert not any(os.path.realpath(p or os.getcwd()) == os.path.realpath(repo) for p in sys.path), sys.path
        from timm_mkd import launcher
        adapters = launcher.load_adapters()
        print(os.path.dirname(launcher.__file__))
        print(adapters.__file__)
        print(importlib.util.find_spec('patches'))
        import timm_mkd.data.meta_data, timm_mkd.meta.meta_controller
        from timm_mkd import MKDTask, TRAIN_STREAM
        print(timm_mkd.meta.meta_controller.__file__)
    ''')
    out = _check([installed['py'], '-c', probe], cwd=installed['cwd'], env=installed['env']).stdout.split('\n')
    venv = os.path.dirname(installed['bin'])
    assert out[0].startswith(venv) and out[1].startswith(os.path.join(out[0], '_patches'))
    assert out[2] == 'None'  # nothing importable as top-level `patches`
    assert out[3] == os.path.join(out[0], 'meta', 'meta_controller.py')


def test_train_mkd_and_python_m_give_the_mkd_help_without_train_py(installed):
    kw = dict(cwd=installed['cwd'], env=installed['env'])
    cmd = _check([os.path.join(installed['bin'], 'train-mkd'), '--help'], **kw).stdout
    mod = _check([installed['py'], '-m', 'timm_mkd', '--help'], **kw).stdout
    for out, prog in ((cmd, 'train-mkd'), (mod, 'python -m timm_mkd')):
        assert out.startswith(f'usage: {prog} ') and f'{prog} --timm-train PATH --help' in out
        for flag in ('--mkd', '--teacher-checkpoint', '--mkd-meta-interval', '--timm-train', '--mkd-export'):
            assert flag in out
    flags = [[line for line in out.splitlines() if line.startswith('  -')] for out in (cmd, mod)]
    assert flags[0] == flags[1] and len(flags[0]) > 10


def test_installed_command_runs_a_train_py(installed, tmp_path):
    """A train.py-shaped script from the CI suite, run through the installed adapters (parse stage)."""
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from test_train_mkd import skeleton
    finally:
        sys.path.pop(0)
    script = tmp_path / 'train.py'
    script.write_text(skeleton())
    result = _check([os.path.join(installed['bin'], 'train-mkd'), '--timm-train', str(script), '--mkd',
                     '--teacher', 'resnet18', '-b', '4'], cwd=installed['cwd'], env=installed['env'])
    assert '"mkd": true' in result.stdout and '"kd_model_name": "resnet18"' in result.stdout
    assert 'train-mkd: warning:' in result.stderr  # a synthetic file is not a known release


def test_installed_command_loads_the_real_train_py(installed):
    path = os.environ.get('TIMM_TRAIN_PY')
    if not path:
        pytest.skip('set TIMM_TRAIN_PY to run the real train.py through the installed command')
    env = dict(installed['env'], TIMM_TRAIN_PY=os.path.abspath(path))
    out = _check([os.path.join(installed['bin'], 'train-mkd'), '--help'], cwd=installed['cwd'], env=env).stdout
    assert 'MKD (Meta Knowledge Distillation)' in out and '--model' in out and '--mkd-export' in out
