"""The meta loader: endless, per-rank sharded meta batches, resumable.

``build_meta_loader`` turns a meta dataset (``timm_mkd.data.meta_data``: a held-out subset or another
split) into ``MetaBatches``: timm's *eval* transforms or the training augmentation (no mixup), a seeded
per-rank shuffled shard, endless iteration, a private RNG (drawing meta batches never moves the training
RNG stream) and a ``state_dict`` that resumes at the next batch.
"""
import contextlib
import itertools
import random
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.utils.data
from torch.utils.data.distributed import DistributedSampler

__all__ = ['MetaBatches', 'build_meta_loader']


class _ShardSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first ``skip`` indices of a pass (for resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, keyed: bool = False):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0
        self.keyed = keyed  # yield (epoch, index) keys for _SeededViews

    def __iter__(self) -> Iterator[Any]:
        indices = itertools.islice(super().__iter__(), self.skip, None)
        return ((self.epoch, i) for i in indices) if self.keyed else indices

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


@contextlib.contextmanager
def _global_rng_restored() -> Iterator[None]:
    """Run the block, then put Python's, NumPy's and torch's CPU generators back as they were."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def _seed_global_rng(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators (the ones timm's CPU transforms draw from)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that also seeds (lazily) every CUDA device


class _SeededViews(torch.utils.data.Dataset):
    """A dataset whose random transform draws each sample from its own RNG, seeded by ``(seed, epoch, index)``.

    timm's training transforms draw from the global generators (``random`` for RandAugment and the random
    crop, torch for others). Without workers those draws would move the training stream; with workers they
    would depend on the worker count. Seeding per sample makes a meta view a function of (seed, meta epoch,
    index) alone: the same on resume, across worker counts and ranks, and the training RNG is left untouched.
    Indexed by the ``(epoch, index)`` keys of a keyed ``_ShardSampler``; the DataLoader fetches a whole batch
    through ``__getitems__``, so the global generators are saved and restored once per batch.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> list:
        samples = []
        with _global_rng_restored():
            for epoch, index in keys:
                _seed_global_rng(int(np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(1)[0]))
                samples.append(self.dataset[index])
        return samples


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
                f'batch of {self.batch_size}; lower the meta batch size or use more meta data')
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
        train_transform: Optional[Dict[str, Any]] = None,
) -> MetaBatches:
    """Build the endless meta-batch iterator for a meta dataset (held-out subset or split).

    Two kinds of meta views. By default (``train_transform=None``) timm's **eval** transforms
    (``create_transform(..., is_training=False)``: resize, center crop, normalise): the look-ahead
    estimators measure how well the student does on clean data. With ``train_transform`` the
    training augmentation, ``create_transform(input_size, is_training=True, **train_transform)``
    (e.g. ``{'auto_augment': 'rand-m9-mstd0.5', 'scale': (0.08, 1.0), 'hflip': 0.5}``): the
    ``'calibration'`` estimator then fits the teacher's temperature on the kind of views its KD target
    is computed on during training. Each sample's augmentation comes from its own RNG seeded by
    ``(seed, meta epoch, index)`` (reproducible on resume, independent of workers and ranks). Neither
    kind has mixup / cutmix (batch-level mixing of the training loop) or random erasing. Inputs are
    normalised exactly as timm's own loaders do for the student: by the transform without the
    prefetcher, on device by timm's ``PrefetchLoader`` with it. This function sets ``dataset.transform``.

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
        train_transform: keyword arguments of timm's training ``create_transform`` for augmented meta
            views (without ``input_size``, ``is_training``, ``mean``, ``std``, ``use_prefetcher``, which this
            function sets, and without random erasing); None: eval views.

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

    if train_transform is not None:
        clash = sorted(set(train_transform) & {'input_size', 'is_training', 'mean', 'std', 'use_prefetcher',
                                               're_prob', 're_mode', 're_count', 're_num_splits'})
        if clash:
            raise ValueError(f'train_transform sets {clash}: the meta loader sets those itself (and leaves random '
                             f'erasing out); drop them')
    sampler = _ShardSampler(dataset, num_replicas=world_size, rank=rank, seed=seed, keyed=train_transform is not None)
    if batch_size > sampler.num_samples:
        raise ValueError(
            f'meta batch size {batch_size} is larger than the meta set ({sampler.num_samples} samples '
            f'on this rank); lower the meta batch size or use a larger holdout fraction')

    if train_transform is None:
        dataset.transform = create_transform(
            input_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
            crop_pct=crop_pct, crop_mode=crop_mode, use_prefetcher=use_prefetcher)
    else:
        dataset.transform = create_transform(
            input_size, is_training=True, mean=mean, std=std, use_prefetcher=use_prefetcher,
            **dict({'interpolation': interpolation}, **train_transform))
    loader = torch.utils.data.DataLoader(
        dataset if train_transform is None else _SeededViews(dataset, seed),
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
