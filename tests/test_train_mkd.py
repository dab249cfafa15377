"""train_mkd.py without timm's real train.py (runs in CI): discovery, generation detection, flags, errors.

timm's train.py is not in the timm wheel, so these tests use small *synthetic* train.py-shaped
scripts written here (``skeleton()``): they have the module-level names, imports, call keywords
and call order the patches probe, but none of train.py's code. The real train.py is exercised by
``test_train_mkd_trainpy.py`` (marked ``trainpy``, needs ``TIMM_TRAIN_PY``).
"""
import csv
import os
import subprocess
import sys
import textwrap

import pytest
import timm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MKD = os.path.join(REPO, 'train_mkd.py')


from timm_mkd import launcher as train_mkd  # noqa: E402  (what train_mkd.py runs)

patches = train_mkd.load_adapters()


def skeleton(
        imports_resume=True,
        logit_kwargs='student_model=model, teacher_model=args.kd_model_name, criterion=None, device=None',
        optimizer_before_task=False,
        extra_flag='',
        generation='1.0.27',
):
    """Source of a train.py-shaped script (not timm's code) that passes or fails chosen probes.

    Its ``main()`` parses the arguments, prints them and the args.yaml text, and returns when no
    ``--data-dir`` is given; the rest of ``main()`` only gives the probes the calls to find.
    """
    resume_import = ', resume_task_checkpoint' if imports_resume else ''
    resume_call = 'resume_task_checkpoint(task, args.resume)' if imports_resume else ''
    task_call = f'task = LogitDistillationTask({logit_kwargs})'
    opt_call = 'optimizer = create_optimizer_v2(model)'
    first, second = (opt_call, task_call) if optimizer_before_task else (task_call, opt_call)
    loader_kwargs = 'input_size_choices=None, ' if generation != '1.0.27' else ''
    helper = '\ndef _set_loader_epoch(loader, epoch):\n    pass\n' if generation != '1.0.27' else ''
    return textwrap.dedent(f'''\
        """A synthetic stand-in with the shape of timm's train.py, written by the tests."""
        import argparse
        import json
        import sys

        import yaml

        from timm import utils
        from timm.data import create_dataset, create_loader, resolve_data_config
        from timm.optim import create_optimizer_v2
        from timm.task import LogitDistillationTask, FeatureDistillationTask, TokenDistillationTask{resume_import}

        config_parser = parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument('-c', '--config', default='', type=str)
        parser = argparse.ArgumentParser(description='synthetic train.py')
        parser.add_argument('--data-dir', default=None)
        parser.add_argument('--dataset', default='')
        parser.add_argument('--val-split', default='validation')
        parser.add_argument('-b', '--batch-size', type=int, default=8)
        parser.add_argument('--kd-model-name', default=None)
        parser.add_argument('--kd-distill-type', default='logit', choices=['logit', 'feature', 'token'])
        {extra_flag}


        def _parse_args():
            args_config, remaining = config_parser.parse_known_args()
            if args_config.config:
                with open(args_config.config) as f:
                    parser.set_defaults(**yaml.safe_load(f))
            args = parser.parse_args(remaining)
            return args, yaml.safe_dump(args.__dict__, default_flow_style=False)
        __HELPER__

        def train_one_epoch(epoch, model, loader, optimizer, args, task=None):
            return {{'loss': 0.0}}


        def main():
            args, args_text = _parse_args()
            print('SKELETON-ARGS ' + json.dumps(vars(args), sort_keys=True))
            print('SKELETON-YAML ' + json.dumps(args_text))
            if not args.data_dir:
                return
            dataset_train = create_dataset(args.dataset, root=args.data_dir, split='train', is_training=True)
            loader = create_loader(dataset_train, input_size=(3, 32, 32), batch_size=args.batch_size, {loader_kwargs})
            model = None
            {first}
            {second}
            {resume_call}
            saver = utils.CheckpointSaver(model=model, optimizer=optimizer, args=args, checkpoint_dir='out', task=task)
            metrics = train_one_epoch(0, model, loader, optimizer, args, task=task)
            utils.update_summary(0, metrics, None, filename='out/summary.csv')


        if __name__ == '__main__':
            main()
        ''').replace('__HELPER__', helper)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def run_train_mkd(argv, cwd, env_extra=None, drop_env=('TIMM_TRAIN_PY',)):
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(env_extra or {})
    env.setdefault('OMP_NUM_THREADS', '1')
    return subprocess.run(
        [sys.executable, TRAIN_MKD] + list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------
# finding train.py
# ------------------------------------------------------------------------------------------------

def test_not_found_gives_the_command_to_get_train_py(tmp_path):
    result = run_train_mkd(['--model', 'resnet18', '--mkd'], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "cannot find timm's train.py" in err
    assert patches.fix_for(timm.__version__) in err
    assert 'https://raw.githubusercontent.com/huggingface/pytorch-image-models/' in err
    assert 'TIMM_TRAIN_PY' in err and '--timm-train' in err and 'Offline' in err
    assert 'Traceback' not in err


def test_timm_train_flag_missing_file_names_it(tmp_path):
    missing = str(tmp_path / 'nope' / 'train.py')
    result = run_train_mkd(['--timm-train', missing], cwd=tmp_path)
    assert result.returncode == 2
    assert missing in result.stderr and 'no such file' in result.stderr


def test_env_missing_file_names_it(tmp_path):
    missing = str(tmp_path / 'gone.py')
    result = run_train_mkd([], cwd=tmp_path, env_extra={'TIMM_TRAIN_PY': missing})
    assert result.returncode == 2
    assert 'TIMM_TRAIN_PY' in result.stderr and missing in result.stderr


def test_foreign_local_train_py_is_not_used(tmp_path):
    write(tmp_path, 'train.py', 'print("somebody else\'s training script")\n')
    result = run_train_mkd([], cwd=tmp_path)
    assert result.returncode == 2
    assert "is not timm's train.py" in result.stderr


def test_discovery_order(tmp_path, monkeypatch):
    local = write(tmp_path / 'cwd', 'train.py', skeleton())
    env_file = write(tmp_path, 'env_train.py', skeleton())
    explicit = write(tmp_path, 'explicit_train.py', skeleton())
    cwd = str(tmp_path / 'cwd')
    find = train_mkd.find_train_py
    assert find(explicit, environ={'TIMM_TRAIN_PY': env_file}, cwd=cwd) == (explicit, '--timm-train')
    assert find(None, environ={'TIMM_TRAIN_PY': env_file}, cwd=cwd) == (env_file, 'TIMM_TRAIN_PY')
    assert find(None, environ={}, cwd=cwd) == (local, './train.py')
    # relative paths resolve against the working directory
    assert find('../explicit_train.py', environ={}, cwd=cwd)[0] == explicit


def test_discovery_uses_editable_timm_checkout(tmp_path, monkeypatch):
    checkout = tmp_path / 'pytorch-image-models'
    write(checkout, 'train.py', skeleton())
    write(checkout, 'timm/__init__.py', '')
    monkeypatch.setattr(timm, '__file__', str(checkout / 'timm' / '__init__.py'))
    empty = tmp_path / 'elsewhere'
    empty.mkdir()
    path, how = train_mkd.find_train_py(None, environ={}, cwd=str(empty))
    assert path == str(checkout / 'train.py') and how == 'the timm source checkout'


@pytest.mark.parametrize('argv, path, rest', [
    (['--timm-train', 'a.py', '--mkd'], 'a.py', ['--mkd']),
    (['--mkd', '--timm-train=b.py', '-b', '8'], 'b.py', ['--mkd', '-b', '8']),
    (['--mkd'], None, ['--mkd']),
    (['--', '--timm-train', 'x'], None, ['--', '--timm-train', 'x']),
])
def test_pop_timm_train(argv, path, rest):
    assert train_mkd.pop_timm_train(argv) == (path, rest)


def test_patches_load_under_a_private_name():
    assert patches.__name__ == 'timm_mkd._patches'
    assert 'patches' not in sys.modules or sys.modules['patches'] is not patches


def test_too_old_timm_is_refused(tmp_path):
    """A timm older than 1.0.27 (faked by a stub package first on the path): clear error, exit 2."""
    write(tmp_path / 'fake', 'timm/__init__.py', "__version__ = '1.0.20'\n")
    result = run_train_mkd(['--help'], cwd=tmp_path, env_extra={'PYTHONPATH': str(tmp_path / 'fake')})
    assert result.returncode == 2, result.stderr
    assert 'timm 1.0.20 is installed' in result.stderr and ">=1.0.27" in result.stderr.replace(' ', '')
    assert 'Traceback' not in result.stderr


# ------------------------------------------------------------------------------------------------
# recognising the generation
# ------------------------------------------------------------------------------------------------

def test_skeleton_of_each_generation_is_recognised(tmp_path):
    sel = patches.select(write(tmp_path, 'a.py', skeleton(generation='1.0.27')))
    assert sel.generation == '1.0.27' and sel.known_as is None and sel.releases == ()
    warning = patches.check_pair(sel, '1.0.27')
    assert 'is not the train.py of a known timm release' in warning and 'timm 1.0.27 is installed' in warning
    sel = patches.select(write(tmp_path, 'b.py', skeleton(generation='1.0.29.dev0')))
    assert sel.generation == '1.0.29.dev0'


@pytest.mark.parametrize('text, words', [
    ('', "does not look like timm's train.py"),
    ('print("hello")\n', "does not look like timm's train.py"),
    ('def main(:\n', 'not a Python file'),
    (skeleton(imports_resume=False), 'before timm 1.0.27'),
    (skeleton(logit_kwargs='student_model=model, teacher_model=args.kd_model_name, temperature_schedule=1'),
     "unknown keyword(s) ['temperature_schedule']"),
    (skeleton(logit_kwargs='model, args.kd_model_name'), 'student_model=/teacher_model= keywords'),
    (skeleton(optimizer_before_task=True), 'calls create_optimizer_v2 before LogitDistillationTask'),
    (skeleton(extra_flag="parser.add_argument('--teacher', default=None)"), 'already defines --teacher'),
])
def test_unsupported_train_py(tmp_path, text, words):
    path = write(tmp_path, 'train.py', text)
    with pytest.raises(patches.UnsupportedTrainPy) as info:
        patches.select(path)
    message = str(info.value)
    assert words in message
    if text.strip() and 'def main(:' not in text:
        assert 'Supported: the train.py of timm 1.0.27' in message


def test_known_release_hashes_are_well_formed():
    seen = set()
    for adapter in patches.ADAPTERS:
        for digest in adapter.SHA256:
            assert len(digest) == 64 and all(c in '0123456789abcdef' for c in digest)
            assert digest not in seen
            seen.add(digest)
        assert adapter.RELEASES and adapter.GENERATION


# ------------------------------------------------------------------------------------------------
# the patched script end to end (parse stage), as a subprocess
# ------------------------------------------------------------------------------------------------

def test_help_lists_the_mkd_group(tmp_path):
    script = write(tmp_path, 'synthetic_train.py', skeleton())
    result = run_train_mkd(['--timm-train', script, '--help'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'MKD (Meta Knowledge Distillation)' in result.stdout
    for flag in ('--mkd', '--teacher', '--teacher-checkpoint', '--mkd-tau-t', '--mkd-tau-s', '--mkd-tau-min',
                 '--mkd-tau-max', '--mkd-meta-interval', '--mkd-meta-lr', '--mkd-meta-data',
                 '--mkd-meta-batch-size'):
        assert flag in result.stdout
    assert '--timm-train' in result.stdout and script in result.stdout.replace('\n', '')
    assert '--mkd-export' in result.stdout
    warnings = [line for line in result.stderr.splitlines() if 'warning:' in line]
    assert len(warnings) == 1, result.stderr  # one warning, naming the file and the installed timm
    assert 'is not the train.py of a known timm release' in warnings[0]
    assert f'timm {timm.__version__} is installed' in warnings[0]


def test_flag_errors_exit_2_with_message(tmp_path):
    script = write(tmp_path, 'synthetic_train.py', skeleton())
    result = run_train_mkd(['--timm-train', script, '--mkd'], cwd=tmp_path)
    assert result.returncode == 2
    assert 'train_mkd.py: error: --mkd needs a teacher' in result.stderr
    result = run_train_mkd(['--timm-train', script, '--mkd', '--teacher', 'resnet18', '--kd-distill-type', 'token'],
                           cwd=tmp_path)
    assert result.returncode == 2 and '--kd-distill-type token' in result.stderr
    result = run_train_mkd(['--timm-train', script, '--mkd', '--teacher', 'r', '--mkd-meta-interval', '0'], cwd=tmp_path)
    assert result.returncode == 2 and '--mkd-meta-interval 0' in result.stderr


def test_unsupported_train_py_exits_2(tmp_path):
    script = write(tmp_path, 'train.py', skeleton(imports_resume=False))
    result = run_train_mkd(['--timm-train', script], cwd=tmp_path)
    assert result.returncode == 2
    assert 'unsupported train.py' in result.stderr and 'Traceback' not in result.stderr


def _skeleton_output(result):
    import json
    lines = {line.split(' ', 1)[0]: line.split(' ', 1)[1] for line in result.stdout.splitlines()
             if line.startswith('SKELETON-')}
    return json.loads(lines['SKELETON-ARGS']), json.loads(lines['SKELETON-YAML'])


def test_plain_run_keeps_train_py_args_yaml(tmp_path):
    """No MKD flag: args.yaml text is train.py's own, without any MKD key."""
    script = write(tmp_path, 'synthetic_train.py', skeleton())
    result = run_train_mkd(['--timm-train', script, '-b', '4'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    args, text = _skeleton_output(result)
    assert not any(k.startswith('mkd') or k.startswith('teacher') for k in args)  # args are train.py's
    assert 'mkd' not in text and 'teacher' not in text  # and so is args.yaml
    assert 'batch_size: 4' in text


def test_teacher_flag_and_yaml_config(tmp_path):
    script = write(tmp_path, 'synthetic_train.py', skeleton())
    cfg = write(tmp_path, 'cfg.yaml', 'mkd: true\nteacher: resnet18\nmkd_tau_t: 2.0\nmkd_meta_interval: 5\n')
    result = run_train_mkd(['--timm-train', script, '-c', cfg, '-b', '16'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    args, text = _skeleton_output(result)
    assert args['mkd'] is True and args['kd_model_name'] == 'resnet18'
    assert args['mkd_tau_t'] == 2.0 and args['mkd_meta_interval'] == 5 and args['mkd_meta_batch_size'] == 16
    assert 'kd_model_name: resnet18' in text and 'mkd_meta_batch_size: 16' in text


# ------------------------------------------------------------------------------------------------
# summary rows and the utils proxy
# ------------------------------------------------------------------------------------------------

def test_summary_row_adds_mkd_columns(tmp_path):
    from collections import OrderedDict
    common = sys.modules['timm_mkd._patches.outputs']
    path = str(tmp_path / 'summary.csv')
    extra = {'tau_t': 3.5, 'tau_s': 4.5, 'kd_loss': 0.25, 'meta_loss': 1.5, 'meta_skipped': 0}
    common.write_summary_row(0, OrderedDict(loss=2.0), OrderedDict(top1=50.0), path, lr=0.1, extra=extra)
    common.write_summary_row(1, OrderedDict(loss=1.0), OrderedDict(top1=60.0), path, lr=0.05, extra=extra)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_top1', 'lr', 'tau_t', 'tau_s', 'kd_loss', 'meta_loss',
                             'meta_skipped']
    assert len(rows) == 2 and float(rows[1]['tau_t']) == 3.5


def test_utils_proxy_leaves_timm_utils_alone():
    import timm.utils
    common = sys.modules['timm_mkd._patches.outputs']
    proxy = common._UtilsProxy(timm.utils)
    proxy.update_summary = lambda *a, **k: 'patched'
    assert proxy.update_summary() == 'patched'
    assert timm.utils.update_summary is not proxy.update_summary
    assert proxy.AverageMeter is timm.utils.AverageMeter
