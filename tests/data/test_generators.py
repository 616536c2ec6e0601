"""The benchmark generators (shapes, emoji, digits): the shared interface, then each dataset's promises."""

import hashlib
import random
import re
from collections import Counter

import numpy as np
import pytest

from flexi_jest.data import digits, emoji, shapes

GENERATORS = [shapes, emoji, digits]
SPLITS = ("curated", "pool", "eval")


def _digest(image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _fingerprint(samples) -> list[tuple]:
    return [(s.key, s.caption, s.meta, s.image.size, _digest(s.image)) for s in samples]


# ----------------------------------------------------------------------------- the shared interface


@pytest.mark.parametrize("module", GENERATORS, ids=lambda m: m.DATASET)
@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_gives_identical_samples(module, split):
    first = _fingerprint(module.generate(split, 24, seed=3))
    assert first == _fingerprint(module.generate(split, 24, seed=3))


@pytest.mark.parametrize("module", GENERATORS, ids=lambda m: m.DATASET)
def test_different_seeds_give_different_pools(module):
    assert _fingerprint(module.generate("pool", 16, seed=0)) != _fingerprint(module.generate("pool", 16, seed=1))


@pytest.mark.parametrize("module", GENERATORS, ids=lambda m: m.DATASET)
def test_splits_share_no_image(module):
    digests = {split: {_digest(s.image) for s in module.generate(split, 300, seed=0)} for split in SPLITS}
    assert not digests["curated"] & digests["pool"]
    assert not digests["curated"] & digests["eval"]
    assert not digests["pool"] & digests["eval"]


@pytest.mark.parametrize("module", GENERATORS, ids=lambda m: m.DATASET)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("image_size", [32, 64])
def test_samples_are_well_formed(module, split, image_size):
    samples = list(module.generate(split, 40, seed=0, image_size=image_size))
    assert len(samples) == 40
    pattern = re.compile(rf"^{module.DATASET}-{split}-\d{{8}}$")
    assert [s.key for s in samples] == [f"{module.DATASET}-{split}-{i:08d}" for i in range(40)]
    assert all(pattern.match(s.key) for s in samples)
    for sample in samples:
        assert sample.image.mode == "RGB" and sample.image.size == (image_size, image_size)
        assert np.asarray(sample.image, dtype=np.float32).std() > 10, "image is (nearly) blank"
        assert sample.caption.strip()
        assert sample.meta["dataset"] == module.DATASET and sample.meta["split"] == split
        assert sample.meta["source"]


@pytest.mark.parametrize("module", GENERATORS, ids=lambda m: m.DATASET)
def test_eval_labels_are_class_names(module):
    names = module.class_names()
    assert len(names) == len(set(names)) > 1
    labels = [s.meta["label"] for s in module.generate("eval", len(names), seed=0)]
    assert set(labels) == set(names), "a prefix of len(class_names()) eval samples covers every class once"


@pytest.mark.parametrize("module", GENERATORS, ids=lambda m: m.DATASET)
def test_zero_shot_templates_take_one_class_name(module):
    assert module.TEMPLATES
    for template in module.TEMPLATES:
        assert template.count("{}") == 1
        assert template.format("x")


@pytest.mark.parametrize("module", GENERATORS, ids=lambda m: m.DATASET)
def test_unknown_split_is_refused(module):
    with pytest.raises(ValueError, match="split"):
        next(module.generate("train", 1, seed=0))


# ----------------------------------------------------------------------------- shapes


def test_shapes_caption_describes_the_scene():
    for sample in shapes.generate("pool", 300, seed=1):
        caption = sample.caption
        for obj in sample.meta["objects"]:
            words = [obj["size"], obj["colour"], obj["shape"]] + ([obj["texture"]] if obj["texture"] != "plain" else [])
            assert all(re.search(rf"\b{word}\b", caption) for word in words), (caption, obj)
        if len(sample.meta["objects"]) == 1:
            assert sample.meta["position"] in caption
        else:
            relation = sample.meta["relation"]
            assert relation in caption or shapes.INVERSE_RELATION[relation] in caption


def test_shapes_relation_matches_geometry():
    scenes = [shapes.random_scene(random.Random(i), 2) for i in range(200)]
    for scene in scenes:
        a, b = scene.objects
        expected = {"above": a.y < b.y, "below": a.y > b.y, "to the left of": a.x < b.x, "to the right of": a.x > b.x}
        assert expected[scene.relation]


def test_shapes_hard_negatives_change_exactly_one_attribute():
    samples = {s.key: s for s in shapes.generate("pool", 400, seed=2)}
    edits = [s for s in samples.values() if "hard_negative_of" in s.meta]
    assert 0.2 < len(edits) / len(samples) < 0.4
    assert {s.meta["changed"] for s in edits} >= {"colour", "shape", "size", "texture"}
    for sample in edits:
        before = samples[sample.meta["hard_negative_of"]].meta
        after = sample.meta
        differences = [
            (i, field) for i, (x, y) in enumerate(zip(before["objects"], after["objects"]))
            for field in x if x[field] != y[field]
        ]
        if after["changed"] in ("position", "relation"):
            assert not differences
            assert before.get("position", before.get("relation")) != after.get("position", after.get("relation"))
        else:
            assert len(differences) == 1 and differences[0][1] == after["changed"], (before, after)


def test_shapes_eval_is_single_object_and_balanced():
    samples = list(shapes.generate("eval", 2 * len(shapes.class_names()), seed=0))
    assert all(len(s.meta["objects"]) == 1 for s in samples)
    assert set(Counter(s.meta["label"] for s in samples).values()) == {2}
    for sample in samples:
        obj = sample.meta["objects"][0]
        assert sample.meta["label"] == f"{obj['colour']} {obj['shape']}"


# ----------------------------------------------------------------------------- emoji


def test_emoji_license_in_meta():
    assert emoji.LICENSE == "CC BY-SA 4.0 (OpenMoji, https://openmoji.org)"
    for split in SPLITS:
        for sample in emoji.generate(split, 5, seed=0):
            assert sample.meta["license"] == emoji.LICENSE
            assert "openmoji" in sample.meta["source"].lower()


def test_emoji_usable_set_and_classes():
    usable = emoji.usable_emoji()
    assert len(usable) > 1000
    names = [name for _, name in usable]
    assert len(names) == len(set(names)) and all(names)
    assert dict(usable)["\U0001F34E"] == "red apple"
    assert len(emoji.class_names()) == emoji.N_CLASSES
    assert set(emoji.class_names()) <= set(names)


def test_emoji_captions_name_the_emoji():
    for split in SPLITS:
        for sample in emoji.generate(split, 50, seed=0):
            assert sample.meta["label"] == emoji.emoji_name(sample.meta["emoji"])
            assert sample.meta["label"] in sample.caption


def test_emoji_pool_spans_more_than_the_eval_classes():
    seen = {s.meta["label"] for s in emoji.generate("pool", 300, seed=0)}
    assert len(seen) == 300, "one shuffled pass: no emoji twice"
    assert seen - set(emoji.class_names())


def test_emoji_names():
    assert emoji.emoji_name("\U0001F34E") == "red apple"
    assert emoji.emoji_name("\U0001F1EF\U0001F1F5") == "flag of Japan"
    assert emoji.with_article("octopus") == "an octopus"
    assert emoji.with_article("red apple") == "a red apple"


# ----------------------------------------------------------------------------- digits


def test_digits_splits_hold_disjoint_source_images():
    indices = {split: digits.split_indices(split) for split in SPLITS}
    assert len(indices["eval"]) == len(set(indices["eval"].tolist())) == 1000
    assert len(indices["curated"]) + len(indices["pool"]) == 4000
    all_indices = np.concatenate(list(indices.values()))
    assert len(set(all_indices.tolist())) == 5000
    _, labels = digits.load_mnist()
    assert np.bincount(labels[indices["eval"]], minlength=10).tolist() == [100] * 10


def test_digits_generated_sources_respect_the_splits():
    used = {split: {s.meta["source_index"] for s in digits.generate(split, 1000, seed=0)} for split in SPLITS}
    assert len(used["eval"]) == 1000
    assert not used["eval"] & used["curated"] and not used["eval"] & used["pool"] and not used["curated"] & used["pool"]
    assert used["eval"] == set(digits.split_indices("eval").tolist())


def test_digits_eval_is_fixed_and_bounded():
    assert _fingerprint(digits.generate("eval", 30, seed=0)) == _fingerprint(digits.generate("eval", 30, seed=7))
    with pytest.raises(ValueError, match="1000"):
        next(digits.generate("eval", 1001, seed=0))


def test_digits_captions_match_labels():
    _, labels = digits.load_mnist()
    for split in SPLITS:
        for sample in digits.generate(split, 60, seed=0):
            label = sample.meta["label"]
            assert label == digits.NAMES[labels[sample.meta["source_index"]]]
            assert label in sample.caption or str(digits.NAMES.index(label)) in sample.caption
            if split == "eval":
                assert sample.caption == f"a handwritten digit {label}"
