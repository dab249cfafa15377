"""Tables, the bar check and the figure of ``robustness_matrix.py``'s CSV.

The bar, per cell: MKD's mean >= the best fixed temperature's mean - 0.5, and MKD's paired mean difference to
KD at tau 1 (over the seeds both have) >= -0.3. MKD rows at the library defaults have ``variant == 'defaults'``;
other variants are tabulated beside them.

    python benchmarks/matrix_report.py [CSV] [PNG]
    python benchmarks/matrix_report.py --pool CSV [CSV ...]   # the bar per cell over replicates and teacher draws
"""
import argparse
import csv
import math
import os
import statistics
import sys
from typing import Dict, List, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'results')
PANELS_PER_ROW = 6  # cells per row of the figure


def _groups(rows):
    """``{cell: {label: {seed: row}}}``; labels ``KD 1``, ``KD 2``, ..., ``MKD (variant)``, and ``MKD from 4`` for MKD
    started at another initial tau (the bar's ``MKD`` is the run from 1)."""
    out = {}
    for r in rows:
        label = f"KD {float(r['tau']):g}" if r['method'] == 'kd' else (
            'MKD' if r['variant'] == 'defaults' else f"MKD ({r['variant']})")
        if r['method'] == 'mkd' and float(r['tau']) != 1.0:
            label += f" from {float(r['tau']):g}"
        out.setdefault(r['cell'], {}).setdefault(label, {})[int(r['seed'])] = r
    return out


def _ms(values):
    if len(values) < 2:
        return f'{values[0]:.2f}' if values else 'n/a'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def _paired(diffs):
    """Mean and sd of paired differences: the sd over ``sqrt(n)`` is the standard error the bar's mean carries."""
    if len(diffs) < 2:
        return f'{diffs[0]:+.2f}' if diffs else ''
    return f'{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}'


class Bar(NamedTuple):
    """The bar in one cell, on ``seeds`` (those every KD temperature and MKD have); ``mean`` by method label."""
    near_best: bool      # MKD's mean >= the best fixed tau's mean - 0.5
    near_kd1: bool       # MKD - KD 1 (paired) >= -0.3
    gap: float           # MKD - best fixed
    paired: float        # MKD - KD 1
    paired_sd: float     # sd of the per-seed MKD - KD 1 (NaN on one seed)
    best: str
    seeds: List[int]
    mean: Dict[str, float]

    @property
    def holds(self) -> bool:
        return self.near_best and self.near_kd1


def cell_summary(runs):
    """``(lines, bar)`` for one cell: a markdown table of every method and whether MKD meets the bar."""
    top = {k: [float(r['top1']) for _, r in sorted(v.items())] for k, v in runs.items()}
    kd = {k: statistics.mean(v) for k, v in top.items() if k.startswith('KD')}
    lines = ['| method | n | top-1 mean ± sd | per seed | paired vs KD 1 (mean ± sd) | final tau_t |',
             '|---|---|---|---|---|---|']
    bar = None
    for k in sorted(runs, key=lambda k: (not k.startswith('KD'), k)):
        seeds = sorted(runs[k])
        paired = [float(runs[k][s]['top1']) - float(runs['KD 1'][s]['top1']) for s in seeds if s in runs.get('KD 1', {})]
        taus = [float(runs[k][s]['tau_t_final']) for s in seeds] if k.startswith('MKD') else []
        lines.append(f"| {k} | {len(seeds)} | {_ms(top[k])} | {' / '.join(f'{v:.2f}' for v in top[k])} | "
                     f"{_paired(paired) if k != 'KD 1' else ''} | "
                     f"{' / '.join(f'{t:.2f}' for t in taus)} |")
    if 'MKD' in runs and kd:
        # On the seeds every KD temperature and MKD have, so that a missing seed does not move a mean.
        common = sorted(set.intersection(*(set(runs[k]) for k in runs if k.startswith('KD') or k == 'MKD')))
        if common:
            mean = {k: statistics.mean(float(runs[k][s]['top1']) for s in common)
                    for k in runs if k.startswith('KD') or k == 'MKD'}
            best = max((k for k in mean if k.startswith('KD')), key=mean.get)
            gap, paired = mean['MKD'] - mean[best], mean['MKD'] - mean['KD 1']
            diffs = [float(runs['MKD'][s]['top1']) - float(runs['KD 1'][s]['top1']) for s in common]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else float('nan')
            bar = Bar(gap >= -0.5, paired >= -0.3, gap, paired, sd, best, common, mean)
    return lines, bar


def summary_table(groups, bars):
    """One row per cell, means over the seeds every KD temperature and MKD have (the numbers the bar is checked on)."""
    kds = sorted({k for runs in groups.values() for k in runs if k.startswith('KD')}, key=lambda k: float(k[3:]))
    lines = ['| cell | teacher_tau_cal | seeds | ' + ' | '.join(kds) + ' | MKD | MKD - KD 1 (paired, mean ± sd) | '
             'MKD - best fixed | MKD final tau | bar |', '|---' * (len(kds) + 8) + '|']
    for cell, runs in groups.items():
        bar = bars[cell]
        if bar is None:
            continue
        first = next(iter(runs['MKD'].values()))
        taus = [float(runs['MKD'][s]['tau_t_final']) for s in bar.seeds]
        lines.append(f"| {cell} | {float(first['teacher_tau_cal']):.2f} | {len(bar.seeds)} | "
                     + ' | '.join(f'{bar.mean[k]:.2f}' if k in bar.mean else '' for k in kds)
                     + f" | {bar.mean['MKD']:.2f} | {bar.paired:+.2f}"
                     + ('' if math.isnan(bar.paired_sd) else f' ± {bar.paired_sd:.2f}') + ' | '
                     f"{bar.gap:+.2f} ({bar.best}) | "
                     f"{min(taus):.2f}-{max(taus):.2f} | {'holds' if bar.holds else 'fails'} |")
    return lines


def one_teacher_per_cell(rows, csv_path):
    """Raise ``ValueError`` naming the cell when a cell's rows come from several teachers: ``report`` pairs by seed."""
    teachers = {}
    for r in rows:
        teachers.setdefault(r['cell'], set()).add(r['teacher'])
    mixed = {cell: sorted(t) for cell, t in teachers.items() if len(t) > 1}
    if mixed:
        cell, names = next(iter(sorted(mixed.items())))
        raise ValueError(f"{csv_path}: cell {cell} has rows of {len(names)} teachers ({', '.join(names)}), and a "
                         f"report pairs rows by seed. Fix: --pool {csv_path} (each teacher is its own replicate).")


def report(csv_path, png_path=None):
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    one_teacher_per_cell(rows, csv_path)
    groups = _groups(rows)
    text, bars = [], {}
    for cell, runs in groups.items():
        first = next(iter(next(iter(runs.values())).values()))
        lines, bar = cell_summary(runs)
        bars[cell] = bar
        verdict = 'no MKD rows' if bar is None else (
            f"On seeds {bar.seeds}: MKD - best fixed ({bar.best}) {bar.gap:+.2f} ({'ok' if bar.near_best else 'FAILS'} "
            f">= -0.5), MKD - KD 1 {bar.paired:+.2f} ({'ok' if bar.near_kd1 else 'FAILS'} >= -0.3)")
        text += [f"### {cell} (teacher {first['teacher']}, calibrated tau on its training views "
                 f"{float(first['teacher_tau_cal']):.2f}, {first['split']} split)", ''] + lines + ['', verdict, '']
    text += ['### Summary (means over the seeds every configuration of a cell has)', ''] + summary_table(groups, bars) + ['']
    if png_path:
        plot(groups, csv_path, png_path)
        text.append(f'figure: {png_path}')
    return '\n'.join(text)


def pooled_table(paths):
    """The bar per (cell, split) over several CSVs: every teacher of every file is one replicate, checked on its
    own seeds as in ``report``; the pooled row averages the replicates' differences (each replicate weighs the same,
    whatever its number of seeds) and counts the replicates that hold the bar."""
    found = {}
    for path in paths:
        with open(path) as f:
            rows = list(csv.DictReader(f))  # other MKD variants get their own labels, which the bar does not read
        for teacher in sorted({r['teacher'] for r in rows}):
            for cell, runs in _groups([r for r in rows if r['teacher'] == teacher]).items():
                bar = cell_summary(runs)[1]
                if bar is not None:
                    split = next(iter(runs['MKD'].values()))['split']
                    found.setdefault((cell, split), []).append(bar)
    lines = ['| cell | split | replicates | seeds | MKD - KD 1 (mean, range) | MKD - best fixed (mean, range) | '
             'replicates holding the bar |', '|---|---|---|---|---|---|---|']
    for (cell, split), bars in sorted(found.items()):
        paired, gap = [b.paired for b in bars], [b.gap for b in bars]
        lines.append(f"| {cell} | {split} | {len(bars)} | {sum(len(b.seeds) for b in bars)} | "
                     f"{statistics.mean(paired):+.2f} ({min(paired):+.2f} to {max(paired):+.2f}) | "
                     f"{statistics.mean(gap):+.2f} ({min(gap):+.2f} to {max(gap):+.2f}) | "
                     f"{sum(b.holds for b in bars)} of {len(bars)} |")
    return '\n'.join(lines)


def _log_variant(name):
    """The variant of a trajectory log: ``quality.run_student`` writes ``mkd_tau1_N10_lr0.02_<variant>_seedS.csv``, the
    committed logs are ``<variant>_seedS.csv``."""
    stem = name.rsplit('_seed', 1)[0]
    return 'defaults' if stem == 'defaults' or stem.endswith('_defaults') else stem


def _colour(variant):
    """Red for the library defaults, blue for an earlier release's (``defaults-X.Y.Z``), green for other variants."""
    if variant == 'defaults':
        return 'C3'
    return 'C0' if variant.startswith('defaults-') else 'C2'


def plot(groups, csv_path, png_path):
    """Per cell: top-1 of KD at each tau (mean and seeds) and of MKD at its final tau_t; below, MKD's tau_t."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from timm_mkd.plot import read_temperatures, temperature_limits, temperature_ticks
    cells = list(groups)
    per_row = min(len(cells), PANELS_PER_ROW)
    rows = -(-len(cells) // per_row)  # a pair of rows (top-1, tau_t) per PANELS_PER_ROW cells
    fig, axes = plt.subplots(2 * rows, per_row, figsize=(3.1 * per_row, 5.6 * rows), squeeze=False)

    def panels(j):
        """The j-th cell's top-1 axes and, below it, its tau_t axes."""
        row, col = divmod(j, per_row)
        return axes[2 * row][col], axes[2 * row + 1][col]

    for j in range(len(cells), rows * per_row):
        for unused in panels(j):
            unused.axis('off')
    traj_root = os.path.splitext(csv_path)[0] + '_trajectories'
    taus, tau_axes = [], []
    for i, cell in enumerate(cells):
        ax, tx = panels(i)
        tau_axes.append(tx)
        for k, runs in sorted(groups[cell].items()):
            top = [float(r['top1']) for r in runs.values()]
            if k.startswith('KD'):
                tau = float(k.split()[1])
                ax.scatter([tau] * len(top), top, color='0.6', s=10)
                ax.errorbar(tau, statistics.mean(top), yerr=statistics.stdev(top) if len(top) > 1 else 0,
                            fmt='o', color='k', ms=5, capsize=3, label='KD (fixed tau)' if tau == 1 else None)
            else:
                tau = statistics.mean(float(r['tau_t_final']) for r in runs.values())
                variant = k[5:k.index(')')] if k.startswith('MKD (') else 'defaults'
                ax.errorbar(tau, statistics.mean(top), yerr=statistics.stdev(top) if len(top) > 1 else 0, fmt='D',
                            color=_colour(variant), ms=6, capsize=3, label=f'MKD, {variant}' if i == 0 else None)
        ax.set_xscale('log')
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ticks = sorted({1.0, 2.0, 4.0} | {float(k.split()[1]) for k in groups[cell] if k.startswith('KD')})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f'{t:g}' for t in ticks])
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel('tau (MKD: final tau_t)', fontsize=8)
        ax.grid(alpha=0.3)
        folder = os.path.join(traj_root, cell)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            log = read_temperatures(os.path.join(folder, name))
            tx.plot(log['step'], log['tau_t'], color=_colour(_log_variant(name)), lw=1.2, alpha=0.8)
            taus += [t for t in log['tau_t'] if t == t]
        tx.set_xlabel('optimizer update', fontsize=8)
        tx.grid(alpha=0.3)
    low, high = temperature_limits(taus + [1.0, 4.0])  # one log axis for every cell, tau 1 to 4 at least
    for tx in tau_axes:
        tx.set_yscale('log')
        tx.set_ylim(low, high)
        tx.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(temperature_ticks(low, high)))
        tx.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:.3g}'))
        tx.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for r in range(rows):
        axes[2 * r][0].set_ylabel('top-1 (%)')
        axes[2 * r + 1][0].set_ylabel('MKD tau_t (colours as above)')
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('csv', nargs='?', default=os.path.join(RESULTS, 'robustness_matrix.csv'),
                   help='a robustness_matrix.py CSV (default: results/robustness_matrix.csv)')
    p.add_argument('png', nargs='?', default=None, help='the figure (default: the CSV\'s name with .png)')
    p.add_argument('--pool', nargs='+', metavar='CSV', default=None,
                   help='only the bar per cell and split over these replicates (each teacher of each file is one)')
    args = p.parse_args(argv)
    for path in args.pool or [args.csv]:
        if not os.path.isfile(path):
            p.error(f"{path} does not exist; run benchmarks/robustness_matrix.py first or name a CSV in "
                    f"benchmarks/results")
    if args.pool:
        print(pooled_table(args.pool))
        return 0
    try:
        print(report(args.csv, args.png or os.path.splitext(args.csv)[0] + '.png'))
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == '__main__':
    sys.exit(main())
