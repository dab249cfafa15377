"""Run timm's own train.py with Meta Knowledge Distillation (MKD): the ``train-mkd`` command.

    train-mkd <every train.py flag> --teacher NAME [--teacher-checkpoint FILE] --mkd [--mkd-* flags]

``train-mkd`` (console script), ``python -m timm_mkd`` and ``python train_mkd.py`` (source
checkout) all call ``main`` here. train.py is not part of the timm package, so this first finds
it, in this order:

1. ``--timm-train PATH`` (consumed here, never seen by train.py);
2. the environment variable ``TIMM_TRAIN_PY``;
3. ``./train.py`` if it is timm's train.py;
4. ``train.py`` next to the ``timm/`` package of an editable (source checkout) install.

It then recognises the file's generation (the adapters, ``timm_mkd._patches``), compares it with
the installed timm (one warning when they differ), imports it as a module without running it,
installs the MKD patches into that module's namespace only, and calls its ``main()``. Every
train.py flag, ``-c`` YAML config, ``torchrun`` and ``--resume`` works as with train.py itself;
without ``--mkd`` / ``--teacher`` / ``--teacher-checkpoint`` the run *is* train.py's.
``--mkd-export DIR`` (also consumed here) writes the best student there when the run ends
(``timm_mkd.export``).

Exit codes: 2 for usage problems (train.py not found or unsupported, contradictory flags, timm
too old), 1 for set-up failures inside the run (teacher checkpoint, meta data), each with a
one-paragraph message on stderr.
"""
import argparse
import importlib
import importlib.util
import os
import sys
from typing import List, Optional, Sequence, Tuple

ADAPTERS_MODULE = 'timm_mkd._patches'
LAUNCHER_HELP = (
    'Launcher flags (consumed before train.py parses its own): --timm-train PATH: the train.py to run '
    '(else $TIMM_TRAIN_PY, ./train.py, an editable timm checkout). --mkd-export DIR: when the run ends, '
    'write its best student to DIR (model.safetensors + mkd_student.json; see python -m timm_mkd.export).')


class TrainPyNotFound(RuntimeError):
    """No train.py was found; the message says where we looked and how to get one."""


def _die(prog: str, message: str, code: int) -> 'None':
    sys.stderr.write(f'{prog}: error: {message}\n')
    sys.stderr.flush()
    raise SystemExit(code)


def _warn(prog: str, message: str) -> None:
    sys.stderr.write(f'{prog}: warning: {message}\n')
    sys.stderr.flush()


def pop_flag(argv: Sequence[str], flag: str, prog: str = 'train-mkd') -> Tuple[Optional[str], List[str]]:
    """Remove ``FLAG VALUE`` / ``FLAG=VALUE`` from ``argv`` (up to a ``--``).

    Args:
        argv: the command line, without the program name.
        flag: e.g. ``--timm-train``.
        prog: program name for the error message.
    Returns:
        ``(value or None, the remaining arguments)``.
    """
    rest: List[str] = []
    value = None
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg == '--':
            rest.extend(argv[i:])
            break
        if arg == flag:
            if i + 1 >= len(argv):
                _die(prog, f'{flag} needs a PATH', 2)
            value = argv[i + 1]
            i += 2
            continue
        if arg.startswith(flag + '='):
            value = arg.split('=', 1)[1]
            i += 1
            continue
        rest.append(arg)
        i += 1
    return value, rest


def pop_timm_train(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """Remove ``--timm-train PATH`` / ``--timm-train=PATH`` from ``argv``; returns ``(path, rest)``."""
    return pop_flag(argv, '--timm-train')


def load_adapters():
    """Import the train.py adapters under their private name ``timm_mkd._patches``.

    A wheel ships them as that subpackage; a source checkout keeps them in ``patches/`` beside
    ``timm_mkd/``, which is loaded under the same name. Never imported as a top-level ``patches``.

    Returns:
        The adapters package.
    """
    if ADAPTERS_MODULE in sys.modules:
        return sys.modules[ADAPTERS_MODULE]
    import timm_mkd
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(timm_mkd.__file__)))
    folder = os.path.join(checkout, 'patches')
    init = os.path.join(folder, '__init__.py')
    # A source checkout (train_mkd.py beside timm_mkd/) runs its own patches/, whatever an install maps.
    if not (os.path.isfile(os.path.join(checkout, 'train_mkd.py')) and os.path.isfile(init)):
        try:
            return importlib.import_module(ADAPTERS_MODULE)
        except ModuleNotFoundError as e:
            if e.name != ADAPTERS_MODULE:
                raise
    if not os.path.isfile(init):
        raise ImportError(
            f'timm-mkd at {os.path.dirname(timm_mkd.__file__)} has no train.py adapters ({ADAPTERS_MODULE}): '
            f'an incomplete install. Fix: pip install --force-reinstall --no-deps timm-mkd')
    spec = importlib.util.spec_from_file_location(ADAPTERS_MODULE, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[ADAPTERS_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[ADAPTERS_MODULE]
        raise
    timm_mkd._patches = module
    return module


def _is_timm_train_py(path: str, adapters) -> bool:
    try:
        with open(path, 'r', encoding='utf-8', errors='replace') as f:
            return adapters.looks_like_timm_train_py(f.read())
    except OSError:
        return False


def _given_file(value: str, label: str, cwd: str, adapters) -> str:
    """The absolute path of a train.py the user named (``label``: how, for messages); must be a non-empty file."""
    path = os.path.abspath(os.path.join(cwd, os.path.expanduser(value)))
    if not os.path.isfile(path):
        raise TrainPyNotFound(f'{label}: no such file. Fix: get timm\'s train.py:\n'
                              + adapters.how_to_get_train_py())
    if os.path.getsize(path) == 0:
        raise TrainPyNotFound(f'{label}: the file is empty (an interrupted download?). Fix: get it again:\n'
                              + adapters.how_to_get_train_py())
    return path


def find_train_py(explicit: Optional[str], environ=None, cwd: Optional[str] = None, patches=None) -> Tuple[str, str]:
    """Find timm's train.py.

    Args:
        explicit: the ``--timm-train`` value, or None.
        environ: the environment to read ``TIMM_TRAIN_PY`` from (default ``os.environ``).
        cwd: the directory relative paths and ``./train.py`` resolve against.
        patches: the adapters package (default ``load_adapters()``).
    Returns:
        ``(absolute path, how it was found)``.
    Raises:
        TrainPyNotFound: with the places tried and the commands that fetch a matching file.
    """
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    adapters = patches or load_adapters()
    if explicit:
        return _given_file(explicit, f'--timm-train {explicit}', cwd, adapters), '--timm-train'
    tried = ['--timm-train (not given)']
    env = environ.get('TIMM_TRAIN_PY')
    if env:
        return _given_file(env, f'TIMM_TRAIN_PY={env}', cwd, adapters), 'TIMM_TRAIN_PY'
    tried.append('$TIMM_TRAIN_PY (unset)')
    local = os.path.join(cwd, 'train.py')
    if os.path.isfile(local):
        if _is_timm_train_py(local, adapters):
            return local, './train.py'
        tried.append(f'{local} (exists, but is not timm\'s train.py)')
    else:
        tried.append(f'{local} (absent)')
    # Where timm lives: an imported timm's __file__, else its import spec (importing it would import torch).
    loaded = sys.modules.get('timm')
    spec = None if loaded is not None else importlib.util.find_spec('timm')
    origin = loaded.__file__ if loaded is not None else (spec.origin if spec is not None else None)
    if origin:
        checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(origin))), 'train.py')
        if os.path.isfile(checkout) and _is_timm_train_py(checkout, adapters):
            return checkout, 'the timm source checkout'
        tried.append(f'{checkout} (timm is not installed from a source checkout)')
    else:
        tried.append('the timm source checkout (timm is not importable)')
    raise TrainPyNotFound(
        'cannot find timm\'s train.py: it is not part of the timm package. Looked at: '
        + '; '.join(tried) + '.\nFix: get the train.py matching your timm and point train-mkd at it:\n'
        + adapters.how_to_get_train_py())


def mkd_only_help(prog: str, why: str) -> str:
    """``--help`` text when train.py cannot be loaded: the MKD and launcher flags, and why.

    Args:
        prog: the program name to show.
        why: why train.py's own flags are missing (the find / recognise error).
    Returns:
        The help text.
    """
    from timm_mkd.cli import add_mkd_args
    parser = argparse.ArgumentParser(
        prog=prog, usage=f'{prog} [train.py flags] [MKD flags] [--timm-train PATH] [--mkd-export DIR]',
        description="Runs timm's train.py with Meta Knowledge Distillation. train.py's own flags (model, "
                    "data, optimizer, schedule, ...) are listed once train.py is found: "
                    f'{prog} --timm-train PATH --help',
        epilog=f"train.py's flags are not shown: {why}", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launcher_args(parser)
    add_mkd_args(parser)
    return parser.format_help()


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """Document the flags the launcher consumes itself (train.py never sees them).

    Args:
        parser: the parser (or help-only parser) to add the group to.
    """
    group = parser.add_argument_group('train-mkd launcher (consumed before train.py parses its flags)')
    group.add_argument('--timm-train', metavar='PATH',
                       help='timm\'s train.py to run (else $TIMM_TRAIN_PY, ./train.py, an editable timm checkout).')
    group.add_argument('--mkd-export', metavar='DIR',
                       help='When the run ends, write its best student to DIR as model.safetensors plus '
                            'mkd_student.json (temperatures, train.py args); see python -m timm_mkd.export.')


def _wants_help(rest: Sequence[str]) -> bool:
    head = list(rest)[:list(rest).index('--')] if '--' in rest else list(rest)
    return '-h' in head or '--help' in head


def _import_timm_mkd(prog: str) -> None:
    try:
        import timm_mkd  # noqa: F401  (refuses a too old timm)
    except ImportError as e:
        if type(e).__name__ == 'UnsupportedTimmVersion':
            _die(prog, str(e), 2)
        raise


def _select(prog: str, explicit: Optional[str], rest: Sequence[str], adapters):
    """Find and recognise train.py (read as text: no torch, no timm); prints MKD-only help and exits if it cannot."""
    try:
        path, _ = find_train_py(explicit, patches=adapters)
        return adapters.select(path)
    except (TrainPyNotFound, adapters.UnsupportedTrainPy) as e:
        message = str(e) if 'Fix:' in str(e) else f'{e}\nFix: use an unmodified train.py:\n{adapters.how_to_get_train_py()}'
        if _wants_help(rest):
            sys.stdout.write(mkd_only_help(prog, message))
            raise SystemExit(0)
        _die(prog, message, 2)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """Run train.py with MKD.

    Args:
        argv: the command line without the program name (default ``sys.argv[1:]``).
        prog: the program name for messages and train.py's ``--help`` (default: from ``sys.argv[0]``).
    """
    prog = prog or os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else 'train-mkd')
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit, rest = pop_flag(argv, '--timm-train', prog)
    export_dir, rest = pop_flag(rest, '--mkd-export', prog)
    _import_timm_mkd(prog)
    adapters = load_adapters()
    selection = _select(prog, explicit, rest, adapters)
    from timm_mkd.compat import installed_timm_version
    warning = adapters.check_pair(selection, installed_timm_version())
    if warning:
        _warn(prog, warning)
    try:
        module, run = selection.load()  # train.py imports torch and timm: the first import of either
    except adapters.UnsupportedTrainPy as e:
        _die(prog, str(e), 2)
    parser = getattr(module, 'parser', None)
    if isinstance(parser, argparse.ArgumentParser):  # help text only: train.py's args stay its own
        parser.prog = prog
        parser.epilog = f'{parser.epilog or ""}\n\n{LAUNCHER_HELP}'.strip()
    sys.argv = [prog] + rest
    try:
        module.main()
    except adapters.MKDSetupError as e:
        _die(prog, str(e), 1)
    if export_dir:
        _export_after_run(prog, run, export_dir)
    adapters.release(run)


def _export_after_run(prog: str, run, export_dir: str) -> None:
    """``--mkd-export``: write the finished run's best student (primary rank only)."""
    if not run.is_primary():
        return
    log = getattr(run, 'temp_log', None)
    if run.task is None or log is None:
        _die(prog, '--mkd-export needs an MKD run (--mkd) that saved checkpoints; this run was not one. '
                   'Fix: export any timm checkpoint folder with: python -m timm_mkd.export RUN_DIR', 2)
    from timm_mkd.export import ExportError, export_run
    try:
        written = export_run(os.path.dirname(os.path.abspath(log.path)), export_dir)
    except ExportError as e:
        _die(prog, str(e), 1)
    sys.stderr.write(f'{prog}: exported the student to {written}\n')


if __name__ == '__main__':
    main()
