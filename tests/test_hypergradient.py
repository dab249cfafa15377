"""The finite-difference hypergradient against the exact double-backward oracle."""
import copy
import math

import pytest
import timm
import torch

from timm_mkd import MKDTask
from timm_mkd.meta_step import exact_hypergradient, finite_difference_hypergradient

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


@pytest.mark.parametrize('opt_name, kd_scale, mode', [
    ('sgd', 'student', 'shape'), ('momentum', 'student', 'shape'), ('adamw', 'student', 'shape'),
    ('sgd', 'product', 'shape'), ('sgd', 'student', 'full'), ('adamw', 'student', 'full'),
    ('sgd', 'student', 'full/calibrated'), ('adamw', 'student', 'shape/calibrated')])
def test_finite_difference_matches_exact_oracle(opt_name, kd_scale, mode):
    mode, _, meta_loss = mode.partition('/')
    meta_loss = meta_loss or 'ce'
    task, opt, (x, y), (xm, ym) = _setup(opt_name, kd_scale=kd_scale)
    theta = _one_update(task, opt, x, y)
    student, batch = task.trainable_module, task._last_batch
    log_taus = (task.tau.log_tau_t, task.tau.log_tau_s)
    oracle = exact_hypergradient(student, opt, theta, batch, task.criterion, task.task_loss_weight,
                                 xm, ym, log_taus, task.distill_loss_weight, kd_scale=kd_scale, mode=mode,
                                 meta_loss=meta_loss)
    fd = finite_difference_hypergradient(student, opt, theta, batch, xm, ym, log_taus, task.distill_loss_weight,
                                         fd_eps=1e-2, kd_scale=kd_scale, mode=mode, meta_loss=meta_loss)
    rel = (fd.grad - oracle).norm() / oracle.norm()
    print(f'{opt_name}/{kd_scale}/{mode}/{meta_loss}: oracle={oracle.tolist()} fd={fd.grad.tolist()} rel_err={rel:.2e}')
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


def test_shape_mode_ignores_how_the_kd_term_is_scaled():
    """'shape' judges temperatures by the direction of the KD push only. The two KD scale conventions
    (tau_s^2 and tau_t * tau_s) differ by the factor tau_t / tau_s, a pure change of strength: their 'shape'
    hypergradients must be the same vector up to that factor (the push's current size), while their 'full'
    hypergradients point in different directions."""
    task, opt, (x, y), (xm, ym) = _setup('sgd')  # tau_t = 3, tau_s = 2
    theta = _one_update(task, opt, x, y)
    args = (task.trainable_module, opt, theta, task._last_batch, xm, ym,
            (task.tau.log_tau_t, task.tau.log_tau_s), task.distill_loss_weight)
    grads = {(scale, mode): finite_difference_hypergradient(*args, kd_scale=scale, mode=mode).grad
             for scale in ('student', 'product') for mode in ('shape', 'full')}
    print({k: v.tolist() for k, v in grads.items()})
    shape_gap = (grads['product', 'shape'] - 1.5 * grads['student', 'shape']).norm() / grads['product', 'shape'].norm()
    full_cos = torch.nn.functional.cosine_similarity(grads['student', 'full'], grads['product', 'full'], dim=0)
    assert shape_gap < 1e-3
    assert full_cos < 0.9


def test_shape_mode_keeps_the_training_step():
    """The 'shape' normalisation has value 1: the student's training loss and its gradient are plain KD's."""
    from timm_mkd.meta_step import kd_term
    from timm_mkd.loss import two_temperature_kd_loss
    torch.manual_seed(0)
    zs = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(8, 10, dtype=torch.float64)
    taus = (torch.tensor(3.0, dtype=torch.float64).log(), torch.tensor(2.0, dtype=torch.float64).log())
    shaped = kd_term(zs, zt, taus, 0.7, 'student', 'shape', zs.detach())
    plain = 0.7 * two_temperature_kd_loss(zs, zt, taus[0].exp(), taus[1].exp())
    assert torch.allclose(shaped, plain, rtol=1e-12)
    g_shaped, = torch.autograd.grad(shaped, zs)
    g_plain, = torch.autograd.grad(plain, zs)
    assert torch.allclose(g_shaped, g_plain, rtol=1e-12)


def _exact_neumann(task, opt, theta, batch, xm, ym, terms, scale, meta_loss):
    """Oracle for ``neumann_hypergradient``: the same series with exact (double-backward) Hessian-vector products."""
    from torch.func import functional_call
    from timm_mkd.loss import meta_loss_fn, two_temperature_kd_loss
    from timm_mkd.meta_step import lookahead_jacobian, optimizer_params, replay_rng
    student = task.trainable_module
    named = [(n, p, g) for n, p, g in optimizer_params(student, opt) if n in theta]
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    taus = [lt.detach().clone().requires_grad_(True) for lt in (task.tau.log_tau_t, task.tau.log_tau_s)]

    def train_grad(params, create_graph):
        with replay_rng(batch.rng_state, batch.input.device):
            logits = functional_call(student, {**params, **{n: b.clone() for n, b in buffers.items()}}, (batch.input,))
        loss = task.task_loss_weight * task.criterion(logits, batch.target) + task.distill_loss_weight * (
            two_temperature_kd_loss(logits, batch.teacher_logits, taus[0].exp(), taus[1].exp()))
        return torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)

    current = {n: p.detach().clone().requires_grad_(True) for n, p, _ in named}
    with replay_rng(None, xm.device):
        meta_logits = functional_call(student, {**current, **buffers}, (xm,))
    v = torch.autograd.grad(meta_loss_fn(meta_logits, ym, meta_loss), list(current.values()))
    jac = [lookahead_jacobian(opt, p, g) for _, p, g in named]
    w = [scale * j * v_i for j, v_i in zip(jac, v)]
    total = [w_i.detach().clone() for w_i in w]
    for _ in range(terms):
        g = train_grad(current, create_graph=True)
        hw = torch.autograd.grad(g, list(current.values()), grad_outputs=w)
        w = [(w_i - scale * j * h).detach() for w_i, j, h in zip(w, jac, hw)]
        total = [t + w_i for t, w_i in zip(total, w)]
    g0 = train_grad({n: theta[n].detach().clone().requires_grad_(True) for n in current}, create_graph=True)
    inner = sum((t * g_i).sum() for t, g_i in zip(total, g0))
    return -torch.stack(torch.autograd.grad(inner, taus))


@pytest.mark.parametrize('opt_name, terms, scale', [('sgd', 3, 0.1), ('adamw', 2, 0.5), ('momentum', 2, 0.1)])
def test_neumann_matches_exact_oracle(opt_name, terms, scale):
    from timm_mkd.meta_step import neumann_hypergradient
    task, opt, (x, y), (xm, ym) = _setup(opt_name)
    theta = _one_update(task, opt, x, y)
    student, batch = task.trainable_module, task._last_batch
    log_taus = (task.tau.log_tau_t, task.tau.log_tau_s)
    oracle = _exact_neumann(task, opt, theta, batch, xm, ym, terms, scale, 'calibrated')
    est = neumann_hypergradient(student, opt, theta, batch, xm, ym, log_taus, task.distill_loss_weight,
                                task.criterion, task.task_loss_weight, terms=terms, scale=scale,
                                meta_loss='calibrated')
    rel = (est.grad - oracle).norm() / oracle.norm()
    print(f'neumann {opt_name} K={terms} s={scale}: oracle={oracle.tolist()} fd={est.grad.tolist()} rel_err={rel:.2e}')
    assert oracle.norm() > 0
    assert rel < 1e-2


def test_neumann_without_terms_is_the_one_step_estimate():
    from timm_mkd.meta_step import neumann_hypergradient
    task, opt, (x, y), (xm, ym) = _setup('adamw')
    theta = _one_update(task, opt, x, y)
    args = (task.trainable_module, opt, theta, task._last_batch, xm, ym,
            (task.tau.log_tau_t, task.tau.log_tau_s), task.distill_loss_weight)
    one = finite_difference_hypergradient(*args, meta_loss='calibrated').grad
    neu = neumann_hypergradient(*args, task.criterion, task.task_loss_weight, terms=0, scale=1.0,
                                meta_loss='calibrated').grad
    assert torch.allclose(one, neu, rtol=1e-9, atol=0)


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
    from timm_mkd.meta_step import calibration_hypergradient
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
    from timm_mkd.meta_step import calibrated_log_temperature
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


def test_calibration_smoothing_calibrates_against_the_smoothed_labels():
    """With ``calibration_smoothing`` the estimator's warm start and its gradient's zero are the grid minimum of the
    teacher's NLL against ``(1 - e) one_hot + e / C``; soft meta targets are used as they are; e = 0 is the hard
    labels' answer."""
    from timm_mkd.config import MKDConfig
    from timm_mkd.estimators import CalibrationEstimator
    from timm_mkd.meta_step import calibration_hypergradient
    z, ym = _briefly_trained_teacher_logits()
    smoothed = torch.nn.functional.one_hot(ym, 10).double() * 0.9 + 0.01
    grid = torch.linspace(math.log(0.25), math.log(8.0), 6001, dtype=torch.float64)
    nll = torch.stack([-(smoothed * torch.log_softmax(z / t.exp(), -1)).sum(-1).mean() for t in grid])
    best = float(grid[nll.argmin()])
    est = CalibrationEstimator(MKDConfig(calibration_smoothing=0.1))
    solved = float(est.solve(z, ym, 0.25, 8.0).grad[0])
    hard = float(CalibrationEstimator(MKDConfig()).solve(z, ym, 0.25, 8.0).grad[0])
    print('smoothed grid', best, 'solved', solved, 'hard', hard)
    assert abs(solved - best) < 2 * float(grid[1] - grid[0])
    assert solved > hard + 0.05  # softer labels, softer calibrated teacher
    g = calibration_hypergradient(z, est.targets(ym, z), (torch.tensor(solved), torch.tensor(0.0))).grad
    assert abs(float(g[0])) < 1e-6
    soft = torch.nn.functional.one_hot(ym, 10).double()
    assert float(est.solve(z, soft, 0.25, 8.0).grad[0]) == pytest.approx(hard, abs=1e-9)
    with pytest.raises(ValueError, match='calibration_smoothing=1.0'):
        MKDConfig(calibration_smoothing=1.0)


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
