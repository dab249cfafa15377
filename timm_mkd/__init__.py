"""timm-mkd: Meta Knowledge Distillation for timm.

The teacher and student softmax temperatures of logit distillation become meta-parameters,
learned by meta-gradients on held-out data every N optimizer updates. ``MKDTask`` is a timm
``TrainingTask``; ``train_mkd.py`` (in the source checkout) runs timm's own train.py with it.

Importing the package checks the installed timm's version (without importing timm or torch); the
names below are loaded on first use, so ``timm_mkd.cli`` and ``timm_mkd.config`` stay light.
"""
import importlib

from .compat import UnsupportedTimmVersion, check_timm_version, installed_timm_version
from .version import __version__

check_timm_version(installed_timm_version())

_LAZY = {
    'MKDTask': 'task',
    'MKDConfig': 'config',
    'TRAIN_STREAM': 'meta.meta_controller',
    'Temperatures': 'meta.temperature',
    'two_temperature_kd_loss': 'loss',
    'meta_loss_fn': 'loss',
    'finite_difference_hypergradient': 'meta.meta_step',
    'exact_hypergradient': 'meta.meta_step',
    'build_teacher': 'teacher',
    'load_state_dict_file': 'teacher',
    'build_meta_loader': 'data.meta_loader',
}

__all__ = ['__version__', 'UnsupportedTimmVersion', 'check_timm_version', *_LAZY]


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'timm_mkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    globals()[name] = value
    return value
