"""The demo's second task on data a third party made: the handwritten digits that scikit-learn ships inside its
wheel (`sklearn.datasets.load_digits`: 1,797 images of 8x8 pixels in 17 grey levels, from the UCI "Optical
Recognition of Handwritten Digits" set; BSD licence; read from the installed package, nothing downloaded).

Its answer states one visual fact and a fact derived from it, then refers back to the first:

    The digit is seven, and seven is odd.

Only the digit word's first mention needs the image; the parity and the restated digit are predictable from the
answer so far (a one-hop inference and a copy), an answer structure the other tasks lack (squares: one templated
statement; easy-VQA: the question restated; refer-back: two facts stated then restated; describe: four facts).

Each image is upscaled (nearest neighbour) to the 32x32 input of the demo's vision tower, grey levels to 0-255,
light ink on black. `test_per_task` images per digit are held out for the test split, the rest are the training
pool (its images in a seeded order, cycled when `train_size` exceeds the pool). Both splits are written by
`scenes.write_splits` and scored as the drawn-image tasks are: the whole generated answer under GQA's rule, with
the breakdown per digit.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..core.config import ConfigError
from .data import DemoSplits, Segments
from .scenes import Sample, write_splits

IMAGE_SIZE = 32
SOURCE_SIZE = 8  # load_digits' images
GREY_LEVELS = 16  # their values run 0..16
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "What digit is this, and is it even or odd?"


def answer_segments(digit: int) -> Segments:
    """The digit (needs the image), its parity and the digit again (both follow from the answer so far)."""
    word = WORDS[digit]
    return [("The digit is ", False), (word, True), (f", and {word} is {'even' if digit % 2 == 0 else 'odd'}.", False)]


def upscaled(image: np.ndarray) -> np.ndarray:
    """uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] of one of load_digits' 8x8 images: grey levels 0..16 to 0..255, each
    pixel repeated into an (IMAGE_SIZE / 8)-pixel square."""
    scale = IMAGE_SIZE // SOURCE_SIZE
    grey = np.rint(np.asarray(image, dtype=np.float64) * (255 / GREY_LEVELS)).astype(np.uint8)
    return np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)[:, :, None].repeat(3, axis=2)


def load() -> tuple[np.ndarray, np.ndarray]:
    """(images float [N, 8, 8], digits int [N]) as scikit-learn ships them."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "--task digits needs scikit-learn, whose wheel ships the digits: pip install 'regate-plugin[digits]'"
        ) from None
    digits = load_digits()
    return digits.images, digits.target


def split_indices(targets: np.ndarray, train_size: int, test_per_task: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices into load_digits of the training samples and of the test samples (`test_per_task` per digit, in
    digit order), disjoint, everything drawn from `seed`."""
    rng = random.Random(seed)
    fewest = int(np.bincount(targets, minlength=len(WORDS)).min())
    if test_per_task >= fewest:
        raise ConfigError(f"--test-per-task {test_per_task}: load_digits has {fewest} images of its rarest digit")
    test = [i for d in range(len(WORDS)) for i in rng.sample(np.flatnonzero(targets == d).tolist(), test_per_task)]
    held_out = set(test)
    pool = [i for i in range(len(targets)) if i not in held_out]
    train: list[int] = []
    while len(train) < train_size:  # each pass over the pool in a fresh order
        train += rng.sample(pool, len(pool))
    return train[:train_size], test


def generate(root: Path, train_size: int, test_per_task: int, seed: int = 0, progress: bool = True) -> DemoSplits:
    """Write `train_size` training samples and `test_per_task` test samples per digit under `root`."""
    images, targets = load()
    train, test = split_indices(targets, train_size, test_per_task, seed)

    def sample(index: int) -> Sample:
        return QUESTION, answer_segments(int(targets[index])), upscaled(images[index])

    return write_splits(root, [sample(i) for i in train], [(WORDS[int(targets[i])], sample(i)) for i in test], progress)
