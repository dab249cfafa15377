"""Diagnostic: measured the signal-to-noise ratio of the look-ahead estimator's one-step hypergradient.

Trains the quality benchmark's student with fixed-temperature KD (MKD hooks on, meta lr ~0 so
the temperatures do not move) for ``--warm`` steps, then runs a meta step after every update
for ``--probe`` updates and records d L_meta / d log tau per meta step. Each probe uses a new
training batch (new look-ahead) and a new held-out meta batch, as the real meta steps do.

Reports per meta batch size: mean, std and SNR = |mean| / std of each component, and how many
meta steps an average needs before its standard error falls below |mean| (~1 / SNR^2).
Writes ``benchmarks/results/hypergrad_snr.csv``. Uses the train split and its held-out meta fraction only.

    python benchmarks/diagnostics/hypergrad_snr.py               # ~3-5 minutes on 2 CPU cores
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: common, quality
import quality  # noqa: E402
from common import MEAN, STD, make_loader  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--tau', type=float, nargs=2, default=[4.0, 4.0], help='(tau_t, tau_s), held fixed')
    p.add_argument('--warm', type=int, default=300)
    p.add_argument('--probe', type=int, default=40)
    p.add_argument('--meta-batch-sizes', type=int, nargs='+', default=[64, 256])
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = quality.parse_args(['--steps', str(a.warm + a.probe)])
    train_set, meta_set, teacher_train, eval_set = quality.datasets(args)
    teacher, _ = quality.get_teacher(args, teacher_train, None)
    for q in teacher.parameters():
        q.requires_grad_(False)

    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm_mkd import MKDTask
    from timm_mkd.data.meta_data import build_meta_loader
    from common import vit_student

    rows = []
    for mbs in a.meta_batch_sizes:
        torch.manual_seed(a.seed)
        np.random.seed(a.seed)
        student = vit_student(depth=args.depth, dim=args.dim, heads=max(1, args.dim // 32))
        optimizer = create_optimizer_v2(student, opt='adamw', lr=args.lr, weight_decay=0.05)
        task = MKDTask(student, teacher, criterion=SoftTargetCrossEntropy(), tau_t=a.tau[0], tau_s=a.tau[1],
                       meta_interval=10 ** 9, meta_lr=1e-12, student_mean=MEAN, student_std=STD, verbose=False)
        meta = build_meta_loader(meta_set, input_size=(1, 28, 28), batch_size=mbs, mean=MEAN, std=STD,
                                 crop_pct=1.0, seed=a.seed)
        task.attach(optimizer, meta)
        recs = []
        task.add_meta_callback(recs.append)
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
        torch.manual_seed(a.seed)
        loader = make_loader(train_set, args.batch_size, training=True, aa='rand-m9-mstd0.5')
        step, t0 = 0, time.time()
        while step < a.warm + a.probe:
            for x, y in loader:
                if step == a.warm:
                    task.meta_interval = 1  # from here on: a meta step after every update
                if step >= a.warm + a.probe:
                    break
                x, y = mixup(x, y)
                loss = task(x, y)['loss']
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        for k, name in ((0, 'hypergrad_t'), (1, 'hypergrad_s')):
            v = [r[name] for r in recs if not r['skipped']]
            m, s = statistics.mean(v), statistics.stdev(v)
            snr = abs(m) / s if s > 0 else float('inf')
            rows.append({'tau_t': a.tau[0], 'tau_s': a.tau[1], 'warm_steps': a.warm, 'meta_batch_size': mbs,
                         'component': name, 'n': len(v), 'mean': m, 'std': s, 'snr': snr,
                         'meta_steps_for_se_below_mean': (1 / snr ** 2) if snr > 0 else float('inf'),
                         'frac_positive': sum(x > 0 for x in v) / len(v)})
            print(f'meta batch {mbs} {name}: mean {m:.3e} std {s:.3e} SNR {snr:.3f} (n={len(v)}, '
                  f'{time.time() - t0:.0f}s)', flush=True)
    out = os.path.join(quality.RESULTS, 'hypergrad_snr.csv')
    for row in rows:
        quality.append_row(out, row, fields=list(rows[0]))
    print(f'appended to {out}')


if __name__ == '__main__':
    main()
