"""What every train.py generation shares: reading the file, probing its structure, and the patches.

Why patch at all: timm's train.py picks its training task in a hard-coded if/elif inside
``main()`` and offers no registry or hook. So ``train_mkd.py`` loads train.py as a module
(without running ``main()``), replaces a handful of *module globals* of that one module, and
then calls ``main()``. timm's own modules are never modified: the replacements live only in the
loaded train.py's namespace, and ``utils`` there becomes a proxy that forwards to ``timm.utils``.

The globals we replace, and why (each one is a call train.py makes by its global name, so a
replacement sees exactly the arguments train.py passes):

``_parse_args``
    wrapped to validate the MKD flags (``parser.error`` on contradictions) and to keep ``args``,
    which is local to ``main()``.
``create_dataset``
    wrapped to see the training-split call: with a held-out meta fraction it returns the
    training subset and keeps the meta subset; with ``split:``/``folder:`` it builds the meta set.
``LogitDistillationTask`` / ``FeatureDistillationTask`` / ``TokenDistillationTask``
    replaced by factories: with ``--mkd`` the logit one builds ``timm_mkd.MKDTask``; with
    ``--teacher-checkpoint`` the teacher is loaded from the local file for any of them.
``create_optimizer_v2``
    wrapped so that, once the student's optimizer exists, the meta step is attached to it.
``resume_task_checkpoint``
    wrapped to log the temperatures a resumed run continues from.
``train_one_epoch``
    wrapped to close each epoch's MKD bookkeeping on every rank (rank-consistency check, the
    epoch's mean KD loss, a log line).
``utils`` (proxy) ``.CheckpointSaver`` / ``.update_summary``
    to learn the output folder (``temperatures.csv``) and to add ``tau_t``, ``tau_s``,
    ``kd_loss``, ``meta_loss``, ``meta_skipped`` columns to ``summary.csv``.

The generation probes read train.py's structure before it runs; while it runs, ``MKDRun`` also
checks that each replacement took effect (``verify_setup`` at the first ``train_one_epoch``, a
one-shot hook after the first optimizer step, ``verify_before_save`` before the first checkpoint)
and stops the run with ``MKDSetupError`` naming the hook that did not, so a train.py that merely
looks right never trains or saves without MKD.

One fix outside train.py, applied whatever the flags: when the installed Pillow refuses to
posterize to 0 bits (Pillow >= 13), timm's posterize augmentation ops get the old result for 0 bits
(``timm_mkd.augment_compat``), so DeiT-style ``rand-m9-mstd0.5-inc1`` recipes do not crash.

Without ``--mkd`` / ``--teacher-checkpoint`` every replacement passes straight through, so the
run is train.py's own (``args.yaml`` included: the MKD keys are left out of it).

The generation adapters (``gen_*.py``) decide which of these apply to their train.py and
verify, before anything runs, that the file still has the structure the patches rely on.
"""
import ast
import hashlib
import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set

_logger = logging.getLogger('train_mkd')

#: Module name under which train.py is loaded (also registered in ``sys.modules`` so pickling
#: and DataLoader workers can find objects defined in it).
TRAIN_MODULE_NAME = 'timm_train'

#: train.py's argument dests that the MKD factories map onto MKDTask. A LogitDistillationTask
#: call passing anything else is a train.py we do not know: refuse it rather than drop the kwarg.
LOGIT_TASK_KWARGS = frozenset({
    'student_model', 'teacher_model', 'criterion', 'loss_type', 'distill_loss_weight',
    'task_loss_weight', 'temperature', 'device', 'dtype', 'verbose',
})

#: Names train.py must import at module level, with the module they must come from.
REQUIRED_IMPORTS = {
    'utils': 'timm',
    'create_dataset': 'timm.data',
    'create_loader': 'timm.data',
    'resolve_data_config': 'timm.data',
    'create_optimizer_v2': 'timm.optim',
    'LogitDistillationTask': 'timm.task',
    'FeatureDistillationTask': 'timm.task',
    'TokenDistillationTask': 'timm.task',
    'resume_task_checkpoint': 'timm.task',
}

#: Module-level definitions train.py must have.
REQUIRED_DEFS = ('_parse_args', 'main', 'train_one_epoch')
REQUIRED_ASSIGNS = ('parser', 'config_parser')

class UnsupportedTrainPy(RuntimeError):
    """train.py is not one the patches know; nothing has been patched or run."""


class MKDSetupError(RuntimeError):
    """A user-facing set-up failure inside train.py's ``main()`` (teacher, meta data, ...).

    ``train_mkd.py`` prints the message alone (no traceback) and exits non-zero.
    """


# ----------------------------------------------------------------------------------------------
# Reading and probing train.py
# ----------------------------------------------------------------------------------------------

@dataclass
class CallFact:
    """One call inside ``main()``: callee as written (``create_loader``, ``utils.CheckpointSaver``)."""
    name: str
    lineno: int
    keywords: Set[str]
    constants: Dict[str, Any]  # keyword -> value, for keywords given as plain constants


@dataclass
class TrainPyFacts:
    """What the probes need to know about a train.py, read with ``ast`` (nothing is executed)."""
    path: str
    sha256: str
    defs: Set[str] = field(default_factory=set)
    assigns: Set[str] = field(default_factory=set)
    imports: Dict[str, str] = field(default_factory=dict)
    main_calls: List[CallFact] = field(default_factory=list)
    parse_args_return_len: Optional[int] = None
    option_strings: Set[str] = field(default_factory=set)

    def calls(self, name: str) -> List[CallFact]:
        return [c for c in self.main_calls if c.name == name]

    def first_line(self, name: str, **constants) -> Optional[int]:
        for c in self.calls(name):
            if all(c.constants.get(k, object()) == v for k, v in constants.items()):
                return c.lineno
        return None


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f'{base}.{node.attr}' if base else None
    return None


def read_facts(path: str) -> TrainPyFacts:
    """Parse ``path`` and collect the structural facts the adapters probe.

    Raises:
        UnsupportedTrainPy: when the file cannot be read or is not valid Python.
    """
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise UnsupportedTrainPy(f'cannot read {path}: {e}') from e
    facts = TrainPyFacts(path=path, sha256=hashlib.sha256(data).hexdigest())
    try:
        tree = ast.parse(data, filename=path)
    except (SyntaxError, ValueError) as e:
        raise UnsupportedTrainPy(f'{path} is not a Python file this interpreter can parse: {e}') from e

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            facts.defs.add(node.name)
            if node.name == 'main':
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Call):
                        name = _dotted(sub.func)
                        if name is None:
                            continue
                        constants = {
                            kw.arg: kw.value.value for kw in sub.keywords
                            if kw.arg and isinstance(kw.value, ast.Constant)}
                        facts.main_calls.append(CallFact(
                            name, sub.lineno, {kw.arg for kw in sub.keywords if kw.arg}, constants))
            elif node.name == '_parse_args':
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Return) and isinstance(sub.value, ast.Tuple):
                        facts.parse_args_return_len = len(sub.value.elts)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        facts.assigns.add(sub.id)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                facts.imports[alias.asname or alias.name] = node.module
        elif isinstance(node, ast.Try):
            # optional imports (wandb, functorch) sit in try blocks: not needed by the probes
            pass
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            if _dotted(call.func) and _dotted(call.func).endswith('add_argument'):
                for arg in call.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith('-'):
                        facts.option_strings.add(arg.value)
    # add_argument calls wrapped in an expression tuple (train.py has a few trailing commas)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (_dotted(node.func) or '').endswith('add_argument'):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith('-'):
                    facts.option_strings.add(arg.value)
    return facts


def common_problems(facts: TrainPyFacts) -> List[str]:
    """Structural probes every supported generation passes; returns what is missing (empty: fine).

    Each probe is a fact a patch relies on. Probes look at names and call keywords, not at line
    numbers or byte offsets, so they hold across releases that move code around.
    """
    problems = []
    for name in REQUIRED_DEFS:
        if name not in facts.defs:
            problems.append(f'no module-level function {name}()')
    for name in REQUIRED_ASSIGNS:
        if name not in facts.assigns:
            problems.append(f'no module-level argparse object `{name}`')
    for name, module in REQUIRED_IMPORTS.items():
        if facts.imports.get(name) != module:
            problems.append(f'`{name}` is not imported from {module}')
    if facts.parse_args_return_len != 2:
        problems.append('_parse_args() does not return (args, args_text)')

    def need(name, what, **constants):
        line = facts.first_line(name, **constants)
        if line is None:
            problems.append(f'main() has no {what}')
        return line

    order = [
        ('_parse_args', need('_parse_args', 'call to _parse_args()')),
        ('create_dataset(is_training=True)', need('create_dataset', 'create_dataset(..., is_training=True) call', is_training=True)),
        ('LogitDistillationTask', need('LogitDistillationTask', 'LogitDistillationTask(...) call')),
        ('create_optimizer_v2', need('create_optimizer_v2', 'create_optimizer_v2(...) call')),
        ('resume_task_checkpoint', need('resume_task_checkpoint', 'resume_task_checkpoint(...) call')),
        ('utils.CheckpointSaver', need('utils.CheckpointSaver', 'utils.CheckpointSaver(...) call')),
        ('train_one_epoch', need('train_one_epoch', 'train_one_epoch(...) call')),
        ('utils.update_summary', need('utils.update_summary', 'utils.update_summary(...) call')),
    ]
    need('create_loader', 'create_loader(...) call')
    for call in facts.calls('LogitDistillationTask'):
        extra = call.keywords - LOGIT_TASK_KWARGS
        if extra:
            problems.append(f'LogitDistillationTask(...) is called with unknown keyword(s) {sorted(extra)}')
        if 'student_model' not in call.keywords or 'teacher_model' not in call.keywords:
            problems.append('LogitDistillationTask(...) is not called with student_model=/teacher_model= keywords')
    saver = facts.calls('utils.CheckpointSaver')
    if saver and 'checkpoint_dir' not in saver[0].keywords:
        problems.append('utils.CheckpointSaver(...) is not given checkpoint_dir=')
    # The patches rely on this order: datasets before the task, the task before the optimizer,
    # the optimizer before resume, resume before the saver, the saver before training.
    known = [(label, line) for label, line in order if line is not None]
    for (a, la), (b, lb) in zip(known, known[1:]):
        if la > lb:
            problems.append(f'main() calls {b} before {a}')
    taken = sorted(s for s in facts.option_strings if s in _mkd_option_strings())
    if taken:
        problems.append(f'train.py already defines {", ".join(taken)} (would clash with the MKD flags)')
    return problems


def _mkd_option_strings() -> Set[str]:
    from timm_mkd.cli import MKD_DESTS
    return {'--' + d.replace('_', '-') for d in MKD_DESTS} | {'--timm-train'}


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


# ----------------------------------------------------------------------------------------------
# The run: state shared by the patches of one train.py main()
# ----------------------------------------------------------------------------------------------

class _UtilsProxy(types.ModuleType):
    """Stands in for ``timm.utils`` inside the loaded train.py only.

    Attribute reads fall through to ``timm.utils``; the overrides set on the proxy win. timm's
    own ``timm.utils`` module is left untouched for every other user in the process.
    """

    def __init__(self, base: types.ModuleType):
        super().__init__(base.__name__, getattr(base, '__doc__', None))
        self.__dict__['_base'] = base

    def __getattr__(self, name: str):
        return getattr(self.__dict__['_base'], name)


def _cpu_ddp_safe(task):
    """Let ``torchrun`` on CPU work: drop train.py's ``device_ids=[cpu]`` before DDP sees it.

    train.py calls ``task.prepare_distributed(device_ids=[device], ...)`` whatever the device;
    ``DistributedDataParallel`` refuses ``device_ids`` for CPU modules ("device_ids ... only work
    with ... GPU modules"), so train.py itself cannot run DDP on CPU (gloo). For timm's own tasks
    built with a local teacher, a CPU device list becomes None, which is what DDP expects there;
    GPU runs are unchanged. (``MKDTask.prepare_distributed`` does the same itself.)
    """
    original = task.prepare_distributed

    def prepare_distributed(device_ids=None, **ddp_kwargs):
        import torch
        if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids = None
        return original(device_ids=device_ids, **ddp_kwargs)
    task.prepare_distributed = prepare_distributed
    return task


def _checkpoint_task_state(task) -> Dict[str, Any]:
    """The ``task_state`` a CheckpointSaver writes for ``task`` (timm >= 1.0.29: ``get_checkpoint_state``)."""
    if hasattr(task, 'get_checkpoint_state'):
        return task.get_checkpoint_state().get('task_state') or {}
    return task.get_task_state() or {}


def _dump_args(args_dict: Dict[str, Any]) -> str:
    import yaml
    return yaml.safe_dump(args_dict, default_flow_style=False)


class MKDRun:
    """The state one patched ``main()`` shares between its patches.

    Args:
        module: the loaded train.py module.
        generation: the adapter's generation label (for log lines).
    """

    def __init__(self, module: types.ModuleType, generation: str):
        self.module = module
        self.generation = generation
        self.args = None
        self.opts = None  # timm_mkd.cli.MKDOptions or None
        self.meta_dataset = None
        self.data_config = None
        self.task = None  # the MKDTask, once built
        self.device = None
        self.img_dtype = None
        self.temp_log = None
        self.epoch = 0
        self.epoch_stats = None
        self._kd_sum = None
        self._kd_count = 0
        self.posterize_fixed = False
        self.originals: Dict[str, Any] = {}
        # run-time hook checks (``verify_setup`` and friends)
        self.plain_task = None  # timm's own task built with the local teacher (plain KD)
        self.saver = None  # the CheckpointSaver built through the utils proxy
        self.summary_epochs: Set[int] = set()  # epochs whose summary row carries the MKD columns
        self._updates_at_setup: Optional[int] = None
        self._saves_checked = False

    # ------------------------------------------------------------------ helpers
    @property
    def mkd(self) -> bool:
        return self.opts is not None and self.opts.mkd

    def _replace(self, name: str, factory: Callable[[Any], Any]) -> None:
        original = getattr(self.module, name)
        self.originals[name] = original
        setattr(self.module, name, factory(original))

    def is_primary(self) -> bool:
        from timm import utils
        return self.args is None or utils.is_primary(self.args)

    # ------------------------------------------------------------------ patches
    @classmethod
    def install(cls, module, generation: str) -> 'MKDRun':
        """Apply every patch to the loaded train.py ``module`` (the same set for each generation)."""
        run = cls(module, generation)
        from timm_mkd.augment_compat import fix_posterize_zero_bits
        run.posterize_fixed = fix_posterize_zero_bits()  # before train.py builds its transforms
        run.add_flags()
        run.patch_parse_args()
        run.patch_create_dataset()
        run.patch_task_classes()
        run.patch_create_optimizer()
        run.patch_resume()
        run.patch_train_one_epoch()
        run.patch_utils()
        return run

    def add_flags(self) -> None:
        """Add the MKD argument group to train.py's ``parser`` (``--help`` and ``-c`` YAML see it)."""
        from timm_mkd.cli import add_mkd_args
        parser = self.module.parser
        add_mkd_args(parser)
        note = (f'train_mkd.py runs this train.py ({getattr(self.module, "__file__", "?")}, timm {self.generation} '
                f'generation); choose another with --timm-train PATH or $TIMM_TRAIN_PY.')
        parser.epilog = f'{parser.epilog}\n\n{note}' if parser.epilog else note

    def patch_parse_args(self) -> None:
        from timm_mkd.cli import MKD_DESTS, MKDArgumentError, mkd_flags_in_use, validate_mkd_args

        def factory(original):
            def _parse_args():
                args, args_text = original()
                if self.posterize_fixed and getattr(args, 'aa', None) and os.environ.get('RANK', '0') == '0':
                    _logger.info(
                        'train_mkd: the installed Pillow refuses to posterize to 0 bits, which timm\'s '
                        'RandAugment asks for at magnitude 10 (PosterizeIncreasing); timm_mkd.augment_compat '
                        'gives the black image older Pillow gave instead')
                try:
                    opts = validate_mkd_args(args)
                except MKDArgumentError as e:
                    self.module.parser.error(str(e))
                self.args, self.opts = args, opts
                if opts is None and not mkd_flags_in_use(args):
                    # A plain train.py run: drop the (default) MKD attributes so that args, the
                    # args.yaml text and the args pickled into checkpoints are train.py's own.
                    for dest in MKD_DESTS:
                        if hasattr(args, dest):
                            delattr(args, dest)
                    args_text = _dump_args(vars(args))
                else:
                    # record the normalised values (kd_model_name from --teacher, meta batch size)
                    args_text = _dump_args(vars(args))
                if opts is not None and opts.mkd:
                    if getattr(args, 'kd_temperature', None) != self.module.parser.get_default('kd_temperature'):
                        _logger.warning(
                            f'--kd-temperature {args.kd_temperature} is ignored with --mkd: the temperatures are '
                            f'learned, starting from --mkd-tau-t {opts.tau_t} and --mkd-tau-s {opts.tau_s}')
                return args, args_text
            return _parse_args
        self._replace('_parse_args', factory)

    def patch_create_dataset(self) -> None:
        def factory(original):
            def create_dataset(*a, **kw):
                if not self.mkd or not kw.get('is_training') or self.meta_dataset is not None:
                    return original(*a, **kw)
                return self._build_train_and_meta(original, a, kw)
            return create_dataset
        self._replace('create_dataset', factory)

    def _build_train_and_meta(self, create_dataset, a, kw):
        """Build the training split and, from the same arguments, the meta set."""
        from timm_mkd.meta_data import split_holdout
        spec = self.opts.meta_data
        train_ds = create_dataset(*a, **kw)
        if spec.kind == 'train':
            return train_ds
        meta_kw = dict(kw, is_training=False)
        for key in ('repeats', 'num_samples'):
            meta_kw.pop(key, None)
        try:
            if spec.kind == 'holdout':
                meta_ds = create_dataset(*a, **meta_kw)
                total = len(train_ds)
                train_ds, meta_ds = split_holdout(train_ds, meta_ds, spec.fraction, seed=self.args.seed)
                if self.is_primary():
                    _logger.info(
                        f'MKD: held out {len(meta_ds)} of {total} training samples as meta data '
                        f'(--mkd-meta-data {spec.fraction:g}); training on the other {len(train_ds)}')
            elif spec.kind == 'split':
                meta_ds = create_dataset(*a, **dict(meta_kw, split=spec.split))
                self._check_same_classes(train_ds, meta_ds, f'split:{spec.split}')
            else:
                meta_kw = dict(meta_kw, root=spec.path, split='', search_split=False)
                name = a[0] if a else meta_kw.pop('name', '')
                if name and not str(name).lower().startswith(('folder', 'imagefolder', 'imagetar')):
                    name = ''  # folder:PATH is an image folder whatever --dataset is
                meta_ds = create_dataset(name, *a[1:], **meta_kw)
                self._check_same_classes(train_ds, meta_ds, f'folder:{spec.path}')
        except (TypeError, ValueError, FileNotFoundError, RuntimeError, AssertionError) as e:
            raise MKDSetupError(f'--mkd-meta-data {self.args.mkd_meta_data}: {e}') from e
        if self.is_primary() and spec.kind != 'holdout':
            _logger.info(f'MKD: meta data from {spec.describe()} ({len(meta_ds)} samples)')
        # Fail now, before the model and teacher are built, rather than at the first meta step.
        world = int(getattr(self.args, 'world_size', 1) or 1) if getattr(self.args, 'distributed', False) else 1
        per_rank = len(meta_ds) // world
        if self.opts.meta_batch_size and self.opts.meta_batch_size > per_rank:
            raise MKDSetupError(
                f'--mkd-meta-batch-size {self.opts.meta_batch_size} is larger than the meta set '
                f'({len(meta_ds)} samples from {spec.describe()}' + (f', {per_rank} per rank' if world > 1 else '')
                + f'). Fix: lower --mkd-meta-batch-size (it defaults to --batch-size) or use more meta data'
                + (' (a larger --mkd-meta-data fraction).' if spec.kind == 'holdout' else '.'))
        self.meta_dataset = meta_ds
        return train_ds

    @staticmethod
    def _check_same_classes(train_ds, meta_ds, what: str) -> None:
        """Refuse a meta set whose folder classes map to other indices than the training set's."""
        def class_to_idx(ds):
            reader = getattr(ds, 'reader', None)
            return getattr(reader, 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
        train_map, meta_map = class_to_idx(train_ds), class_to_idx(meta_ds)
        if train_map and meta_map and train_map != meta_map:
            missing = sorted(set(train_map) - set(meta_map))[:5]
            extra = sorted(set(meta_map) - set(train_map))[:5]
            raise MKDSetupError(
                f'--mkd-meta-data {what}: its classes do not match the training set\'s '
                f'({len(meta_map)} vs {len(train_map)} classes; missing {missing}, extra {extra}). '
                f'The meta labels would index the wrong classes; use a folder with the same class '
                f'sub-folders (or --class-map).')

    def patch_task_classes(self) -> None:
        """Replace the three distillation task names with factories (see the module docstring)."""
        self._replace('LogitDistillationTask', lambda original: partial(self._make_task, original, 'logit'))
        self._replace('FeatureDistillationTask', lambda original: partial(self._make_task, original, 'feature'))
        self._replace('TokenDistillationTask', lambda original: partial(self._make_task, original, 'token'))

    def _make_task(self, original, kind: str, *a, **kw):
        if self.opts is None:
            return original(*a, **kw)
        if a:
            raise MKDSetupError(
                f'train.py passed positional arguments to the {kind} distillation task; this train.py '
                f'is not one the patches know')
        student = kw['student_model']
        data_config = self._resolve_data_config(student)
        mean, std = data_config.get('mean'), data_config.get('std')
        device, dtype = kw.get('device'), kw.get('dtype')
        self.device = device
        self.img_dtype = dtype
        teacher_name = kw['teacher_model']
        source = f"teacher {teacher_name!r}" + (
            f' from {self.opts.teacher_checkpoint!r}' if self.opts.teacher_checkpoint else ' with hub weights')
        what = 'MKD' if kind == 'logit' and self.opts.mkd else f'{kind} distillation'
        try:
            if kind == 'logit' and self.opts.mkd:
                from timm_mkd import MKDTask
                task = MKDTask(
                    student_model=student,
                    teacher_model=teacher_name,
                    criterion=kw.get('criterion'),
                    teacher_pretrained_path=self.opts.teacher_checkpoint,
                    distill_loss_weight=kw.get('distill_loss_weight'),
                    task_loss_weight=kw.get('task_loss_weight'),
                    device=device,
                    dtype=dtype,
                    verbose=kw.get('verbose', True),
                    student_mean=mean,
                    student_std=std,
                    meta_autocast=self._meta_autocast(device),
                    **self.opts.task_kwargs(),
                )
                self._track_kd_loss(task)
                self.task = task
                return task  # MKDTask.prepare_distributed drops CPU device_ids itself
            teacher = teacher_name
            if self.opts.teacher_checkpoint:
                from timm_mkd import build_teacher
                teacher = build_teacher(
                    teacher_name, student, checkpoint_path=self.opts.teacher_checkpoint,
                    device=device, dtype=dtype, student_mean=mean, student_std=std)
            task = original(**dict(kw, teacher_model=teacher))
            from timm_mkd.teacher import match_student_normalization
            match_student_normalization(task, student, mean, std)  # the loader's --mean/--std, --in-chans
            self.plain_task = task
            return _cpu_ddp_safe(task)
        except (ValueError, FileNotFoundError, OSError, RuntimeError, TypeError, KeyError) as e:
            raise MKDSetupError(f'cannot set up {what} with the {source}: {e}') from e

    def _resolve_data_config(self, model) -> Dict[str, Any]:
        """train.py's own data config (same call, same args), for normalisation and meta transforms."""
        if self.data_config is None:
            self.data_config = self.module.resolve_data_config(vars(self.args), model=model, verbose=False)
        return self.data_config

    def _meta_autocast(self, device):
        """The autocast train.py uses for the training step (``--amp``), for the meta-batch forward."""
        if not getattr(self.args, 'amp', False) or device is None:
            return None
        import torch
        amp_dtype = torch.bfloat16 if self.args.amp_dtype == 'bfloat16' else torch.float16
        return partial(torch.autocast, device_type=device.type, dtype=amp_dtype)

    def _track_kd_loss(self, task) -> None:
        """Sum the KD loss of training forwards for the epoch mean (no host sync per step)."""
        import torch

        def hook(module, inputs, output):
            if torch.is_grad_enabled() and isinstance(output, dict) and 'kd_loss' in output:
                value = output['kd_loss'].detach().float()
                self._kd_sum = value if self._kd_sum is None else self._kd_sum + value
                self._kd_count += 1
        task.register_forward_hook(hook)

    def patch_create_optimizer(self) -> None:
        def factory(original):
            def create_optimizer_v2(*a, **kw):
                optimizer = original(*a, **kw)
                if self.task is not None:
                    self._attach(optimizer)
                return optimizer
            return create_optimizer_v2
        self._replace('create_optimizer_v2', factory)

    def _attach(self, optimizer) -> None:
        """Build the meta batches and hook the meta step onto the student's optimizer."""
        from timm_mkd import TRAIN_STREAM
        from timm_mkd.meta_data import build_meta_loader
        import torch
        args, opts = self.args, self.opts
        if self.meta_dataset is None:
            if opts.meta_data.kind != 'train':
                raise MKDSetupError(
                    f'--mkd-meta-data {args.mkd_meta_data}: train.py never built its training split '
                    f'through create_dataset(is_training=True); cannot build the meta data')
            meta = TRAIN_STREAM
        else:
            dc = self.data_config
            try:
                meta = build_meta_loader(
                    self.meta_dataset,
                    input_size=dc['input_size'],
                    batch_size=opts.meta_batch_size,
                    mean=dc['mean'],
                    std=dc['std'],
                    interpolation=dc.get('interpolation', 'bilinear'),
                    crop_pct=dc.get('crop_pct'),
                    crop_mode=dc.get('crop_mode'),
                    num_workers=min(2, max(0, int(args.workers))),
                    distributed=bool(getattr(args, 'distributed', False)),
                    world_size=int(getattr(args, 'world_size', 1)),
                    rank=int(getattr(args, 'rank', 0)),
                    seed=int(args.seed),
                    device=self.device,
                    use_prefetcher=bool(getattr(args, 'prefetcher', False)),
                    img_dtype=self.img_dtype or torch.float32,
                    pin_memory=bool(getattr(args, 'pin_mem', False)),
                )
            except (ValueError, TypeError) as e:
                raise MKDSetupError(f'--mkd-meta-data {args.mkd_meta_data}: {e}') from e
        self.task.attach(optimizer, meta)
        self.task.add_meta_callback(self._on_meta_step)
        if self.is_primary():
            tau_t, tau_s = self.task.temperatures()
            _logger.info(
                f'MKD ({self.generation} train.py): meta step every {opts.meta_interval} updates on '
                f'{opts.meta_data.describe()}, meta batch {opts.meta_batch_size}; '
                f'tau_t={tau_t:.4g} tau_s={tau_s:.4g} in [{opts.tau_min:g}, {opts.tau_max:g}]')

    def _on_meta_step(self, record: Dict[str, Any]) -> None:
        if self.temp_log is not None:
            from timm_mkd.meta_log import COLUMNS
            row = {k: v for k, v in record.items() if k in COLUMNS}
            row['epoch'] = self.epoch
            self.temp_log.record(row)

    def patch_resume(self) -> None:
        def factory(original):
            def resume_task_checkpoint(task, *a, **kw):
                try:
                    result = original(task, *a, **kw)
                except RuntimeError as e:
                    if self.task is None or task is not self.task:
                        raise
                    path = a[0] if a else kw.get('checkpoint_path')
                    raise MKDSetupError(f'--resume {path}: {e}') from e
                if task is self.task and self.task is not None and self.is_primary():
                    tau_t, tau_s = self.task.temperatures()
                    _logger.info(
                        f'MKD: resumed temperatures tau_t={tau_t:.6g} tau_s={tau_s:.6g} '
                        f'(after {self.task.meta_steps} meta steps, {self.task.updates} updates)')
                return result
            return resume_task_checkpoint
        self._replace('resume_task_checkpoint', factory)

    def patch_train_one_epoch(self) -> None:
        def factory(original):
            def train_one_epoch(epoch, *a, **kw):
                self.epoch = epoch
                self.verify_setup(a, kw)
                metrics = original(epoch, *a, **kw)
                if self.task is not None:
                    self._end_epoch(epoch)
                return metrics
            return train_one_epoch
        self._replace('train_one_epoch', factory)

    def _end_epoch(self, epoch: int) -> None:
        """Runs on every rank: consistency check, epoch means, one log line on the primary."""
        args = self.args
        if getattr(args, 'distributed', False):
            self.task.check_synchronized()
        kd = float('nan')
        if self._kd_sum is not None and self._kd_count:
            mean = (self._kd_sum / self._kd_count).reshape(1)
            if getattr(args, 'distributed', False):
                from timm import utils
                mean = utils.reduce_tensor(mean, args.world_size)
            kd = float(mean.item())
        self._kd_sum, self._kd_count = None, 0
        summary = self.task.meta_summary()
        self.epoch_stats = {
            'tau_t': summary['tau_t'],
            'tau_s': summary['tau_s'],
            'kd_loss': kd,
            'meta_loss': summary['meta_loss'],
            'meta_skipped': summary.get('meta_skipped', 0),
        }
        if self.is_primary():
            _logger.info(
                f'MKD epoch {epoch}: tau_t={summary["tau_t"]:.4f} tau_s={summary["tau_s"]:.4f} '
                f'kd_loss={kd:.4f} meta_loss={summary["meta_loss"]:.4f} '
                f'meta_steps={summary.get("meta_steps")} skipped={summary.get("meta_skipped")}')

    # ------------------------------------------------------------------ run-time hook checks
    def _hook_failed(self, hook: str, detail: str) -> None:
        """Stop the run: a patch did not take effect in this train.py (before any checkpoint is written).

        Raises:
            MKDSetupError: naming the hook, what went wrong, and the fix.
        """
        from . import SUPPORTED_RELEASES_TEXT, how_to_get_train_py  # the package's, loaded by now (no import cycle)
        path = getattr(self.module, '__file__', 'train.py')
        raise MKDSetupError(
            f'the {hook} hook of train_mkd.py did not take effect in {path}: {detail}. This train.py differs '
            f'from the {self.generation} train.py in a way its structure checks cannot see; the run was stopped '
            f'before writing a checkpoint. Fix: use the unmodified train.py of a supported release '
            f'({SUPPORTED_RELEASES_TEXT}), e.g. the one matching the installed timm:\n' + how_to_get_train_py())

    def verify_setup(self, a: tuple, kw: Dict[str, Any]) -> None:
        """At the first ``train_one_epoch`` call: the task, the meta step and the checkpoint hooks are in place.

        Args:
            a: positional arguments of train.py's ``train_one_epoch`` after ``epoch``
                (``model, loader, optimizer, args``).
            kw: its keyword arguments (``task=``, ``saver=`` where train.py passes them).
        """
        if self.opts is None or self._updates_at_setup is not None:
            return
        built = self.task if self.mkd else self.plain_task
        kind = getattr(self.args, 'kd_distill_type', 'logit')
        what = 'MKD task (MKDTask)' if self.mkd else f'{kind} distillation task with the local teacher'
        if built is None:
            self._hook_failed('task', f'the {what} was never built; train.py created its task without calling '
                                      f'the LogitDistillationTask / FeatureDistillationTask / TokenDistillationTask '
                                      f'names of its module')
        if kw.get('task') is not None and kw['task'] is not built:
            self._hook_failed('task', f'train.py trains {type(kw["task"]).__name__}, not the {what} built for it')
        self._updates_at_setup = 0
        if not self.mkd:
            return
        task = self.task
        if task._optimizer is None or not task._hooks:
            self._hook_failed('meta step', 'the meta step is not attached to the student\'s optimizer (train.py did '
                                           'not create it through create_optimizer_v2 after building the task)')
        optimizer = kw.get('optimizer', a[2] if len(a) > 2 else None)
        if optimizer is not None and optimizer is not task._optimizer:
            self._hook_failed('meta step', 'train.py steps another optimizer than the one the meta step is attached to')
        if self.is_primary():
            if self.saver is None:
                self._hook_failed('checkpoint', 'train.py did not build its CheckpointSaver through utils.CheckpointSaver, '
                                                'so checkpoints would not carry the temperatures')
            if getattr(self.saver, 'task', task) is not task or kw.get('saver', self.saver) is not self.saver:
                self._hook_failed('checkpoint', 'the CheckpointSaver train.py uses does not hold the MKD task, so its '
                                                'checkpoints would not carry the temperatures (task_state)')
            if 'mkd' not in _checkpoint_task_state(task):
                self._hook_failed('checkpoint', 'the MKD task\'s checkpoint state has no \'mkd\' entry')
        self._updates_at_setup = task.updates
        holder = []

        def after_first_step(optimizer, args, kwargs):
            holder.pop().remove()
            self.verify_first_step()
        holder.append(task._optimizer.register_step_post_hook(after_first_step))

    def verify_first_step(self) -> None:
        """After the first optimizer step: the meta-step hooks counted it, after a training forward of the task."""
        task = self.task
        if task.updates != self._updates_at_setup + 1:
            self._hook_failed('meta step', 'the first optimizer step did not reach the meta-step hooks')
        if task._last_batch is None:
            self._hook_failed('meta step', 'the student\'s optimizer stepped without a training forward through the '
                                           'MKD task (train.py must call the task, in train mode, with gradients)')

    def watch_saver(self, saver) -> None:
        """Check the hooks before ``saver`` writes its first checkpoint (recovery or epoch)."""
        self.saver = saver
        for name in ('save_checkpoint', 'save_recovery'):
            method = getattr(saver, name, None)
            if callable(method):
                setattr(saver, name, self._checked_save(name, method))

    def _checked_save(self, name: str, method: Callable) -> Callable:
        def save(*a, **kw):
            if not self._saves_checked and self.mkd and self._updates_at_setup is not None:
                self._saves_checked = True
                self.verify_before_save(name, a[0] if a else kw.get('epoch'))
            return method(*a, **kw)
        return save

    def verify_before_save(self, name: str, epoch: Optional[int]) -> None:
        """Before the first checkpoint: the meta step saw updates and (for an epoch checkpoint) the summary columns."""
        if self.task.updates == self._updates_at_setup:
            self._hook_failed('meta step', 'no optimizer update reached the meta step before the first checkpoint '
                                           '(the optimizer train.py steps is not the one the meta step is attached to)')
        if name == 'save_checkpoint' and epoch is not None and epoch not in self.summary_epochs:
            self._hook_failed('summary columns', f'summary.csv of epoch {epoch} was not written through '
                                                 f'utils.update_summary, so it lacks tau_t, tau_s, kd_loss and meta_loss')

    def forget_steps_after_resume(self, path: str) -> None:
        """Drop the meta steps an earlier run in this folder logged after the update this run starts from.

        train.py reuses the folder of ``--experiment``, and timm 1.0.31's ``--resume auto`` resumes in
        place: the rows the earlier run wrote after its checkpoint (until it was killed or ended)
        would otherwise be followed by the same steps logged again, and a fresh run (0 updates)
        would continue another run's log.
        """
        dropped = drop_logged_steps_after(path, self.task.updates)
        if dropped:
            _logger.info(f'MKD: dropped {dropped} meta steps after update {self.task.updates} from {path} '
                         f'(logged by an earlier run in this folder)')

    def patch_utils(self) -> None:
        """Install the ``utils`` proxy with the CheckpointSaver and update_summary overrides."""
        base = self.module.utils
        proxy = _UtilsProxy(base)
        run = self

        def CheckpointSaver(*a, **kw):  # noqa: N802 - stands in for the class
            saver = base.CheckpointSaver(*a, **kw)
            if run.opts is not None:
                run.watch_saver(saver)
            if run.task is not None:
                from timm_mkd.meta_log import TemperatureLog
                out = kw.get('checkpoint_dir')
                if out:
                    if run.is_primary():
                        run.forget_steps_after_resume(os.path.join(out, 'temperatures.csv'))
                    run.temp_log = TemperatureLog.in_dir(out, enabled=run.is_primary())
            return saver

        def update_summary(epoch, train_metrics, eval_metrics, filename, lr=None, write_header=None,
                           log_wandb=False):
            if run.epoch_stats is None:
                return base.update_summary(
                    epoch, train_metrics, eval_metrics, filename, lr=lr, write_header=write_header,
                    log_wandb=log_wandb)
            write_summary_row(
                epoch, train_metrics, eval_metrics, filename, lr=lr, write_header=write_header,
                log_wandb=log_wandb, extra=run.epoch_stats)
            run.summary_epochs.add(epoch)

        proxy.CheckpointSaver = CheckpointSaver
        proxy.update_summary = update_summary
        self.originals['utils'] = base
        self.module.utils = proxy


def drop_logged_steps_after(path: str, updates: int) -> int:
    """Remove the rows of ``temperatures.csv`` at ``path`` whose ``step`` is beyond ``updates``.

    A torn last row (a killed writer) goes too. The file is replaced atomically; a missing file
    or one without a ``step`` column is left alone (``TemperatureLog`` refuses a foreign header).

    Args:
        path: the ``temperatures.csv`` of the output folder.
        updates: optimizer updates the run starts from (0 for a fresh run).

    Returns:
        The number of rows removed.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, newline='') as f:
        lines = f.read().splitlines(keepends=True)
    columns = lines[0].strip().split(',') if lines else []
    if 'step' not in columns:
        return 0
    at = columns.index('step')
    keep = [lines[0]]
    for line in lines[1:]:
        fields = line.rstrip('\r\n').split(',')
        if line.endswith('\n') and len(fields) == len(columns) and fields[at].isdigit() and int(fields[at]) <= updates:
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)


def write_summary_row(epoch, train_metrics, eval_metrics, filename, lr=None, write_header=None,
                      log_wandb=False, extra: Optional[Dict[str, Any]] = None) -> None:
    """Append one epoch to ``summary.csv`` in timm's layout plus MKD columns at the end.

    timm's ``update_summary`` prefixes every training metric with ``train_``; the MKD values are
    the state of the run rather than training metrics, so they get their own unprefixed columns
    (``tau_t``, ``tau_s``, ``kd_loss``, ``meta_loss``, ``meta_skipped``) after timm's. The same row
    goes to wandb when train.py logs there.
    """
    import csv
    from collections import OrderedDict
    row = OrderedDict(epoch=epoch)
    row.update(('train_' + k, v) for k, v in train_metrics.items())
    if eval_metrics:
        row.update(('eval_' + k, v) for k, v in eval_metrics.items())
    if lr is not None:
        row['lr'] = lr
    for key, value in (extra or {}).items():
        row[key] = value
    if log_wandb:
        import wandb
        wandb.log(row)
    if write_header is None:
        write_header = not os.path.exists(filename) or os.path.getsize(filename) == 0
    with open(filename, mode='a') as f:
        writer = csv.DictWriter(f, fieldnames=list(row.keys()))
        if write_header:
            writer.writeheader()
        writer.writerow(row)

