"""MKDConfig: every MKD option, its default and its validation, in one frozen record.

``MKDTask`` takes one (or builds one from its keyword arguments), ``timm_mkd.cli`` builds one from
the command line and reads its defaults from here, ``Temperatures`` and the meta controller read
their settings from it. Nothing here imports torch, so the command line's ``--help`` stays light.

Errors are ``MKDConfigError`` (a ``ValueError``) and speak in the option names of this record
(``tau_t=30.0 is outside the bounds ...``); the CLI rewrites those names into its flags.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = [
    'ESTIMATORS', 'FD_PRECISIONS', 'KD_SCALES', 'META_OPTIMIZERS', 'META_VIEWS', 'TAU_T_ONLY_ESTIMATORS',
    'MKDConfig', 'MKDConfigError', 'meta_views_for',
]

ESTIMATORS = ('lookahead', 'calibration', 'mixture')
#: Estimators whose hypergradient has no ``tau_s`` component: ``tau_s`` moves only when tied to ``tau_t``.
TAU_T_ONLY_ESTIMATORS = ('calibration', 'mixture')
KD_SCALES = ('student', 'product')
META_OPTIMIZERS = ('adam', 'sgd')
FD_PRECISIONS = ('auto', 'float32', 'autocast')
#: How held-out meta images are seen: 'train' (the training augmentation, without mixup), 'eval' (timm's eval
#: transform), or 'auto' (``meta_views_for``). A property of the meta loader, not of ``MKDConfig``.
META_VIEWS = ('auto', 'train', 'eval')


def meta_views_for(estimator: str, views: str = 'auto') -> str:
    """The meta views a run uses: ``views`` unless it is ``'auto'``.

    ``'auto'`` gives ``'train'`` for the ``'mixture'`` and ``'calibration'`` estimators and ``'eval'`` for
    ``'lookahead'``. The KD target is computed on augmented training views, where a teacher is less certain than
    on clean images (calibrated temperature 0.9-1.0 on clean held-out images, 1.5 under RandAugment, 2.1-2.7 under
    a DeiT-style recipe or with an overconfident teacher, 3.4 with both:
    ``benchmarks/results/robustness_matrix.csv``), so those estimators fit the temperature on those views. The
    look-ahead estimator measures the student on clean data.

    Raises:
        MKDConfigError: for a value not in ``META_VIEWS``.
    """
    if views not in META_VIEWS:
        raise MKDConfigError(f"meta views '{views}' are unknown; use one of {META_VIEWS}.")
    if views != 'auto':
        return views
    return 'train' if estimator in ('calibration', 'mixture') else 'eval'


class MKDConfigError(ValueError):
    """An unusable MKD option; the message names the option(s) as ``name=value``."""


@dataclass(frozen=True)
class MKDConfig:
    """The MKD hyper-parameters of one run (what ``MKDTask`` documents as its keyword arguments).

    Args:
        tau_t: initial teacher temperature.
        tau_s: initial student temperature; None (the default): ``tau_t``'s when ``tau_s`` is learned, so a run
            starts as timm's KD at ``tau_t`` and the tied meta step keeps the two equal, and 1 when it is fixed.
        tau_min: lower bound of both temperatures (> 0). 1 by default: no temperature sharpens its logits. The
            teacher's held-out calibrated temperature can lie below 1 (0.87-0.96 measured: clean held-out images are
            easier than the augmented training views the KD target is computed on, where the same teachers calibrate
            at 1.5-2.0, 2.7-3.0 with mixup), and a teacher sharpened to it was 0.11-0.42 points under KD at 1 on
            average in each of the three comparisons recorded in ``benchmarks/results``.
        tau_max: upper bound of both temperatures (> tau_min).
        learn_tau_t: let the meta step move ``tau_t``.
        learn_tau_s: let the meta step move ``tau_s``. On by default, tied to ``tau_t``: the student softens its
            logits by the same temperature as the teacher, so every point the meta step visits is timm's KD at one
            temperature (a student at 1 under a softer teacher lost 0.80-1.04 points to KD at 1 in the heavy CNN
            cell of ``benchmarks/results``'s robustness matrix). Untied (or with ``tau_t`` fixed) only the
            ``'lookahead'`` estimator moves it: the others give ``tau_s`` no gradient, so ``learn_tau_s=False``
            keeps it at its initial value.
        tie_temperatures: move both log-temperatures by the same amount (ignored when one is fixed).
        meta_interval: optimizer updates between meta steps (>= 1).
        meta_lr: learning rate of the meta optimizer on the log-temperatures. 0.005 by default: an Adam step moves a
            temperature by at most about 0.5% per meta step, so the temperature follows the objective's trend over
            tens of meta batches rather than one batch (chosen on validation, ``benchmarks/results/README.md``).
        meta_optimizer: ``'adam'`` or ``'sgd'``.
        fd_eps: finite-difference step, relative to the norm of the look-ahead direction.
        fd_precision: ``'lookahead'`` only: precision of the two finite-difference forwards. ``'auto'``: the training
            autocast when it is float16 (within 1% of the float32 oracle), float32 otherwise (bfloat16 is off by up
            to 12%); ``'float32'``: always float32; ``'autocast'``: always the training autocast.
        kd_scale: ``'student'`` (``tau_s^2``) or ``'product'`` (``tau_t * tau_s``).
        estimator: ``'mixture'`` (default: the held-out NLL of the student's effective target, ``timm_mkd.meta.mixture``),
            ``'calibration'`` (the teacher's held-out NLL alone) or ``'lookahead'`` (the student's calibrated
            cross-entropy on the meta batch after a one-step look-ahead, ``timm_mkd.meta.meta_step``).
        warm_start_batches: ``'mixture'`` and ``'calibration'`` only: meta batches the warm start solves on (0: off). With held-out
            meta data it runs before the first update, so no update trains at the initial ``tau_t``.

    Raises:
        MKDConfigError: at construction, for the first unusable value.
    """
    tau_t: float = 1.0
    tau_s: Optional[float] = None
    tau_min: float = 1.0
    tau_max: float = 20.0
    learn_tau_t: bool = True
    learn_tau_s: bool = True
    tie_temperatures: bool = True
    meta_interval: int = 10
    meta_lr: float = 0.005
    meta_optimizer: str = 'adam'
    fd_eps: float = 1e-2
    fd_precision: str = 'auto'
    kd_scale: str = 'student'
    estimator: str = 'mixture'
    warm_start_batches: int = 4

    def __post_init__(self):
        if self.tau_s is None:
            object.__setattr__(self, 'tau_s', self.tau_t if self.learn_tau_s else 1.0)
        _check_count('meta_interval', self.meta_interval, 1, 'the number of optimizer updates between meta steps, '
                                                             'so it must be >= 1, e.g. 20')
        _check_positive('meta_lr', self.meta_lr)
        _check_positive('fd_eps', self.fd_eps)
        self._check_temperatures()
        for name, choices in (('kd_scale', KD_SCALES), ('estimator', ESTIMATORS), ('fd_precision', FD_PRECISIONS)):
            if getattr(self, name) not in choices:
                raise MKDConfigError(f"{name}='{getattr(self, name)}' is unknown; use one of {choices}.")
        _check_count('warm_start_batches', self.warm_start_batches, 0, '0: no warm start, e.g. 4')
        if str(self.meta_optimizer).lower() not in META_OPTIMIZERS:
            raise MKDConfigError(f"unknown meta optimizer meta_optimizer='{self.meta_optimizer}'; use 'adam' or 'sgd'.")
        for name, kind in (('meta_interval', int), ('warm_start_batches', int), ('fd_eps', float), ('tau_min', float),
                           ('tau_max', float), ('tie_temperatures', bool), ('learn_tau_t', bool), ('learn_tau_s', bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        self._check_tau_s_moves()

    def _check_tau_s_moves(self) -> None:
        """A learnable ``tau_s`` that the estimator would never move (no ``tau_s`` gradient, not tied) is refused."""
        if not self.learn_tau_s or self.tied or self.estimator not in TAU_T_ONLY_ESTIMATORS:
            return
        why = 'tie_temperatures=False' if self.learn_tau_t else 'learn_tau_t=False'
        fix = ('tie the temperatures (tie_temperatures=True) or keep tau_s fixed (learn_tau_s=False)' if self.learn_tau_t
               else 'keep tau_s fixed (learn_tau_s=False)')
        raise MKDConfigError(f"learn_tau_s=True with {why} would never move tau_s: the '{self.estimator}' estimator "
                             f"gives tau_s no gradient; {fix}.")

    def _check_temperatures(self) -> None:
        values = (('tau_t', self.tau_t), ('tau_s', self.tau_s), ('tau_min', self.tau_min), ('tau_max', self.tau_max))
        for name, value in values:
            if not math.isfinite(value):
                raise MKDConfigError(f"{name}={value} is not finite; a temperature must be a finite positive number.")
        if self.tau_min <= 0:
            raise MKDConfigError(f"tau_min={self.tau_min} must be > 0 (temperatures divide logits): a temperature "
                                 f"must be a positive number.")
        if self.tau_min >= self.tau_max:
            raise MKDConfigError(f"tau_min={self.tau_min} must be smaller than tau_max={self.tau_max} (the bounds "
                                 f"need tau_min < tau_max); swap or widen them.")
        for name, value in values[:2]:
            if not self.tau_min <= value <= self.tau_max:
                raise MKDConfigError(
                    f"{name}={value} is outside the bounds [tau_min={self.tau_min}, tau_max={self.tau_max}]; "
                    f"move the initial value or the bounds.")

    @property
    def tied(self) -> bool:
        """Whether the meta step ties the temperatures (needs both learnable)."""
        return self.tie_temperatures and self.learn_tau_t and self.learn_tau_s

    @property
    def learned_description(self) -> str:
        """Which temperatures the meta step moves, in words (for logs)."""
        if self.tied:
            return 'tau_t and tau_s, tied'
        learned = [name for name, on in (('tau_t', self.learn_tau_t), ('tau_s', self.learn_tau_s)) if on]
        return ' and '.join(learned) + (', free' if len(learned) == 2 else '') if learned else 'none'

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """``{option: default}`` for every option."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def replace(self, **changes) -> 'MKDConfig':
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_count(name: str, value, minimum: int, why: str) -> None:
    if int(value) != value or value < minimum:
        raise MKDConfigError(f"{name}={value} must be an integer >= {minimum} ({why}).")


def _check_positive(name: str, value) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise MKDConfigError(f"{name}={value} must be a finite positive number.")
