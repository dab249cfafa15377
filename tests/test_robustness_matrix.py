"""``benchmarks/robustness_matrix.py``'s cells: each parses into ``quality.py``'s arguments, and cells that name
the same teacher share its cache file (so their rows pair on one teacher), while the student recipe is the cell's."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import quality  # noqa: E402
import robustness_matrix  # noqa: E402


def _cell(cell, *extra):
    return robustness_matrix.cell_args(cell, robustness_matrix.parse_args(['--cells', cell, '--csv', 'x.csv', *extra]))


@pytest.mark.parametrize('tune', [False, True])
def test_cells_share_a_teacher_only_where_they_name_the_same_one(tune):
    extra = ['--tune'] if tune else []
    path = {cell: quality.teacher_path(_cell(cell, *extra)) for cell in robustness_matrix.CELLS}
    mild, own, overconf = path['vit-strong'], path['vit-heavy-own'], path['vit-ra-overconf']
    assert len({mild, own, overconf}) == 3
    for cell in ('cnn-strong', 'vit-heavy-mild', 'cnn-heavy-mild', 'vit-ra-mild', 'cnn-ra-mild'):
        assert path[cell] == mild, cell
    assert path['cnn-heavy-own'] == own
    for cell in ('cnn-ra-overconf', 'vit-heavy-overconf', 'cnn-heavy-overconf'):
        assert path[cell] == overconf, cell
    assert all(p.endswith('_noval.pth') == tune for p in path.values())


def test_a_cell_has_its_own_student_and_recipe():
    heavy = quality.student_recipe(_cell('vit-heavy-overconf'))
    assert heavy['re_prob'] == 0.25 and heavy['scale'] == (0.08, 1.0) and 'inc1' in heavy['aa']
    assert quality.student_recipe(_cell('cnn-heavy-overconf')) == heavy
    assert quality.student_recipe(_cell('cnn-ra-mild')) == quality.student_recipe(_cell('vit-ra-mild'))
    assert _cell('cnn-ra-mild').student == 'cnn'
    assert _cell('vit-heavy-overconf').student == 'vit' and _cell('cnn-heavy-overconf').student == 'cnn'
    ra = quality.student_recipe(_cell('vit-ra-mild'))
    assert ra == quality.student_recipe(_cell('vit-ra-overconf')) and ra['re_prob'] == 0.0
    mixup = {cell: quality.AUGS[_cell(cell).aug][1:3] for cell in ('vit-ra-mild', 'vit-strong', 'vit-heavy-overconf')}
    assert mixup == {'vit-ra-mild': (0.0, 0.0), 'vit-strong': (0.8, 1.0), 'vit-heavy-overconf': (0.8, 1.0)}


def test_a_job_claim_is_exclusive_and_dies_with_its_process(tmp_path):
    import subprocess
    csv_path = str(tmp_path / 'm.csv')
    key = ('vit-strong', 'mkd', 1.0, 'defaults', 3)
    first, second = robustness_matrix.JobClaim(csv_path, key), robustness_matrix.JobClaim(csv_path, key)
    assert first.acquire()
    assert not second.acquire()                     # another open file: refused while the first holds it
    other = robustness_matrix.JobClaim(csv_path, key[:-1] + (4,))
    assert other.acquire()                          # another job is free
    first.release()
    other.release()
    assert second.acquire()
    second.release()
    # A process that dies holding a claim (no release, no clean-up) leaves nothing that blocks a resumed study.
    code = ('import os, sys; sys.path.insert(0, "benchmarks"); import robustness_matrix as m; '
            f'assert m.JobClaim({csv_path!r}, {key!r}).acquire(); os._exit(0)')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert robustness_matrix.JobClaim(csv_path, key).acquire()


def test_every_shard_walks_every_job_from_its_own_start():
    jobs = list(range(10))
    orders = [robustness_matrix.shard_order(jobs, f'{k}/3') for k in range(3)]
    assert [o[0] for o in orders] == [0, 3, 6]
    assert all(sorted(o) == jobs for o in orders)
    with pytest.raises(SystemExit, match='K must be in 0..N-1'):
        robustness_matrix.shard_order(jobs, '3/3')


def test_a_file_takes_rows_of_one_teacher_per_cell(tmp_path):
    path = str(tmp_path / 'm.csv')
    robustness_matrix.check_same_teacher(path, 'vit-x', 'aaaa')          # no file yet: nothing to disagree with
    robustness_matrix.append_locked(path, dict(cell='vit-x', method='kd', tau=1.0, seed=0, top1=70.0, teacher='aaaa'))
    robustness_matrix.check_same_teacher(path, 'vit-x', 'aaaa')
    robustness_matrix.check_same_teacher(path, 'cnn-x', 'bbbb')          # another cell may have its own teacher
    with pytest.raises(SystemExit, match=r'cell vit-x run with teacher aaaa, .* teacher is bbbb.*--csv'):
        robustness_matrix.check_same_teacher(path, 'vit-x', 'bbbb')
