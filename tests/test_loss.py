"""The two-temperature KD loss: its math, its reduction to timm's loss, its guard against bad teachers."""
import pytest
import torch
import torch.nn.functional as F
from timm.task import LogitDistillationTask

from timm_mkd import MKDTask, two_temperature_kd_loss

from small_models import SmallCNN, fmnist_batches


def test_matches_definition():
    torch.manual_seed(0)
    zs, zt = torch.randn(8, 10, dtype=torch.float64), 3 * torch.randn(8, 10, dtype=torch.float64)
    tau_t, tau_s = torch.tensor(2.0, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64)
    p_t = F.softmax(zt / tau_t, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(zs / tau_s, -1))).sum(-1).mean() * tau_s ** 2
    assert torch.allclose(two_temperature_kd_loss(zs, zt, tau_t, tau_s), expected)


def test_equal_temperatures_reproduce_timm_logit_distillation():
    """At tau_t == tau_s == T, MKDTask's loss is timm's LogitDistillationTask's, term by term."""
    torch.manual_seed(0)
    student, teacher = SmallCNN(drop=0.0), SmallCNN(width=16, drop=0.0)
    x, y = fmnist_batches(16)
    student.pretrained_cfg = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}
    timms = LogitDistillationTask(student, teacher, temperature=3.0, verbose=False)
    student.eval()  # same forward in both (BN in eval mode)
    ours = MKDTask(student, teacher, tau_t=3.0, tau_s=3.0, verbose=False)(x, y)
    theirs = timms(x, y)
    for key in ('loss', 'task_loss', 'kd_loss'):
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


def test_student_gradient_scale_is_independent_of_tau_s():
    """The tau_s^2 factor: at high temperature the student-logit gradient no longer shrinks with tau_s."""
    torch.manual_seed(0)
    zs, zt = torch.randn(64, 10), torch.randn(64, 10)
    norms = []
    for tau in (8.0, 16.0, 32.0):
        z = zs.clone().requires_grad_(True)
        two_temperature_kd_loss(z, zt, torch.tensor(tau), torch.tensor(tau)).backward()
        norms.append(float(z.grad.norm()))
    assert max(norms) / min(norms) < 1.1


def test_non_finite_teacher_rows_are_dropped():
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    bad = zt.clone()
    bad[1, 3] = float('nan')
    bad[2, 0] = float('inf')
    tau = torch.tensor(2.0)
    loss = two_temperature_kd_loss(zs, bad, tau, tau)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    assert torch.all(zs.grad[1] == 0) and torch.all(zs.grad[2] == 0)
    rows = [0, 3]
    expected = two_temperature_kd_loss(zs[rows].detach(), zt[rows], tau, tau) * 2 / 4
    assert torch.allclose(loss.detach(), expected)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match='same classes'):
        two_temperature_kd_loss(torch.randn(2, 10), torch.randn(2, 5), torch.tensor(1.0), torch.tensor(1.0))


def test_calibrated_meta_loss_is_ce_at_the_best_scale_and_blind_to_confidence():
    """The meta loss is min_s CE(s z): its value matches a grid search over s, and its gradient has no
    component along the logits themselves (making the student more or less confident changes nothing)."""
    import torch.nn.functional as F
    from timm_mkd.loss import best_logit_scale, meta_loss_fn
    torch.manual_seed(0)
    _, y = fmnist_batches(64)
    z = 3 * torch.randn(64, 10)
    z[torch.arange(40), y[:40]] += 4.0  # a student that is right on most of the batch, with the wrong confidence
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    best = min(float(F.cross_entropy(s * z.double(), y)) for s in grid)
    z = z.clone().requires_grad_(True)
    loss = meta_loss_fn(z, y)
    assert abs(loss.item() - best) < 1e-4
    assert loss.item() < F.cross_entropy(z.detach(), y).item() or abs(best_logit_scale(z, y).item() - 1) < 1e-3
    (grad,) = torch.autograd.grad(loss, z)
    z = z.detach()
    assert abs(float((grad * z).sum())) < 1e-5 * float(grad.norm() * z.norm())
    # the same logits at twice the confidence: same calibrated loss
    assert abs(meta_loss_fn(2 * z, y).item() - loss.item()) < 1e-4
