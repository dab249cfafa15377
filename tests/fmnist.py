"""Real Fashion-MNIST for the tests (``timm_mkd.data.fashion_mnist``), skipping when it is not installed.

Usage from a test module (tests/ has no ``__init__.py``, so pytest puts this folder on
``sys.path``)::

    from fmnist import fashion_mnist_root
    ds = timm.data.create_dataset('torch/fashion_mnist', root=fashion_mnist_root(), split='train')
"""
import pytest

from timm_mkd.data import fashion_mnist


def fashion_mnist_root() -> str:
    """The unpacked Fashion-MNIST root; skips the calling test when Debian's files are missing."""
    try:
        return fashion_mnist.fashion_mnist_root()
    except FileNotFoundError as e:
        pytest.skip(str(e))
