"""Meta data for the MKD meta step: where the held-out batches come from, and how they are loaded.

The meta step scores a look-ahead student on data the training step did not see, and moves the
temperatures by the gradient of that score. Three sources are supported, from most to least
honest:

(a) **held-out fraction of the training split** (``holdout_indices`` / ``split_holdout``): a
    deterministic, seeded fraction of the training samples *leaves* the training set and becomes
    the meta set. Needs no extra data; costs that fraction of training samples.
(b) **a separate split or folder**: any dataset the caller builds with timm's ``create_dataset``
    (another split, another root). ``check_not_validation`` refuses the split used to report
    validation accuracy, which would leak the reported metric into training.
(c) **the training stream itself**: ``MKDTask.attach(optimizer, 'train')`` reuses the current
    training batch inside the task (see ``timm_mkd.task.TRAIN_STREAM``). Biased, but needs no data.

Sources (a) and (b) are read through ``build_meta_loader`` (``timm_mkd.data.meta_loader``): timm's *eval* transforms or,
with ``train_transform``, the training augmentation (no mixup), a seeded per-rank shuffled shard, endless
iteration, and a private RNG so that drawing meta batches never moves the training RNG stream.
"""
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.utils.data

from .meta_loader import MetaBatches, build_meta_loader  # noqa: F401 (re-exported: the loader for (a) and (b))

__all__ = [
    'holdout_indices',
    'IndexSubset',
    'split_holdout',
    'check_not_validation',
    'MetaBatches',
    'build_meta_loader',
]

# Split names timm's create_dataset treats alike (timm/data/dataset_factory.py).
_TRAIN_SPLITS = ('train', 'training')
_EVAL_SPLITS = ('val', 'valid', 'validation', 'eval', 'evaluation')
# torchvision datasets that timm builds with ``train=(split in train synonyms)``: every other
# split name, 'test' and 'validation' alike, is the same test set.
_TORCH_TRAIN_OR_TEST = ('cifar10', 'cifar100', 'mnist', 'kmnist', 'fashion_mnist')


# --------------------------------------------------------------------------------------------
# (a) held-out fraction of the training split
# --------------------------------------------------------------------------------------------

def holdout_indices(num_samples: int, fraction: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Split ``range(num_samples)`` into disjoint, sorted train and meta index lists.

    Deterministic in ``(num_samples, fraction, seed)`` and independent of the global torch RNG
    (a private ``torch.Generator`` draws the permutation), so every rank of a distributed run and
    every resume of a run computes the same split without communicating.

    Args:
        num_samples: Number of samples in the training split.
        fraction: Share of samples moved to the meta set, in (0, 1) exclusive. The meta set has
            ``round(fraction * num_samples)`` samples.
        seed: Seed of the permutation.

    Returns:
        ``(train_idx, meta_idx)``: two sorted lists whose union is ``range(num_samples)``.

    Raises:
        ValueError: if ``fraction`` is not in (0, 1), or if either side would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f'meta holdout fraction must be in (0, 1) exclusive, got {fraction}: 0 leaves no meta '
            f'data and 1 leaves no training data')
    if num_samples < 2:
        raise ValueError(f'cannot hold out a meta set from a dataset of {num_samples} samples')
    num_meta = int(round(fraction * num_samples))
    if num_meta == 0 or num_meta == num_samples:
        side = 'meta' if num_meta == 0 else 'training'
        raise ValueError(
            f'meta holdout fraction {fraction} of {num_samples} samples leaves the {side} set empty; '
            f'choose a fraction between {1 / num_samples:.3g} and {1 - 1 / num_samples:.3g}')
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_samples, generator=generator)
    meta_idx = sorted(perm[:num_meta].tolist())
    train_idx = sorted(perm[num_meta:].tolist())
    return train_idx, meta_idx


def _forwarded(name: str) -> property:
    """A property that reads and writes the wrapped dataset's attribute ``name``."""
    return property(lambda self: getattr(self.dataset, name, None), lambda self, value: setattr(self.dataset, name, value))


class IndexSubset(torch.utils.data.Dataset):
    """A subset of a (timm) dataset that forwards ``transform`` to the dataset it wraps.

    ``torch.utils.data.Subset`` is not enough: timm's ``create_loader`` installs the transforms
    with ``dataset.transform = create_transform(...)``; on a ``Subset`` that assignment creates a
    new attribute on the wrapper and the wrapped dataset keeps loading untransformed images.
    Here ``transform`` (and ``target_transform``) are properties that read and write the wrapped
    dataset's attributes.

    Because the transform lives on the wrapped dataset, two subsets of *one* dataset instance
    share it: the last loader built wins, and the meta batches would get the training
    augmentations (or the training batches the eval transforms). The training subset and the meta
    subset must therefore wrap two distinct instances of the split (``split_holdout`` checks it).

    Args:
        dataset: A map-style dataset (``__len__`` and ``__getitem__``).
        indices: Indices into ``dataset`` that make up the subset.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, indices: Sequence[int]):
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError(
                f'{type(dataset).__name__} is an iterable dataset; a held-out fraction needs a map-style '
                f'dataset (random access by index). Use a separate meta split instead.')
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    transform = _forwarded('transform')
    target_transform = _forwarded('target_transform')

    def set_epoch(self, epoch: int) -> None:
        """Forward ``set_epoch`` to the wrapped dataset when it has one (a no-op otherwise)."""
        set_epoch = getattr(self.dataset, 'set_epoch', None)
        if callable(set_epoch):
            set_epoch(epoch)


def split_holdout(
        train_dataset: torch.utils.data.Dataset,
        meta_dataset: torch.utils.data.Dataset,
        fraction: float,
        seed: int = 0,
) -> Tuple[IndexSubset, IndexSubset]:
    """Hold out a fraction of the training split as meta data.

    The caller builds the training split twice with timm's ``create_dataset`` (once with
    ``is_training=True``, once with ``is_training=False``) so that training and meta samples get
    their own transforms (see ``IndexSubset``).

    Args:
        train_dataset: The training split, for the training loader.
        meta_dataset: A second instance of the same split, for the meta loader.
        fraction: Share of samples held out for the meta set, in (0, 1).
        seed: Seed of the split (``holdout_indices``).

    Returns:
        ``(train_subset, meta_subset)``: disjoint subsets covering the whole split.

    Raises:
        ValueError: if the two datasets are the same object or differ in length.
    """
    if train_dataset is meta_dataset:
        raise ValueError(
            'split_holdout needs two distinct instances of the training split: timm\'s create_loader '
            'sets dataset.transform, so one shared instance would give the meta batches the training '
            'augmentations. Call create_dataset twice (is_training=True and is_training=False).')
    num_train, num_meta = len(train_dataset), len(meta_dataset)
    if num_train != num_meta:
        raise ValueError(
            f'split_holdout needs two instances of the same split, but they have {num_train} and '
            f'{num_meta} samples; build both with the same create_dataset name, root and split')
    train_idx, meta_idx = holdout_indices(num_train, fraction, seed)
    return IndexSubset(train_dataset, train_idx), IndexSubset(meta_dataset, meta_idx)


# --------------------------------------------------------------------------------------------
# (b) a separate split or folder
# --------------------------------------------------------------------------------------------

def _canonical_split(split: str, dataset: Optional[str]) -> str:
    """Map split names that timm's create_dataset resolves to the same data onto one name."""
    split = split.strip()
    if dataset is not None:
        prefix, sep, name = dataset.partition('/')
        if sep and prefix.lower() == 'torch' and name.lower() in _TORCH_TRAIN_OR_TEST:
            return 'train' if split in _TRAIN_SPLITS else 'test'
    if '[' in split:  # a slice spec (tfds/hfds 'train[:90%]'): compare literally
        return split
    if split in _TRAIN_SPLITS:
        return 'train'
    if split in _EVAL_SPLITS:
        return 'validation'
    return split


def _canonical_root(root: Optional[str]) -> Optional[str]:
    if root is None or root == '':
        return None
    return os.path.realpath(os.path.expanduser(root))


def check_not_validation(
        meta_split: str,
        meta_root: Optional[str],
        val_split: str,
        val_root: Optional[str],
        dataset: Optional[str] = None,
) -> None:
    """Refuse a meta split that is the validation split used to report accuracy.

    Tuning the temperatures on the reporting split would leak it into training and inflate the
    reported accuracy. The check compares names: split names that timm's ``create_dataset``
    treats alike count as equal ('val' and 'validation'; for torchvision's train/test datasets
    such as ``torch/fashion_mnist`` every non-train split is the test set), and roots are
    compared after resolving symlinks. A ``meta_root`` of None means the validation root.

    Args:
        meta_split: Split the meta data would be read from.
        meta_root: Root folder of the meta data, or None for the same root as validation.
        val_split: Split used for validation / reporting.
        val_root: Root folder of the validation data.
        dataset: timm dataset name (``--dataset``), used to resolve split synonyms.

    Raises:
        ValueError: naming both splits and the fix, if they are the same data.
    """
    meta_root_c = _canonical_root(meta_root) if meta_root else _canonical_root(val_root)
    val_root_c = _canonical_root(val_root)
    if meta_root_c != val_root_c:
        return
    if _canonical_split(meta_split, dataset) != _canonical_split(val_split, dataset):
        return
    raise ValueError(
        f'meta split {meta_split!r} (root {meta_root or val_root!r}) is the validation split '
        f'{val_split!r} (root {val_root!r}) used to report accuracy: learning the temperatures on it '
        f'would leak the reported metric into training. Hold out a fraction of the training split '
        f'instead, or point the meta data at another split or folder.')
