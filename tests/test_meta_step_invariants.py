"""Each invariant of a meta step (DESIGN.md section 1), asserted on its own.

The technique: optimizer step post-hooks run in registration order, so a hook registered
*before* ``task.attach`` sees the state right after the real optimizer update, and one registered
*after* it sees the state after the meta step. Everything but the temperatures must match.
"""
import math
import warnings

import pytest
import torch

from timm_mkd import MKDTask

from small_models import SmallCNN, briefly_trained_teacher, fmnist_batches, inside_bounds


ESTIMATORS = ('lookahead', 'calibration', 'mixture')


def _state(module):
    return {
        'params': {n: p.detach().clone() for n, p in module.named_parameters()},
        'buffers': {n: b.detach().clone() for n, b in module.named_buffers()},
        'grads': {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in module.named_parameters()},
        'grad_ids': {n: id(p.grad) for n, p in module.named_parameters()},
        'rng': torch.get_rng_state(),
    }


def _run(steps: int = 2, meta_batches=None, teacher=None, **task_kwargs):
    """Train ``steps`` updates with a meta step after each; return (task, before, after) snapshots per update.

    ``teacher``: by default an untrained SmallCNN (its calibrated temperature lies far above tau_max)."""
    torch.manual_seed(0)
    student = SmallCNN(drop=0.3)
    untrained = SmallCNN(width=16, drop=0.0)  # built either way: the same RNG stream after it
    teacher = untrained if teacher is None else teacher
    kwargs = dict(meta_interval=1, meta_lr=0.1, verbose=False)
    kwargs.update(task_kwargs)
    task = MKDTask(student, teacher, **kwargs)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    before, after = [], []
    opt.register_step_post_hook(lambda *a: before.append(_state(student)))
    task.attach(opt, meta_batches if meta_batches is not None else [fmnist_batches(32, offset=2000)])
    opt.register_step_post_hook(lambda *a: after.append(_state(student)))
    x, y = fmnist_batches(32)
    for _ in range(steps):
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
    return task, before, after


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_meta_step_changes_temperatures(estimator):
    """The temperature moves, and not merely onto a bound: the untrained teacher's calibration would clip at tau_max
    and tau 1 is the default tau_min, so the briefly trained teacher with tau_min 0.1 (measured: lookahead 0.83,
    calibration 0.37, mixture 0.28)."""
    task, _, _ = _run(estimator=estimator, teacher=briefly_trained_teacher(), tau_min=0.1)
    assert task.meta_steps == 2 + (estimator in ('calibration', 'mixture'))  # + its warm start before the first update
    tau_t = task.temperatures()[0]
    assert tau_t != 1.0 and inside_bounds(task, tau_t)


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_student_parameters_untouched(estimator):
    _, before, after = _run(estimator=estimator)
    for b, a in zip(before, after):
        for n in b['params']:
            assert torch.equal(b['params'][n], a['params'][n]), n


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_buffers_untouched(estimator):
    """BatchNorm running stats (and num_batches_tracked) after the meta step equal those of the real update."""
    _, before, after = _run(estimator=estimator)
    assert any('running_mean' in n for n in before[0]['buffers'])
    for b, a in zip(before, after):
        for n in b['buffers']:
            assert torch.equal(b['buffers'][n], a['buffers'][n]), n


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_grad_untouched(estimator):
    """Nothing lands in .grad: same tensors, same values."""
    _, before, after = _run(estimator=estimator)
    for b, a in zip(before, after):
        assert b['grad_ids'] == a['grad_ids']
        for n, g in b['grads'].items():
            assert g is not None and torch.equal(g, a['grads'][n]), n


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_temperature_grads_do_not_leak(estimator):
    task, _, _ = _run(estimator=estimator)
    assert task.tau.log_tau_t.grad is None and task.tau.log_tau_s.grad is None


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_training_rng_stream_untouched(estimator):
    """The global RNG after the meta step is exactly where the real update left it."""
    _, before, after = _run(estimator=estimator)
    for b, a in zip(before, after):
        assert torch.equal(b['rng'], a['rng'])


def test_perturbed_forwards_share_dropout_masks():
    """The two finite-difference forwards replay the training forward's dropout mask."""
    torch.manual_seed(0)
    student = SmallCNN(drop=0.5)
    task = MKDTask(student, SmallCNN(width=16, drop=0.0), meta_interval=1, verbose=False, estimator='lookahead')
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    masks = []
    student.drop.register_forward_hook(lambda m, i, o: masks.append((o == 0).clone()))
    task.attach(opt, [fmnist_batches(16, offset=3000)])
    x, y = fmnist_batches(16)
    opt.zero_grad()
    task(x, y)['loss'].backward()
    opt.step()
    # forward calls: training, meta batch, +e, -e
    assert len(masks) == 4
    train_mask, meta_mask, plus_mask, minus_mask = masks
    assert 0.2 < train_mask.float().mean() < 0.8
    assert torch.equal(plus_mask, minus_mask)
    assert torch.equal(plus_mask, train_mask)


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_non_finite_hypergradient_is_skipped_with_warning(estimator):
    xm, ym = fmnist_batches(16, offset=4000)
    xm = xm.clone()
    # One NaN pixel poisons the student's meta forward (lookahead); the calibration estimator leaves
    # out rows whose teacher logits are not finite, so there every row is poisoned.
    if estimator in ('calibration', 'mixture'):
        xm[:, 0, 0, 0] = float('nan')
    else:
        xm[0, 0, 0, 0] = float('nan')
    with pytest.warns(RuntimeWarning, match='skipped'):
        task, _, _ = _run(meta_batches=[(xm, ym)], estimator=estimator)
    n = 2 + (estimator in ('calibration', 'mixture'))  # the warm start before the first update is skipped too (and retried)
    assert task.meta_skipped == n and task.meta_steps == n
    assert task.temperatures() == pytest.approx((1.0, 1.0), rel=0, abs=1e-6)
    assert task.last_record['skipped'] == 1


def test_repeated_skips_are_reported_each_time(caplog):
    xm, ym = fmnist_batches(16, offset=4000)
    xm = xm.clone()
    xm[:, 0, 0, 0] = float('inf')
    with pytest.warns(RuntimeWarning):
        task, _, _ = _run(steps=12, meta_batches=[(xm, ym)])
    logged = [r for r in caplog.records if 'skipped' in r.getMessage()]
    assert len(logged) == 13 and task.meta_skipped == 13  # 12 updates + the warm start before the first
    assert logged[-1].levelname == 'ERROR' and 'frozen' in logged[-1].getMessage()
    assert task.temperatures() == pytest.approx((1.0, 1.0), rel=0, abs=1e-6)


def test_meta_controller_logs_under_its_own_name(caplog):
    xm, ym = fmnist_batches(16, offset=4000)
    xm = xm.clone()
    xm[:, 0, 0, 0] = float('inf')
    with pytest.warns(RuntimeWarning), caplog.at_level('WARNING', logger='timm_mkd'):
        _run(steps=1, meta_batches=[(xm, ym)])
    names = {r.name for r in caplog.records if 'skipped' in r.getMessage()}
    assert names == {'timm_mkd.meta.meta_controller'}, names


def test_temperatures_stay_inside_bounds():
    """A huge meta learning rate drives tau against a bound; projection keeps it there, not beyond."""
    task, _, _ = _run(steps=6, meta_lr=5.0, tau_t=4.0, tau_s=4.0, tau_min=1.0, tau_max=8.0)
    tau_t, tau_s = task.temperatures()
    assert 1.0 - 1e-6 <= tau_t <= 8.0 + 1e-6 and 1.0 - 1e-6 <= tau_s <= 8.0 + 1e-6
    assert min(tau_t, tau_s) <= 1.0 + 1e-5 or max(tau_t, tau_s) >= 8.0 - 1e-4


def test_meta_interval_counts_optimizer_updates():
    task, _, _ = _run(steps=7, meta_interval=3)
    assert task.updates == 7 and task.meta_steps == 1 + 2  # the warm start before update 1, then updates 3 and 6
    task, _, _ = _run(steps=7, meta_interval=3, warm_start_batches=0)
    assert task.updates == 7 and task.meta_steps == 2


def test_autocast_finite_difference_matches_fp32():
    """Under an outer bf16 autocast the FD forwards run in float32: the hypergradient barely moves."""
    from timm_mkd.meta.meta_step import finite_difference_hypergradient
    torch.manual_seed(0)
    student = SmallCNN(drop=0.0)
    task = MKDTask(student, SmallCNN(width=16, drop=0.0), verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = fmnist_batches(64)
    xm, ym = fmnist_batches(64, offset=5000)
    theta = {n: p.detach().clone() for n, p in student.named_parameters()}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = task(x, y)['loss']
    loss.backward()
    opt.step()
    args = (student, opt, theta, task._last_batch, xm, ym, (task.tau.log_tau_t, task.tau.log_tau_s), 1.0)
    fp32 = finite_difference_hypergradient(*args).grad
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = finite_difference_hypergradient(*args).grad
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16_meta = finite_difference_hypergradient(
            *args, meta_autocast=lambda: torch.autocast('cpu', dtype=torch.bfloat16)).grad
    rel = float((mixed - fp32).norm() / fp32.norm())
    rel_meta = float((bf16_meta - fp32).norm() / fp32.norm())
    print('fp32', fp32.tolist(), 'outer bf16 autocast', mixed.tolist(), rel, 'bf16 meta batch', rel_meta)
    assert rel < 0.05 and rel_meta < 0.05


def test_training_stream_meta_source_with_soft_targets():
    """attach(optimizer, 'train') scores the look-ahead on the training batch, mixup targets included."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    torch.manual_seed(0)
    student = SmallCNN(drop=0.1)
    task = MKDTask(student, SmallCNN(width=16, drop=0.0), criterion=SoftTargetCrossEntropy(),
                   meta_interval=2, meta_lr=0.1, verbose=False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    task.attach(opt, 'train')
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    for i in range(4):
        x, y = mixup(*fmnist_batches(32, offset=32 * i))
        assert y.dtype.is_floating_point and y.shape == (32, 10)
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
    assert task.meta_steps == 2 and task.meta_skipped == 0
    assert task.temperatures() != (1.0, 1.0)


class _FlakyTeacher(torch.nn.Module):
    """A real teacher whose logits overflow (inf/NaN) on some rows, as an fp16 teacher can."""

    def __init__(self):
        super().__init__()
        self.net = briefly_trained_teacher()  # calibrates inside the bounds, so the check below is not a clip
        self.num_classes, self.in_chans = 10, 1

    def forward(self, x):
        out = self.net(x)
        out = out.clone()
        out[0] = float('nan')
        out[3, 2] = float('inf')
        return out


def test_non_finite_teacher_logits_never_reach_temperatures_or_student():
    teacher = _FlakyTeacher()
    torch.manual_seed(0)
    student = SmallCNN(drop=0.1)
    # tau_min 0.05: this teacher's calibrated temperature on one 16-image batch lies near 0.25 (measured 0.2-0.3),
    # and the check below must not pass by a clip.
    task = MKDTask(student, teacher, meta_interval=1, meta_lr=0.1, tau_min=0.05, verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    task.attach(opt, [fmnist_batches(16, offset=6000)])
    for i in range(3):
        x, y = fmnist_batches(16, offset=16 * i)
        out = task(x, y)
        assert torch.isfinite(out['loss'])
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
    assert task.meta_skipped == 0 and task.meta_steps == 1 + 3  # the warm start, then one per update
    assert all(torch.isfinite(p).all() for p in student.parameters())
    tau_t, tau_s = task.temperatures()
    assert tau_s == tau_t and tau_t != 1.0 and inside_bounds(task, tau_t)  # tied (the default)


@pytest.mark.parametrize('tau', (1.0, 4.0, 8.0))
def test_warm_start_lands_on_the_calibrated_temperature_from_any_start(tau):
    """Before the first training forward uses a temperature, the calibration estimator sets tau_t to the exact
    minimiser of the teacher's NLL on ``warm_start_batches`` meta batches, whatever the initial value, so no update
    trains at the initial tau_t; tau_s stays where it is (the default) or, tied, keeps its ratio. The steps after
    it follow the gradient (they move tau by at most about meta_lr in log space)."""
    from timm_mkd.meta.meta_step import calibrated_log_temperature
    batches = [fmnist_batches(32, offset=2000 + 32 * i) for i in range(3)]
    x, y = fmnist_batches(32)
    for learn_tau_s in (False, True):
        torch.manual_seed(0)
        task = MKDTask(SmallCNN(drop=0.3), SmallCNN(width=16, drop=0.0), tau_t=tau, tau_s=tau / 2,
                       estimator='calibration', warm_start_batches=3, tau_min=0.1, meta_interval=1, meta_lr=0.1, learn_tau_s=learn_tau_s,
                       verbose=False)
        task.attach(torch.optim.SGD(task.trainable_module.parameters(), lr=0.05), batches)
        records = []
        task.add_meta_callback(records.append)
        with torch.no_grad():
            logits = torch.cat([task.teacher(xm, return_features=False) for xm, _ in batches])
        expected = math.exp(float(calibrated_log_temperature(logits, torch.cat([ym for _, ym in batches]), 0.1, 20.0)))
        out = task(x, y)  # the first training forward: the warm start runs before its loss
        tau_t, tau_s = task.temperatures()
        assert tau_t == pytest.approx(expected, rel=1e-5) and float(out['tau_t']) == pytest.approx(expected, rel=1e-5)
        assert tau_s == pytest.approx(expected / 2 if learn_tau_s else tau / 2, rel=1e-5)
        assert task.updates == 0 and task.meta_steps == 1 and len(records) == 1
        assert records[0]['step'] == 0 and records[0]['hypergrad_t'] == 0.0
        task(x, y)  # once only
        assert task.meta_steps == 1 and task.temperatures()[0] == tau_t
    before = math.log(tau_t)
    task2, _, _ = _run(steps=3, meta_batches=batches, tau_t=tau, tau_s=tau / 2, warm_start_batches=3, tau_min=0.1,
                       estimator='calibration')
    assert task2.meta_steps == 4 and abs(math.log(task2.temperatures()[0]) - before) <= 3 * 0.1 + 1e-6


def test_by_default_no_temperature_sharpens():
    """``tau_min`` is 1 by default: where the teacher's calibrated temperature lies below 1 (a briefly trained teacher
    is underconfident), the warm start and the meta steps after it keep tau_t at 1 instead of sharpening the teacher."""
    from timm_mkd.meta.meta_step import calibrated_log_temperature
    batches = [fmnist_batches(32, offset=2000 + 32 * i) for i in range(4)]
    x, y = fmnist_batches(32)
    teacher = briefly_trained_teacher()
    task = MKDTask(SmallCNN(drop=0.3), teacher, tau_t=4.0, meta_interval=1, verbose=False)
    assert task.config.tau_min == 1.0
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.05)
    task.attach(opt, batches)
    with torch.no_grad():
        logits = torch.cat([task.teacher(xm, return_features=False) for xm, _ in batches])
    unclipped = math.exp(float(calibrated_log_temperature(logits, torch.cat([ym for _, ym in batches]), 0.05, 20.0)))
    assert unclipped < 0.9  # the precondition: this teacher would be sharpened without the bound
    for _ in range(3):
        out = task(x, y)
        assert float(out['tau_t']) == 1.0
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
    assert task.meta_steps == 1 + 3 and task.temperatures() == (1.0, 1.0)


def test_warm_start_off_walks_from_the_initial_value():
    task, _, _ = _run(steps=1, tau_t=8.0, tau_s=8.0, warm_start_batches=0)
    assert abs(math.log(8.0) - math.log(task.temperatures()[0])) == pytest.approx(0.1, rel=1e-3)  # one Adam step


def test_warm_start_happens_once_and_not_again_after_resume():
    """A resumed task whose checkpoint has applied meta steps does not jump again: its next update runs one meta
    step (not a warm start and a step), which moves log tau_t by at most about one Adam step (meta lr 0.1)."""
    teacher = briefly_trained_teacher()
    task, _, _ = _run(steps=2, tau_t=8.0, tau_s=8.0, teacher=teacher, tau_min=0.1)
    assert inside_bounds(task, task.temperatures()[0]) and task.temperatures()[0] < 1.0  # off 8, not to a bound
    state = task.get_task_state()
    torch.manual_seed(0)
    student = SmallCNN(drop=0.3)
    resumed = MKDTask(student, teacher, tau_t=8.0, tau_s=8.0, tau_min=0.1, meta_interval=1, meta_lr=0.1,
                      verbose=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    resumed.attach(opt, [fmnist_batches(32, offset=2000)])
    resumed.load_task_state(state)
    assert not resumed.meta.warm_start_due
    x, y = fmnist_batches(32)
    opt.zero_grad()
    resumed(x, y)['loss'].backward()
    opt.step()
    assert resumed.meta_steps == task.meta_steps + 1
    assert abs(math.log(resumed.temperatures()[0]) - math.log(task.temperatures()[0])) <= 0.1 + 1e-6


def test_with_a_warm_start_the_initial_temperature_does_not_change_the_run():
    """The warm start runs before the first update and copies tau_t, so MKD from tau 1, 4 and 8 trains the
    student bit-identically: the result does not depend on the initial temperature, by construction.

    The teacher is the briefly trained one (calibrated below 1) with tau_min below its calibrated temperature: with
    the untrained teacher or the default tau_min=1 every run is projected onto a bound (tau_max or 1), which makes
    them equal whether the warm start copies tau_t or not."""
    batches = [fmnist_batches(32, offset=2000 + 32 * i) for i in range(4)]
    teacher = briefly_trained_teacher()
    runs = [_run(steps=4, meta_batches=batches, teacher=teacher, tau_t=tau, tau_min=0.25, meta_interval=2)
            for tau in (1.0, 4.0, 8.0)]
    (first, _, after), others = runs[0], runs[1:]
    tau_t = first.temperatures()[0]
    assert inside_bounds(first, tau_t) and tau_t < 0.95  # not projected, and below 1 (not the default bound)
    for task, _, other_after in others:
        assert task.temperatures() == first.temperatures()
        for part in ('params', 'buffers'):
            for name, value in after[-1][part].items():
                assert torch.equal(value, other_after[-1][part][name]), name
    off = _run(steps=4, meta_batches=batches, teacher=teacher, tau_t=4.0, tau_min=0.25, meta_interval=2,
               warm_start_batches=0)
    assert off[0].temperatures() != first.temperatures()  # without it the start does matter
