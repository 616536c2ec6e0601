"""Count the inputs of the reliability fuzz strategies that break the reader's contract, by exception type,
for whichever flexi_jest PYTHONPATH selects: how docs/reliability.md measured the failures the fuzz finds in
an older checkout (there a plain ValueError "corrupt manifest" counts as its own error). Not a test.

    git worktree add --detach /tmp/base <commit>
    PYTHONPATH=/tmp/base/src .venv/bin/python tests/reliability/count_contract_violations.py 1000
    .venv/bin/python tests/reliability/count_contract_violations.py 1000          # this checkout
"""

import collections
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
for missing in ("ShardError", "UnreadableSplitError"):  # an older checkout: names the test modules import
    if not hasattr(shards, missing):
        setattr(shards, missing, type(missing, (Exception,), {}))

from faults import colour_samples  # noqa: E402
from test_fuzz_manifests import damaged_manifests  # noqa: E402
from test_fuzz_shards import damaged_shards  # noqa: E402

found: collections.Counter = collections.Counter()
inputs: collections.Counter = collections.Counter()
SETTINGS = settings(max_examples=int(sys.argv[1]), phases=[Phase.generate], database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


def read(kind: str, split: pathlib.Path) -> None:
    stats = shards.ReadStats()
    try:
        samples = list(shards.iter_split(str(split), 8, stats))
        if stats.samples != len(samples):
            found[f"{kind}: miscounted"] += 1
    except ALLOWED:
        pass
    except ValueError as exc:
        if not ("corrupt manifest" in str(exc) or "no shards" in str(exc)):
            found[f"{kind}: {type(exc).__name__}"] += 1
    except Exception as exc:  # noqa: BLE001 - counted
        found[f"{kind}: {type(exc).__name__}"] += 1


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
print(json.dumps({"flexi_jest": flexi_jest.__file__, "inputs": inputs, "failures": sum(found.values()),
                  "by_type": found}, indent=1))
