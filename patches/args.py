"""train.py's own arguments against the MKD flags: what train.py's flags mean for an MKD run.

``validate_train_args`` is what the ``_parse_args`` patch calls: it maps ``--teacher`` onto train.py's
``--kd-model-name`` (its switch into distillation), gives ``--mkd-meta-batch-size`` train.py's
``--batch-size`` as default, runs ``timm_mkd.cli.validate_mkd_args`` and then refuses the train.py
settings MKD cannot run with (``--kd-distill-type``, ``--kd-loss-type``, ``--naflex-loader``) and meta
data that is the validation split or folder of ``--val-split`` / ``--data-dir``.
"""
import argparse
import os
from typing import Optional

from timm_mkd.cli import MKDArgumentError, MKDOptions, validate_mkd_args

_TRAIN_SYNONYMS = ('train', 'training')
_EVAL_SYNONYMS = ('val', 'valid', 'validation', 'eval', 'evaluation')


def _is_folder_dataset(dataset: Optional[str]) -> bool:
    """train.py's ``--dataset`` for image folders: empty (timm's default) or a folder type."""
    name = (dataset or '').lower()
    return name in ('', 'folder', 'imagefolder', 'torch/folder', 'torch/image_folder')


def _split_folder_exists(data_dir: str, split: str) -> bool:
    """Whether timm's create_dataset finds a sub-folder for ``split`` (else it reads all of data_dir)."""
    name = split.split('[')[0]
    candidates = [name]
    if name in _TRAIN_SYNONYMS:
        candidates += list(_TRAIN_SYNONYMS)
    elif name in _EVAL_SYNONYMS:
        candidates += list(_EVAL_SYNONYMS)
    return any(os.path.isdir(os.path.join(data_dir, c)) for c in candidates)


def _validation_folders(data_dir: Optional[str], val_split: str):
    """Folders timm's create_dataset may read the validation split from (folder datasets)."""
    if not data_dir or not val_split:
        return set()
    names = {val_split}
    if val_split in _EVAL_SYNONYMS:
        names |= set(_EVAL_SYNONYMS)
    return {os.path.realpath(os.path.join(data_dir, n)) for n in names}


def _merge_teacher(args: argparse.Namespace) -> None:
    """``--teacher`` and ``--kd-model-name`` are one setting: copy it into both (normalised in place)."""
    teacher, kd_name = getattr(args, 'teacher', None), getattr(args, 'kd_model_name', None)
    if teacher is not None and kd_name is not None and teacher != kd_name:
        raise MKDArgumentError(
            f'--teacher {teacher!r} and --kd-model-name {kd_name!r} disagree; they are the same '
            f'setting: give one of them')
    teacher = teacher if teacher is not None else kd_name
    if teacher is not None:
        args.teacher = teacher
        args.kd_model_name = teacher


def _check_distillation(args: argparse.Namespace) -> None:
    distill_type = getattr(args, 'kd_distill_type', 'logit')
    if distill_type != 'logit':
        raise MKDArgumentError(
            f'--mkd learns the temperatures of logit distillation; --kd-distill-type {distill_type} '
            f'has no such temperatures. Use --kd-distill-type logit (the default) or drop --mkd.')
    loss_type = getattr(args, 'kd_loss_type', 'kl')
    if loss_type != 'kl':
        raise MKDArgumentError(f'--mkd needs --kd-loss-type kl, got {loss_type!r}')
    if getattr(args, 'naflex_loader', False):
        raise MKDArgumentError(
            '--mkd does not support --naflex-loader (its batches are patch dictionaries, not images); '
            'drop one of them')


def _check_meta_data(args: argparse.Namespace, opts: MKDOptions) -> None:
    """Refuse meta data that is the validation split or folder, or a split folder timm would not find."""
    spec = opts.meta_data
    val_split = getattr(args, 'val_split', None)
    data_dir = getattr(args, 'data_dir', None) or getattr(args, 'data', None)
    leak = ('learning the temperatures on it would leak the reported accuracy into training. '
            'Use a held-out fraction (e.g. --mkd-meta-data 0.05) or another')
    if spec.kind == 'split' and val_split:
        from timm_mkd.data.meta_data import check_not_validation
        try:
            check_not_validation(spec.split, None, val_split, data_dir, dataset=getattr(args, 'dataset', None))
        except ValueError as e:
            raise MKDArgumentError(f'--mkd-meta-data split:{spec.split} is the validation split '
                                   f'(--val-split {val_split}): {leak} split.') from e
    if spec.kind == 'split' and _is_folder_dataset(getattr(args, 'dataset', None)) and data_dir \
            and os.path.isdir(data_dir) and not _split_folder_exists(data_dir, spec.split):
        raise MKDArgumentError(
            f'--mkd-meta-data split:{spec.split}: there is no folder {os.path.join(data_dir, spec.split)!r}. '
            f'timm would then read the whole --data-dir (training and validation images) as the meta '
            f'set. Create that split folder, or use folder:PATH or a held-out fraction (e.g. 0.05).')
    if spec.kind == 'folder':
        if not os.path.isdir(spec.path):
            raise MKDArgumentError(f'--mkd-meta-data folder:{spec.path}: no such folder')
        if os.path.realpath(spec.path) in _validation_folders(data_dir, val_split):
            raise MKDArgumentError(f'--mkd-meta-data folder:{spec.path} is the validation folder '
                                   f'(--val-split {val_split}): {leak} folder.')


def validate_train_args(args: argparse.Namespace) -> Optional[MKDOptions]:
    """Check and normalise train.py's parsed namespace (or a bare parser's) for MKD.

    Normalisation, done in place so that ``args.yaml`` and checkpoints record the real run:
    ``--teacher`` is copied to ``kd_model_name``, and with ``--mkd`` a missing ``--mkd-meta-batch-size``
    becomes ``--batch-size``. train.py's own fields are read with ``getattr`` defaults.

    Returns:
        What ``timm_mkd.cli.validate_mkd_args`` returns: None for a run without MKD or a local teacher.

    Raises:
        MKDArgumentError: for every contradiction, naming the flags and the fix.
    """
    _merge_teacher(args)
    if getattr(args, 'mkd', False) and getattr(args, 'mkd_meta_batch_size', None) is None:
        args.mkd_meta_batch_size = getattr(args, 'batch_size', None)
    opts = validate_mkd_args(args)
    if opts is not None and opts.mkd:
        _check_distillation(args)
        _check_meta_data(args, opts)
    return opts
