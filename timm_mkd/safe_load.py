"""Reading checkpoints with ``torch.load(weights_only=True)`` and saying what went wrong, safely.

torch's own error text for a file ``weights_only=True`` refuses suggests re-running with
``weights_only=False``, which executes arbitrary pickled code. Our messages never pass that
advice on: ``describe_load_error`` keeps only what is wrong with the file.
"""
import argparse
from typing import Any

import torch

__all__ = ['describe_load_error', 'load_checkpoint']

_UNPICKLER_MARK = 'WeightsUnpickler error:'


def describe_load_error(error: BaseException) -> str:
    """What ``torch.load`` found wrong, in one line, without torch's unsafe retry advice.

    Args:
        error: the exception ``torch.load(..., weights_only=True)`` raised.
    Returns:
        ``'TypeName: detail'``, e.g. ``'UnpicklingError: Unsupported global: GLOBAL __main__.Foo'``.
    """
    text = str(error)
    if _UNPICKLER_MARK in text:
        detail = text.split(_UNPICKLER_MARK, 1)[1].strip()
        detail = detail.splitlines()[0].strip() if detail else ''
        detail = detail.split(' was not an allowed global')[0].split('. Please use')[0]
    else:
        detail = text.strip().splitlines()[0] if text.strip() else ''
        detail = detail.split(' This is an internal miniz error')[0]
    if 'weights_only' in detail or not detail:
        detail = 'the file is not a checkpoint torch can read'
    return f'{type(error).__name__}: {detail}'


def load_checkpoint(path: str) -> Any:
    """``torch.load`` of a timm train.py checkpoint with ``weights_only=True`` on the CPU.

    timm's train.py stores its argparse Namespace under ``'args'``; exactly that class is allowed.

    Args:
        path: the ``.pth`` / ``.pth.tar`` file.
    Returns:
        What ``torch.load`` returns.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)
