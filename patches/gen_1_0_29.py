"""Adapter for the train.py of timm 1.0.29.dev0 (main after 1.0.28, up to July 2026).

Differences from 1.0.27 (checked by ``problems``):

- scheduled-resolution training: ``--train-img-sizes`` / ``--train-batch-sizes`` and friends are
  passed to ``create_loader(input_size_choices=..., batch_size_choices=..., num_batches=...)``;
- the learning rate is derived *after* the loaders (from the policy-average batch size);
- the epoch loop calls the new ``_set_loader_epoch(loader, epoch)`` helper.

The patched names and the order of the calls MKD hooks into are unchanged, so ``apply`` installs
the same shared patches as for 1.0.27. What differs for MKD: the meta batches always use the
model's base input size (``data_config['input_size']``) and ``--mkd-meta-batch-size`` (default
``--batch-size``), whatever resolution schedule the training loader follows; the look-ahead
uses the gradient of whatever batch size the schedule just drew.

This train.py calls ``create_loader`` with keywords that only timm >= 1.0.29 accepts, so the
installed timm is checked (``host_problems``) before anything runs.
"""
import inspect

from .probe import TrainPyFacts, common_problems
from .run import MKDRun

GENERATION = '1.0.29.dev0'
RELEASES = ('1.0.29.dev0',)
#: sha256 of known files of this generation (main-branch commits; no release tag yet).
SHA256 = {
    'f0bb70b9e1c8c576eb1f7beba9cb46953d01ec1308d68c59ec055a6266f76388': 'timm main a6da4da1 (1.0.29.dev0)',
    '06ef0aca7b871faf6512aa540b38059a39c08235d8ebac47710e7f485bdd18e1': 'timm main 27214e00 (1.0.29.dev0)',
    'dfe989d3e25ad22d0f1f7bd443b5b6e1ff1a3755830ed9b13c597561830a067f': 'timm main b7c3df82 (1.0.29.dev0)',
    '29ad60f45136f7eee6e6457dcc323a17fe1739ff7b9b06de96da7da3a2b8dbaf': 'timm main 4f394a57 (1.0.29.dev0)',
}


def problems(facts: TrainPyFacts) -> list:
    """Everything about ``facts`` that does not fit this generation (empty: it fits)."""
    found = common_problems(facts)
    if '_set_loader_epoch' not in facts.defs:
        found.append('no _set_loader_epoch() helper')
    if not any('input_size_choices' in c.keywords for c in facts.calls('create_loader')):
        found.append('create_loader is not called with input_size_choices= (scheduled resolutions)')
    return found


def host_problems() -> list:
    """What the installed timm lacks for this train.py."""
    from timm.data import create_loader
    params = inspect.signature(create_loader).parameters
    missing = [p for p in ('input_size_choices', 'batch_size_choices', 'num_batches') if p not in params]
    if missing:
        import timm
        return [f'this train.py passes {", ".join(missing)} to timm.data.create_loader, which timm '
                f'{timm.__version__} does not accept (it needs timm >= 1.0.29)']
    return []


def apply(module) -> MKDRun:
    """Install the MKD patches into the loaded train.py ``module``; returns the run state."""
    return MKDRun.install(module, GENERATION)
