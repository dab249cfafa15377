#!/usr/bin/env python3
"""Run timm's own train.py with Meta Knowledge Distillation (MKD).

    python train_mkd.py <every train.py flag> --teacher NAME [--teacher-checkpoint FILE] --mkd [--mkd-* flags]

train.py is not part of the timm package, so this script first finds it, in this order:

1. ``--timm-train PATH`` (consumed here, never seen by train.py);
2. the environment variable ``TIMM_TRAIN_PY``;
3. ``./train.py`` if it is timm's train.py;
4. ``train.py`` next to the ``timm/`` package of an editable (source checkout) install.

It then recognises the file's generation (``patches/``), imports it as a module without running
it, installs the MKD patches into that module's namespace only, and calls its ``main()``. Every
train.py flag, ``-c`` YAML config, ``torchrun`` and ``--resume`` works as with train.py itself;
without ``--mkd`` / ``--teacher`` / ``--teacher-checkpoint`` the run *is* train.py's.

Exit codes: 2 for usage problems (train.py not found or unsupported, contradictory flags, timm
too old), 1 for set-up failures inside the run (teacher checkpoint, meta data), each with a
one-paragraph message on stderr.
"""
import importlib.util
import os
import sys
from typing import List, Optional, Sequence, Tuple

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
PROG = 'train_mkd.py'
PATCHES_MODULE = '_timm_mkd_patches'


class TrainPyNotFound(RuntimeError):
    """No train.py was found; the message says where we looked and how to get one."""


def _die(message: str, code: int) -> 'None':
    sys.stderr.write(f'{PROG}: error: {message}\n')
    sys.stderr.flush()
    raise SystemExit(code)


def pop_timm_train(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """Remove ``--timm-train PATH`` / ``--timm-train=PATH`` from ``argv``; returns ``(path, rest)``."""
    rest: List[str] = []
    path = None
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg == '--':
            rest.extend(argv[i:])
            break
        if arg == '--timm-train':
            if i + 1 >= len(argv):
                _die('--timm-train needs a PATH (the train.py of timm)', 2)
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith('--timm-train='):
            path = arg.split('=', 1)[1]
            i += 1
            continue
        rest.append(arg)
        i += 1
    return path, rest


def load_patches():
    """Import ``patches/`` from this checkout under a private module name (never ``patches``)."""
    if PATCHES_MODULE in sys.modules:
        return sys.modules[PATCHES_MODULE]
    init = os.path.join(REPO_DIR, 'patches', '__init__.py')
    spec = importlib.util.spec_from_file_location(
        PATCHES_MODULE, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PATCHES_MODULE] = module
    spec.loader.exec_module(module)
    return module


def _is_timm_train_py(path: str, patches) -> bool:
    try:
        with open(path, 'r', encoding='utf-8', errors='replace') as f:
            return patches.looks_like_timm_train_py(f.read())
    except OSError:
        return False


def find_train_py(explicit: Optional[str], environ=None, cwd: Optional[str] = None, patches=None) -> Tuple[str, str]:
    """Find timm's train.py; returns ``(path, how it was found)``.

    Raises:
        TrainPyNotFound: with the places tried and the commands that fetch the matching file.
    """
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    patches = patches or load_patches()
    tried = []
    if explicit:
        path = os.path.abspath(os.path.join(cwd, os.path.expanduser(explicit)))
        if not os.path.isfile(path):
            raise TrainPyNotFound(f'--timm-train {explicit}: no such file.\nGet timm\'s train.py with:\n'
                                  + patches.how_to_get_train_py())
        return path, '--timm-train'
    tried.append('--timm-train (not given)')
    env = environ.get('TIMM_TRAIN_PY')
    if env:
        path = os.path.abspath(os.path.join(cwd, os.path.expanduser(env)))
        if not os.path.isfile(path):
            raise TrainPyNotFound(f'TIMM_TRAIN_PY={env}: no such file.\nGet timm\'s train.py with:\n'
                                  + patches.how_to_get_train_py())
        return path, 'TIMM_TRAIN_PY'
    tried.append('$TIMM_TRAIN_PY (unset)')
    local = os.path.join(cwd, 'train.py')
    if os.path.isfile(local):
        if _is_timm_train_py(local, patches):
            return local, './train.py'
        tried.append(f'{local} (exists, but is not timm\'s train.py)')
    else:
        tried.append(f'{local} (absent)')
    try:
        import timm
        checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(timm.__file__))), 'train.py')
        if os.path.isfile(checkout) and _is_timm_train_py(checkout, patches):
            return checkout, 'the timm source checkout'
        tried.append(f'{checkout} (timm is not installed from a source checkout)')
    except ImportError:
        tried.append('the timm source checkout (timm is not importable)')
    raise TrainPyNotFound(
        'cannot find timm\'s train.py: it is not part of the timm package. Looked at: '
        + '; '.join(tried) + '.\n'
        'Get the train.py matching your timm and point train_mkd.py at it:\n'
        + patches.how_to_get_train_py())


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit, rest = pop_timm_train(argv)

    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)  # timm_mkd from this checkout when it is not installed
    try:
        import timm_mkd  # noqa: F401  (refuses a too old timm)
    except ImportError as e:
        if type(e).__name__ == 'UnsupportedTimmVersion':
            _die(str(e), 2)
        raise

    patches = load_patches()
    try:
        path, how = find_train_py(explicit, patches=patches)
        selection = patches.select(path)
        module, run = selection.load()
    except TrainPyNotFound as e:
        _die(str(e), 2)
    except patches.UnsupportedTrainPy as e:
        _die(str(e), 2)

    sys.argv = [sys.argv[0] if sys.argv and sys.argv[0] else PROG] + rest
    try:
        module.main()
    except patches.MKDSetupError as e:
        _die(str(e), 1)


if __name__ == '__main__':
    main()
