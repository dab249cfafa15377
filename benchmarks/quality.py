"""Quality benchmark: MKD against no KD and timm's fixed-temperature LogitDistillationTask.

Real data (Fashion-MNIST, Debian's ``dataset-fashion-mnist``), strong augmentation as in
state-of-the-art recipes (RandAugment ``rand-m9-mstd0.5``, mixup 0.8, cutmix 1.0, label
smoothing 0.1), a small timm ViT student (``vit_tiny_patch16_224`` at 28 px, patch 4) and a
much larger CNN teacher (``resnet10t``, 4.9M parameters, ~24x the student's 0.21M) trained once, without
strong augmentation, on the train split minus the held-out meta fraction, and cached.

Configurations, same budget (optimizer updates, batch, schedule) each, >= 3 seeds each:
``none`` (no KD), ``kd`` at fixed tau 1, 2, 4, 8 (timm's ``LogitDistillationTask``), ``mkd``
from initial tau 1 and 4 (``timm_mkd.MKDTask``, library defaults unless flags say otherwise).
Seed s gives every configuration the same student initialisation, data order, augmentation and
mixup draws (paired runs), so differences between configurations at one seed are less noisy
than the spread across seeds.

Data: the train split's held-out fraction (5%, ``split_holdout`` seed 0) is MKD's meta data;
the teacher and all students train on the rest. The 10k test split is used only for the
reported top-1. ``--tune`` instead holds out a further 5000 training images as a validation set,
trains on the remainder and reports on it (for choosing MKD's settings without the test split);
its rows go to ``quality_tune.csv``.

Every finished run is appended to the CSV at once, and runs already there are skipped, so an
interrupted study resumes where it stopped.

Usage:
    python benchmarks/quality.py --quick              # ~5 minutes: tiny schedule, 1 seed, 5 configs
    nohup nice -n 5 python benchmarks/quality.py &    # the full study (see results/README.md)
    python benchmarks/quality.py --report             # tables + trajectory PNG from the CSV only
"""
import argparse
import ast
import csv
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MEAN, STD, TRAIN_GEOMETRY, accuracy, cache_dir, cnn_student, evaluate,  # noqa: E402
                    fashion_mnist_root, make_loader, teacher_model, vit_student)
from timm_mkd.config import META_VIEWS, meta_views_for  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'results')
DEFAULT_WARMUP = 0.05  # warm-up fraction; schedules name any other value
# Student training augmentation: RandAugment policy (None: none), mixup alpha, cutmix alpha, label smoothing.
# 'strong' is the study's recipe; schedules name any other.
AUGS = {'strong': ('rand-m9-mstd0.5', 0.8, 1.0, 0.1), 'ra': ('rand-m9-mstd0.5', 0.0, 0.0, 0.1),
        'basic': (None, 0.0, 0.0, 0.1), 'heavy': ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1)}
DEFAULT_AUG = 'strong'
FIELDS = ['method', 'tau', 'seed', 'top1', 'tau_t_final', 'tau_s_final', 'meta_steps', 'meta_skipped', 'steps',
          'batch_size', 'wall_s', 'eval_split', 'meta_interval', 'meta_lr', 'schedule', 'variant', 'nll',
          'nll_calibrated', 'teacher', 'timm_mkd_version']
TEACHER_SEED = 1000  # the default draw: the recorded studies' teachers (their cache names carry no suffix)
CONFIGS = [('none', 0.0), ('kd', 1.0), ('kd', 2.0), ('kd', 4.0), ('kd', 8.0), ('mkd', 1.0), ('mkd', 4.0)]


def teacher_draw_suffix(seed):
    """File-name suffix of a teacher draw: '' for the recorded draw (``TEACHER_SEED``), else ``_tsSEED``."""
    return '' if seed == TEACHER_SEED else f'_ts{seed}'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='5-minute version (short schedule, one seed, 5 configs)')
    p.add_argument('--report', action='store_true', help='only write tables and the PNG from the CSV')
    p.add_argument('--tune', action='store_true', help='report on a validation subset of the train split')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--configs', nargs='+', default=None, help='e.g. none:0 kd:1 mkd:4 (default: all 7)')
    p.add_argument('--steps', type=int, default=1000, help='optimizer updates per student run')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--train-images', type=int, default=0,
                   help='the student trains on a fixed random subset of this many images (0: all); the teacher and '
                        'the meta set are unchanged (a small-data study: many epochs over few labels)')
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--warmup', type=float, default=DEFAULT_WARMUP, help='warm-up fraction of the steps')
    p.add_argument('--aug', choices=sorted(AUGS), default=DEFAULT_AUG,
                   help="student augmentation: 'strong' RandAugment m9 + mixup 0.8 + cutmix 1.0, 'ra' RandAugment "
                        "only, 'basic' crop/flip only (label smoothing 0.1 in all)")
    p.add_argument('--scale-min', type=float, default=TRAIN_GEOMETRY['scale'][0],
                   help='student: lower bound of the random-resized-crop scale (0.08: DeiT-style crops)')
    p.add_argument('--reprob', type=float, default=0.0, help='student: random erasing probability')
    p.add_argument('--teacher-recipe', choices=('mild', 'student'), default='mild',
                   help="mild: crops from 0.8 and flips only; student: the student's RandAugment, crop scale and "
                        "random erasing (no mixup)")
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    p.add_argument('--depth', type=int, default=4)
    p.add_argument('--dim', type=int, default=64)
    p.add_argument('--img-size', type=int, default=28)
    p.add_argument('--student', choices=('vit', 'cnn'), default='vit',
                   help='vit: the ViT above (required study); cnn: a small timm ResNet of width --cnn-width '
                        '(second study; its files get the suffix _cnn)')
    p.add_argument('--cnn-width', type=int, default=16)
    p.add_argument('--teacher', default='resnet10t')
    p.add_argument('--teacher-epochs', type=int, default=1)
    p.add_argument('--teacher-steps', type=int, default=160, help='cap on teacher updates (batch 128)')
    p.add_argument('--teacher-images', type=int, default=0,
                   help='the teacher trains on a fixed random subset of this many of its images (0: all): with many '
                        'epochs it overfits them and becomes overconfident (held-out calibrated tau above 1)')
    p.add_argument('--teacher-seed', type=int, default=TEACHER_SEED,
                   help='seed of the teacher\'s initialisation and data order: another draw of the same teacher recipe '
                        '(cached under its own name)')
    p.add_argument('--teacher-only', action='store_true', help='train / load the cached teacher and stop')
    p.add_argument('--teacher-sha', default=None,
                   help="--report: the teacher hash whose rows to tabulate (default: the cached teacher's; '' = rows "
                        "from before teacher hashes were recorded)")
    p.add_argument('--meta-fraction', type=float, default=0.05)
    p.add_argument('--meta-batch-size', type=int, default=64)
    p.add_argument('--meta-interval', type=int, default=None, help="MKD meta interval (default: MKDTask's)")
    p.add_argument('--meta-lr', type=float, default=None, help="MKD meta lr (default: MKDTask's)")
    p.add_argument('--meta-views', choices=META_VIEWS, default='auto',
                   help="MKD meta batches seen with the students' training augmentation (train: crop, flip and the "
                        "study's RandAugment; hard labels, no mixup) or eval transforms; auto: the library's choice "
                        "for the estimator (train for calibration). Recorded in 'variant' when set")
    p.add_argument('--fixed-tau-s', action='store_true', help='MKD learns tau_t only (tau_s stays at its initial value)')
    p.add_argument('--mkd-kw', nargs='+', default=[], metavar='KEY=VALUE',
                   help="more MKDTask arguments, e.g. estimator=calibration meta_optimizer=sgd (recorded in 'variant')")
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: on a shared 2-core machine, 2 threads oversubscribe and run ~10x slower)')
    p.add_argument('--csv', default=None, help='output CSV (default results/quality.csv, quality_quick.csv, quality_tune.csv)')
    p.add_argument('--tag', default='', help='suffix for the CSV / trajectory folder names')
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds if '--seeds' in (argv or sys.argv) else [0]
        args.steps = 120 if '--steps' not in (argv or sys.argv) else args.steps
        args.teacher_epochs = 1 if '--teacher-epochs' not in (argv or sys.argv) else args.teacher_epochs
        args.configs = args.configs or ['none:0', 'kd:1', 'kd:4', 'mkd:1', 'mkd:4']
    if args.student == 'cnn' and not args.tag:
        args.tag = '_cnn'
    name = 'quality' + ('_quick' if args.quick else '') + ('_tune' if args.tune else '') + args.tag
    args.csv = args.csv or os.path.join(RESULTS, name + '.csv')
    args.traj_dir = os.path.join(RESULTS, 'trajectories' + ('_quick' if args.quick else '') + ('_tune' if args.tune else '') + args.tag)
    args.name = name
    return args


def mkd_defaults():
    import inspect
    from timm_mkd import MKDTask
    sig = inspect.signature(MKDTask.__init__).parameters
    return sig['meta_interval'].default, sig['meta_lr'].default


# ----------------------------------------------------------------------------------- data
def datasets(args):
    from timm.data import create_dataset
    from timm_mkd.data.meta_data import IndexSubset, split_holdout
    root = fashion_mnist_root()
    train_full = create_dataset('torch/fashion_mnist', root=root, split='train', is_training=True)
    meta_full = create_dataset('torch/fashion_mnist', root=root, split='train', is_training=False)
    train_set, meta_set = split_holdout(train_full, meta_full, fraction=args.meta_fraction, seed=0)
    teacher_idx = train_set.indices
    if args.tune:
        rng = np.random.RandomState(1234)
        idx = np.array(train_set.indices)[rng.permutation(len(train_set.indices))]
        val_idx, train_idx = sorted(idx[:5000].tolist()), sorted(idx[5000:].tolist())
        eval_set = IndexSubset(create_dataset('torch/fashion_mnist', root=root, split='train', is_training=False), val_idx)
        train_set = IndexSubset(train_full, train_idx)
        # The teacher must not have seen the validation images either: a teacher that memorised them hands the
        # student their labels through its targets, and the sharper the target (lower tau) the more (measured: the leak raised low-tau rows on validation).
        teacher_idx = train_idx
    else:
        eval_set = create_dataset('torch/fashion_mnist', root=root, split='test', is_training=False)
    if getattr(args, 'teacher_images', 0):
        teacher_idx = fixed_subset(teacher_idx, args.teacher_images, seed=5678)
    teacher_train = IndexSubset(create_dataset('torch/fashion_mnist', root=root, split='train', is_training=True),
                                teacher_idx)
    if getattr(args, 'train_images', 0):
        train_set = IndexSubset(train_full, fixed_subset(train_set.indices, args.train_images, seed=4321))
    return train_set, meta_set, teacher_train, eval_set


def fixed_subset(indices, n, seed):
    """``n`` of ``indices``, drawn by a fixed seed, sorted (the same subset on every machine and run)."""
    keep = np.random.RandomState(seed).permutation(len(indices))[:n]
    return sorted(np.array(indices)[keep].tolist())


# ----------------------------------------------------------------------------------- teacher
def get_teacher(args, teacher_train, eval_loader):
    """Train the teacher once (plain aug, no RandAugment / mixup) and cache it."""
    path = teacher_path(args)
    meta = path + '.json'
    if os.path.isfile(path) and os.path.isfile(meta):
        state = torch.load(path, map_location='cpu', weights_only=True)
        model = teacher_model(args.teacher)
        model.load_state_dict(state)
        info = json.load(open(meta))
        args.teacher_sha = state_dict_sha(state)
        print(f'teacher {args.teacher} from cache {path} (sha256 {args.teacher_sha}): top-1 {info["top1"]:.4f}', flush=True)
        return model.eval(), info
    # Seeded before the model is built: torch's default generator starts from a random seed in each process, so
    # the initialisation, like the data order, must come from the draw's seed for a teacher to be reproducible.
    torch.manual_seed(args.teacher_seed)
    np.random.seed(args.teacher_seed)
    model = teacher_model(args.teacher).to(args.device)
    loader = make_loader(teacher_train, 128, training=True, img_size=args.img_size, **teacher_recipe(args))
    steps = min(args.teacher_epochs * len(loader), args.teacher_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    step = 0
    for epoch in range(args.teacher_epochs):
        for x, y in loader:
            if step >= steps:
                break
            loss = F.cross_entropy(model(x.to(args.device)), y.to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f'teacher step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)', flush=True)
    top1 = accuracy(model, eval_loader, args.device) if not args.tune else float("nan")
    info = {'model': args.teacher, 'epochs': args.teacher_epochs, 'steps': steps, 'top1': top1,
            'train_s': time.time() - t0, 'params_m': sum(p.numel() for p in model.parameters()) / 1e6}
    model = model.cpu()
    torch.save(model.state_dict(), path)
    json.dump(info, open(meta, 'w'))
    args.teacher_sha = state_dict_sha(model.state_dict())
    print(f'teacher {args.teacher}: top-1 {top1:.4f} after {steps} steps ({info["train_s"]:.0f}s), cached at {path}', flush=True)
    return model.eval(), info


def teacher_path(args):
    tune = '_noval' if getattr(args, 'tune', False) else ''  # --tune: trained without the validation images
    images = f'_n{args.teacher_images}' if getattr(args, 'teacher_images', 0) else ''
    recipe = '' if getattr(args, 'teacher_recipe', 'mild') == 'mild' else '_' + student_recipe_name(args)
    draw = teacher_draw_suffix(getattr(args, 'teacher_seed', TEACHER_SEED))
    return os.path.join(cache_dir('bench'), f'teacher_{args.teacher}_e{args.teacher_epochs}_s{args.teacher_steps}_b128_f{args.meta_fraction}{images}{recipe}{draw}{tune}.pth')


def student_recipe(args):
    """``make_loader`` keywords of the student's training views (RandAugment, crop scale, random erasing)."""
    return dict(aa=AUGS[getattr(args, 'aug', DEFAULT_AUG)][0], re_prob=getattr(args, 'reprob', 0.0),
                scale=(getattr(args, 'scale_min', TRAIN_GEOMETRY['scale'][0]), 1.0))


def teacher_recipe(args):
    """``make_loader`` keywords of the teacher's training views: mild crops, or the student's recipe."""
    return student_recipe(args) if getattr(args, 'teacher_recipe', 'mild') == 'student' else {}


def student_recipe_name(args):
    r = student_recipe(args)
    return f"{r['aa'] or 'noaa'}-sc{r['scale'][0]:g}-re{r['re_prob']:g}"


def meta_train_transform(args):
    """The student's training views for ``build_meta_loader(train_transform=...)`` (no erasing, no mixup)."""
    r = student_recipe(args)
    return dict(TRAIN_GEOMETRY, auto_augment=r['aa'], scale=r['scale'])


def state_dict_sha(state, n=8):
    """First ``n`` hex digits of the sha256 of a (CPU) state dict's names and tensor bytes."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:n]


def weights_sha(path, n=8):
    """``state_dict_sha`` of the state dict saved at ``path``.

    Not of the file: torch.save writes a random serialization id into every file, so one teacher saved twice gets
    two file hashes. (Rows recorded before this hash carry the file's.)
    """
    return state_dict_sha(torch.load(path, map_location='cpu', weights_only=True), n)


# ----------------------------------------------------------------------------------- student
def run_student(args, method, tau, seed, teacher, train_set, meta_set, eval_loader, probe=None):
    """One student run; ``probe(step, optimizer, task)``, if given, is called after every update and stops the run
    early by returning True (diagnostics such as ``adam_state.py``)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.task import LogitDistillationTask
    from timm_mkd import MKDTask, __version__ as timm_mkd_version
    from timm_mkd.data.meta_data import build_meta_loader
    from timm_mkd.meta_log import TemperatureLog

    torch.manual_seed(seed)
    np.random.seed(seed)
    import random
    random.seed(seed)
    if args.student == 'cnn':
        student = cnn_student(width=args.cnn_width)
    else:
        student = vit_student(img_size=args.img_size, depth=args.depth, dim=args.dim, heads=max(1, args.dim // 32))
    device = torch.device(getattr(args, 'device', 'cpu'))
    student = student.to(device)
    teacher = teacher.to(device)
    criterion = SoftTargetCrossEntropy()
    optimizer = create_optimizer_v2(student, opt='adamw', lr=args.lr, weight_decay=0.05)
    warm = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, args.steps - warm)))))
    task = None
    log = None
    if method == 'kd':
        task = LogitDistillationTask(student, teacher, criterion=criterion, temperature=tau, verbose=False,
                                     device=device)
    elif method == 'mkd':
        kw, overrides = {'tau_t': tau}, mkd_kwargs(args)
        # MKDConfig starts a learned student temperature at tau_t and a held one at 1; --fixed-tau-s holds it at tau.
        if args.fixed_tau_s:
            kw.update(tau_s=tau, learn_tau_s=False)
        if args.meta_interval is not None:
            kw['meta_interval'] = args.meta_interval
        if args.meta_lr is not None:
            kw['meta_lr'] = args.meta_lr
        kw.update(overrides)
        task = MKDTask(student, teacher, criterion=criterion, student_mean=MEAN,
                       student_std=STD, verbose=False, device=device, **kw)
        # 'train' views: the held-out images as the student sees its training batches (without mixup).
        views = meta_views_for(task.config.estimator, getattr(args, 'meta_views', 'auto'))
        train_transform = meta_train_transform(args) if views == 'train' else None
        meta_batches = build_meta_loader(meta_set, input_size=(1, args.img_size, args.img_size),
                                         batch_size=args.meta_batch_size, mean=MEAN, std=STD, crop_pct=1.0,
                                         seed=seed, train_transform=train_transform)
        task.attach(optimizer, meta_batches)
        os.makedirs(args.traj_dir, exist_ok=True)
        tpath = os.path.join(args.traj_dir, f'mkd_tau{tau:g}_N{task.meta_interval}_lr{task.meta_optimizer.param_groups[0]["lr"]:g}'
                                            f'{variant_name(args, sep="_")}_seed{seed}.csv')
        if os.path.exists(tpath):
            os.remove(tpath)
        log = TemperatureLog(tpath)
        start_t, start_s = task.temperatures()
        log.record({'step': 0, 'tau_t': start_t, 'tau_s': start_s})
        task.add_meta_callback(log.record)
    if task is not None:
        task.train()
    student.train()
    aa, mix_alpha, cut_alpha, smoothing = AUGS[getattr(args, 'aug', DEFAULT_AUG)]
    # Without mixup and cutmix the same Mixup object gives the smoothed one-hot targets (it never mixes).
    mixup = Mixup(mixup_alpha=mix_alpha or 0.8, cutmix_alpha=cut_alpha or 1.0, label_smoothing=smoothing,
                  prob=1.0 if mix_alpha or cut_alpha else 0.0, num_classes=10)
    torch.manual_seed(seed)  # the loader's base seed (augmentation, order): identical across methods
    loader = make_loader(train_set, args.batch_size, training=True, img_size=args.img_size, **student_recipe(args))
    t0 = time.time()
    step = 0
    losses = []
    stopped = False
    while step < args.steps and not stopped:
        for x, y in loader:
            if step >= args.steps:
                break
            x, y = mixup(x.to(device), y.to(device))
            if task is None:
                loss = criterion(student(x), y)
            else:
                loss = task(x, y)['loss']
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if probe is not None and probe(step, optimizer, task):
                stopped = True
                break
            if step % 100 == 0:
                extra = ''
                if method == 'mkd':
                    extra = ' tau_t %.3f tau_s %.3f' % task.temperatures()
                print(f'  [{method} tau {tau:g} seed {seed}] step {step}/{args.steps} loss '
                      f'{sum(losses[-100:]) / len(losses[-100:]):.3f}{extra} ({time.time() - t0:.0f}s)', flush=True)
    train_s = time.time() - t0
    top1, nll, nll_cal = evaluate(student, eval_loader, device)
    row = dict(method=method, tau=tau, seed=seed, top1=round(100 * top1, 2), nll=round(nll, 4),
               nll_calibrated=round(nll_cal, 4), steps=step, batch_size=args.batch_size,
               wall_s=round(train_s, 1), eval_split='val' if args.tune else 'test', schedule=schedule_sig(args),
               tau_t_final='', tau_s_final='', meta_steps='', meta_skipped='', meta_interval='', meta_lr='',
               variant=variant_name(args) if method == 'mkd' else '', teacher=getattr(args, 'teacher_sha', ''),
               timm_mkd_version=timm_mkd_version)
    if method == 'mkd':
        tt, ts = task.temperatures()
        row.update(tau_t_final=round(tt, 4), tau_s_final=round(ts, 4), meta_steps=task.meta_steps,
                   meta_skipped=task.meta_skipped, meta_interval=task.meta_interval,
                   meta_lr=task.meta_optimizer.param_groups[0]['lr'])
        task.detach()
        log.close()
    elif method == 'kd':
        row.update(tau_t_final=tau, tau_s_final=tau)
    return row


def mkd_kwargs(args):
    """``--mkd-kw`` as MKDTask keyword arguments (numbers parsed, anything else kept as a string)."""
    out = {}
    for item in args.mkd_kw:
        key, sep, value = item.partition('=')
        if not sep:
            raise SystemExit(f"--mkd-kw {item!r}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def variant_name(args, sep=', '):
    """The MKD settings besides interval and lr that differ from MKDTask's defaults, for the CSV and file names."""
    import inspect
    from timm_mkd import MKDTask
    kw = mkd_kwargs(args)
    views_given = getattr(args, 'meta_views', 'auto') != 'auto'
    if not kw and not args.fixed_tau_s and args.meta_interval is None and args.meta_lr is None and not views_given:
        return 'defaults' if sep == ', ' else sep + 'defaults'  # the library's defaults, only the initial tau set
    # Otherwise named in full, so rows stay comparable when the library default changes.
    params = inspect.signature(MKDTask).parameters
    for key in ('tie_temperatures',):
        kw.setdefault(key, params[key].default if key in params else None)
    parts = (['fixed-tau-s'] if args.fixed_tau_s else []) + ([f'meta-views={args.meta_views}'] if views_given else []) \
        + [f'{k}={v}' for k, v in sorted(kw.items())]
    return sep.join(parts) if sep == ', ' else ''.join(sep + x for x in parts)


def schedule_sig(args):
    net = f'cnn-w{args.cnn_width}' if getattr(args, 'student', 'vit') == 'cnn' else f'vit-d{args.depth}-w{args.dim}'
    # The teacher's file hash: a teacher retrained on another machine differs (83.0% vs 83.9% top-1 seen), and
    # rows distilled from different teachers must not be paired. Rows from before the hash have none.
    sha = getattr(args, 'teacher_sha', '')
    images = f'/n{args.train_images}' if getattr(args, 'train_images', 0) else ''
    warmup = f'/wu{args.warmup:g}' if getattr(args, 'warmup', DEFAULT_WARMUP) != DEFAULT_WARMUP else ''
    aug = f'/aug-{args.aug}' if getattr(args, 'aug', DEFAULT_AUG) != DEFAULT_AUG else ''
    if getattr(args, 'scale_min', TRAIN_GEOMETRY['scale'][0]) != TRAIN_GEOMETRY['scale'][0] or getattr(args, 'reprob', 0.0):
        aug += f'/sc{args.scale_min:g}-re{args.reprob:g}'
    if getattr(args, 'teacher_recipe', 'mild') != 'mild':
        aug += f'/teacher-{args.teacher_recipe}'
    if getattr(args, 'teacher_images', 0):
        aug += f'/teacher-n{args.teacher_images}-e{args.teacher_epochs}'
    return (f'{net}-{args.img_size}px/{args.steps}x{args.batch_size}{images}/lr{args.lr:g}{warmup}{aug}'
            f'/{args.teacher}-s{args.teacher_steps}' + (f'-{sha}' if sha else ''))


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def append_row(path, row, fields=None):
    """Append ``row`` to the CSV at ``path`` (columns ``fields``, default ``FIELDS``), flushed to disk at once."""
    fields = fields or FIELDS
    rows = read_rows(path)
    if rows and list(rows[0]) != fields:  # a CSV from before a column was added: rewrite it with every column
        with open(path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows({k: r.get(k) or '' for k in fields} for r in rows)
    new = not os.path.isfile(path)
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, '') for k in fields})
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------- report
def _ms(values):
    if not values:
        return 'n/a'
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else float('nan')
    return f'{m:.2f} ± {s:.2f}' if len(values) > 1 else f'{m:.2f}'


_SHORT = {'tie_temperatures=True': 'tied', 'tie_temperatures=False': 'free', 'hypergrad_mode=full': 'full',
          'hypergrad_mode=shape': 'shape', 'meta_loss=ce': 'CE', 'meta_loss=calibrated': 'calibrated CE',
          'learn_tau_t=False': 'tau_t fixed', 'learn_tau_s=False': 'tau_s fixed'}


def short_variant(variant):
    """``variant`` for tables: 'tied, full, CE' instead of the MKDTask keyword spelling kept in the CSV."""
    return ', '.join(_SHORT.get(p, p) for p in variant.split(', ') if p)


def report(args):
    rows = [r for r in read_rows(args.csv) if r['schedule'] == schedule_sig(args)]
    if not rows:
        print(f'no rows in {args.csv}')
        return ''
    order = {c: i for i, c in enumerate(CONFIGS)}
    groups = {}
    for r in rows:
        key = (r['method'], float(r['tau']))
        if r['method'] == 'mkd':
            key += (f"N={r['meta_interval']}, lr={float(r['meta_lr']):g}" + (f", {short_variant(r['variant'])}" if r.get('variant') else ''),)
        groups.setdefault(key, []).append(r)
    keys = sorted(groups, key=lambda k: (order.get(k[:2], 99), k))
    lines = [f'Schedule: `{rows[0]["schedule"]}`, top-1 on the {rows[0]["eval_split"]} split (%).', '',
             '| method | tau (fixed / initial) | n | top-1 mean ± std | per seed | final tau_t | final tau_s | wall s / run |',
             '|---|---|---|---|---|---|---|---|']
    by_seed = {}
    for k in keys:
        g = sorted(groups[k], key=lambda r: int(r['seed']))
        top = [float(r['top1']) for r in g]
        for r in g:
            by_seed.setdefault(int(r['seed']), {})[k] = float(r['top1'])
        tt = [float(r['tau_t_final']) for r in g if r['tau_t_final'] not in ('', None)]
        ts = [float(r['tau_s_final']) for r in g if r['tau_s_final'] not in ('', None)]
        ws = [float(r['wall_s']) for r in g]
        lines.append(f'| {k[0]}{" (" + k[2] + ")" if len(k) > 2 else ""} | {"-" if k[0] == "none" else f"{k[1]:g}"} | {len(g)} | {_ms(top)} | '
                     f'{", ".join(f"{t:.2f}" for t in top)} | {_ms(tt) if k[0] == "mkd" else "-"} | '
                     f'{_ms(ts) if k[0] == "mkd" else "-"} | {statistics.mean(ws):.0f} |')
    # Paired differences: each configuration minus kd tau 4 at the same seed.
    ref = ('kd', 4.0)
    if any(ref in d for d in by_seed.values()):
        lines += ['', f'Paired difference to timm\'s default (kd, tau 4) at the same seed (points):', '',
                  '| method | tau | n | mean ± std |', '|---|---|---|---|']
        for k in keys:
            if k == ref:
                continue
            d = [v[k] - v[ref] for v in by_seed.values() if k in v and ref in v]
            if d:
                lines.append(f'| {k[0]}{" (" + k[2] + ")" if len(k) > 2 else ""} | {"-" if k[0] == "none" else f"{k[1]:g}"} | {len(d)} | {_ms(d)} |')
    text = '\n'.join(lines) + '\n'
    md = os.path.splitext(args.csv)[0] + '.md'
    with open(md, 'w') as f:
        f.write(text)
    print(text)
    # Trajectory plot: one panel per MKD configuration, every seed in it.
    if os.path.isdir(args.traj_dir):
        png = os.path.join(RESULTS, os.path.basename(args.traj_dir).replace('trajectories', 'temperatures') + '.png')
        if plot_grouped_trajectories(args.traj_dir, png):
            print(f'wrote {png}')
    return text


def plot_grouped_trajectories(traj_dir, png):
    """Panels by configuration (file name without ``_seedN``): tau_t solid, tau_s dashed, one colour per seed."""
    import re
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from timm_mkd.plot import read_temperatures
    groups = {}
    for name in sorted(os.listdir(traj_dir)):
        m = re.match(r'(.*)_seed(\d+)\.csv$', name)
        if m:
            groups.setdefault(m.group(1), []).append((int(m.group(2)), os.path.join(traj_dir, name)))
    if not groups:
        return False
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, (config, runs) in zip(axes.flat, groups.items()):
        for seed, path in runs:
            log = read_temperatures(path)
            colour = f'C{seed}'
            ax.plot(log['step'], log['tau_t'], color=colour, lw=1.4, label=f'seed {seed} tau_t')
            ax.plot(log['step'], log['tau_s'], color=colour, lw=1.4, ls='--', label=f'seed {seed} tau_s')
        m = re.match(r'mkd_tau([0-9.]+)_N([0-9]+)_lr([0-9.e-]+)_?(.*)$', config)
        if m:
            variant = re.findall(r'fixed-tau-s|[a-z][a-z_]*?=[^_]+', m.group(4))
            title = f'from tau {m.group(1)}, N={m.group(2)}, lr={m.group(3)}, {short_variant(", ".join(variant))}'
        else:
            title = config
        ax.set_title(title, fontsize=8)
        ax.set_yscale('log')
        ax.set_yticks([0.5, 1, 2, 4, 8, 16])
        ax.set_yticklabels(['0.5', '1', '2', '4', '8', '16'])
        ax.grid(alpha=0.3)
        ax.set_xlabel('optimizer update', fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis('off')
    axes[0][0].set_ylabel('temperature')
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle('MKD temperatures per configuration: tau_t solid, tau_s dashed (tied runs: one line)', fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def prepare_study(args):
    """Data, the reporting loader and the cached (or newly trained) teacher, frozen, for one study configuration.

    Returns:
        ``(train_set, meta_set, eval_loader, teacher)``; ``args.teacher_sha`` is set.
    """
    from timm_mkd.augment_compat import fix_posterize_zero_bits
    fix_posterize_zero_bits()  # the -inc1 RandAugment under Pillow >= 13
    train_set, meta_set, teacher_train, eval_set = datasets(args)
    eval_loader = make_loader(eval_set, 500, training=False, img_size=args.img_size)
    # The teacher's own top-1 is always measured on the test split (it never sees the validation images).
    teacher, _ = get_teacher(args, teacher_train, make_loader(
        datasets(argparse.Namespace(**{**vars(args), 'tune': False}))[3], 500, training=False, img_size=args.img_size)
        if args.tune else eval_loader)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return train_set, meta_set, eval_loader, teacher


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS, exist_ok=True)
    if args.report:
        if args.teacher_sha is None and os.path.isfile(teacher_path(args)):
            args.teacher_sha = weights_sha(teacher_path(args))
        report(args)
        return 0
    configs = CONFIGS
    if args.configs:
        configs = [(c.split(':')[0], float(c.split(':')[1])) for c in args.configs]
    interval, lr = mkd_defaults()
    print(f'quality study -> {args.csv}; configs {configs}, seeds {args.seeds}, {args.steps} steps x {args.batch_size}; '
          f'MKD meta interval {args.meta_interval or interval}, meta lr {args.meta_lr or lr}', flush=True)
    train_set, meta_set, eval_loader, teacher = prepare_study(args)
    if args.teacher_only:
        return 0
    sig = schedule_sig(args)
    mi = str(args.meta_interval or interval)
    ml = str(float(args.meta_lr or lr))
    done = {(r['method'], float(r['tau']), int(r['seed'])) for r in read_rows(args.csv) if r['schedule'] == sig
            and (r['method'] != 'mkd' or (r['meta_interval'] == mi and str(float(r['meta_lr'])) == ml
                                          and (r.get('variant') or '') == variant_name(args)))}
    t_start = time.time()
    # Seed-major order: a partial study has complete seeds of every configuration.
    for seed in args.seeds:
        for method, tau in configs:
            if (method, tau, seed) in done:
                print(f'skip {method} tau {tau:g} seed {seed} (in {args.csv})', flush=True)
                continue
            row = run_student(args, method, tau, seed, teacher, train_set, meta_set, eval_loader)
            append_row(args.csv, row)
            print(f'DONE {method} tau {tau:g} seed {seed}: top-1 {row["top1"]:.2f} tau_t {row["tau_t_final"]} '
                  f'tau_s {row["tau_s_final"]} ({row["wall_s"]:.0f}s; total {time.time() - t_start:.0f}s)', flush=True)
    report(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
