"""Shared pieces of the benchmarks: Fashion-MNIST offline, the student / teacher models, loaders.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, unpacked once by
``timm_mkd.data.fashion_mnist`` into ``~/.cache/timm-mkd/fmnist`` (the same cache the tests use).
"""
from typing import Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_mkd.data.fashion_mnist import cache_dir, fashion_mnist_root as _fashion_mnist_root  # noqa: F401 (cache_dir re-exported)

MEAN, STD = (0.2860,), (0.3530,)  # Fashion-MNIST train-split statistics
NUM_CLASSES = 10


def fashion_mnist_root() -> str:
    """The unpacked Fashion-MNIST root (``timm_mkd.data.fashion_mnist``); exits with the apt hint if missing."""
    try:
        return _fashion_mnist_root()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from e


def set_norm(model: nn.Module, mean=MEAN, std=STD) -> nn.Module:
    """Give a model the data's normalisation in its pretrained_cfg.

    timm's ``LogitDistillationTask`` un-normalises the student's input with the *student's*
    pretrained_cfg mean/std and re-normalises it with the *teacher's*; a 1-channel model keeps
    ImageNet's 3-channel statistics there, which would turn the batch into 3 channels. With both
    set to the data's statistics the re-normalisation is the identity, for KD and MKD alike.
    """
    model.pretrained_cfg = {**(getattr(model, 'pretrained_cfg', None) or {}), 'mean': tuple(mean), 'std': tuple(std)}
    return model


def vit_student(img_size: int = 28, depth: int = 4, dim: int = 96, heads: int = 3, in_chans: int = 1,
                num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    """``vit_tiny_patch16_224`` shrunk for 28/32 px: patch 4, small depth and width."""
    model = timm.create_model('vit_tiny_patch16_224', img_size=img_size, patch_size=4, in_chans=in_chans,
                              num_classes=num_classes, depth=depth, embed_dim=dim, num_heads=heads, **kwargs)
    return set_norm(model)


def cnn_student(width: int = 16, in_chans: int = 1, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A small timm ResNet (BasicBlock, one block per stage, channels width x (1, 2, 4, 8))."""
    from timm.models.resnet import BasicBlock, ResNet
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, in_chans=in_chans, stem_width=width,
                   channels=tuple(width * m for m in (1, 2, 4, 8)))
    return set_norm(model)


def teacher_model(name: str = 'resnet18', in_chans: int = 1, num_classes: int = NUM_CLASSES) -> nn.Module:
    return set_norm(timm.create_model(name, in_chans=in_chans, num_classes=num_classes))


#: The light geometric training augmentation used throughout (timm ``create_transform`` keywords).
TRAIN_GEOMETRY = dict(interpolation='bilinear', scale=(0.8, 1.0), hflip=0.5)


def make_loader(dataset, batch_size: int, training: bool, img_size: int = 28, aa=None, num_workers: int = 1,
                re_prob: float = 0.0, scale=None):
    """timm's create_loader (no prefetcher, CPU) with the light geometric aug used throughout (``scale``: another
    random-resized-crop scale range)."""
    from timm.data import create_loader
    geometry = dict(TRAIN_GEOMETRY, scale=tuple(scale)) if scale is not None else TRAIN_GEOMETRY
    return create_loader(
        dataset, input_size=(1, img_size, img_size), batch_size=batch_size, is_training=training,
        use_prefetcher=False, mean=MEAN, std=STD, auto_augment=aa, num_workers=num_workers,
        crop_pct=1.0, re_prob=re_prob, persistent_workers=False, **geometry)


@torch.no_grad()
def accuracy(model: nn.Module, loader, device='cpu') -> float:
    return evaluate(model, loader, device)[0]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device='cpu') -> Tuple[float, float, float]:
    """(top-1, mean cross-entropy, cross-entropy at the best single logit scale) on ``loader``.

    The cross-entropy is what MKD's default meta step minimises; the calibrated one (``min_s CE(s z)``)
    is the ``meta_loss='calibrated'`` objective, blind to over- or under-confidence.
    """
    from timm_mkd.loss import best_logit_scale
    was = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    model.train(was)
    z, y = torch.cat(logits), torch.cat(targets)
    top1 = (z.argmax(-1) == y).float().mean().item()
    nll = F.cross_entropy(z, y).item()
    nll_calibrated = F.cross_entropy(best_logit_scale(z, y) * z, y).item()
    return top1, nll, nll_calibrated


def peak_rss_mib() -> Tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc (Linux)."""
    cur = peak = float('nan')
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    cur = int(line.split()[1]) / 1024
                elif line.startswith('VmHWM:'):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, peak


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False
