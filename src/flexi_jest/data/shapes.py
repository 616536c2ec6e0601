"""Procedural compositional scenes: one or two coloured shapes, captioned from the scene itself.

A scene is a flat grey background with one object ("a large red circle on the left") or two objects
in a spatial relation ("a small striped blue star above a large yellow square"). Every attribute is
drawn from a small closed vocabulary, so captions are exact and the data is unlimited:

    shape    circle, square, triangle, star, cross, diamond
    colour   red, orange, yellow, green, blue, purple, white, black
    size     small, large
    texture  plain, striped, dotted       (large objects only: stripes on a 8 px shape are invisible)
    where    one object: on the left / on the right / at the top / at the bottom / in the centre
             two objects: above / below / to the left of / to the right of

Scenes are drawn at 4x the image size and box-downsampled, so edges are anti-aliased and a shape is
recognisable at 32x32 (and sharper at 64x64).

Hard negatives come naturally: in the curated and pool splits a share of samples (HARD_NEGATIVE_RATE)
repeats the previous scene with exactly one attribute changed (a colour, a shape, a size, a texture,
the position or the relation), so a super-batch holds near-identical scenes whose captions differ in
one word. Such a sample carries meta["hard_negative_of"] (the key it was edited from) and
meta["changed"] (the attribute).

The eval split holds single-object scenes only, labelled "{colour} {shape}" (48 classes, cycled so
any prefix of the split is balanced); size, texture and position vary but do not enter the label.

    from flexi_jest.data import shapes
    for sample in shapes.generate("pool", n=1000, seed=0, image_size=32): ...
"""

import dataclasses
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

from flexi_jest.data.sample import Sample

DATASET = "shapes"
SPLITS = ("curated", "pool", "eval")
LICENSE = "generated (no third-party content)"

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 165, 50),
    "blue": (35, 80, 235),
    "purple": (145, 50, 205),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
RELATIONS = ("above", "below", "to the left of", "to the right of")
INVERSE_RELATION = {
    "above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of",
}

# object radius as a fraction of the image side, by (number of objects, size)
RADIUS = {(1, "small"): 0.15, (1, "large"): 0.28, (2, "small"): 0.13, (2, "large"): 0.21}
MARGIN = 0.03              # gap between an object and the image border, fraction of the side
SUPERSAMPLE = 4            # draw at 4x, then box-downsample
TWO_OBJECT_RATE = 0.5      # curated/pool: share of two-object scenes
TEXTURE_RATE = 0.35        # share of large objects that are striped or dotted
HARD_NEGATIVE_RATE = 0.3   # curated/pool: share of samples that edit one attribute of the previous scene

# captions put the scene description into one of these (curated/pool vary them; eval uses the first)
CAPTION_TEMPLATES = ["{}", "a picture of {}", "an image showing {}", "a drawing of {}"]
# zero-shot prompts for the eval labels "{colour} {shape}" ("the" avoids a/an errors: "an orange")
TEMPLATES = ["{}", "a picture of the {}.", "an image of the {}.", "a drawing of the {}.", "the {} shape."]


@dataclass(frozen=True)
class ShapeObject:
    """One object: its attributes and its centre (x right, y down) as fractions of the image side."""

    shape: str
    colour: str
    size: str
    texture: str
    x: float = 0.5
    y: float = 0.5

    def phrase(self) -> str:
        """'small red star', 'large striped blue circle' (size first, so the article is always 'a')."""
        texture = [] if self.texture == "plain" else [self.texture]
        return " ".join([self.size, *texture, self.colour, self.shape])

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "texture": self.texture}


@dataclass(frozen=True)
class Scene:
    """One or two objects on a flat background.

    position: where the single object is (one of POSITIONS), None for two objects
    relation: objects[0] <relation> objects[1] (one of RELATIONS), None for one object
    """

    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]
    position: str | None = None
    relation: str | None = None

    def describe(self, swap: bool = False) -> str:
        """The scene in words; swap=True names the second object first with the inverse relation."""
        if len(self.objects) == 1:
            return f"a {self.objects[0].phrase()} {self.position}"
        first, second, relation = self.objects[0], self.objects[1], self.relation
        if swap:
            first, second, relation = second, first, INVERSE_RELATION[relation]
        return f"a {first.phrase()} {relation} a {second.phrase()}"

    def label(self) -> str:
        """Zero-shot class of the (first) object: '{colour} {shape}'."""
        return f"{self.objects[0].colour} {self.objects[0].shape}"


def class_names() -> list[str]:
    """The 48 eval classes '{colour} {shape}', colour-major."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


# ----------------------------------------------------------------------------- scene sampling


def _radius(scene_objects: int, size: str) -> float:
    return RADIUS[(scene_objects, size)]


def _clamp(value: float, radius: float) -> float:
    return min(max(value, radius + MARGIN), 1.0 - radius - MARGIN)


def _place_single(obj: ShapeObject, position: str, rng: random.Random) -> ShapeObject:
    """Centre one object in the region its position word names, with jitter."""
    r = _radius(1, obj.size)
    offset = 0.5 - r - MARGIN - rng.uniform(0.0, 0.04)   # distance of the centre from the middle
    across = rng.uniform(-0.08, 0.08)                     # jitter along the other axis
    x, y = {
        "on the left": (0.5 - offset, 0.5 + across),
        "on the right": (0.5 + offset, 0.5 + across),
        "at the top": (0.5 + across, 0.5 - offset),
        "at the bottom": (0.5 + across, 0.5 + offset),
        "in the centre": (0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)),
    }[position]
    return dataclasses.replace(obj, x=_clamp(x, r), y=_clamp(y, r))


def _place_pair(a: ShapeObject, b: ShapeObject, relation: str, rng: random.Random) -> tuple[ShapeObject, ShapeObject]:
    """Put a and b on opposite halves so that 'a <relation> b' holds, with jitter."""
    ra, rb = _radius(2, a.size), _radius(2, b.size)
    near, far = 0.25 + rng.uniform(-0.03, 0.03), 0.75 + rng.uniform(-0.03, 0.03)
    across_a, across_b = 0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12)
    if relation in ("above", "to the left of"):
        along_a, along_b = near, far
    else:
        along_a, along_b = far, near
    if relation in ("above", "below"):          # vertical: 'along' is y
        a = dataclasses.replace(a, x=_clamp(across_a, ra), y=_clamp(along_a, ra))
        b = dataclasses.replace(b, x=_clamp(across_b, rb), y=_clamp(along_b, rb))
    else:
        a = dataclasses.replace(a, x=_clamp(along_a, ra), y=_clamp(across_a, ra))
        b = dataclasses.replace(b, x=_clamp(along_b, rb), y=_clamp(across_b, rb))
    return a, b


def _random_object(rng: random.Random, shape: str | None = None, colour: str | None = None) -> ShapeObject:
    size = rng.choice(SIZES)
    texture = "plain"
    if size == "large" and rng.random() < TEXTURE_RATE:
        texture = rng.choice(TEXTURES[1:])
    return ShapeObject(shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS)), size, texture)


def _random_background(rng: random.Random) -> tuple[int, int, int]:
    """A mid grey with a slight tint: contrasts with white, black and every colour."""
    grey = rng.randint(110, 150)
    return tuple(min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3))


def random_scene(rng: random.Random, n_objects: int, label: str | None = None) -> Scene:
    """A fresh scene with n_objects in {1, 2}; label '{colour} {shape}' fixes the first object."""
    colour, shape = label.split(" ") if label else (None, None)
    background = _random_background(rng)
    if n_objects == 1:
        position = rng.choice(POSITIONS)
        obj = _place_single(_random_object(rng, shape, colour), position, rng)
        return Scene((obj,), background, position=position)
    a, b = _random_object(rng, shape, colour), _random_object(rng)
    while b.shape == a.shape and b.colour == a.colour:   # two distinguishable objects
        b = _random_object(rng)
    relation = rng.choice(RELATIONS)
    return Scene(_place_pair(a, b, relation, rng), background, relation=relation)


def edit_scene(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """The same scene with exactly one attribute changed: (new scene, attribute name).

    The attribute is one of colour, shape, size, texture (of one object), position (one object) or
    relation (two objects: they swap places, so the relation word inverts).
    """
    index = rng.randrange(len(scene.objects))
    obj = scene.objects[index]
    choices = ["colour", "shape", "position" if len(scene.objects) == 1 else "relation"]
    if obj.texture == "plain":   # a textured large object cannot shrink without losing its texture word
        choices.append("size")
    if obj.size == "large":
        choices.append("texture")
    attribute = rng.choice(choices)
    objects = list(scene.objects)
    if attribute == "relation":
        a, b = scene.objects
        a, b = dataclasses.replace(a, x=b.x, y=b.y), dataclasses.replace(b, x=a.x, y=a.y)
        return dataclasses.replace(scene, objects=(a, b), relation=INVERSE_RELATION[scene.relation]), attribute
    if attribute == "position":
        position = rng.choice([p for p in POSITIONS if p != scene.position])
        return Scene((_place_single(obj, position, rng),), scene.background, position=position), attribute
    if attribute == "colour":
        new = dataclasses.replace(obj, colour=rng.choice([c for c in COLOURS if c != obj.colour]))
    elif attribute == "shape":
        new = dataclasses.replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif attribute == "texture":
        new = dataclasses.replace(obj, texture=rng.choice([t for t in TEXTURES if t != obj.texture]))
    else:  # size (of a plain object): keep the centre, pulled in to fit
        size = "small" if obj.size == "large" else "large"
        r = _radius(len(objects), size)
        new = dataclasses.replace(obj, size=size, x=_clamp(obj.x, r), y=_clamp(obj.y, r))
    objects[index] = new
    if len(objects) == 2 and objects[0].shape == objects[1].shape and objects[0].colour == objects[1].colour:
        return edit_scene(scene, rng)  # the edit made the two objects identical: pick another
    return dataclasses.replace(scene, objects=tuple(objects)), attribute


# ----------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape with centre (cx, cy) and outer radius r (pixels); circles are handled apart."""
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":   # equilateral, pointing up, nudged down to look centred
        cy += 0.15 * r
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    if shape == "star":       # five points, inner radius 0.45 r
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + 0.08 * r - radius * math.sin(angle)))
        return points
    if shape == "cross":      # a plus sign, arms a third of the radius thick
        w = 0.34 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


@lru_cache(maxsize=64)
def _texture_fill(texture: str, colour: str, side: int) -> Image.Image:
    """A side x side RGB image of the colour with contrasting stripes or dots (period ~ 1/8 of the side)."""
    base = COLOURS[colour]
    light = sum(base) / 3 > 150 or colour == "yellow"
    contrast = (20, 20, 20) if light else (245, 245, 245)
    image = Image.new("RGB", (side, side), base)
    draw = ImageDraw.Draw(image)
    period = max(4, side // 8)
    if texture == "striped":      # diagonal stripes, a third of the period wide
        for offset in range(-side, side, period):
            draw.line((offset, side, offset + side, 0), fill=contrast, width=max(1, period // 3))
    elif texture == "dotted":
        dot = max(1, period // 4)
        for y in range(period // 2, side, period):
            for x in range(period // 2, side, period):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=contrast)
    return image


def render_scene(scene: Scene, image_size: int = 32) -> Image.Image:
    """Draw the scene at SUPERSAMPLE x image_size and box-downsample: an RGB image_size square."""
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        r = _radius(len(scene.objects), obj.size) * side
        cx, cy = obj.x * side, obj.y * side
        if obj.texture == "plain":
            _draw_shape(draw, obj.shape, cx, cy, r, COLOURS[obj.colour])
        else:
            mask = Image.new("L", (side, side), 0)
            _draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, r, 255)
            image.paste(_texture_fill(obj.texture, obj.colour, side), (0, 0), mask)
    return image.reduce(SUPERSAMPLE)


# ----------------------------------------------------------------------------- the generator


def _rng(split: str, seed: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"{DATASET}/{split}/{seed}")


def _scene_meta(scene: Scene) -> dict:
    meta = {"objects": [obj.attributes() for obj in scene.objects]}
    if scene.position is not None:
        meta["position"] = scene.position
    else:
        meta["relation"] = scene.relation
    return meta


def generate(split: str, n: int, seed: int, image_size: int = 32) -> Iterator[Sample]:
    """Clean samples of `split` in {"curated", "pool", "eval"}, keys "shapes-{split}-{index:08d}".

    Deterministic per (split, seed); the RNG is derived from both, so splits are independent streams.
    curated/pool: half one-object and half two-object scenes, HARD_NEGATIVE_RATE of them one-attribute
    edits of the previous scene, caption phrasing varied. eval: one-object scenes whose first object
    cycles through class_names(), caption in the plain form, meta["label"] = "{colour} {shape}".
    meta: dataset, split, source, license, objects, position or relation, label (every split).
    """
    rng = _rng(split, seed)
    labels = class_names()
    previous: tuple[Scene, str] | None = None
    for index in range(n):
        key = f"{DATASET}-{split}-{index:08d}"
        meta = {"dataset": DATASET, "split": split, "source": "procedural", "license": LICENSE}
        if split == "eval":
            scene = random_scene(rng, 1, label=labels[index % len(labels)])
            caption = scene.describe()
        else:
            if previous is not None and rng.random() < HARD_NEGATIVE_RATE:
                scene, changed = edit_scene(previous[0], rng)
                meta.update(hard_negative_of=previous[1], changed=changed)
            else:
                scene = random_scene(rng, 2 if rng.random() < TWO_OBJECT_RATE else 1)
            caption = rng.choice(CAPTION_TEMPLATES).format(scene.describe(swap=rng.random() < 0.5))
            previous = (scene, key)
        meta.update(_scene_meta(scene), label=scene.label())
        yield Sample(key=key, image=render_scene(scene, image_size), caption=caption, meta=meta)
