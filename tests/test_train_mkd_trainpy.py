"""train_mkd.py with timm's real train.py on real Fashion-MNIST images (marker ``trainpy``).

train.py is not in timm's wheel, so CI cannot run these. Locally::

    curl -fsSL -o /tmp/train.py <the URL patches.fix_for(timm.__version__) prints>
    TIMM_TRAIN_PY=/tmp/train.py python -m pytest -m trainpy tests/test_train_mkd_trainpy.py

Every run is a real subprocess of ``train_mkd.py`` (or of train.py itself, for the teacher and
for the "same as train.py" comparison) on a small image folder written from Debian's
Fashion-MNIST: 10 classes x 40 training, 10 validation and 10 meta images, 32x32 RGB. Runs use
one CPU thread each (``OMP_NUM_THREADS=1``): on a shared 2-core machine two threads per process
are many times slower, not faster.
"""
import csv
import math
import os
import shutil
import subprocess
import sys

import pytest

from timm_mkd.config import MKDConfig

pytestmark = pytest.mark.trainpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MKD = os.path.join(REPO, 'train_mkd.py')
PER_CLASS = {'train': 40, 'validation': 10, 'meta': 10}
MKD_COLUMNS = ('tau_t', 'tau_s', 'kd_loss', 'meta_loss')


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def train_py():
    path = os.environ.get('TIMM_TRAIN_PY')
    if not path:
        from timm_mkd.launcher import load_adapters
        adapters = load_adapters()
        pytest.skip(f'set TIMM_TRAIN_PY to the train.py of timm {adapters.NEWEST_KNOWN_RELEASE} (it is not in '
                    f'the timm wheel): curl -fsSL -o /tmp/train.py '
                    f'{adapters.train_py_url(adapters.NEWEST_KNOWN_RELEASE)}   # NEWEST_KNOWN_RELEASE')
    if not os.path.isfile(path):
        pytest.fail(f'TIMM_TRAIN_PY={path}: no such file')
    return os.path.abspath(path)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """An image folder (train / validation / meta) of real Fashion-MNIST images, as PNG files."""
    from fmnist import fashion_mnist_root
    import torchvision
    root = tmp_path_factory.mktemp('fmnist_folder')
    fm = fashion_mnist_root()
    sources = {'train': torchvision.datasets.FashionMNIST(fm, train=True, download=False),
               'test': torchvision.datasets.FashionMNIST(fm, train=False, download=False)}
    # train and meta come from the training split (disjoint), validation from the test split
    plan = [('train', 'train', 0), ('meta', 'train', 30000), ('validation', 'test', 0)]
    for split, source, start in plan:
        ds, counts = sources[source], {}
        for i in range(start, len(ds)):
            label = int(ds.targets[i])
            if counts.get(label, 0) >= PER_CLASS[split]:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True, exist_ok=True)
            ds[i][0].save(folder / f'{i}.png')
            if sum(counts.values()) == 10 * PER_CLASS[split]:
                break
    return str(root)


def _env():
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_TRAIN_PY'}
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHONWARNINGS'] = 'ignore::FutureWarning'
    return env


def base_args(data_root, out, name, model='resnet10t', epochs=1):
    """train.py flags of a small CPU run; ``model=None`` leaves ``--model`` to the caller."""
    return (['--model', model] if model else []) + [
        '--data-dir', data_root, '--input-size', '3', '32', '32', '--num-classes', '10',
        '-b', '32', '--epochs', str(epochs), '--device', 'cpu', '--workers', '0', '--lr', '0.05',
        '--warmup-epochs', '0', '--log-interval', '5', '--seed', '0', '--output', str(out), '--experiment', name,
    ]


VIT = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=4', 'depth=2',
       'embed_dim=64', 'num_heads=2']


def run(cmd, cwd, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    result.log = result.stdout + result.stderr
    return result


def run_mkd(train_py, argv, cwd):
    return run([sys.executable, TRAIN_MKD, '--timm-train', train_py] + list(argv), cwd=cwd)


def ok(result):
    if result.returncode != 0:
        keep = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'train_mkd_failed_{os.getpid()}_{id(result)}.log')
        with open(keep, 'w') as f:
            f.write(' '.join(map(str, result.args)) + '\n' + result.log)
        pytest.fail(f'exit {result.returncode} (full log: {keep})\n{result.log[-6000:]}')
    return result


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def teacher_ckpt(train_py, data_root, workdir):
    """A resnet18 teacher trained by timm's own train.py (no train_mkd involved)."""
    args = base_args(data_root, workdir / 'out', 'teacher', model='resnet18', epochs=2)
    ok(run([sys.executable, train_py] + args, cwd=workdir))
    path = workdir / 'out' / 'teacher' / 'last.pth.tar'
    assert path.is_file()
    return str(path)


def mkd_flags(teacher_ckpt, interval=2, meta='0.1', meta_bs=16):
    return ['--teacher', 'resnet18', '--teacher-checkpoint', teacher_ckpt, '--mkd',
            '--mkd-meta-interval', str(interval), '--mkd-meta-data', meta, '--mkd-meta-batch-size', str(meta_bs)]


@pytest.fixture(scope='module')
def mkd_run(train_py, data_root, workdir, teacher_ckpt):
    """The main MKD run: ViT student, resnet18 teacher, RandAugment + mixup + cutmix, 2 epochs."""
    args = base_args(data_root, workdir / 'out', 'mkd', model=None, epochs=2)
    result = ok(run_mkd(train_py, args + VIT + mkd_flags(teacher_ckpt) + [
        '--aa', 'rand-m9-mstd0.5', '--mixup', '0.8', '--cutmix', '1.0', '--opt', 'adamw', '--lr', '1e-3',
        '--mkd-export', str(workdir / 'export')], cwd=workdir))
    return workdir / 'out' / 'mkd', result


def test_mkd_export_flag_writes_a_loadable_student(mkd_run, workdir, data_root):
    """--mkd-export: the best checkpoint's student, rebuilt by timm.create_model, gives the same outputs."""
    import json
    import timm
    import torch
    outdir, result = mkd_run
    info = json.loads((workdir / 'export' / 'mkd_student.json').read_text())
    assert info['checkpoint'] == str(outdir / 'model_best.pth.tar')
    row = read_csv(outdir / 'summary.csv')[info['epoch']]
    assert info['temperatures']['tau_t'] == pytest.approx(float(row['tau_t']), rel=1e-5)
    assert info['train_args']['model'] == 'vit_tiny_patch16_224' and info['train_args']['mkd'] is True
    model = timm.create_model(**info['create_model']).eval()
    reference = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32, patch_size=4, depth=2,
                                  embed_dim=64, num_heads=2).eval()
    from timm_mkd.safe_load import load_checkpoint
    reference.load_state_dict(load_checkpoint(str(outdir / 'model_best.pth.tar'))['state_dict'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert 'exported the student to' in result.log


def assert_mkd_summary(outdir, epochs, tau_min=MKDConfig.tau_min, tau_max=MKDConfig.tau_max):
    """The MKD columns of summary.csv; the default bounds are MKDConfig's (no run here passes --mkd-tau-min)."""
    rows = read_csv(outdir / 'summary.csv')
    assert len(rows) == epochs
    for row in rows:
        for col in MKD_COLUMNS:
            assert col in row, f'summary.csv lacks {col}: {list(row)}'
        for col in ('tau_t', 'tau_s', 'kd_loss'):
            assert math.isfinite(float(row[col])), row
        assert tau_min <= float(row['tau_t']) <= tau_max and tau_min <= float(row['tau_s']) <= tau_max
    return rows


# ------------------------------------------------------------------------------------------------
# plain train.py behaviour
# ------------------------------------------------------------------------------------------------

def test_without_mkd_flags_it_is_train_py(train_py, data_root, workdir):
    """Same flags, same seed: train.py and train_mkd.py write the same summary and args.yaml."""
    out = workdir / 'same'
    a = ok(run([sys.executable, train_py] + base_args(data_root, out, 'plain'), cwd=workdir))
    b = ok(run_mkd(train_py, base_args(data_root, out, 'viamkd'), cwd=workdir))
    assert read_csv(out / 'plain' / 'summary.csv') == read_csv(out / 'viamkd' / 'summary.csv')
    yaml_a = (out / 'plain' / 'args.yaml').read_text().replace('experiment: plain', '')
    yaml_b = (out / 'viamkd' / 'args.yaml').read_text().replace('experiment: viamkd', '')
    assert yaml_a == yaml_b
    assert a.stdout.split('--result')[1] == b.stdout.split('--result')[1]
    assert not (out / 'viamkd' / 'temperatures.csv').exists()
    import torch
    args_a, args_b = (vars(torch.load(out / n / 'last.pth.tar', map_location='cpu', weights_only=False)['args'])
                      for n in ('plain', 'viamkd'))
    args_a.pop('experiment'), args_b.pop('experiment')
    assert args_a == args_b  # the args pickled into checkpoints too


def test_help_lists_mkd_flags(train_py, workdir):
    result = ok(run_mkd(train_py, ['--help'], cwd=workdir))
    assert 'MKD (Meta Knowledge Distillation)' in result.stdout
    assert '--kd-model-name' in result.stdout and '--mkd-meta-data' in result.stdout


def test_local_train_py_is_found(train_py, tmp_path):
    shutil.copy(train_py, tmp_path / 'train.py')
    result = ok(run([sys.executable, TRAIN_MKD, '--help'], cwd=tmp_path))
    assert str(tmp_path / 'train.py') in result.stdout.replace('\n', '')


def test_modified_train_py_warns_and_runs(train_py, tmp_path):
    with open(train_py) as f:
        text = f.read()
    (tmp_path / 'edited_train.py').write_text(text + '\n# a local edit\n')
    result = ok(run([sys.executable, TRAIN_MKD, '--timm-train', str(tmp_path / 'edited_train.py'), '--help'],
                    cwd=tmp_path))
    warnings = [line for line in result.stderr.splitlines() if 'warning:' in line]
    assert len(warnings) == 1 and 'is not the train.py of a known timm release' in warnings[0]
    import timm
    assert f'timm {timm.__version__} is installed' in warnings[0]


def test_release_pairing_is_reported(train_py, tmp_path):
    """The real train.py and the installed timm: silent when they are one release, else one warning naming both."""
    import timm
    from timm_mkd.launcher import load_adapters
    selection = load_adapters().select(train_py)
    result = ok(run([sys.executable, TRAIN_MKD, '--timm-train', train_py, '--help'], cwd=tmp_path))
    warnings = [line for line in result.stderr.splitlines() if 'warning:' in line]
    if timm.__version__ in selection.releases:
        assert warnings == [], result.stderr
    else:
        assert len(warnings) == 1, result.stderr
        assert f'timm {timm.__version__} is installed' in warnings[0]
        assert (selection.known_as or 'not the train.py of a known timm release') in warnings[0]


# ------------------------------------------------------------------------------------------------
# MKD runs
# ------------------------------------------------------------------------------------------------

def test_mkd_run_strong_augmentation(mkd_run, teacher_ckpt):
    outdir, result = mkd_run
    rows = assert_mkd_summary(outdir, epochs=2)
    last = rows[-1]
    tau_t, tau_s = float(last['tau_t']), float(last['tau_s'])
    assert (tau_t, tau_s) != (1.0, 1.0), 'temperatures did not move'
    assert f"Loaded KD teacher 'resnet18' from '{teacher_ckpt}'" in result.log
    assert 'MKD: held out 40 of 400 training samples' in result.log
    assert 'MKD epoch 1: tau_t=' in result.log
    # the calibration estimator's meta views are train.py's training augmentation, from its own flags
    assert 'MKD: meta views with the training augmentation (' in result.log
    assert 'auto_augment=rand-m9-mstd0.5' in result.log and 'scale=[0.08, 1.0]' in result.log

    steps = read_csv(outdir / 'temperatures.csv')
    # 360 training images, batch 32, drop_last: 11 updates per epoch; the warm start before update 1, then a meta
    # step every 2
    assert [int(r['step']) for r in steps] == [0] + list(range(2, 23, 2))
    assert [int(r['epoch']) for r in steps] == [0] * 6 + [1] * 6
    assert float(steps[-1]['tau_t']) == pytest.approx(tau_t, rel=1e-6)
    assert float(steps[-1]['tau_s']) == pytest.approx(tau_s, rel=1e-6)
    print(f'MKD run ended at tau_t={tau_t:.4f} tau_s={tau_s:.4f}')


def test_student_checkpoint_stays_plain_timm(mkd_run):
    import timm
    import torch
    outdir, _ = mkd_run
    ckpt = torch.load(outdir / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert 'mkd' in ckpt['task_state']
    assert not any(k.startswith(('teacher', 'tau', 'module.teacher')) for k in ckpt['state_dict'])
    model = timm.create_model(
        'vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2, num_classes=10,
        checkpoint_path=str(outdir / 'last.pth.tar'))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_plot_command(mkd_run):
    outdir, _ = mkd_run
    result = ok(run([sys.executable, '-m', 'timm_mkd.plot', str(outdir)], cwd=REPO))
    pngs = [f for f in os.listdir(outdir) if f.endswith('.png')]
    assert pngs, result.log


def test_resume_continues_with_saved_temperatures(mkd_run, train_py, data_root, workdir, teacher_ckpt):
    outdir, _ = mkd_run
    saved = read_csv(outdir / 'summary.csv')[-1]
    saved_steps = read_csv(outdir / 'temperatures.csv')
    # tau_t 1 is both the initial value and the default bound: a resume that lost it would match it too
    assert float(saved['tau_t']) != 1.0
    args = base_args(data_root, workdir / 'out', 'mkd_resumed', model=None, epochs=3)
    result = ok(run_mkd(train_py, args + VIT + mkd_flags(teacher_ckpt) + [
        '--aa', 'rand-m9-mstd0.5', '--mixup', '0.8', '--cutmix', '1.0', '--opt', 'adamw', '--lr', '1e-3',
        '--resume', str(outdir / 'last.pth.tar')], cwd=workdir))
    line = next(l for l in result.log.splitlines() if 'MKD: resumed temperatures' in l)
    tau_t = float(line.split('tau_t=')[1].split()[0])
    tau_s = float(line.split('tau_s=')[1].split()[0])
    assert tau_t == pytest.approx(float(saved['tau_t']), rel=1e-5)
    assert tau_s == pytest.approx(float(saved['tau_s']), rel=1e-5)
    new_dir = workdir / 'out' / 'mkd_resumed'
    rows = assert_mkd_summary(new_dir, epochs=1)
    assert rows[0]['epoch'] == '2'
    steps = read_csv(new_dir / 'temperatures.csv')
    # the meta-step cadence continues: update counter and step numbers pick up where they stopped
    assert int(steps[0]['step']) == int(saved_steps[-1]['step']) + 2
    print(f'resumed from tau_t={tau_t:.4f} tau_s={tau_s:.4f}, ended at '
          f'tau_t={float(rows[-1]["tau_t"]):.4f} tau_s={float(rows[-1]["tau_s"]):.4f}')


def test_resume_right_after_the_last_batch_of_a_meta_epoch(train_py, data_root, workdir, teacher_ckpt):
    """A meta set of exactly one meta batch: every checkpoint saves the position after a pass's last batch.

    Restored as an empty pass, that position would reach timm's PrefetchLoader (train.py's default), which before
    1.0.31 dies on an empty loader at the first meta step (UnboundLocalError); the resumed run must start the next pass.
    """
    flags = mkd_flags(teacher_ckpt, meta='0.1', meta_bs=40)  # 40 held-out images, one meta batch of 40
    ok(run_mkd(train_py, base_args(data_root, workdir / 'out', 'meta_end') + flags, cwd=workdir))
    import torch
    saved = torch.load(workdir / 'out' / 'meta_end' / 'last.pth.tar', map_location='cpu', weights_only=False)
    meta_state = saved['task_state']['mkd']['meta_data']
    assert meta_state['position'] == 1 and meta_state['batch_size'] == 40  # the pass was used up
    result = ok(run_mkd(train_py, base_args(data_root, workdir / 'out', 'meta_end_resumed', epochs=2) + flags + [
        '--resume', str(workdir / 'out' / 'meta_end' / 'last.pth.tar')], cwd=workdir))
    assert 'MKD: resumed temperatures' in result.log
    steps = read_csv(workdir / 'out' / 'meta_end_resumed' / 'temperatures.csv')
    assert [int(r['step']) for r in steps] == list(range(12, 23, 2))  # 11 updates per epoch, every 2nd
    assert_mkd_summary(workdir / 'out' / 'meta_end_resumed', epochs=1)


def test_resume_in_place_logs_each_meta_step_once(train_py, data_root, workdir, teacher_ckpt):
    """train.py reuses the folder of --experiment; resuming there (as timm 1.0.31's --resume auto does) from
    the epoch-0 checkpoint of a 2-epoch run re-does epoch 1: temperatures.csv must not hold its steps twice."""
    args = base_args(data_root, workdir / 'out', 'inplace', epochs=2) + mkd_flags(teacher_ckpt)
    ok(run_mkd(train_py, args, cwd=workdir))
    outdir = workdir / 'out' / 'inplace'
    epoch0 = workdir / 'inplace-epoch0.pth.tar'
    shutil.copy(outdir / 'checkpoint-0.pth.tar', epoch0)
    result = ok(run_mkd(train_py, args + ['--resume', str(epoch0)], cwd=workdir))
    # the warm start before update 1 (logged at update 0, once), then every 2nd update
    assert [int(r['step']) for r in read_csv(outdir / 'temperatures.csv')] == [0] + list(range(2, 23, 2))
    assert 'dropped 6 meta steps after update 11' in result.log  # epoch 1's steps 12..22 of the first run


def test_yaml_config_sets_mkd_flags(train_py, data_root, workdir, teacher_ckpt):
    cfg = workdir / 'mkd.yaml'
    cfg.write_text(
        f'mkd: true\nteacher: resnet18\nteacher_checkpoint: {teacher_ckpt}\nmkd_tau_t: 2.0\nmkd_tau_s: 3.0\n'
        f'mkd_meta_interval: 3\nmkd_meta_data: "0.1"\nmkd_meta_batch_size: 16\n')
    result = ok(run_mkd(train_py, ['-c', str(cfg)] + base_args(data_root, workdir / 'out', 'yaml'), cwd=workdir))
    assert 'MKDTask: tau_t=2.0, tau_s=3.0' in result.log and 'meta_interval=3' in result.log
    outdir = workdir / 'out' / 'yaml'
    assert_mkd_summary(outdir, epochs=1)
    assert len(read_csv(outdir / 'temperatures.csv')) == 1 + 11 // 3  # the warm start before update 1, then every 3
    text = (outdir / 'args.yaml').read_text()
    assert 'mkd_tau_t: 2.0' in text and 'kd_model_name: resnet18' in text


def test_deit_recipe_through_a_config_file(train_py, data_root, workdir, teacher_ckpt):
    """DeiT's augmentation (RandAugment rand-m9-mstd0.5-inc1, mixup, cutmix, random erasing) with EMA and MKD.

    At magnitude 10 (drawn about 2% of the time) PosterizeIncreasing keeps 0 bits, which Pillow >= 13
    refuses: the run died in a data worker at some batch. train_mkd.py gives the old result instead.
    """
    cfg = workdir / 'deit.yaml'
    cfg.write_text(
        'aa: rand-m9-mstd0.5-inc1\nmixup: 0.8\ncutmix: 1.0\nreprob: 0.25\nsmoothing: 0.1\nmodel_ema: true\n'
        'model_ema_decay: 0.9\nopt: adamw\nlr: 0.001\nweight_decay: 0.05\n'
        f'mkd: true\nteacher: resnet18\nteacher_checkpoint: {teacher_ckpt}\nmkd_meta_interval: 2\n'
        f'mkd_meta_data: "0.1"\nmkd_meta_batch_size: 16\n')
    args = base_args(data_root, workdir / 'out', 'deit', model=None, epochs=2)
    at = args.index('--lr')
    result = ok(run_mkd(train_py, ['-c', str(cfg)] + args[:at] + args[at + 2:] + VIT, cwd=workdir))
    from timm_mkd.augment_compat import pillow_rejects_zero_bits
    if pillow_rejects_zero_bits():
        assert 'refuses to posterize to 0 bits' in result.log
    assert 'Test (EMA)' in result.log
    assert_mkd_summary(workdir / 'out' / 'deit', epochs=2)


@pytest.mark.parametrize('name, extra, check', [
    ('amp_bf16', ['--amp', '--amp-dtype', 'bfloat16'], 'Using native Torch AMP'),
    ('ema', ['--model-ema', '--model-ema-decay', '0.9'], 'Test (EMA)'),
    ('accum', ['--grad-accum-steps', '2'], 'meta_steps=4 '),  # 11 batches -> 6 updates -> warm start + 3 meta steps
    ('meta_views_eval', ['--mkd-meta-views', 'eval'], "MKD: meta views with timm's eval transform"),
])
def test_train_py_features_with_mkd(train_py, data_root, workdir, teacher_ckpt, name, extra, check):
    result = ok(run_mkd(train_py, base_args(data_root, workdir / 'out', name) + mkd_flags(teacher_ckpt) + extra,
                        cwd=workdir))
    assert check in result.log
    rows = assert_mkd_summary(workdir / 'out' / name, epochs=1)
    print(f'{name}: tau_t={float(rows[-1]["tau_t"]):.4f} tau_s={float(rows[-1]["tau_s"]):.4f}')


@pytest.mark.parametrize('name, meta, expect', [
    ('meta_split', 'split:meta', 'meta data from split'),
    ('meta_folder', 'folder:{root}/meta', 'meta data from folder'),
    ('meta_train', 'train', 'the training stream'),
])
def test_meta_data_sources(train_py, data_root, workdir, teacher_ckpt, name, meta, expect):
    flags = mkd_flags(teacher_ckpt, meta=meta.format(root=data_root))
    result = ok(run_mkd(train_py, base_args(data_root, workdir / 'out', name) + flags, cwd=workdir))
    assert expect in result.log
    assert_mkd_summary(workdir / 'out' / name, epochs=1)
    if name != 'meta_train':  # no held-out fraction: all 400 training images train
        assert len(read_csv(workdir / 'out' / name / 'temperatures.csv')) == 1 + 12 // 2  # + the warm start


DEIT = ['--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8', 'depth=1',
        'embed_dim=64', 'num_heads=2']
#: The quickstart's Fashion-MNIST flags: one channel, its own statistics.
GRAY = ['--in-chans', '1', '--input-size', '1', '32', '32', '--mean', '0.2860', '--std', '0.3530']


def gray_args(data_root, out, name, model='resnet10t', epochs=1):
    """``base_args`` on 1-channel images normalised with Fashion-MNIST's mean and std."""
    args = base_args(data_root, out, name, model=model, epochs=epochs)
    at = args.index('--input-size')
    return args[:at] + args[at + 4:] + GRAY


@pytest.fixture(scope='module')
def gray_teacher_ckpt(train_py, data_root, workdir):
    """A 1-channel resnet18 teacher trained by timm's own train.py."""
    ok(run([sys.executable, train_py] + gray_args(data_root, workdir / 'out', 'teacher_gray', model='resnet18'),
           cwd=workdir))
    return str(workdir / 'out' / 'teacher_gray' / 'last.pth.tar')


KD_TYPES = [
    ('logit', [], 'LogitDistillationTask: loss_type=kl, temperature=4.0'),
    ('feature', [], 'FeatureDistillationTask: student_dim=512, teacher_dim=512'),
    ('token', DEIT, 'TokenDistillationTask'),
]


@pytest.mark.parametrize('distill_type, model, expect', KD_TYPES)
def test_plain_kd_with_local_teacher_checkpoint(train_py, data_root, workdir, teacher_ckpt, distill_type, model,
                                                expect):
    """--teacher-checkpoint without --mkd: timm's own distillation task with the local teacher."""
    name = f'kd_{distill_type}'
    result = ok(run_mkd(train_py, base_args(data_root, workdir / 'out', name, model=None if model else 'resnet10t')
                        + model + ['--teacher', 'resnet18', '--teacher-checkpoint', teacher_ckpt,
                                   '--kd-distill-type', distill_type], cwd=workdir))
    assert f"Loaded KD teacher 'resnet18' from '{teacher_ckpt}'" in result.log
    assert expect in result.log
    row = read_csv(workdir / 'out' / name / 'summary.csv')[0]
    assert 'tau_t' not in row
    assert not (workdir / 'out' / name / 'temperatures.csv').exists()


@pytest.mark.parametrize('distill_type, model, expect', KD_TYPES)
def test_plain_kd_on_one_channel_data(train_py, data_root, workdir, gray_teacher_ckpt, distill_type, model, expect):
    """The quickstart's 1-channel flags with plain KD: timm's tasks took the student's normalisation from
    its pretrained_cfg (3 ImageNet values) and fed the teacher a 3-channel batch at the first step."""
    name = f'kd_gray_{distill_type}'
    result = ok(run_mkd(train_py, gray_args(data_root, workdir / 'out', name, model=None if model else 'resnet10t')
                        + model + ['--teacher', 'resnet18', '--teacher-checkpoint', gray_teacher_ckpt,
                                   '--kd-distill-type', distill_type], cwd=workdir))
    assert expect in result.log
    row = read_csv(workdir / 'out' / name / 'summary.csv')[0]
    assert math.isfinite(float(row['train_loss'])) and 'tau_t' not in row


def test_torchrun_two_processes(train_py, data_root, workdir, teacher_ckpt):
    """torchrun --nproc_per_node 2 on CPU (gloo): ranks agree on tau (checked every epoch), rank 0 writes."""
    args = base_args(data_root, workdir / 'out', 'ddp', epochs=2)
    args[args.index('-b') + 1] = '16'
    # --standalone: torchrun picks a free rendezvous port itself (no race with other jobs' ports)
    result = ok(run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                     TRAIN_MKD, '--timm-train', train_py]
                    + args + mkd_flags(teacher_ckpt, meta_bs=8), cwd=workdir))
    assert 'Training in distributed mode' in result.log
    assert result.log.count('MKD epoch 1: tau_t=') == 1  # primary rank only
    outdir = workdir / 'out' / 'ddp'
    rows = assert_mkd_summary(outdir, epochs=2)
    steps = read_csv(outdir / 'temperatures.csv')
    assert len(steps) == len({r['step'] for r in steps})  # one writer
    print(f'ddp: tau_t={float(rows[-1]["tau_t"]):.4f} tau_s={float(rows[-1]["tau_s"]):.4f}')


# ------------------------------------------------------------------------------------------------
# errors: clear message on stderr, non-zero exit, no output folder
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, extra, words, code', [
    ('no_teacher', ['--mkd'], '--mkd needs a teacher', 2),
    ('missing_ckpt', ['--mkd', '--teacher', 'resnet18', '--teacher-checkpoint', '{workdir}/nowhere/t.pth.tar'],
     '{workdir}/nowhere/t.pth.tar', 2),
    ('class_count', ['--mkd', '--teacher', 'resnet18', '--teacher-checkpoint', '{teacher}', '--num-classes', '12',
                     '--mkd-meta-batch-size', '8'],
     'predicts 10 classes but the student predicts 12', 1),
    ('architecture', ['--mkd', '--teacher', 'resnet34', '--teacher-checkpoint', '{teacher}', '--mkd-meta-batch-size', '8'],
     'does not fit architecture', 1),
    ('corrupt', ['--mkd', '--teacher', 'resnet18', '--teacher-checkpoint', '{workdir}/corrupt.safetensors',
                 '--mkd-meta-batch-size', '8'],
     'corrupt.safetensors', 1),
    ('meta_is_val', ['--mkd', '--teacher', 'resnet18', '--mkd-meta-data', 'split:validation'],
     'is the validation split', 2),
    ('feature', ['--mkd', '--teacher', 'resnet18', '--kd-distill-type', 'feature'], '--kd-distill-type feature', 2),
    ('token', ['--mkd', '--teacher', 'resnet18', '--kd-distill-type', 'token'], '--kd-distill-type token', 2),
    ('interval0', ['--mkd', '--teacher', 'resnet18', '--mkd-meta-interval', '0'], '--mkd-meta-interval 0', 2),
    ('meta_bs', ['--mkd', '--teacher', 'resnet18', '--teacher-checkpoint', '{teacher}', '--mkd-meta-data', '0.05',
                 '--mkd-meta-batch-size', '64'], 'larger than the meta set (20 samples', 1),
])
def test_errors(train_py, data_root, workdir, teacher_ckpt, name, extra, words, code):
    (workdir / 'corrupt.safetensors').write_bytes(b'\x00' * 16 + b'not a safetensors file')
    fill = dict(workdir=str(workdir), teacher=teacher_ckpt)
    extra = [e.format(**fill) for e in extra]
    result = run_mkd(train_py, base_args(data_root, workdir / 'errors', name) + extra, cwd=workdir)
    assert result.returncode == code, result.log[-4000:]
    assert words.format(**fill) in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('train_mkd.py: error:'), last
    assert not (workdir / 'errors' / name).exists()


# ------------------------------------------------------------------------------------------------
# run-time hook checks: a train.py whose structure passes the probes but where a patch does not take
# effect stops with the hook's name before any checkpoint is written
# ------------------------------------------------------------------------------------------------

#: One line put at the top of main() of a copy of train.py, and the hook it defeats.
DEFEATS = {
    'task': 'global LogitDistillationTask; LogitDistillationTask = lambda student_model, teacher_model, **kw: '
            '__import__("timm.task", fromlist=["x"]).ClassificationTask(student_model, criterion=kw["criterion"], '
            'device=kw["device"], dtype=kw["dtype"])',
    'meta step': 'global create_optimizer_v2; from timm.optim import create_optimizer_v2',
    'checkpoint': 'global utils; import timm.utils as utils',
    'summary columns': 'utils.update_summary = __import__("timm.utils", fromlist=["x"]).update_summary',
}


@pytest.mark.parametrize('hook', list(DEFEATS))
def test_hook_that_did_not_take_effect_stops_the_run(train_py, data_root, workdir, teacher_ckpt, tmp_path, hook):
    with open(train_py) as f:
        text = f.read()
    assert text.count('\ndef main():\n') == 1
    edited = tmp_path / 'train.py'
    edited.write_text(text.replace('\ndef main():\n', '\ndef main():\n    ' + DEFEATS[hook] + '\n'))
    name = 'hook_' + hook.replace(' ', '_')
    result = run_mkd(str(edited), base_args(data_root, workdir / 'out', name) + mkd_flags(teacher_ckpt), cwd=workdir)
    assert result.returncode == 1, result.log[-4000:]
    assert 'is not the train.py of a known timm release' in result.stderr  # it passed the structure probes
    last = result.stderr.strip().splitlines()
    message = next(l for l in last if l.startswith('train_mkd.py: error:'))
    assert f'the {hook} hook of train_mkd.py did not take effect' in message and 'Fix:' in message
    assert not list((workdir / 'out' / name).glob('*.pth.tar'))


@pytest.mark.slow
def test_torchcompile(train_py, data_root, workdir, teacher_ckpt):
    """--torchcompile (inductor on CPU: about a minute of compilation)."""
    result = ok(run_mkd(train_py, base_args(data_root, workdir / 'out', 'compiled') + mkd_flags(teacher_ckpt)
                        + ['--torchcompile'], cwd=workdir))
    assert 'Compiling task components' in result.log
    rows = assert_mkd_summary(workdir / 'out' / 'compiled', epochs=1)
    print(f'torchcompile: tau_t={float(rows[-1]["tau_t"]):.4f} tau_s={float(rows[-1]["tau_s"]):.4f}')


def test_sigkill_mid_epoch_then_resume_from_recovery(train_py, data_root, workdir, teacher_ckpt):
    """SIGKILL a real run mid-epoch; --resume from train.py's recovery checkpoint restores the temperatures."""
    import glob
    import signal
    import time
    import torch
    outdir = workdir / 'out' / 'killed'
    args = base_args(data_root, workdir / 'out', 'killed', epochs=3) + mkd_flags(teacher_ckpt) + [
        '--recovery-interval', '3']
    with open(workdir / 'killed.log', 'w') as log:
        proc = subprocess.Popen([sys.executable, TRAIN_MKD, '--timm-train', train_py] + args, cwd=workdir,
                                env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        try:
            while not glob.glob(str(outdir / 'recovery-1-*.pth.tar')):
                assert proc.poll() is None, (workdir / 'killed.log').read_text()[-4000:]
                assert time.time() < deadline, 'no recovery checkpoint in epoch 1 within 300 s'
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    recovery = max(glob.glob(str(outdir / 'recovery-*.pth.tar')), key=os.path.getmtime)
    state = torch.load(recovery, map_location='cpu', weights_only=False)['task_state']['mkd']
    saved_t, saved_s = math.exp(float(state['log_tau_t'])), math.exp(float(state['log_tau_s']))
    # tau_t 1 is both the initial value and the default bound: a resume that lost it would match it too
    assert saved_t != 1.0

    # the meta-step log survived the kill and agrees with the checkpoint
    steps = [r for r in read_csv(outdir / 'temperatures.csv') if int(r['step']) <= int(state['updates'])]
    assert float(steps[-1]['tau_t']) == pytest.approx(saved_t, rel=1e-6)

    result = ok(run_mkd(train_py, base_args(data_root, workdir / 'out', 'killed_resumed', epochs=3)
                        + mkd_flags(teacher_ckpt) + ['--resume', recovery], cwd=workdir))
    line = next(l for l in result.log.splitlines() if 'MKD: resumed temperatures' in l)
    assert float(line.split('tau_t=')[1].split()[0]) == pytest.approx(saved_t, rel=1e-5)
    assert float(line.split('tau_s=')[1].split()[0]) == pytest.approx(saved_s, rel=1e-5)
    assert f"{int(state['updates'])} updates" in line
    rows = assert_mkd_summary(workdir / 'out' / 'killed_resumed', epochs=1)  # epoch 2 only
    print(f'killed at tau_t={saved_t:.4f} tau_s={saved_s:.4f} ({os.path.basename(recovery)}), resumed run ended at '
          f'tau_t={float(rows[-1]["tau_t"]):.4f} tau_s={float(rows[-1]["tau_s"]):.4f}')
