"""Robustness matrix: MKD against timm's fixed-temperature KD across teachers, students and recipes.

Each *cell* is one (student, student recipe, teacher) combination of ``quality.py``'s study; in every cell
the same seeds run KD at tau 1, 2 and 4 and MKD (library defaults, or a variant), paired by seed. The
``teacher_tau_cal`` column is the teacher's calibrated temperature on the cell's training views of the held-out
meta images (hard labels, no mixup): how unsure the teacher is of what the student trains on.

Cells (``CELLS``, all run by default), each with the ViT and the CNN student:

* ``*-strong``: RandAugment m9 + mixup/cutmix + label smoothing, teacher trained on mild crops;
* ``*-heavy-mild``: a DeiT-style heavy recipe (RandAugment ``-inc1``, crops from 8%, random erasing 0.25,
  mixup/cutmix, smoothing) with the same mild-crop teacher;
* ``*-heavy-own``: the heavy recipe, teacher trained on the student's own recipe (no mixup);
* ``*-ra-overconf``: RandAugment + smoothing only, an overconfident teacher (60 epochs on 5000 images);
* ``*-heavy-overconf``: the heavy recipe with the overconfident teacher (the teacher least sure of the student's
  views);
* ``*-ra-mild``: RandAugment + smoothing only with the mild-crop teacher.

Rows are appended to the CSV at once (a file lock lets several processes share it), finished runs are skipped and
a running job is claimed by a lock of its own, so a study can run in parallel processes (``--shard K/N``, started
at any time) and resume.

    python benchmarks/robustness_matrix.py --tune --device cuda --shard 0/8   # one of 8 processes
    python benchmarks/robustness_matrix.py --report                           # tables, bar check and figure
"""
import argparse
import csv
import fcntl
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from common import MEAN, STD  # noqa: E402

HEAVY = ['--aug', 'heavy', '--scale-min', '0.08', '--reprob', '0.25']
RA = ['--aug', 'ra']
OWN = ['--teacher-recipe', 'student']
OVERCONF = ['--teacher-images', '5000', '--teacher-epochs', '60', '--teacher-steps', '2000']
CELLS = {
    'vit-strong': ['--student', 'vit'],
    'cnn-strong': ['--student', 'cnn'],
    'vit-heavy-mild': ['--student', 'vit'] + HEAVY,
    'cnn-heavy-mild': ['--student', 'cnn'] + HEAVY,
    'vit-heavy-own': ['--student', 'vit'] + HEAVY + OWN,
    'cnn-heavy-own': ['--student', 'cnn'] + HEAVY + OWN,
    'vit-ra-overconf': ['--student', 'vit'] + RA + OVERCONF,
    'cnn-ra-overconf': ['--student', 'cnn'] + RA + OVERCONF,
    'vit-heavy-overconf': ['--student', 'vit'] + HEAVY + OVERCONF,
    'cnn-heavy-overconf': ['--student', 'cnn'] + HEAVY + OVERCONF,
    'vit-ra-mild': ['--student', 'vit'] + RA,
    'cnn-ra-mild': ['--student', 'cnn'] + RA,
}
METHODS = ['kd:1', 'kd:2', 'kd:4', 'mkd:1']
FIELDS = ['cell', 'method', 'tau', 'seed', 'top1', 'variant', 'tau_t_final', 'tau_s_final', 'teacher_tau_cal',
          'split', 'teacher', 'timm_mkd_version', 'steps', 'wall_s', 'schedule']
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'results')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cells', nargs='+', default=list(CELLS), choices=list(CELLS))
    p.add_argument('--methods', nargs='+', default=METHODS,
                   help="kd:TAU or mkd:TAU[:KEY=VALUE,...] (MKDTask arguments, or meta_views=train|eval; without them: "
                        "library defaults)")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4, 5])
    p.add_argument('--tune', action='store_true', help='validation split (for choosing methods; never the test split)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--shard', default='0/1',
                   help='K/N: the K-th of N processes sharing the CSV; each starts at its own point of the job list '
                        'and runs every job no other process has run or is running')
    p.add_argument('--teacher-seed', type=int, default=quality.TEACHER_SEED,
                   help='another draw of every cell\'s teacher (its own cache file; by default its own CSV, '
                        'robustness_matrix[_tune]_tsSEED.csv, since rows are keyed without the teacher)')
    p.add_argument('--teachers-only', action='store_true', help='train / cache the cells\' teachers and stop')
    p.add_argument('--csv', default=None, help='default results/robustness_matrix[_tune].csv')
    p.add_argument('--report', action='store_true', help='tables, bar check and figure from the CSV only')
    p.add_argument('--png', default=None)
    args = p.parse_args(argv)
    draw = quality.teacher_draw_suffix(args.teacher_seed)
    args.csv = args.csv or os.path.join(RESULTS, 'robustness_matrix' + ('_tune' if args.tune else '') + draw + '.csv')
    args.png = args.png or os.path.splitext(args.csv)[0] + '.png'
    return args


def cell_args(cell, args):
    """``quality.py``'s arguments for one cell."""
    extra = ['--tune'] if args.tune else []
    qargs = quality.parse_args(CELLS[cell] + extra + ['--device', args.device, '--steps', str(args.steps),
                                                      '--teacher-seed', str(args.teacher_seed), '--tag', '_matrix'])
    qargs.traj_dir = os.path.join(os.path.splitext(args.csv)[0] + '_trajectories', cell)
    return qargs


def parse_method(spec):
    """``'mkd:1:estimator=mixture,meta_lr=0.05'`` -> ``('mkd', 1.0, ['estimator=mixture', 'meta_lr=0.05'])``."""
    parts = spec.split(':', 2)
    return parts[0], float(parts[1]), (parts[2].split(',') if len(parts) > 2 and parts[2] else [])


def set_method_args(qargs, kw):
    """Put a method's ``KEY=VALUE`` settings on ``quality.py``'s arguments (``meta_views`` has its own)."""
    qargs.meta_views = next((v.split('=', 1)[1] for v in kw if v.startswith('meta_views=')), 'auto')
    qargs.mkd_kw = [v for v in kw if not v.startswith('meta_views=')]


def job_key(seed, cell, spec, args):
    """The CSV key ``(cell, method, tau, variant, seed)`` of one job."""
    method, tau, kw = parse_method(spec)
    if method != 'mkd':
        return cell, method, tau, '', seed
    qargs = cell_args(cell, args)
    set_method_args(qargs, kw)
    return cell, method, tau, quality.variant_name(qargs), seed


def teacher_tau_cal(qargs, teacher, meta_set) -> float:
    """The teacher's calibrated temperature on the cell's training views of the held-out meta images."""
    from timm_mkd.meta.calibration import calibrated_log_temperature
    from timm_mkd.data.meta_data import build_meta_loader
    loader = build_meta_loader(meta_set, input_size=(1, qargs.img_size, qargs.img_size), batch_size=250, mean=MEAN,
                               std=STD, crop_pct=1.0, seed=0, train_transform=quality.meta_train_transform(qargs))
    logits, targets = [], []
    teacher = teacher.to(qargs.device).eval()
    with torch.no_grad():
        for _ in range(max(1, len(meta_set) // 250)):
            x, y = next(loader)
            logits.append(teacher(x.to(qargs.device)).double().cpu())
            targets.append(y.cpu())
    return math.exp(float(calibrated_log_temperature(torch.cat(logits), torch.cat(targets), 0.05, 100.0)))


def append_locked(path, row):
    """Append ``row`` under an exclusive lock (several processes share one CSV); the header once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a+', newline='') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0, os.SEEK_END)
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if f.tell() == 0:
            w.writeheader()
        w.writerow({k: row.get(k, '') for k in FIELDS})
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def prepare_cell(cell, args):
    """Data, cached teacher and its calibrated temperature for one cell."""
    qargs = cell_args(cell, args)
    train_set, meta_set, eval_loader, teacher = quality.prepare_study(qargs)
    return qargs, teacher, train_set, meta_set, eval_loader, teacher_tau_cal(qargs, teacher, meta_set)


def read_rows(path):
    """The rows of the CSV at ``path`` (none if it does not exist), read under a shared lock (no half row of a
    process that is appending)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        return list(csv.DictReader(f))


def finished_jobs(path):
    """The job keys (``job_key``) of the rows already in the CSV at ``path``."""
    return {(r['cell'], r['method'], float(r['tau']), r['variant'], int(r['seed'])) for r in read_rows(path)}


def check_same_teacher(path, cell, teacher):
    """Stop unless every row of ``cell`` in the CSV at ``path`` was run with ``teacher`` (its weights' hash).

    Rows are keyed and paired by seed, not by teacher: a row of another teacher would count as this teacher's
    finished job, and a report would pair it with this teacher's rows.
    """
    others = sorted({r['teacher'] for r in read_rows(path) if r['cell'] == cell} - {teacher})
    if others:
        raise SystemExit(f"{path} holds rows of cell {cell} run with teacher {', '.join(others)}, and this run's "
                         f"teacher is {teacher}: rows are paired by seed, so one cell of a file must have one teacher. "
                         f"Fix: name a new file with --csv.")


class JobClaim:
    """An exclusive, non-blocking ``flock`` on one job's lock file beside the CSV, held while the job runs.

    A process runs a job only while it holds the claim and the job's row is not in the CSV yet, so processes that
    share a CSV never run one job twice, whenever each of them started; the kernel drops the lock of a process that
    dies, so an interrupted study resumes without stale claims.
    """

    def __init__(self, csv_path, key):
        self.folder = os.path.splitext(csv_path)[0] + '.locks'
        self.path = os.path.join(self.folder, '_'.join(str(k) for k in key).replace(os.sep, '-') + '.lock')
        self.file = None

    def acquire(self) -> bool:
        """True if this process now holds the claim, False if another process does."""
        os.makedirs(self.folder, exist_ok=True)
        self.file = open(self.path, 'a')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            self.file = None
            return False
        return True

    def release(self):
        """Remove the lock file and drop the claim; a process that opened the old file before the unlink and locks it
        afterwards finds the job's row already written and skips it."""
        if self.file is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.file.close()
            self.file = None
        try:
            os.rmdir(self.folder)
        except OSError:
            pass  # other claims are still held


def shard_order(jobs, shard):
    """Every job, starting at the ``K``-th of ``N`` equal parts (``shard`` = ``'K/N'``): processes that share a CSV
    start at different points of the list and then take whatever no other process has taken."""
    k, n = (int(v) for v in shard.split('/'))
    if not 0 <= k < n:
        raise SystemExit(f'--shard {shard}: K must be in 0..N-1, e.g. --shard 0/{n}')
    start = len(jobs) * k // n
    return jobs[start:] + jobs[:start]


def run(args):
    from timm_mkd import __version__
    torch.set_num_threads(1)
    done = finished_jobs(args.csv)
    jobs = [(seed, cell, m, job_key(seed, cell, m, args)) for seed in args.seeds for cell in args.cells
            for m in args.methods]
    jobs = shard_order([j for j in jobs if j[3] not in done], args.shard)
    cells = {}
    for cell in (args.cells if args.teachers_only else sorted({j[1] for j in jobs})):
        cells[cell] = prepare_cell(cell, args)
        check_same_teacher(args.csv, cell, cells[cell][0].teacher_sha)
        print(f'cell {cell}: teacher {cells[cell][0].teacher_sha}, calibrated tau on its training views '
              f'{cells[cell][5]:.3f}', flush=True)
    if args.teachers_only:
        return
    for seed, cell, spec, key in jobs:
        claim = JobClaim(args.csv, key)
        if not claim.acquire():
            print(f'skip {cell} {spec} seed {seed}: another process is running it', flush=True)
            continue
        try:
            if key in finished_jobs(args.csv):
                print(f'skip {cell} {spec} seed {seed}: another process has written it', flush=True)
                continue
            _, method, tau, variant, _ = key
            qargs, teacher, train_set, meta_set, eval_loader, tau_cal = cells[cell]
            set_method_args(qargs, parse_method(spec)[2])
            t0 = time.time()
            row = quality.run_student(qargs, method, tau, seed, teacher, train_set, meta_set, eval_loader)
            row.update(cell=cell, variant=variant, teacher_tau_cal=round(tau_cal, 4), split=row['eval_split'],
                       teacher=qargs.teacher_sha, timm_mkd_version=__version__)
            append_locked(args.csv, row)
        finally:
            claim.release()
        print(f'DONE {cell} {spec} seed {seed}: top-1 {row["top1"]:.2f} tau_t {row["tau_t_final"]} '
              f'({time.time() - t0:.0f}s)', flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        from matrix_report import report
        print(report(args.csv, args.png))
        return 0
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
