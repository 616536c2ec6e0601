"""Pool noise: the NoiseConfig contract and what apply_noise does to a stream."""

import itertools
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from flexi_jest.config import NoiseConfig
from flexi_jest.data import shapes
from flexi_jest.data.noise import GENERIC_CAPTIONS, KINDS, apply_noise
from flexi_jest.data.sample import Sample


def toy_stream(n: int | None = None):
    """Distinct 16x16 gradient images with distinct captions (n=None: endless)."""
    ramp = np.linspace(0, 255, 16, dtype=np.float32)
    for i in itertools.count() if n is None else range(n):
        pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.full((16, 16), i % 256), np.tile(ramp, (16, 1))], axis=-1)
        image = Image.fromarray(pixels.astype(np.uint8))
        yield Sample(key=f"toy-pool-{i:08d}", image=image, caption=f"caption number {i}", meta={"dataset": "toy"})


def _as_tuples(samples):
    return [(s.key, s.caption, s.meta, s.image.tobytes()) for s in samples]


# ----------------------------------------------------------------------------- NoiseConfig


def test_negative_fraction_names_the_field():
    with pytest.raises(ValidationError) as error:
        NoiseConfig(blank=-0.1)
    assert error.value.errors()[0]["loc"] == ("blank",)


def test_fraction_above_one_names_the_field():
    with pytest.raises(ValidationError) as error:
        NoiseConfig(corrupted=1.5)
    assert error.value.errors()[0]["loc"] == ("corrupted",)


def test_sum_above_one_is_refused_with_the_fields():
    with pytest.raises(ValidationError, match="sum to at most 1") as error:
        NoiseConfig(mismatched=0.7, uninformative=0.4)
    assert "mismatched=0.7" in str(error.value) and "uninformative=0.4" in str(error.value)


def test_unknown_field_is_refused():
    with pytest.raises(ValidationError):
        NoiseConfig(mislabelled=0.1)


def test_at_rate_proportions():
    config = NoiseConfig.at_rate(0.8)
    expected = {"mismatched": 0.4, "uninformative": 0.16, "corrupted": 0.08, "blank": 0.08, "near_duplicate": 0.08}
    for kind, value in expected.items():
        assert getattr(config, kind) == pytest.approx(value)
    assert config.total == pytest.approx(0.8)
    assert sum(NoiseConfig.AT_RATE_PROPORTIONS.values()) == pytest.approx(1.0)
    assert NoiseConfig.at_rate(0.0).total == 0.0
    assert NoiseConfig.at_rate(1.0).total == pytest.approx(1.0)
    with pytest.raises(ValueError):
        NoiseConfig.at_rate(1.2)


# ----------------------------------------------------------------------------- apply_noise


def test_fractions_close_to_configured():
    config = NoiseConfig(mismatched=0.3, uninformative=0.15, corrupted=0.1, blank=0.1, near_duplicate=0.1)
    counts = Counter(s.meta["noise"] for s in apply_noise(toy_stream(2000), config, seed=0))
    for kind in KINDS:
        assert counts[kind] / 2000 == pytest.approx(getattr(config, kind), abs=0.03), kind
    assert counts["clean"] / 2000 == pytest.approx(1 - config.total, abs=0.03)


def test_deterministic_for_a_seed():
    config = NoiseConfig.at_rate(0.8)
    first = _as_tuples(apply_noise(toy_stream(300), config, seed=5))
    assert first == _as_tuples(apply_noise(toy_stream(300), config, seed=5))
    assert first != _as_tuples(apply_noise(toy_stream(300), config, seed=6))


def test_keys_unchanged_and_noise_recorded():
    originals = list(toy_stream(500))
    noisy = list(apply_noise(originals, NoiseConfig.at_rate(0.9), seed=0))
    assert [s.key for s in noisy] == [s.key for s in originals]
    assert all(s.meta["noise"] in ("clean", *KINDS) for s in noisy)
    assert all("noise" not in s.meta for s in originals), "inputs are not modified"


def test_each_kind_does_what_it_says():
    originals = list(toy_stream(1000))
    by_key = {s.key: s for s in originals}
    config = NoiseConfig(mismatched=0.2, uninformative=0.2, corrupted=0.2, blank=0.2, near_duplicate=0.2)
    for sample in apply_noise(originals, config, seed=1):
        original = by_key[sample.key]
        pixels, before = np.asarray(sample.image, np.float32), np.asarray(original.image, np.float32)
        kind = sample.meta["noise"]
        assert sample.image.size == original.image.size and sample.image.mode == "RGB"
        if kind == "mismatched":
            assert sample.meta["true_caption"] == original.caption != sample.caption
            assert re.fullmatch(r"caption number \d+", sample.caption)
            assert sample.image is original.image
        elif kind == "uninformative":
            assert sample.meta["true_caption"] == original.caption
            assert sample.caption in GENERIC_CAPTIONS or re.fullmatch(r"[A-Za-z_]+\d{4}(\.\w+)?", sample.caption)
        elif kind == "corrupted":
            assert sample.caption == original.caption
            assert np.abs(pixels - before).mean() > 20
        elif kind == "blank":
            assert sample.caption == original.caption
            assert pixels.reshape(-1, 3).std(axis=0).max() < 5
        elif kind == "near_duplicate":
            source = by_key[sample.meta["duplicate_of"]]
            assert source.key < sample.key and sample.caption == source.caption
            assert np.abs(pixels - np.asarray(source.image, np.float32)).mean() < 25
        else:
            assert sample.caption == original.caption and sample.image is original.image


def test_zero_noise_is_the_identity():
    noisy = list(apply_noise(toy_stream(50), NoiseConfig(), seed=0))
    assert [(s.caption, s.image.tobytes()) for s in noisy] == [(s.caption, s.image.tobytes()) for s in toy_stream(50)]
    assert {s.meta["noise"] for s in noisy} == {"clean"}


def test_streams_lazily_from_an_endless_source():
    noisy = apply_noise(toy_stream(), NoiseConfig.at_rate(0.5), seed=0, reservoir_size=16)
    assert len(list(itertools.islice(noisy, 100))) == 100


def test_works_on_a_generated_pool():
    noisy = list(apply_noise(shapes.generate("pool", 200, seed=0), NoiseConfig.at_rate(0.8), seed=0))
    assert Counter(s.meta["noise"] for s in noisy)["clean"] < 80
    assert all(s.meta["dataset"] == "shapes" for s in noisy)


def test_sample_kinds_and_their_shares():
    """What a learner trained on: a noise record names its kind, a clean sample edited from another is a hard
    negative, a noise kind this module does not write is other_noise; shares over a batch sum to 1."""
    import torch

    from flexi_jest.data.noise import SAMPLE_KINDS, kind_shares, sample_kind

    metas = [{"noise": "clean"}, {}, {"noise": "blank"}, {"noise": "clean", "hard_negative_of": "k1"},
             {"noise": "near_duplicate", "hard_negative_of": "k2"}, {"noise": "watermarked"}]
    kinds = [SAMPLE_KINDS[sample_kind(m)] for m in metas]
    assert kinds == ["clean", "clean", "blank", "hard_negative", "near_duplicate", "other_noise"]
    shares = kind_shares(torch.tensor([sample_kind(m) for m in metas]), "selected")
    assert shares["selected_clean"] == pytest.approx(2 / 6) and shares["selected_blank"] == pytest.approx(1 / 6)
    assert set(shares) == {f"selected_{k}" for k in SAMPLE_KINDS} and sum(shares.values()) == pytest.approx(1.0)
