"""``benchmarks/matrix_report.py --pool``: the bar per cell over replicates (files) and teacher draws (teachers)."""
import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import matrix_report  # noqa: E402

FIELDS = ['cell', 'method', 'tau', 'seed', 'top1', 'variant', 'tau_t_final', 'tau_s_final', 'teacher_tau_cal',
          'split', 'teacher']


def _rows(teacher, top1, mkd_variant='defaults', cell='vit-x'):
    """Rows of one cell: ``top1`` maps 'KD 1' / 'KD 2' / 'KD 4' / 'MKD' to a top-1 per seed."""
    out = []
    for label, values in top1.items():
        for seed, value in enumerate(values):
            mkd = label == 'MKD'
            tau = 1.0 if mkd else float(label[3:])
            out.append(dict(cell=cell, method='mkd' if mkd else 'kd', tau=tau, seed=seed, top1=value,
                            variant=mkd_variant if mkd else '', tau_t_final=1.5 if mkd else tau,
                            tau_s_final=1.5 if mkd else tau, teacher_tau_cal=2.0, split='test', teacher=teacher))
    return out


def _write(path, rows):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_pool_checks_each_teacher_on_its_own_and_averages_replicates(tmp_path):
    holds = {'KD 1': [70, 71, 72], 'KD 2': [70, 70, 70], 'KD 4': [60, 60, 60], 'MKD': [71, 71, 72]}  # +0.33 / +0.33
    fails = {'KD 1': [70, 70], 'KD 2': [72, 72], 'KD 4': [60, 60], 'MKD': [69, 70]}                    # -0.50 / -2.50
    # A second teacher in the same file is its own replicate, even on the same seeds; other variants are ignored.
    first = _write(tmp_path / 'a.csv', _rows('t1', holds) + _rows('t2', fails)
                   + _rows('t1', {'MKD': [0, 0, 0]}, mkd_variant='other'))
    second = _write(tmp_path / 'b.csv', _rows('t3', holds))
    lines = matrix_report.pooled_table([first, second]).splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip('|').split('|')]
    assert cells[:4] == ['vit-x', 'test', '3', '8']
    assert cells[4] == '+0.06 (-0.50 to +0.33)'    # (1/3 + 1/3 - 1/2) / 3
    assert cells[5] == '-0.61 (-2.50 to +0.33)'    # (1/3 + 1/3 - 5/2) / 3
    assert cells[6] == '2 of 3'


def test_command_line_pools_and_refuses_a_missing_file(tmp_path, capsys):
    path = _write(tmp_path / 'a.csv', _rows('t1', {'KD 1': [70, 71], 'KD 2': [70, 70], 'KD 4': [60, 60],
                                                   'MKD': [70, 71]}))
    assert matrix_report.main(['--pool', path]) == 0
    assert '| vit-x | test | 1 | 2 |' in capsys.readouterr().out
    for argv in ([str(tmp_path / 'missing.csv')], ['--pool', path, str(tmp_path / 'missing.csv')]):
        with pytest.raises(SystemExit) as stop:
            matrix_report.main(argv)
        assert stop.value.code == 2
        assert 'missing.csv does not exist' in capsys.readouterr().err


def test_figure_wraps_cells_into_rows_of_six(tmp_path):
    import matplotlib.image
    top1 = {'KD 1': [70, 71], 'KD 2': [70, 70], 'KD 4': [60, 60], 'MKD': [70, 71]}
    shape = {}
    for n in (6, 8):
        path = _write(tmp_path / f'm{n}.csv', [r for i in range(n) for r in _rows('t1', top1, cell=f'vit-{i}')])
        png = str(tmp_path / f'm{n}.png')
        assert matrix_report.main([path, png]) == 0
        shape[n] = matplotlib.image.imread(png).shape[:2]
    # Eight cells: a second pair of rows (top-1, tau_t) under the first six, not a wider figure.
    assert shape[8] == (2 * shape[6][0], shape[6][1])


def test_summary_gives_the_paired_difference_to_kd1_with_its_sd(tmp_path):
    # MKD - KD 1 per seed: +1, -1, +3 -> mean +1.00, sd 2.00; best fixed is KD 2 (71.00), MKD 70.00 -> -1.00,
    # so the cell fails.
    runs = {'KD 1': [69, 71, 67], 'KD 2': [71, 71, 71], 'KD 4': [60, 60, 60], 'MKD': [70, 70, 70]}
    text = matrix_report.report(_write(tmp_path / 'a.csv', _rows('t1', runs)))
    row = next(line for line in text.splitlines() if line.startswith('| vit-x |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[7] == '+1.00 ± 2.00' and cells[8] == '-1.00 (KD 2)' and cells[-1] == 'fails'
    # On one seed there is no sd to give.
    one = {k: v[:1] for k, v in runs.items()}
    text = matrix_report.report(_write(tmp_path / 'b.csv', _rows('t1', one)))
    row = next(line for line in text.splitlines() if line.startswith('| vit-x |'))
    assert [c.strip() for c in row.strip('|').split('|')][7] == '+1.00'


def test_a_cell_with_rows_of_two_teachers_is_refused_with_the_fix(tmp_path, capsys):
    # Rows pair by seed: KD of one teacher against MKD of another would be a comparison of two teachers.
    path = _write(tmp_path / 'a.csv', _rows('t1', {'KD 1': [70, 71], 'KD 2': [70, 70], 'KD 4': [60, 60]})
                  + _rows('t2', {'MKD': [72, 73]}))
    with pytest.raises(SystemExit) as stop:
        matrix_report.main([path])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert 'cell vit-x has rows of 2 teachers (t1, t2)' in err and f'--pool {path}' in err
    # The same rows as two files of one teacher each report without complaint.
    assert matrix_report.main([_write(tmp_path / 'b.csv', _rows('t1', {'KD 1': [70, 71], 'KD 2': [70, 70],
                                                                         'KD 4': [60, 60], 'MKD': [72, 73]}))]) == 0
