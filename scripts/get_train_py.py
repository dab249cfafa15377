#!/usr/bin/env python3
"""timm's train.py for the quickstart, before anything is installed (standard library only).

    python3 scripts/get_train_py.py release        # prints the timm release the adapters pair with
    python3 scripts/get_train_py.py fetch DEST     # downloads its train.py to DEST, checks its sha256

The release, its address and its sha256 come from the adapters (``patches/``, loaded by path
under a private name), so the quickstart names the same version as every launcher message.
``fetch`` writes DEST only when the download is complete and byte-identical to the known file;
offline it exits 1 with one message saying what to do.
"""
import hashlib
import importlib.util
import os
import sys
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_adapters():
    """``patches/`` of this checkout, as ``_quickstart_patches`` (never a top-level ``patches``).

    Returns:
        The adapters package.
    """
    # The adapters read the MKD flags from this checkout's timm_mkd (standard library only at import).
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    folder = os.path.join(REPO, 'patches')
    spec = importlib.util.spec_from_file_location(
        '_quickstart_patches', os.path.join(folder, '__init__.py'), submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fetch(dest: str, adapters) -> int:
    """Download the train.py of ``NEWEST_KNOWN_RELEASE`` to ``dest`` (atomically, hash-checked).

    Args:
        dest: the file to write.
        adapters: the adapters package.
    Returns:
        The exit status: 0 written (or already there), 1 with a message on stderr.
    """
    release, sha = adapters.NEWEST_KNOWN_RELEASE, adapters.NEWEST_KNOWN_SHA256
    if os.path.isfile(dest):
        with open(dest, 'rb') as f:
            if hashlib.sha256(f.read()).hexdigest() == sha:
                return 0
    url = adapters.train_py_url(release)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as e:
        sys.stderr.write(
            f'quickstart: cannot download timm {release} train.py from {url} ({e}); nothing has been installed.\n'
            f'Fix: copy that file (timm {release} train.py, sha256 {sha[:12]}...) by other means and run\n'
            f'    TIMM_TRAIN_PY=/path/to/train.py bash scripts/quickstart.sh\n')
        return 1
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha:
        sys.stderr.write(f'quickstart: {url} gave {len(data)} bytes with sha256 {digest[:12]}..., not the known '
                         f'timm {release} train.py ({sha[:12]}...); nothing was written. Fix: download it again, '
                         f'or pass a copy with TIMM_TRAIN_PY=/path/to/train.py.\n')
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest + '.part', 'wb') as f:
        f.write(data)
    os.replace(dest + '.part', dest)
    return 0


def main(argv) -> int:
    """``release`` or ``fetch DEST``; returns the exit status."""
    adapters = load_adapters()
    if argv[:1] == ['release']:
        print(adapters.NEWEST_KNOWN_RELEASE)
        return 0
    if argv[:1] == ['fetch'] and len(argv) == 2:
        return fetch(argv[1], adapters)
    sys.stderr.write(__doc__)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
