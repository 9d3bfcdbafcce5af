"""train_imagenet: ImageNet (and demo) training of the gka_* models through timm's own train.py.

``python -m train_imagenet --config configs/gka_small_in1k.yaml --data-dir /data/imagenet`` imports
``gka_vision``, finds timm's train.py (``--timm-script``, ``TIMM_TRAIN_SCRIPT``, a cached copy or a
download pinned by SHA-256, see :mod:`train_imagenet.locate`) and runs it in-process with the
arguments as given. ``python -m train_imagenet validate ...`` does the same for validate.py and
``python -m train_imagenet --demo`` trains on a small real dataset (:mod:`train_imagenet.demo`).
train.py itself is never part of this repository.
"""
from .locate import LocatedScript, ScriptIntegrityError, ScriptNotFoundError, locate_script
from .runner import run_script

__all__ = ['LocatedScript', 'ScriptIntegrityError', 'ScriptNotFoundError', 'locate_script', 'run_script']
