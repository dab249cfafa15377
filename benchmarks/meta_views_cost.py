"""Data-loading cost of the meta views: augmented ('train') against eval meta batches, beside the training loader.

``cost.py`` keeps data loading out of its step times (a pool of batches on the device). The default
``calibration`` estimator draws its meta batches with the training augmentation, so its meta loader does
more work per batch than an eval one. This script times, in one process and interleaved, drawing one batch
of each kind with ``num_workers=0`` (all work in the timed process) on real Fashion-MNIST:

* the training loader of the quality study (timm ``create_loader``, RandAugment, crop, flip),
* the meta loader with eval views and with training-augmentation views (``build_meta_loader``).

It prints the meta loader's extra loading work per optimizer update relative to the training loader's
own, ``(train_view_meta - eval_view_meta) / (N * training_batch)`` at meta interval N: what the default's
views add to the loading that train.py already does (in its loader workers when ``--workers`` > 0).

Usage:
    python benchmarks/meta_views_cost.py [--batch-size 128] [--repeats 30]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MEAN, STD, TRAIN_GEOMETRY, fashion_mnist_root, make_loader  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--aa', default='rand-m9-mstd0.5')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from timm.data import create_dataset
    from timm_mkd.config import MKDConfig
    from timm_mkd.data.meta_data import IndexSubset, build_meta_loader

    def fmnist(is_training):
        return create_dataset('torch/fashion_mnist', root=fashion_mnist_root(), split='train', is_training=is_training)

    n = MKDConfig.defaults()['meta_interval']
    train = iter(make_loader(IndexSubset(fmnist(True), range(0, 20000)), args.batch_size, training=True,
                             aa=args.aa, num_workers=0))
    common = dict(input_size=(1, 28, 28), batch_size=args.batch_size, mean=MEAN, std=STD, crop_pct=1.0, seed=0)
    meta_eval = build_meta_loader(IndexSubset(fmnist(False), range(20000, 23000)), **common)
    meta_train = build_meta_loader(IndexSubset(fmnist(False), range(20000, 23000)),
                                   train_transform=dict(TRAIN_GEOMETRY, auto_augment=args.aa), **common)
    sources = {'training batch': lambda: next(train), 'meta batch, eval views': lambda: next(meta_eval),
               'meta batch, train views': lambda: next(meta_train)}
    times = {k: [] for k in sources}
    for _ in range(args.repeats):  # interleaved, so machine drift hits all three alike
        for name, draw in sources.items():
            t0 = time.perf_counter()
            draw()
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    for k, v in ms.items():
        print(f'{k:24s} {v:7.2f} ms (median of {args.repeats}, batch {args.batch_size}, no workers)')
    extra = (ms['meta batch, train views'] - ms['meta batch, eval views']) / (n * ms['training batch'])
    print(f'train-view meta loading adds {100 * extra:.1f}% to the training loader\'s work at meta interval {n} '
          f'(train/eval meta batch ratio {ms["meta batch, train views"] / ms["meta batch, eval views"]:.2f})')


if __name__ == '__main__':
    main()
