"""The finite-difference hypergradient against the exact double-backward oracle."""
import math

import pytest
import timm
import torch

from timm_mkd import MKDTask
from timm_mkd.meta.meta_step import exact_hypergradient, finite_difference_hypergradient

from small_models import SmallCNN, briefly_trained_teacher, fmnist_batches


def _setup(opt_name: str, dtype=torch.float64, seed: int = 0, **options):
    torch.manual_seed(seed)
    student = SmallCNN(drop=0.2).to(dtype)
    teacher = SmallCNN(width=16, drop=0.0).to(dtype)
    # The look-ahead estimator: its forward keeps the RNG state the estimates replay (dropout masks).
    task = MKDTask(student, teacher, tau_t=3.0, tau_s=2.0, meta_interval=1, verbose=False, dtype=dtype,
                   estimator='lookahead', **options)
    if opt_name == 'sgd':
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
    elif opt_name == 'momentum':
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.05)
    x, y = fmnist_batches(32, dtype=dtype)
    xm, ym = fmnist_batches(32, offset=1000, dtype=dtype)
    return task, opt, (x, y), (xm, ym)


def _one_update(task, opt, x, y):
    """Warm the optimizer state with one plain step, then one step whose pre/post states we keep."""
    student = task.trainable_module
    for _ in range(2):
        theta = {n: p.detach().clone() for n, p in student.named_parameters()}
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
    return theta


@pytest.mark.parametrize('opt_name, kd_scale', [
    ('sgd', 'student'), ('momentum', 'student'), ('adamw', 'student'), ('sgd', 'product'), ('adamw', 'product')])
def test_finite_difference_matches_exact_oracle(opt_name, kd_scale):
    task, opt, (x, y), (xm, ym) = _setup(opt_name, kd_scale=kd_scale)
    theta = _one_update(task, opt, x, y)
    student, batch = task.trainable_module, task._last_batch
    log_taus = (task.tau.log_tau_t, task.tau.log_tau_s)
    oracle = exact_hypergradient(student, opt, theta, batch, task.criterion, task.task_loss_weight,
                                 xm, ym, log_taus, task.distill_loss_weight, kd_scale=kd_scale)
    fd = finite_difference_hypergradient(student, opt, theta, batch, xm, ym, log_taus, task.distill_loss_weight,
                                         fd_eps=1e-2, kd_scale=kd_scale)
    rel = (fd.grad - oracle).norm() / oracle.norm()
    print(f'{opt_name}/{kd_scale}: oracle={oracle.tolist()} fd={fd.grad.tolist()} rel_err={rel:.2e}')
    assert oracle.norm() > 0
    assert rel < 1e-2


def test_finite_difference_error_shrinks_with_step():
    """Central differences: the error falls roughly quadratically with the step size."""
    task, opt, (x, y), (xm, ym) = _setup('sgd')
    theta = _one_update(task, opt, x, y)
    args = (task.trainable_module, opt, theta, task._last_batch)
    log_taus = (task.tau.log_tau_t, task.tau.log_tau_s)
    oracle = exact_hypergradient(*args, task.criterion, task.task_loss_weight, xm, ym, log_taus, task.distill_loss_weight)
    errs = []
    for eps in (1e-1, 1e-2):
        fd = finite_difference_hypergradient(*args, xm, ym, log_taus, task.distill_loss_weight, fd_eps=eps)
        errs.append(float((fd.grad - oracle).norm() / oracle.norm()))
    print('rel errors at fd_eps 1e-1, 1e-2:', errs)
    assert errs[1] < errs[0] / 10


def test_meta_step_runs_on_vit_with_fused_attention():
    """timm's ViT uses F.scaled_dot_product_attention (no double backward on CPU); the FD path needs none."""
    torch.manual_seed(0)
    student = timm.create_model('test_vit', num_classes=10, in_chans=1, img_size=28, patch_size=4)
    assert any(getattr(m, 'fused_attn', False) for m in student.modules()), 'expected fused attention'
    teacher = SmallCNN(width=16, drop=0.0)
    # The look-ahead estimator: the default ('calibration') never runs the student in a meta step. Its
    # hypergradient here lowers tau_t from 1, so tau_min is below 1: at the default bound tau_t would not move.
    task = MKDTask(student, teacher, meta_interval=2, meta_lr=0.05, verbose=False, estimator='lookahead',
                   tau_min=0.5)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x, y = fmnist_batches(16)
    xm, ym = fmnist_batches(16, offset=500)
    task.attach(opt, [(xm, ym)])
    start = task.temperatures()
    forwards = []
    student.register_forward_hook(lambda *a: forwards.append(1))
    for _ in range(4):
        opt.zero_grad()
        task(x, y)['loss'].backward()
        opt.step()
    assert task.meta_steps == 2 and task.meta_skipped == 0  # updates 2 and 4
    assert len(forwards) == 4 + 2 * 3  # each meta step: the meta batch, then the +eps and -eps forwards
    assert task.temperatures() != start and 0.5 < task.temperatures()[0] < 1.0  # moved, not onto a bound
    assert all(torch.isfinite(torch.tensor([task.last_record['hypergrad_t'], task.last_record['hypergrad_s']])))


def _briefly_trained_teacher_logits():
    """``briefly_trained_teacher`` in float64: its logits on 256 held-out images, with their labels."""
    teacher = briefly_trained_teacher(torch.float64)
    xm, ym = fmnist_batches(256, offset=3000, dtype=torch.float64)
    with torch.no_grad():
        return teacher(xm), ym


def test_calibration_gradient_vanishes_at_the_teachers_calibrated_temperature():
    """The calibration estimator's zero is the temperature that minimises the teacher's held-out NLL
    (found independently by a grid), it points towards it from above and below, and rows with
    non-finite teacher logits are left out."""
    from timm_mkd.meta.meta_step import calibration_hypergradient
    z, ym = _briefly_trained_teacher_logits()
    grid = torch.linspace(-1.5, 1.5, 3001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(z / t.exp(), ym) for t in grid])
    best = grid[nll.argmin()]
    g = lambda lt: calibration_hypergradient(z, ym, (torch.tensor(lt), torch.tensor(0.0))).grad
    assert abs(float(g(float(best))[0])) < 1e-3
    assert float(g(float(best) + 0.5)[0]) > 0 and float(g(float(best) - 0.5)[0]) < 0
    assert float(g(0.3)[1]) == 0.0
    z_bad = z.clone()
    z_bad[:7] = float('nan')
    ref = calibration_hypergradient(z[7:], ym[7:], (torch.tensor(0.3), torch.tensor(0.0))).grad
    assert torch.allclose(calibration_hypergradient(z_bad, ym, (torch.tensor(0.3), torch.tensor(0.0))).grad, ref)


def test_calibrated_log_temperature_solves_what_the_calibration_gradient_follows():
    """The warm start's exact solver returns the grid minimum of the teacher's NLL, the nearer bound when the
    minimum lies outside the bounds, the same answer for one-hot soft targets, and ignores non-finite rows."""
    from timm_mkd.meta.meta_step import calibrated_log_temperature
    z, ym = _briefly_trained_teacher_logits()
    grid = torch.linspace(math.log(0.25), math.log(8.0), 6001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(z / t.exp(), ym) for t in grid])
    best = float(grid[nll.argmin()])
    solved = float(calibrated_log_temperature(z, ym, 0.25, 8.0))
    print('grid', best, 'solved', solved)
    assert abs(solved - best) < 2 * float(grid[1] - grid[0])
    soft = torch.nn.functional.one_hot(ym, 10).double()
    assert float(calibrated_log_temperature(z, soft, 0.25, 8.0)) == pytest.approx(solved, abs=1e-9)
    z_bad = z.clone()
    z_bad[:5, 3] = float('inf')
    assert float(calibrated_log_temperature(z_bad, ym, 0.25, 8.0)) == pytest.approx(
        float(calibrated_log_temperature(z[5:], ym[5:], 0.25, 8.0)), abs=1e-9)
    tau_best = math.exp(best)
    assert float(calibrated_log_temperature(z, ym, tau_best * 2, tau_best * 4)) == pytest.approx(math.log(tau_best * 2))
    assert float(calibrated_log_temperature(z, ym, tau_best / 4, tau_best / 2)) == pytest.approx(math.log(tau_best / 2))
    assert math.isnan(float(calibrated_log_temperature(z_bad[:5], ym[:5], 0.25, 8.0)))


def test_calibration_estimator_takes_the_meta_targets_as_given():
    """The calibration estimator's warm start is the solver's answer on the meta labels, one-hot soft meta targets
    give the same answer, and its gradient vanishes there."""
    from timm_mkd.config import MKDConfig
    from timm_mkd.meta.estimators import CalibrationEstimator
    from timm_mkd.meta.meta_step import calibrated_log_temperature, calibration_hypergradient
    z, ym = _briefly_trained_teacher_logits()
    est = CalibrationEstimator(MKDConfig())
    solved = float(est.solve(z, ym, 0.25, 8.0).grad[0])
    assert solved == pytest.approx(float(calibrated_log_temperature(z, ym, 0.25, 8.0)), abs=1e-12)
    soft = torch.nn.functional.one_hot(ym, 10).double()
    assert float(est.solve(z, soft, 0.25, 8.0).grad[0]) == pytest.approx(solved, abs=1e-9)
    g = calibration_hypergradient(z, soft, (torch.tensor(solved), torch.tensor(0.0))).grad
    assert abs(float(g[0])) < 1e-6


def test_calibration_step_under_bf16_autocast_matches_float32():
    """The default meta step under AMP: the teacher's meta-batch forward runs in the training precision
    (``meta_autocast``); its hypergradient and its warm-start temperature stay within 5% of float32."""
    torch.manual_seed(0)
    student, teacher = SmallCNN(drop=0.0), SmallCNN(width=16, drop=0.0)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    x, y = fmnist_batches(256)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher.train()(x), y).backward()
        opt.step()
    meta = [fmnist_batches(128, offset=3000 + 128 * i) for i in range(2)]
    results = {}
    for name, autocast in (('fp32', None), ('bf16', lambda: torch.autocast('cpu', dtype=torch.bfloat16))):
        # tau_min below this teacher's calibrated ~0.58, so the warm start is compared unclipped (the default 1
        # would clip both to 1 and make the comparison empty).
        task = MKDTask(student, teacher, tau_t=4.0, tau_s=4.0, meta_interval=1, warm_start_batches=2,
                       tau_min=0.5, meta_autocast=autocast, verbose=False)
        sgd = torch.optim.SGD(student.parameters(), lr=0.0)
        task.attach(sgd, meta)
        grad = task.meta.hypergradient(*meta[0]).grad[0]
        sgd.zero_grad()
        task(x[:32], y[:32])['loss'].backward()
        sgd.step()  # the warm start
        task.detach()
        results[name] = (float(grad), math.log(task.temperatures()[0]))
    print(results)
    (g32, t32), (g16, t16) = results['fp32'], results['bf16']
    assert g32 > 0 and abs(g16 - g32) <= 0.05 * abs(g32)
    assert t32 < math.log(0.9)  # the warm start landed below 1, inside the bounds
    assert abs(t16 - t32) <= 0.05 * abs(t32) + 0.01
