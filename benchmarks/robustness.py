"""Robustness figure: final top-1 against the initial temperature (MKD) and the fixed one (KD).

Top row, one panel per study CSV: timm KD's mean top-1 (± std over seeds) at each fixed tau, and
MKD's at each *initial* tau, for the MKD configuration picked by ``--variant`` / ``--meta-interval``
(default: rows labelled ``defaults``, i.e. run at the installed version's defaults with only the initial tau
set; ``defaults-0.1.0`` selects the rows of timm-mkd 0.1.0's defaults). Bottom row: that configuration's
temperature trajectories (``trajectories*/``), one line per run, coloured by initial tau. Prints the bar per study
and initial tau (``bar_table``): MKD's mean >= the best fixed tau's - 0.5, MKD >= KD at the same tau (paired), and
from 4 and 8 the final tau nearer to the best fixed tau than the start.

Usage:
    python benchmarks/robustness.py --variant defaults-0.1.0 --teacher-sha 096ef8db   # robustness.png
    python benchmarks/robustness.py --tune --variant "estimator=calibration, ..." --out robustness_tune.png
"""
import argparse
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import RESULTS, weights_sha, parse_args as quality_args, read_rows, short_variant, teacher_path  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tune', action='store_true', help='the validation-split CSVs (quality_tune*.csv)')
    p.add_argument('--studies', nargs='+', default=['', '_cnn'], help="CSV suffixes: '' (ViT), '_cnn'")
    p.add_argument('--variant', default='defaults', help="MKD rows whose 'variant' equals this")
    p.add_argument('--meta-interval', default=None, help='MKD rows with this meta interval only')
    p.add_argument('--teacher-sha', default=None,
                   help="rows distilled from this teacher only (default: the cached teacher's hash, see quality.py)")
    p.add_argument('--out', default=None)
    return p.parse_args(argv)


def _by_tau(rows):
    out = {}
    for r in rows:
        out.setdefault(float(r['tau']), []).append(float(r['top1']))
    return sorted((t, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for t, v in out.items())


def _traj_files(traj_dir, rows):
    """Trajectory CSVs of the selected MKD rows (file names carry tau, N, lr and the variant)."""
    if not os.path.isdir(traj_dir):
        return []
    wanted = {(float(r['tau']), r['meta_interval'], float(r['meta_lr']), int(r['seed'])) for r in rows}
    out = []
    for name in sorted(os.listdir(traj_dir)):
        m = re.match(r'mkd_tau([0-9.]+)_N([0-9]+)_lr([^_]+)(.*)_seed(\d+)\.csv$', name)
        if m and (float(m.group(1)), m.group(2), float(m.group(3)), int(m.group(5))) in wanted \
                and _variant_in_name(rows, m.group(4)):
            out.append((float(m.group(1)), os.path.join(traj_dir, name)))
    return out


def _variant_in_name(rows, suffix):
    parts = [p for p in rows[0]['variant'].split(', ') if p] if rows else []
    return all(('_' + p) in suffix for p in parts)


def bar_table(kd, mkd, study):
    """The bar per initial tau, as markdown lines: MKD against the best fixed tau and, paired by seed,
    against fixed KD at the same tau; and whether the final tau ends nearer (in log tau) to the best fixed tau."""
    kd_by = {}
    for r in kd:
        kd_by.setdefault(float(r['tau']), {})[int(r['seed'])] = float(r['top1'])
    if not kd_by:
        return []
    best_tau, best = max(((t, statistics.mean(v.values())) for t, v in kd_by.items()), key=lambda x: x[1])
    lines = [f'{study}: best fixed tau {best_tau:g} ({best:.2f}, n={len(kd_by[best_tau])})', '',
             '| initial tau | MKD top-1 (n) | vs best fixed | paired vs KD at same tau (n) | final tau | '
             '|log tau - log best|: initial -> final | bar |',
             '|---|---|---|---|---|---|---|']
    for tau in sorted({float(r['tau']) for r in mkd}):
        rows = [r for r in mkd if float(r['tau']) == tau]
        top1 = statistics.mean(float(r['top1']) for r in rows)
        pairs = [float(r['top1']) - kd_by.get(tau, {})[int(r['seed'])] for r in rows
                 if int(r['seed']) in kd_by.get(tau, {})]
        paired = statistics.mean(pairs) if pairs else float('nan')
        final = statistics.mean(float(r['tau_t_final']) for r in rows)
        d0, d1 = abs(math.log(tau / best_tau)), abs(math.log(final / best_tau))
        ok = top1 >= best - 0.5 and (not pairs or paired >= 0) and (tau not in (4.0, 8.0) or d1 < d0)
        lines.append(f'| {tau:g} | {top1:.2f} ({len(rows)}) | {top1 - best:+.2f} | {paired:+.2f} ({len(pairs)}) | '
                     f'{final:.2f} | {d0:.2f} -> {d1:.2f} | {"holds" if ok else "fails"} |')
    return lines + ['']


def main(argv=None):
    a = parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from timm_mkd.plot import read_temperatures
    if a.teacher_sha is None:
        path = teacher_path(quality_args(['--tune'] if a.tune else []))
        a.teacher_sha = weights_sha(path) if os.path.isfile(path) else ''
    fig, axes = plt.subplots(2, len(a.studies), figsize=(5.5 * len(a.studies), 7), squeeze=False)
    for col, suffix in enumerate(a.studies):
        base = 'quality' + ('_tune' if a.tune else '') + suffix
        rows = [r for r in read_rows(os.path.join(RESULTS, base + '.csv'))
                if not a.teacher_sha or r['schedule'].endswith('-' + a.teacher_sha)]
        kd = [r for r in rows if r['method'] == 'kd']
        mkd = [r for r in rows if r['method'] == 'mkd' and r['variant'] == a.variant
               and (a.meta_interval is None or r['meta_interval'] == a.meta_interval)]
        print('\n'.join(bar_table(kd, mkd, 'ViT study' if suffix == '' else suffix.strip('_').upper() + ' study')))
        ax = axes[0][col]
        for label, sel, style in (('timm KD, fixed tau', kd, 'o-'), ('MKD, initial tau', mkd, 's--')):
            pts = _by_tau(sel)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                            capsize=3, label=label + f" (n={min(p[3] for p in pts)}-{max(p[3] for p in pts)} seeds)")
        ax.set_xscale('log', base=2)
        ax.set_xticks([1, 2, 4, 8])
        ax.set_xticklabels(['1', '2', '4', '8'])
        ax.set_xlabel('temperature (fixed for KD, initial for MKD)')
        ax.set_ylabel(f"top-1 on the {'validation' if a.tune else 'test'} split (%)")
        ax.set_title(('ViT' if suffix == '' else suffix.strip('_').upper()) + ' study', fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        traj_dir = os.path.join(RESULTS, 'trajectories' + ('_tune' if a.tune else '') + suffix)
        taus = sorted({float(r['tau']) for r in mkd})
        for tau, path in _traj_files(traj_dir, mkd):
            log = read_temperatures(path)
            ax.plot(log['step'], log['tau_t'], color=f'C{taus.index(tau) % 10}', lw=1.2, alpha=0.8)
        for i, tau in enumerate(taus):
            ax.plot([], [], color=f'C{i % 10}', label=f'from tau {tau:g}')
        ax.set_yscale('log')
        ax.set_yticks([0.5, 1, 2, 4, 8, 16])
        ax.set_yticklabels(['0.5', '1', '2', '4', '8', '16'])
        ax.set_xlabel('optimizer update')
        ax.set_ylabel('MKD teacher temperature tau_t')
        ax.grid(alpha=0.3)
        if taus:
            ax.legend(fontsize=7)
    fig.suptitle(f"MKD ({short_variant(a.variant)}) against fixed-temperature KD", fontsize=9)
    fig.tight_layout()
    out = a.out or ('robustness_tune.png' if a.tune else 'robustness.png')
    out = out if os.path.isabs(out) else os.path.join(RESULTS, out)
    fig.savefig(out, dpi=110)
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
