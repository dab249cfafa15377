#!/usr/bin/env python3
"""Run timm's own train.py with Meta Knowledge Distillation (MKD), from a source checkout.

    python train_mkd.py <every train.py flag> --teacher NAME [--teacher-checkpoint FILE] --mkd [--mkd-* flags]

The same command as ``train-mkd`` and ``python -m timm_mkd`` of an installed timm-mkd: all three
call ``timm_mkd.launcher.main`` (how train.py is found, checked and patched is documented there).
This file only puts the checkout first on ``sys.path`` so that its ``timm_mkd`` and ``patches/``
are the ones that run.
"""
import os
import sys

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    """Run the launcher of this checkout as ``train_mkd.py``."""
    if sys.path[0] != REPO_DIR:
        sys.path.insert(0, REPO_DIR)
    try:
        from timm_mkd.launcher import main as launch
    except ImportError as e:  # timm_mkd refuses a too old timm at import time
        if type(e).__name__ == 'UnsupportedTimmVersion':
            sys.stderr.write(f'train_mkd.py: error: {e}\n')
            raise SystemExit(2)
        raise
    launch(prog='train_mkd.py')


if __name__ == '__main__':
    main()
