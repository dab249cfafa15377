"""``python -m timm_mkd``: the ``train-mkd`` command (``timm_mkd.launcher``)."""
from timm_mkd.launcher import main

if __name__ == '__main__':
    main(prog='python -m timm_mkd')
