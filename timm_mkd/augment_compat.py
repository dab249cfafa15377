"""A compatibility fix for timm's RandAugment under Pillow >= 13: posterize to 0 bits.

timm's ``PosterizeIncreasing`` (the ``inc1`` RandAugment of DeiT-style recipes, e.g.
``rand-m9-mstd0.5-inc1``) maps magnitude 10 to *0* bits kept. Pillow before 13 turned that into a
black image; Pillow 13 raises ``ValueError: bits must be between or equal to 1 and 8`` inside a
data worker, and the run dies at a random batch (``mstd0.5`` draws magnitude 10 about 2% of the
time). timm 1.0.31 still has that code.

``fix_posterize_zero_bits()`` is called by ``train_mkd.py`` before train.py builds its transforms.
It changes nothing when the installed Pillow accepts 0 bits. Otherwise it points timm's
posterize operations (``NAME_TO_OP`` of ``timm.data.auto_augment``) at ``posterize``, which gives
the old result, a black image, for 0 bits and calls timm's own function for every other value.
"""
import logging
from typing import Callable, Optional

from PIL import Image, ImageOps

__all__ = ['pillow_rejects_zero_bits', 'posterize', 'fix_posterize_zero_bits']

_logger = logging.getLogger(__name__)

#: timm's own posterize function, kept when the fix is applied.
_timm_posterize: Optional[Callable] = None


def pillow_rejects_zero_bits() -> bool:
    """True when the installed Pillow refuses ``ImageOps.posterize(img, 0)`` (Pillow >= 13)."""
    try:
        ImageOps.posterize(Image.new('L', (1, 1)), 0)
    except ValueError:
        return True
    return False


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, with 0 bits kept giving the black image older Pillow gave.

    Args:
        img: an 'L' or 'RGB' PIL image (the modes Pillow's posterize accepts).
        bits_to_keep: bits per channel to keep; 0 keeps none.
        **kwargs: passed on to timm's posterize (its fill/resample hparams).

    Returns:
        The posterized image.
    """
    if bits_to_keep <= 0 and img.mode in ('L', 'RGB'):
        return Image.new(img.mode, img.size)  # every value & 0 == 0, as Pillow < 13 computed
    original = _timm_posterize
    if original is None:
        from timm.data.auto_augment import posterize as original
    return original(img, bits_to_keep, **kwargs)


def fix_posterize_zero_bits() -> bool:
    """Route timm's posterize ops through ``posterize`` when Pillow rejects 0 bits.

    Must run before the transforms are built: each ``AugmentOp`` looks its function up once, at
    construction. Calling it again is harmless.

    Returns:
        True if timm's op table now uses ``posterize`` (Pillow rejects 0 bits), False if the installed
        Pillow needs no fix.
    """
    global _timm_posterize
    if not pillow_rejects_zero_bits():
        return False
    from timm.data import auto_augment
    if _timm_posterize is None:
        _timm_posterize = auto_augment.posterize
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is _timm_posterize:
            auto_augment.NAME_TO_OP[name] = posterize
    return True
