"""timm-mkd: Meta Knowledge Distillation for timm.

The teacher and student softmax temperatures of logit distillation become meta-parameters,
learned by meta-gradients on held-out data every N optimizer updates. ``MKDTask`` is a timm
``TrainingTask``; ``train_mkd.py`` (in the source checkout) runs timm's own train.py with it.
"""
import timm as _timm

from .compat import UnsupportedTimmVersion, check_timm_version
from .version import __version__

check_timm_version(_timm.__version__)

from .loss import meta_loss_fn, two_temperature_kd_loss  # noqa: E402
from .meta_step import exact_hypergradient, finite_difference_hypergradient  # noqa: E402
from .task import TRAIN_STREAM, MKDTask  # noqa: E402
from .teacher import build_teacher, load_state_dict_file  # noqa: E402
from .temperature import Temperatures  # noqa: E402

__all__ = [
    '__version__',
    'MKDTask',
    'TRAIN_STREAM',
    'Temperatures',
    'two_temperature_kd_loss',
    'meta_loss_fn',
    'finite_difference_hypergradient',
    'exact_hypergradient',
    'build_teacher',
    'load_state_dict_file',
    'UnsupportedTimmVersion',
    'check_timm_version',
]
