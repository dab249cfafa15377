"""The patches that see train.py's datasets: the training split gives up its meta fraction, and the meta loader.

``DataPatches`` is a mixin of ``MKDRun`` (``patches/run.py``); it reads ``self.args``, ``self.opts``
and ``self.data_config`` and sets ``self.meta_dataset``.
"""
import logging
import os

from .common import MKDSetupError

_logger = logging.getLogger('train_mkd')

_BY_INDEX = 'the meta loader draws its batches by index. Fix: use --mkd-meta-data folder:PATH (an image folder)'


class DataPatches:
    """Mixin of ``MKDRun``: ``create_dataset`` and the meta batches."""


    def patch_create_dataset(self) -> None:
        def factory(original):
            def create_dataset(*a, **kw):
                if not self.mkd or not kw.get('is_training') or self.meta_dataset is not None:
                    return original(*a, **kw)
                return self._build_train_and_meta(original, a, kw)
            return create_dataset
        self._replace('create_dataset', factory)

    def _build_train_and_meta(self, create_dataset, a, kw):
        """Build the training split and, from the same arguments, the meta set."""
        from timm_mkd.data.meta_data import split_holdout
        spec = self.opts.meta_data
        train_ds = create_dataset(*a, **kw)
        if spec.kind == 'train':
            return train_ds
        meta_kw = dict(kw, is_training=False)
        for key in ('repeats', 'num_samples'):
            meta_kw.pop(key, None)
        if spec.kind == 'holdout':
            self._refuse_iterable(train_ds, 'holding out a fraction of the training split needs random access by '
                                            'index. Fix: use --mkd-meta-data split:NAME or folder:PATH')
            meta_ds = self._create_meta_dataset(create_dataset, a, meta_kw)
            total = len(train_ds)
            try:
                train_ds, meta_ds = split_holdout(train_ds, meta_ds, spec.fraction, seed=self.args.seed)
            except ValueError as e:
                raise MKDSetupError(f'--mkd-meta-data {self.args.mkd_meta_data}: {e}') from e
            if self.is_primary():
                _logger.info(
                    f'MKD: held out {len(meta_ds)} of {total} training samples as meta data '
                    f'(--mkd-meta-data {spec.fraction:g}); training on the other {len(train_ds)}')
        elif spec.kind == 'split':
            meta_ds = self._create_meta_dataset(create_dataset, a, dict(meta_kw, split=spec.split))
            self._refuse_iterable(meta_ds, _BY_INDEX)
            self._check_same_classes(train_ds, meta_ds, f'split:{spec.split}')
        else:
            if not os.path.isdir(spec.path):
                raise MKDSetupError(f'--mkd-meta-data folder:{spec.path}: no such folder. Fix: point it at an image '
                                    f'folder with one sub-folder per class, as the training data has.')
            meta_kw = dict(meta_kw, root=spec.path, split='', search_split=False)
            name = a[0] if a else meta_kw.pop('name', '')
            if name and not str(name).lower().startswith(('folder', 'imagefolder', 'imagetar')):
                name = ''  # folder:PATH is an image folder whatever --dataset is
            meta_ds = self._create_meta_dataset(create_dataset, (name, *a[1:]), meta_kw)
            self._check_same_classes(train_ds, meta_ds, f'folder:{spec.path}')
        if self.is_primary() and spec.kind != 'holdout':
            _logger.info(f'MKD: meta data from {spec.describe()} ({len(meta_ds)} samples)')
        # Fail now, before the model and teacher are built, rather than at the first meta step.
        world = int(getattr(self.args, 'world_size', 1) or 1) if getattr(self.args, 'distributed', False) else 1
        per_rank = len(meta_ds) // world
        if self.opts.meta_batch_size and self.opts.meta_batch_size > per_rank:
            raise MKDSetupError(
                f'--mkd-meta-batch-size {self.opts.meta_batch_size} is larger than the meta set '
                f'({len(meta_ds)} samples from {spec.describe()}' + (f', {per_rank} per rank' if world > 1 else '')
                + f'). Fix: lower --mkd-meta-batch-size (it defaults to --batch-size) or use more meta data'
                + (' (a larger --mkd-meta-data fraction).' if spec.kind == 'holdout' else '.'))
        self.meta_dataset = meta_ds
        return train_ds

    def _create_meta_dataset(self, create_dataset, a, kw):
        """timm's ``create_dataset`` for the meta set; what it raises about the data becomes an ``MKDSetupError``.

        timm and torchvision report missing, empty or unreadable data as ``ValueError``, ``OSError`` or
        ``RuntimeError`` (``Found 0 images``, ``Dataset not found``); anything else propagates with its traceback.
        """
        try:
            return create_dataset(*a, **kw)
        except (ValueError, OSError, RuntimeError) as e:
            raise MKDSetupError(f'--mkd-meta-data {self.args.mkd_meta_data}: {type(e).__name__}: {e}') from e

    def _refuse_iterable(self, dataset, why: str) -> None:
        """An ``MKDSetupError`` for an iterable (streamed) dataset where the meta data needs a map-style one."""
        import torch
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise MKDSetupError(f'--mkd-meta-data {self.args.mkd_meta_data}: {type(dataset).__name__} is an '
                                f'iterable dataset (--dataset {getattr(self.args, "dataset", "?")}); {why}.')

    @staticmethod
    def _check_same_classes(train_ds, meta_ds, what: str) -> None:
        """Refuse a meta set whose folder classes map to other indices than the training set's."""
        def class_to_idx(ds):
            reader = getattr(ds, 'reader', None)
            return getattr(reader, 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
        train_map, meta_map = class_to_idx(train_ds), class_to_idx(meta_ds)
        if train_map and meta_map and train_map != meta_map:
            missing = sorted(set(train_map) - set(meta_map))[:5]
            extra = sorted(set(meta_map) - set(train_map))[:5]
            raise MKDSetupError(
                f'--mkd-meta-data {what}: its classes do not match the training set\'s '
                f'({len(meta_map)} vs {len(train_map)} classes; missing {missing}, extra {extra}). '
                f'The meta labels would index the wrong classes; use a folder with the same class '
                f'sub-folders (or --class-map).')


    def _meta_train_transform(self):
        """train.py's training augmentation flags as ``create_transform`` keywords (no mixup, no random erasing)."""
        args, dc = self.args, self.data_config
        no_aug = bool(getattr(args, 'no_aug', False))
        interpolation = getattr(args, 'train_interpolation', None)
        if no_aug or not interpolation:
            interpolation = dc.get('interpolation', 'bilinear')  # train.py's own fallback
        kw = dict(no_aug=no_aug, interpolation=interpolation, auto_augment=getattr(args, 'aa', None))
        for flag in ('train_crop_mode', 'scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'color_jitter_prob',
                     'grayscale_prob', 'gaussian_blur_prob'):
            if getattr(args, flag, None) is not None:
                kw[flag] = getattr(args, flag)
        return kw

    def _meta_batches(self):
        """The meta batches for ``MKDTask.attach``: the training stream or an endless meta loader."""
        from timm_mkd import TRAIN_STREAM
        from timm_mkd.data.meta_data import build_meta_loader
        import torch
        args, opts = self.args, self.opts
        if self.meta_dataset is None:
            if opts.meta_data.kind != 'train':
                raise MKDSetupError(
                    f'--mkd-meta-data {args.mkd_meta_data}: train.py never built its training split '
                    f'through create_dataset(is_training=True); cannot build the meta data')
            return TRAIN_STREAM
        self._refuse_iterable(self.meta_dataset, _BY_INDEX)
        dc = self.data_config
        train_transform = self._meta_train_transform() if opts.meta_views == 'train' else None
        if self.is_primary():
            views = ('the training augmentation (' + ', '.join(f'{k}={v}' for k, v in train_transform.items())
                     + '; no mixup, cutmix or random erasing)') if train_transform else "timm's eval transform"
            _logger.info(f'MKD: meta views with {views} (--mkd-meta-views {args.mkd_meta_views})')
        try:
            return build_meta_loader(
                self.meta_dataset,
                input_size=dc['input_size'],
                batch_size=opts.meta_batch_size,
                mean=dc['mean'],
                std=dc['std'],
                interpolation=dc.get('interpolation', 'bilinear'),
                crop_pct=dc.get('crop_pct'),
                crop_mode=dc.get('crop_mode'),
                num_workers=min(2, max(0, int(args.workers))),
                distributed=bool(getattr(args, 'distributed', False)),
                world_size=int(getattr(args, 'world_size', 1)),
                rank=int(getattr(args, 'rank', 0)),
                seed=int(args.seed),
                device=self.device,
                use_prefetcher=bool(getattr(args, 'prefetcher', False)),
                img_dtype=self.img_dtype or torch.float32,
                pin_memory=bool(getattr(args, 'pin_mem', False)),
                train_transform=train_transform,
            )
        except ValueError as e:  # the core's words about the meta set and batch size, in the flags
            detail = str(e).replace('the meta batch size', 'the meta batch size (--mkd-meta-batch-size)')
            raise MKDSetupError(f'--mkd-meta-data {args.mkd_meta_data}: {detail}') from e
