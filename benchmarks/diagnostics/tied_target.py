"""Which temperature two meta objectives prefer along a student's training run (validation data only).

``mixture``: the default objective, the held-out NLL of ``alpha q + (1 - alpha) softmax(z_t / tau)`` (the target a
student at temperature 1 learns). ``fixed-point``: the held-out NLL of the prediction a student *tied* at ``tau``
converges to on the same (q, teacher) pair: the minimiser ``z*`` over logits of
``alpha CE(softmax(z), q) + (1 - alpha) tau^2 KL(softmax(z_t / tau) || softmax(z / tau))``, read at temperature 1.
At ``tau = 1`` both are the same; for ``tau > 1`` the tied student moves from matching probabilities toward
matching the teacher's logits, which keep the teacher's confidence at temperature 1.

    python benchmarks/diagnostics/tied_target.py --cell cnn-heavy-mild --method kd:1 --probes 300 600 1000
"""
import argparse
import csv
import math
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import quality  # noqa: E402
import robustness_matrix as rm  # noqa: E402
from common import MEAN, STD  # noqa: E402
from timm_mkd.meta.mixture import mixture_nll  # noqa: E402


def fixed_point_logits(z_t, q, tau, alpha, iters=40):
    """Per row, the minimiser over ``z`` of the tied training loss with ``q`` as the label (Newton, float64)."""
    a, b = alpha, 1.0 - alpha
    p = F.softmax(z_t / tau, -1)
    z = torch.log((a * q + b * F.softmax(z_t, -1)).clamp_min(1e-300))
    ones = torch.ones(z.shape[-1], z.shape[-1], dtype=z.dtype) / z.shape[-1]
    for _ in range(iters):
        s, st = F.softmax(z, -1), F.softmax(z / tau, -1)
        g = a * (s - q) + b * tau * (st - p)
        h = (a * (torch.diag_embed(s) - s[:, :, None] * s[:, None, :])
             + b * (torch.diag_embed(st) - st[:, :, None] * st[:, None, :]) + ones)
        d = torch.linalg.solve(h, g[..., None])[..., 0]
        d = d * (5.0 / d.norm(dim=-1, keepdim=True).clamp_min(5.0))  # a damped step far from the minimum
        z = z - d
        if float(g.abs().max()) < 1e-12:
            break
    return z


def objectives(z_t, q, y, taus, alpha):
    """``[(tau, mixture NLL, fixed-point NLL)]`` on one set of meta rows (float64 logits and probabilities)."""
    onehot = F.one_hot(y, z_t.shape[-1]).double()
    out = []
    for tau in taus:
        mix = float(mixture_nll(z_t, q, onehot, torch.tensor(math.log(tau), dtype=z_t.dtype), alpha))
        zs = fixed_point_logits(z_t, q, tau, alpha)
        fp = float(-(onehot * F.log_softmax(zs, -1)).sum(-1).mean())
        out.append((tau, mix, fp))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cell', default='cnn-heavy-mild', choices=list(rm.CELLS))
    p.add_argument('--method', default='kd:1')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--probes', type=int, nargs='+', default=[300, 600, 1000],
                   help='updates to probe at; the run, and its learning-rate schedule, ends at the last one')
    p.add_argument('--batches', type=int, default=8)
    p.add_argument('--csv', default=os.path.join(os.path.dirname(HERE), 'results', 'tied_target.csv'))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    qargs = rm.cell_args(args.cell, rm.parse_args(['--tune', '--cells', args.cell]))
    # An MKD run logs its temperatures here, never into the robustness matrix's committed trajectories.
    qargs.traj_dir = os.path.join(tempfile.mkdtemp(prefix='tied_target_'), args.cell)
    train_set, meta_set, eval_loader, teacher = quality.prepare_study(qargs)
    method, tau0, kw = rm.parse_method(args.method)
    rm.set_method_args(qargs, kw)
    qargs.steps = max(args.probes)
    from timm_mkd.data.meta_data import build_meta_loader
    loader = build_meta_loader(meta_set, input_size=(1, qargs.img_size, qargs.img_size), batch_size=128, mean=MEAN,
                               std=STD, crop_pct=1.0, seed=1000 + args.seed,
                               train_transform=quality.meta_train_transform(qargs))
    batches = [next(loader) for _ in range(args.batches)]
    with torch.no_grad():  # the teacher is frozen: its logits on the fixed meta rows are the same at every probe
        zt = torch.cat([teacher(x) for x, _ in batches]).double()
    y = torch.cat([t for _, t in batches])
    taus = [math.exp(math.log(8.0) * i / 30) for i in range(31)]
    rows = []

    def probe(step, optimizer, task):
        if step not in args.probes:
            return False
        model = task.get_trainable_module()
        was = model.training
        model.eval()
        with torch.no_grad():
            q = torch.cat([F.softmax(model(x), -1) for x, _ in batches]).double()
        model.train(was)
        res = objectives(zt, q, y, taus, 0.5)
        best_mix = min(res, key=lambda r: r[1])[0]
        best_fp = min(res, key=lambda r: r[2])[0]
        acc = float((q.argmax(-1) == y).double().mean())
        print(f'{args.cell} {args.method} step {step}: student meta-view acc {acc:.3f}; argmin tau mixture '
              f'{best_mix:.2f}, fixed-point {best_fp:.2f}', flush=True)
        for tau, mix, fp in res:
            rows.append(dict(cell=args.cell, method=args.method, seed=args.seed, step=step, tau=round(tau, 4),
                             mixture=round(mix, 6), fixed_point=round(fp, 6), student_acc=round(acc, 4),
                             teacher=qargs.teacher_sha))
        return False

    quality.run_student(qargs, method, tau0, args.seed, teacher, train_set, meta_set, eval_loader, probe=probe)
    new = not os.path.exists(args.csv)
    with open(args.csv, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == '__main__':
    main()
