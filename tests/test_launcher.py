"""The launcher's honesty about train.py: versions compared, one fix per message, help without train.py.

Runs in CI (no real train.py needed): ``Selection`` objects for known files are built from the
adapters' own hash tables, and the subprocess checks use an empty folder or an empty file.
"""
import os
import re
import subprocess
import sys

import pytest
import timm

from timm_mkd import launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MKD = os.path.join(REPO, 'train_mkd.py')
patches = launcher.load_adapters()


def _known_selection(adapter):
    sha, label = next(iter(adapter.SHA256.items()))
    return patches.Selection('/x/train.py', adapter.GENERATION, adapter, label, tuple(adapter.RELEASES), sha)


def _run(argv, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_TRAIN_PY'}
    env.update(env_extra or {}, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable] + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('adapter', patches.ADAPTERS, ids=lambda a: a.GENERATION)
def test_known_file_of_the_installed_release_is_silent(adapter):
    for release in adapter.RELEASES:
        assert patches.check_pair(_known_selection(adapter), release) is None


def test_known_file_of_another_release_warns_naming_both():
    sel = _known_selection(patches.gen_1_0_27)
    warning = patches.check_pair(sel, '1.0.31')
    assert 'timm v1.0.27 / v1.0.28' in warning and 'timm 1.0.31 is installed' in warning
    assert patches.fix_for('1.0.31') in warning


def test_unknown_file_warns_naming_generation_and_installed_timm():
    sel = patches.Selection('/y/train.py', '1.0.29.dev0', patches.gen_1_0_29, None, (), 'ab' * 32)
    warning = patches.check_pair(sel, '1.0.29.dev0')  # even the same version: the file is unknown
    assert 'not the train.py of a known timm release' in warning and 'abababababab' in warning
    assert 'timm 1.0.29.dev0 train.py' in warning and 'timm 1.0.29.dev0 is installed' in warning


@pytest.mark.parametrize('installed, expected', [
    ('1.0.27', '/v1.0.27/train.py'),
    ('1.0.28', '/v1.0.28/train.py'),
    ('1.0.29.dev0', '/a6da4da1740cd57eaf864803f9dd65683cbcf6d7/train.py'),
])
def test_fix_for_a_known_release_fetches_its_own_train_py(installed, expected):
    fix = patches.fix_for(installed)
    assert expected in fix and 'pip install' not in fix
    assert '--timm-train' in fix and 'TIMM_TRAIN_PY' in fix and 'Offline' in fix


def test_fix_for_an_unknown_timm_names_the_newest_known_release_once():
    fix = patches.fix_for('1.0.31')
    newest = patches.NEWEST_KNOWN_RELEASE
    assert f"pip install 'timm=={newest}'" in fix and f'/v{newest}/train.py' in fix
    versions = set(re.findall(r'\b1\.0\.\d+\b', fix))
    assert versions == {'1.0.31', newest}  # the installed timm and the one to install, nothing else


def test_newest_known_release_is_derived_from_the_adapters():
    releases = [r for a in patches.ADAPTERS for r in a.RELEASES if 'dev' not in r]
    assert patches.NEWEST_KNOWN_RELEASE == max(releases, key=lambda r: tuple(map(int, r.split('.'))))
    assert patches.NEWEST_KNOWN_SHA256 in patches.gen_1_0_27.SHA256


def test_no_message_names_another_release_than_the_adapters():
    """One version string everywhere: README, the quickstart and the test skip name the same release."""
    newest = patches.NEWEST_KNOWN_RELEASE
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    assert f'installs **timm {newest}**' in readme
    assert set(re.findall(r"timm==(\d+\.\d+\.\d+)", readme)) == {newest}
    assert f'/v{newest}/train.py' in readme
    with open(os.path.join(REPO, 'tests', 'test_train_mkd_trainpy.py')) as f:
        assert 'NEWEST_KNOWN_RELEASE' in f.read()
    with open(os.path.join(REPO, 'scripts', 'quickstart.sh')) as f:
        quickstart = f.read()
    assert not re.search(r'1\.0\.\d+', quickstart)  # it asks the adapters (scripts/train_py_source.py)


def test_help_without_train_py_lists_the_mkd_flags(tmp_path):
    result = _run([TRAIN_MKD, '--help'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for flag in ('--mkd', '--teacher', '--teacher-checkpoint', '--mkd-tau-t', '--timm-train', '--mkd-export'):
        assert flag in out
    assert 'train_mkd.py --timm-train PATH --help' in out  # how to see train.py's own flags
    assert "cannot find timm's train.py" in out and patches.fix_for(timm.__version__) in out


def test_empty_train_py_is_refused_with_the_fix(tmp_path):
    empty = tmp_path / 'train.py'
    empty.write_text('')
    result = _run([TRAIN_MKD, '--mkd'], cwd=tmp_path, env_extra={'TIMM_TRAIN_PY': str(empty)})
    assert result.returncode == 2
    assert f'TIMM_TRAIN_PY={empty}: the file is empty' in result.stderr
    assert patches.fix_for(timm.__version__) in result.stderr and 'Traceback' not in result.stderr


def test_python_m_timm_mkd_is_the_same_command(tmp_path):
    a = _run([TRAIN_MKD, '--help'], cwd=tmp_path)
    b = _run(['-m', 'timm_mkd', '--help'], cwd=tmp_path, env_extra={'PYTHONPATH': REPO})
    assert b.returncode == 0, b.stderr
    assert b.stdout.startswith('usage: python -m timm_mkd ') and 'python -m timm_mkd --timm-train PATH --help' in b.stdout
    flags = [[line for line in r.stdout.splitlines() if line.startswith('  -')] for r in (a, b)]
    assert flags[0] == flags[1] and len(flags[0]) > 10
