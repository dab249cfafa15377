"""timm's RandAugment posterize at magnitude 10 (0 bits kept) under the installed Pillow.

DeiT-style recipes (``rand-m9-mstd0.5-inc1``) draw ``PosterizeIncreasing`` at magnitude 10 now and
then, which asks Pillow for 0 bits; Pillow >= 13 raises there. ``train_mkd.py`` applies
``timm_mkd.augment_compat.fix_posterize_zero_bits`` before train.py builds its transforms.
Real timm augmentation ops on real Fashion-MNIST images.
"""
import random

import PIL
import pytest
import torchvision
from PIL import Image, ImageOps
from timm.data.auto_augment import AugmentOp, NAME_TO_OP, rand_augment_transform

from fmnist import fashion_mnist_root
from timm_mkd import augment_compat


def _images(n, mode):
    ds = torchvision.datasets.FashionMNIST(fashion_mnist_root(), train=True, download=False)
    return [ds[i][0].convert(mode) for i in range(n)]


def test_detects_whether_pillow_rejects_zero_bits():
    try:
        ImageOps.posterize(Image.new('RGB', (2, 2)), 0)
        rejects = False
    except ValueError:
        rejects = True
    assert augment_compat.pillow_rejects_zero_bits() == rejects
    if int(PIL.__version__.split('.')[0]) >= 13:
        assert rejects, f'Pillow {PIL.__version__} was expected to refuse 0 bits'


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_posterize_increasing_at_magnitude_10_gives_a_black_image(mode):
    augment_compat.fix_posterize_zero_bits()
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # 4 - int(10 / 10 * 4) = 0 bits
    for img in _images(3, mode):
        out = op(img)
        assert out.mode == mode and out.size == img.size
        black = ((0, 0),) * 3 if mode == 'RGB' else (0, 0)
        assert out.getextrema() == black


def test_other_bit_counts_are_timm_s_own_result():
    augment_compat.fix_posterize_zero_bits()
    img = _images(1, 'RGB')[0]
    for magnitude in (0, 3, 5, 8, 9.9):  # 4, 3, 2, 1 and 1 bits kept: Pillow's own posterize
        bits = 4 - int(magnitude / 10 * 4)
        out = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=magnitude)(img)
        assert list(out.getdata()) == list(ImageOps.posterize(img, bits).getdata())


def test_deit_randaugment_at_its_largest_magnitude_runs():
    """The DeiT op set at magnitude 10 every time: posterize gets 0 bits on about 1 image in 15."""
    if augment_compat.fix_posterize_zero_bits():
        assert NAME_TO_OP['PosterizeIncreasing'] is augment_compat.posterize
    random.seed(0)  # RandAugment draws its ops from Python's random module
    aug = rand_augment_transform('rand-m10-n2-mstd0-inc1', dict(translate_const=10, img_mean=(128, 128, 128)))
    for img in _images(120, 'RGB'):
        assert aug(img).size == img.size
