"""Plot the learned temperatures of MKD runs.

    python -m timm_mkd.plot OUTPUT_DIR [--out FILE]

reads ``OUTPUT_DIR/temperatures.csv`` (written by ``timm_mkd.meta_log.TemperatureLog``) and
writes ``OUTPUT_DIR/temperatures.png``: tau_t and tau_s against the optimizer step, with skipped
meta steps (non-finite hypergradient) marked. ``plot_trajectories`` draws several runs in one
figure for benchmarks. matplotlib is an optional dependency (``pip install matplotlib`` or
``pip install timm-mkd[plot]``) and is imported only when a plot is drawn.
"""
import argparse
import csv
import math
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence

from .meta_log import COLUMNS, CSV_NAME

__all__ = ['read_temperatures', 'plot_run', 'plot_trajectories', 'main']

PNG_NAME = 'temperatures.png'


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


def plot_run(csv_path: str, out_png: str, title: Optional[str] = None) -> str:
    """Plot one run's tau_t and tau_s against the step.

    Args:
        csv_path: The run's ``temperatures.csv``.
        out_png: Where to write the figure.
        title: Figure title (the CSV's folder name when None).

    Returns:
        ``out_png``.
    """
    columns = read_temperatures(csv_path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        _draw(ax, columns, None)
        ax.set_xlabel('optimizer step')
        ax.set_ylabel('temperature')
        ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(csv_path))))
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_png, dpi=120)
    finally:
        plt.close(fig)
    return out_png


def plot_trajectories(csv_paths: Mapping[str, str], out_png: str, title: Optional[str] = None) -> str:
    """Plot several runs' temperature trajectories in one figure (one colour per run).

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
    if not csv_paths:
        raise ValueError('plot_trajectories needs at least one run')
    runs = {label: read_temperatures(path) for label, path in csv_paths.items()}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        colors = plt.rcParams['axes.prop_cycle'].by_key().get('color', [None])
        for i, (label, columns) in enumerate(runs.items()):
            _draw(ax, columns, label, color=colors[i % len(colors)])
        ax.set_xlabel('optimizer step')
        ax.set_ylabel('temperature')
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize='small')
        fig.tight_layout()
        fig.savefig(out_png, dpi=120)
    finally:
        plt.close(fig)
    return out_png


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
