"""Adapters that run timm's train.py with MKD: the only code that knows train.py's internals.

One module per train.py generation (``gen_1_0_27``: timm 1.0.27 and 1.0.28; ``gen_1_0_29``:
timm 1.0.29.dev0); probing a train.py in ``probe``, running it (the patches) in ``run`` and its
mixins, shared errors and module loading in ``common``. ``select(path)`` reads a train.py,
recognises its generation and returns a ``Selection`` whose ``load()`` imports the file and
installs that generation's patches.

Recognition: a file byte-identical to a known release is taken at once; any other file is
accepted only if it passes every structural probe of exactly one generation (names, imports,
call keywords and call order, read with ``ast``), and a warning says it is not a known release.
Anything else raises ``UnsupportedTrainPy`` listing what did not match, before a single patch
is applied: never a half-patched run.

This package is loaded under the private name ``timm_mkd._patches`` (a wheel ships it as that
subpackage; ``timm_mkd.launcher.load_adapters`` loads a checkout's ``patches/`` under the same name),
so it cannot shadow or be shadowed by another top-level ``patches`` module. Importing it imports
neither torch nor timm: recognising a train.py reads it as text.
"""
import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional, Tuple

from . import gen_1_0_27, gen_1_0_29
from .common import MKDSetupError, UnsupportedTrainPy, load_train_module
from .probe import read_facts
from .run import MKDRun

__all__ = [
    'ADAPTERS', 'Selection', 'select', 'looks_like_timm_train_py', 'how_to_get_train_py', 'fix_for',
    'check_pair', 'train_py_url', 'NEWEST_KNOWN_RELEASE', 'SUPPORTED_RELEASES_TEXT', 'UnsupportedTrainPy',
    'MKDSetupError', 'release',
]

_logger = logging.getLogger('train_mkd')

#: Newest first.
ADAPTERS = (gen_1_0_29, gen_1_0_27)

REPO_URL = 'https://github.com/huggingface/pytorch-image-models'
RAW_URL = 'https://raw.githubusercontent.com/huggingface/pytorch-image-models'

#: timm 1.0.29.dev0 has no release tag: its known train.py files are these main-branch commits
#: (newest first; the first is the one ``fix_for`` names).
DEV_COMMITS = {
    '1.0.29.dev0': ('a6da4da1740cd57eaf864803f9dd65683cbcf6d7', '27214e00027510a9d61236e0115f2f9144a5e08f',
                    'b7c3df82a11178182e450c1025154f5ce21c2009', '4f394a575687ccb73896872e88914dfdd55ad2be'),
}


def _version_key(version: str) -> Tuple[int, ...]:
    """Sort key of a release string ('1.0.28' -> (1, 0, 28)); non-numeric parts end it."""
    out = []
    for piece in version.split('.'):
        if not piece.isdigit():
            break
        out.append(int(piece))
    return tuple(out)


def known_releases() -> Tuple[str, ...]:
    """Every timm version whose train.py some adapter knows byte for byte, oldest first."""
    found = {r for adapter in ADAPTERS for r in adapter.RELEASES}
    return tuple(sorted(found, key=lambda r: (_version_key(r), r)))


#: The newest tagged timm release whose train.py is known byte for byte: the timm to install
#: when the installed one has no known train.py (quickstart, test skips and messages use it).
NEWEST_KNOWN_RELEASE = max((r for r in known_releases() if 'dev' not in r), key=_version_key)
NEWEST_KNOWN_SHA256 = next(sha for adapter in ADAPTERS for sha in adapter.SHA256
                           if NEWEST_KNOWN_RELEASE in adapter.RELEASES)
SUPPORTED_RELEASES_TEXT = 'timm ' + ', '.join(known_releases())


def train_py_url(version: str) -> str:
    """Raw download address of the train.py of a known timm ``version`` (a tag, or a main commit)."""
    ref = DEV_COMMITS[version][0] if version in DEV_COMMITS else f'v{version}'
    return f'{RAW_URL}/{ref}/train.py'


def fix_for(timm_version: str) -> str:
    """The one fix for "no train.py this launcher can run with timm ``timm_version``", as commands.

    A known release gets its own train.py; any other timm gets the newest known release and its
    train.py, the pair the tests run. The offline route (copy the file, pass its path) closes it.

    Args:
        timm_version: the installed timm's ``__version__``.
    Returns:
        Indented shell lines, ready to print under a message.
    """
    if timm_version in known_releases():
        lines = [f'curl -fsSL -o train.py {train_py_url(timm_version)}']
    else:
        lines = [f"pip install 'timm=={NEWEST_KNOWN_RELEASE}'    # timm {timm_version}'s train.py is not one "
                 f'timm-mkd knows; {NEWEST_KNOWN_RELEASE} is the newest known release',
                 f'curl -fsSL -o train.py {train_py_url(NEWEST_KNOWN_RELEASE)}']
    lines.append('train-mkd --timm-train train.py ...    # or: export TIMM_TRAIN_PY=$PWD/train.py')
    return ('\n'.join('    ' + line for line in lines)
            + '\n  Offline: copy that train.py from a machine with network and pass it with --timm-train PATH '
              'or TIMM_TRAIN_PY=PATH.')


def how_to_get_train_py(version: Optional[str] = None) -> str:
    """``fix_for`` the installed timm (or ``version``)."""
    if version is None:
        from timm_mkd.compat import installed_timm_version
        version = installed_timm_version()
    return fix_for(version)


def check_pair(selection: 'Selection', timm_version: str) -> Optional[str]:
    """Compare a recognised train.py with the installed timm.

    Args:
        selection: what ``select`` returned.
        timm_version: the installed timm's ``__version__``.
    Returns:
        None when the file is the installed release's own; otherwise the one warning to print,
        naming both versions and the fix.
    """
    if selection.releases and timm_version in selection.releases:
        return None
    if selection.releases:
        what = f'{selection.path} is the train.py of {selection.known_as}'
    else:
        what = (f'{selection.path} is not the train.py of a known timm release (sha256 '
                f'{selection.sha256[:12]}...); its structure matches the timm {selection.generation} train.py, '
                f'so that adapter runs it')
    return (f'{what}, but timm {timm_version} is installed. MKD runs it; if the run misbehaves, use a matching '
            f'pair:\n' + fix_for(timm_version))


@dataclass
class Selection:
    """A recognised train.py: its generation, its adapter, and whether it is a known release file."""
    path: str
    generation: str
    adapter: ModuleType
    known_as: Optional[str]  # e.g. 'timm v1.0.27 / v1.0.28'; None for a modified or newer file
    releases: Tuple[str, ...] = ()  # the timm versions a known file belongs to; () if unknown
    sha256: str = ''

    def load(self) -> 'tuple':
        """Import train.py, check the installed timm can run it, install the patches; returns ``(module, run)``.

        train.py is imported first: it imports torch and timm itself, so nothing before it has to.

        Raises:
            UnsupportedTrainPy: if the installed timm cannot run this train.py (nothing is patched then).
        """
        try:
            module = load_train_module(self.path)
        except ImportError:
            self._check_host()  # a train.py newer than the installed timm fails at its imports
            raise
        try:
            self._check_host()
        except UnsupportedTrainPy:
            sys.modules.pop(module.__name__, None)
            raise
        run = self.adapter.apply(module)
        return module, run

    def _check_host(self) -> None:
        host = self.adapter.host_problems()
        if host:
            raise UnsupportedTrainPy(
                f'{self.path} (timm {self.generation} train.py): ' + '; '.join(host)
                + '.\nFix: use a train.py this timm can run:\n' + how_to_get_train_py())


def release(run: MKDRun) -> None:
    """Drop the MKD task once train.py's ``main()`` has returned, while the interpreter is alive.

    train.py destroys its process group at the end of ``main()``, but the task keeps the DDP
    student (and through it the C++ process group) alive, and task <-> optimizer hooks form a
    reference cycle. Left alone, the group is freed in interpreter shutdown, where gloo can abort
    the process ("terminate called without an active exception"). Detaching the hooks and
    collecting now frees it here.

    Args:
        run: the run state ``Selection.load`` returned.
    """
    import gc
    task = getattr(run, 'task', None)
    if task is not None:
        task.detach()
        run.task = None
    gc.collect()


def looks_like_timm_train_py(text: str) -> bool:
    """Cheap content check used by discovery (``./train.py`` may be someone else's script)."""
    return ('from timm' in text and 'def train_one_epoch' in text and 'def main' in text
            and 'argparse' in text)


def select(path: str) -> Selection:
    """Recognise the train.py at ``path``.

    Raises:
        UnsupportedTrainPy: naming what did not match, for a file no adapter supports.
    """
    facts = read_facts(path)
    for adapter in ADAPTERS:
        if facts.sha256 in adapter.SHA256:
            found = adapter.problems(facts)
            if found:  # a known file must pass its own probes; if not, the probes are wrong
                raise UnsupportedTrainPy(
                    f'{path} is timm {adapter.GENERATION} train.py but fails its probes: {"; ".join(found)}')
            return Selection(path, adapter.GENERATION, adapter, adapter.SHA256[facts.sha256],
                             tuple(adapter.RELEASES), facts.sha256)

    fits = []
    report: List[str] = []
    for adapter in ADAPTERS:
        found = adapter.problems(facts)
        if not found:
            fits.append(adapter)
        else:
            report.append(f'  as timm {adapter.GENERATION}: ' + '; '.join(found))
    if len(fits) == 1:  # the caller warns (check_pair), once, naming the installed timm too
        return Selection(path, fits[0].GENERATION, fits[0], None, (), facts.sha256)

    if 'main' not in facts.defs and not any(m.startswith('timm') for m in facts.imports.values()):
        what = 'does not look like timm\'s train.py at all'
    elif 'resume_task_checkpoint' not in facts.imports and 'main' in facts.defs:
        what = 'looks like a train.py from before timm 1.0.27 (no task checkpoints), which MKD cannot patch'
    else:
        what = 'is a train.py whose structure no adapter knows'
    raise UnsupportedTrainPy(
        f'unsupported train.py: {path} {what}.\n'
        f'Supported: the train.py of {SUPPORTED_RELEASES_TEXT}. What did not match:\n'
        + '\n'.join(report)
        + '\nFix: use the unmodified train.py of a supported release:\n' + how_to_get_train_py())


__all__ += ['MKDRun', 'gen_1_0_27', 'gen_1_0_29']
