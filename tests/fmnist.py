"""Real Fashion-MNIST for the tests, offline, from Debian's ``dataset-fashion-mnist`` package.

torchvision's ``FashionMNIST`` (which timm's ``create_dataset('torch/fashion_mnist', ...)``
builds) reads the *unpacked* IDX files from ``ROOT/FashionMNIST/raw/``: its existence check and
its reader both use the names without ``.gz`` and plain ``open()``, so symlinks to Debian's
``.gz`` files are not enough. We unpack them once into a cache folder and reuse it.

Usage from a test module (tests/ has no ``__init__.py``, so pytest puts this folder on
``sys.path``)::

    from fmnist import fashion_mnist_root
    ds = timm.data.create_dataset('torch/fashion_mnist', root=fashion_mnist_root(), split='train')
"""
import gzip
import os
import shutil
import tempfile

import pytest

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FILES = (
    'train-images-idx3-ubyte',
    'train-labels-idx1-ubyte',
    't10k-images-idx3-ubyte',
    't10k-labels-idx1-ubyte',
)


def _cache_root() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'timm-mkd', 'fmnist')


def fashion_mnist_root() -> str:
    """Return a ``root`` for ``create_dataset('torch/fashion_mnist', root=..., download=False)``.

    Skips the calling test (``pytest.skip``) when Debian's files are not installed. Unpacking is
    atomic per file (write to a temporary name, then ``os.replace``), so test sessions running in
    parallel never see a half-written file.
    """
    missing = [f for f in FILES if not os.path.isfile(os.path.join(DEBIAN_DIR, f + '.gz'))]
    if missing:
        pytest.skip(
            f'Fashion-MNIST not found in {DEBIAN_DIR} (missing {", ".join(missing)}); '
            f'install it with: apt-get install dataset-fashion-mnist')
    root = _cache_root()
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for name in FILES:
        dest = os.path.join(raw, name)
        if os.path.isfile(dest):
            continue
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=name + '.', suffix='.tmp')
        try:
            with os.fdopen(fd, 'wb') as out, gzip.open(os.path.join(DEBIAN_DIR, name + '.gz')) as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return root
