"""Diagnostic: measured the calibration meta step's noise and warm-start spread against the meta batch size.

The calibration estimator's hypergradient depends on the teacher and the meta batch only, not on
the student, so its noise can be measured without training: the teacher's logits on the whole
held-out meta set are computed once, then meta batches of each size are drawn from them.

Per meta batch size B it reports, at several temperatures, the mean, std and SNR = |mean| / std of
d NLL / d log tau_t, and the fraction of batches whose gradient points the same way as the
full-set gradient (how often one meta step moves tau the right way). It also reports the spread
(std of log tau*) of the warm start's solution on W batches of B images, against the full-set
solution. Writes ``benchmarks/results/calibration_noise.csv``. Uses the train split's held-out meta
fraction only (the quality benchmark's teacher and meta set).

    python benchmarks/diagnostics/calibration_noise.py          # ~1 minute on 1 CPU core (teacher forward on 3000 images)
"""
import argparse
import csv
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: common, quality
import quality  # noqa: E402
from common import MEAN, STD  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--meta-batch-sizes', type=int, nargs='+', default=[16, 32, 64, 128, 256])
    p.add_argument('--taus', type=float, nargs='+', default=[8.0, 4.0, 2.0, 1.0])
    p.add_argument('--warm-batches', type=int, nargs='+', default=[1, 2, 4, 8])
    p.add_argument('--draws', type=int, default=200, help='meta batches drawn per size')
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = quality.parse_args([])
    _, meta_set, teacher_train, _ = quality.datasets(args)
    teacher, _ = quality.get_teacher(args, teacher_train, None)

    from timm_mkd.data.meta_data import build_meta_loader
    from timm_mkd.meta.meta_step import calibrated_log_temperature, calibration_hypergradient
    loader = build_meta_loader(meta_set, input_size=(1, args.img_size, args.img_size), batch_size=250, mean=MEAN,
                               std=STD, crop_pct=1.0, seed=a.seed)
    logits, targets, it = [], [], iter(loader)
    with torch.no_grad():
        while sum(len(t) for t in targets) < len(meta_set):
            x, y = next(it)
            logits.append(teacher.eval()(x).double())
            targets.append(y)
    z, y = torch.cat(logits)[:len(meta_set)], torch.cat(targets)[:len(meta_set)]
    n = len(y)
    full_star = float(calibrated_log_temperature(z, y, 0.5, 20.0))
    print(f'meta set {n} images; teacher top-1 {float((z.argmax(-1) == y).double().mean()) * 100:.2f}; '
          f'calibrated tau* {math.exp(full_star):.4f} on the whole set')
    gen = torch.Generator().manual_seed(a.seed)
    grad = lambda idx, tau: float(calibration_hypergradient(
        z[idx], y[idx], (torch.tensor(math.log(tau), dtype=torch.float64), torch.tensor(0.0))).grad[0])
    rows = []
    for b in a.meta_batch_sizes:
        for tau in a.taus:
            full = grad(torch.arange(n), tau)
            g = torch.tensor([grad(torch.randperm(n, generator=gen)[:b], tau) for _ in range(a.draws)])
            m, s = float(g.mean()), float(g.std())
            agree = float(((g > 0) == (full > 0)).double().mean())
            rows.append(dict(kind='gradient', meta_batch_size=b, tau=tau, warm_batches='', mean=m, std=s,
                             snr=abs(m) / s if s > 0 else float('inf'), sign_agreement=agree, full=full))
            print(f'B={b:4d} tau {tau:g}: dNLL/dlog tau mean {m:+.4f} std {s:.4f} SNR {abs(m) / s:.2f}, '
                  f'{agree * 100:.1f}% of batches agree in sign with the whole set ({full:+.4f})', flush=True)
        for w in a.warm_batches:
            if w * b > n:
                continue
            stars = torch.tensor([float(calibrated_log_temperature(z[i], y[i], 0.5, 20.0)) for i in
                                  (torch.randperm(n, generator=gen)[:w * b] for _ in range(a.draws))])
            rows.append(dict(kind='warm_start', meta_batch_size=b, tau='', warm_batches=w,
                             mean=float(stars.mean()), std=float(stars.std()), snr='', sign_agreement='',
                             full=full_star))
            print(f'B={b:4d} warm start on {w} batch(es) ({w * b} images): log tau* {float(stars.mean()):+.4f} '
                  f'std {float(stars.std()):.4f} (tau* x/÷ {math.exp(float(stars.std())):.3f}); whole set '
                  f'{full_star:+.4f}', flush=True)
    out = os.path.join(quality.RESULTS, 'calibration_noise.csv')
    with open(out, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
