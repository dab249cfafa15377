"""Diagnostic: measured the meta step's one-step hypergradient against the true derivative at longer horizons.

Validation split only (``quality.py --tune`` data: 5000 training images held out for reporting,
the 5% meta fraction for the estimators). For one fixed-temperature KD run (tied ``tau``, timm's
``T^2`` loss) and a few checkpoints along it:

* **truth at horizon h**: from the checkpoint, two branches train on the *same* batches (same
  augmentation and mixup draws) with ``tau * exp(+delta)`` and ``tau * exp(-delta)``; after h more
  updates (h = ``--horizons``, ``end`` = the rest of the schedule, LR annealed to 0) both are
  evaluated on the validation images. ``(metric(+) - metric(-)) / 2 delta`` is the finite-difference
  derivative of that metric w.r.t. ``log tau`` at horizon h. Top-1 is what the grid ranks; the
  calibrated NLL is its smooth companion.
* **estimator**: at the same checkpoint, the look-ahead meta step's hypergradient
  (``timm_mkd.meta.meta_step.finite_difference_hypergradient``, its meta loss the cross-entropy at the batch's best
  logit scale; rows named ``onestep:calibrated``) on ``--pairs`` (training batch, meta batch) pairs, each after
  one real optimizer update from the checkpoint; mean and standard error of the tied derivative
  ``d L_meta / d log tau`` (sum of the two components).

A positive loss-derivative means "a higher tau is worse". The one-step estimator is unbiased for
h = 1; the question is whether its sign survives to the end of training.

Rows are appended to ``benchmarks/results/horizon.csv`` (and ``horizon_cnn.csv``) as they finish.

Usage:
    python benchmarks/diagnostics/horizon.py --tau 4 --seed 0
    python benchmarks/diagnostics/horizon.py --tau 1 --seed 0 --student cnn
"""
import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: common, quality
import quality  # noqa: E402
from common import evaluate, make_loader  # noqa: E402

#: The ``name`` of the estimator rows: the one-step look-ahead with the calibrated meta loss.
ESTIMATOR = 'onestep:calibrated'
FIELDS = ['student', 'tau', 'seed', 'checkpoint', 'kind', 'name', 'horizon', 'value', 'stderr', 'plus', 'minus',
          'delta', 'n', 'wall_s']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tau', type=float, default=4.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--student', choices=('vit', 'cnn'), default='vit')
    p.add_argument('--checkpoints', type=int, nargs='+', default=[100, 400])
    p.add_argument('--horizons', nargs='+', default=['1', '10', '50', '200', 'end'])
    p.add_argument('--delta', type=float, default=0.35, help='log-tau perturbation of the two branches')
    p.add_argument('--pairs', type=int, default=8, help='(train, meta) batch pairs for the estimator')
    p.add_argument('--no-truth', action='store_true', help='the estimator only')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--csv', default=None)
    a = p.parse_args(argv)
    q = quality.parse_args(['--tune', '--student', a.student])
    a.q = q
    a.csv = a.csv or os.path.join(quality.RESULTS, 'horizon' + ('_cnn' if a.student == 'cnn' else '') + '.csv')
    return a


def append(path, row):
    quality.append_row(path, row, FIELDS)


def build(q, seed):
    """Student, optimizer, LR schedule exactly as ``quality.run_student`` builds them."""
    from timm.optim import create_optimizer_v2
    from common import cnn_student, vit_student
    torch.manual_seed(seed)
    student = (cnn_student(width=q.cnn_width) if q.student == 'cnn' else
               vit_student(img_size=q.img_size, depth=q.depth, dim=q.dim, heads=max(1, q.dim // 32)))
    opt = create_optimizer_v2(student, opt='adamw', lr=q.lr, weight_decay=0.05)
    warm = max(1, int(q.warmup * q.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, q.steps - warm)))))
    return student.train(), opt, sched


def batches(q, seed, train_set, teacher):
    """Every training batch of the run (after mixup) with its teacher logits, drawn as quality.py draws them."""
    from timm.data import Mixup
    import random
    np.random.seed(seed)
    random.seed(seed)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    torch.manual_seed(seed)
    loader = make_loader(train_set, q.batch_size, training=True, img_size=q.img_size, aa='rand-m9-mstd0.5')
    out = []
    while len(out) < q.steps:
        for x, y in loader:
            if len(out) >= q.steps:
                break
            x, y = mixup(x, y)
            with torch.no_grad():
                out.append((x, y, teacher(x)))
    return out


def train_step(student, opt, sched, batch, tau, criterion):
    from timm_mkd.loss import two_temperature_kd_loss
    x, y, zt = batch
    t = torch.tensor(float(tau))
    z = student(x)
    loss = criterion(z, y) + two_temperature_kd_loss(z, zt, t, t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return z


def snapshot(student, opt, sched):
    return copy.deepcopy(student.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())


def restore(state, student, opt, sched):
    student.load_state_dict(state[0])
    opt.load_state_dict(copy.deepcopy(state[1]))
    sched.load_state_dict(state[2])


def estimator(student, opt, theta, batch, meta_x, meta_y, tau, rng_state):
    """d L_meta / d log tau (tied: sum of both components) by the one-step look-ahead."""
    from timm_mkd.meta import meta_step
    x, y, zt = batch
    tb = meta_step.TrainBatch(x, y, zt, rng_state)
    log_tau = torch.tensor(math.log(tau))
    hg = meta_step.finite_difference_hypergradient(student, opt, theta, tb, meta_x, meta_y, (log_tau, log_tau), 1.0)
    return float(hg.grad.sum())


def main(argv=None):
    a = parse_args(argv)
    q = a.q
    torch.set_num_threads(a.threads)
    from timm.loss import SoftTargetCrossEntropy
    from timm_mkd.data.meta_data import build_meta_loader
    from timm_mkd.meta.meta_step import capture_rng_state
    train_set, meta_set, teacher_train, eval_set = quality.datasets(q)
    eval_loader = make_loader(eval_set, 500, training=False, img_size=q.img_size)
    teacher, _ = quality.get_teacher(q, teacher_train, None)
    for p in teacher.parameters():
        p.requires_grad_(False)
    criterion = SoftTargetCrossEntropy()
    t0 = time.time()
    data = batches(q, a.seed, train_set, teacher)
    meta_iter = iter(build_meta_loader(meta_set, input_size=(1, q.img_size, q.img_size), batch_size=q.meta_batch_size,
                                       mean=quality.MEAN, std=quality.STD, crop_pct=1.0, seed=a.seed))
    meta = [next(meta_iter) for _ in range(a.pairs)]
    print(f'{len(data)} batches drawn ({time.time() - t0:.0f}s)', flush=True)
    student, opt, sched = build(q, a.seed)
    base = dict(student=a.student, tau=a.tau, seed=a.seed)
    step = 0
    for c in sorted(a.checkpoints):
        while step < c:
            train_step(student, opt, sched, data[step], a.tau, criterion)
            step += 1
        state = snapshot(student, opt, sched)
        # Estimator: each pair takes one real update from the checkpoint, then estimates.
        t1 = time.time()
        values = []
        for m in range(a.pairs):
            restore(state, student, opt, sched)
            theta = {n: p.detach().clone() for n, p in student.named_parameters()}
            rng = capture_rng_state(torch.device('cpu'))
            train_step(student, opt, sched, data[c + m], a.tau, criterion)
            values.append(estimator(student, opt, theta, data[c + m], meta[m][0], meta[m][1], a.tau, rng))
        mean = float(np.mean(values))
        se = float(np.std(values, ddof=1) / math.sqrt(len(values)))
        append(a.csv, dict(base, checkpoint=c, kind='estimator', name=ESTIMATOR, value=mean, stderr=se,
                           n=len(values), wall_s=round(time.time() - t1, 1)))
        print(f'[tau {a.tau:g} seed {a.seed} ckpt {c}] {ESTIMATOR}: dL/dlogtau {mean:+.4g} ± {se:.2g}', flush=True)
        if a.no_truth:
            restore(state, student, opt, sched)
            continue
        # Truth: two branches on the same batches, evaluated at each horizon.
        horizons = sorted({q.steps - c if h == 'end' else min(int(h), q.steps - c) for h in a.horizons})
        results = {}
        for sign in (+1, -1):
            t1 = time.time()
            restore(state, student, opt, sched)
            tau = a.tau * math.exp(sign * a.delta)
            done = 0
            for h in horizons:
                while done < h:
                    train_step(student, opt, sched, data[c + done], tau, criterion)
                    done += 1
                results[(sign, h)] = evaluate(student, eval_loader)
            print(f'[tau {a.tau:g} seed {a.seed} ckpt {c}] branch {sign:+d} ({time.time() - t1:.0f}s)', flush=True)
        for h in horizons:
            for i, metric in enumerate(('top1', 'nll', 'nll_calibrated')):
                plus, minus = results[(1, h)][i], results[(-1, h)][i]
                scale = 100.0 if metric == 'top1' else 1.0
                append(a.csv, dict(base, checkpoint=c, kind='truth', name=metric, horizon=h, plus=plus * scale,
                                   minus=minus * scale, delta=a.delta,
                                   value=(plus - minus) * scale / (2 * a.delta)))
            print(f'[tau {a.tau:g} seed {a.seed} ckpt {c}] h={h}: top1 +{results[(1, h)][0]:.4f} -{results[(-1, h)][0]:.4f} '
                  f'nll_cal +{results[(1, h)][2]:.4f} -{results[(-1, h)][2]:.4f}', flush=True)
        restore(state, student, opt, sched)
    print(f'done ({time.time() - t0:.0f}s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
