"""Checks that the installed timm provides the task API MKD plugs into.

timm 1.0.27 is the first release whose ``TrainingTask`` owns ``compile()``, ``setup_ema()``,
``prepare_distributed()`` and ``get_task_state()`` / ``load_task_state()`` (saved by
``CheckpointSaver`` under ``task_state``). Older releases would silently drop the learned
temperatures from checkpoints, so we refuse them at import time.
"""
import importlib.util
import os
import re
import sys
from typing import Optional, Tuple

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


def check_timm_version(installed: Optional[str]) -> None:
    """Raise ``UnsupportedTimmVersion`` naming both versions when ``installed`` is too old.

    Args:
        installed: the version string of the installed timm (``timm.__version__``); None when timm is not
            installed (the quickstart reads the adapters before it installs anything): nothing to check yet.
    """
    if installed is not None and parse_version(installed) < MIN_TIMM_VERSION:
        required = '.'.join(str(v) for v in MIN_TIMM_VERSION)
        raise UnsupportedTimmVersion(
            f"timm-mkd needs timm >= {required} (its TrainingTask API with task_state checkpoints), "
            f"but timm {installed} is installed. Fix: pip install 'timm>={required}'."
        )


def installed_timm_version() -> Optional[str]:
    """The installed timm's ``__version__``, read without importing timm (which imports torch) when it is not loaded yet.

    An imported timm answers for itself; otherwise ``timm/version.py`` is read as text, and only if that fails
    is timm imported.
    """
    loaded = sys.modules.get('timm')
    if loaded is not None:
        return loaded.__version__
    spec = importlib.util.find_spec('timm')
    if spec is None:
        return None  # not installed: importing what needs timm fails later with Python's own message
    if spec.origin:
        try:
            with open(os.path.join(os.path.dirname(spec.origin), 'version.py')) as f:
                found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", f.read(), re.M)
            if found:
                return found.group(1)
        except OSError:
            pass
    import timm
    return timm.__version__
