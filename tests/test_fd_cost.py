"""The look-ahead finite difference at lower cost: low-precision forwards, no per-step capture.

Each cheaper path is checked against the exact double-backward oracle (``exact_hypergradient``).
"""
import pytest
import torch

from timm_mkd import MKDTask
from timm_mkd.meta.estimators import fd_autocast
from timm_mkd.meta.meta_step import LOW_PRECISION_FD_EPS, exact_hypergradient, finite_difference_hypergradient

from small_models import SmallCNN, fmnist_batches
from test_hypergradient import _one_update, _setup


def _fp16():
    return torch.autocast('cpu', dtype=torch.float16)


def _bf16():
    return torch.autocast('cpu', dtype=torch.bfloat16)


def _state(opt_name, dtype, seed):
    task, opt, (x, y), (xm, ym) = _setup(opt_name, dtype=dtype, seed=seed)
    theta = _one_update(task, opt, x, y)
    log_taus = (task.tau.log_tau_t, task.tau.log_tau_s)
    return task, opt, theta, (xm, ym), log_taus


def _oracle(task, opt, theta, batch, meta, log_taus):
    return exact_hypergradient(task.trainable_module, opt, theta, batch, task.criterion, task.task_loss_weight,
                               *meta, log_taus, task.distill_loss_weight)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize('opt_name, seed', [('sgd', 0), ('sgd', 1), ('adamw', 0), ('adamw', 1)])
def test_float16_forwards_match_the_float32_oracle(opt_name, seed):
    """float32 model, float16 autocast for the two forwards only: within 5% of the exact float32 value."""
    task, opt, theta, meta, log_taus = _state(opt_name, torch.float32, seed)
    batch = task.meta.last_batch
    oracle = _oracle(task, opt, theta, batch, meta, log_taus)
    fd = finite_difference_hypergradient(task.trainable_module, opt, theta, batch, *meta, log_taus,
                                         task.distill_loss_weight, fd_eps=1e-2, fd_autocast=_fp16)
    rel = _rel(fd.grad, oracle)
    print(f'{opt_name} seed {seed}: oracle {oracle.tolist()} fp16 fd {fd.grad.tolist()} rel {rel:.2e}')
    assert fd.grad.dtype == torch.float32
    assert fd.epsilon == pytest.approx(LOW_PRECISION_FD_EPS / float(torch.sqrt(sum(
        (t.double() ** 2).sum() for t in _direction(task, opt, theta, meta)))), rel=1e-3)
    assert rel < 0.05


def _direction(task, opt, theta, meta):
    from timm_mkd.meta.meta_step import _meta_gradient, lookahead_jacobian
    named, v, _ = _meta_gradient(task.trainable_module, opt, theta, *meta, None)
    return [lookahead_jacobian(opt, p, g).to(v_i.dtype) * v_i for (_, p, g), v_i in zip(named, v)]


def test_auto_precision_uses_float16_only():
    """'auto': float16 autocast runs the forwards in it; bfloat16 (up to 12% off, see MKDConfig) keeps float32."""
    device = torch.device('cpu')
    assert fd_autocast('auto', _fp16, device) is _fp16
    assert fd_autocast('auto', _bf16, device) is None
    assert fd_autocast('auto', None, device) is None
    assert fd_autocast('float32', _fp16, device) is None
    assert fd_autocast('autocast', _bf16, device) is _bf16


def _lookahead_task(meta_interval, **kw):
    torch.manual_seed(0)
    task = MKDTask(SmallCNN(drop=0.2), SmallCNN(width=16, drop=0.0), meta_interval=meta_interval,
                   estimator='lookahead', verbose=False, **kw)
    return task, fmnist_batches(32), fmnist_batches(32, offset=1000)


def test_lookahead_task_under_bf16_autocast_keeps_float32_forwards():
    """Through MKDTask: under a bf16 meta_autocast, 'auto' gives the 'float32' hypergradient bit for bit."""
    records = []
    for precision in ('auto', 'float32'):
        task, (x, y), (xm, ym) = _lookahead_task(1, meta_autocast=_bf16, fd_precision=precision)
        opt = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-3)
        task.attach(opt, [(xm, ym)])
        for _ in range(2):
            opt.zero_grad()
            task(x, y)['loss'].backward()
            opt.step()
        records.append((task.last_record['hypergrad_t'], task.last_record['hypergrad_s']))
    assert records[0] == records[1]


def test_only_the_update_before_a_meta_step_captures_rng_and_parameters():
    """Ordinary steps of a look-ahead run capture no RNG state and snapshot no parameters."""
    task, (x, y), (xm, ym) = _lookahead_task(3)
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.05)
    task.attach(opt, [(xm, ym)])
    captured, snapshots = [], []
    opt.register_step_pre_hook(lambda *a: snapshots.append(task.meta.theta is not None))
    for _ in range(6):
        opt.zero_grad()
        task(x, y)['loss'].backward()
        captured.append(task.meta.last_batch.rng_state is not None)
        opt.step()
    assert captured == [False, False, True, False, False, True]
    assert snapshots == captured
    assert task.meta_steps == 2 and task.meta_skipped == 0


def test_mkd_config_checks_fd_precision():
    from timm_mkd.config import MKDConfig, MKDConfigError
    with pytest.raises(MKDConfigError, match='fd_precision'):
        MKDConfig(fd_precision='half')
