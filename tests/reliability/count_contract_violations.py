"""Count the inputs of the reliability fuzz strategies that break the reader's contract, by reader and exception type,
for whichever flexi_jest PYTHONPATH selects: how docs/reliability.md measured the failures the fuzz finds in
an older checkout (there a plain ValueError "corrupt manifest" counts as its own error). Not a test.

Each input is read by the readers production uses (readers.py: the training stream, one epoch; the evaluation
reader; the reference's caching pass); a checkout without them (before data/loader.py and data/eval_sets.py) is
read by its shards.iter_split, the reader of that time.

    git worktree add --detach /tmp/base <commit>
    PYTHONPATH=/tmp/base/src .venv/bin/python tests/reliability/count_contract_violations.py 1000
    .venv/bin/python tests/reliability/count_contract_violations.py 1000          # this checkout
"""

import collections
import importlib.util
import json
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

import flexi_jest  # noqa: E402
from flexi_jest import storage  # noqa: E402
from flexi_jest.data import shards  # noqa: E402

ALLOWED = tuple(error for error in (getattr(shards, "ShardError", None), storage.StorageError) if error)

from faults import colour_samples  # noqa: E402
from fuzz_inputs import damaged_manifests, damaged_shards  # noqa: E402

found: collections.Counter = collections.Counter()
inputs: collections.Counter = collections.Counter()
SETTINGS = settings(max_examples=int(sys.argv[1]), phases=[Phase.generate], database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


def production_readers() -> dict:
    """name -> read(split) -> (samples read, samples counted as read), and the errors within that reader's contract."""
    if not all(importlib.util.find_spec(f"flexi_jest.data.{name}") for name in ("loader", "eval_sets", "specs")):
        def split_read(split):  # an older checkout: the reader of its time
            stats = shards.ReadStats()
            return len(list(shards.iter_split(split, 8, stats))), stats.samples
        return {"iter_split": (split_read, ())}
    from flexi_jest.data.eval_sets import EvalSetError
    from flexi_jest.reference_cache import CacheError
    from readers import cache_pass, cached_keys, eval_read, stream_epoch

    def stream(split):
        samples, loader = stream_epoch(split, 8)
        return len(samples), loader.stats.samples - 1  # stream_epoch hands on the next epoch's first sample too

    def evaluation(split):
        samples, stats = eval_read(split, 8)
        return len(samples), stats.samples

    def caching(split):
        cache_dir = tempfile.mkdtemp()
        manifest = cache_pass(split, cache_dir)
        return sum(len(keys) for keys in cached_keys(cache_dir).values()), manifest["read_stats"]["samples"]

    return {"stream": (stream, ()), "eval": (evaluation, (EvalSetError,)),
            "cache": (caching, (CacheError,))}  # CacheError: a key read twice, refused by a cache keyed by sample


READERS = production_readers()


def read(kind: str, split: pathlib.Path) -> None:
    for name, (reader, contract) in READERS.items():
        try:
            samples, counted = reader(str(split))
            if counted != samples:
                found[f"{kind} ({name}): miscounted"] += 1
        except ALLOWED + contract:
            pass
        except ValueError as exc:
            if not ("corrupt manifest" in str(exc) or "no shards" in str(exc)):
                found[f"{kind} ({name}): {type(exc).__name__}"] += 1
        except Exception as exc:  # noqa: BLE001 - counted
            found[f"{kind} ({name}): {type(exc).__name__}"] += 1


@SETTINGS
@given(data=damaged_shards())
def shard_bytes(data):
    inputs["shard"] += 1
    split = pathlib.Path(tempfile.mkdtemp())
    (split / "a.tar").write_bytes(data)
    read("shard", split)


@SETTINGS
@given(data=damaged_manifests())
def manifest_bytes(data):
    inputs["manifest"] += 1
    split = pathlib.Path(tempfile.mkdtemp())
    shards.write_split(colour_samples(6), str(split), samples_per_shard=3)
    (split / "manifest.json").write_bytes(data)
    read("manifest", split)


shard_bytes()
manifest_bytes()
print(json.dumps({"flexi_jest": flexi_jest.__file__, "readers": list(READERS), "inputs": inputs,
                  "failures": sum(found.values()), "by_type": found}, indent=1))
