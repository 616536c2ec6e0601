"""The split format: a flexi-jest split directory's manifest.json, what it must hold, and the checks every reader
makes with it (shards.py writes and reads the shards; specs.py resolves a directory's shards through it).

    manifest.json   {"format": FORMAT, "num_samples": N, "shards": [{"name", "num_samples", "sha256", "bytes"}],
                     "noise_counts": {...}, "created": ..., plus the dataset's info (dataset, split, classes, ...)}

The manifest is written last, so shards named as write_split names them (shard-NNNNNN.tar) without one are an
interrupted write (IncompleteSplitError); a manifest's shard names must stay inside its directory
(UnsafeShardNameError); a manifest of any other shape is a ShardError naming the field.
"""

import json
import re
from typing import Any

from flexi_jest import storage
from flexi_jest.errors import BadInput

MANIFEST = "manifest.json"
FORMAT = "flexi-jest-shards/1"
WRITTEN_SHARD = re.compile(r"shard-\d{6}\.tar")  # the names write_split gives its shards


class ShardError(ValueError, BadInput):
    """A split cannot be read as asked: a corrupt or incomplete manifest, an interrupted write, no usable sample.

    The reader's contract: bad bytes inside a shard are skipped and counted in ReadStats; what makes the
    whole split unusable is a ShardError (or a storage.StorageError when the location cannot be reached)."""


class IncompleteSplitError(ShardError):
    """A split written by this project has shards but no manifest: its writing was interrupted."""


class UnsafeShardNameError(ShardError, storage.UnsafeNameError):
    """A manifest names a shard outside its split (../, an absolute path, another scheme): never read."""


def shard_uri(split_dir: str, name: str) -> str:
    """split_dir/name for a shard name from the split's manifest, which must stay inside the split."""
    try:
        return storage.confined(split_dir, name, storage.join(split_dir, MANIFEST))
    except storage.UnsafeNameError as exc:
        raise UnsafeShardNameError(str(exc)) from exc


def _check_manifest(uri: str, manifest: Any) -> dict[str, Any]:
    """The manifest if its structure is what the reader relies on, else a ShardError naming the field."""
    def bad(where: str, problem: str) -> ShardError:
        return ShardError(f"corrupt manifest {uri}: {where} {problem}")

    if not isinstance(manifest, dict):
        raise bad("the document", f"must be a JSON object, got {type(manifest).__name__}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad("'shards'", "must be a list of {name, num_samples, sha256}")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise bad(f"shards[{i}]", "must be an object")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise bad(f"shards[{i}].name", "must be a non-empty string")
        count = entry.get("num_samples")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise bad(f"shards[{i}].num_samples", f"must be an integer >= 0, got {count!r}")
        if "sha256" in entry and not isinstance(entry["sha256"], str):
            raise bad(f"shards[{i}].sha256", "must be a string")
    return manifest


def read_manifest(split_dir: str) -> dict[str, Any] | None:
    """The split's manifest, or None for a plain directory of tars; a ShardError if it is not a valid manifest."""
    uri = storage.join(split_dir, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ShardError(f"corrupt manifest {uri}: {exc}") from exc
    return _check_manifest(uri, manifest)


def manifest_entries(directory: str) -> dict[str, dict] | None:
    """The flexi-jest manifest's shards of a directory, by name; None without one (a corrupt one: ShardError)."""
    manifest = read_manifest(directory)
    return {s["name"]: s for s in manifest["shards"]} if manifest else None


def check_not_interrupted(split_dir: str, names: list[str]) -> None:
    """An IncompleteSplitError if a directory without a manifest holds shards named as write_split names them."""
    if any(WRITTEN_SHARD.fullmatch(name) for name in names):
        raise IncompleteSplitError(
            f"split {split_dir} has shards written by flexi-jest ({names[0]}, ...) but no {MANIFEST}, which is "
            "written last: the write was interrupted and the split may be incomplete. Re-run the stage that "
            "wrote it (make-data) to rewrite the split; if these are external tars, rename them (not "
            "shard-NNNNNN.tar)")
