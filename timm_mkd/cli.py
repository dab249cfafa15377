"""Command-line flags of MKD, for timm's ``train.py`` (through ``train_mkd.py``) or any argparse parser.

``add_mkd_args`` adds the flags; ``validate_mkd_args`` checks a parsed namespace for
contradictions and returns a small ``MKDOptions`` record, or None when the run uses none of them.

Why the flags live here and not in ``patches/``: they are the user-facing contract of the
plugin, identical for every train.py generation, and they must be testable without train.py
(which is not in timm's wheel). ``patches/`` only decides *where* to add them.

Why ``validate_mkd_args`` raises ``MKDArgumentError`` (a ``ValueError``) instead of calling
``parser.error``: it is also used on plain namespaces (tests, scripts); the train.py patch turns
the error into ``parser.error`` so the user sees argparse's usual ``error:`` line and exit code 2.

Nothing here imports torch or the MKD core at module import time: ``--help`` stays fast.
"""
import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

__all__ = [
    'MKD_DEFAULTS',
    'MKD_DESTS',
    'MKDArgumentError',
    'MetaDataSpec',
    'MKDOptions',
    'add_mkd_args',
    'parse_meta_data',
    'validate_mkd_args',
    'mkd_flags_in_use',
]

# Fallback defaults, used only when the core's MKDTask signature cannot be read (see _core_defaults).
_FALLBACK_DEFAULTS = dict(tau_t=1.0, tau_s=1.0, tau_min=0.5, tau_max=20.0, meta_interval=10, meta_lr=0.1,
                          tie_temperatures=True, hypergrad_mode='full', meta_loss='calibrated', estimator='calibration',
                          warm_start_batches=4)

#: Default of ``--mkd-meta-data``: hold out 5% of the training split.
DEFAULT_META_DATA = '0.05'


def _core_defaults() -> Dict[str, Any]:
    """The MKD hyper-parameter defaults, read from ``MKDTask.__init__`` so there is one source of truth.

    The benchmark issue chooses the defaults from measurements and changes them in the core; the
    flags follow without a second edit. Falls back to ``_FALLBACK_DEFAULTS`` if the core cannot be
    imported (e.g. while it is being written, or in a stripped-down test environment).
    """
    defaults = dict(_FALLBACK_DEFAULTS)
    try:
        import inspect
        from timm_mkd.task import MKDTask
        params = inspect.signature(MKDTask.__init__).parameters
        for key in defaults:
            if key in params and params[key].default is not inspect.Parameter.empty:
                defaults[key] = params[key].default
    except Exception:  # noqa: BLE001 - any failure means: use the fallback
        pass
    return defaults


MKD_DEFAULTS = _core_defaults()

#: argparse ``dest`` of every flag ``add_mkd_args`` adds, with its default.
MKD_DESTS: Dict[str, Any] = {
    'mkd': False,
    'teacher': None,
    'teacher_checkpoint': None,
    'mkd_tau_t': MKD_DEFAULTS['tau_t'],
    'mkd_tau_s': MKD_DEFAULTS['tau_s'],
    'mkd_tau_min': MKD_DEFAULTS['tau_min'],
    'mkd_tau_max': MKD_DEFAULTS['tau_max'],
    'mkd_meta_interval': MKD_DEFAULTS['meta_interval'],
    'mkd_meta_lr': MKD_DEFAULTS['meta_lr'],
    'mkd_temperatures': 'tied' if MKD_DEFAULTS['tie_temperatures'] else 'free',
    'mkd_hypergrad': MKD_DEFAULTS['hypergrad_mode'],
    'mkd_meta_loss': MKD_DEFAULTS['meta_loss'],
    'mkd_estimator': MKD_DEFAULTS['estimator'],
    'mkd_warm_start': MKD_DEFAULTS['warm_start_batches'],
    'mkd_meta_data': DEFAULT_META_DATA,
    'mkd_meta_batch_size': None,
}

# Flags that only mean something together with --mkd.
_MKD_ONLY = [d for d in MKD_DESTS if d.startswith('mkd_')]


class MKDArgumentError(ValueError):
    """A contradiction or bad value among the MKD flags; the message names the flag and the fix."""


def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def add_mkd_args(parser_or_group) -> None:
    """Add the MKD flags to an ``argparse.ArgumentParser`` or to an argument group.

    Given a parser, the flags go into a new group titled "MKD (Meta Knowledge Distillation)" so
    that ``--help`` lists them together; given a group, they go into that group.

    Every value type is a plain str / int / float / bool: timm's ``CheckpointSaver`` pickles the
    argument namespace into each checkpoint and ``resume_task_checkpoint`` loads it with
    ``weights_only=True``, which refuses anything else.
    """
    if isinstance(parser_or_group, argparse.ArgumentParser):
        group = parser_or_group.add_argument_group(
            'MKD (Meta Knowledge Distillation)',
            'Learn the teacher and student softmax temperatures by meta-gradients on held-out data. '
            'Added by train_mkd.py; without --mkd, --teacher or --teacher-checkpoint the run is plain train.py.')
    else:
        group = parser_or_group
    d = MKD_DESTS
    group.add_argument(
        '--mkd', action='store_true', default=d['mkd'],
        help='Enable MKD: logit distillation whose teacher and student temperatures are learned '
             'meta-parameters (needs --teacher or --kd-model-name).')
    group.add_argument(
        '--teacher', default=d['teacher'], type=str, metavar='NAME',
        help='timm architecture of the teacher; same as --kd-model-name (give one, or both equal).')
    group.add_argument(
        '--teacher-checkpoint', default=d['teacher_checkpoint'], type=str, metavar='FILE',
        help='Local teacher weights (.safetensors, .pth, .pth.tar as train.py writes them) instead of '
             'the hub weights. Also works for plain KD without --mkd.')
    group.add_argument(
        '--mkd-tau-t', default=d['mkd_tau_t'], type=float, metavar='TAU',
        help=f'Initial teacher temperature (default: {d["mkd_tau_t"]}).')
    group.add_argument(
        '--mkd-tau-s', default=d['mkd_tau_s'], type=float, metavar='TAU',
        help=f'Initial student temperature (default: {d["mkd_tau_s"]}).')
    group.add_argument(
        '--mkd-tau-min', default=d['mkd_tau_min'], type=float, metavar='TAU',
        help=f'Lower bound of both temperatures (default: {d["mkd_tau_min"]}).')
    group.add_argument(
        '--mkd-tau-max', default=d['mkd_tau_max'], type=float, metavar='TAU',
        help=f'Upper bound of both temperatures (default: {d["mkd_tau_max"]}).')
    group.add_argument(
        '--mkd-meta-interval', default=d['mkd_meta_interval'], type=int, metavar='N',
        help=f'Take a meta step every N optimizer updates (default: {d["mkd_meta_interval"]}).')
    group.add_argument(
        '--mkd-meta-lr', default=d['mkd_meta_lr'], type=float, metavar='LR',
        help=f'Learning rate of the Adam meta optimizer on the log-temperatures (default: {d["mkd_meta_lr"]}).')
    group.add_argument(
        '--mkd-temperatures', default=d['mkd_temperatures'], choices=('tied', 'free'),
        help='tied: one meta step moves both log-temperatures together, so tau_t / tau_s keeps its initial '
             'value; free: each moves on its own (the one-step meta-gradient then drives tau_s above tau_t, '
             f'which costs accuracy in benchmarks/results) (default: {d["mkd_temperatures"]}).')
    group.add_argument(
        '--mkd-hypergrad', default=d['mkd_hypergrad'], choices=('full', 'shape'),
        help='full: the one-step meta-gradient; shape: the same with the KD push\'s size held fixed, so a '
             f'temperature is judged by the direction of its push only (default: {d["mkd_hypergrad"]}).')
    group.add_argument(
        '--mkd-meta-loss', default=d['mkd_meta_loss'], choices=('ce', 'calibrated'),
        help='Loss of the look-ahead student on the meta batch. ce: cross-entropy; calibrated: cross-entropy '
             'at the batch\'s best single logit scale, blind to over- or under-confidence, so the meta step '
             f'follows ranking (top-1) rather than calibration (default: {d["mkd_meta_loss"]}).')
    group.add_argument(
        '--mkd-estimator', default=d['mkd_estimator'], choices=('lookahead', 'neumann', 'calibration'),
        help='How the meta step estimates the temperature gradient. calibration: the teacher\'s held-out NLL at '
             'its temperature (the KD target closest to the class posterior; one teacher forward per meta step); '
             'lookahead: the student\'s meta loss after a one-step look-ahead (drifts upward: it sees only the '
             'next step); neumann: implicit differentiation, 5 Hessian-vector products per meta step '
             f'(default: {d["mkd_estimator"]}).')
    group.add_argument(
        '--mkd-warm-start', default=d['mkd_warm_start'], type=int, metavar='BATCHES',
        help='calibration estimator: the first meta step sets the temperature to the exact minimiser of the '
             'teacher\'s NLL on this many meta batches, so the start value does not matter; 0: walk from '
             f'--mkd-tau-t (default: {d["mkd_warm_start"]}).')
    group.add_argument(
        '--mkd-meta-data', default=d['mkd_meta_data'], type=str, metavar='SOURCE',
        help='Where meta batches come from: a fraction such as 0.05 (hold out that share of the '
             'training split; those samples leave training), split:NAME (another split of --dataset), '
             'folder:PATH (an image folder with the same classes), or train (the current training '
             f'batch; biased, needs no data) (default: {d["mkd_meta_data"]}).')
    group.add_argument(
        '--mkd-meta-batch-size', default=d['mkd_meta_batch_size'], type=int, metavar='N',
        help='Meta batch size per process (default: --batch-size).')


@dataclass(frozen=True)
class MetaDataSpec:
    """Parsed ``--mkd-meta-data``: ``kind`` is 'holdout', 'split', 'folder' or 'train'."""
    kind: str
    fraction: Optional[float] = None
    split: Optional[str] = None
    path: Optional[str] = None

    def describe(self) -> str:
        if self.kind == 'holdout':
            return f'held-out {self.fraction:g} of the training split'
        if self.kind == 'split':
            return f'split {self.split!r}'
        if self.kind == 'folder':
            return f'folder {self.path!r}'
        return 'the training stream (current training batch)'


def parse_meta_data(value: str) -> MetaDataSpec:
    """Parse a ``--mkd-meta-data`` value; raise ``MKDArgumentError`` naming the accepted forms."""
    text = str(value).strip()
    forms = ('a fraction in (0, 1) such as 0.05, split:NAME, folder:PATH, or train')
    if text == 'train':
        return MetaDataSpec('train')
    if text.startswith('split:'):
        name = text[len('split:'):].strip()
        if not name:
            raise MKDArgumentError(f'--mkd-meta-data {value!r}: split:NAME needs a split name')
        return MetaDataSpec('split', split=name)
    if text.startswith('folder:'):
        path = text[len('folder:'):].strip()
        if not path:
            raise MKDArgumentError(f'--mkd-meta-data {value!r}: folder:PATH needs a path')
        return MetaDataSpec('folder', path=os.path.expanduser(path))
    try:
        fraction = float(text)
    except ValueError:
        raise MKDArgumentError(f'--mkd-meta-data {value!r} is not understood; use {forms}') from None
    if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise MKDArgumentError(
            f'--mkd-meta-data {value!r}: a held-out fraction must be in (0, 1) exclusive '
            f'(0 leaves no meta data, 1 no training data); e.g. 0.05')
    return MetaDataSpec('holdout', fraction=fraction)


@dataclass(frozen=True)
class MKDOptions:
    """What ``validate_mkd_args`` found: the run's MKD / teacher-checkpoint settings.

    ``mkd`` False with a ``teacher_checkpoint`` means plain KD (timm's LogitDistillationTask)
    with a locally loaded teacher.
    """
    mkd: bool
    teacher: Optional[str]
    teacher_checkpoint: Optional[str]
    tau_t: float
    tau_s: float
    tau_min: float
    tau_max: float
    meta_interval: int
    meta_lr: float
    tie_temperatures: bool
    hypergrad_mode: str
    meta_loss: str
    estimator: str
    warm_start_batches: int
    meta_data: Optional[MetaDataSpec]
    meta_batch_size: Optional[int]

    def task_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``timm_mkd.MKDTask`` (the MKD-specific ones)."""
        return dict(
            tau_t=self.tau_t, tau_s=self.tau_s, tau_min=self.tau_min, tau_max=self.tau_max,
            meta_interval=self.meta_interval, meta_lr=self.meta_lr,
            tie_temperatures=self.tie_temperatures, hypergrad_mode=self.hypergrad_mode, meta_loss=self.meta_loss,
            estimator=self.estimator, warm_start_batches=self.warm_start_batches)


def mkd_flags_in_use(args: argparse.Namespace) -> Sequence[str]:
    """Flags (as typed on the command line) whose value differs from the default."""
    used = []
    for dest, default in MKD_DESTS.items():
        if hasattr(args, dest) and getattr(args, dest) != default:
            used.append(_flag(dest))
    return used


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
    """Folders timm's create_dataset may read the validation split from (folder datasets).

    timm looks for ``DATA_DIR/<split>`` and, for the common eval names, their synonyms.
    """
    if not data_dir or not val_split:
        return set()
    names = {val_split}
    if val_split in _EVAL_SYNONYMS:
        names |= set(_EVAL_SYNONYMS)
    return {os.path.realpath(os.path.join(data_dir, n)) for n in names}


def validate_mkd_args(args: argparse.Namespace) -> Optional[MKDOptions]:
    """Check the MKD flags of a parsed namespace, normalise it, and summarise it.

    Works on train.py's namespace and on a bare parser's (train.py's own fields such as
    ``kd_model_name``, ``kd_distill_type``, ``val_split`` are read with ``getattr`` defaults).

    Normalisation, done in place so that ``args.yaml`` and checkpoints record the real run:
    ``--teacher`` is copied to ``kd_model_name`` (train.py's switch into distillation), and with
    ``--mkd`` a missing ``--mkd-meta-batch-size`` becomes ``--batch-size``.

    Returns:
        None when neither ``--mkd`` nor ``--teacher-checkpoint`` is in use (``--teacher`` alone is
        exactly train.py's ``--kd-model-name``); otherwise an ``MKDOptions``.

    Raises:
        MKDArgumentError: for every contradiction, naming the flags and the fix.
    """
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    for dest, default in MKD_DESTS.items():
        if not hasattr(args, dest):
            setattr(args, dest, default)

    teacher, kd_name = get('teacher'), get('kd_model_name')
    if teacher is not None and kd_name is not None and teacher != kd_name:
        raise MKDArgumentError(
            f'--teacher {teacher!r} and --kd-model-name {kd_name!r} disagree; they are the same '
            f'setting: give one of them')
    teacher = teacher if teacher is not None else kd_name
    if teacher is not None:
        args.teacher = teacher
        args.kd_model_name = teacher

    mkd = bool(get('mkd'))
    checkpoint = get('teacher_checkpoint')
    if not mkd:
        stray = [_flag(d) for d in _MKD_ONLY if get(d) != MKD_DESTS[d]]
        if stray:
            raise MKDArgumentError(
                f'{", ".join(stray)}: MKD setting{"s" if len(stray) > 1 else ""} given without --mkd, '
                f'where {"they do" if len(stray) > 1 else "it does"} nothing. Add --mkd (and a teacher) or drop '
                f'{"them" if len(stray) > 1 else "it"}')
        if checkpoint is None:
            return None
    if teacher is None:
        what = '--mkd' if mkd else '--teacher-checkpoint'
        raise MKDArgumentError(
            f'{what} needs a teacher: add --teacher NAME (the timm architecture of the teacher, '
            f'e.g. --teacher resnet50; --kd-model-name NAME is the same)')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise MKDArgumentError(
            f'--teacher-checkpoint {checkpoint!r}: no such file. Give the path of the teacher\'s '
            f'weights (.safetensors, .pth or .pth.tar, e.g. OUTPUT/last.pth.tar from train.py).')
    if not mkd:
        return MKDOptions(
            mkd=False, teacher=teacher, teacher_checkpoint=checkpoint,
            tau_t=args.mkd_tau_t, tau_s=args.mkd_tau_s, tau_min=args.mkd_tau_min,
            tau_max=args.mkd_tau_max, meta_interval=args.mkd_meta_interval,
            meta_lr=args.mkd_meta_lr, tie_temperatures=args.mkd_temperatures == 'tied',
            hypergrad_mode=args.mkd_hypergrad, meta_loss=args.mkd_meta_loss, estimator=args.mkd_estimator,
            warm_start_batches=args.mkd_warm_start, meta_data=None, meta_batch_size=None)

    distill_type = get('kd_distill_type', 'logit')
    if distill_type != 'logit':
        raise MKDArgumentError(
            f'--mkd learns the temperatures of logit distillation; --kd-distill-type {distill_type} '
            f'has no such temperatures. Use --kd-distill-type logit (the default) or drop --mkd.')
    loss_type = get('kd_loss_type', 'kl')
    if loss_type != 'kl':
        raise MKDArgumentError(f'--mkd needs --kd-loss-type kl, got {loss_type!r}')
    if get('naflex_loader', False):
        raise MKDArgumentError(
            '--mkd does not support --naflex-loader (its batches are patch dictionaries, not images); '
            'drop one of them')

    tau_t, tau_s = args.mkd_tau_t, args.mkd_tau_s
    tau_min, tau_max = args.mkd_tau_min, args.mkd_tau_max
    for flag, value in (('--mkd-tau-t', tau_t), ('--mkd-tau-s', tau_s),
                        ('--mkd-tau-min', tau_min), ('--mkd-tau-max', tau_max)):
        if not (math.isfinite(value) and value > 0):
            raise MKDArgumentError(f'{flag} {value}: a temperature must be a positive finite number')
    if tau_min >= tau_max:
        raise MKDArgumentError(
            f'--mkd-tau-min {tau_min} must be smaller than --mkd-tau-max {tau_max}')
    for flag, value in (('--mkd-tau-t', tau_t), ('--mkd-tau-s', tau_s)):
        if not tau_min <= value <= tau_max:
            raise MKDArgumentError(
                f'{flag} {value} is outside the bounds [--mkd-tau-min {tau_min}, --mkd-tau-max {tau_max}]; '
                f'move the initial value or the bounds')
    if args.mkd_meta_interval < 1:
        raise MKDArgumentError(
            f'--mkd-meta-interval {args.mkd_meta_interval}: the meta step runs every N optimizer '
            f'updates, so N must be >= 1 (e.g. 20)')
    if not (math.isfinite(args.mkd_meta_lr) and args.mkd_meta_lr > 0):
        raise MKDArgumentError(f'--mkd-meta-lr {args.mkd_meta_lr} must be a positive number')
    if args.mkd_warm_start < 0:
        raise MKDArgumentError(f'--mkd-warm-start {args.mkd_warm_start} must be >= 0 (0: no warm start, e.g. 4)')
    if args.mkd_meta_batch_size is None:
        args.mkd_meta_batch_size = get('batch_size')
    if args.mkd_meta_batch_size is not None and args.mkd_meta_batch_size < 1:
        raise MKDArgumentError(f'--mkd-meta-batch-size {args.mkd_meta_batch_size} must be >= 1')

    spec = parse_meta_data(args.mkd_meta_data)
    val_split = get('val_split')
    data_dir = get('data_dir') or get('data')
    if spec.kind == 'split' and val_split:
        from timm_mkd.meta_data import check_not_validation
        try:
            check_not_validation(spec.split, None, val_split, data_dir, dataset=get('dataset'))
        except ValueError as e:
            raise MKDArgumentError(
                f'--mkd-meta-data split:{spec.split} is the validation split (--val-split {val_split}): '
                f'learning the temperatures on it would leak the reported accuracy into training. '
                f'Use a held-out fraction (e.g. --mkd-meta-data 0.05) or another split.') from e
    if spec.kind == 'split' and _is_folder_dataset(get('dataset')) and data_dir and os.path.isdir(data_dir):
        if not _split_folder_exists(data_dir, spec.split):
            raise MKDArgumentError(
                f'--mkd-meta-data split:{spec.split}: there is no folder {os.path.join(data_dir, spec.split)!r}. '
                f'timm would then read the whole --data-dir (training and validation images) as the meta '
                f'set. Create that split folder, or use folder:PATH or a held-out fraction (e.g. 0.05).')
    if spec.kind == 'folder':
        if not os.path.isdir(spec.path):
            raise MKDArgumentError(f'--mkd-meta-data folder:{spec.path}: no such folder')
        if os.path.realpath(spec.path) in _validation_folders(data_dir, val_split):
            raise MKDArgumentError(
                f'--mkd-meta-data folder:{spec.path} is the validation folder (--val-split {val_split}): '
                f'learning the temperatures on it would leak the reported accuracy into training. '
                f'Use a held-out fraction (e.g. --mkd-meta-data 0.05) or another folder.')
    return MKDOptions(
        mkd=True, teacher=teacher, teacher_checkpoint=checkpoint,
        tau_t=tau_t, tau_s=tau_s, tau_min=tau_min, tau_max=tau_max,
        meta_interval=args.mkd_meta_interval, meta_lr=args.mkd_meta_lr,
        tie_temperatures=args.mkd_temperatures == 'tied', hypergrad_mode=args.mkd_hypergrad,
        meta_loss=args.mkd_meta_loss, estimator=args.mkd_estimator, meta_data=spec,
        warm_start_batches=args.mkd_warm_start,
        meta_batch_size=args.mkd_meta_batch_size)
