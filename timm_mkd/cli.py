"""Command-line flags of MKD, for timm's ``train.py`` (through ``train_mkd.py``) or any argparse parser.

``add_mkd_args`` adds the flags, with the defaults of ``timm_mkd.config.MKDConfig``;
``validate_mkd_args`` checks a parsed namespace and returns a small ``MKDOptions`` record holding
the run's ``MKDConfig``, or None when the run uses none of the flags. ``MKDConfig``'s errors name
its options (``tau_t=30.0 ...``); they are re-worded here into the flags (``--mkd-tau-t 30.0 ...``).

What train.py itself means by its flags (``--kd-model-name``, ``--val-split``, ``--batch-size``, ...)
is not known here: the train.py adapters (``patches/``) check those and call ``validate_mkd_args``.

Why ``validate_mkd_args`` raises ``MKDArgumentError`` (a ``ValueError``) instead of calling
``parser.error``: it is also used on plain namespaces (tests, scripts); the train.py patch turns
the error into ``parser.error`` so the user sees argparse's usual ``error:`` line and exit code 2.

Nothing here imports torch or timm: ``--help`` stays light.
"""
import argparse
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from .config import (
    ESTIMATORS, FD_PRECISIONS, META_VIEWS, TAU_T_ONLY_ESTIMATORS, MKDConfig, MKDConfigError, meta_views_for,
)

__all__ = ['MKD_DESTS', 'MKDArgumentError', 'MetaDataSpec', 'MKDOptions', 'add_mkd_args', 'parse_meta_data',
           'validate_mkd_args', 'mkd_flags_in_use', 'flag_of']

#: Default of ``--mkd-meta-data``: hold out 5% of the training split (a run option, not an MKDConfig one).
DEFAULT_META_DATA = '0.05'
_DEFAULTS = MKDConfig.defaults()
#: ``--mkd-temperatures`` -> (``tie_temperatures``, ``learn_tau_s``); ``teacher`` keeps the core's tying default
#: (tying needs both temperatures learnable, so it has no effect there).
TEMPERATURE_MODES = {'tied': (True, True), 'free': (False, True), 'teacher': (_DEFAULTS['tie_temperatures'], False)}


def temperature_mode(tie_temperatures: bool, learn_tau_s: bool) -> str:
    """The ``--mkd-temperatures`` value of these two ``MKDConfig`` fields."""
    return 'teacher' if not learn_tau_s else ('tied' if tie_temperatures else 'free')


#: ``--mkd-*`` dest -> the MKDConfig field it sets.
CONFIG_FIELDS = {
    'mkd_tau_t': 'tau_t', 'mkd_tau_s': 'tau_s', 'mkd_tau_min': 'tau_min', 'mkd_tau_max': 'tau_max',
    'mkd_meta_interval': 'meta_interval', 'mkd_meta_lr': 'meta_lr', 'mkd_temperatures': 'tie_temperatures',
    'mkd_estimator': 'estimator', 'mkd_warm_start': 'warm_start_batches', 'mkd_fd_precision': 'fd_precision',
}

#: argparse ``dest`` of every flag ``add_mkd_args`` adds, with its default.
MKD_DESTS: Dict[str, Any] = {
    'mkd': False, 'teacher': None, 'teacher_checkpoint': None,
    **{dest: _DEFAULTS[name] for dest, name in CONFIG_FIELDS.items()},
    'mkd_temperatures': temperature_mode(_DEFAULTS['tie_temperatures'], _DEFAULTS['learn_tau_s']),
    'mkd_meta_data': DEFAULT_META_DATA, 'mkd_meta_batch_size': None, 'mkd_meta_views': 'auto',
}

# Flags that only mean something together with --mkd.
_MKD_ONLY = [d for d in MKD_DESTS if d.startswith('mkd_')]

#: dest -> (argparse keywords, help without the default).
_FLAGS = {
    'mkd': (dict(action='store_true'), 'Enable MKD: logit distillation whose teacher and student temperatures are '
                                       'learned meta-parameters (needs --teacher or --kd-model-name).'),
    'teacher': (dict(type=str, metavar='NAME'),
                'timm architecture of the teacher; same as --kd-model-name (give one, or both equal).'),
    'teacher_checkpoint': (dict(type=str, metavar='FILE'),
                           'Local teacher weights (.safetensors, .pth, .pth.tar as train.py writes them) instead of '
                           'the hub weights. Also works for plain KD without --mkd.'),
    'mkd_tau_t': (dict(type=float, metavar='TAU'), 'Initial teacher temperature'),
    'mkd_tau_s': (dict(type=float, metavar='TAU'), 'Initial student temperature'),
    'mkd_tau_min': (dict(type=float, metavar='TAU'), 'Lower bound of both temperatures'),
    'mkd_tau_max': (dict(type=float, metavar='TAU'), 'Upper bound of both temperatures'),
    'mkd_meta_interval': (dict(type=int, metavar='N'), 'Take a meta step every N optimizer updates'),
    'mkd_meta_lr': (dict(type=float, metavar='LR'),
                    'Learning rate of the Adam meta optimizer on the log-temperatures'),
    'mkd_temperatures': (dict(choices=tuple(TEMPERATURE_MODES)),
                         'tied: one meta step moves both log-temperatures together, so tau_t / tau_s keeps its '
                         'initial value (from equal values: timm\'s KD at the learned temperature); teacher: only '
                         'tau_t is learned, the student temperature stays at --mkd-tau-s; free: each moves on its '
                         'own, lookahead estimator only (the others give tau_s no gradient; the one-step '
                         'meta-gradient drives tau_s above tau_t, which costs accuracy in benchmarks/results)'),
    'mkd_estimator': (dict(choices=ESTIMATORS),
                      'How the meta step estimates the temperature gradient. mixture: the held-out NLL of what the '
                      'student trains toward, the mix of its own prediction and the teacher at tau_t weighted as the '
                      'task and KD losses (one teacher and one student forward per meta step); calibration: the '
                      'teacher\'s held-out NLL alone; lookahead: the student\'s held-out cross-entropy at its best logit '
                      'scale after a one-step look-ahead (drifts upward: it sees only the next step)'),
    'mkd_warm_start': (dict(type=int, metavar='BATCHES'),
                       'mixture / calibration estimators: before the first update the temperature is set to the exact '
                       'minimiser of the meta objective on this many meta batches, so the start value does not matter; '
                       '0: walk from --mkd-tau-t'),
    'mkd_fd_precision': (dict(choices=FD_PRECISIONS),
                         'lookahead estimator: precision of the two finite-difference forwards. auto: the '
                         'training autocast when it is float16 (--amp), float32 under bfloat16 or without --amp; '
                         'float32; autocast'),
    'mkd_meta_data': (dict(type=str, metavar='SOURCE'),
                      'Where meta batches come from: a fraction such as 0.05 (hold out that share of the training '
                      'split; those samples leave training), split:NAME (another split of --dataset), folder:PATH (an '
                      'image folder with the same classes), or train (the current training batch; biased, needs no '
                      'data)'),
    'mkd_meta_batch_size': (dict(type=int, metavar='N'), 'Meta batch size per process'),
    'mkd_meta_views': (dict(choices=META_VIEWS),
                       'How the held-out meta images are seen. train: with the training augmentation (--aa, --scale, '
                       '--hflip, ...; no mixup, cutmix or random erasing), the views the KD target is computed on; '
                       'eval: timm\'s eval transform; auto: train for the mixture and calibration estimators, eval '
                       'for lookahead'),
}
_HELP_DEFAULT = {'mkd': None, 'teacher': None, 'teacher_checkpoint': None, 'mkd_meta_batch_size': '--batch-size',
                 'mkd_tau_s': '--mkd-tau-t'}


class MKDArgumentError(ValueError):
    """A contradiction or bad value among the MKD flags; the message names the flag and the fix."""


def flag_of(dest: str) -> str:
    """The command-line spelling of an argparse dest (``mkd_tau_t`` -> ``--mkd-tau-t``)."""
    return '--' + dest.replace('_', '-')


_FLAG_OF_FIELD = {name: flag_of(dest) for dest, name in CONFIG_FIELDS.items()}
_FIELD_RE = re.compile(r'\b(' + '|'.join(_FLAG_OF_FIELD) + r')\b(=?)')


def config_error_in_flags(message: str) -> str:
    """Re-word an ``MKDConfigError`` message into the flags: ``tau_t=30.0`` -> ``--mkd-tau-t 30.0``."""
    return _FIELD_RE.sub(lambda m: _FLAG_OF_FIELD[m.group(1)] + (' ' if m.group(2) else ''), message)


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
    for dest, (kwargs, text) in _FLAGS.items():
        shown = _HELP_DEFAULT.get(dest, MKD_DESTS[dest])
        group.add_argument(flag_of(dest), default=MKD_DESTS[dest], **kwargs,
                           help=text if shown is None else f'{text} (default: {shown}).')


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
    for kind, form, what in (('split', 'split:NAME', 'a split name'), ('folder', 'folder:PATH', 'a path')):
        if text.startswith(kind + ':'):
            rest = text[len(kind) + 1:].strip()
            if not rest:
                raise MKDArgumentError(f'--mkd-meta-data {value!r}: {form} needs {what}')
            if kind == 'split':
                return MetaDataSpec('split', split=rest)
            return MetaDataSpec('folder', path=os.path.expanduser(rest))
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
    with a locally loaded teacher. The ``MKDConfig`` fields read through (``opts.tau_t``).
    """
    mkd: bool
    teacher: Optional[str]
    teacher_checkpoint: Optional[str]
    config: MKDConfig
    meta_data: Optional[MetaDataSpec]
    meta_batch_size: Optional[int]
    meta_views: Optional[str] = None  # 'train' or 'eval', resolved from --mkd-meta-views

    def __getattr__(self, name: str):
        if name in MKDConfig.field_names():
            return getattr(self.config, name)
        raise AttributeError(name)

    def task_kwargs(self) -> Dict[str, Any]:
        """The ``MKDTask`` keyword arguments the flags set."""
        return {**{name: getattr(self.config, name) for name in CONFIG_FIELDS.values()},
                'learn_tau_s': self.config.learn_tau_s}


def mkd_flags_in_use(args: argparse.Namespace) -> Sequence[str]:
    """Flags (as typed on the command line) whose value differs from the default."""
    return [flag_of(dest) for dest, default in MKD_DESTS.items()
            if hasattr(args, dest) and getattr(args, dest) != default]


def _config_from(args: argparse.Namespace) -> MKDConfig:
    if args.mkd_temperatures == 'free' and args.mkd_estimator in TAU_T_ONLY_ESTIMATORS:
        raise MKDArgumentError(
            f"--mkd-temperatures free would never move tau_s: the '{args.mkd_estimator}' estimator gives tau_s no "
            f"gradient; use --mkd-temperatures tied (both move together) or teacher (tau_s fixed), or "
            f"--mkd-estimator lookahead")
    values = {name: getattr(args, dest) for dest, name in CONFIG_FIELDS.items()}
    values['tie_temperatures'], values['learn_tau_s'] = TEMPERATURE_MODES[args.mkd_temperatures]
    try:
        return MKDConfig(**values)
    except MKDConfigError as e:
        raise MKDArgumentError(config_error_in_flags(str(e))) from e


def validate_mkd_args(args: argparse.Namespace) -> Optional[MKDOptions]:
    """Check the MKD flags of a parsed namespace and summarise them.

    Missing MKD dests are filled with their defaults (a bare namespace works).

    Returns:
        None when neither ``--mkd`` nor ``--teacher-checkpoint`` is in use (``--teacher`` alone is
        plain KD); otherwise an ``MKDOptions``.

    Raises:
        MKDArgumentError: for every contradiction, naming the flags and the fix.
    """
    for dest, default in MKD_DESTS.items():
        if not hasattr(args, dest):
            setattr(args, dest, default)
    mkd, teacher, checkpoint = bool(args.mkd), args.teacher, args.teacher_checkpoint
    if not mkd:
        stray = [flag_of(d) for d in _MKD_ONLY if getattr(args, d) != MKD_DESTS[d]]
        if stray:
            many = len(stray) > 1
            raise MKDArgumentError(
                f'{", ".join(stray)}: MKD setting{"s" if many else ""} given without --mkd, '
                f'where {"they do" if many else "it does"} nothing. Add --mkd (and a teacher) or drop '
                f'{"them" if many else "it"}')
        if checkpoint is None:
            return None
    if teacher is None:
        raise MKDArgumentError(
            f'{"--mkd" if mkd else "--teacher-checkpoint"} needs a teacher: add --teacher NAME (the timm architecture '
            f'of the teacher, e.g. --teacher resnet50; --kd-model-name NAME is the same)')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise MKDArgumentError(
            f'--teacher-checkpoint {checkpoint!r}: no such file. Give the path of the teacher\'s '
            f'weights (.safetensors, .pth or .pth.tar, e.g. OUTPUT/last.pth.tar from train.py).')
    if not mkd:
        return MKDOptions(False, teacher, checkpoint, _config_from(args), None, None)
    config = _config_from(args)
    if args.mkd_meta_batch_size is not None and args.mkd_meta_batch_size < 1:
        raise MKDArgumentError(f'--mkd-meta-batch-size {args.mkd_meta_batch_size} must be >= 1')
    meta_data = parse_meta_data(args.mkd_meta_data)
    if meta_data.kind == 'train' and args.mkd_meta_views != MKD_DESTS['mkd_meta_views']:
        raise MKDArgumentError(
            f'--mkd-meta-views {args.mkd_meta_views} does nothing with --mkd-meta-data train (the meta batches are the '
            f'training batches, augmented and mixed as they are); drop it or hold out meta data (--mkd-meta-data 0.05)')
    return MKDOptions(True, teacher, checkpoint, config, meta_data, args.mkd_meta_batch_size,
                      meta_views_for(config.estimator, args.mkd_meta_views))
