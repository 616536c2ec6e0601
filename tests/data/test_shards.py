import io
import json
import tarfile

import pytest
from PIL import Image

from flexi_jest.data.loader import StreamLoader
from flexi_jest.data.manifest import read_manifest
from flexi_jest.data.sample import Sample
from flexi_jest.data.shards import ReadStats, write_split
from flexi_jest.data.specs import SpecError, resolve
from readers import read_split


def colour_samples(n: int, prefix: str = "s"):
    for i in range(n):
        image = Image.new("RGB", (16, 16), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        yield Sample(key=f"{prefix}-{i:05d}", image=image, caption=f"colour number {i}", meta={"index": i})


def test_write_then_read_round_trip(tmp_path):
    manifest = write_split(colour_samples(25), str(tmp_path / "split"), samples_per_shard=10, info={"dataset": "toy"})
    assert manifest["num_samples"] == 25
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 5]
    assert read_manifest(str(tmp_path / "split"))["dataset"] == "toy"
    samples = list(read_split(str(tmp_path / "split")))
    assert [s["key"] for s in samples] == [f"s-{i:05d}" for i in range(25)]
    assert samples[3]["caption"] == "colour number 3"
    assert samples[3]["meta"] == {"index": 3}
    assert tuple(samples[3]["image"].shape) == (3, 16, 16)
    assert samples[3]["image"][:, 0, 0].tolist() == [(3 * 37) % 256, (3 * 91) % 256, (3 * 13) % 256]


def test_reader_resizes_to_the_model_size(tmp_path):
    write_split(colour_samples(3), str(tmp_path), samples_per_shard=10)
    assert all(tuple(s["image"].shape) == (3, 8, 8) for s in read_split(str(tmp_path), image_size=8))


def test_plain_directory_of_tars_without_manifest(tmp_path):
    write_split(colour_samples(12), str(tmp_path), samples_per_shard=5)
    (tmp_path / "manifest.json").unlink()
    for shard in tmp_path.glob("shard-*.tar"):  # external names (flexi-jest's own without a manifest are refused)
        shard.rename(tmp_path / shard.name.replace("shard-", "web-"))
    assert [shard.name for shard in resolve(str(tmp_path)).shards] == [
        "web-000000.tar", "web-000001.tar", "web-000002.tar"]
    assert len(list(read_split(str(tmp_path)))) == 12


def test_truncated_shard_keeps_what_it_holds_and_is_reported(tmp_path):
    write_split(colour_samples(30), str(tmp_path), samples_per_shard=10)
    shard = tmp_path / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut mid-shard
    stats = ReadStats()
    keys = [s["key"] for s in read_split(str(tmp_path), stats=stats)]
    assert keys[:10] == [f"s-{i:05d}" for i in range(10)]
    assert keys[-10:] == [f"s-{i:05d}" for i in range(20, 30)]  # the shard after it is read in full
    assert 10 < len(keys) < 30  # part of the damaged shard survives
    assert stats.skipped["short_shard"] == 1
    assert stats.skipped["checksum_mismatch"] == 1
    assert stats.skipped["corrupt_shard"] + stats.skipped["corrupt_member"] >= 1
    assert "shard-000001.tar" in " ".join(stats.errors)


def test_garbage_shard_does_not_crash(tmp_path):
    write_split(colour_samples(20), str(tmp_path), samples_per_shard=10)
    (tmp_path / "shard-000000.tar").write_bytes(b"this is not a tar file at all" * 10)
    stats = ReadStats()
    keys = [s["key"] for s in read_split(str(tmp_path), stats=stats)]
    assert keys == [f"s-{i:05d}" for i in range(10, 20)]
    assert stats.skipped["corrupt_shard"] == 1 and stats.skipped["short_shard"] == 1


def _write_raw_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_undecodable_image_and_empty_caption_are_skipped_and_counted(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good, format="PNG")
    _write_raw_tar(tmp_path / "a.tar", {
        "k1.png": good.getvalue(), "k1.txt": b"fine",
        "k2.png": b"\x89PNG broken bytes", "k2.txt": b"broken image",
        "k3.png": good.getvalue(), "k3.txt": b"   ",
        "k4.txt": b"no image at all",
        "k5.png": good.getvalue(), "k5.txt": b"also fine", "k5.json": b"{not json",
    })
    stats = ReadStats()
    samples = list(read_split(str(tmp_path), stats=stats))
    assert [s["key"] for s in samples] == ["k1"]  # k5's metadata (its label, its noise kind) is unreadable
    assert stats.skipped == {"bad_image": 1, "empty_caption": 1, "missing_image": 1, "bad_meta": 1}
    assert "1 samples read" in stats.summary()


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="not a directory"):  # specs.resolve, which every reader calls
        resolve(str(tmp_path / "nope"))


def test_stream_is_deterministic_shuffled_and_resumable(tmp_path):
    write_split(colour_samples(40), str(tmp_path), samples_per_shard=7)
    a = StreamLoader(str(tmp_path), 20, streams=1, mode="epoch", seed=3)
    first = [s["key"] for _ in range(5) for s in a.next_batch()]  # crosses two epoch boundaries
    assert sorted(first[:40]) == sorted(f"s-{i:05d}" for i in range(40))  # one epoch = every sample once
    assert first[:40] != sorted(first[:40])  # shuffled
    assert first[:40] != first[40:80]  # a new order each epoch

    b = StreamLoader(str(tmp_path), 20, streams=1, mode="epoch", seed=3)
    b.next_batch(), b.next_batch(), b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))
    c = StreamLoader(str(tmp_path), 20, streams=1, mode="epoch", seed=3)
    c.load_state_dict(state)
    assert [s["key"] for _ in range(2) for s in c.next_batch()] == first[60:]


def test_stream_of_only_unreadable_data_raises(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"garbage")
    stream = StreamLoader(str(tmp_path), 1, streams=1)
    with pytest.raises(ValueError, match="no usable sample"):
        stream.next_batch()
