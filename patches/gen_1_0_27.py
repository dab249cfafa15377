"""Adapter for the train.py of timm 1.0.27 and 1.0.28 (the two releases ship a byte-identical file).

What this generation looks like, and what the adapter relies on (checked by ``problems``):

- 1.0.27 is the first train.py that runs every step through a ``timm.task`` task and saves
  ``task_state`` in checkpoints (``resume_task_checkpoint``); 1.0.26 and older are refused.
- ``main()`` builds, in this order: datasets (``create_dataset``), loaders (``create_loader``), the
  task (an if/elif on ``--kd-distill-type`` calling ``LogitDistillationTask(...)`` etc. with
  keyword arguments), the optimizer (``create_optimizer_v2``), resume, EMA, compile, DDP, the
  ``utils.CheckpointSaver``, then the epoch loop (``train_one_epoch``, ``utils.update_summary``).
- one fixed-resolution training loader; the learning rate is derived from the batch size
  *before* the loaders are built; the epoch loop sets dataset/sampler epochs inline (no
  ``_set_loader_epoch`` helper: that and scheduled resolutions arrive in 1.0.29.dev0).

None of those differences touch a patched name, so ``apply`` installs every shared patch.
"""
from .probe import TrainPyFacts, common_problems
from .run import MKDRun

GENERATION = '1.0.27'
RELEASES = ('1.0.27', '1.0.28')
#: sha256 of the released files (git blob 74acfd6d in both tags).
SHA256 = {
    '1fb02d26fe16536bc7de2c987980644353117c2b2b8046532261464093cd1ac6': 'timm v1.0.27 / v1.0.28',
}


def problems(facts: TrainPyFacts) -> list:
    """Everything about ``facts`` that does not fit this generation (empty: it fits)."""
    found = common_problems(facts)
    if '_set_loader_epoch' in facts.defs:
        found.append('defines _set_loader_epoch() (a 1.0.29.dev0 train.py)')
    if any('input_size_choices' in c.keywords for c in facts.calls('create_loader')):
        found.append('passes input_size_choices= to create_loader (a 1.0.29.dev0 train.py)')
    return found


def host_problems() -> list:
    """What the installed timm lacks for this train.py (timm_mkd already requires >= 1.0.27)."""
    return []


def apply(module) -> MKDRun:
    """Install the MKD patches into the loaded train.py ``module``; returns the run state."""
    return MKDRun.install(module, GENERATION)
