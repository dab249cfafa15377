"""The temperature log (temperatures.csv) and its plot (python -m timm_mkd.plot)."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from timm_mkd.meta_log import COLUMNS, CSV_NAME, TemperatureLog
from timm_mkd.plot import main, plot_run, plot_trajectories, read_temperatures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _rows(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def _run_python(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        **kwargs)


def _write_log(outdir, n=20, start=0, tau_t=4.0, tau_s=4.0):
    with TemperatureLog.in_dir(str(outdir)) as log:
        for i in range(start, start + n):
            log.record({'step': 10 * i, 'epoch': i // 5, 'tau_t': tau_t - 0.05 * i,
                        'tau_s': tau_s + 0.02 * i, 'meta_loss': 1.0 / (i + 1),
                        'hypergrad_t': 0.01, 'hypergrad_s': -0.01, 'skipped': i == 7})
    return os.path.join(str(outdir), CSV_NAME)


# ------------------------------------------------------------------ TemperatureLog

def test_log_writes_header_once_and_rows_in_order(tmp_path):
    log = TemperatureLog.in_dir(str(tmp_path / 'run'))
    log.record({'step': 10, 'epoch': 0, 'tau_t': torch.tensor(3.5), 'tau_s': 4.25,
                'meta_loss': 0.1234567890123, 'hypergrad_t': -1e-8, 'hypergrad_s': float('nan'),
                'skipped': True})
    log.record({'step': 20, 'tau_t': 3.4})  # missing keys stay blank
    rows = _rows(log.path)  # read while still open: every row is flushed
    assert rows[0] == list(COLUMNS)
    assert rows[1] == ['10', '0', '3.5', '4.25', '0.1234567890123', '-1e-08', 'nan', '1']
    assert rows[2] == ['20', '', '3.4', '', '', '', '', '']
    log.close()


def test_log_resume_appends_under_the_existing_header(tmp_path):
    path = str(tmp_path / CSV_NAME)
    with TemperatureLog(path) as log:
        log.record({'step': 1, 'tau_t': 4.0, 'tau_s': 4.0})
    with TemperatureLog(path) as log:
        log.record({'step': 2, 'tau_t': 3.9, 'tau_s': 4.1})
    rows = _rows(path)
    assert [r[0] for r in rows] == ['step', '1', '2']


def test_log_cuts_a_torn_last_row_on_resume(tmp_path):
    path = str(tmp_path / CSV_NAME)
    with TemperatureLog(path) as log:
        log.record({'step': 1, 'tau_t': 4.0, 'tau_s': 4.0})
    with open(path, 'a') as f:
        f.write('2,0,3.9')  # killed mid-row
    with TemperatureLog(path) as log:
        log.record({'step': 2, 'tau_t': 3.8, 'tau_s': 4.2})
    rows = _rows(path)
    assert len(rows) == 3 and rows[2][:4] == ['2', '', '3.8', '4.2']


def test_log_survives_sigkill(tmp_path):
    """A row recorded before the process is killed is on disk (flushed, not buffered)."""
    path = str(tmp_path / CSV_NAME)
    code = (
        'import os, signal\n'
        'from timm_mkd.meta_log import TemperatureLog\n'
        f'log = TemperatureLog({path!r})\n'
        'for i in range(3):\n'
        '    log.record({"step": i, "tau_t": 4.0, "tau_s": 4.0})\n'
        'os.kill(os.getpid(), signal.SIGKILL)\n'
    )
    proc = _run_python(['-c', code])
    assert proc.returncode == -9, proc.stderr
    assert [r[0] for r in _rows(path)] == ['step', '0', '1', '2']


def test_log_refuses_foreign_header_unknown_columns_and_disabled_writes_nothing(tmp_path):
    foreign = tmp_path / 'other.csv'
    foreign.write_text('epoch,train_loss\n1,0.5\n')
    with pytest.raises(ValueError, match='exists with header'):
        TemperatureLog(str(foreign))
    with TemperatureLog(str(tmp_path / CSV_NAME)) as log:
        with pytest.raises(ValueError, match=r"unknown temperature log column\(s\) \['tau'\]"):
            log.record({'step': 1, 'tau': 2.0})
    off = TemperatureLog(str(tmp_path / 'rank1' / CSV_NAME), enabled=False)
    off.record({'step': 1, 'tau_t': 4.0})
    assert not (tmp_path / 'rank1').exists()


# ------------------------------------------------------------------ plot

def test_read_keeps_last_row_of_a_repeated_step(tmp_path):
    path = _write_log(tmp_path, n=5)
    with TemperatureLog(path) as log:  # resumed from an older checkpoint: step 20 again
        log.record({'step': 20, 'tau_t': 9.0, 'tau_s': 8.0})
    cols = read_temperatures(path)
    assert cols['step'] == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert cols['tau_t'][2] == 9.0 and cols['tau_s'][2] == 8.0


def test_plot_run_and_trajectories_write_png(tmp_path):
    csv_a = _write_log(tmp_path / 'a', tau_t=4.0)
    csv_b = _write_log(tmp_path / 'b', tau_t=2.0, tau_s=1.0)
    out = plot_run(csv_a, str(tmp_path / 'one.png'))
    data = open(out, 'rb').read()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    out = plot_trajectories({'init 4': csv_a, 'init 2': csv_b}, str(tmp_path / 'two.png'), title='t')
    data = open(out, 'rb').read()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    with pytest.raises(ValueError, match='at least one run'):
        plot_trajectories({}, str(tmp_path / 'none.png'))


def test_plot_errors_clearly_on_missing_or_empty_log(tmp_path):
    with pytest.raises(FileNotFoundError, match='no temperature log at'):
        read_temperatures(str(tmp_path / CSV_NAME))
    TemperatureLog.in_dir(str(tmp_path)).close()  # header only
    with pytest.raises(ValueError, match='no meta steps yet'):
        plot_run(str(tmp_path / CSV_NAME), str(tmp_path / 'x.png'))
    empty = tmp_path / 'empty.csv'
    empty.write_text('')
    with pytest.raises(ValueError, match='empty or not a temperature log'):
        read_temperatures(str(empty))
    assert not (tmp_path / 'x.png').exists()


def test_cli_writes_png_into_outdir_and_fails_cleanly(tmp_path, capsys):
    _write_log(tmp_path / 'run')
    proc = _run_python(['-m', 'timm_mkd.plot', str(tmp_path / 'run')])  # the real entry point
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / 'run' / 'temperatures.png'
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert main([str(tmp_path / 'run'), '--out', str(tmp_path / 'o.png')]) == 0
    assert (tmp_path / 'o.png').read_bytes().startswith(PNG_MAGIC)
    assert main([str(tmp_path / 'nothing')]) == 2
    assert 'no temperature log at' in capsys.readouterr().err


def test_cli_names_the_fix_when_matplotlib_is_missing(tmp_path):
    _write_log(tmp_path)
    # a None entry in sys.modules makes `import matplotlib` raise ImportError, as if not installed
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from timm_mkd.plot import main\n"
            f"sys.exit(main([{str(tmp_path)!r}]))\n")
    proc = _run_python(['-c', code])
    assert proc.returncode == 2
    assert 'pip install matplotlib' in proc.stderr


def _written_log(path, tau_t):
    with TemperatureLog.in_dir(str(path)) as log:
        for i, t in enumerate(tau_t):
            log.record({'step': 10 * i, 'tau_t': t, 'tau_s': 1.0, 'meta_loss': 1.0, 'skipped': False})
    return os.path.join(str(path), CSV_NAME)


def _y_axis(fig):
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    return ax.get_yscale(), low, high, [t.get_text() for t in ax.get_yticklabels()]


@pytest.mark.parametrize('figure', ['run', 'trajectories'])
def test_temperature_axis_is_logarithmic_and_spans_a_factor_two(tmp_path, figure):
    """tau moving 1.000 -> 1.025 must not fill the plot: a log axis spanning at least x2, labelled at round values."""
    import matplotlib.pyplot as plt
    from timm_mkd.plot import MIN_SPAN, figure_run, figure_trajectories
    path = _written_log(tmp_path, [1.0 + 0.025 * i / 9 for i in range(10)])
    fig = figure_run(path) if figure == 'run' else figure_trajectories({'a': path})
    try:
        scale, low, high, labels = _y_axis(fig)
    finally:
        plt.close(fig)
    assert scale == 'log'
    assert high / low >= MIN_SPAN * (1 - 1e-9) and low <= 1.0 and high >= 1.025
    assert labels and set(labels) <= {'0.5', '0.6', '0.8', '1', '1.25', '1.5', '2'}, labels
    assert '1' in labels


def test_temperature_axis_covers_a_wide_trajectory_with_few_round_ticks(tmp_path):
    import matplotlib.pyplot as plt
    from timm_mkd.plot import figure_run
    fig = figure_run(_written_log(tmp_path, [1.0, 2.0, 5.0, 12.0, 20.0]))
    try:
        scale, low, high, labels = _y_axis(fig)
    finally:
        plt.close(fig)
    assert scale == 'log' and low < 1.0 and high > 20.0
    assert 2 <= len(labels) <= 8 and {'1', '2', '5', '10', '20'} <= set(labels), labels
