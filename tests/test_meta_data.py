"""Meta data sources and the meta loader, on real timm, real torch and real Fashion-MNIST."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, create_transform
from timm.data.auto_augment import RandAugment

from fmnist import fashion_mnist_root
from timm_mkd.data.meta_data import (
    IndexSubset,
    build_meta_loader,
    check_not_validation,
    holdout_indices,
    split_holdout,
)

INPUT_SIZE = (1, 32, 32)
MEAN, STD = (0.2860,), (0.3530,)
CPU = torch.device('cpu')


def test_build_meta_loader_is_exported_by_the_package():
    import timm_mkd
    assert timm_mkd.build_meta_loader is build_meta_loader and 'build_meta_loader' in timm_mkd.__all__


def _fmnist(split='train', is_training=False):
    return create_dataset(
        'torch/fashion_mnist', root=fashion_mnist_root(), split=split, is_training=is_training,
        download=False)


def _small_meta_set(n=64, offset=0):
    return IndexSubset(_fmnist('train'), range(offset, offset + n))


def _meta(dataset, batch_size=16, **kwargs):
    kwargs.setdefault('seed', 0)
    return build_meta_loader(
        dataset, input_size=INPUT_SIZE, batch_size=batch_size, mean=MEAN, std=STD, **kwargs)


def _keys(images):
    """A hashable identity per image (Fashion-MNIST images in a small range are distinct)."""
    return [bytes(x.numpy().tobytes()) for x in images]


# ------------------------------------------------------------------ holdout_indices

def test_holdout_is_deterministic_disjoint_and_complete():
    train_a, meta_a = holdout_indices(1000, 0.1, seed=3)
    train_b, meta_b = holdout_indices(1000, 0.1, seed=3)
    assert (train_a, meta_a) == (train_b, meta_b)
    assert len(meta_a) == 100 and len(train_a) == 900
    assert not set(train_a) & set(meta_a)
    assert sorted(train_a + meta_a) == list(range(1000))
    assert train_a == sorted(train_a) and meta_a == sorted(meta_a)
    _, meta_other = holdout_indices(1000, 0.1, seed=4)
    assert meta_other != meta_a  # the seed matters
    assert meta_a != list(range(100))  # a permutation, not the first block


def test_holdout_does_not_touch_global_rng():
    state = torch.get_rng_state()
    holdout_indices(500, 0.2, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.1, 1.5])
def test_holdout_rejects_fraction_outside_open_interval(fraction):
    with pytest.raises(ValueError, match=r'in \(0, 1\) exclusive'):
        holdout_indices(100, fraction)


def test_holdout_rejects_fraction_leaving_a_side_empty():
    with pytest.raises(ValueError, match='leaves the meta set empty'):
        holdout_indices(10, 0.01)
    with pytest.raises(ValueError, match='leaves the training set empty'):
        holdout_indices(10, 0.99)


# ------------------------------------------------------------------ IndexSubset / split_holdout

def test_split_holdout_keeps_train_and_eval_transforms_apart():
    """create_loader sets dataset.transform; each subset must keep its own through IndexSubset."""
    train_ds = _fmnist('train', is_training=True)
    meta_ds = _fmnist('train', is_training=False)
    train_sub, meta_sub = split_holdout(train_ds, meta_ds, fraction=0.1, seed=0)
    assert len(train_sub) == 54000 and len(meta_sub) == 6000
    assert not set(train_sub.indices) & set(meta_sub.indices)

    loader_train = create_loader(
        train_sub, input_size=INPUT_SIZE, batch_size=8, is_training=True,
        auto_augment='rand-m9-mstd0.5', mean=MEAN, std=STD, num_workers=0,
        persistent_workers=False,  # timm 1.0.27 passes True to DataLoader even with 0 workers
        use_prefetcher=False, device=CPU)
    meta = _meta(meta_sub, batch_size=8)

    # the transforms landed on the two wrapped instances, and they differ
    assert train_sub.transform is train_ds.transform
    assert meta_sub.transform is meta_ds.transform
    assert any(isinstance(t, RandAugment) for t in train_ds.transform.transforms)
    assert not any(isinstance(t, RandAugment) for t in meta_ds.transform.transforms)

    # a meta sample is exactly timm's eval transform of the raw image
    raw = Image.fromarray(meta_ds.data[meta_sub.indices[0]].numpy(), mode='L')
    eval_tf = create_transform(INPUT_SIZE, is_training=False, mean=MEAN, std=STD)
    x_meta, y_meta = meta_sub[0]
    assert torch.equal(x_meta, eval_tf(raw))
    assert y_meta == int(meta_ds.targets[meta_sub.indices[0]])

    # a training sample is augmented: random, and not the eval view
    torch.manual_seed(0)
    random.seed(0)
    views = [train_sub[0][0] for _ in range(4)]
    raw_t = Image.fromarray(train_ds.data[train_sub.indices[0]].numpy(), mode='L')
    assert all(v.shape == INPUT_SIZE and v.dtype == torch.float32 for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert not any(torch.equal(eval_tf(raw_t), v) for v in views)

    # both loaders run end to end
    x, y = next(iter(loader_train))
    assert x.shape == (8, *INPUT_SIZE) and y.shape == (8,)
    xm, ym = next(meta)
    assert xm.shape == (8, *INPUT_SIZE) and ym.dtype == torch.int64


def test_split_holdout_refuses_one_shared_instance_and_length_mismatch():
    ds = _fmnist('train')
    with pytest.raises(ValueError, match='two distinct instances'):
        split_holdout(ds, ds, 0.1)
    with pytest.raises(ValueError, match='60000 and 10000 samples'):
        split_holdout(ds, _fmnist('test'), 0.1)


def test_index_subset_forwards_target_transform_and_set_epoch():
    ds = _fmnist('test')
    sub = IndexSubset(ds, [5, 7])
    sub.target_transform = lambda y: y + 100
    assert ds.target_transform is sub.target_transform
    assert sub[1][1] == int(ds.targets[7]) + 100
    sub.set_epoch(3)  # FashionMNIST has no set_epoch: a harmless no-op


# ------------------------------------------------------------------ build_meta_loader

def test_meta_loader_is_endless_and_reshuffles_each_epoch():
    meta = _meta(_small_meta_set(64), batch_size=16)
    assert meta.batches_per_epoch == 4
    batches = [next(meta) for _ in range(10)]  # 2.5 epochs
    assert all(x.shape == (16, *INPUT_SIZE) and y.shape == (16,) for x, y in batches)
    epoch0 = _keys(torch.cat([x for x, _ in batches[:4]]))
    epoch1 = _keys(torch.cat([x for x, _ in batches[4:8]]))
    assert len(set(epoch0)) == 64 and set(epoch0) == set(epoch1)  # each epoch is one full pass
    assert epoch0 != epoch1  # in a new order
    assert meta.state_dict() == {'epoch': 2, 'position': 2, 'batch_size': 16, 'shard_size': 64, 'world_size': 1}


@pytest.mark.parametrize('use_prefetcher', [False, True])
def test_meta_batches_are_normalised_like_timm_eval_loader(use_prefetcher):
    subset = _small_meta_set(64)
    reference = create_loader(
        IndexSubset(_fmnist('train'), subset.indices), input_size=INPUT_SIZE, batch_size=64,
        is_training=False, mean=MEAN, std=STD, num_workers=0, persistent_workers=False, use_prefetcher=use_prefetcher,
        device=CPU)
    ref_x, ref_y = next(iter(reference))
    ref = {k: (x, int(y)) for k, x, y in zip(_keys(ref_x), ref_x, ref_y)}
    meta = _meta(subset, batch_size=16, use_prefetcher=use_prefetcher, device=CPU)
    x, y = next(meta)
    assert x.dtype == torch.float32 and x.device == CPU
    assert abs(x.mean().item()) < 1.0 and x.std().item() > 0.5  # normalised, not [0, 1] or uint8
    for key, label in zip(_keys(x), y.tolist()):
        assert key in ref, 'meta sample differs from timm eval loader output'
        assert ref[key][1] == label


def test_prefetcher_and_plain_paths_agree():
    """Same sample order (same seed) and the same normalisation up to float rounding."""
    plain = next(_meta(_small_meta_set(32), batch_size=8, use_prefetcher=False))
    fetched = next(_meta(_small_meta_set(32), batch_size=8, use_prefetcher=True, device=CPU))
    assert torch.equal(plain[1], fetched[1])
    torch.testing.assert_close(plain[0], fetched[0], atol=1e-5, rtol=1e-5)


def test_distributed_shards_are_disjoint_and_cover_the_set():
    ranks = [_meta(_small_meta_set(64), batch_size=16, distributed=True, world_size=2, rank=r)
             for r in (0, 1)]
    assert [m.batches_per_epoch for m in ranks] == [2, 2]
    shards = [set(_keys(torch.cat([next(m)[0] for _ in range(2)]))) for m in ranks]
    assert len(shards[0]) == 32 and len(shards[1]) == 32
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 64


def test_meta_batch_larger_than_meta_set_is_refused():
    with pytest.raises(ValueError, match=r'meta batch size 65 is larger than the meta set \(64 samples'):
        _meta(_small_meta_set(64), batch_size=65)
    with pytest.raises(ValueError, match=r'\(32 samples on this rank\).*lower the meta batch size'):
        _meta(_small_meta_set(64), batch_size=40, distributed=True, world_size=2, rank=1)


def test_meta_loader_leaves_global_rng_untouched():
    meta = _meta(_small_meta_set(48), batch_size=16)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    for _ in range(5):  # crosses an epoch boundary (3 batches per epoch)
        next(meta)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_meta_loader_state_dict_resumes_at_the_next_batch():
    a = _meta(_small_meta_set(64), batch_size=16)
    for _ in range(6):  # epoch 1, position 2
        next(a)
    state = a.state_dict()
    assert (state['epoch'], state['position']) == (1, 2)
    b = _meta(_small_meta_set(64), batch_size=16)
    b.load_state_dict(state)
    for _ in range(3):  # through the next epoch boundary
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match='must be >= 0'):
        b.load_state_dict({'epoch': 0, 'position': -1})


@pytest.mark.parametrize('use_prefetcher', [False, True])
@pytest.mark.parametrize('meta_size', [64, 16])  # 4 batches per meta epoch, and exactly one batch
def test_meta_loader_resumes_from_every_position_it_saves(use_prefetcher, meta_size):
    """Every state a run can checkpoint resumes, the last batch of a meta epoch included.

    A restored state must name a batch that exists: a resumed pass that skipped every batch (the
    position right after the last batch of a meta epoch) is empty, and timm's PrefetchLoader
    before 1.0.31 cannot iterate an empty loader (UnboundLocalError at the first meta step).
    """
    kwargs = dict(batch_size=16, use_prefetcher=use_prefetcher, device=CPU)
    batches_per_epoch = meta_size // 16
    for drawn in range(2 * batches_per_epoch + 1):
        run = _meta(_small_meta_set(meta_size), **kwargs)
        for _ in range(drawn):
            next(run)
        resumed = _meta(_small_meta_set(meta_size), **kwargs)
        resumed.load_state_dict(run.state_dict())
        state = resumed.state_dict()
        assert state['position'] < batches_per_epoch, f'after {drawn} batches: {state} names no batch'
        for _ in range(2):  # the resumed loader draws exactly what the uninterrupted one draws
            x, y = next(run)
            xr, yr = next(resumed)
            assert torch.equal(x, xr) and torch.equal(y, yr), f'after {drawn} batches'


@pytest.mark.parametrize('old, new', [
    (dict(batch_size=8), dict(batch_size=16)),  # a larger meta batch: position 6 of 8 does not exist at 16
    (dict(batch_size=16), dict(batch_size=16, distributed=True, world_size=2, rank=1)),  # more ranks
    (dict(batch_size=16, distributed=True, world_size=2, rank=0), dict(batch_size=16)),  # fewer ranks
])
def test_meta_loader_resumes_after_batch_or_world_size_change(old, new):
    """A position saved for another layout resumes at the start of the next meta epoch."""
    saved = _meta(_small_meta_set(64), use_prefetcher=True, device=CPU, **old)
    for _ in range(saved.batches_per_epoch + saved.batches_per_epoch - 1):  # epoch 1, its last batch pending
        next(saved)
    state = saved.state_dict()
    resumed = _meta(_small_meta_set(64), use_prefetcher=True, device=CPU, **new)
    resumed.load_state_dict(state)
    fresh = _meta(_small_meta_set(64), use_prefetcher=True, device=CPU, **new)
    fresh.load_state_dict(dict(fresh.state_dict(), epoch=state['epoch'] + 1, position=0))
    for _ in range(resumed.batches_per_epoch + 1):  # through a whole epoch and into the next
        x, y = next(resumed)
        xf, yf = next(fresh)
        assert x.shape[0] == new['batch_size'] and torch.equal(x, xf) and torch.equal(y, yf)
    legacy = _meta(_small_meta_set(64), use_prefetcher=True, device=CPU, **new)
    legacy.load_state_dict({'epoch': state['epoch'], 'position': state['position'] + 5})  # no layout recorded
    assert next(legacy)[0].shape[0] == new['batch_size']


# ------------------------------------------------------------------ augmented meta views (train_transform)

RANDAUG = {'auto_augment': 'rand-m9-mstd0.5', 'scale': (0.5, 1.0), 'hflip': 0.5}


def test_train_views_apply_timms_training_transform():
    """A crop of the whole image that is always flipped: each view is the flipped eval view of the same image."""
    flip_only = {'scale': (1.0, 1.0), 'ratio': (1.0, 1.0), 'hflip': 1.0, 'color_jitter': 0.0}
    plain = next(_meta(_small_meta_set(32), batch_size=32, crop_pct=1.0))
    flipped = next(_meta(_small_meta_set(32), batch_size=32, crop_pct=1.0, train_transform=flip_only))
    assert torch.equal(plain[1], flipped[1])  # same order: the keyed sampler draws the same permutation
    assert torch.equal(flipped[0], plain[0].flip(-1))


@pytest.mark.parametrize('use_prefetcher', [False, True])
def test_train_views_are_random_reproducible_and_leave_global_rng_untouched(use_prefetcher):
    kwargs = dict(batch_size=16, train_transform=RANDAUG, use_prefetcher=use_prefetcher, device=CPU)
    meta = _meta(_small_meta_set(16), **kwargs)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    first, second = next(meta), next(meta)  # one batch per meta epoch: the same 16 images twice
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    eval_views = next(_meta(_small_meta_set(16), batch_size=16, crop_pct=1.0))[0]
    assert not any(torch.equal(x, e) for x in first[0] for e in eval_views)  # augmented, not eval views
    assert sorted(first[1].tolist()) == sorted(second[1].tolist())
    assert not torch.equal(first[0], second[0])  # a new epoch draws new views (and a new order)
    torch.manual_seed(99)  # another global state: the views do not depend on it
    again = _meta(_small_meta_set(16), **kwargs)
    assert torch.equal(next(again)[0], first[0]) and torch.equal(next(again)[0], second[0])


def test_train_views_do_not_depend_on_the_worker_count_and_resume_exactly():
    run = _meta(_small_meta_set(64), batch_size=16, train_transform=RANDAUG)
    for _ in range(5):  # epoch 1, position 1
        next(run)
    resumed = _meta(_small_meta_set(64), batch_size=16, train_transform=RANDAUG, num_workers=1)
    resumed.load_state_dict(run.state_dict())
    for _ in range(4):  # through the next epoch boundary
        x, y = next(run)
        xr, yr = next(resumed)
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_train_transform_refuses_the_settings_the_loader_owns():
    with pytest.raises(ValueError, match=r"train_transform sets \['mean', 're_prob'\].*drop them"):
        _meta(_small_meta_set(32), batch_size=16, train_transform={'re_prob': 0.25, 'mean': (0.5,)})


# ------------------------------------------------------------------ check_not_validation

def test_check_not_validation_refuses_the_reporting_split(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ValueError, match=r"meta split 'validation'.*validation split 'validation'"):
        check_not_validation('validation', root, 'validation', root)
    with pytest.raises(ValueError, match='Hold out a fraction'):
        check_not_validation('val', None, 'validation', root)  # synonyms, meta root defaults to val root
    with pytest.raises(ValueError, match="meta split 'test'"):
        # timm builds every non-train split of torch/fashion_mnist from the same test set
        check_not_validation('test', root, 'validation', root, dataset='torch/fashion_mnist')
    link = os.path.join(root, 'link')
    os.symlink(root, link)
    with pytest.raises(ValueError):
        check_not_validation('validation', link, 'validation', root)


def test_check_not_validation_accepts_other_data(tmp_path):
    root, other = str(tmp_path / 'a'), str(tmp_path / 'b')
    check_not_validation('train', root, 'validation', root)
    check_not_validation('validation', other, 'validation', root)
    check_not_validation('test', root, 'validation', root)  # a folder dataset: another folder


