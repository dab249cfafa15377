"""Diagnostic: which temperature each teacher-calibration target picks, without training a student.

The default meta step (``estimator='calibration'``) moves the tied temperature to the minimiser of
the teacher's NLL ``CE(z_t / tau, y)`` on clean held-out meta data. That minimiser depends on the
teacher and the meta data only, never on the student, so MKD from any initial tau follows the same
temperature after its first meta step. This script prints that minimiser, and the minimisers of
two other targets a student-blind meta step could follow, for the quality benchmark's teacher:

* ``heldout``: clean held-out meta set (what the default follows; the warm start's value on all of it);
* ``train_aug``: the training stream as the student sees it, RandAugment ``rand-m9-mstd0.5``, hard labels;
* ``train_mix``: the same plus mixup 0.8 / cutmix 1.0 / label smoothing 0.1, soft targets.

Compare with the best fixed tau of ``quality.py``'s grid for the same teacher. Appends to
``results/target_temperature.csv``.

    python benchmarks/target_temperature.py        # ~1 minute on 1 CPU core
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from common import MEAN, STD, make_loader  # noqa: E402


def _collect(teacher, batches, limit):
    logits, targets, n = [], [], 0
    with torch.no_grad():
        for x, y in batches:
            logits.append(teacher(x).double())
            targets.append(y)
            n += len(y)
            if n >= limit:
                break
    return torch.cat(logits), torch.cat(targets)


def main(argv=None):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = quality.parse_args(sys.argv[1:] if argv is None else argv)
    train_set, meta_set, teacher_train, _ = quality.datasets(args)
    teacher, _ = quality.get_teacher(args, teacher_train, None)
    teacher.eval()
    from timm.data import Mixup
    from timm_mkd.data.meta_data import build_meta_loader
    from timm_mkd.meta.meta_step import calibrated_log_temperature, calibration_hypergradient

    heldout = build_meta_loader(meta_set, input_size=(1, args.img_size, args.img_size), batch_size=250, mean=MEAN,
                                std=STD, crop_pct=1.0, seed=0)
    train = make_loader(train_set, 250, training=True, img_size=args.img_size, aa='rand-m9-mstd0.5')
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    sources = {
        'heldout': lambda: iter(heldout),
        'train_aug': lambda: iter(train),
        'train_mix': lambda: (mixup(x, y) for x, y in train),
    }
    rows = []
    for name, make in sources.items():
        logits, targets = _collect(teacher, make(), len(meta_set))
        # The unconstrained minimiser (wide bounds): the library clips it to [tau_min, tau_max] afterwards.
        log_tau = calibrated_log_temperature(logits, targets, 0.05, 50.0)
        nll = calibration_hypergradient(logits, targets, (log_tau, log_tau)).meta_loss
        nll1 = calibration_hypergradient(logits, targets, (torch.zeros((), dtype=torch.float64),) * 2).meta_loss
        rows.append(dict(target=name, images=len(targets), tau_star=round(math.exp(float(log_tau)), 4),
                         nll_at_tau_star=round(nll, 4), nll_at_tau_1=round(nll1, 4), teacher_sha=args.teacher_sha))
        print(f'{name:>10}: tau* {rows[-1]["tau_star"]:.3f} on {len(targets)} images '
              f'(NLL {nll:.4f} there, {nll1:.4f} at tau 1), teacher {args.teacher_sha}', flush=True)
    path = os.path.join(quality.RESULTS, 'target_temperature.csv')
    for row in rows:
        quality.append_row(path, row, fields=list(rows[0]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
