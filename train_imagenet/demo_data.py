"""A small real image-classification set for the demo: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 grey 8x8 digits (values 0..16, 10 balanced classes) inside
the wheel, so nothing is downloaded. They are upscaled, turned into RGB PNGs and written as the
ImageFolder layout timm's train.py reads::

    <root>/train/<class>/<index>.png
    <root>/validation/<class>/<index>.png

The split is stratified and fixed by a seed; a finished build leaves ``manifest.json`` and is reused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ['DigitsFolder', 'build_digits_imagefolder', 'CLASS_NAMES']

CLASS_NAMES = tuple(str(i) for i in range(10))
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DigitsFolder:
    """What was built (also written to ``manifest.json``)."""
    root: str
    img_size: int
    val_fraction: float
    seed: int
    limit_per_class: Optional[int]
    num_train: int
    num_val: int
    version: int = _FORMAT_VERSION


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the demo dataset needs scikit-learn (its bundled digits): pip install 'gka-vision[demo]' "
            "or pip install scikit-learn"
        ) from e
    digits = load_digits()
    return digits.images, digits.target


def _split_indices(targets: np.ndarray, val_fraction: float, seed: int, limit_per_class: Optional[int]):
    """Stratified split: per class, a seeded permutation; the first round(n * val_fraction) go to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        if limit_per_class is not None:
            idx = idx[:limit_per_class]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def _to_image(digit: np.ndarray, img_size: int):
    from PIL import Image
    grey = np.clip(np.rint(digit * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(grey).resize((img_size, img_size), Image.Resampling.BILINEAR)
    return img.convert('RGB')


def build_digits_imagefolder(
        root: os.PathLike | str,
        *,
        img_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        limit_per_class: Optional[int] = None,
) -> DigitsFolder:
    """Write (once) the digits as an ImageFolder with ``train`` and ``validation`` splits.

    Args:
        root: target folder; reused as is when its ``manifest.json`` matches the arguments.
        img_size: side of the square RGB images (the 8x8 originals are upscaled bilinearly).
        val_fraction: share of each class that goes to ``validation``.
        seed: fixes the split.
        limit_per_class: keep only this many images per class (small sets for tests).

    Returns:
        The manifest of the folder.
    """
    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f'img_size must be an int >= 8 (the digits are 8x8), got {img_size!r}')
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction!r}')
    if limit_per_class is not None and limit_per_class < 2:
        raise ValueError(f'limit_per_class must be >= 2 (one image per split at least), got {limit_per_class!r}')

    root = Path(root).expanduser().resolve()
    manifest_path = root / 'manifest.json'
    wanted = dict(img_size=img_size, val_fraction=val_fraction, seed=seed, limit_per_class=limit_per_class,
                  version=_FORMAT_VERSION)
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if all(existing.get(k) == v for k, v in wanted.items()):
            return DigitsFolder(**existing)
        raise FileExistsError(
            f'{root} already holds a digits folder built with other settings '
            f'({ {k: existing.get(k) for k in wanted} }); choose another root or delete it'
        )
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f'{root} exists, is not empty and has no manifest.json; refusing to write into it')

    images, targets = _load_digits()
    train_idx, val_idx = _split_indices(targets, val_fraction, seed, limit_per_class)

    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename at the end, so an interrupted build never looks finished and
    # concurrent builders (torchrun ranks) do not see half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', dir=root.parent))
    try:
        for split, indices in (('train', train_idx), ('validation', val_idx)):
            for c in CLASS_NAMES:
                (tmp / split / c).mkdir(parents=True)
            for i in indices:
                _to_image(images[i], img_size).save(tmp / split / CLASS_NAMES[targets[i]] / f'{i:04d}.png')
        info = DigitsFolder(root=str(root), num_train=len(train_idx), num_val=len(val_idx), **{
            k: v for k, v in wanted.items() if k != 'version'})
        (tmp / 'manifest.json').write_text(json.dumps(asdict(info), indent=2) + '\n')
        if root.exists():
            root.rmdir()  # empty (checked above)
        try:
            os.replace(tmp, root)
        except OSError:
            if not manifest_path.is_file():  # lost a race only if someone else finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return DigitsFolder(**json.loads(manifest_path.read_text()))
