"""Checks that the installed timm provides the task API MKD plugs into.

timm 1.0.27 is the first release whose ``TrainingTask`` owns ``compile()``, ``setup_ema()``,
``prepare_distributed()`` and ``get_task_state()`` / ``load_task_state()`` (saved by
``CheckpointSaver`` under ``task_state``). Older releases would silently drop the learned
temperatures from checkpoints, so we refuse them at import time.
"""
from typing import Tuple

MIN_TIMM_VERSION = (1, 0, 27)


class UnsupportedTimmVersion(ImportError):
    """Raised when the installed timm is older than the task API MKD needs."""


def parse_version(text: str) -> Tuple[int, int, int]:
    """Parse the leading ``major.minor.patch`` of a version string ('1.0.29.dev0' -> (1, 0, 29))."""
    parts = []
    for piece in text.split('.')[:3]:
        digits = ''
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def check_timm_version(installed: str) -> None:
    """Raise ``UnsupportedTimmVersion`` naming both versions when ``installed`` is too old.

    Args:
        installed: the version string of the installed timm (``timm.__version__``).
    """
    if parse_version(installed) < MIN_TIMM_VERSION:
        required = '.'.join(str(v) for v in MIN_TIMM_VERSION)
        raise UnsupportedTimmVersion(
            f"timm-mkd needs timm >= {required} (its TrainingTask API with task_state checkpoints), "
            f"but timm {installed} is installed. Fix: pip install 'timm>={required}'."
        )
