"""The training stream (data/loader.py): deterministic, exactly resumable in both modes, the same batch for any
world size, each rank decoding only its rows, worker processes changing nothing; preprocessing (transforms.py)."""

import io

import pytest
import torch
from PIL import Image

from flexi_jest.data.loader import StreamLoader, merge_states, shard_of
from flexi_jest.data.sample import Sample
from flexi_jest.data.shards import UnreadableSplitError, write_split
from flexi_jest.data.transforms import ImageTransform, decode_image


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    """60 samples in 6 shards of 10, each image a flat colour coding its index."""
    out = str(tmp_path_factory.mktemp("loader") / "pool")
    samples = [Sample(f"s-{i:03d}", Image.new("RGB", (12, 8), (i, 255 - i, 7)), f"caption {i}") for i in range(60)]
    write_split(iter(samples), out, samples_per_shard=10)
    return out


def keys(batch) -> list[str]:
    return [s["key"] for s in batch]


def run(pool: str, steps: int, **kwargs) -> list[list[str]]:
    with StreamLoader(pool, 8, streams=4, seed=3, image_size=8, **kwargs) as loader:
        return [keys(loader.next_batch()) for _ in range(steps)]


@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_resume_continues_the_same_stream(pool, mode):
    whole = run(pool, 12, mode=mode)
    with StreamLoader(pool, 8, streams=4, seed=3, image_size=8, mode=mode) as first:
        head = [keys(first.next_batch()) for _ in range(5)]
        state = first.state_dict()
    with StreamLoader(pool, 8, streams=4, seed=3, image_size=8, mode=mode) as resumed:
        resumed.load_state_dict(state)
        tail = [keys(resumed.next_batch()) for _ in range(7)]
    assert head + tail == whole
    assert run(pool, 12, mode=mode) == whole  # deterministic
    assert run(pool, 12, mode=mode, workers=2) == whole  # decoding in worker processes changes nothing


def test_epoch_mode_reads_every_sample_once_per_epoch_and_resampled_draws_with_replacement(pool):
    # 120 samples: the 12 visits of two epochs of the 6 shards, 3 per stream: every sample exactly twice
    epoch = [k for batch in run(pool, 15, mode="epoch") for k in batch]
    assert sorted(epoch) == sorted([f"s-{i:03d}" for i in range(60)] * 2)
    draws = [shard_of(v, 6, "resampled", 3) for v in range(60)]
    assert set(draws) == set(range(6)) and any(draws.count(i) > 10 for i in range(6))


def test_each_rank_decodes_only_its_rows_and_the_batch_is_the_same_for_any_world_size(pool):
    one = run(pool, 6)
    ranks = [StreamLoader(pool, 8, streams=4, seed=3, image_size=8, rank=r, world=2) for r in range(2)]
    two = [keys(ranks[0].next_batch()) + keys(ranks[1].next_batch()) for _ in range(6)]
    assert two == one
    assert ranks[0].decoded < 6 * 8 and ranks[0].decoded + ranks[1].decoded <= 6 * 8 + 2 * 2 * 16
    # a checkpoint made of both ranks' states resumes on one process
    with StreamLoader(pool, 8, streams=4, seed=3, image_size=8) as resumed:
        resumed.load_state_dict(merge_states([ranks[0].state_dict(), ranks[1].state_dict()]))
        assert keys(resumed.next_batch()) == run(pool, 7)[-1]


def test_bad_settings_and_a_foreign_state_are_refused(pool):
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        StreamLoader(pool, 8, streams=4, world=3)
    with pytest.raises(ValueError, match="batch size 7 must be divisible"):
        StreamLoader(pool, 7, streams=4, world=2)
    with StreamLoader(pool, 6, streams=4, image_size=8) as uneven:  # streams share the rows as evenly as they go
        assert len(uneven.next_batch()) == 6
    with pytest.raises(ValueError, match="start the run afresh"):
        StreamLoader(pool, 8, streams=4).load_state_dict({"epoch": 0, "position": 3, "seed": 0})
    state = StreamLoader(pool, 8, streams=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        StreamLoader(pool, 8, streams=4, seed=2).load_state_dict(state)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_preprocessing_keeps_the_aspect_ratio_and_seeds_random_crops_by_key():
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    wide.paste((0, 0, 255), (24, 0, 40, 16))  # a blue middle square
    center = decode_image(png(wide), ImageTransform(16))
    assert center.shape == (3, 16, 16) and center.dtype == torch.uint8
    assert center[2].float().mean() > 200 and center[0].float().mean() < 60  # the middle, not a squashed strip
    same = Image.new("RGB", (16, 16), (1, 2, 3))  # at the model's size: unchanged (the generated data)
    assert torch.equal(decode_image(png(same), ImageTransform(16)),
                       torch.tensor([1, 2, 3]).view(3, 1, 1).expand(3, 16, 16))
    noise = Image.fromarray(torch.randint(0, 255, (48, 80, 3), dtype=torch.uint8).numpy())
    crop = ImageTransform(16, "random_resized", scale=(0.2, 0.5), seed=1)
    a, b = decode_image(png(noise), crop, "k1"), decode_image(png(noise), crop, "k2")
    assert torch.equal(a, decode_image(png(noise), crop, "k1")) and not torch.equal(a, b)


def img2dataset_shard(root, stem: str, keys: list[str]) -> str:
    """A shard as img2dataset writes one (`stem.tar`, `stem_stats.json` with its successes); keys=[]: an empty
    shard (every URL of it failed), the usual last shard of a real pool."""
    import json

    from webdataset import TarWriter
    buffer = io.BytesIO()
    with TarWriter(buffer) as writer:
        for i, key in enumerate(keys):
            writer.write({"__key__": key, "jpg": png(Image.new("RGB", (12, 8), (i, 9, 9))),
                          "txt": f"caption {key}".encode()})
    (root / f"{stem}.tar").write_bytes(buffer.getvalue())
    (root / f"{stem}_stats.json").write_text(json.dumps({"successes": len(keys),
                                                         "failed_to_download": 0 if keys else 3}))
    return str(root / f"{stem}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_empty_shard_is_never_drawn_so_a_pool_with_one_trains(tmp_path, workers):
    """The resampled stream draws with replacement: before, a run of draws of the one empty shard ended training
    ('no usable sample in a whole pass'). Seed 16 draws the empty shard first, several times in a row, for stream
    0 of the `::` join (asserted below on the old draw rule, so the test keeps its teeth)."""
    full = img2dataset_shard(tmp_path, "00001", [f"k{i:02d}" for i in range(6)])
    empty = img2dataset_shard(tmp_path, "00003", [])
    old_draws = [shard_of(visit * 2, 2, "resampled", 16) for visit in range(4)]
    assert old_draws[:3] == [1, 1, 1], old_draws  # the old rule: the empty shard (index 1) three times in a row
    with StreamLoader(f"{full}::{empty}", 4, streams=2, seed=16, image_size=8, workers=workers) as loader:
        for _ in range(5):
            assert len(loader.next_batch()) == 4
        assert all(loader._visit_shard(s, v) == 0 for s in range(2) for v in range(1, 20))
    brace = str(tmp_path / "{00001..00003}.tar")
    img2dataset_shard(tmp_path, "00002", [f"m{i:02d}" for i in range(6)])
    with StreamLoader(brace, 8, streams=4, seed=4, image_size=8) as loader:
        batches = [keys(loader.next_batch()) for _ in range(4)]
        assert {loader._visit_shard(s, v) for s in range(4) for v in range(1, 30)} == {0, 1}
    assert {k[0] for batch in batches for k in batch} == {"k", "m"}


def test_the_liveness_rule_counts_distinct_shards_not_visits(tmp_path):
    """Without counts (no *_stats.json) an empty shard is drawn like any other: before, two draws of it in a row
    failed a two-shard stream; now the stream fails only once each shard has been read without a usable sample."""
    full = img2dataset_shard(tmp_path, "00001", [f"k{i:02d}" for i in range(6)])
    empty = img2dataset_shard(tmp_path, "00003", [])
    for stats in tmp_path.glob("*_stats.json"):
        stats.unlink()
    with StreamLoader(f"{full}::{empty}", 4, streams=2, seed=16, image_size=8) as loader:
        assert loader.live == [0, 1]  # counts unknown: both drawn
        for _ in range(5):
            assert len(loader.next_batch()) == 4
        assert [loader._visit_shard(0, v) for v in (1, 2, 3)] == [1, 1, 1]  # the empty shard thrice in a row
    other = img2dataset_shard(tmp_path, "00004", [])
    (tmp_path / "00004_stats.json").unlink()
    with StreamLoader(f"{empty}::{other}", 2, streams=1, seed=0, image_size=8) as loader:
        with pytest.raises(UnreadableSplitError, match=r"no usable sample in a whole pass .*each of its 2 shards"):
            loader.next_batch()
        assert len(loader._lanes[0].bad_shards) == 2
    img2dataset_shard(tmp_path, "00003", [])  # its stats file again: successes 0
    img2dataset_shard(tmp_path, "00004", [])
    with pytest.raises(UnreadableSplitError,
                       match=r"every shard of .* is empty by its sample counts.*00003.tar, 00004.tar"):
        StreamLoader(f"{empty}::{other}", 2, streams=1)
