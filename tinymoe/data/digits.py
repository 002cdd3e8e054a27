"""Multi-digits: two handwritten digits per image, one classification task per digit.

An offline stand-in for Multi-MNIST (Sabour et al. 2017, "Dynamic Routing Between Capsules"; used for MTL by
Sener & Koltun 2018 and by Hazimeh et al. 2021, DSelect-k, section 5), built from scikit-learn's bundled 8×8
digits (1,797 images, no download). Each example draws two source images at random and either puts them side by
side (an 8×16 image, tasks "left" and "right") or overlays them by the pixel-wise max (8×8, tasks "first" and
"second"). Pixels are scaled from [0, 16] to [0, 1].
"""
from __future__ import annotations

import numpy as np

from .containers import TabularTasks

MODES = ("side_by_side", "overlay")
SOURCES = ("all", "train", "test")


def _load_source_digits():
    """scikit-learn's bundled digits: images (1797, 8, 8) float64 in [0, 16], labels (1797,) int."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("multi_digits needs scikit-learn (its bundled 8×8 digits, no download): "
                          "pip install 'tinymoe[digits]'") from e
    digits = load_digits()
    return digits.images, digits.target


def multi_digits(mode="side_by_side", n=5000, seed=0, source="all", train_fraction=0.8) -> TabularTasks:
    """n two-digit images with two 10-class tasks; x (n, 128) for "side_by_side" or (n, 64) for "overlay".

    source: "all" draws from all 1,797 source images. Pairs are new combinations but single source images repeat
    across examples, so to keep test images unseen build the training set with source="train" and the test set
    with source="test": a fixed split (seed 0, `train_fraction` of the images) of the source images.
    meta holds "image_shape" (8, 16) or (8, 8) and "source_index" (n, 2), the indices into load_digits().
    """
    if mode not in MODES:
        raise ValueError(f"multi_digits: mode must be one of {MODES}, got {mode!r}")
    if source not in SOURCES:
        raise ValueError(f"multi_digits: source must be one of {SOURCES}, got {source!r}")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"multi_digits: n must be an int ≥ 1, got {n!r}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"multi_digits: train_fraction must be in (0, 1), got {train_fraction!r}")
    images, labels = _load_source_digits()
    pool = np.arange(len(images))
    if source != "all":  # a fixed split of the source images, the same whatever `seed` is
        shuffled = np.random.default_rng(0).permutation(len(images))
        cut = int(round(train_fraction * len(images)))
        pool = np.sort(shuffled[:cut] if source == "train" else shuffled[cut:])

    rng = np.random.default_rng(seed)
    index = rng.choice(pool, size=(n, 2))                               # (n, 2) the two source images
    first, second = images[index[:, 0]] / 16.0, images[index[:, 1]] / 16.0  # (n, 8, 8) each, in [0, 1]
    if mode == "side_by_side":
        pictures, names = np.concatenate([first, second], axis=2), ["left", "right"]  # (n, 8, 16)
    else:
        pictures, names = np.maximum(first, second), ["first", "second"]             # (n, 8, 8)
    x = pictures.reshape(n, -1)                                          # (n, 128) or (n, 64)
    y = labels[index]                                                    # (n, 2)
    meta = dict(image_shape=pictures.shape[1:], source_index=index, mode=mode, source=source)
    return TabularTasks(x=x, y=y, task_names=names, task_type="classification", num_classes=10, meta=meta)
