"""The default ``'mixture'`` estimator: its objective, gradient, exact minimiser and what it reads of the student."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_mkd import MKDTask
from timm_mkd.meta.calibration import calibrated_log_temperature, calibration_hypergradient
from timm_mkd.meta.mixture import mixture_hypergradient, mixture_log_temperature, mixture_nll

from small_models import SmallCNN, briefly_trained_teacher, fmnist_batches, inside_bounds


def _problem(seed=0, n=200, classes=10):
    """Teacher logits right on half the rows, a student prediction right on another half (float64)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    z = 3 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    z[torch.arange(n // 2), y[:n // 2]] += 5
    s = torch.randn(n, classes, generator=g, dtype=torch.float64)
    s[torch.arange(n // 4, 3 * n // 4), y[n // 4:3 * n // 4]] += 3
    return z, F.softmax(s, -1), y


def test_objective_is_the_nll_of_the_label_teacher_mixture():
    """``mixture_nll`` is ``-mean log(alpha q_y + (1 - alpha) softmax(z / tau)_y)``, written out by hand here."""
    z, q, y = _problem()
    tau, alpha = 1.7, 0.3
    p = torch.exp(z / tau) / torch.exp(z / tau).sum(-1, keepdim=True)
    by_hand = -torch.log(alpha * q[torch.arange(len(y)), y] + (1 - alpha) * p[torch.arange(len(y)), y]).mean()
    got = mixture_nll(z, q, F.one_hot(y, 10).double(), torch.tensor(math.log(tau), dtype=torch.float64), alpha)
    assert float(got) == pytest.approx(float(by_hand), rel=1e-12)


@pytest.mark.parametrize('alpha', (0.25, 0.5, 0.75))
def test_gradient_matches_a_central_difference_and_vanishes_at_the_solved_minimum(alpha):
    """The hypergradient is the exact derivative in log tau_t (oracle: a float64 central difference of the objective,
    1e-5 apart); the solver's answer is the minimum of a dense grid and the gradient is zero there."""
    z, q, y = _problem()
    yh = F.one_hot(y, 10).double()
    f = lambda lt: float(mixture_nll(z, q, yh, torch.tensor(lt, dtype=torch.float64), alpha))
    for lt in (-0.5, 0.2, 0.9, 2.0):
        grad = mixture_hypergradient(z, q, y, (torch.tensor(lt), torch.tensor(0.0)), alpha).grad
        fd = (f(lt + 1e-5) - f(lt - 1e-5)) / 2e-5
        assert float(grad[0]) == pytest.approx(fd, rel=1e-6, abs=1e-9) and float(grad[1]) == 0.0
    solved = float(mixture_log_temperature(z, q, y, alpha, 0.25, 20.0))
    grid = [math.log(0.25) + (math.log(20.0) - math.log(0.25)) * i / 4000 for i in range(4001)]
    best = min(grid, key=f)
    assert abs(solved - best) < 2e-3 and f(solved) <= f(best) + 1e-12
    assert abs(float(mixture_hypergradient(z, q, y, (torch.tensor(solved), torch.tensor(0.0)), alpha).grad[0])) < 1e-6


def test_without_a_task_term_it_is_the_teachers_calibration():
    """alpha = 0 (no task loss): the student's prediction drops out and the estimator is ``'calibration'``."""
    z, q, y = _problem(seed=3)
    assert float(mixture_log_temperature(z, q, y, 0.0, 0.25, 20.0)) == pytest.approx(
        float(calibrated_log_temperature(z, y, 0.25, 20.0)), abs=1e-6)
    lt = (torch.tensor(0.4), torch.tensor(0.0))
    assert torch.allclose(mixture_hypergradient(z, q, y, lt, 0.0).grad,
                          calibration_hypergradient(z, y, lt).grad.double(), rtol=1e-9, atol=1e-12)


def test_the_temperature_follows_the_student():
    """Same teacher, same labels: a student that is right where the teacher is wrong moves the minimiser (the
    teacher's wrong rows cost less in the mixture, so a sharper teacher pays), unlike the teacher-only calibration."""
    z, _, y = _problem(seed=1)
    n = len(y)
    uniform = torch.full((n, 10), 0.1, dtype=torch.float64)
    knows = F.one_hot(y, 10).double() * 0.9 + 0.01
    t_uniform = math.exp(float(mixture_log_temperature(z, uniform, y, 0.5, 0.1, 20.0)))
    t_knows = math.exp(float(mixture_log_temperature(z, knows, y, 0.5, 0.1, 20.0)))
    t_teacher = math.exp(float(calibrated_log_temperature(z, y, 0.1, 20.0)))
    assert abs(math.log(t_knows / t_uniform)) > 0.05
    assert t_uniform < t_teacher  # a uniform student's half of the mixture is already soft


def test_non_finite_rows_are_left_out():
    """A row whose teacher logits or student probabilities are not finite does not count; all rows non-finite:
    NaN (the controller then skips the step)."""
    z, q, y = _problem(seed=2)
    zb, qb = z.clone(), q.clone()
    zb[0, 0], qb[1, 3] = float('inf'), float('nan')
    lt = (torch.tensor(0.3), torch.tensor(0.0))
    assert torch.allclose(mixture_hypergradient(zb, qb, y, lt, 0.5).grad, mixture_hypergradient(z[2:], q[2:], y[2:], lt, 0.5).grad)
    assert float(mixture_log_temperature(zb, qb, y, 0.5, 0.25, 20.0)) == pytest.approx(
        float(mixture_log_temperature(z[2:], q[2:], y[2:], 0.5, 0.25, 20.0)), abs=1e-9)
    assert math.isnan(float(mixture_hypergradient(z * float('nan'), q, y, lt, 0.5).grad[0]))


def test_warm_start_solves_on_the_students_eval_mode_prediction():
    """The task's warm start lands on the exact minimiser for its student's eval-mode probabilities on the meta
    batches and the teacher's logits there, with alpha = task weight / (task + KD weight); the student is left in
    training mode with its BatchNorm statistics and the RNG stream untouched."""
    batches = [fmnist_batches(32, offset=2000 + 32 * i) for i in range(3)]
    x, y = fmnist_batches(32)
    torch.manual_seed(0)
    student = SmallCNN(drop=0.3)
    task = MKDTask(student, briefly_trained_teacher(), task_loss_weight=1.0, distill_loss_weight=3.0,
                   warm_start_batches=3, tau_min=0.25, meta_interval=1, verbose=False)
    assert task.config.estimator == 'mixture'
    task.attach(torch.optim.SGD(student.parameters(), lr=0.05), batches)
    xm, ym = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        student.eval()
        q = F.softmax(student(xm), -1)
        student.train()
        zt = task.teacher(xm, return_features=False)
    expected = math.exp(float(mixture_log_temperature(zt, q, ym, 0.25, 0.25, 20.0)))
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    rng = torch.get_rng_state()
    task.meta.warm_start_before_training()
    assert task.temperatures()[0] == pytest.approx(expected, rel=1e-5) and inside_bounds(task, expected)
    assert student.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[n]) for n, b in student.named_buffers())
    out = task(x, y)
    assert torch.isfinite(out['loss']) and task.meta_steps == 1
