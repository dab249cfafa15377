"""Adapters that run timm's train.py with MKD: the only code that knows train.py's internals.

One module per train.py generation (``gen_1_0_27``: timm 1.0.27 and 1.0.28; ``gen_1_0_29``:
timm 1.0.29.dev0), shared machinery in ``common``. ``select(path)`` reads a train.py,
recognises its generation and returns a ``Selection`` whose ``load()`` imports the file and
installs that generation's patches.

Recognition: a file byte-identical to a known release is taken at once; any other file is
accepted only if it passes every structural probe of exactly one generation (names, imports,
call keywords and call order, read with ``ast``), and a warning says it is not a known release.
Anything else raises ``UnsupportedTrainPy`` listing what did not match, before a single patch
is applied: never a half-patched run.

This package is loaded by ``train_mkd.py`` under the private name ``_timm_mkd_patches`` and is
not installed with ``timm_mkd`` (setup.cfg installs ``timm_mkd`` only), so it cannot shadow or
be shadowed by another top-level ``patches`` module.
"""
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional

from . import gen_1_0_27, gen_1_0_29
from .common import (
    SUPPORTED_RELEASES_TEXT, MKDRun, MKDSetupError, UnsupportedTrainPy, how_to_get_train_py,
    load_train_module, read_facts)

__all__ = [
    'ADAPTERS', 'Selection', 'select', 'looks_like_timm_train_py', 'how_to_get_train_py',
    'UnsupportedTrainPy', 'MKDSetupError',
]

_logger = logging.getLogger('train_mkd')

#: Newest first.
ADAPTERS = (gen_1_0_29, gen_1_0_27)


@dataclass
class Selection:
    """A recognised train.py: its generation, its adapter, and whether it is a known release file."""
    path: str
    generation: str
    adapter: ModuleType
    known_as: Optional[str]  # e.g. 'timm v1.0.27 / v1.0.28'; None for a modified or newer file

    def load(self) -> 'tuple':
        """Import train.py, install the patches; returns ``(module, run)``.

        Raises:
            UnsupportedTrainPy: if the installed timm cannot run this train.py.
        """
        host = self.adapter.host_problems()
        if host:
            raise UnsupportedTrainPy(
                f'{self.path} (timm {self.generation} train.py): ' + '; '.join(host)
                + '.\nUse the train.py that matches the installed timm:\n' + how_to_get_train_py())
        module = load_train_module(self.path)
        run = self.adapter.apply(module)
        return module, run


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
            return Selection(path, adapter.GENERATION, adapter, adapter.SHA256[facts.sha256])

    fits = []
    report: List[str] = []
    for adapter in ADAPTERS:
        found = adapter.problems(facts)
        if not found:
            fits.append(adapter)
        else:
            report.append(f'  as timm {adapter.GENERATION}: ' + '; '.join(found))
    if len(fits) == 1:
        adapter = fits[0]
        _logger.warning(
            f'{path} is not a train.py file of a known timm release (sha256 {facts.sha256[:12]}...); '
            f'its structure matches the timm {adapter.GENERATION} train.py, so that adapter is used. '
            f'If the run misbehaves, use an unmodified train.py of a supported release.')
        return Selection(path, adapter.GENERATION, adapter, None)

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
        + '\nFix: use the unmodified train.py of a supported release, e.g. the one matching the installed timm:\n'
        + how_to_get_train_py())


__all__ += ['MKDRun', 'gen_1_0_27', 'gen_1_0_29']
