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

Sources (a) and (b) are read through ``build_meta_loader``: timm's *eval* transforms, no mixup,
a seeded per-rank shuffled shard, endless iteration, and a private RNG so that drawing meta
batches never moves the training RNG stream.
"""
import itertools
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.data
from torch.utils.data.distributed import DistributedSampler

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

    @property
    def transform(self):
        return getattr(self.dataset, 'transform', None)

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    @property
    def target_transform(self):
        return getattr(self.dataset, 'target_transform', None)

    @target_transform.setter
    def target_transform(self, value):
        self.dataset.target_transform = value

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


# --------------------------------------------------------------------------------------------
# the meta loader for sources (a) and (b)
# --------------------------------------------------------------------------------------------

class _ShardSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first ``skip`` indices of a pass (for resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class MetaBatches:
    """Endless iterator of meta batches ``(input, target)`` on the target device.

    One pass over the per-rank shard is an *epoch*; when it ends the sampler moves to the next
    epoch (a new seeded permutation) and iteration goes on, so the meta step can call ``next()``
    forever. ``state_dict()`` holds ``(epoch, position)`` (batches drawn in the current epoch)
    and the layout they refer to; ``load_state_dict`` resumes at the very next batch without
    loading the skipped ones, and at the next epoch when the layout changed.

    Built by ``build_meta_loader``; not meant to be constructed directly.
    """

    def __init__(
            self,
            loader: Any,
            sampler: _ShardSampler,
            batch_size: int,
            device: torch.device,
            img_dtype: torch.dtype,
            on_device: bool,
    ):
        self.loader = loader
        self.sampler = sampler
        self.batch_size = batch_size
        self.device = device
        self.img_dtype = img_dtype
        self._on_device = on_device  # the prefetcher already moved, cast and normalised
        self.epoch = 0
        self.position = 0
        self._iter: Optional[Iterator] = None

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def batches_per_epoch(self) -> int:
        """Meta batches in one full pass over this rank's shard."""
        return self.sampler.num_samples // self.batch_size

    def __iter__(self) -> 'MetaBatches':
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._iter is None:
                self._start_pass()
            try:
                input, target = next(self._iter)
            except StopIteration:
                # a pass ended: next epoch, fresh permutation
                self._iter = None
                self.epoch += 1
                self.position = 0
                continue
            self.position += 1
            if not self._on_device:
                input = input.to(device=self.device, dtype=self.img_dtype)
                target = target.to(device=self.device)
            return input, target

    def _start_pass(self) -> None:
        """Open an iterator at ``(epoch, position)``, never over an empty rest of a pass.

        A pass whose last batch was already drawn (``position == batches_per_epoch``, e.g. restored
        from a checkpoint saved right after it) moves on to the next epoch first: iterating an empty
        rest would end at once, and timm's ``PrefetchLoader`` cannot iterate an empty loader at all.

        Raises:
            ValueError: if this rank's shard holds no full batch (``build_meta_loader`` refuses that).
        """
        if self.batches_per_epoch < 1:
            raise ValueError(
                f'the meta set holds {self.sampler.num_samples} samples on this rank, fewer than one meta '
                f'batch of {self.batch_size}; lower --mkd-meta-batch-size or use more meta data')
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.position * self.batch_size
        self._iter = iter(self.loader)

    def _layout(self) -> Dict[str, int]:
        """What a saved position depends on: batch size, this rank's shard size and the world size."""
        return {'batch_size': self.batch_size, 'shard_size': int(self.sampler.num_samples),
                'world_size': int(self.sampler.num_replicas)}

    def state_dict(self) -> Dict[str, int]:
        """``{'epoch', 'position'}`` (where the next meta batch comes from) and the layout they refer to."""
        return dict({'epoch': self.epoch, 'position': self.position}, **self._layout())

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume at ``state``: the next batch is the one that followed when it was saved.

        A position is only meaningful for the layout it was saved with. When the meta batch size,
        the world size or the shard size differ (or the saved pass is already used up), the
        resumed run starts the next meta epoch, a fresh permutation, instead of refusing to resume.
        States saved before the layout was recorded are taken as they are when their position fits.

        Args:
            state: what ``state_dict`` returned (``epoch`` and ``position`` at least).

        Raises:
            ValueError: for a negative epoch or position (not a state this class writes).
        """
        epoch, position = int(state['epoch']), int(state['position'])
        if epoch < 0 or position < 0:
            raise ValueError(f'invalid meta loader state {state}: epoch and position must be >= 0')
        changed = any(k in state and int(state[k]) != v for k, v in self._layout().items())
        if changed or position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
        self._iter = None


def build_meta_loader(
        dataset: torch.utils.data.Dataset,
        *,
        input_size: Union[int, Tuple[int, int], Tuple[int, int, int]],
        batch_size: int,
        mean: Tuple[float, ...],
        std: Tuple[float, ...],
        interpolation: str = 'bilinear',
        crop_pct: Optional[float] = None,
        crop_mode: Optional[str] = None,
        num_workers: int = 0,
        distributed: bool = False,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
        use_prefetcher: bool = False,
        img_dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
) -> MetaBatches:
    """Build the endless meta-batch iterator for a meta dataset (held-out subset or split).

    The meta loss measures how well the look-ahead student does on clean data, so the meta set
    gets timm's **eval** transforms (``create_transform(..., is_training=False)``: resize, center
    crop, normalise) and no mixup / cutmix / random erasing. Inputs are normalised exactly as
    timm's own loaders do for the student: by the transform without the prefetcher, on device by
    timm's ``PrefetchLoader`` with it. This function sets ``dataset.transform``.

    Each rank draws from its own shard of one seeded permutation per epoch (the shards of a pass
    are disjoint; a ``DistributedSampler`` with ``num_replicas=1`` when not distributed). The
    sampler and the DataLoader have private generators, so drawing meta batches leaves the global
    torch RNG, and hence the training stream (dropout, augmentation, mixup), untouched.

    Args:
        dataset: Map-style meta dataset (an ``IndexSubset`` from ``split_holdout`` or a split from
            ``create_dataset``). Its ``transform`` is replaced.
        input_size: Student input size, ``(C, H, W)`` or ``H`` / ``(H, W)``.
        batch_size: Meta batch size per rank.
        mean: Normalisation mean of the student (one value per channel).
        std: Normalisation std of the student.
        interpolation: Resize interpolation of the eval transform.
        crop_pct: Eval center-crop fraction (timm's default when None).
        crop_mode: Eval crop mode ('center', 'squash', 'border'; timm's default when None).
        num_workers: DataLoader worker processes (0 loads in the calling process).
        distributed: Shard the meta set across ``world_size`` ranks.
        world_size: Number of ranks (ignored unless ``distributed``).
        rank: This rank (ignored unless ``distributed``).
        seed: Seed of the per-epoch permutation (the same on every rank).
        device: Device the batches are moved to (CPU when None).
        use_prefetcher: Load uint8 batches and normalise on device with timm's ``PrefetchLoader``
            (as train.py does without ``--no-prefetcher``).
        img_dtype: Dtype of the input batches.
        pin_memory: Pin host memory (useful with the prefetcher on CUDA).

    Returns:
        ``MetaBatches``: ``next()`` yields ``(input [B, C, H, W], target [B])`` on ``device``.

    Raises:
        ValueError: if ``batch_size`` exceeds this rank's share of the meta set, or if ``rank``
            is not in ``[0, world_size)``.
    """
    from timm.data import create_transform
    from timm.data.loader import PrefetchLoader, fast_collate

    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise TypeError(
            f'the meta dataset must be map-style (random access by index), got the iterable '
            f'{type(dataset).__name__}')
    if batch_size < 1:
        raise ValueError(f'meta batch size must be >= 1, got {batch_size}')
    if not distributed:
        world_size, rank = 1, 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} is not in [0, world_size={world_size})')
    device = torch.device(device) if device is not None else torch.device('cpu')

    sampler = _ShardSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    if batch_size > sampler.num_samples:
        raise ValueError(
            f'meta batch size {batch_size} is larger than the meta set ({sampler.num_samples} samples '
            f'on this rank); lower --mkd-meta-batch-size or use a larger holdout fraction')

    dataset.transform = create_transform(
        input_size,
        is_training=False,
        interpolation=interpolation,
        mean=mean,
        std=std,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        use_prefetcher=use_prefetcher,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=fast_collate if use_prefetcher else None,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # private generator: the per-iterator base seed would otherwise be drawn from the global RNG
        generator=torch.Generator().manual_seed(seed),
    )
    if use_prefetcher:
        channels = input_size[0] if isinstance(input_size, (tuple, list)) and len(input_size) == 3 else len(mean)
        loader = PrefetchLoader(
            loader, mean=mean, std=std, channels=channels, device=device, img_dtype=img_dtype)
    return MetaBatches(
        loader, sampler, batch_size=batch_size, device=device, img_dtype=img_dtype,
        on_device=use_prefetcher)
