"""Diagnostic: measured whether the initial temperature leaves a trace in AdamW's state after the warm start.

With the default meta step (calibration + warm start at the first meta step, update N), MKD runs from
different initial tau hold the same temperature after update N, yet ``quality.py`` found MKD from 4 and 8
ahead of MKD from 1 on the ViT study. The hypothesis checked here: the first N updates at a high temperature
(KD gradients scaled by ``tau_s^2``) inflate AdamW's second moment ``v``; with ``beta2 = 0.999`` that excess
decays over ~1000 updates, so the whole run takes smaller steps (a lower effective learning rate), which is
an optimiser side effect of the start, not something the meta step learned.

For each configuration (``quality.py``'s student, teacher, data and schedule; ``--steps`` is the schedule
length, ``--probe-steps`` how far it runs) this records, every ``--every`` updates, the temperature and the
AdamW update size ``lr * mean |m_hat / (sqrt(v_hat) + eps)|`` and the mean preconditioner ``sqrt(v_hat)``,
each relative to the KD-at-tau-1 run at the same update, and appends them to ``benchmarks/results/adam_state.csv``.

    python benchmarks/diagnostics/adam_state.py --tune --seeds 0      # ~4 minutes on 1 CPU core
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: common, quality
import quality  # noqa: E402

CONFIGS = (('kd', 1.0), ('mkd', 1.0), ('mkd', 4.0), ('mkd', 8.0))


def adam_stats(optimizer):
    """(mean |AdamW step| per parameter element at the last update, ``lr * |m_hat| / (sqrt(v_hat) + eps)``;
    mean ``sqrt(v_hat)``, the preconditioner's denominator)."""
    total, denom, count = 0.0, 0.0, 0
    for group in optimizer.param_groups:
        beta1, beta2 = group['betas']
        for p in group['params']:
            state = optimizer.state.get(p)
            if not state or 'exp_avg_sq' not in state:
                continue
            t = float(state['step'])
            m_hat = state['exp_avg'] / (1 - beta1 ** t)
            v_hat = state['exp_avg_sq'] / (1 - beta2 ** t)
            total += float((group['lr'] * m_hat.abs() / (v_hat.sqrt() + group['eps'])).sum())
            denom += float(v_hat.sqrt().sum())
            count += p.numel()
    return total / max(count, 1), denom / max(count, 1)


def main(argv=None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument('--probe-steps', type=int, default=300, help='updates each run goes before it stops')
    own.add_argument('--every', type=int, default=25, help='updates between records')
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    probe_steps, every = mine.probe_steps, mine.every
    args = quality.parse_args(rest)  # everything else is quality.py's
    torch.set_num_threads(args.threads)
    args.traj_dir = tempfile.mkdtemp()  # these short runs must not overwrite the study's trajectory files
    train_set, meta_set, teacher_train, eval_set = quality.datasets(args)
    eval_loader = quality.make_loader(eval_set, 500, training=False, img_size=args.img_size)
    teacher, _ = quality.get_teacher(args, teacher_train, eval_loader)
    path = os.path.join(quality.RESULTS, 'adam_state.csv')
    fields = ['method', 'tau', 'seed', 'step', 'tau_t', 'update_size', 'relative_to_kd1', 'sqrt_v', 'sqrt_v_relative_to_kd1',
              'schedule']
    for seed in args.seeds:
        reference = {}
        for method, tau in CONFIGS:
            rows = []

            def probe(step, optimizer, task):
                if step % every == 0:
                    size, sqrt_v = adam_stats(optimizer)
                    if (method, tau) == CONFIGS[0]:
                        reference[step] = (size, sqrt_v)
                    tau_t = task.temperatures()[0] if method == 'mkd' else tau
                    rows.append(dict(method=method, tau=tau, seed=seed, step=step, tau_t=round(tau_t, 4),
                                     update_size=f'{size:.4e}', relative_to_kd1=round(size / reference[step][0], 4),
                                     sqrt_v=f'{sqrt_v:.4e}', sqrt_v_relative_to_kd1=round(sqrt_v / reference[step][1], 4),
                                     schedule=quality.schedule_sig(args)))
                    print(f'  {method} from {tau:g} seed {seed} update {step}: tau_t {tau_t:.3f}, step size '
                          f'{size:.3e} ({rows[-1]["relative_to_kd1"]:.3f} x KD tau 1), sqrt(v_hat) '
                          f'{rows[-1]["sqrt_v_relative_to_kd1"]:.3f} x KD tau 1', flush=True)
                return step >= probe_steps

            quality.run_student(args, method, tau, seed, teacher, train_set, meta_set, eval_loader, probe=probe)
            for row in rows:
                quality.append_row(path, row, fields=fields)
    return 0


if __name__ == '__main__':
    sys.exit(main())
