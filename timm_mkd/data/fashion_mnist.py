"""Fashion-MNIST offline, from Debian's ``dataset-fashion-mnist`` package.

Used by the quickstart run, the benchmarks and the tests, so there is one copy of this logic.

torchvision's ``FashionMNIST`` (which timm's ``create_dataset('torch/fashion_mnist', ...)``
builds) reads the *unpacked* IDX files from ``ROOT/FashionMNIST/raw/``: its existence check and
its reader both use the names without ``.gz`` and plain ``open()``, so symlinks to Debian's
``.gz`` files are not enough. We unpack them once into ``~/.cache/timm-mkd/fmnist`` (or under
``$XDG_CACHE_HOME``) and reuse it. Unpacking is atomic per file (write to a temporary name,
then ``os.replace``), so processes running in parallel never see a half-written file.

    python -m timm_mkd.data.fashion_mnist      # prints the root for --data-dir
"""
import gzip
import os
import shutil
import tempfile

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FILES = (
    'train-images-idx3-ubyte',
    'train-labels-idx1-ubyte',
    't10k-images-idx3-ubyte',
    't10k-labels-idx1-ubyte',
)


def cache_dir(*parts: str) -> str:
    """``~/.cache/timm-mkd/<parts>`` (honouring ``$XDG_CACHE_HOME``), created if missing."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    path = os.path.join(base, 'timm-mkd', *parts)
    os.makedirs(path, exist_ok=True)
    return path


def fashion_mnist_root() -> str:
    """Return a ``root`` for ``create_dataset('torch/fashion_mnist', root=..., download=False)``.

    Raises:
        FileNotFoundError: Debian's files are not installed (the message gives the apt command).
    """
    missing = [f for f in FILES if not os.path.isfile(os.path.join(DEBIAN_DIR, f + '.gz'))]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST not found in {DEBIAN_DIR} (missing {", ".join(missing)}); '
            f'install it with: apt-get install dataset-fashion-mnist')
    root = cache_dir('fmnist')
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


if __name__ == '__main__':
    print(fashion_mnist_root())
