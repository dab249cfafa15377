"""What the train.py adapters share: their two errors, loading train.py as a module, and small host fixes.

How the patches work is documented in ``patches/run.py``; how a train.py is recognised, in
``patches/probe.py`` and ``patches/__init__.py``.
"""
import importlib.util
import logging
import sys
import types
import weakref
from typing import Any, Dict

_logger = logging.getLogger('train_mkd')

#: Module name under which train.py is loaded (also registered in ``sys.modules`` so pickling
#: and DataLoader workers can find objects defined in it).
TRAIN_MODULE_NAME = 'timm_train'

class UnsupportedTrainPy(RuntimeError):
    """train.py is not one the patches know; nothing has been patched or run."""


class MKDSetupError(RuntimeError):
    """A user-facing set-up failure inside train.py's ``main()`` (teacher, meta data, ...).

    ``train_mkd.py`` prints the message alone (no traceback) and exits non-zero.
    """


def load_train_module(path: str) -> types.ModuleType:
    """Import train.py from ``path`` as module ``timm_train`` without running ``main()``.

    train.py guards ``main()`` with ``if __name__ == '__main__'``; under any other module name
    importing it only builds its argument parsers.
    """
    spec = importlib.util.spec_from_file_location(TRAIN_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise UnsupportedTrainPy(f'cannot import {path} as a Python module')
    module = importlib.util.module_from_spec(spec)
    sys.modules[TRAIN_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(TRAIN_MODULE_NAME, None)
        raise
    return module


def cpu_ddp_safe(task):
    """Let ``torchrun`` on CPU work: drop train.py's ``device_ids=[cpu]`` before DDP sees it.

    train.py calls ``task.prepare_distributed(device_ids=[device], ...)`` whatever the device;
    ``DistributedDataParallel`` refuses ``device_ids`` for CPU modules ("device_ids ... only work
    with ... GPU modules"), so train.py itself cannot run DDP on CPU (gloo). For timm's own tasks
    built with a local teacher, a CPU device list becomes None, which is what DDP expects there;
    GPU runs are unchanged. The MKD task gets the same.
    """
    original, owner = type(task).prepare_distributed, weakref.ref(task)  # no task -> closure -> task cycle

    def prepare_distributed(device_ids=None, **ddp_kwargs):
        import torch
        if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids = None
        return original(owner(), device_ids=device_ids, **ddp_kwargs)
    task.prepare_distributed = prepare_distributed
    return task


def checkpoint_task_state(task) -> Dict[str, Any]:
    """The ``task_state`` a CheckpointSaver writes for ``task`` (timm >= 1.0.29: ``get_checkpoint_state``)."""
    if hasattr(task, 'get_checkpoint_state'):
        return task.get_checkpoint_state().get('task_state') or {}
    return task.get_task_state() or {}


def dump_args(args_dict: Dict[str, Any]) -> str:
    import yaml
    return yaml.safe_dump(args_dict, default_flow_style=False)
