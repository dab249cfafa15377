"""Small real models and batches shared by the core tests.

Real torch modules and real Fashion-MNIST images; kept tiny so the oracle (double backward in
float64) and the invariant checks run in seconds on 2 CPU cores.
"""
import os

import numpy as np
import torch
import torch.nn as nn

from fmnist import fashion_mnist_root


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, pooled, dropout, linear: BatchNorm and dropout exercise the invariants."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 8, drop: float = 0.2):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(8 * width, num_classes)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        # +1 keeps dropout's input non-zero, so a zero in its output is exactly a dropped unit.
        return self.head(self.drop(self.features(x) + 1.0))


def fmnist_batches(n: int, split: str = 'train', offset: int = 0, dtype=torch.float32):
    """``n`` real Fashion-MNIST images (normalised, [n, 1, 28, 28]) and labels from the IDX files."""
    root = os.path.join(fashion_mnist_root(), 'FashionMNIST', 'raw')
    prefix = 'train' if split == 'train' else 't10k'
    with open(os.path.join(root, f'{prefix}-images-idx3-ubyte'), 'rb') as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with open(os.path.join(root, f'{prefix}-labels-idx1-ubyte'), 'rb') as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    x = torch.from_numpy(images[offset:offset + n].copy()).to(dtype).div_(255).sub_(0.2860).div_(0.3530)
    y = torch.from_numpy(labels[offset:offset + n].astype(np.int64))
    return x.unsqueeze(1), y


def inside_bounds(task, tau: float) -> bool:
    """Whether ``tau`` lies strictly inside ``task``'s temperature bounds (1% margin): a meta step moved it and no
    projection onto ``tau_min`` or ``tau_max`` put it there."""
    return task.config.tau_min * 1.01 < tau < task.config.tau_max / 1.01


def briefly_trained_teacher(dtype=torch.float32) -> SmallCNN:
    """A small teacher after 30 AdamW steps on 256 real images (seed 0), in eval mode: it ranks classes well but is
    underconfident (its held-out calibrated temperature lies below 1)."""
    torch.manual_seed(0)
    teacher = SmallCNN(width=16, drop=0.0).to(dtype)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    x, y = fmnist_batches(256, dtype=dtype)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher.train()(x), y).backward()
        opt.step()
    return teacher.eval()
