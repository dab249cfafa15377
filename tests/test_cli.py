"""The MKD command-line flags on a plain argparse parser (no train.py needed: runs in CI)."""
import argparse
import os

import pytest
import yaml

from timm_mkd.cli import MKD_DESTS, MKDArgumentError, MetaDataSpec, add_mkd_args, mkd_flags_in_use, parse_meta_data
from timm_mkd.launcher import load_adapters

# What the train.py patch runs on train.py's namespace: train.py's own flags (--kd-model-name, --batch-size,
# --val-split, ...) are checked by the adapter (patches/args.py), the MKD flags by timm_mkd.cli.validate_mkd_args.
validate_mkd_args = load_adapters().args.validate_train_args


def make_parser():
    """A parser with the train.py flags validation looks at, plus the MKD group."""
    parser = argparse.ArgumentParser(prog='train_mkd.py')
    parser.add_argument('--kd-model-name', default=None)
    parser.add_argument('--kd-distill-type', default='logit', choices=['logit', 'feature', 'token'])
    parser.add_argument('--kd-loss-type', default='kl')
    parser.add_argument('--kd-temperature', default=4.0, type=float)
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('--dataset', default='')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--val-split', default='validation')
    parser.add_argument('--naflex-loader', action='store_true')
    add_mkd_args(parser)
    return parser


def parse(*argv):
    args = make_parser().parse_args(list(argv))
    return args, validate_mkd_args(args)


def test_defaults_are_inactive():
    args, opts = parse()
    assert opts is None
    assert not mkd_flags_in_use(args)
    for dest, default in MKD_DESTS.items():
        assert getattr(args, dest) == default


def test_help_lists_every_flag_in_an_mkd_group():
    text = make_parser().format_help()
    assert 'MKD (Meta Knowledge Distillation)' in text
    for dest in MKD_DESTS:
        assert '--' + dest.replace('_', '-') in text


def test_add_to_existing_group():
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group('custom')
    add_mkd_args(group)
    assert parser.parse_args(['--mkd']).mkd is True


def test_full_mkd_command_line():
    args, opts = parse(
        '--mkd', '--teacher', 'resnet18', '--mkd-tau-t', '2', '--mkd-tau-s', '3', '--mkd-tau-min', '1',
        '--mkd-tau-max', '10', '--mkd-meta-interval', '5', '--mkd-meta-lr', '0.1', '--mkd-meta-data', '0.2',
        '--mkd-meta-batch-size', '16', '--mkd-temperatures', 'free', '--mkd-estimator', 'lookahead',
        '--mkd-warm-start', '2', '--mkd-fd-precision', 'float32', '-b', '64')
    assert opts.mkd and opts.teacher == 'resnet18'
    assert args.kd_model_name == 'resnet18'  # --teacher switches train.py into distillation
    assert (opts.tau_t, opts.tau_s, opts.tau_min, opts.tau_max) == (2.0, 3.0, 1.0, 10.0)
    assert (opts.meta_interval, opts.meta_lr, opts.meta_batch_size) == (5, 0.1, 16)
    assert opts.meta_data == MetaDataSpec('holdout', fraction=0.2)
    assert opts.task_kwargs() == dict(tau_t=2.0, tau_s=3.0, tau_min=1.0, tau_max=10.0, meta_interval=5, meta_lr=0.1,
                                      tie_temperatures=False, estimator='lookahead', warm_start_batches=2,
                                      fd_precision='float32', learn_tau_s=True)
    _, teacher_only = parse('--mkd', '--teacher', 'resnet18', '--mkd-temperatures', 'teacher', '--mkd-tau-t', '4')
    assert not teacher_only.task_kwargs()['learn_tau_s'] and teacher_only.tau_s == 1.0 and teacher_only.tau_t == 4.0


def test_temperature_mode_flags_default_to_the_core():
    import inspect
    from timm_mkd import MKDTask
    params = inspect.signature(MKDTask).parameters
    _, opts = parse('--mkd', '--teacher', 'resnet18')
    kw = opts.task_kwargs()
    for key in ('tau_t', 'tie_temperatures', 'learn_tau_s', 'estimator', 'meta_interval', 'meta_lr',
                'warm_start_batches', 'fd_precision'):
        assert kw[key] == params[key].default, key
    assert params['tau_s'].default is None and kw['tau_s'] == kw['tau_t']  # None: tau_t's, as the core resolves it
    with pytest.raises(SystemExit):
        parse('--mkd', '--teacher', 'resnet18', '--mkd-temperatures', 'loose')


def test_meta_batch_size_defaults_to_batch_size():
    args, opts = parse('--mkd', '--teacher', 'resnet18', '-b', '48')
    assert opts.meta_batch_size == 48 and args.mkd_meta_batch_size == 48


def test_kd_model_name_is_the_teacher():
    args, opts = parse('--mkd', '--kd-model-name', 'resnet18')
    assert opts.teacher == 'resnet18' and args.teacher == 'resnet18'
    args, opts = parse('--mkd', '--kd-model-name', 'resnet18', '--teacher', 'resnet18')
    assert opts.teacher == 'resnet18'


def test_teacher_alone_is_plain_train_py_kd():
    args, opts = parse('--teacher', 'resnet18')
    assert opts is None
    assert args.kd_model_name == 'resnet18'


def test_teacher_checkpoint_without_mkd_is_plain_kd(tmp_path):
    ckpt = tmp_path / 'teacher.safetensors'
    ckpt.write_bytes(b'x')
    args, opts = parse('--teacher', 'resnet18', '--teacher-checkpoint', str(ckpt))
    assert opts is not None and not opts.mkd and opts.teacher_checkpoint == str(ckpt)


def test_yaml_config_sets_mkd_flags(tmp_path):
    """train.py's -c: parser.set_defaults(**yaml) then parse; the MKD dests must be settable that way."""
    cfg = {'mkd': True, 'teacher': 'resnet18', 'mkd_tau_t': 2.5, 'mkd_meta_interval': 7,
           'mkd_meta_data': 'split:meta'}
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(cfg))
    parser = make_parser()
    parser.set_defaults(**yaml.safe_load(path.read_text()))
    args = parser.parse_args([])
    opts = validate_mkd_args(args)
    assert opts.mkd and opts.tau_t == 2.5 and opts.meta_interval == 7
    assert opts.meta_data == MetaDataSpec('split', split='meta')


@pytest.mark.parametrize('argv, views', [
    ([], 'train'),  # the default estimator is 'mixture': it fits on the training augmentation
    (['--mkd-estimator', 'lookahead'], 'eval'),
    (['--mkd-estimator', 'lookahead', '--mkd-meta-views', 'train'], 'train'),
    (['--mkd-meta-views', 'eval'], 'eval'),
])
def test_meta_views_follow_the_estimator_unless_given(argv, views):
    _, opts = parse('--mkd', '--teacher', 'resnet18', *argv)
    assert opts.meta_views == views


@pytest.mark.parametrize('value, spec', [
    ('0.05', MetaDataSpec('holdout', fraction=0.05)),
    (' 0.5 ', MetaDataSpec('holdout', fraction=0.5)),
    ('train', MetaDataSpec('train')),
    ('split:meta', MetaDataSpec('split', split='meta')),
    ('split:train[:10%]', MetaDataSpec('split', split='train[:10%]')),
    ('folder:/data/meta', MetaDataSpec('folder', path='/data/meta')),
])
def test_parse_meta_data(value, spec):
    assert parse_meta_data(value) == spec


@pytest.mark.parametrize('value, words', [
    ('0', 'in (0, 1)'),
    ('1', 'in (0, 1)'),
    ('1.5', 'in (0, 1)'),
    ('-0.1', 'in (0, 1)'),
    ('nan', 'in (0, 1)'),
    ('split:', 'split name'),
    ('folder:', 'path'),
    ('holdout', 'not understood'),
])
def test_parse_meta_data_errors(value, words):
    with pytest.raises(MKDArgumentError, match=None) as info:
        parse_meta_data(value)
    assert words in str(info.value)


@pytest.mark.parametrize('argv, words', [
    (['--mkd'], '--mkd needs a teacher'),
    (['--mkd', '--teacher', 'a', '--kd-model-name', 'b'], 'disagree'),
    (['--mkd', '--teacher', 'a', '--kd-distill-type', 'feature'], '--kd-distill-type feature'),
    (['--mkd', '--teacher', 'a', '--kd-distill-type', 'token'], '--kd-distill-type token'),
    (['--mkd', '--teacher', 'a', '--kd-loss-type', 'mse'], '--kd-loss-type kl'),
    (['--mkd', '--teacher', 'a', '--naflex-loader'], '--naflex-loader'),
    (['--mkd', '--teacher', 'a', '--mkd-meta-interval', '0'], '--mkd-meta-interval 0'),
    (['--mkd', '--teacher', 'a', '--mkd-meta-interval', '-3'], 'must be >= 1'),
    (['--mkd', '--teacher', 'a', '--mkd-tau-min', '5', '--mkd-tau-max', '5'], 'must be smaller than'),
    (['--mkd', '--teacher', 'a', '--mkd-tau-min', '6', '--mkd-tau-max', '2'], 'must be smaller than'),
    (['--mkd', '--teacher', 'a', '--mkd-tau-t', '30'], '--mkd-tau-t 30.0 is outside the bounds'),
    (['--mkd', '--teacher', 'a', '--mkd-tau-s', '0.1'], '--mkd-tau-s 0.1 is outside the bounds'),
    (['--mkd', '--teacher', 'a', '--mkd-tau-min', '0'], 'positive'),
    (['--mkd', '--teacher', 'a', '--mkd-meta-lr', '0'], '--mkd-meta-lr'),
    (['--mkd', '--teacher', 'a', '--mkd-warm-start', '-1'], '--mkd-warm-start -1'),
    (['--mkd', '--teacher', 'a', '--mkd-temperatures', 'free'],
     "--mkd-temperatures free would never move tau_s: the 'mixture' estimator gives tau_s no gradient"),
    (['--mkd', '--teacher', 'a', '--mkd-temperatures', 'free', '--mkd-estimator', 'calibration'],
     "the 'calibration' estimator gives tau_s no gradient; use --mkd-temperatures tied"),
    (['--mkd', '--teacher', 'a', '--mkd-meta-batch-size', '0'], '--mkd-meta-batch-size'),
    (['--mkd', '--teacher', 'a', '--mkd-meta-data', '1.0'], 'in (0, 1)'),
    (['--mkd', '--teacher', 'a', '--mkd-meta-data', '0'], 'in (0, 1)'),
    (['--mkd-tau-t', '2'], 'without --mkd'),
    (['--teacher', 'a', '--mkd-meta-data', 'train'], 'without --mkd'),
    (['--mkd', '--teacher', 'a', '--mkd-meta-data', 'train', '--mkd-meta-views', 'eval'],
     '--mkd-meta-views eval does nothing with --mkd-meta-data train'),
    (['--teacher-checkpoint', 'whatever.pth'], '--teacher-checkpoint needs a teacher'),
])
def test_validation_errors(argv, words):
    args = make_parser().parse_args(argv)
    with pytest.raises(MKDArgumentError) as info:
        validate_mkd_args(args)
    assert words in str(info.value)


def test_missing_teacher_checkpoint_names_the_path(tmp_path):
    missing = str(tmp_path / 'nowhere' / 'teacher.pth.tar')
    args = make_parser().parse_args(['--mkd', '--teacher', 'a', '--teacher-checkpoint', missing])
    with pytest.raises(MKDArgumentError) as info:
        validate_mkd_args(args)
    assert missing in str(info.value)


@pytest.mark.parametrize('dataset, meta, val', [
    ('', 'validation', 'validation'),
    ('', 'val', 'validation'),
    ('', 'validation', 'val'),
    ('torch/fashion_mnist', 'test', 'test'),
    ('torch/fashion_mnist', 'test', 'validation'),  # timm reads every non-train split as the test set
])
def test_meta_split_equal_to_validation_split(dataset, meta, val):
    args = make_parser().parse_args(
        ['--mkd', '--teacher', 'a', '--dataset', dataset, '--val-split', val, '--mkd-meta-data', f'split:{meta}'])
    with pytest.raises(MKDArgumentError) as info:
        validate_mkd_args(args)
    assert 'validation split' in str(info.value)


def test_meta_split_other_than_validation_is_fine():
    args, opts = parse('--mkd', '--teacher', 'a', '--val-split', 'validation', '--mkd-meta-data', 'split:meta')
    assert opts.meta_data.split == 'meta'


def test_meta_folder_is_the_validation_folder(tmp_path):
    (tmp_path / 'validation').mkdir()
    args = make_parser().parse_args(
        ['--mkd', '--teacher', 'a', '--data-dir', str(tmp_path), '--val-split', 'validation',
         '--mkd-meta-data', f'folder:{tmp_path / "validation"}'])
    with pytest.raises(MKDArgumentError, match='validation folder'):
        validate_mkd_args(args)


def test_meta_folder_must_exist(tmp_path):
    args = make_parser().parse_args(
        ['--mkd', '--teacher', 'a', '--mkd-meta-data', f'folder:{tmp_path / "absent"}'])
    with pytest.raises(MKDArgumentError, match='no such folder'):
        validate_mkd_args(args)


def test_meta_folder_elsewhere_is_fine(tmp_path):
    (tmp_path / 'meta').mkdir()
    args, opts = parse('--mkd', '--teacher', 'a', '--data-dir', str(tmp_path),
                       '--mkd-meta-data', f'folder:{tmp_path / "meta"}')
    assert opts.meta_data.kind == 'folder' and os.path.samefile(opts.meta_data.path, tmp_path / 'meta')


def test_values_are_plain_types_for_weights_only_checkpoints():
    """CheckpointSaver pickles args; resume loads with weights_only=True: only plain values allowed."""
    args, _ = parse('--mkd', '--teacher', 'a', '--mkd-meta-data', 'split:meta')
    for dest in MKD_DESTS:
        assert isinstance(getattr(args, dest), (str, int, float, bool, type(None)))


def test_meta_split_folder_must_exist_for_folder_datasets(tmp_path):
    """timm reads all of --data-dir when the split folder is missing: that would include validation."""
    (tmp_path / 'train').mkdir()
    (tmp_path / 'validation').mkdir()
    args = make_parser().parse_args(
        ['--mkd', '--teacher', 'a', '--data-dir', str(tmp_path), '--mkd-meta-data', 'split:meta'])
    with pytest.raises(MKDArgumentError, match='there is no folder'):
        validate_mkd_args(args)
    (tmp_path / 'meta').mkdir()
    args = make_parser().parse_args(
        ['--mkd', '--teacher', 'a', '--data-dir', str(tmp_path), '--mkd-meta-data', 'split:meta'])
    assert validate_mkd_args(args).meta_data.split == 'meta'
