"""Test helpers: a dataset spec's samples, read the way the tests need them.

read_split is the tests' convenience for a split's samples (not a production reader); the others drive the readers
production uses, so that a test of a reader's contract exercises the code that runs:

    stream_epoch, stream_batch   the training stream (data/loader.py StreamLoader, mode "epoch", one stream)
    eval_read                    the evaluation reader (data/eval_sets.py open_eval_set, OpenedEvalSet.samples)
    cache_pass, cached_keys      the reference's caching pass over a pool (reference_cache.write_cache, as
                                 cache_reference calls it) and what its cache holds (ReferenceCache.load_shard)

Every one of them resolves the spec with data/specs.py resolve, as production does.
"""

from functools import cache
from typing import Any, Iterator

import torch

from conftest import TEST_MODEL
from flexi_jest.config import EvalSet
from flexi_jest.data.eval_sets import EvalSample, open_eval_set
from flexi_jest.data.loader import StreamLoader
from flexi_jest.data.shards import ReadStats, decode_sample, iter_tar
from flexi_jest.data.specs import resolve
from flexi_jest.data.transforms import ImageTransform

CACHE_REFERENCE_SHA256 = "0" * 64  # the sha256 cache_pass records for its reference


def read_split(spec: str, image_size: int | None = None, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """A test helper, not a production reader: every usable sample of a dataset spec once, in shard order, decoded
    as the training stream decodes them (specs.resolve, shards.iter_tar, shards.decode_sample: the primitives every
    reader shares); stats counts what is skipped, and duplicate keys."""
    stats = stats if stats is not None else ReadStats()
    for shard in resolve(spec).shards:
        for raw in iter_tar(shard, stats):
            stats.note_key(raw["__key__"], shard.url)
            sample = decode_sample(raw, image_size, stats)
            if sample is not None:
                yield sample


def stream_epoch(spec: str, image_size: int | None = None, **loader_args) -> tuple[list[dict[str, Any]], StreamLoader]:
    """One epoch of the training stream (StreamLoader, mode "epoch", one stream, batches of one sample): its usable
    samples in the stream's order, and the loader. The stream tells an epoch's end only by going on, so the loader
    has also read the next epoch's first shard and handed on one sample of it (not in the list): its stats count
    that shard too, and stats.samples == len(samples) + 1. Raises what the stream raises (UnreadableSplitError)."""
    loader = StreamLoader(spec, 1, streams=1, mode="epoch", image_size=image_size, **loader_args)
    shards = len(loader.spec.shards)
    samples: list[dict[str, Any]] = []
    while True:
        batch = loader.next_batch()
        if loader.state_dict()["positions"][0][0] > shards:  # the visit of the next epoch's first shard
            return samples, loader
        samples += batch


def stream_batch(spec: str, batch_size: int, image_size: int | None = None, **loader_args
                 ) -> tuple[list[dict[str, Any]], ReadStats]:
    """The training stream's first batch (StreamLoader, mode "epoch", one stream) and its read stats, checking that
    the batch lies within the first epoch. A shard's raw samples are decoded in groups of loader.GROUP that never
    cross its end, so for shards of at most GROUP samples the stats count every shard the batch read, whole."""
    loader = StreamLoader(spec, batch_size, streams=1, mode="epoch", image_size=image_size, **loader_args)
    batch = loader.next_batch()
    visit = loader.state_dict()["positions"][0][0]
    assert visit <= len(loader.spec.shards), f"a batch of {batch_size} runs into the second epoch of {spec!r}"
    return batch, loader.stats


def eval_read(uri: str, image_size: int = 8, **eval_set) -> tuple[list[EvalSample], ReadStats]:
    """Every sample evaluation reads of an eval set (open_eval_set, then OpenedEvalSet.samples with the evaluation's
    ImageTransform), and the read stats evaluation judges the set by (evaluate.embed_eval_set)."""
    opened = open_eval_set(EvalSet(uri=uri, **eval_set))
    stats = ReadStats()
    return list(opened.samples(ImageTransform(image_size), stats)), stats


@cache
def _reference():
    """A small seeded model and its tokenizer, as the caching pass's reference (what it computes is not the point)."""
    from flexi_jest.models import DualEncoder, Tokenizer
    torch.manual_seed(0)
    model = DualEncoder(TEST_MODEL)
    return model, Tokenizer(model.cfg)


def cache_pass(pool: str, cache_dir: str, batch_size: int = 64) -> dict[str, Any]:
    """The reference's caching pass over a pool (reference_cache.write_cache on the CPU, with a small model); returns
    the cache's manifest (its num_samples, per-shard entries, skipped counts and read_stats)."""
    from flexi_jest.device import to_model_input
    from flexi_jest.reference_cache import write_cache
    model, tokenizer = _reference()
    cpu = torch.device("cpu")
    return write_cache(model, tokenizer, pool, cache_dir, CACHE_REFERENCE_SHA256, None, batch_size, cpu,
                       lambda images: to_model_input(images, cpu, model.cfg.mean, model.cfg.std))


def cached_keys(cache_dir: str) -> dict[str, list[str]]:
    """The keys a reference cache holds, by pool shard URL, in row order, as a reader loads them (ReferenceCache:
    the manifest's digest, each sidecar's sha256, shapes and finiteness checked)."""
    from flexi_jest.reference_cache import ReferenceCache
    reader = ReferenceCache(cache_dir, expected_reference_sha256=CACHE_REFERENCE_SHA256)
    keys = {}
    for url in reader.manifest["shards"]:
        index = reader.load_shard(url)[0]
        keys[url] = sorted(index, key=index.get)
    return keys
