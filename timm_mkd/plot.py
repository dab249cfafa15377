"""Plot the learned temperatures of MKD runs.

    python -m timm_mkd.plot OUTPUT_DIR [--out FILE]

reads ``OUTPUT_DIR/temperatures.csv`` (written by ``timm_mkd.meta_log.TemperatureLog``) and
writes ``OUTPUT_DIR/temperatures.png``: tau_t and tau_s against the optimizer step, with skipped
meta steps (non-finite hypergradient) marked. ``plot_trajectories`` draws several runs in one
figure for benchmarks. The temperature axis is logarithmic and spans at least a factor
``MIN_SPAN`` (2) around the data, with ticks at round values (1, 1.25, 1.5, 2, ...): a move from
1.000 to 1.025 looks as small as it is instead of filling the plot. matplotlib is an optional
dependency (``pip install matplotlib`` or ``pip install timm-mkd[plot]``) and is imported only when
a plot is drawn.
"""
import argparse
import csv
import math
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .meta_log import COLUMNS, CSV_NAME

__all__ = ['read_temperatures', 'temperature_limits', 'temperature_ticks', 'figure_run', 'figure_trajectories',
           'plot_run', 'plot_trajectories', 'main']

PNG_NAME = 'temperatures.png'

#: The temperature axis spans at least this factor (max / min), centred on the data in log space.
MIN_SPAN = 2.0

#: Tick mantissas, finest first: the finest set that puts at most ``_MAX_TICKS`` ticks on the axis is used.
_MANTISSAS = ((1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8), (1, 1.5, 2, 3, 5), (1, 2, 5), (1,))
_MAX_TICKS = 8


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or a clear ImportError."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            'plotting the temperatures needs matplotlib: pip install matplotlib') from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _float(text: str) -> float:
    return float(text) if text.strip() else math.nan


def read_temperatures(csv_path: str) -> Dict[str, List[float]]:
    """Read a temperature log into columns, one entry per meta step, sorted by step.

    A step logged twice (a run resumed from a checkpoint older than its last log rows) keeps
    its last row, i.e. the trajectory of the resumed run.

    Args:
        csv_path: Path of a ``temperatures.csv``.

    Returns:
        ``{column: [values]}`` for every column of ``timm_mkd.meta_log.COLUMNS`` (blank cells
        are NaN, ``skipped`` is 0.0 / 1.0).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it has no header or no rows, or lacks the step / temperature columns.
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(
            f'no temperature log at {csv_path}: is this the output folder of an MKD run '
            f'(train_mkd.py ... --mkd), and has it reached its first meta step?')
    with open(csv_path, newline='') as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in ('step', 'tau_t', 'tau_s') if c not in fields]
        if missing:
            raise ValueError(
                f'{csv_path} is empty or not a temperature log: missing column(s) {missing}')
        by_step = {}
        for row in reader:
            if not (row.get('step') or '').strip():
                continue
            by_step[int(float(row['step']))] = row  # last row of a step wins
    if not by_step:
        raise ValueError(f'{csv_path} has a header but no meta steps yet; nothing to plot')
    columns = {name: [] for name in COLUMNS}
    for step in sorted(by_step):
        row = by_step[step]
        for name in COLUMNS:
            columns[name].append(_float(row.get(name) or ''))
    return columns


def _draw(ax, columns: Mapping[str, Sequence[float]], label: Optional[str], color=None) -> None:
    steps = columns['step']
    prefix = f'{label}: ' if label else ''
    line_t, = ax.plot(steps, columns['tau_t'], '-', color=color, label=f'{prefix}tau_t (teacher)')
    ax.plot(steps, columns['tau_s'], '--', color=color if label else None, label=f'{prefix}tau_s (student)')
    skipped = [(s, t) for s, t, k in zip(steps, columns['tau_t'], columns['skipped']) if k == 1.0]
    if skipped:
        ax.plot([s for s, _ in skipped], [t for _, t in skipped], 'x',
                color=line_t.get_color(), label=f'{prefix}skipped meta step')


def temperature_limits(values: Sequence[float]) -> Tuple[float, float]:
    """The temperature axis's ``(low, high)``: the data's range plus a 5% margin (in log space), widened
    symmetrically around its geometric centre to span at least ``MIN_SPAN``.

    Args:
        values: every temperature drawn (NaN and non-positive values are left out).
    """
    finite = [v for v in values if math.isfinite(v) and v > 0]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 1.0)
    log_lo, log_hi = math.log(lo), math.log(hi)
    margin = 0.05 * (log_hi - log_lo)
    log_lo, log_hi = log_lo - margin, log_hi + margin
    half = 0.5 * max(log_hi - log_lo, math.log(MIN_SPAN))
    centre = 0.5 * (log_lo + log_hi)
    return math.exp(centre - half), math.exp(centre + half)


def temperature_ticks(low: float, high: float) -> List[float]:
    """Round tick values in ``[low, high]``: the finest of ``_MANTISSAS`` times powers of 10 that gives at most
    ``_MAX_TICKS`` ticks (at least 2)."""
    ticks: List[float] = []
    for mantissas in _MANTISSAS:
        decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
        ticks = [round(m * 10.0 ** k, 10) for k in decades for m in mantissas if low <= m * 10.0 ** k <= high]
        if len(ticks) <= _MAX_TICKS:
            break
    return ticks if len(ticks) >= 2 else [low, high]


def _temperature_axis(ax, values: Sequence[float]) -> None:
    """Log y axis over ``temperature_limits(values)``, labelled at ``temperature_ticks``."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    low, high = temperature_limits(values)
    ax.set_yscale('log')
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(FixedLocator(temperature_ticks(low, high)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:.3g}'))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel('temperature (log scale)')


def _all_temperatures(columns: Mapping[str, Sequence[float]]) -> List[float]:
    return list(columns['tau_t']) + list(columns['tau_s'])


def figure_run(csv_path: str, title: Optional[str] = None):
    """The figure ``plot_run`` writes (tau_t and tau_s of one run against the step); the caller closes it.

    Args:
        csv_path: The run's ``temperatures.csv``.
        title: Figure title (the CSV's folder name when None).

    Returns:
        A matplotlib ``Figure``.
    """
    columns = read_temperatures(csv_path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        _draw(ax, columns, None)
        _temperature_axis(ax, _all_temperatures(columns))
        ax.set_xlabel('optimizer step')
        ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(csv_path))))
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return fig


def figure_trajectories(csv_paths: Mapping[str, str], title: Optional[str] = None):
    """The figure ``plot_trajectories`` writes; the caller closes it.

    Raises:
        ValueError: if ``csv_paths`` is empty; errors of ``read_temperatures`` for a bad file.
    """
    if not csv_paths:
        raise ValueError('plot_trajectories needs at least one run')
    runs = {label: read_temperatures(path) for label, path in csv_paths.items()}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        colors = plt.rcParams['axes.prop_cycle'].by_key().get('color', [None])
        for i, (label, columns) in enumerate(runs.items()):
            _draw(ax, columns, label, color=colors[i % len(colors)])
        _temperature_axis(ax, [v for columns in runs.values() for v in _all_temperatures(columns)])
        ax.set_xlabel('optimizer step')
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize='small')
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _save(fig, out_png: str) -> str:
    plt = _pyplot()
    try:
        fig.savefig(out_png, dpi=120)
    finally:
        plt.close(fig)
    return out_png


def plot_run(csv_path: str, out_png: str, title: Optional[str] = None) -> str:
    """Plot one run's tau_t and tau_s against the step (``figure_run``) into ``out_png``.

    Args:
        csv_path: The run's ``temperatures.csv``.
        out_png: Where to write the figure.
        title: Figure title (the CSV's folder name when None).

    Returns:
        ``out_png``.
    """
    return _save(figure_run(csv_path, title), out_png)


def plot_trajectories(csv_paths: Mapping[str, str], out_png: str, title: Optional[str] = None) -> str:
    """Plot several runs' temperature trajectories in one figure (one colour per run) into ``out_png``.

    tau_t is drawn solid and tau_s dashed, so runs that start from different initial values or
    use different meta settings can be compared at a glance.

    Args:
        csv_paths: ``{label: path to temperatures.csv}``, drawn in this order.
        out_png: Where to write the figure.
        title: Figure title.

    Returns:
        ``out_png``.

    Raises:
        ValueError: if ``csv_paths`` is empty; errors of ``read_temperatures`` for a bad file.
    """
    return _save(figure_trajectories(csv_paths, title), out_png)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m timm_mkd.plot',
        description=f'Plot the learned temperatures of an MKD run (OUTDIR/{CSV_NAME}).')
    parser.add_argument('outdir', help='output folder of the run (holds temperatures.csv)')
    parser.add_argument('--out', default=None, help=f'PNG to write (default OUTDIR/{PNG_NAME})')
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.outdir, PNG_NAME)
    try:
        plot_run(os.path.join(args.outdir, CSV_NAME), out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
