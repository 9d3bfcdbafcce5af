"""``python -m train_imagenet ...`` (also under ``torchrun -m train_imagenet``)."""
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())
