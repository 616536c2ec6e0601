"""Dataset specs: which tar shards a dataset is, as open_clip's `--train-data` takes them.

A spec is one string; several specs are joined by `::` (webdataset's convention). Each part is:

    runs/data/pool                       a directory or prefix (local, file://, s3://): its *.tar, or its
                                         manifest's shards
    pool/{00000..00099}.tar              a brace pattern (expanded by webdataset / braceexpand); every shard must exist
    s3://bucket/pool/00007.tar           a single tar
    https://host/pool/{000..009}.tar     http(s) URLs (each checked with a HEAD request)    [data_access.allow_http]
    pipe:curl -s https://host/a.tar      a command writing a tar to stdout (an argument list, never a shell)
                                                                              [data_access.pipe_commands: [curl]]
    run/data/pool.shardlist.json         a spec resolved once (write_shard_list): its shards, their counts and
                                         sha256, as resolution found them (make-data's `register` writes one per split)

pipe: and http(s) parts are refused unless the stage's data_access enables them (access.py, docs/security.md).

Sample counts, per shard, come from the flexi-jest manifest beside the shards, or from img2dataset's
`<shard>_stats.json` (its `successes` field), or stay unknown; an explicit `num_samples` overrides the
total. A spec that names a missing shard, an unreachable URL or matches nothing raises SpecError: one
line naming the spec and the problem.

A shard list is input like any spec: each URL it holds passes the same data-access check, each local / s3 shard
must still exist (one listing per directory), each http(s) URL answer; a list inside a list is refused. Reading it
costs one GET, where resolving the spec again lists directories and fetches a stats file per shard, and every
stage reading it sees the same shards in the same order, even if the pool's directory changed since.

s3:// shards are read through flexi_jest.storage (minio, configured from the environment), like every
other artifact of the project, so the same spec reads MinIO on a cluster and moto in the tests.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from webdataset.shardlists import expand_urls

from flexi_jest import storage
from flexi_jest.data import remote
from flexi_jest.data.access import SpecError, check_spec  # noqa: F401 - SpecError is this module's error
from flexi_jest.data.manifest import MANIFEST, ShardError, check_not_interrupted, manifest_entries, shard_uri


@dataclass(frozen=True)
class Shard:
    """One tar shard of a dataset: where to open it and, if known, how many samples it holds."""

    url: str  # a path, file://, s3://, http(s):// URL or pipe: command
    num_samples: int | None = None
    sha256: str | None = None  # from a flexi-jest manifest: checked when the shard is read

    @property
    def name(self) -> str:
        """The shard's file name (the last path component; the whole command for pipe:)."""
        return self.url if self.url.startswith("pipe:") else self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved spec: its text and its shards in order."""

    spec: str
    shards: tuple[Shard, ...]
    explicit_num_samples: int | None = None

    @property
    def num_samples(self) -> int | None:
        """Samples in the dataset: the explicit count, else the shards' sum if every shard's count is known."""
        if self.explicit_num_samples is not None:
            return self.explicit_num_samples
        counts = [s.num_samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]


def scheme(url: str) -> str:
    """'pipe', 'http', 's3' or 'local' (paths and file://)."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith(("http://", "https://")):
        return "http"
    return "s3" if storage.is_s3(url) else "local"


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    except (storage.StorageError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _stats_count(url: str) -> int | None:
    """img2dataset's count beside a shard: `<stem>_stats.json`'s `successes`, or None."""
    stats = _read_json(url.removesuffix(".tar") + "_stats.json")
    value = (stats or {}).get("successes")
    return int(value) if isinstance(value, int) else None


def _expand(spec: str) -> list[str]:
    """The spec's URLs: `::`-joined parts, each brace-expanded (webdataset's expand_urls)."""
    try:
        return list(expand_urls(spec))
    except Exception as exc:  # braceexpand raises for unbalanced patterns
        raise SpecError(f"dataset spec {spec!r}: cannot expand it: {exc}") from None


def _is_pattern(part: str) -> bool:
    return "{" in part and "}" in part


def _part_shards(spec: str, part: str, check: bool, counts: bool) -> list[Shard]:
    """The shards of one `::` part of spec."""
    kind = scheme(part)
    if kind == "pipe":
        return [Shard(part)]
    if kind == "http":
        urls = _expand(part)
        if check:
            for url in urls:
                problem = remote.http_problem(url)
                if problem:
                    raise SpecError(f"dataset spec {spec!r}: cannot reach {url}: {problem}")
        return [Shard(url) for url in urls]
    try:
        if _is_pattern(part) or part.endswith(".tar"):
            urls = _expand(part)
            if check:
                missing = [u for u in urls if not storage.exists(u)]
                if missing:
                    more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
                    raise SpecError(f"dataset spec {spec!r}: missing shard {missing[0]}{more}")
        else:  # a directory or prefix
            entries = manifest_entries(part)
            if entries is not None:
                if not entries:
                    raise ShardError(f"no shards in {part}: its {MANIFEST} lists none")
                # shard_uri: a manifest's names stay inside its directory
                return [Shard(shard_uri(part, name), e.get("num_samples"),
                              e.get("sha256")) for name, e in entries.items()]
            names = storage.list_names(part, ".tar")
            if not names:
                raise SpecError(f"dataset spec {spec!r}: no .tar shards under {part}")
            check_not_interrupted(part, names)
            urls = [storage.join(part, name) for name in names]
    except storage.StorageError as exc:
        raise SpecError(f"dataset spec {spec!r}: {exc}") from None
    if not counts:
        return [Shard(url) for url in urls]
    return _with_counts(urls)


def _with_counts(urls: list[str]) -> list[Shard]:
    """Shards with their counts: the manifest of their directory, else img2dataset's stats files."""
    manifests: dict[str, dict[str, dict] | None] = {}
    for directory in {_parent(u) for u in urls}:
        try:
            manifests[directory] = manifest_entries(directory)
        except storage.StorageError:  # a directory we may not list or read: counts from stats files only
            manifests[directory] = None
    need_stats = [u for u in urls if not (manifests[_parent(u)] or {}).get(u.rsplit("/", 1)[-1])]
    with ThreadPoolExecutor(8) as pool:  # one small GET per shard: overlap them on S3
        stats = dict(zip(need_stats, pool.map(_stats_count, need_stats)))
    shards = []
    for url in urls:
        entry = (manifests[_parent(url)] or {}).get(url.rsplit("/", 1)[-1])
        if entry:
            shards.append(Shard(url, entry.get("num_samples"), entry.get("sha256")))
        else:
            shards.append(Shard(url, stats.get(url)))
    return shards


SHARD_LIST_SUFFIX = ".shardlist.json"
SHARD_LIST_FORMAT = "flexi-jest-shardlist/1"


def write_shard_list(uri: str, resolved: DatasetSpec) -> None:
    """Write resolved to uri (ending in SHARD_LIST_SUFFIX), for later stages to read instead of resolving again:

        {"format": SHARD_LIST_FORMAT, "spec": the spec's text, "num_samples": the explicit count or null,
         "shards": [{"url", "num_samples", "sha256"}]}    (a count or sha256 null where resolution found none)
    """
    if not uri.endswith(SHARD_LIST_SUFFIX):
        raise ValueError(f"a shard list's name ends in {SHARD_LIST_SUFFIX}, got {uri!r}")
    document = {"format": SHARD_LIST_FORMAT, "spec": resolved.spec, "num_samples": resolved.explicit_num_samples,
                "shards": [{"url": s.url, "num_samples": s.num_samples, "sha256": s.sha256} for s in resolved.shards]}
    storage.write_bytes(uri, json.dumps(document, indent=1).encode())


def _count_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _read_shard_list(spec: str, uri: str) -> tuple[list[Shard], int | None]:
    """The shards and explicit count a shard list holds; SpecError naming the list and the field if it is not one."""
    where = f"dataset spec {spec!r}: shard list {uri}"
    try:
        document = json.loads(storage.read_bytes(uri))
    except storage.StorageError as exc:
        raise SpecError(f"dataset spec {spec!r}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SpecError(f"{where} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != SHARD_LIST_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise SpecError(f"{where}: format must be {SHARD_LIST_FORMAT!r}, got {found!r}")
    entries = document.get("shards")
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{where}: 'shards' must be a non-empty list of {{url, num_samples, sha256}}")
    total = document.get("num_samples")
    if not _count_or_none(total) or total == 0:
        raise SpecError(f"{where}: 'num_samples' must be a positive integer or null, got {total!r}")
    shards = []
    for i, entry in enumerate(entries):
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url.strip():
            raise SpecError(f"{where}: shards[{i}].url must be a non-empty string")
        if url.endswith(SHARD_LIST_SUFFIX) or "::" in url:
            raise SpecError(f"{where}: shards[{i}].url {url!r} is a spec, not a shard: a list holds shards only")
        if not _count_or_none(entry.get("num_samples")):
            raise SpecError(f"{where}: shards[{i}].num_samples must be an integer >= 0 or null, "
                            f"got {entry.get('num_samples')!r}")
        sha = entry.get("sha256")
        if sha is not None and not storage.is_sha256(sha):
            raise SpecError(f"{where}: shards[{i}].sha256 must be 64 lowercase hex digits or null, got {sha!r}")
        shards.append(Shard(url, entry.get("num_samples"), sha))
    return shards, total


FEW_SHARDS = 2  # a listed directory with at most this many shards is checked shard by shard, not listed


def _listed_names(directory: str) -> set[str]:
    """The names in a directory (one request instead of one per shard), or none where it may be read but not
    listed: then each shard is asked for by itself."""
    try:
        return set(storage.list_names(directory, ""))
    except storage.StorageError:
        return set()


def _check_listed(spec: str, uri: str, shards: list[Shard]) -> None:
    """The checks resolving the listed URLs as a spec would make: the data-access policy for each, then each
    local / s3 shard present (one listing per directory) and each http(s) URL answering."""
    where = f"dataset spec {spec!r}: shard list {uri}"
    for shard in shards:
        try:
            check_spec(shard.url)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
    by_directory: dict[str, list[str]] = {}
    for shard in shards:
        kind = scheme(shard.url)
        if kind == "http":
            problem = remote.http_problem(shard.url)
            if problem:
                raise SpecError(f"{where}: cannot reach {shard.url}: {problem}")
        elif kind != "pipe":
            by_directory.setdefault(_parent(shard.url), []).append(shard.url)
    missing = []
    for directory, urls in by_directory.items():
        present = _listed_names(directory) if len(urls) > FEW_SHARDS else set()
        try:  # a name the listing leaves out (a dot-file, a symlink) may still be there: ask for it by itself
            missing += [u for u in urls if u.rstrip("/").rsplit("/", 1)[-1] not in present and not storage.exists(u)]
        except storage.StorageError as exc:
            raise SpecError(f"{where}: {exc}") from None
    if missing:
        more = f" (and {len(missing) - 1} more of {len(shards)})" if len(missing) > 1 else ""
        raise SpecError(f"{where}: missing shard {missing[0]}{more}; the data changed since the list was written")


def resolve(spec: str, num_samples: int | None = None, check: bool = True, counts: bool = True) -> DatasetSpec:
    """The shards a spec names, in order.

    check: refuse a pipe: or http(s) part the process's data-access policy does not allow (access.py; off by
    default), and verify that each local / s3 shard exists and each http(s) URL answers (pipe: commands are
    only run when read); counts: look up per-shard sample counts (manifest, then `*_stats.json`).
    Raises SpecError (one line, naming the spec) if the spec is empty, malformed, refused or names nothing readable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"dataset spec {spec!r} is empty")
    if check:  # before any request or command: pipe: and http(s) only where the data-access policy allows them
        check_spec(spec)
    if num_samples is not None and num_samples < 1:
        raise SpecError(f"dataset spec {spec!r}: num_samples must be positive, got {num_samples}")
    shards: list[Shard] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise SpecError(f"dataset spec {spec!r} has an empty part between '::'")
        if part.startswith("pipe:"):  # a command may hold braces of its own: keep it whole
            shards.append(Shard(part))
            continue
        if part.endswith(SHARD_LIST_SUFFIX):  # resolved before: its shards as they were, checked again
            listed, total = _read_shard_list(spec, part)
            if check:
                _check_listed(spec, part, listed)
            shards += listed
            if num_samples is None and "::" not in spec:
                num_samples = total
            continue
        shards += _part_shards(spec, part, check, counts)
    if not shards:
        raise SpecError(f"dataset spec {spec!r} matches no shards")
    return DatasetSpec(spec, tuple(shards), num_samples)


# ---- opening a shard ------------------------------------------------------------------------------------------


def open_shard(url: str) -> BinaryIO:
    """A binary stream of a shard's tar bytes. Raises OSError (storage.StorageError for local / s3) naming the url;
    a remote read past its deadline (remote.py) is a TimeoutError, an OSError too."""
    kind = scheme(url)
    if kind in ("pipe", "http"):
        check_spec(url)  # SpecError (not an OSError: a refused spec fails the read, it is not a missing shard)
    if kind == "pipe":
        command = url[len("pipe:"):]
        try:
            argv = remote.split_command(command)
        except ValueError as exc:
            raise OSError(f"{url}: cannot split it into arguments: {exc}") from None
        return remote.pipe_open(argv, command)  # type: ignore[return-value]
    if kind == "http":
        return remote.http_open(url)  # type: ignore[return-value]
    return storage.open_read(url)
