"""Probing train.py before it runs: the facts read from it with ``ast``, and the structural checks.

``read_facts`` parses a train.py (nothing is executed) into ``TrainPyFacts``; ``common_problems``
lists what a file lacks of the structure every supported generation shares (the names the patches
replace, their imports, call keywords and call order); each adapter (``gen_*.py``) adds its own.
"""
import ast
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

from .common import UnsupportedTrainPy

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
