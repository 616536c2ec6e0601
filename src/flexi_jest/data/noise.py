"""Web-like noise for a clean sample stream: the pool JEST has to curate.

JEST pays a scoring forward pass per super-batch example, so it saves compute only when most of the
uniform stream is wasted (see docs/method.md#the-economics). `apply_noise` turns a clean stream into such a
pool, one sample at a time, each sample independently becoming one of

    mismatched      the caption of another (earlier, random) sample; the image is kept
    uninformative   a generic caption ("image", "photo.jpg", "click here", "IMG_2041"); image kept
    corrupted       the image drowned in random noise or covered by random blocks; caption kept
    blank           a flat or near-flat image; caption kept
    near_duplicate  a lightly perturbed copy of an earlier sample's image and caption (redundancy)
    clean           unchanged

with the probabilities of a `NoiseConfig` (flexi_jest.config). Every output sample keeps its key and records
meta["noise"]; mismatched and uninformative samples keep meta["true_caption"]; a near duplicate takes
the meta of the sample it copies plus meta["duplicate_of"] (that sample's key).

Memory stays bounded: earlier samples are remembered in a reservoir (uniform over the stream so far,
RESERVOIR_SIZE entries). While the reservoir is empty (the first sample), or when eight random picks
from it all share the sample's caption, a mismatched or near-duplicate draw leaves the sample clean,
so realised fractions can be a hair under the configured ones.

    from flexi_jest.config import NoiseConfig
    from flexi_jest.data import shapes, noise
    pool = noise.apply_noise(shapes.generate("pool", 10_000, seed=0), NoiseConfig.at_rate(0.8), seed=0)
"""

import random
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image, ImageEnhance

from flexi_jest.config import NoiseConfig
from flexi_jest.data.sample import Sample

KINDS = NoiseConfig.KINDS
RESERVOIR_SIZE = 512

GENERIC_CAPTIONS = [
    "image", "photo", "picture", "untitled", "click here", "download", "thumbnail", "view image",
    "no description available", "stock photo", "see more", "image of the day", "free download",
    "click to enlarge", "screenshot", "default", "image not found", "logo", "banner", "icon",
]
FILE_STEMS = ["IMG_", "DSC_", "DSCN", "photo", "image", "Screenshot_", "PXL_", "pic"]
FILE_EXTENSIONS = ["", ".jpg", ".jpeg", ".png", ".JPG", ".webp"]


# ----------------------------------------------------------------------------- single perturbations


def uninformative_caption(rng: random.Random) -> str:
    """A caption that says nothing about the image: generic words or a camera file name."""
    if rng.random() < 0.5:
        return rng.choice(GENERIC_CAPTIONS)
    return f"{rng.choice(FILE_STEMS)}{rng.randint(0, 9999):04d}{rng.choice(FILE_EXTENSIONS)}"


def corrupt_image(image: Image.Image, rng: random.Random) -> Image.Image:
    """Heavy corruption: either most of the image replaced by uniform noise, or random coloured blocks."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    if rng.random() < 0.5:
        weight = rng.uniform(0.7, 0.95)
        noise = noise_rng.uniform(0, 255, size=pixels.shape)
        pixels = (1 - weight) * pixels + weight * noise
    else:
        height, width = pixels.shape[:2]
        block = max(2, min(height, width) // rng.choice((4, 8)))
        for _ in range(3 * (height // block) * (width // block) // 4 + 1):   # cover ~half the area or more
            y, x = rng.randrange(0, height - block + 1), rng.randrange(0, width - block + 1)
            pixels[y:y + block, x:x + block] = noise_rng.uniform(0, 255, size=3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def blank_image(image: Image.Image, rng: random.Random) -> Image.Image:
    """A flat image of a random colour, sometimes with faint noise (std ~2 levels); same size."""
    colour = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    pixels = np.broadcast_to(colour, (image.height, image.width, 3))
    if rng.random() < 0.5:
        pixels = pixels + np.random.default_rng(rng.getrandbits(64)).normal(0, 2, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def perturb_image(image: Image.Image, rng: random.Random) -> Image.Image:
    """A light perturbation (a near duplicate): brightness and contrast within 10 %, a 1 px shift with
    edge padding, faint pixel noise. Never a flip: captions may say 'left of'."""
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    dy, dx = rng.randint(-1, 1), rng.randint(-1, 1) or 1
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    pixels = padded[1 + dy:1 + dy + image.height, 1 + dx:1 + dx + image.width]
    pixels = pixels + np.random.default_rng(rng.getrandbits(64)).normal(0, 2, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- the stream


def apply_noise(
    samples: Iterable[Sample], noise: NoiseConfig, seed: int, reservoir_size: int = RESERVOIR_SIZE
) -> Iterator[Sample]:
    """Stream samples with web-like noise applied; deterministic for (input stream, noise, seed).

    Each sample independently draws its kind with the config's probabilities. Keys are unchanged; every
    output sample is a new Sample with meta["noise"] in {"clean", *KINDS}. The inputs are not modified.
    """
    rng = random.Random(f"noise/{seed}")
    thresholds, cumulative = [], 0.0
    for kind in KINDS:
        cumulative += getattr(noise, kind)
        thresholds.append((cumulative, kind))
    reservoir: list[Sample] = []   # clean originals, uniform over the stream so far (Algorithm R)
    for seen, sample in enumerate(samples):
        draw = rng.random()
        kind = next((k for bound, k in thresholds if draw < bound), "clean")
        meta = dict(sample.meta)
        image, caption = sample.image, sample.caption
        if kind == "mismatched":
            picks = (rng.choice(reservoir).caption for _ in range(8 if reservoir else 0))
            other = next((c for c in picks if c != sample.caption), None)   # a caption that differs
            if other is not None:
                meta["true_caption"], caption = sample.caption, other
            else:
                kind = "clean"
        elif kind == "uninformative":
            meta["true_caption"], caption = sample.caption, uninformative_caption(rng)
        elif kind == "corrupted":
            image = corrupt_image(sample.image, rng)
        elif kind == "blank":
            image = blank_image(sample.image, rng)
        elif kind == "near_duplicate":
            if reservoir:
                original = rng.choice(reservoir)
                meta = dict(original.meta, duplicate_of=original.key)
                image, caption = perturb_image(original.image, rng), original.caption
            else:
                kind = "clean"
        meta["noise"] = kind
        # remember the clean original
        if len(reservoir) < reservoir_size:
            reservoir.append(sample)
        else:
            slot = rng.randrange(seen + 1)
            if slot < reservoir_size:
                reservoir[slot] = sample
        yield Sample(key=sample.key, image=image, caption=caption, meta=meta)


# ---- what a learner trains on ------------------------------------------------------------------------------------

# A pool sample's kind: "clean", one of KINDS, or "hard_negative" (a clean sample edited from another in one
# attribute by the generator: meta["hard_negative_of"]), or "other_noise" (a noise record this module does not
# write). Noise takes precedence over the hard-negative mark.
SAMPLE_KINDS = ("clean", *KINDS, "hard_negative", "other_noise")
CLEAN_KINDS = ("clean", "hard_negative")


def sample_kind(meta: dict) -> int:
    """The index in SAMPLE_KINDS of a sample's kind, from its meta (a sample with no noise record is clean)."""
    noise = meta.get("noise", "clean")
    if noise != "clean":
        return SAMPLE_KINDS.index(noise) if noise in KINDS else SAMPLE_KINDS.index("other_noise")
    return SAMPLE_KINDS.index("hard_negative") if "hard_negative_of" in meta else 0


def kind_shares(kinds, prefix: str) -> dict[str, float]:
    """{f"{prefix}_{kind}": share} over SAMPLE_KINDS for kinds, a [N] integer tensor of SAMPLE_KINDS indices."""
    counts = kinds.long().bincount(minlength=len(SAMPLE_KINDS)).float() / max(1, kinds.numel())
    return {f"{prefix}_{kind}": float(share) for kind, share in zip(SAMPLE_KINDS, counts.tolist())}
