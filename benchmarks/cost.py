"""Cost benchmark: MKDTask against timm's LogitDistillationTask, same student, teacher, batch, data.

What is measured, and why this way:

* A "step" is what a training loop pays per optimizer update: task forward, backward,
  ``optimizer.step()`` (with MKD, the step's hooks run the parameter snapshot before the update
  and, every ``meta_interval`` updates, the meta step after it).
* With a meta step every N updates, MKD's per-step cost is a **mean over whole meta intervals**;
  the median of single steps would hide the meta step entirely. Each configuration therefore runs
  ``windows`` windows of 20 steps (20 is a multiple of every N measured, so each window holds
  exactly 20/N meta steps), after warm-up steps that are also a multiple of 20. The per-step cost
  of a run is the median over its windows of (window time / 20); a configuration's figure is the
  median over repeats. KD is measured the same way.
* Every run is a fresh subprocess (peak memory per configuration) and the configurations are
  interleaved (A B C ... A B C ...) so machine drift hits all of them alike.
* Memory, CPU: peak RSS above the post-setup baseline (models, data pool, optimizer built; the
  kernel's peak counter reset there when /proc allows it), and the raw peak RSS. CUDA:
  ``torch.cuda.max_memory_allocated`` above the post-setup allocation, and the raw peak.
* Where MKD's time goes: the MKD runs also time the pre-update parameter snapshot, the meta step
  and, inside it, the two finite-difference forwards and the buffer copies; the "forward
  overhead" is the median MKD non-meta step minus the median KD step.
* The exact double-backward oracle (``timm_mkd.meta.meta_step.exact_hypergradient``) needs non-fused
  attention; one extra subprocess disables fused attention and times one finite-difference meta
  step against one exact hypergradient on the same state.

Data: real Fashion-MNIST batches (train split minus the 5% meta holdout, mixup/cutmix soft
targets; meta batches from the holdout) are put in a small pool on the device before timing, so
data loading is out of the measurement and identical for every configuration.

Devices: ``--device cpu`` (default: the quality benchmark's student / teacher at 28 px) and
``--device cuda`` (``vit_small_patch16_224`` at 224 px, Fashion-MNIST upsampled to 3 x 224 x 224,
``--amp bf16`` or ``--amp fp16`` with timm's ``NativeScaler``). Nothing is CUDA-specific beyond
the device string.

Usage:
    python benchmarks/cost.py --quick            # < 5 minutes: KD vs MKD at the default interval
    python benchmarks/cost.py                    # intervals 1, 5, 10, 20 (+ default), oracle
    python benchmarks/cost.py --device cuda --amp bf16
    python benchmarks/cost.py --device cuda --amp fp16

The last line printed is ``mkd/kd time ratio R, memory ratio M at meta interval N``.
"""
import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'results')
sys.path.insert(0, HERE)

WINDOW = 20  # steps per timing window; a multiple of every meta interval measured


def default_interval() -> int:
    import inspect
    from timm_mkd import MKDTask
    return int(inspect.signature(MKDTask.__init__).parameters['meta_interval'].default)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='KD vs MKD at the default interval only, fewer repeats')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'])
    p.add_argument('--intervals', type=int, nargs='+', default=None)
    p.add_argument('--repeats', type=int, default=None, help='subprocess runs per configuration')
    p.add_argument('--windows', type=int, default=None, help='timed windows of 20 steps per run')
    p.add_argument('--warmup-windows', type=int, default=1)
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--meta-batch-size', type=int, default=None, help='default: the batch size')
    p.add_argument('--student', default=None)
    p.add_argument('--teacher', default=None)
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1: on a shared 2-core machine 2 threads oversubscribe badly)')
    p.add_argument('--no-oracle', action='store_true')
    p.add_argument('--csv', default=None)
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith('cuda')
    args.student = args.student or ('vit_small_patch16_224' if cuda else 'vit_tiny_d4_w64')
    args.teacher = args.teacher or ('resnet50' if cuda else 'resnet10t')
    args.img_size = args.img_size or (224 if cuda else 28)
    args.batch_size = args.batch_size or 128
    args.meta_batch_size = args.meta_batch_size or args.batch_size
    if args.intervals is None:
        d = default_interval()
        args.intervals = [d] if args.quick else sorted({1, 5, 10, 20, d})
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.windows = args.windows or (8 if args.quick else 4)
    if args.quick:
        args.no_oracle = True
    tag = args.device.split(':')[0] + ('' if args.amp == 'none' else '_' + args.amp) + ('_quick' if args.quick else '')
    args.csv = args.csv or os.path.join(RESULTS, f'cost_{tag}.csv')
    args.tag = tag
    return args


# ------------------------------------------------------------------------------ worker (one configuration)
def build(args, device):
    import timm
    import torch
    from common import MEAN, STD, fashion_mnist_root, set_norm, vit_student

    chans = 1 if args.img_size <= 32 else 3
    mean, std = MEAN * chans, STD * chans
    if args.student == 'vit_tiny_d4_w64':
        student = vit_student(img_size=args.img_size, depth=4, dim=64, heads=2)
    elif args.student == 'vit_tiny_d4_w96':
        student = vit_student(img_size=args.img_size, depth=4, dim=96, heads=3)
    else:
        student = set_norm(timm.create_model(args.student, num_classes=10, in_chans=chans, img_size=args.img_size)
                           if args.student.startswith('vit') else
                           timm.create_model(args.student, num_classes=10, in_chans=chans), mean, std)
    teacher = set_norm(timm.create_model(args.teacher, num_classes=10, in_chans=chans), mean, std).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.to(device).train()
    teacher.to(device)

    # Real data pool: 4 training batches (mixup / cutmix soft targets) and 4 meta batches.
    from timm.data import Mixup
    from torchvision.datasets import FashionMNIST
    from timm_mkd.data.meta_data import holdout_indices
    ds = FashionMNIST(fashion_mnist_root(), train=True, download=False)
    images = ds.data.float().div_(255).unsqueeze(1)
    labels = ds.targets
    train_idx, meta_idx = holdout_indices(len(labels), 0.05, 0)
    g = torch.Generator().manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    torch.manual_seed(0)

    def prep(x):
        x = (x - MEAN[0]) / STD[0]
        if args.img_size != 28:
            x = torch.nn.functional.interpolate(x, size=(args.img_size, args.img_size), mode='bilinear',
                                                align_corners=False)
        return x.expand(-1, chans, -1, -1).contiguous()

    pool, meta_pool = [], []
    tr = torch.tensor(train_idx)
    me = torch.tensor(meta_idx)
    for _ in range(4):
        i = tr[torch.randperm(len(tr), generator=g)[:args.batch_size]]
        x, y = mixup(prep(images[i]), labels[i])
        pool.append((x.to(device), y.to(device)))
        j = me[torch.randperm(len(me), generator=g)[:args.meta_batch_size]]
        meta_pool.append((prep(images[j]).to(device), labels[j].to(device)))
    return student, teacher, pool, meta_pool, mean, std


class Timer:
    def __init__(self, device):
        self.device = device
        self.times = []

    def sync(self):
        import torch
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def wrap(self, fn):
        def timed(*a, **kw):
            self.sync()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.sync()
                self.times.append(time.perf_counter() - t)
        return timed


def mem_now(device):
    import torch
    from common import peak_rss_mib
    if device.type == 'cuda':
        return torch.cuda.memory_allocated(device) / 2 ** 20, torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mib()


def make_run(args, kind, n, device, student, teacher, mean, std, meta_pool, amp_dtype, timers):
    """One configuration's task, optimizer and step function (the student is this configuration's own)."""
    import itertools
    import torch
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import LogitDistillationTask
    from timm.utils import NativeScaler
    from timm_mkd import MKDTask

    criterion = SoftTargetCrossEntropy()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.05)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = NativeScaler(device=device.type) if args.amp == 'fp16' else None
    if kind == 'kd':
        task = LogitDistillationTask(student, teacher, criterion=criterion, temperature=4.0, verbose=False,
                                     device=device)
    else:
        task = MKDTask(student, teacher, criterion=criterion, meta_interval=int(n), student_mean=mean,
                       student_std=std, verbose=False, device=device,
                       meta_autocast=autocast if amp_dtype else None)
        task.attach(optimizer, itertools.cycle(meta_pool))
        if timers is not None:
            # Timing wrappers only (behaviour unchanged); the hooks hold bound methods, so re-register.
            meta = task.meta  # the MetaController runs the hooks
            meta.detach()
            meta.before_update = timers['snapshot'].wrap(meta.before_update)
            meta.meta_step = timers['meta_step'].wrap(meta.meta_step)
            meta.hooks = [optimizer.register_step_pre_hook(meta.before_update),
                          optimizer.register_step_post_hook(meta.after_update)]
    # (no task.to(device): MKDTask._apply shadows nn.Module._apply; the task is built on `device`)
    task.train()

    def step(x, y):
        with autocast():
            loss = task(x, y)['loss']
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer)
        else:
            loss.backward()
            optimizer.step()
    return task, optimizer, step, criterion


def worker(args):
    """``--worker timing``: every configuration in this one process, windows interleaved round-robin.
    ``--worker mem:CONFIG``: one configuration alone (fresh process), peak memory of warm-up + one window."""
    import copy
    import itertools
    import torch
    import timm
    import timm_mkd.meta.meta_step as ms
    from common import reset_peak_rss

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode, _, config = args.worker.partition(':')
    if mode == 'oracle':
        timm.layers.set_fused_attn(False)
    torch.manual_seed(0)
    student0, teacher, pool, meta_pool, mean, std = build(args, device)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    configs = [config] if mode in ('mem', 'oracle') else ['kd'] + [f'mkd:{n}' for n in args.intervals]
    if mode == 'oracle':
        configs = [f'mkd:{config}']

    current = {'c': None}
    timers = {}
    for c in configs:
        if c.startswith('mkd'):
            timers[c] = {k: Timer(device) for k in ('snapshot', 'meta_step', 'fd_forwards', 'buffer_copies')}

    def route(name, fn):  # module-level helpers: attribute their time to the configuration running now
        def call(*a, **kw):
            t = timers.get(current['c'])
            return t[name].wrap(fn)(*a, **kw) if t else fn(*a, **kw)
        return call
    ms._student_logits = route('fd_forwards', ms._student_logits)
    ms.buffer_copies = route('buffer_copies', ms.buffer_copies)

    runs = {}
    for c in configs:
        kind, _, n = c.partition(':')
        student = copy.deepcopy(student0) if len(configs) > 1 else student0
        runs[c] = make_run(args, kind, n, device, student, teacher, mean, std, meta_pool, amp_dtype, timers.get(c))
    data = itertools.cycle(pool)
    sync = Timer(device).sync
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    base_cur, _ = mem_now(device)
    result = {'mode': mode, 'device': str(device), 'amp': args.amp, 'mem_base_mib': base_cur}

    if mode == 'oracle':
        task, optimizer, step, criterion = runs[configs[0]]
        result.update(oracle_meta_step(args, task, optimizer, step, data, criterion, device))
    else:
        wall = {c: [] for c in configs}
        cpu = {c: [] for c in configs}
        single = {c: [] for c in configs}
        meta_flags = {c: [] for c in configs}
        warm = args.warmup_windows * WINDOW
        n_windows = args.windows if mode == 'timing' else 1
        for rnd in range(args.warmup_windows + n_windows):
            order = configs if rnd % 2 == 0 else configs[::-1]  # A B C, C B A, ...: cancels linear drift
            for c in order:
                current['c'] = c
                task, optimizer, step, _ = runs[c]
                if rnd == args.warmup_windows and c in timers:
                    for tm in timers[c].values():
                        tm.times.clear()
                sync()
                w0, p0 = time.perf_counter(), time.process_time()
                for _ in range(WINDOW):
                    x, y = next(data)
                    before = getattr(task, 'meta_steps', 0)
                    t = time.perf_counter()
                    step(x, y)
                    sync()
                    if rnd >= args.warmup_windows:
                        single[c].append(time.perf_counter() - t)
                        meta_flags[c].append(getattr(task, 'meta_steps', 0) != before)
                w1, p1 = time.perf_counter(), time.process_time()
                if rnd >= args.warmup_windows:
                    wall[c].append((w1 - w0) / WINDOW)
                    cpu[c].append((p1 - p0) / WINDOW)
        for c in configs:
            r = {'step_s': statistics.median(wall[c]), 'window_means_s': wall[c],
                 'cpu_step_s': statistics.median(cpu[c]), 'cpu_window_means_s': cpu[c],
                 'plain_step_median_s': statistics.median(
                     [t for t, m in zip(single[c], meta_flags[c]) if not m] or [float('nan')])}  # N=1: none
            if c in timers:
                kind, _, n = c.partition(':')
                r['meta_steps'] = runs[c][0].meta_steps
                for name, tm in timers[c].items():
                    times = tm.times
                    if name == 'snapshot':  # the pre-hook runs every update but copies only before a meta step
                        times = sorted(times)[-max(1, len(times) // int(n)):]
                    r[f'{name}_s_per_call'] = statistics.median(times) if times else 0.0
                    r[f'{name}_calls'] = len(tm.times)
            result[c] = r
    cur, peak = mem_now(device)
    result['mem_peak_mib'] = peak
    result['mem_above_base_mib'] = peak - base_cur
    with open(args.out, 'w') as f:
        json.dump(result, f)


def oracle_meta_step(args, task, optimizer, step, data, criterion, device):
    """Time one finite-difference meta step against the exact double-backward hypergradient (non-fused attention)."""
    import torch
    from timm.utils import unwrap_model
    from timm_mkd.meta.meta_step import exact_hypergradient, finite_difference_hypergradient
    n = task.meta_interval
    # Train until just after an update that snapshotted theta (the real hook path), then time both.
    task.detach()
    fd_t, ex_t, fd_g, ex_g = [], [], [], []
    sync = Timer(device).sync
    for rep in range(3):
        for _ in range(2):
            x, y = next(data)
            step(x, y)
        student = unwrap_model(task.trainable_module)
        from timm_mkd.meta.meta_step import optimizer_params
        theta = {nme: p.detach().clone() for nme, p, _ in optimizer_params(student, optimizer)}
        x, y = next(data)
        step(x, y)
        mx, my = task.meta.batches.next(task._last_batch)  # (x, y) for the training stream
        taus = (task.tau.log_tau_t, task.tau.log_tau_s)
        sync(); t = time.perf_counter()
        h = finite_difference_hypergradient(student, optimizer, theta, task._last_batch, mx, my, taus,
                                            task.distill_loss_weight, fd_eps=task.config.fd_eps)
        sync(); fd_t.append(time.perf_counter() - t)
        sync(); t = time.perf_counter()
        g = exact_hypergradient(student, optimizer, theta, task._last_batch, criterion, task.task_loss_weight,
                                mx, my, taus, task.distill_loss_weight)
        sync(); ex_t.append(time.perf_counter() - t)
        fd_g.append(h.grad.tolist())
        ex_g.append(g.tolist())
    sync(); t = time.perf_counter()
    for _ in range(3):
        x, y = next(data)
        step(x, y)
    sync()
    plain = (time.perf_counter() - t) / 3
    return {'fd_meta_step_s': statistics.median(fd_t), 'exact_meta_step_s': statistics.median(ex_t),
            'nonfused_plain_step_s': plain, 'fd_grads': fd_g, 'exact_grads': ex_g, 'interval': n}


# ------------------------------------------------------------------------------ driver
def run_config(args, config):
    fd, out = tempfile.mkstemp(suffix='.json')
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', config, '--out', out, '--device', args.device,
           '--amp', args.amp, '--windows', str(args.windows), '--warmup-windows', str(args.warmup_windows),
           '--batch-size', str(args.batch_size), '--meta-batch-size', str(args.meta_batch_size),
           '--student', args.student, '--teacher', args.teacher, '--img-size', str(args.img_size),
           '--threads', str(args.threads), '--intervals', *map(str, args.intervals)]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f'worker {config} failed (exit {proc.returncode})')
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    res['wall_s'] = time.time() - t
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    os.makedirs(RESULTS, exist_ok=True)
    d = default_interval()
    configs = ['kd'] + [f'mkd:{n}' for n in args.intervals]
    print(f'cost benchmark on {args.device} (amp {args.amp}): student {args.student}, teacher {args.teacher}, '
          f'{args.img_size}px, batch {args.batch_size}, meta batch {args.meta_batch_size}; configs {configs}; '
          f'timing: {args.repeats} fresh process(es), each with all configs interleaved window by window, '
          f'{args.windows} timed windows of {WINDOW} steps per config after {args.warmup_windows * WINDOW} warm-up '
          f'steps; memory: one fresh process per config; default meta interval {d}', flush=True)
    t0 = time.time()
    timing = []
    for rep in range(args.repeats):
        r = run_config(args, 'timing')
        timing.append(r)
        print(f'  timing rep {rep}: ' + '; '.join(
            f'{c} {1000 * r[c]["step_s"]:.0f} ms (windows {" ".join(f"{1000 * w:.0f}" for w in r[c]["window_means_s"])})'
            for c in configs) + f' [{time.time() - t0:.0f}s]', flush=True)
    mem = {}
    for c in configs:
        mem[c] = run_config(args, f'mem:{c}')
        print(f'  memory {c}: peak +{mem[c]["mem_above_base_mib"]:.0f} MiB above base (raw {mem[c]["mem_peak_mib"]:.0f} MiB)'
              f' [{time.time() - t0:.0f}s]', flush=True)
    oracle = None
    if not args.no_oracle:
        try:
            oracle = run_config(args, f'oracle:{d}')
        except SystemExit as e:
            print(f'oracle could not run: {e}')

    med = lambda c, k: statistics.median(r[c][k] for r in timing)  # noqa: E731

    def paired(c, k):
        # Ratio to KD window by window (same round of the same process: adjacent in time), then the
        # median over all rounds and processes: robust to machine load that changes between rounds.
        return statistics.median(a / b for r in timing for a, b in zip(r[c][k], r['kd'][k]))
    kd_t, kd_cpu = med('kd', 'step_s'), med('kd', 'cpu_step_s')
    kd_m, kd_raw = mem['kd']['mem_above_base_mib'], mem['kd']['mem_peak_mib']
    rows = []
    for c in configs:
        m = mem[c]
        row = {
            'device': args.device, 'amp': args.amp, 'student': args.student, 'teacher': args.teacher,
            'img_size': args.img_size, 'batch_size': args.batch_size, 'meta_batch_size': args.meta_batch_size,
            'config': c.split(':')[0], 'meta_interval': c.split(':')[1] if ':' in c else '',
            'repeats': len(timing), 'windows': args.windows,
            'step_ms_median': round(1000 * med(c, 'step_s'), 2),
            'window_ms': ' '.join(f'{1000 * w:.0f}' for r in timing for w in r[c]['window_means_s']),
            'time_ratio_vs_kd': round(paired(c, 'window_means_s'), 4),
            'time_ratio_of_medians': round(med(c, 'step_s') / kd_t, 4),
            'cpu_step_ms_median': round(1000 * med(c, 'cpu_step_s'), 2),
            'cpu_time_ratio_vs_kd': round(paired(c, 'cpu_window_means_s'), 4),
            'mem_above_base_mib': round(m['mem_above_base_mib'], 1),
            'mem_ratio_vs_kd': round(m['mem_above_base_mib'] / kd_m, 4) if kd_m > 0 else '',
            'mem_peak_raw_mib': round(m['mem_peak_mib'], 1),
            'mem_raw_ratio_vs_kd': round(m['mem_peak_mib'] / kd_raw, 4),
            'plain_step_ms_median': round(1000 * med(c, 'plain_step_median_s'), 2)
            if med(c, 'plain_step_median_s') == med(c, 'plain_step_median_s') else '',
        }
        if c.startswith('mkd'):
            for k in ('snapshot', 'meta_step', 'fd_forwards', 'buffer_copies'):
                row[f'{k}_ms_per_call'] = round(1000 * med(c, f'{k}_s_per_call'), 2)
            over = med(c, 'plain_step_median_s') - med('kd', 'plain_step_median_s')
            row['forward_overhead_ms'] = round(1000 * over, 2) if over == over else '-'  # N=1 has no plain step
        rows.append(row)
    if oracle is not None:
        rows.append({'device': args.device, 'amp': args.amp, 'student': args.student, 'teacher': args.teacher,
                     'img_size': args.img_size, 'batch_size': args.batch_size, 'meta_batch_size': args.meta_batch_size,
                     'config': 'oracle_nonfused', 'meta_interval': d, 'repeats': 3,
                     'meta_step_ms_per_call': round(1000 * oracle['fd_meta_step_s'], 2),
                     'exact_meta_step_ms': round(1000 * oracle['exact_meta_step_s'], 2),
                     'plain_step_ms_median': round(1000 * oracle['nonfused_plain_step_s'], 2)})
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(args.csv, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cmd = ' '.join(['python benchmarks/cost.py'] + (argv if argv is not None else sys.argv[1:]))
    lines = [f'`{cmd}`: {args.device}, amp {args.amp}, student `{args.student}` {args.img_size}px, teacher '
             f'`{args.teacher}`, batch {args.batch_size}, meta batch {args.meta_batch_size}. Time per step = mean over '
             f'whole {WINDOW}-step windows (meta steps included), median over {args.windows} windows x '
             f'{len(timing)} process(es), configurations interleaved window by window; time ratio = median over '
             f'rounds of (window mean / KD window mean of the same round); CPU = process CPU time '
             f'(less sensitive to other load on a shared machine). Memory: peak above the post-setup baseline '
             f'in a fresh process per configuration ({args.warmup_windows * WINDOW + WINDOW} steps).', '',
             '| config | N | wall ms/step | time ratio | CPU ms/step | CPU ratio | mem above base (MiB) | mem ratio | raw peak (MiB) | raw ratio | snapshot ms | meta step ms | FD fwd ms/call | buffer copies ms/call | fwd overhead ms |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r['config'] == 'oracle_nonfused':
            continue
        lines.append('| {config} | {meta_interval} | {step_ms_median:.1f} | {time_ratio_vs_kd:.3f} | {cpu_step_ms_median:.1f} | '
                     '{cpu_time_ratio_vs_kd:.3f} | {mem_above_base_mib:.0f} | {mr} | {mem_peak_raw_mib:.0f} | '
                     '{mem_raw_ratio_vs_kd:.3f} | {a} | {b} | {c} | {e} | {f} |'.format(
                         mr=f'{r["mem_ratio_vs_kd"]:.3f}' if r['mem_ratio_vs_kd'] != '' else '-',
                         a=r.get('snapshot_ms_per_call', '-'), b=r.get('meta_step_ms_per_call', '-'),
                         c=r.get('fd_forwards_ms_per_call', '-'), e=r.get('buffer_copies_ms_per_call', '-'),
                         f=r.get('forward_overhead_ms', '-'), **r))
    if oracle is not None:
        lines += ['', f'Oracle (fused attention off, N={d}): one finite-difference meta step '
                      f'{1000 * oracle["fd_meta_step_s"]:.0f} ms, one exact double-backward hypergradient '
                      f'{1000 * oracle["exact_meta_step_s"]:.0f} ms ({oracle["exact_meta_step_s"] / oracle["fd_meta_step_s"]:.2f}x), '
                      f'a plain non-fused MKD training step {1000 * oracle["nonfused_plain_step_s"]:.0f} ms (median of 3 each). '
                      f'Hypergradients d L_meta / d (log tau_t, log tau_s), FD vs exact: '
                      + '; '.join(f'({a[0]:.3e}, {a[1]:.3e}) vs ({b[0]:.3e}, {b[1]:.3e})'
                                  for a, b in zip(oracle['fd_grads'], oracle['exact_grads']))]
    text = '\n'.join(lines) + '\n'
    with open(os.path.splitext(args.csv)[0] + '.md', 'w') as f:
        f.write(text)
    print(text)
    dn = d if f'mkd:{d}' in configs else args.intervals[-1]
    r = next(r for r in rows if r['config'] == 'mkd' and str(r['meta_interval']) == str(dn))
    mem_ratio = r['mem_ratio_vs_kd'] if r['mem_ratio_vs_kd'] != '' else r['mem_raw_ratio_vs_kd']
    print(f'mkd/kd time ratio {r["time_ratio_vs_kd"]:.3f}, memory ratio {mem_ratio:.3f} at meta interval {dn}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
